"""``fkpd tasks``, ``fkpd data generate|info|import`` and ``fkpd eval``: tasks, offline
datasets and evaluating a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fkpd.cli.common import command
from fkpd.config import save_json
from fkpd.envs import DEFAULT_TASK, list_tasks


def _cmd_tasks(args: argparse.Namespace) -> int:
    for t in list_tasks():
        print(t)
    return 0


def _cmd_data_generate(args: argparse.Namespace) -> int:
    from fkpd.data import DataRecipe, dataset_info, generate_dataset, load_dataset

    recipe = DataRecipe.clean() if args.clean else DataRecipe.for_task(args.task)
    out = generate_dataset(args.task, args.episodes, args.out, recipe=recipe, seed=args.seed,
                           max_episode_steps=args.max_episode_steps)
    info = dataset_info(load_dataset(out, args.task))
    print(f"wrote {out}: {info['episodes']} episodes, {info['steps']} steps, "
          f"success rate {info.get('success_rate', float('nan')):.1%}")
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    from fkpd.data import dataset_info, load_dataset

    info = dataset_info(load_dataset(args.file, args.task))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.file}  (task {info.get('task_id')})")
    print(f"  episodes        {info['episodes']}")
    print(f"  steps           {info['steps']}  (episode length {info['episode_length']['min']}"
          f"..{info['episode_length']['max']}, mean {info['episode_length']['mean']:.1f})")
    print(f"  Do / Da         {info['obs_dim']} / {info['action_dim']}")
    r = info["return"]
    print(f"  return          mean {info['return_mean']:.1f}; min {r['min']:.1f}, p25 {r['p25']:.1f}, "
          f"median {r['median']:.1f}, p75 {r['p75']:.1f}, max {r['max']:.1f}")
    if "success_rate" in info:
        print(f"  success rate    {info['success_rate']:.1%}")
    for name, b in info.get("behaviours", {}).items():
        extra = f", success {b['success_rate']:.0%}" if "success_rate" in b else ""
        print(f"    {name:<14}{b['episodes']:>5} episodes, mean return {b['return_mean']:.1f}{extra}")
    return 0


def _cmd_data_import(args: argparse.Namespace) -> int:
    from fkpd.data import dataset_info, load_dataset
    from fkpd.data.minari import import_minari
    from fkpd.errors import DatasetError

    if not args.source.startswith("minari:"):
        raise DatasetError(f"cannot import {args.source!r}: pass minari:DATASET_ID (D4RL files and dataset names "
                           "are read directly by --dataset)")
    out = import_minari(args.source[len("minari:"):], args.out, task_id=args.task, obs_key=args.obs_key)
    info = dataset_info(load_dataset(out, args.task))
    print(f"wrote {out}: {info['episodes']} episodes, {info['steps']} steps, Do/Da {info['obs_dim']}/"
          f"{info['action_dim']}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from fkpd.policy.rollout import evaluate

    res = evaluate(args.checkpoint, episodes=args.episodes, video_dir=args.videos, n_videos=args.n_videos,
                   workers=args.workers, policy_seed=args.seed, render_size=tuple(args.render_size),
                   camera=args.camera)
    print(res.format())
    if res.videos:
        print(f"clips: {Path(res.videos[0]).parent} ({len(res.videos)} MP4 files)")
    if args.json:
        save_json(Path(args.json), res.summary())
        print(f"results: {args.json}")
    return 0


def add_parsers(sub) -> None:
    """``fkpd tasks``, ``fkpd data ...``, ``fkpd eval``."""
    command(sub, "tasks", _cmd_tasks, "list task ids")

    data = sub.add_parser("data", help="offline datasets").add_subparsers(dest="data_cmd", required=True)
    s = command(data, "generate", _cmd_data_generate, "roll out perturbed scripted policies into a D4RL HDF5 file")
    s.add_argument("--task", default=DEFAULT_TASK)
    s.add_argument("--episodes", type=int, default=100)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-episode-steps", type=int, default=None)
    s.add_argument("--clean", action="store_true", help="unperturbed scripted policy (no noise)")
    s = command(data, "info", _cmd_data_info, "summarise a dataset")
    s.add_argument("file", help="HDF5 file, D4RL dataset name (D4RL's cache directory) or minari:DATASET_ID")
    s.add_argument("--task", default=None, help="also check dimensions against this task")
    s.add_argument("--json", action="store_true")
    s = command(data, "import", _cmd_data_import, "write a locally present Minari dataset as a D4RL-layout HDF5 file")
    s.add_argument("source", help="minari:DATASET_ID")
    s.add_argument("--out", required=True)
    s.add_argument("--task", default=None, help="check dimensions against this task and record it")
    s.add_argument("--obs-key", default=None, help="entry of dict observations to use (default: observation)")

    s = command(sub, "eval", _cmd_eval, "evaluate a checkpoint: success rate, return, clips")
    s.add_argument("checkpoint")
    s.add_argument("--episodes", type=int, default=50)
    s.add_argument("--videos", default=None, help="directory for MP4 clips")
    s.add_argument("--n-videos", type=int, default=4)
    s.add_argument("--workers", type=int, default=None)
    s.add_argument("--seed", type=int, default=0, help="sampling-noise seed")
    s.add_argument("--json", default=None, help="write the summary here")
    s.add_argument("--render-size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"),
                   help="clip frame size in pixels")
    s.add_argument("--camera", default=None, help="MetaWorld camera (corner, corner2, corner3, corner4, topview, ...); "
                                                  "maze2d: top-down unless 'free'; locomotion: a MuJoCo camera name")
