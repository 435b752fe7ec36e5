"""Round cost against the number of stored comparisons (issue #15, point 4).

The costs of an alignment round that could grow with every label ever collected, timed
at 200, 1,000 and 5,000 comparisons stored in a real preference store (SQLite, temporary
directory) with synthetic segments and synthetic labels:

* **labels**: reading the labels for training (``StoreLabeller.labels``: one query;
  segments are handles read when a batch needs them) and converting them to
  winner-first pairs;
* **align**: :func:`fkpd.train.align.align` at the app's default round settings
  (``RoundParams().align_config(BatchSettings())``: 300 steps, 8 pairs a step, the
  forward-KL term on the offline dataset), which includes the implicit accuracy before
  and after the round on a seeded sample of ``eval_pairs`` (256) pairs with its Wilson
  interval, the reference network run once for both.

The rest of a round (the short evaluation of the new version and rolling out and
rendering the next batch) does not depend on how many labels are stored and is left
out. The reference is a freshly initialised policy of the default architecture for
door-open (Do = 39, Da = 4) and the segments have the app's default length (64 steps), so
the figures are the costs, not learning. Acceptance: round time at 5,000 within 1.5x of
the time at 200.

    nice -n 5 python bench/bench_round_costs.py [--sizes 200 1000 5000] [--steps 300]
                                                [--json bench/results/bench_round_costs.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fkpd.data import Normalizer  # noqa: E402
from fkpd.data.hdf5 import write_dataset  # noqa: E402
from fkpd.envs import get_task  # noqa: E402
from fkpd.policy import DiffusionPolicy, PolicyConfig  # noqa: E402
from fkpd.store import Store  # noqa: E402
from fkpd.store.artifacts import sha256_file  # noqa: E402
from fkpd.studio.batches import StoreLabeller  # noqa: E402
from fkpd.studio.params import BatchSettings, RoundParams  # noqa: E402
from fkpd.train.align import align, pairs_from_labels  # noqa: E402

TASK = "metaworld/door-open-v3"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_round_costs.json"


def _reference(root: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    """A default-architecture policy for the task (fresh weights) and a synthetic offline
    dataset (50 episodes of 200 steps) it names as its own."""
    spec = get_task(TASK)
    n, ep = 50 * 200, 200
    obs = rng.uniform(-1, 1, (n, spec.obs_dim)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, spec.action_dim)).astype(np.float32)
    terminals = np.zeros(n, bool)
    timeouts = np.zeros(n, bool)
    timeouts[ep - 1::ep] = True
    data = write_dataset(root / "dataset.hdf5", {"observations": obs, "actions": act,
                                                "rewards": rng.uniform(0, 1, n).astype(np.float32),
                                                "terminals": terminals, "timeouts": timeouts},
                         attrs={"task_id": TASK})
    cfg = PolicyConfig(obs_dim=spec.obs_dim, action_dim=spec.action_dim)
    policy = DiffusionPolicy(cfg, Normalizer.fit(obs), Normalizer.fit(act), task_id=TASK)
    ckpt = policy.save(root / "ref", extra={"dataset": str(data), "round": 0})
    return ckpt, data


def _add_comparisons(store: Store, project, annotator, first: int, count: int, length: int,
                     rng: np.random.Generator) -> None:
    """``count`` comparisons of two fresh clips each (left/right/equal at random), their
    segment files written straight into the artifact directory."""
    spec = get_task(TASK)
    root = store.artifacts.root
    clips, pairs = [], []
    for i in range(first, first + count):
        for side in (0, 1):
            rel = f"segments/c{i}_{side}.npz"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                np.savez(f, observations=rng.uniform(-1, 1, (length, spec.obs_dim)).astype(np.float32),
                         actions=rng.uniform(-1, 1, (length, spec.action_dim)).astype(np.float32),
                         rewards=rng.uniform(0, 1, length).astype(np.float32))
            clips.append({"segment_path": rel, "segment_sha256": sha256_file(path), "length": length, "fps": 80.0,
                          "reset_seed": i})
        pairs.append((len(clips) - 2, len(clips) - 1))
    outcomes = rng.choice(["left", "right", "equal"], size=count, p=[0.45, 0.45, 0.1]).tolist()
    store.add_imported_labels(project.id, annotator.id, clips, pairs, outcomes, round=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 5000],
                    help="stored comparisons to time a round at (increasing)")
    ap.add_argument("--steps", type=int, default=0, help="alignment steps (0: the app's default)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (a worker runs with 1)")
    ap.add_argument("--json", default=str(RESULTS))
    args = ap.parse_args()
    if sorted(args.sizes) != args.sizes or args.sizes[0] < 1:
        ap.error("--sizes must be increasing positive numbers of comparisons")
    torch.set_num_threads(args.threads)
    settings = BatchSettings()
    base = RoundParams().align_config(settings)
    if args.steps:
        base.steps = args.steps
    base.device, base.threads = "cpu", args.threads
    length = settings.length(TASK)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fkpd-round-costs-") as tmp:
        root = Path(tmp)
        ckpt, data = _reference(root, rng)
        with Store(f"sqlite:///{root / 'labels.db'}", root / "artifacts") as store:
            project = store.create_project("costs", TASK, "Which arm opens the door?")
            annotator = store.get_or_create_annotator("synthetic")
            stored = 0
            for size in args.sizes:
                t0 = time.perf_counter()
                _add_comparisons(store, project, annotator, stored, size - stored, length, rng)
                stored = size
                setup_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                labels = StoreLabeller(store, project).labels()
                pairs = pairs_from_labels(labels)
                labels_s = time.perf_counter() - t0
                cfg = base.__class__(**{**base.__dict__, "checkpoint": str(ckpt), "dataset": str(data),
                                        "out_dir": str(root / f"round-{size}"), "seed": 1})
                t0 = time.perf_counter()
                result = align(cfg, pairs, progress=False, task_id=TASK)
                align_s = time.perf_counter() - t0
                row = {"comparisons": size, "trained_pairs": len(pairs), "labels_s": labels_s, "align_s": align_s,
                       "round_s": labels_s + align_s, "setup_s": setup_s,
                       "pairs_evaluated": result.after["pairs_evaluated"],
                       "implicit_acc_after": result.after["implicit_acc"],
                       "implicit_acc_ci95": [result.after["implicit_acc_low"], result.after["implicit_acc_high"]],
                       "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       "load_average_1min": os.getloadavg()[0]}
                rows.append(row)
                print(f"{size:>6} comparisons: labels {labels_s:6.2f} s, align {align_s:6.1f} s "
                      f"(implicit accuracy on {row['pairs_evaluated']} pairs), round {row['round_s']:6.1f} s, "
                      f"max RSS {row['max_rss_mb']:.0f} MB, load {row['load_average_1min']:.1f}", flush=True)
    growth = rows[-1]["round_s"] / rows[0]["round_s"]
    print()
    print("| stored comparisons | labels (s) | align + implicit acc. (s) | round (s) | vs first |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['comparisons']:,} | {r['labels_s']:.2f} | {r['align_s']:.1f} | {r['round_s']:.1f} | "
              f"{r['round_s'] / rows[0]['round_s']:.2f}x |")
    print(f"\ngrowth {args.sizes[0]} -> {args.sizes[-1]}: {growth:.2f}x (goal <= 1.5x)")
    res = {"task": TASK, "segment_length": length, "align": {"steps": base.steps, "batch_pairs": base.batch_pairs,
                                                             "eval_pairs": base.eval_pairs, "objective": base.objective,
                                                             "regularizer": base.regularizer},
           "threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
           "machine": platform.machine(), "rows": rows, "growth": growth}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
