"""Rollouts, evaluation and clips.

:func:`rollout` runs one episode of a policy from a reset seed and returns an
:class:`Episode` with raw arrays (and frames when asked). :func:`evaluate` runs many
episodes in parallel worker processes (each loads the checkpoint itself; MuJoCo
rendering and the simulator are per-process), returns raw returns and success flags,
and writes H.264 MP4 clips. The caller normalises (CORL convention).
:func:`rollout_clips` rolls many clips out in lock step; with ``record="states"`` it
keeps each frame's physics state instead of rendering it, and the frames are rendered
afterwards, in other processes (:mod:`fkpd.envs.render`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.stats import binomtest
from tqdm.auto import tqdm

from fkpd.envs import DEFAULT_RENDER_SIZE, get_task, make_env
from fkpd.envs.render import write_video  # noqa: F401  (re-exported: the clip encoder of every caller)


#: Reset seeds of evaluation episodes are ``EVAL_SEED_BASE + i``, disjoint from dataset
#: seeds (``seed * 1_000_003 + i``) and pair seeds (:func:`fkpd.prefs.pairs.pair_seed`).
EVAL_SEED_BASE = 10_000
#: Reset seeds of *validation* episodes (``VALIDATION_SEED_BASE + i``): held out from
#: the evaluation seeds (for up to 10 000 evaluation episodes), so that choosing a
#: version by them does not bias the evaluation that reports it.
VALIDATION_SEED_BASE = 20_000


def eval_noise_seed(policy_seed: int, reset_seed: int) -> int:
    """Seed of the sampling-noise generator of the evaluation episode ``reset_seed``."""
    return int(policy_seed) * 7919 + int(reset_seed)


class StepRecord:
    """What every record of consecutive steps (:class:`Episode`, :class:`fkpd.prefs.segments.Segment`)
    derives from its per-step ``actions`` (T, Da), ``rewards`` (T,) and ``success`` (T,)."""

    actions: np.ndarray
    rewards: np.ndarray
    success: np.ndarray

    @property
    def ret(self) -> float:
        """Ground-truth return: the sum of rewards over the steps."""
        return float(self.rewards.sum())

    @property
    def succeeded(self) -> bool:
        """Whether the task was solved at some step."""
        return bool(self.success.any())

    def __len__(self) -> int:
        return len(self.actions)


@dataclass
class Episode(StepRecord):
    """One rollout.

    Attributes:
        reset_seed: the seed passed to ``env.reset``.
        observations: (T, Do) observation before each action.
        actions: (T, Da) actions executed.
        rewards: (T,) rewards.
        success: (T,) per-step success flags; the episode succeeded if any is set.
        frames: (T+1, H, W, 3) uint8 when rendered (initial frame included), else None.
        states: (F, S) float64 physics states of the frames when recorded instead of
            rendered (``rollout_clips(..., record="states")``; render them with
            :func:`fkpd.envs.render.render_states`), else None.
    """

    reset_seed: int
    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    success: np.ndarray
    frames: np.ndarray | None = None
    states: np.ndarray | None = None


def rollout(env, act: Callable[[np.ndarray], np.ndarray], reset_seed: int, render: bool = False,
            reset: Callable[[], None] | None = None, max_steps: int | None = None) -> Episode:
    """Run one episode.

    Args:
        env: an environment from :func:`fkpd.envs.make_env`.
        act: ``obs (Do,) -> action (Da,)``, e.g. ``policy.select_action``.
        reset_seed: seed for ``env.reset`` (same seed, same initial state).
        render: keep rendered frames.
        reset: called before the episode (e.g. ``policy.reset``).
        max_steps: stop early after this many steps (default: the env's horizon).
    """
    if reset is not None:
        reset()
    obs, _ = env.reset(seed=int(reset_seed))
    frames = [env.render()] if render else None
    rows_o, rows_a, rows_r, rows_s = [], [], [], []
    done = False
    while not done:
        action = np.asarray(act(obs), np.float32)
        nxt, reward, terminated, truncated, info = env.step(action)
        rows_o.append(obs)
        rows_a.append(action)
        rows_r.append(reward)
        rows_s.append(info["success"])
        if render:
            frames.append(env.render())
        obs = nxt
        done = terminated or truncated or (max_steps is not None and len(rows_a) >= max_steps)
    return Episode(
        reset_seed=int(reset_seed),
        observations=np.asarray(rows_o, np.float32),
        actions=np.asarray(rows_a, np.float32),
        rewards=np.asarray(rows_r, np.float32),
        success=np.asarray(rows_s, bool),
        frames=np.asarray(frames, np.uint8) if render else None,
    )


@dataclass
class EvalResult:
    """Raw evaluation results; see :func:`evaluate`."""

    task_id: str
    reset_seeds: list[int]
    returns: list[float]
    successes: list[bool]
    lengths: list[int]
    videos: list[str] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.successes)) if self.successes else float("nan")

    @property
    def success_ci(self) -> tuple[float, float]:
        """95% Wilson score interval of the success rate (scipy ``binomtest``)."""
        n = len(self.successes)
        if n == 0:
            return (float("nan"), float("nan"))
        ci = binomtest(int(sum(self.successes)), n).proportion_ci(0.95, method="wilson")
        return (float(ci.low), float(ci.high))

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns)) if self.returns else float("nan")

    def summary(self) -> dict[str, object]:
        """Success rate with its CI, return statistics, clips; for ``d4rl/`` tasks also the
        D4RL normalised score (:meth:`fkpd.envs.TaskSpec.score_summary`, 0-100 scale)."""
        lo, hi = self.success_ci
        out = {
            "task_id": self.task_id,
            "episodes": len(self.successes),
            "success_rate": self.success_rate,
            "success_ci95": [lo, hi],
            "mean_return": self.mean_return,
            "std_return": float(np.std(self.returns)) if self.returns else float("nan"),
            "videos": list(self.videos),
        }
        out.update(get_task(self.task_id).score_summary(self.returns))
        return out

    def format(self) -> str:
        lo, hi = self.success_ci
        text = (f"{self.task_id}: success rate {self.success_rate:.1%} "
                f"(95% CI {lo:.1%}-{hi:.1%}, n={len(self.successes)}), "
                f"mean return {self.mean_return:.1f}")
        s = get_task(self.task_id).score_summary(self.returns)
        if s:
            text += f", D4RL normalised score {s['d4rl_normalized_score']:.1f} ({s['d4rl_dataset']})"
        return text


_WORKER: dict = {}


def _init_eval_worker(checkpoint: str, task_id: str, video_seeds: set, video_dir: str | None,
                      render_size: tuple[int, int], camera: str | None, max_steps: int | None,
                      device: str, policy_seed: int) -> None:
    """Load the policy and build the env once per worker process."""
    import torch

    from fkpd.policy import DiffusionPolicy

    torch.set_num_threads(1)
    _WORKER.clear()
    _WORKER.update(
        policy=DiffusionPolicy.load(checkpoint, task_id=task_id, device=device),
        env=make_env(task_id, max_episode_steps=max_steps, render_size=render_size, camera=camera),
        fps=get_task(task_id).fps, video_seeds=video_seeds, video_dir=video_dir, policy_seed=policy_seed,
    )


def _eval_episode(seed: int) -> dict:
    import torch

    w = _WORKER
    policy = w["policy"]
    gen = torch.Generator().manual_seed(eval_noise_seed(w["policy_seed"], seed))
    render = w["video_dir"] is not None and seed in w["video_seeds"]
    ep = rollout(w["env"], lambda o: policy.select_action(o, generator=gen), seed, render=render,
                 reset=policy.reset)
    video = None
    if render:
        video = str(write_video(ep.frames, Path(w["video_dir"]) / f"seed{seed:06d}.mp4", fps=w["fps"]))
    return {"seed": int(seed), "ret": ep.ret, "success": ep.succeeded, "len": len(ep), "video": video}


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def evaluate(checkpoint: Path | str, episodes: int = 50, task_id: str | None = None,
             seeds: Sequence[int] | None = None, video_dir: Path | str | None = None, n_videos: int = 4,
             workers: int | None = None, render_size: tuple[int, int] = DEFAULT_RENDER_SIZE,
             camera: str | None = None, max_steps: int | None = None, device: str = "cpu",
             policy_seed: int = 0, progress: bool = True) -> EvalResult:
    """Evaluate a checkpoint over ``episodes`` reset seeds in parallel processes.

    Args:
        checkpoint: policy checkpoint directory.
        episodes: number of episodes (reset seeds ``EVAL_SEED_BASE + i`` unless ``seeds`` given;
            disjoint from dataset seeds).
        task_id: defaults to the checkpoint's task.
        video_dir: when given, MP4 clips of the first ``n_videos`` episodes go here.
        workers: worker processes (default: CPU count, at most 8).
        max_steps: horizon (default: the task's).
        device: torch device for the workers (CPU by default: batch-1 sampling is
            latency bound and processes parallelise better than a shared GPU).
        policy_seed: seeds the sampling noise, so results are reproducible.

    Returns:
        :class:`EvalResult` with raw returns and success flags.

    Raises:
        CheckpointError: for a missing or corrupt checkpoint (checked before spawning).
    """
    from fkpd.policy import read_checkpoint_meta

    meta = read_checkpoint_meta(checkpoint)
    task_id = task_id or meta["task_id"]
    get_task(task_id)
    seeds = list(seeds) if seeds is not None else [EVAL_SEED_BASE + i for i in range(episodes)]
    video_seeds = set(seeds[:n_videos]) if video_dir is not None else set()
    workers = max(1, min(workers or default_workers(), len(seeds)))
    init_args = (str(checkpoint), task_id, video_seeds, None if video_dir is None else str(video_dir),
                 tuple(render_size), camera, max_steps, device, policy_seed)
    # Rendered episodes first, so they spread over the workers.
    order = sorted(seeds, key=lambda s: s not in video_seeds)
    results: list[dict] = []
    bar = tqdm(total=len(seeds), desc="evaluate", unit="ep", disable=not progress)
    if workers == 1:
        _init_eval_worker(*init_args)
        for seed in order:
            results.append(_eval_episode(seed))
            bar.update(1)
        _WORKER.clear()
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_eval_worker, initargs=init_args) as pool:
            for res in pool.imap_unordered(_eval_episode, order):
                results.append(res)
                bar.update(1)
    bar.close()
    results.sort(key=lambda r: seeds.index(r["seed"]))
    return EvalResult(
        task_id=task_id,
        reset_seeds=[r["seed"] for r in results],
        returns=[r["ret"] for r in results],
        successes=[r["success"] for r in results],
        lengths=[r["len"] for r in results],
        videos=[r["video"] for r in results if r["video"]],
    )


# -- lock-step rollouts ------------------------------------------------------------------
@dataclass
class ClipRequest:
    """One clip to roll out with :func:`rollout_clips`.

    Attributes:
        reset_seed: seed for ``env.reset`` (same seed, same initial state).
        noise_seed: seeds this clip's own sampling-noise generator, so a clip is
            reproducible whatever batch it runs in.
        max_steps: stop after this many steps (None: the env's horizon).
        render_from: render frames from this step on (None: no frames). Frame ``k`` of
            the result shows the state before action ``render_from + k`` (with
            ``record="states"``: state ``k`` is that state).
    """

    reset_seed: int
    noise_seed: int
    max_steps: int | None = None
    render_from: int | None = None


@torch.no_grad()
def _sample_chunks(policy, hist: np.ndarray, generators: list[torch.Generator]) -> np.ndarray:
    """Action chunks for raw histories ``(B, To, Do)`` -> ``(B, Ta, Da)``, one noise
    generator per row (``policy.predict_action_chunk`` with per-row initial noise)."""
    cfg = policy.cfg
    noise = torch.stack([torch.randn(cfg.horizon, cfg.action_dim, generator=g) for g in generators])
    return policy.predict_action_chunk(hist, initial_noise=noise)


def rollout_clips(policy, envs: Sequence, requests: Sequence[ClipRequest], progress=None,
                  record: str = "frames") -> list[Episode]:
    """Roll out one clip per request, ``len(envs)`` at a time in lock step.

    Equivalent to :func:`fkpd.policy.rollout.rollout` with ``policy.select_action`` per clip
    (observation history padded with the first observation, a chunk of Ta actions
    sampled every ``n_action_steps`` steps, receding horizon), but all clips of a batch
    replan in one batched DDIM call. Clip ``i`` draws its sampling noise from its own
    generator seeded with ``requests[i].noise_seed``.

    Args:
        policy: a :class:`fkpd.policy.DiffusionPolicy`.
        envs: environments from :func:`fkpd.envs.make_env`, all of the policy's task.
        requests: the clips to roll out.
        progress: optional callable ``(n_done)`` called after each batch.
        record: what a clip with ``render_from`` keeps of its steps from there on:
            ``"frames"`` renders them here (``env.render()``); ``"states"`` records each
            step's physics state instead (``env.physics_state()``, tens of numbers), so
            the rollout runs at the speed of the policy and the simulator and the frames
            are rendered elsewhere (:class:`fkpd.envs.render.ClipRenderer`), equal to
            those rendered here.

    Returns:
        One :class:`~fkpd.policy.rollout.Episode` per request, in order; ``frames`` (or
        ``states``) hold the steps from ``render_from`` on (or None).

    Raises:
        ValueError: ``record`` is neither ``"frames"`` nor ``"states"``.
    """
    if record not in ("frames", "states"):
        raise ValueError(f"record must be 'frames' or 'states', got {record!r}")
    keep = (lambda env: env.render()) if record == "frames" else (lambda env: env.physics_state())
    cfg = policy.cfg
    out: list[Episode] = []
    for b0 in range(0, len(requests), len(envs)):
        batch = list(requests[b0:b0 + len(envs)])
        n = len(batch)
        gens = [torch.Generator().manual_seed(int(r.noise_seed)) for r in batch]
        obs = [np.asarray(envs[i].reset(seed=int(r.reset_seed))[0], np.float32) for i, r in enumerate(batch)]
        hist = [deque([o] * cfg.n_obs_steps, maxlen=cfg.n_obs_steps) for o in obs]
        limits = [min(r.max_steps or envs[i].max_episode_steps, envs[i].max_episode_steps)
                  for i, r in enumerate(batch)]
        rows = [{"o": [], "a": [], "r": [], "s": [], "f": []} for _ in range(n)]
        active = [True] * n
        chunks = np.zeros((n, cfg.horizon, cfg.action_dim), np.float32)
        t = 0
        while any(active):
            idx = [i for i in range(n) if active[i]]
            for i in idx:
                if batch[i].render_from is not None and t >= batch[i].render_from:
                    rows[i]["f"].append(keep(envs[i]))
            if t % cfg.n_action_steps == 0:
                chunks[idx] = _sample_chunks(policy, np.stack([np.stack(hist[i]) for i in idx]),
                                             [gens[i] for i in idx])
            for i in idx:
                action = chunks[i, t % cfg.n_action_steps].copy()
                nxt, reward, terminated, truncated, info = envs[i].step(action)
                rows[i]["o"].append(obs[i])
                rows[i]["a"].append(action)
                rows[i]["r"].append(reward)
                rows[i]["s"].append(info["success"])
                obs[i] = np.asarray(nxt, np.float32)
                hist[i].append(obs[i])
                if terminated or truncated or len(rows[i]["a"]) >= limits[i]:
                    active[i] = False
                    if batch[i].render_from is not None and len(rows[i]["a"]) >= batch[i].render_from:
                        rows[i]["f"].append(keep(envs[i]))
            t += 1
        for i, r in enumerate(batch):
            kept = r.render_from is not None
            out.append(Episode(
                reset_seed=int(r.reset_seed),
                observations=np.asarray(rows[i]["o"], np.float32),
                actions=np.asarray(rows[i]["a"], np.float32),
                rewards=np.asarray(rows[i]["r"], np.float32),
                success=np.asarray(rows[i]["s"], bool),
                frames=np.asarray(rows[i]["f"], np.uint8) if kept and record == "frames" else None,
                states=np.asarray(rows[i]["f"], np.float64) if kept and record == "states" else None,
            ))
        if progress is not None:
            progress(len(out))
    return out


def evaluate_in_process(policy, envs: Sequence, episodes: int, seed: int = 0,
                        progress=None, seed_base: int = EVAL_SEED_BASE) -> tuple[EvalResult, list[Episode]]:
    """Evaluate ``policy`` on ``episodes`` full episodes in this process, in lock step.

    The same reset seeds (``seed_base + i``, by default ``EVAL_SEED_BASE + i``) and per-episode noise seeds as
    :func:`fkpd.policy.rollout.evaluate`, but rolled out with :func:`rollout_clips` (one
    batched DDIM call per replan, no worker processes to spawn), and the episodes are
    returned too, for metrics that need their arrays.

    Args:
        policy: a :class:`fkpd.policy.DiffusionPolicy`.
        envs: environments of the policy's task (their horizon is the episode length).
        episodes: number of episodes.
        seed: seeds the sampling noise.
        progress: optional callback ``(episodes done)``, as in :func:`rollout_clips`.
        seed_base: first reset seed (:data:`VALIDATION_SEED_BASE` for validation episodes).

    Returns:
        ``(EvalResult with raw returns and success flags, the episodes)``.
    """
    seeds = [int(seed_base) + i for i in range(episodes)]
    eps = rollout_clips(policy, envs, [ClipRequest(s, noise_seed=eval_noise_seed(seed, s)) for s in seeds],
                        progress=progress)
    res = EvalResult(task_id=policy.task_id, reset_seeds=seeds, returns=[e.ret for e in eps],
                     successes=[e.succeeded for e in eps], lengths=[len(e) for e in eps])
    return res, eps
