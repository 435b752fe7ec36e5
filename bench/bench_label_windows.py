"""Do the return teacher's labels track success? Per segment window, on BC's own rollouts.

The alignment benchmark (``bench_alignment.py``) labels pairs of current-policy clips
cut at the same steps (DESIGN.md §3; default: the first 64 of 200 steps). A label can
only teach success if, on pairs where one clip's episode succeeds and the other's does
not, it tends to prefer the successful one. This script measures that on the BC policy
of the benchmark (the same data and BC, rebuilt from the seeds like ``bench_alignment``
does, or reused from its ``--out``), for several windows of the same rollouts:

* ``P(decided)``: share of pairs the teacher does not call equal;
* ``P(one succeeds)``: share of pairs where exactly one clip's *whole episode* succeeds
  (at any step of the 200);
* ``agreement``: among those, the share whose label (on the window only) prefers the
  clip whose episode succeeded, with a 95 % Wilson interval; 50 % means the labels say
  nothing about success.
* ``success in window``: share of clips with a success flag inside the window.

Every pair is two rollouts of BC from one reset seed with different sampling noise
(:class:`fkpd.prefs.pairs.RolloutPairSource`, reset seeds of round 1 of the run's seed,
the same as round 1 of the benchmark's runs), rolled out for the whole horizon once
and cut at every window. Prints one table per task and writes
``bench/results/bench_label_windows.json``::

    python bench/bench_label_windows.py --tasks metaworld/door-open-v3 metaworld/sweep-into-v3 \\
        --seeds 0 --pairs 200 --out runs/bench_alignment_r4
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_alignment import _prepare_bc  # noqa: E402  (same data and BC as the benchmark)

from fkpd.envs import get_task, make_env  # noqa: E402
from fkpd.policy import DiffusionPolicy  # noqa: E402
from fkpd.prefs.pairs import RolloutPairSource, close_envs  # noqa: E402
from fkpd.prefs.segments import Segment  # noqa: E402
from fkpd.prefs.teachers import make_teacher  # noqa: E402
from fkpd.train.bc import BCConfig  # noqa: E402

#: (name, first step, length); None as first step: a random start per pair in [0, T − L]
WINDOWS = [("0-63 (default)", 0, 64), ("random 64", None, 64), ("0-99", 0, 100), ("100-199", 100, 100),
           ("whole 0-199", 0, 200)]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n ((nan, nan) for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def cut(seg: Segment, start: int, length: int) -> Segment:
    sl = slice(start, start + length)
    return Segment(seg.observations[sl], seg.actions[sl], seg.rewards[sl], seg.success[sl],
                   reset_seed=seg.reset_seed, start=start, task_id=seg.task_id)


def measure(pairs, teacher, rng: np.random.Generator, horizon: int) -> dict:
    rows = {}
    for name, start, length in WINDOWS:
        decided = one = agree = in_win = 0
        for a, b in pairs:
            s = int(rng.integers(0, horizon - length + 1)) if start is None else start
            wa, wb = cut(a, s, length), cut(b, s, length)
            lab = teacher.label(wa, wb)
            decided += lab in ("left", "right")
            in_win += int(wa.success.any()) + int(wb.success.any())
            sa, sb = bool(a.success.any()), bool(b.success.any())
            if sa != sb:
                one += 1
                agree += (lab == "left") == sa and lab in ("left", "right")
        lo, hi = wilson(agree, one)
        rows[name] = {"start": start, "length": length, "decided": decided / len(pairs), "one_succeeds": one,
                      "p_one_succeeds": one / len(pairs), "agreement": agree / one if one else math.nan,
                      "agreement_ci95": [lo, hi], "success_in_window": in_win / (2 * len(pairs))}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["metaworld/door-open-v3", "metaworld/button-press-v3",
                                                   "metaworld/plate-slide-v3", "metaworld/sweep-into-v3"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--pairs", type=int, default=200, help="pairs of BC rollouts per task and seed")
    ap.add_argument("--teacher", default="return")
    ap.add_argument("--out", default="runs/bench_alignment", help="the alignment benchmark's --out (data and BC)")
    ap.add_argument("--bc-steps", type=int, default=BCConfig.steps)
    ap.add_argument("--bc-episodes", type=int, default=100)
    ap.add_argument("--max-episode-steps", type=int, default=0)
    ap.add_argument("--n-envs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default="bench/results/bench_label_windows.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"args": vars(args), "machine": platform.processor() or platform.machine(), "runs": {}}
    for task in args.tasks:
        spec = get_task(task)
        horizon = args.max_episode_steps or spec.max_episode_steps
        for seed in args.seeds:
            bc = None
            while bc is None:  # another process may be building it
                bc = _prepare_bc(args, task, seed)
                if bc is None:
                    time.sleep(10)
            policy = DiffusionPolicy.load(bc, task_id=task)
            envs = [make_env(task, max_episode_steps=horizon) for _ in range(args.n_envs)]
            t0 = time.time()
            try:
                pairs = RolloutPairSource(envs, args.pairs, horizon, seed=seed, start=0, task_id=task).make_pairs(
                    policy, 1)
            finally:
                close_envs(envs)
            teacher = make_teacher(args.teacher, seed=seed)
            rows = measure(pairs, teacher, np.random.default_rng(seed), horizon)
            succ = np.mean([s.success.any() for p in pairs for s in p])
            results["runs"][f"{task}/seed{seed}"] = {"bc_success": float(succ), "windows": rows,
                                                     "rollout_s": time.time() - t0}
            print(f"\n{task} seed {seed}: BC success {succ:.0%} over {2 * len(pairs)} rollouts "
                  f"({time.time() - t0:.0f} s)")
            print("| window | P(decided) | P(one succeeds) | agreement with success [95% CI] | success in window |")
            print("|---|---|---|---|---|")
            for name, r in rows.items():
                lo, hi = r["agreement_ci95"]
                print(f"| {name} | {r['decided']:.0%} | {r['p_one_succeeds']:.0%} ({r['one_succeeds']}) | "
                      f"{r['agreement']:.0%} [{lo:.0%}, {hi:.0%}] | {r['success_in_window']:.0%} |", flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
