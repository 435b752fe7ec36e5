"""The headless alignment loop with a scripted teacher (DESIGN.md §1, steps 1-4).

1. Offline data (:func:`fkpd.data.generate_dataset`, or ``--dataset``) and behaviour
   cloning (:func:`fkpd.train.bc.train_bc`, or ``--bc-checkpoint``): π_ref = π_0.
2. For each round r = 1..K, through the round engine that the app's worker uses too
   (:class:`fkpd.train.engine.RoundEngine`): roll out ``pairs_per_round`` pairs of
   clips with π_{r−1} from fresh reset seeds (:class:`fkpd.prefs.pairs.RolloutPairSource`;
   with ``--label-source dataset`` pairs of offline-dataset segments instead,
   :class:`fkpd.prefs.dataset_pairs.DatasetPairSource`, or a ``--dataset-share`` of
   them with ``mix``; with ``--query-selection disagreement`` or ``diversity`` the
   current-policy pairs are chosen from ``--candidate-factor`` times as many candidates,
   :mod:`fkpd.train.acquisition`), let the teacher label them (:class:`fkpd.prefs.labellers.ScriptedLabeller`), align on
   *all* labels so far starting from π_{r−1} against π_ref (:func:`fkpd.train.align.align`),
   and evaluate π_r (:class:`fkpd.train.evaluate.Evaluator`). π_r is also rolled out on
   ``--validation-episodes`` V held-out validation episodes (50 by default, 0: none), and
   the best version so far (the next round's parent with ``--continue-from best``, the
   default, and the loop's result) is chosen on those.

Per round it logs the success rate (95% Wilson CI), mean return, the teacher's intent
score on evaluation episodes, the implicit accuracy of π_{r−1} on the new labels
(before training on them; 0.5 by construction in round 1, where π_0 = π_ref) and of π_r
on all labels, and an out-of-distribution diagnostic
(:class:`fkpd.train.evaluate.ActionOOD`). Output::

    OUT/data.hdf5, OUT/bc/                   (unless reused)
    OUT/round<r>/segments/*.npz, prefs.json  (the round's pairs and labels)
    OUT/round<r>/align/checkpoint/           (π_r)
    OUT/prefs.json                           (all labels so far; usable with `fkpd align`)
    OUT/loop.json, OUT/loop.png              (metrics per round, and their plot)
    OUT/tb/                                  (the per-round metrics as TensorBoard events, x = round;
                                              OUT/bc/tb/, OUT/round<r>/align/tb/: BC's and each round's training)

Reset seeds: evaluation uses ``10_000 + i`` (as :func:`fkpd.policy.rollout.evaluate`),
validation ``20_000 + i`` (:data:`fkpd.policy.rollout.VALIDATION_SEED_BASE`), pairs
:func:`fkpd.prefs.pairs.pair_seed` ``(seed, r, i) = 1_000_000_000 + 10_000_000·seed +
100_000·r + i``, both disjoint from dataset seeds; round r aligns with seed ``1000·seed + r``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fkpd.config import json_safe, save_json, to_json_dict
from fkpd.data import OfflineDataset, generate_dataset, load_dataset, names_a_dataset
from fkpd.envs import DEFAULT_TASK, get_task, make_env
from fkpd.errors import CheckpointError, ConfigError
from fkpd.io import atomic_path
from fkpd.policy import DiffusionPolicy, PolicyConfig, read_checkpoint_meta
from fkpd.policy.rollout import VALIDATION_SEED_BASE
from fkpd.prefs.labellers import ScriptedLabeller
from fkpd.prefs.dataset_pairs import DatasetPairSource
from fkpd.prefs.pairs import (CANDIDATE_LAYER, MAX_CANDIDATE_FACTOR, PairSource, RolloutPairSource,
                              clip_files_writer, mix_sources)
from fkpd.prefs.segments import Segment, save_preferences
from fkpd.prefs.teachers import ScriptedTeacher, make_teacher
from fkpd.train.acquisition import DEFAULT_CANDIDATE_FACTOR, QUERY_SELECTIONS, AcquisitionPairSource, select_pairs
from fkpd.train.align import AlignConfig, PairWindows, evaluate_pairs, pairs_from_labels
from fkpd.train.engine import RoundEngine
from fkpd.train.evaluate import ActionOOD, Evaluator, describe_comparison
from fkpd.train.tracking import RunLog


#: ``--label-source`` values: current-policy rollouts, offline dataset segments, or both.
LABEL_SOURCES = ("policy", "dataset", "mix")


@dataclass
class LoopConfig:
    """A headless loop. Every field is also a ``fkpd loop`` flag; alignment settings
    (``--regularizer``, ``--beta``, ``--lam``, ``--steps``, ...) come from
    :class:`fkpd.train.align.AlignConfig`."""

    task: str = field(default=DEFAULT_TASK, metadata={"help": "task id"})
    teacher: str = field(default="return", metadata={"help": "scripted teacher (see fkpd.prefs.teachers.TEACHERS)"})
    # 4 × 100: the four-task benchmark's best FKPD configuration (+15.3 points over BC on
    # seeds 0-2, +13.2 with a fresh fourth seed, against +11.8 for 2 × 200 with the same
    # 400 labels; README, issue #12).
    rounds: int = field(default=4, metadata={"help": "K, alignment rounds"})
    pairs_per_round: int = field(default=100, metadata={"help": "M, pairs rolled out and labelled per round"})
    segment_length: int = field(default=0, metadata={"help": "L, steps per segment (0: the task's, 64; whole "
                                                                 "episodes on maze2d)"})
    segment_start: int = field(default=0, metadata={"help": "first step of every segment (-1: random per pair)"})
    label_source: str = field(default="policy", metadata={
        "help": "where the labelled pairs come from: policy (rollouts of the current version), dataset (segments "
                "of two episodes of the offline dataset, as in the released FKPD code) or mix"})
    dataset_share: float = field(default=0.5, metadata={"help": "with --label-source mix: share of dataset pairs "
                                                                "in each round's pairs (0..1)"})
    dataset_same_seed: bool = field(default=False, metadata={
        "help": "dataset pairs only from episodes with the same reset seed (needs several episodes per seed)"})
    query_selection: str = field(default="uniform", metadata={
        "help": "how the current-policy pairs of a round are chosen (fkpd.train.acquisition): uniform (every pair "
                "rolled out is labelled), disagreement (those the current model is least sure of) or diversity "
                "(those whose two clips visit the most different states), among --candidate-factor times as many "
                "candidates"})
    candidate_factor: int = field(default=DEFAULT_CANDIDATE_FACTOR, metadata={
        "help": "candidate pairs rolled out per labelled pair with --query-selection disagreement or diversity "
                f"(1..{MAX_CANDIDATE_FACTOR})"})
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
    # best on 50 validation episodes: the four-task benchmark's best FKPD configuration with
    # 4 × 100 (+15.7 points over BC on seeds 0-4, +15.5 on seed 4, run after the choice was
    # made; +13.2 on seeds 0-3 without it; README, issue #12). --validation-episodes 0 and
    # --continue-from latest give the loop of before.
    continue_from: str = field(default="best", metadata={
        "help": "the version each round starts from and rolls out its pairs with: latest (the previous round's) "
                "or best (the best so far by success rate, then mean return: on the validation episodes with "
                "--validation-episodes, else on the evaluation episodes)"})
    validation_episodes: int = field(default=50, metadata={
        "help": "held-out validation episodes per version (reset seeds 20000 + i, apart from the evaluation "
                "seeds); with > 0 the best version (--continue-from best, and the loop's result) is chosen by "
                "them, so the evaluation that reports it is not also the one that picked it"})

    def __post_init__(self) -> None:
        if self.continue_from not in ("latest", "best"):
            raise ConfigError(f"--continue-from must be latest or best, got {self.continue_from!r}")
        if self.label_source not in LABEL_SOURCES:
            raise ConfigError(f"--label-source must be one of {', '.join(LABEL_SOURCES)}, got {self.label_source!r}")
        if not 0.0 <= float(self.dataset_share) <= 1.0:
            raise ConfigError(f"--dataset-share must be between 0 and 1, got {self.dataset_share!r}")
        if self.query_selection not in QUERY_SELECTIONS:
            raise ConfigError(f"--query-selection must be one of {', '.join(QUERY_SELECTIONS)}, got "
                              f"{self.query_selection!r}")
        if (isinstance(self.candidate_factor, bool) or not isinstance(self.candidate_factor, int)
                or not 1 <= self.candidate_factor <= MAX_CANDIDATE_FACTOR):
            raise ConfigError(f"--candidate-factor must be an integer from 1 to {MAX_CANDIDATE_FACTOR}, got "
                              f"{self.candidate_factor!r}")
        if self.query_selection != "uniform" and self.candidate_factor > 1 and self.pairs_per_round > CANDIDATE_LAYER:
            raise ConfigError(f"--pairs-per-round must be at most {CANDIDATE_LAYER} with --query-selection "
                              f"{self.query_selection}, got {self.pairs_per_round}")
        if isinstance(self.validation_episodes, bool) or not isinstance(self.validation_episodes, int) \
                or self.validation_episodes < 0:
            raise ConfigError(f"--validation-episodes must be an integer >= 0, got {self.validation_episodes!r}")
        for name in ("rounds", "pairs_per_round", "bc_episodes", "bc_steps", "eval_episodes", "n_envs", "ood_k"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.segment_length < 0:
            raise ConfigError(f"--segment-length must be >= 0 (0: the task's), got {self.segment_length!r}")
        if self.max_episode_steps < 0:
            raise ConfigError(f"--max-episode-steps must be >= 0, got {self.max_episode_steps!r}")


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


def plot_rounds(rows: list[dict[str, Any]], path: Path, title: str, best_round: int | None = None) -> Path:
    """A PNG of the per-round metrics (success, return, intent, implicit accuracy, OOD).

    Rows with ``validation`` figures add the validation success rate to the first panel;
    ``best_round`` (the version the loop delivers so far) is starred there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = [row["round"] for row in rows]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    sr = np.array([row["success_rate"] for row in rows])
    ci = np.array([row["success_ci95"] for row in rows], dtype=float)
    axes[0].errorbar(r, sr, yerr=[sr - ci[:, 0], ci[:, 1] - sr], marker="o", capsize=3, label="evaluation")
    validated = [row for row in rows if "validation" in row]
    if validated:
        axes[0].plot([row["round"] for row in validated], [row["validation"]["success_rate"] for row in validated],
                     marker="x", linestyle="--", label="validation (chooses)")
    if best_round is not None and 0 <= best_round < len(rows):
        axes[0].plot([best_round], [rows[best_round]["success_rate"]], marker="*", markersize=16, linestyle="none",
                     color="gold", markeredgecolor="black", label="best version")
    axes[0].set(title="success rate (95% CI)", ylim=(-0.05, 1.05))
    axes[0].legend(fontsize=7)
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


def loop_out_dir(cfg: LoopConfig, align_cfg: AlignConfig) -> Path:
    """The loop's output folder: ``cfg.out_dir``, or ``runs/loop/<task>_<teacher>_<regularizer>``."""
    return Path(cfg.out_dir or Path("runs") / "loop" /
                f"{cfg.task.replace('/', '_')}_{cfg.teacher}_{align_cfg.regularizer}")


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
        metrics per round, round 0 = BC; from round 1 on, ``parent_round``, ``vs_parent``
        (:func:`fkpd.train.evaluate.compare_with_parent`, paired on the evaluation seeds)
        and ``worse_than_parent``; with ``validation_episodes``, ``validation``: success
        rate, its interval and mean return on the held-out validation seeds), ``best``
        (the best version by success rate, then return: on the validation episodes when
        there are any, else on the evaluation episodes; ``selected_by`` says which; its
        ``success_rate`` and ``mean_return`` are always the evaluation's) and
        ``wall_s``. With ``continue_from="best"`` each round starts from the best
        version so far instead of the previous round's.

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
    out = loop_out_dir(cfg, align_cfg)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    if cfg.dataset:
        # A file, a D4RL dataset name (D4RL's cache directory) or minari:DATASET_ID.
        dataset: Path | str = cfg.dataset
        if not names_a_dataset(cfg.dataset):
            raise ConfigError(f"--dataset {cfg.dataset!r} does not exist; drop the flag to generate one")
    elif own := spec.own_dataset:
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

    def write(best_round: int | None = None) -> None:
        summary["wall_s"] = time.time() - t_start
        save_json(out / "loop.json", json_safe(summary))
        plot_rounds(summary["rounds"], out / "loop.png",
                    f"{cfg.task} | teacher {cfg.teacher} | {align_cfg.regularizer} (β={align_cfg.beta:g}, "
                    f"λ={align_cfg.lam:g})", best_round=best_round)

    start = None if cfg.segment_start < 0 else cfg.segment_start
    acquirers: list[AcquisitionPairSource] = []  # the current-policy sources that choose among candidates

    def policy_source(n: int) -> PairSource:
        src = select_pairs(RolloutPairSource(envs, n, cfg.segment_length, seed=cfg.seed, start=start,
                                             render=cfg.render, task_id=cfg.task),
                           cfg.query_selection, cfg.candidate_factor, reference=ref, beta=align_cfg.beta)
        if isinstance(src, AcquisitionPairSource):
            acquirers.append(src)
        return src

    source: PairSource = policy_source(cfg.pairs_per_round)
    if cfg.label_source != "policy":
        acquirers.clear()
        source = mix_sources(
            cfg.pairs_per_round, 1.0 if cfg.label_source == "dataset" else cfg.dataset_share,
            lambda n, _first: policy_source(n),  # _first = 0: no top-ups
            lambda n, first, stride: DatasetPairSource(ds, n, cfg.segment_length, seed=cfg.seed, start=start,
                                                       same_reset_seed=cfg.dataset_same_seed, render=cfg.render,
                                                       task_id=cfg.task, first=first, stride=stride))
    labeller = ScriptedLabeller(teacher)
    engine = RoundEngine(cfg.task, bc, str(dataset), cfg.seed, source, labeller,
                         Evaluator(envs, cfg.eval_episodes, cfg.seed, teacher=teacher, ood=ood), align_cfg)

    def offer(policy: DiffusionPolicy, r: int) -> dict[str, Any]:
        """Round r's pairs from ``policy`` (π_{r−1}), labelled by the teacher; the
        implicit accuracy of π_{r−1} on them, before training on them."""
        t0 = time.time()
        bar = tqdm(total=2 * cfg.pairs_per_round, desc=f"round {r} rollouts", unit="clip", disable=not progress)

        def advance(done: int, total: int) -> None:  # total counts candidate clips too
            bar.total = max(bar.total, total)
            bar.update(done - bar.n)

        engine.make_batch(policy, r, on_clip=clip_files_writer(out / f"round{r}" / "segments", spec.fps),
                          progress=advance)
        bar.close()
        rollout_s = time.time() - t0
        new = labeller.new_labels(r)
        save_preferences(out / f"round{r}" / "prefs.json", cfg.task, new)
        save_preferences(out / "prefs.json", cfg.task, labeller.labels())
        new_pairs = pairs_from_labels(new)
        acc_new = float("nan")
        if new_pairs:
            acc_new = evaluate_pairs(policy, ref, PairWindows(new_pairs, ref), align_cfg.beta,
                                     seed=cfg.seed)["implicit_acc"]
        pairs, outcomes = labeller.rounds[r]
        # Agreement of the labels with ground-truth return (how far the teacher's intent is from the task).
        gt = [(o == "left") == (a.ret > b.ret) for (a, b), o in zip(pairs, outcomes)
              if o in ("left", "right") and a.ret != b.ret]
        selection = {"query_selection": acquirers[0].last.summary()} if acquirers and acquirers[0].last else {}
        return {"outcomes": {k: outcomes.count(k) for k in ("left", "right", "equal", "skip")},
                "label_return_agreement": float(np.mean(gt)) if gt else float("nan"),
                "implicit_acc_new": acc_new, "rollout_s": rollout_s, **selection}

    validator = (Evaluator(envs, cfg.validation_episodes, cfg.seed, seed_base=VALIDATION_SEED_BASE)
                 if cfg.validation_episodes else None)

    def validate(policy: DiffusionPolicy) -> dict[str, Any]:
        """The version's validation figures ({} without validation episodes)."""
        if validator is None:
            return {}
        v = validator(policy)
        return {"validation": {k: v[k] for k in ("success_rate", "success_ci95", "mean_return", "episodes")}}

    def score(row: dict[str, Any]) -> tuple[float, float]:
        return _score(row["validation"] if validator is not None else row)

    ev = engine.evaluator(ref)
    summary["rounds"].append({"round": 0, "checkpoint": str(bc), "labels": 0, **ev, **validate(ref)})
    log(_format_row(summary["rounds"][-1]))
    write()
    tb = RunLog(out / "tb", "loop")  # per-round metrics, x = round (fkpd.train.tracking)
    tb.log(summary["rounds"][-1], 0)
    # (round, checkpoint, policy, evaluation, its row) of the version the next round starts from
    parent = (0, Path(bc), ref, ev, summary["rounds"][-1])
    best = parent
    for r in range(1, cfg.rounds + 1):
        t_round = time.time()
        parent_round, current, policy, parent_ev, _ = parent
        offered = offer(policy, r)
        res = engine.run_round(r, current, out / f"round{r}" / "align", progress=progress, parent_evaluation=parent_ev)
        a = res.alignment
        row = {"round": r, "parent_round": parent_round, "checkpoint": str(res.checkpoint), "labels": res.labels_used,
               "trained_pairs": a.after["pairs"], "outcomes": offered["outcomes"],
               "label_return_agreement": offered["label_return_agreement"],
               "implicit_acc_new": offered["implicit_acc_new"], "implicit_acc": a.after["implicit_acc"],
               "reward_margin": a.after["reward_margin"], "dpo_loss": a.after["dpo"],
               "train_reg": a.metrics.get("reg", 0.0), "align_steps_per_s": a.steps_per_s,
               "rollout_s": offered["rollout_s"], "align_s": res.align_s, **res.evaluation,
               **({"query_selection": offered["query_selection"]} if "query_selection" in offered else {}),
               "vs_parent": res.comparison, "worse_than_parent": bool(res.comparison and res.comparison["worse"]),
               **validate(res.policy), "round_s": time.time() - t_round}
        summary["rounds"].append(row)
        this = (r, res.checkpoint, res.policy, res.evaluation, row)
        if score(row) > score(best[4]):
            best = this
        parent = best if cfg.continue_from == "best" else this
        tb.log(row, r)
        tb.flush()
        log(_format_row(row))
        log(f"round {r} vs round {parent_round}: {describe_comparison(res.comparison, f'round {parent_round}')}")
        write(best[0])
    summary["best"] = {"round": best[0], "checkpoint": str(best[1]), "success_rate": best[3].get("success_rate"),
                       "mean_return": best[3].get("mean_return"),
                       "selected_by": "validation" if validator is not None else "evaluation",
                       **({"validation": best[4]["validation"]} if validator is not None else {})}
    for env in envs:
        env.close()
    tb.close()
    write(best[0])
    return summary


def _score(evaluation: dict[str, Any]) -> tuple[float, float]:
    """What "best version so far" means: success rate, then mean return."""
    return (float(evaluation.get("success_rate") or 0.0), float(evaluation.get("mean_return") or 0.0))


def _format_row(row: dict[str, Any]) -> str:
    lo, hi = row["success_ci95"]
    parts = [f"round {row['round']}: success {row['success_rate']:.0%} ({lo:.0%}-{hi:.0%})",
             f"return {row['mean_return']:.1f}", f"intent {row['intent_score']:.4g}",
             *([f"D4RL score {row['d4rl_normalized_score']:.1f}"] if "d4rl_normalized_score" in row else []),
             f"ood {row['ood_action_dist']:.3f}"]
    if "validation" in row:
        parts.append(f"validation {row['validation']['success_rate']:.0%}")
    if row["round"] > 0:
        parts += [f"acc new {row['implicit_acc_new']:.2f}", f"acc all {row['implicit_acc']:.2f}",
                  f"labels {row['labels']}", f"{row['round_s']:.0f} s"]
    return ", ".join(parts)
