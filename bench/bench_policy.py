"""Policy and rendering speed: the figures issue #2 asks for.

Prints and writes ``bench/results/bench_policy.json`` (or ``--json``):

* BC training steps/s at the default batch (default ``PolicyConfig`` and ``BCConfig``),
  on random normalised data of the default task's shapes;
* action-chunk sampling latency (DDIM, default inference steps) at batch 1 and 32,
  median and p95 over repeats, with 1 torch thread (as evaluation workers run) and
  with torch's default thread count;
* the sampling overhead (issue #15, point 5): at batch 1, the chunk's median over the
  median of ten forward passes of a plain MLP of the same widths (``nn.Sequential``
  of ``Linear`` layers To·Do+Ta·Da -> H -> r·H -> H ... -> Ta·Da with Mish between
  them, n_blocks inner pairs, under ``torch.inference_mode``), both timed in the same
  loop, alternating, so load on the machine hits both alike. The ratio (``ratio`` in
  the JSON, printed) is what is left around the network's own compute: 1.0 would be
  no overhead at all; the goal is <= 1.5. Both are also timed in CPU time of the
  calling thread (``cpu_ratio``), which waiting for a core on a loaded machine does
  not inflate;
* rendering ms per frame (default size and camera, shadows off as by default, and on);
* the parallel rendering speed-up: the same frames rendered by 1 process vs N.

    python bench/bench_policy.py [--device auto] [--skip-train] [--skip-render] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from fkpd.data import Normalizer
from fkpd.envs import DEFAULT_TASK, get_task, make_env
from fkpd.policy import DiffusionPolicy, PolicyConfig, pick_device
from fkpd.train.bc import BCConfig


def _policy(device: torch.device) -> DiffusionPolicy:
    spec = get_task(DEFAULT_TASK)
    cfg = PolicyConfig(obs_dim=spec.obs_dim, action_dim=spec.action_dim)
    return DiffusionPolicy(cfg, Normalizer(-np.ones(cfg.obs_dim), np.ones(cfg.obs_dim)),
                           Normalizer(-np.ones(cfg.action_dim), np.ones(cfg.action_dim)), DEFAULT_TASK).to(device)


def bench_training(device: torch.device, steps: int) -> dict:
    from diffusers.training_utils import EMAModel

    p = _policy(device).train()
    bc = BCConfig()
    opt = torch.optim.AdamW(p.net.parameters(), lr=bc.lr, weight_decay=bc.weight_decay)
    ema = EMAModel(p.net.parameters(), decay=bc.ema_decay, use_ema_warmup=True, power=bc.ema_power, foreach=True)
    obs = torch.rand(4096, p.cfg.n_obs_steps, p.cfg.obs_dim, device=device) * 2 - 1
    act = torch.rand(4096, p.cfg.horizon, p.cfg.action_dim, device=device) * 2 - 1

    def step():
        idx = torch.randint(0, 4096, (bc.batch_size,), device=device)
        loss = p.compute_loss(obs[idx], act[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(p.net.parameters(), bc.grad_clip)
        opt.step()
        ema.step(p.net.parameters())

    for _ in range(10):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"batch_size": bc.batch_size, "steps": steps, "steps_per_s": steps / dt,
            "params": sum(x.numel() for x in p.parameters())}


def plain_mlp(cfg: PolicyConfig, device: torch.device) -> torch.nn.Sequential:
    """The yardstick of the sampling overhead: a plain MLP of the noise network's widths,
    (To·Do + Ta·Da) -> H, then ``n_blocks`` times H -> r·H -> H, then -> Ta·Da, Mish
    between layers; input (B, To·Do + Ta·Da) -> (B, Ta·Da)."""
    h, r = cfg.hidden_dim, cfg.mlp_ratio
    widths = [cfg.n_obs_steps * cfg.obs_dim + cfg.horizon * cfg.action_dim, h]
    for _ in range(cfg.n_blocks):
        widths += [r * h, h]
    widths.append(cfg.horizon * cfg.action_dim)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(torch.nn.Mish())
        layers.append(torch.nn.Linear(a, b))
    return torch.nn.Sequential(*layers).to(device).eval()


def bench_sampling(device: torch.device, batch: int, repeats: int) -> dict:
    """Chunk latency at ``batch`` and, timed alternately in the same loop, ten forward
    passes of :func:`plain_mlp` at the same batch (milliseconds)."""
    p = _policy(device).eval()
    hist = np.random.default_rng(0).uniform(-1, 1, (batch, p.cfg.n_obs_steps, p.cfg.obs_dim)).astype(np.float32)
    mlp = plain_mlp(p.cfg, device)
    x = torch.rand(batch, mlp[0].in_features, device=device)
    steps = p.cfg.num_inference_steps

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def mlp_passes():
        with torch.inference_mode():
            for _ in range(steps):
                mlp(x)

    for _ in range(10):
        p.predict_action_chunk(hist)
        mlp_passes()
    times, mlp_times, cpu, mlp_cpu = [], [], [], []
    for _ in range(repeats):
        sync()
        c0, t0 = time.thread_time(), time.perf_counter()
        p.predict_action_chunk(hist)
        sync()
        c1, t1 = time.thread_time(), time.perf_counter()
        mlp_passes()
        sync()
        c2, t2 = time.thread_time(), time.perf_counter()
        times.append((t1 - t0) * 1000)
        mlp_times.append((t2 - t1) * 1000)
        cpu.append((c1 - c0) * 1000)
        mlp_cpu.append((c2 - c1) * 1000)
    med, mlp_med = float(np.median(times)), float(np.median(mlp_times))
    return {"batch": batch, "ddim_steps": steps, "median_ms": med,
            "p95_ms": float(np.percentile(times, 95)), "mean_ms": float(np.mean(times)), "repeats": repeats,
            "plain_mlp_x_steps_median_ms": mlp_med, "ratio": med / mlp_med,
            # CPU time of the calling thread: what the work itself costs when other
            # processes share the cores (wall-clock medians then include waiting).
            "cpu_median_ms": float(np.median(cpu)), "plain_mlp_x_steps_cpu_median_ms": float(np.median(mlp_cpu)),
            "cpu_ratio": float(np.median(cpu) / np.median(mlp_cpu))}

def _render_frames(args: tuple) -> float:
    n, shadows, seed = args
    env = make_env(DEFAULT_TASK, shadows=shadows)
    env.reset(seed=seed)
    env.render()  # context creation is not a per-frame cost
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(n):
        env.step(rng.uniform(-1, 1, 4))
        env.render()
    return (time.perf_counter() - t0) * 1000 / n


def bench_render(frames: int, workers: int) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        ms_fast = pool.map(_render_frames, [(frames, False, 0)])[0]
        ms_shadow = pool.map(_render_frames, [(max(frames // 2, 10), True, 0)])[0]
    total = frames * workers
    t0 = time.perf_counter()
    with ctx.Pool(1) as pool:
        pool.map(_render_frames, [(total, False, 0)])
    serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ctx.Pool(workers) as pool:
        pool.map(_render_frames, [(frames, False, i) for i in range(workers)])
    parallel = time.perf_counter() - t0
    h, w = 224, 224
    return {"size": [h, w], "ms_per_frame": ms_fast, "ms_per_frame_with_shadows": ms_shadow,
            "parallel_workers": workers, "frames": total, "serial_s": serial, "parallel_s": parallel,
            "parallel_speedup": serial / parallel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--skip-render", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--json", default="bench/results/bench_policy.json")
    args = ap.parse_args()
    device = pick_device(args.device)
    res: dict = {"device": str(device), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                 "machine": platform.machine(), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    if not args.skip_train:
        res["training"] = bench_training(device, args.train_steps)
        print(f"BC training: {res['training']['steps_per_s']:.1f} steps/s at batch {res['training']['batch_size']} "
              f"on {device}")
    default_threads = torch.get_num_threads()
    res["sampling"] = {}
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        for b in (1, 32):
            r = bench_sampling(device, b, args.repeats)
            res["sampling"][f"batch{b}_threads{threads}"] = r
            print(f"sample chunk: batch {b:>2}, {threads} thread(s): median {r['median_ms']:.2f} ms, "
                  f"p95 {r['p95_ms']:.2f} ms ({r['ddim_steps']} DDIM steps); {r['ddim_steps']} plain-MLP passes "
                  f"{r['plain_mlp_x_steps_median_ms']:.2f} ms, ratio {r['ratio']:.2f}")
    torch.set_num_threads(default_threads)
    head = res["sampling"]["batch1_threads1"]
    res["ratio"] = head["ratio"]
    res["cpu_ratio"] = head["cpu_ratio"]
    res["load_average_1min"] = os.getloadavg()[0]
    print(f"sampling overhead (batch 1, 1 thread): chunk {head['median_ms']:.2f} ms / "
          f"{head['ddim_steps']} plain-MLP passes {head['plain_mlp_x_steps_median_ms']:.2f} ms = "
          f"ratio {head['ratio']:.2f} (goal <= 1.5); in CPU time {head['cpu_median_ms']:.2f} / "
          f"{head['plain_mlp_x_steps_cpu_median_ms']:.2f} ms = {head['cpu_ratio']:.2f}")
    if res["load_average_1min"] > (os.cpu_count() or 1):
        print(f"note: load average {res['load_average_1min']:.1f} on {os.cpu_count()} cores; wall-clock "
              "figures include waiting for a core, the CPU-time ratio does not")
    if not args.skip_render:
        res["render"] = bench_render(args.frames, args.workers)
        r = res["render"]
        print(f"render: {r['ms_per_frame']:.1f} ms/frame at 224x224 (with shadows {r['ms_per_frame_with_shadows']:.1f}); "
              f"{r['parallel_workers']} processes: {r['parallel_speedup']:.2f}x speed-up")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
