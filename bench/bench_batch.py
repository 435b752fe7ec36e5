"""One labelling batch at the app's defaults: when its first pair, and its last, are labelable.

Renders the batch of round 1 of a fresh project the way the bootstrap and every round do
(:func:`fkpd.studio.batches.render_batch` with :func:`fkpd.studio.batches.round_engine`
and the default :class:`fkpd.studio.params.BatchSettings`: 20 pairs of L = 64 steps at
224×224, 8 environments in lock step, one torch thread as the app's worker), from an
untrained policy of the default network size (what the clips show does not change
their cost: every clip is 64 steps), while a thread polls the store every 0.1 s for
open pairs of the round. Prints and writes to ``bench/results/bench_batch.json``: seconds
to the first pair, to every later one, and to the whole batch.

Only public functions that existed before progressive batches are called, so the same
script measures an older checkout too (``PYTHONPATH=/path/to/old/checkout``)::

    python bench/bench_batch.py                 # metaworld/door-open-v3
    python bench/bench_batch.py --task d4rl/maze2d-umaze
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="metaworld/door-open-v3")
    ap.add_argument("--json", default="bench/results/bench_batch.json")
    ap.add_argument("--label", default="", help="recorded in the JSON (e.g. before/after)")
    args = ap.parse_args()
    os.environ.setdefault("MUJOCO_GL", "egl")
    import numpy as np
    import torch
    from sqlalchemy import select

    import fkpd
    from fkpd.data import Normalizer
    from fkpd.envs import get_task
    from fkpd.policy import DiffusionPolicy, PolicyConfig
    from fkpd.store import Store
    from fkpd.store import models as m
    from fkpd.studio.batches import render_batch, round_engine
    from fkpd.studio.params import BatchSettings

    torch.set_num_threads(1)  # the app's workers run with FKPD_WORKER_THREADS=1
    spec = get_task(args.task)
    root = Path(tempfile.mkdtemp(prefix="bench_batch_"))
    load_before = os.getloadavg()
    try:
        store = Store(f"sqlite:///{root / 'fkpd.sqlite'}", root / "artifacts")
        project = store.create_project("bench", spec.task_id, "Pick one.", {"labels_per_pair": 1})
        torch.manual_seed(0)
        cfg = PolicyConfig(obs_dim=spec.obs_dim, action_dim=spec.action_dim)
        policy = DiffusionPolicy(cfg, Normalizer(-np.ones(spec.obs_dim), np.ones(spec.obs_dim)),
                                 Normalizer(-np.ones(spec.action_dim), np.ones(spec.action_dim)), task_id=spec.task_id)
        policy.save(store.resolve("ckpt"))
        version = store.add_policy_version(project.id, "ckpt/model.safetensors", round=0, metrics={})
        settings = BatchSettings()
        engine = round_engine(store, project, settings, version)
        seen: dict[int, float] = {}
        stop = threading.Event()

        def poll(t0: float) -> None:
            while not stop.is_set():
                with store.session() as s:
                    ids = s.scalars(select(m.Pair.id).where(m.Pair.project_id == project.id, m.Pair.round == 1)).all()
                now = time.monotonic() - t0
                for pid in ids:
                    seen.setdefault(pid, now)
                stop.wait(0.1)

        print(f"rendering a batch of {settings.pairs_per_batch} pairs of {settings.length(spec.task_id)} steps at "
              f"{settings.render_size} ({spec.task_id}, fkpd from {Path(fkpd.__file__).parent}) ...", flush=True)
        t0 = time.monotonic()
        poller = threading.Thread(target=poll, args=(t0,))
        poller.start()
        try:
            ids = render_batch(engine, version, 1)
        finally:
            total = time.monotonic() - t0
            stop.set()
            poller.join()
        times = sorted(seen.values())
        out = {"benchmark": "bench_batch", "label": args.label, "task": spec.task_id, "pairs": len(ids),
               "first_pair_s": round(times[0], 2) if times else None,
               "pair_s": [round(t, 2) for t in times], "batch_s": round(total, 2),
               "settings": {"pairs_per_batch": settings.pairs_per_batch, "length": settings.length(spec.task_id),
                            "render_size": list(settings.render_size), "n_envs": settings.n_envs},
               "fkpd": str(Path(fkpd.__file__).parent), "load_avg_before": load_before,
               "load_avg_after": os.getloadavg(),
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "platform": platform.platform()}}
        store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"first pair labelable after {out['first_pair_s']} s; whole batch ({out['pairs']} pairs) after "
          f"{out['batch_s']} s (load average {load_before[0]:.1f} -> {out['load_avg_after'][0]:.1f})")
    dest = Path(args.json)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    print(f"results: {dest}")


if __name__ == "__main__":
    main()
