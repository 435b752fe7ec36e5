"""The headless alignment loop with a scripted teacher (DESIGN.md §1, steps 1-4).

1. Offline data (:func:`fkpd.data.generate_dataset`, or ``--dataset``) and behaviour
   cloning (:func:`fkpd.train.bc.train_bc`, or ``--bc-checkpoint``): π_ref = π_0.
2. For each round r = 1..K: roll out ``pairs_per_round`` pairs of clips with π_{r−1}
   from fresh reset seeds (:func:`fkpd.prefs.segments.collect_pairs`), let the teacher label
   them, align on *all* labels so far starting from π_{r−1} against π_ref
   (:func:`fkpd.train.align.align`), and evaluate π_r.

Per round it logs the success rate (95% Wilson CI), mean return, the teacher's intent
score on evaluation episodes, the implicit accuracy of π_{r−1} on the new labels
(before training on them; 0.5 by construction in round 1, where π_0 = π_ref) and of π_r
on all labels, and an out-of-distribution diagnostic (:class:`ActionOOD`). Output::

    OUT/data.hdf5, OUT/bc/                   (unless reused)
    OUT/round<r>/segments/*.npz, prefs.json  (the round's pairs and labels)
    OUT/round<r>/align/checkpoint/           (π_r)
    OUT/prefs.json                           (all labels so far; usable with `fkpd align`)
    OUT/loop.json, OUT/loop.png              (metrics per round, and their plot)

Reset seeds: evaluation uses ``10_000 + i`` (as :func:`fkpd.policy.rollout.evaluate`), pairs
``1_000_000_000 + 10_000_000·seed + 100_000·r + i``, both disjoint from dataset seeds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy.spatial import cKDTree
from tqdm.auto import tqdm

from fkpd.train.align import AlignConfig, PairWindows, align, evaluate_pairs, pairs_from_labels
from fkpd.config import save_json, to_json_dict
from fkpd.envs.d4rl import own_dataset
from fkpd.data import OfflineDataset, generate_dataset, load_dataset, names_a_dataset
from fkpd.envs import DEFAULT_TASK, get_task, make_env
from fkpd.errors import CheckpointError, ConfigError
from fkpd.io import atomic_path
from fkpd.policy import DiffusionPolicy, PolicyConfig, read_checkpoint_meta
from fkpd.policy.rollout import Episode
from fkpd.policy.rollout import evaluate_in_process
from fkpd.prefs.segments import Segment, collect_pairs, cut_segment, save_preferences
from fkpd.prefs.teachers import ScriptedTeacher, make_teacher, outcome_to_p_left



def pair_seed(seed: int, round_: int, i: int) -> int:
    """Reset seed of pair ``i`` of round ``round_`` (disjoint from data and eval seeds)."""
    return 1_000_000_000 + 10_000_000 * int(seed) + 100_000 * int(round_) + int(i)


@dataclass
class LoopConfig:
    """A headless loop. Every field is also a ``fkpd loop`` flag; alignment settings
    (``--regularizer``, ``--beta``, ``--lam``, ``--steps``, ...) come from
    :class:`fkpd.train.align.AlignConfig`."""

    task: str = field(default=DEFAULT_TASK, metadata={"help": "task id"})
    teacher: str = field(default="return", metadata={"help": "scripted teacher (see fkpd.prefs.teachers.TEACHERS)"})
    rounds: int = field(default=2, metadata={"help": "K, alignment rounds"})
    pairs_per_round: int = field(default=200, metadata={"help": "M, pairs rolled out and labelled per round"})
    segment_length: int = field(default=0, metadata={"help": "L, steps per segment (0: the task's, 64; whole "
                                                                 "episodes on maze2d)"})
    segment_start: int = field(default=0, metadata={"help": "first step of every segment (-1: random per pair)"})
    out_dir: str = field(default="", metadata={"help": "output directory (default runs/loop/<task>_<teacher>_<reg>)"})
    dataset: str = field(default="", metadata={"help": "reuse this offline dataset: a file, a D4RL dataset name or "
                                                       "minari:DATASET_ID (default: generate OUT/data.hdf5; D4RL "
                                                       "locomotion tasks use their own D4RL dataset)"})
    bc_checkpoint: str = field(default="", metadata={"help": "reuse this BC checkpoint (default: train OUT/bc)"})
    bc_episodes: int = field(default=100, metadata={"help": "episodes of generated data"})
    bc_steps: int = field(default=4000, metadata={"help": "BC gradient steps"})
    eval_episodes: int = field(default=20, metadata={"help": "evaluation episodes per round"})
    max_episode_steps: int = field(default=0, metadata={"help": "horizon in steps (0: the task's)"})
    n_envs: int = field(default=16, metadata={"help": "environments rolled out in lock step"})
    ood_k: int = field(default=10, metadata={"help": "k nearest dataset states for the OOD diagnostic"})
    render: bool = field(default=False, metadata={"help": "write an MP4 clip per segment (slow on CPU)"})
    seed: int = field(default=0, metadata={"help": "seeds data, BC, pairs, teacher and alignment"})

    def __post_init__(self) -> None:
        for name in ("rounds", "pairs_per_round", "bc_episodes", "bc_steps", "eval_episodes", "n_envs", "ood_k"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.segment_length < 0:
            raise ConfigError(f"--segment-length must be >= 0 (0: the task's), got {self.segment_length!r}")
        if self.max_episode_steps < 0:
            raise ConfigError(f"--max-episode-steps must be >= 0, got {self.max_episode_steps!r}")


class ActionOOD:
    """Out-of-distribution diagnostic: how far policy actions are from the data's.

    For each visited state s with action a, take the k dataset states nearest to s
    (Euclidean, on observations normalised to [-1, 1] with the reference's normaliser,
    ``scipy.spatial.cKDTree``) and the distance from a to the nearest of their k
    actions (normalised action units: each action dimension spans 2). The diagnostic is
    the mean over visited states; 0 means every action was seen in a similar state.

    Args:
        ds: the offline dataset π_ref was cloned from.
        policy: supplies the normalisers.
        k: neighbours per query.
    """

    def __init__(self, ds: OfflineDataset, policy: DiffusionPolicy, k: int = 10) -> None:
        self.obs_norm, self.act_norm = policy.obs_normalizer, policy.action_normalizer
        self.tree = cKDTree(self.obs_norm.normalize(ds.observations).astype(np.float64))
        self.actions = self.act_norm.normalize(ds.actions).astype(np.float64)
        self.k = int(min(k, len(ds.observations)))

    def distances(self, observations: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """(N, Do) raw states and (N, Da) raw actions -> (N,) distances."""
        _, idx = self.tree.query(self.obs_norm.normalize(np.asarray(observations, np.float64)), k=self.k)
        idx = np.asarray(idx).reshape(len(observations), -1)
        a = self.act_norm.normalize(np.asarray(actions, np.float64))
        return np.linalg.norm(self.actions[idx] - a[:, None], axis=-1).min(axis=1)

    def __call__(self, episodes: Sequence[Episode], stride: int = 2) -> float:
        """Mean distance over every ``stride``-th step of the episodes."""
        obs = np.concatenate([e.observations[::stride] for e in episodes])
        act = np.concatenate([e.actions[::stride] for e in episodes])
        return float(self.distances(obs, act).mean())


def evaluate_policy(policy: DiffusionPolicy, envs: Sequence, episodes: int, teacher: ScriptedTeacher,
                    ood: ActionOOD, seed: int = 0) -> dict[str, Any]:
    """Roll out ``episodes`` full episodes (:func:`fkpd.policy.rollout.evaluate_in_process`) and measure them.

    Returns:
        ``success_rate``, ``success_ci95``, ``mean_return``, ``intent_score`` (the
        teacher's :meth:`~fkpd.prefs.teachers.ScriptedTeacher.intent_score` averaged over
        whole episodes), ``smoothness`` (mean squared action change), ``ood_action_dist``
        (:class:`ActionOOD`) and ``eval_s``; on ``d4rl/`` tasks also
        ``d4rl_normalized_score`` (and its ``_std``, 0-100 scale) and ``d4rl_dataset``.
    """
    from fkpd.envs.d4rl import score_summary

    t0 = time.time()
    res, eps = evaluate_in_process(policy, envs, episodes, seed=seed)
    segs = [cut_segment(e, 0, len(e)) for e in eps]
    smooth = [float(np.square(np.diff(e.actions, axis=0)).sum(1).mean()) for e in eps]
    return {"success_rate": res.success_rate, "success_ci95": list(res.success_ci), "mean_return": res.mean_return,
            **score_summary(res.task_id, res.returns),
            "intent_score": float(np.mean([teacher.intent_score(s) for s in segs])),
            "smoothness": float(np.mean(smooth)), "ood_action_dist": ood(eps), "eval_s": time.time() - t0}


def _teacher_scale(teacher: ScriptedTeacher, ds: OfflineDataset, length: int, seed: int) -> float:
    """Mean |score| of dataset segments of ``length`` steps (scales B-Pref thresholds)."""
    rng = np.random.default_rng(seed)
    scores = []
    for sl in list(ds.episodes())[:50]:
        n = sl.stop - sl.start
        s0 = sl.start + int(rng.integers(0, max(n - length, 0) + 1))
        e = min(s0 + length, sl.stop)
        seg = Segment(ds.observations[s0:e], ds.actions[s0:e], ds.rewards[s0:e], np.zeros(e - s0, bool))
        scores.append(abs(teacher.score(seg)))
    return float(np.mean(scores)) if scores else 1.0


def plot_rounds(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """A PNG of the per-round metrics (success, return, intent, implicit accuracy, OOD)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [row["round"] for row in rows]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    sr = np.array([row["success_rate"] for row in rows])
    ci = np.array([row["success_ci95"] for row in rows], dtype=float)
    axes[0].errorbar(r, sr, yerr=[sr - ci[:, 0], ci[:, 1] - sr], marker="o", capsize=3)
    axes[0].set(title="success rate (95% CI)", ylim=(-0.05, 1.05))
    axes[1].plot(r, [row["mean_return"] for row in rows], marker="o")
    axes[1].set(title="mean return")
    axes[2].plot(r, [row["intent_score"] for row in rows], marker="o")
    axes[2].set(title="intent score (teacher)")
    nan = float("nan")
    axes[3].plot(r, [row.get("implicit_acc_new", nan) for row in rows], marker="o", label="new labels, before")
    axes[3].plot(r, [row.get("implicit_acc", nan) for row in rows], marker="s", label="all labels, after")
    axes[3].set(title="implicit accuracy", ylim=(-0.05, 1.05))
    axes[3].legend(fontsize=7)
    axes[4].plot(r, [row["ood_action_dist"] for row in rows], marker="o")
    axes[4].set(title="OOD action distance")
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(r)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path


def run_loop(cfg: LoopConfig, align_cfg: AlignConfig | None = None, policy_cfg: PolicyConfig | None = None,
             progress: bool = True, log=print) -> dict[str, Any]:
    """Run the headless loop; see the module docstring.

    Args:
        cfg: loop settings.
        align_cfg: alignment settings for every round (its checkpoint, init, prefs,
            out_dir, dataset, round and seed are filled in per round).
        policy_cfg: architecture for BC (when BC is trained here).
        progress: tqdm bars.
        log: called with one line of text per stage.

    Returns:
        The summary written to ``OUT/loop.json``: config, paths, ``rounds`` (one dict of
        metrics per round, round 0 = BC) and ``wall_s``.

    Raises:
        FKPDError subclasses from data generation, BC, alignment and evaluation;
        CheckpointError when ``--bc-checkpoint`` is for another task.
    """
    align_cfg = align_cfg or AlignConfig()
    if align_cfg.threads > 0:
        # Also for the rollouts: batched sampling is small, and on a busy CPU torch's
        # default thread pool makes it ~10x slower (measured: 113 s vs 12 s for 48 pairs).
        torch.set_num_threads(align_cfg.threads)
    spec = get_task(cfg.task)
    horizon = cfg.max_episode_steps or spec.max_episode_steps
    # L as used (the task's when 0, capped at the horizon), so loop.json records it
    cfg = dataclasses.replace(cfg, segment_length=min(cfg.segment_length or spec.segment_length, horizon))
    teacher0 = make_teacher(cfg.teacher, seed=cfg.seed)
    out = Path(cfg.out_dir or Path("runs") / "loop" /
               f"{cfg.task.replace('/', '_')}_{cfg.teacher}_{align_cfg.regularizer}")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    if cfg.dataset:
        # A file, a D4RL dataset name (D4RL's cache directory) or minari:DATASET_ID.
        dataset: Path | str = cfg.dataset
        if not names_a_dataset(cfg.dataset):
            raise ConfigError(f"--dataset {cfg.dataset!r} does not exist; drop the flag to generate one")
    elif own := own_dataset(cfg.task):
        dataset = own  # no generator: the task's own D4RL dataset, from D4RL's cache directory
    else:
        dataset = out / "data.hdf5"
        if not dataset.exists():
            log(f"[data] generating {cfg.bc_episodes} episodes -> {dataset}")
            generate_dataset(cfg.task, cfg.bc_episodes, dataset, seed=cfg.seed, max_episode_steps=horizon,
                             progress=progress)
    ds = load_dataset(dataset, task_id=cfg.task)
    if cfg.bc_checkpoint:
        bc = Path(cfg.bc_checkpoint)
        meta = read_checkpoint_meta(bc)
        if meta.get("task_id") != cfg.task:
            raise CheckpointError(f"--bc-checkpoint {str(bc)!r} is for task {meta.get('task_id')!r}, not "
                                  f"{cfg.task!r}; pass a BC checkpoint of {cfg.task}")
    else:
        from fkpd.train.bc import BCConfig, train_bc

        log(f"[bc] training {cfg.bc_steps} steps -> {out / 'bc'}")
        bc = train_bc(BCConfig(task=cfg.task, dataset=str(dataset), out_dir=str(out / "bc"), steps=cfg.bc_steps,
                               eval_every=0, seed=cfg.seed, device=align_cfg.device, threads=align_cfg.threads),
                      policy_cfg, progress=progress)
    ref = DiffusionPolicy.load(bc, task_id=cfg.task)
    ood = ActionOOD(ds, ref, k=cfg.ood_k)
    teacher = make_teacher(cfg.teacher, seed=cfg.seed,
                           score_scale=_teacher_scale(teacher0, ds, cfg.segment_length, cfg.seed))
    envs = [make_env(cfg.task, max_episode_steps=horizon) for _ in range(min(cfg.n_envs, max(
        cfg.eval_episodes, 2 * cfg.pairs_per_round)))]
    summary: dict[str, Any] = {
        "loop": to_json_dict(cfg), "align": to_json_dict(align_cfg), "out_dir": str(out), "dataset": str(dataset),
        "bc_checkpoint": str(bc),
        "teacher": {"name": cfg.teacher, "class": type(teacher).__name__, "beta": teacher.beta, "eps": teacher.eps,
                    "gamma": teacher.gamma, "equal_threshold": teacher.equal_threshold,
                    "skip_threshold": teacher.skip_threshold},
        "rounds": []}

    def write() -> None:
        summary["wall_s"] = time.time() - t_start
        save_json(out / "loop.json", json_safe(summary))
        plot_rounds(summary["rounds"], out / "loop.png",
                    f"{cfg.task} | teacher {cfg.teacher} | {align_cfg.regularizer} (β={align_cfg.beta:g}, "
                    f"λ={align_cfg.lam:g})")

    ev = evaluate_policy(ref, envs, cfg.eval_episodes, teacher, ood, seed=cfg.seed)
    summary["rounds"].append({"round": 0, "checkpoint": str(bc), "labels": 0, **ev})
    log(_format_row(summary["rounds"][-1]))
    write()
    labels: list[tuple[Segment, Segment, float | None]] = []
    current = Path(bc)
    for r in range(1, cfg.rounds + 1):
        t_round = time.time()
        policy = DiffusionPolicy.load(current, task_id=cfg.task)
        seeds = [pair_seed(cfg.seed, r, i) for i in range(cfg.pairs_per_round)]
        bar = tqdm(total=len(seeds) * 2, desc=f"round {r} rollouts", unit="clip", disable=not progress)
        pairs = collect_pairs(policy, envs, seeds, cfg.segment_length, seed=pair_seed(cfg.seed, r, 0),
                              out_dir=out / f"round{r}" / "segments", render=cfg.render, fps=spec.fps,
                              task_id=cfg.task, start=None if cfg.segment_start < 0 else cfg.segment_start,
                              progress=lambda n: bar.update(n - bar.n))
        bar.close()
        t_roll = time.time() - t_round
        outcomes = [teacher.label(a, b) for a, b in pairs]
        new = [(a, b, outcome_to_p_left(o)) for (a, b), o in zip(pairs, outcomes)]
        save_preferences(out / f"round{r}" / "prefs.json", cfg.task, new)
        labels += new
        save_preferences(out / "prefs.json", cfg.task, labels)
        new_pairs = pairs_from_labels(new)
        acc_new = float("nan")
        if new_pairs:
            acc_new = evaluate_pairs(policy, ref, PairWindows(new_pairs, ref), align_cfg.beta,
                                     seed=cfg.seed)["implicit_acc"]
        # Agreement of the labels with ground-truth return (how far the teacher's intent is from the task).
        gt = [(o == "left") == (a.ret > b.ret) for (a, b), o in zip(pairs, outcomes)
              if o in ("left", "right") and a.ret != b.ret]
        rcfg = dataclasses.replace(align_cfg, checkpoint=str(bc), init=str(current), prefs="",
                                   out_dir=str(out / f"round{r}" / "align"), dataset=str(dataset), round=r,
                                   seed=cfg.seed * 1000 + r)
        t_al = time.time()
        res = align(rcfg, pairs_from_labels(labels), progress=progress, task_id=cfg.task)
        t_align = time.time() - t_al
        current = res.checkpoint
        ev = evaluate_policy(DiffusionPolicy.load(current, task_id=cfg.task), envs, cfg.eval_episodes, teacher,
                             ood, seed=cfg.seed)
        counts = {k: outcomes.count(k) for k in ("left", "right", "equal", "skip")}
        row = {"round": r, "checkpoint": str(current), "labels": len(labels),
               "trained_pairs": res.after["pairs"], "outcomes": counts,
               "label_return_agreement": float(np.mean(gt)) if gt else float("nan"),
               "implicit_acc_new": acc_new, "implicit_acc": res.after["implicit_acc"],
               "reward_margin": res.after["reward_margin"], "dpo_loss": res.after["dpo"],
               "train_reg": res.metrics.get("reg", 0.0), "align_steps_per_s": res.steps_per_s,
               "rollout_s": t_roll, "align_s": t_align, **ev, "round_s": time.time() - t_round}
        summary["rounds"].append(row)
        log(_format_row(row))
        write()
    for env in envs:
        env.close()
    write()
    return summary


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return json_safe(obj.item())
    return obj


def _format_row(row: dict[str, Any]) -> str:
    lo, hi = row["success_ci95"]
    parts = [f"round {row['round']}: success {row['success_rate']:.0%} ({lo:.0%}-{hi:.0%})",
             f"return {row['mean_return']:.1f}", f"intent {row['intent_score']:.4g}",
             *([f"D4RL score {row['d4rl_normalized_score']:.1f}"] if "d4rl_normalized_score" in row else []),
             f"ood {row['ood_action_dist']:.3f}"]
    if row["round"] > 0:
        parts += [f"acc new {row['implicit_acc_new']:.2f}", f"acc all {row['implicit_acc']:.2f}",
                  f"labels {row['labels']}", f"{row['round_s']:.0f} s"]
    return ", ".join(parts)
