"""``fkpd train-bc``, ``fkpd pipeline``, ``fkpd align`` and ``fkpd loop``: training runs.

``train-bc``, ``align`` and ``loop`` take ``--config FILE.toml`` (any of their options;
flags given on the command line override the file, :func:`fkpd.config.read_config_file`)
and save the resolved config as ``OUT/config.toml`` (read back by ``--config``), beside
``config.json`` / ``loop.json``. Their metrics go to ``OUT/tb/`` as TensorBoard event
files, and with ``--wandb`` to Weights & Biases (:mod:`fkpd.train.tracking`).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

from fkpd.cli.common import command
from fkpd.config import add_dataclass_args, config_toml, dataclass_from_args, save_config_toml, save_json
from fkpd.envs import DEFAULT_TASK

#: AlignConfig fields ``fkpd loop`` sets per round (not flags of the loop).
LOOP_ALIGN_SKIP = ("checkpoint", "prefs", "init", "out_dir", "dataset", "round", "seed")
POLICY_SKIP = ("obs_dim", "action_dim")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--config FILE.toml`` and the logging flags (``--wandb``, ...)."""
    from fkpd.train.tracking import TrackingConfig

    add_dataclass_args(parser, TrackingConfig)
    parser.add_argument("--config", default=None, metavar="FILE.toml",
                        help="read options from this TOML file (keys: the options' names with _, e.g. "
                             "pairs_per_round = 200); flags given here override it")


def _save_config(out: Path, args: argparse.Namespace, sections: Sequence[tuple[str, Any]]) -> Path:
    """``OUT/config.toml``: the resolved options, for ``--config`` (a header says how)."""
    prog = args.cmd_parser.prog
    header = (f"Resolved config of `{prog}`, written {time.strftime('%Y-%m-%d %H:%M:%S')}.\n"
              f"Rerun with: {prog} --config {out / 'config.toml'}  (flags given there override this file)")
    return save_config_toml(out / "config.toml", args.cmd_parser, sections, header)


def _resolved(args: argparse.Namespace, sections: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """The resolved options as one mapping per table (recorded with a W&B run)."""
    import tomllib

    return tomllib.loads(config_toml(args.cmd_parser, sections))


def _cmd_train_bc(args: argparse.Namespace) -> int:
    from fkpd.policy import PolicyConfig
    from fkpd.train.bc import BCConfig, train_bc
    from fkpd.train.tracking import TrackingConfig, wandb_run

    cfg = dataclass_from_args(BCConfig, args)
    pcfg = dataclass_from_args(PolicyConfig, args)
    track = dataclass_from_args(TrackingConfig, args)
    sections = [("bc", cfg), ("policy", pcfg), ("tracking", track)]
    out = Path(cfg.out_dir)
    _save_config(out, args, sections)
    with wandb_run(track, out, _resolved(args, sections), job_type="train-bc"):
        ckpt = train_bc(cfg, pcfg)
    print(f"checkpoint: {ckpt}")
    print(f"config: {out / 'config.toml'}; TensorBoard: tensorboard --logdir {out / 'tb'}")
    return 0


def _cmd_pipeline(args: argparse.Namespace) -> int:
    """Generate data (if missing), train BC (resuming), evaluate, write clips."""
    from fkpd.data import DataRecipe, generate_dataset
    from fkpd.envs import get_task
    from fkpd.policy import PolicyConfig
    from fkpd.policy.rollout import evaluate
    from fkpd.train.bc import BCConfig, train_bc

    t0 = time.time()
    root = Path(args.out) / args.task.replace("/", "_")
    own = get_task(args.task).own_dataset  # locomotion has no generator: its D4RL dataset, from D4RL's cache directory
    data = own or root / "data.hdf5"
    cfg = dataclass_from_args(BCConfig, args, task=args.task, dataset=str(data), out_dir=str(root / "bc"))
    if own:
        print(f"[1/3] using the D4RL dataset {data}")
    elif not data.exists():
        print(f"[1/3] generating {args.episodes} episodes of offline data -> {data}")
        generate_dataset(args.task, args.episodes, data, recipe=DataRecipe.for_task(args.task), seed=cfg.seed)
    else:
        print(f"[1/3] using existing dataset {data}")
    print("[2/3] behaviour cloning")
    ckpt = train_bc(cfg, dataclass_from_args(PolicyConfig, args))
    print(f"[3/3] evaluating over {args.eval_episodes_final} episodes, writing clips")
    res = evaluate(ckpt, episodes=args.eval_episodes_final, video_dir=root / "clips", n_videos=args.n_videos)
    summary = res.summary() | {"checkpoint": str(ckpt), "dataset": str(data), "wall_s": time.time() - t0}
    save_json(root / "eval.json", summary)
    print()
    print(res.format())
    print(f"  dataset     {data}")
    print(f"  checkpoint  {ckpt}")
    print(f"  clips       {root / 'clips'}  ({len(res.videos)} MP4)")
    print(f"  results     {root / 'eval.json'}")
    print(f"  wall time   {time.time() - t0:.0f} s")
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    """One alignment round on a preferences file; prints where the new version went."""
    from fkpd.train.align import AlignConfig, align
    from fkpd.train.tracking import TrackingConfig, wandb_run

    cfg = dataclass_from_args(AlignConfig, args)
    track = dataclass_from_args(TrackingConfig, args)
    with wandb_run(track, cfg.out_dir or None, _resolved(args, [("align", cfg), ("tracking", track)]),
                   job_type="align"):
        res = align(cfg)
    out = res.checkpoint.parent
    _save_config(out, args, [("align", dataclasses.replace(cfg, out_dir=str(out))), ("tracking", track)])
    b, a = res.before, res.after
    print(f"aligned on {a['pairs']} pairs ({res.steps_per_s:.1f} steps/s): implicit accuracy "
          f"{b['implicit_acc']:.2f} -> {a['implicit_acc']:.2f}, DPO loss {b['dpo']:.3f} -> {a['dpo']:.3f}")
    print(f"checkpoint: {res.checkpoint}")
    print(f"config: {out / 'config.toml'}; TensorBoard: tensorboard --logdir {out / 'tb'}")
    return 0


def _cmd_loop(args: argparse.Namespace) -> int:
    """BC, then K rounds of rollouts -> scripted labels -> alignment -> evaluation."""
    from fkpd.policy import PolicyConfig
    from fkpd.train.align import AlignConfig
    from fkpd.train.loop import LoopConfig, loop_out_dir, run_loop
    from fkpd.train.tracking import TrackingConfig, wandb_run

    align_cfg = dataclass_from_args(AlignConfig, args)
    cfg = dataclass_from_args(LoopConfig, args)
    cfg = dataclasses.replace(cfg, out_dir=str(loop_out_dir(cfg, align_cfg)))
    pcfg = dataclass_from_args(PolicyConfig, args)
    track = dataclass_from_args(TrackingConfig, args)
    sections = [("loop", cfg), ("align", align_cfg), ("policy", pcfg), ("tracking", track)]
    out = Path(cfg.out_dir)
    _save_config(out, args, sections)
    with wandb_run(track, out, _resolved(args, sections), job_type="loop"):
        summary = run_loop(cfg, align_cfg, pcfg)
    print(f"last round's checkpoint: {summary['rounds'][-1]['checkpoint']}")
    best = summary["best"]
    chosen = (f", chosen on {best['validation']['episodes']} validation episodes "
              f"({best['validation']['success_rate']:.0%} there)" if best.get("selected_by") == "validation"
              else ", chosen on the evaluation episodes")
    print(f"result (best version): round {best['round']} ({best['checkpoint']}), success {best['success_rate']:.0%}"
          f"{chosen}")
    flagged = [row["round"] for row in summary["rounds"][1:] if row.get("worse_than_parent")]
    if flagged:
        then = ("later rounds started from the best version so far" if cfg.continue_from == "best"
                else "see loop.json (vs_parent), or rerun with --continue-from best")
        print(f"WARNING: round(s) {flagged} evaluated worse than their parent beyond the 95% interval; {then}")
    print(f"metrics: {out / 'loop.json'}  plot: {out / 'loop.png'}  labels: {out / 'prefs.json'}")
    print(f"config: {out / 'config.toml'}; TensorBoard: tensorboard --logdir {out}")
    return 0


def add_parsers(sub) -> None:
    """``fkpd train-bc``, ``fkpd pipeline``, ``fkpd align``, ``fkpd loop``."""
    from fkpd.policy import PolicyConfig
    from fkpd.train.align import AlignConfig
    from fkpd.train.bc import BCConfig
    from fkpd.train.loop import LoopConfig

    s = command(sub, "train-bc", _cmd_train_bc, "behaviour cloning of a diffusion policy")
    add_dataclass_args(s, BCConfig)
    add_dataclass_args(s, PolicyConfig, skip=POLICY_SKIP)
    _add_run_options(s)

    s = command(sub, "pipeline", _cmd_pipeline, "data -> BC -> evaluation -> clips on one task")
    s.add_argument("--out", default="runs")
    s.add_argument("--episodes", type=int, default=100, help="dataset episodes")
    s.add_argument("--eval-episodes-final", type=int, default=50)
    s.add_argument("--n-videos", type=int, default=4)
    add_dataclass_args(s, BCConfig, skip=("dataset", "out_dir"))
    add_dataclass_args(s, PolicyConfig, skip=POLICY_SKIP)
    s.set_defaults(task=DEFAULT_TASK)

    s = command(sub, "align", _cmd_align, "one alignment round (FKPD / DPO / reverse KL) on a preferences file")
    add_dataclass_args(s, AlignConfig)
    _add_run_options(s)

    s = command(sub, "loop", _cmd_loop,
                "headless loop: BC, then rounds of rollouts, scripted labels, alignment, eval")
    add_dataclass_args(s, LoopConfig)
    add_dataclass_args(s, AlignConfig, skip=LOOP_ALIGN_SKIP)
    add_dataclass_args(s, PolicyConfig, skip=POLICY_SKIP)
    _add_run_options(s)
