"""The ``fkpd`` command line.

Subcommands::

    fkpd tasks                                   list task ids
    fkpd data generate --task T --episodes N --out FILE [--clean]
    fkpd data info FILE|D4RL_NAME|minari:ID
    fkpd data import minari:ID --out FILE [--task T]
    fkpd train-bc --task T --dataset FILE [config flags]
    fkpd eval CHECKPOINT --episodes N [--videos DIR]
    fkpd pipeline [--task T]                     data -> BC -> eval -> clips
    fkpd worker [--once]                         run queued jobs (bootstrap, alignment rounds, compare)
    fkpd labels import LABELS --dataset D --project P [--segment-length L]   PT / Uni-RLHF human labels
    fkpd annotators invite NAME --project P      an invite link (invite mode); also revoke, list, mode
    fkpd align --checkpoint REF --prefs FILE [--regularizer forward|reverse|none] [config flags]
    fkpd loop --task T --teacher NAME --rounds K --pairs-per-round M [config flags]

User errors (:class:`fkpd.errors.FKPDError`) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from fkpd.config import add_dataclass_args, dataclass_from_args, save_json
from fkpd.envs import DEFAULT_TASK, list_tasks
from fkpd.errors import FKPDError


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
    from fkpd.errors import DatasetError
    from fkpd.data.minari import import_minari

    if not args.source.startswith("minari:"):
        raise DatasetError(f"cannot import {args.source!r}: pass minari:DATASET_ID (D4RL files and dataset names "
                           "are read directly by --dataset)")
    out = import_minari(args.source[len("minari:"):], args.out, task_id=args.task, obs_key=args.obs_key)
    info = dataset_info(load_dataset(out, args.task))
    print(f"wrote {out}: {info['episodes']} episodes, {info['steps']} steps, Do/Da {info['obs_dim']}/"
          f"{info['action_dim']}")
    return 0


def _cmd_train_bc(args: argparse.Namespace) -> int:
    from fkpd.policy import PolicyConfig
    from fkpd.train.bc import BCConfig, train_bc

    cfg = dataclass_from_args(BCConfig, args)
    pcfg = dataclass_from_args(PolicyConfig, args)
    ckpt = train_bc(cfg, pcfg)
    print(f"checkpoint: {ckpt}")
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


def _cmd_pipeline(args: argparse.Namespace) -> int:
    """Generate data (if missing), train BC (resuming), evaluate, write clips."""
    from fkpd.envs import get_task
    from fkpd.data import DataRecipe, generate_dataset
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


# ---- alignment (FKPD issue "the losses, scripted teachers, the headless loop") -------------
def _cmd_align(args: argparse.Namespace) -> int:
    """One alignment round on a preferences file; prints where the new version went."""
    from fkpd.train.align import AlignConfig, align

    res = align(dataclass_from_args(AlignConfig, args))
    b, a = res.before, res.after
    print(f"aligned on {a['pairs']} pairs ({res.steps_per_s:.1f} steps/s): implicit accuracy "
          f"{b['implicit_acc']:.2f} -> {a['implicit_acc']:.2f}, DPO loss {b['dpo']:.3f} -> {a['dpo']:.3f}")
    print(f"checkpoint: {res.checkpoint}")
    return 0


def _cmd_loop(args: argparse.Namespace) -> int:
    """BC, then K rounds of rollouts -> scripted labels -> alignment -> evaluation."""
    from fkpd.train.align import AlignConfig
    from fkpd.train.loop import LoopConfig, run_loop
    from fkpd.policy import PolicyConfig

    summary = run_loop(dataclass_from_args(LoopConfig, args), dataclass_from_args(AlignConfig, args),
                       dataclass_from_args(PolicyConfig, args))
    out = Path(summary["out_dir"])
    print(f"final checkpoint: {summary['rounds'][-1]['checkpoint']}")
    best = summary["best"]
    print(f"best version so far: round {best['round']} ({best['checkpoint']}), success {best['success_rate']:.0%}")
    flagged = [row["round"] for row in summary["rounds"][1:] if row.get("worse_than_parent")]
    if flagged:
        print(f"WARNING: round(s) {flagged} evaluated worse than their parent beyond the 95% interval; "
              "see loop.json (vs_parent), or rerun with --continue-from best")
    print(f"metrics: {out / 'loop.json'}  plot: {out / 'loop.png'}  labels: {out / 'prefs.json'}")
    return 0


def _add_alignment_parsers(sub) -> None:
    from fkpd.train.align import AlignConfig
    from fkpd.train.loop import LoopConfig
    from fkpd.policy import PolicyConfig

    s = sub.add_parser("align", help="one alignment round (FKPD / DPO / reverse KL) on a preferences file")
    add_dataclass_args(s, AlignConfig)
    s.set_defaults(fn=_cmd_align)

    s = sub.add_parser("loop", help="headless loop: BC, then rounds of rollouts, scripted labels, alignment, eval")
    add_dataclass_args(s, LoopConfig)
    add_dataclass_args(s, AlignConfig, skip=("checkpoint", "prefs", "init", "out_dir", "dataset", "round", "seed"))
    add_dataclass_args(s, PolicyConfig, skip=("obs_dim", "action_dim"))
    s.set_defaults(fn=_cmd_loop)
# ---- end of the alignment block --------------------------------------------------------------


def _cmd_worker(args: argparse.Namespace) -> int:
    """Claim and run queued jobs until interrupted (SIGINT/SIGTERM stop the worker; its current job goes back to
    the queue at its next step and resumes on the next start)."""
    import logging

    from fkpd.store import Store, run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    store = Store(args.database_url, args.artifact_dir)
    print(f"worker on {store.backend} ({store.artifact_dir}); Ctrl-C stops it (a running job goes back to the queue; "
          "Ctrl-C twice interrupts it at once)", flush=True)
    stop = threading.Event()
    if args.parent_pid:
        def watch_parent() -> None:  # the app that started us is gone: stop
            while not stop.wait(2.0):
                try:
                    os.kill(args.parent_pid, 0)
                except ProcessLookupError:
                    print(f"parent process {args.parent_pid} exited; stopping (a running job goes back to the "
                          "queue)", flush=True)
                    stop.set()
                except PermissionError:
                    pass

        threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    n = run_worker(store, once=args.once, poll_s=args.poll_s, stale_after_s=args.stale_after_s,
                   max_attempts=args.max_attempts, handler_modules=["fkpd.studio"], stop=stop,
                   sweep_grace_s=args.sweep_grace_s or None)
    print(f"worker ran {n} job(s)")
    return 0


def _cmd_labels_import(args: argparse.Namespace) -> int:
    """Import Preference Transformer / Uni-RLHF labels into a project of the preference store."""
    from fkpd.store import Store
    from fkpd.prefs.importers import cli_message, import_pt_labels

    with Store(args.database_url, args.artifact_dir) as store:
        try:
            summary = import_pt_labels(
                store, args.project, args.dataset, args.labels, indices_file=args.indices_file,
                indices_2_file=args.indices_2_file, segment_length=args.segment_length, annotator=args.annotator,
                round=args.round, check_episode_bounds=not args.no_check_episode_bounds, index_space=args.index_space)
        except FKPDError as exc:  # name the keyword arguments as this command's flags
            raise FKPDError(cli_message(str(exc))) from None
    print(f"imported {summary.n_comparisons} comparisons ({summary.n_clips} segments of {summary.segment_length} "
          f"steps from {summary.dataset}, indices as {summary.index_space} rows) into project {args.project!r} "
          f"as annotator {summary.annotator!r}; {summary.n_skipped_identical} queries compared a segment with itself "
          "and were skipped")
    return 0


# ---- annotators: invite links and identity mode (issue #14) ------------------------------------
def _cmd_annotators(args: argparse.Namespace) -> int:
    """``fkpd annotators invite|revoke|list|mode``: who may label a project."""
    from fkpd.store import Store
    from fkpd.studio.identity import create_invite, invite_link

    with Store(args.database_url, args.artifact_dir) as store:
        project = store.get_project(args.project)
        if args.annotators_cmd == "invite":
            invite = create_invite(store, project, args.name)
            print(invite_link(args.base_url, invite.token))
            mode = "" if project.identity == "invite" else (
                f" (project {project.name!r} is in open mode: switch with `fkpd annotators mode invite --project "
                f"{project.name}`)")
            print(f"invite link for {invite.annotator!r} in project {project.name!r}; it is shown only once{mode}",
                  file=sys.stderr)
        elif args.annotators_cmd == "revoke":
            n = store.revoke_invites(project.id, args.name)
            print(f"revoked {n} invite link(s) of {args.name!r} in project {project.name!r}")
        elif args.annotators_cmd == "list":
            print(f"project {project.name!r}: identity mode {project.identity}")
            for inv in store.list_invites(project.id):
                state = "valid" if inv.active else f"revoked {inv.revoked_at:%Y-%m-%d %H:%M}"
                print(f"  invite {inv.id:>4}  {inv.annotator:<24} created {inv.created_at:%Y-%m-%d %H:%M}  {state}")
        else:
            store.update_project(project.id, identity=args.mode)
            print(f"project {project.name!r} is now in {args.mode} mode")
    return 0


def _add_annotator_parsers(sub) -> None:
    ann = sub.add_parser("annotators", help="who may label a project: invite links and identity mode")
    cmds = ann.add_subparsers(dest="annotators_cmd", required=True)
    s = cmds.add_parser("invite", help="create an invite link for an annotator (registered if new)")
    s.add_argument("name")
    s.add_argument("--base-url", default="http://localhost:8501", help="the app's address as annotators reach it")
    s = cmds.add_parser("revoke", help="revoke every invite link of an annotator")
    s.add_argument("name")
    cmds.add_parser("list", help="the project's identity mode and invite links")
    s = cmds.add_parser("mode", help="switch the project between invite links and open names")
    s.add_argument("mode", choices=("invite", "open"))
    for s in cmds.choices.values():
        s.add_argument("--project", required=True, help="project name in the preference store")
        s.add_argument("--database-url", default=None, help="default: $FKPD_DATABASE_URL or labels/fkpd.sqlite")
        s.add_argument("--artifact-dir", default=None, help="default: $FKPD_ARTIFACT_DIR or labels/artifacts")
        s.set_defaults(fn=_cmd_annotators)
# ---- end of the annotators block ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from fkpd.policy import PolicyConfig
    from fkpd.train.bc import BCConfig

    p = argparse.ArgumentParser(prog="fkpd", description="FKPD Studio: align diffusion policies to preferences")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("tasks", help="list task ids")
    s.set_defaults(fn=_cmd_tasks)

    data = sub.add_parser("data", help="offline datasets").add_subparsers(dest="data_cmd", required=True)
    s = data.add_parser("generate", help="roll out perturbed scripted policies into a D4RL HDF5 file")
    s.add_argument("--task", default=DEFAULT_TASK)
    s.add_argument("--episodes", type=int, default=100)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-episode-steps", type=int, default=None)
    s.add_argument("--clean", action="store_true", help="unperturbed scripted policy (no noise)")
    s.set_defaults(fn=_cmd_data_generate)
    s = data.add_parser("info", help="summarise a dataset")
    s.add_argument("file", help="HDF5 file, D4RL dataset name (D4RL's cache directory) or minari:DATASET_ID")
    s.add_argument("--task", default=None, help="also check dimensions against this task")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_data_info)
    s = data.add_parser("import", help="write a locally present Minari dataset as a D4RL-layout HDF5 file")
    s.add_argument("source", help="minari:DATASET_ID")
    s.add_argument("--out", required=True)
    s.add_argument("--task", default=None, help="check dimensions against this task and record it")
    s.add_argument("--obs-key", default=None, help="entry of dict observations to use (default: observation)")
    s.set_defaults(fn=_cmd_data_import)

    s = sub.add_parser("train-bc", help="behaviour cloning of a diffusion policy")
    add_dataclass_args(s, BCConfig)
    add_dataclass_args(s, PolicyConfig, skip=("obs_dim", "action_dim"))
    s.set_defaults(fn=_cmd_train_bc)

    s = sub.add_parser("eval", help="evaluate a checkpoint: success rate, return, clips")
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
    s.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("pipeline", help="data -> BC -> evaluation -> clips on one task")
    s.add_argument("--out", default="runs")
    s.add_argument("--episodes", type=int, default=100, help="dataset episodes")
    s.add_argument("--eval-episodes-final", type=int, default=50)
    s.add_argument("--n-videos", type=int, default=4)
    add_dataclass_args(s, BCConfig, skip=("dataset", "out_dir"))
    add_dataclass_args(s, PolicyConfig, skip=("obs_dim", "action_dim"))
    s.set_defaults(fn=_cmd_pipeline, task=DEFAULT_TASK)

    _add_alignment_parsers(sub)  # fkpd align, fkpd loop

    s = sub.add_parser("worker", help="run background jobs (bootstrap, alignment rounds) from the preference store")
    s.add_argument("--database-url", default=None, help="default: $FKPD_DATABASE_URL or labels/fkpd.sqlite")
    s.add_argument("--artifact-dir", default=None, help="default: $FKPD_ARTIFACT_DIR or labels/artifacts")
    s.add_argument("--once", action="store_true", help="run at most one job, then exit")
    s.add_argument("--poll-s", type=float, default=1.0, help="seconds between polls of an empty queue")
    s.add_argument("--stale-after-s", type=float, default=120.0,
                   help="requeue/fail running jobs whose heartbeat is older than this")
    s.add_argument("--max-attempts", type=int, default=2,
                   help="a job whose worker died is requeued until it has run this many times (the "
                        "bootstrap and alignment-round handlers are safe to re-run)")
    s.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 leaves a core free on a shared machine)")
    s.add_argument("--parent-pid", type=int, default=0,
                   help="stop (after the current job) when this process exits; the app passes its own pid")
    s.add_argument("--sweep-grace-s", type=float, default=3600.0,
                   help="while idle, remove temporary files of killed writes and clip files no row names once "
                        "older than this (0: never sweep)")
    s.set_defaults(fn=_cmd_worker)

    labels = sub.add_parser("labels", help="preference labels").add_subparsers(dest="labels_cmd", required=True)
    s = labels.add_parser("import", help="import Preference Transformer / Uni-RLHF human labels over a D4RL dataset")
    s.add_argument("labels", help="labels file, or the published folder (PT: human_label/<dataset>/; Uni-RLHF: "
                                  "<dataset>_human_labels/)")
    s.add_argument("--dataset", required=True, help="the D4RL dataset the indices refer to: a file, a D4RL dataset "
                                                    "name (D4RL's cache directory) or minari:DATASET_ID")
    s.add_argument("--project", required=True, help="project name in the preference store")
    s.add_argument("--segment-length", type=int, default=None,
                   help="L (default: from the file names, _q<L> or _len_<L>; PT's D4RL labels: 100)")
    s.add_argument("--indices-file", default=None, help="first segments' start indices (labels-only file)")
    s.add_argument("--indices-2-file", default=None, help="second segments' start indices (labels-only file)")
    s.add_argument("--index-space", choices=("qlearning", "rows"), default="qlearning",
                   help="qlearning: rows of d4rl.qlearning_dataset, as PT and Uni-RLHF index; rows: file rows")
    s.add_argument("--annotator", default=None, help="default: imported:<labels file>")
    s.add_argument("--round", type=int, default=0)
    s.add_argument("--no-check-episode-bounds", action="store_true",
                   help="import segments that run across an episode end")
    s.add_argument("--database-url", default=None, help="default: $FKPD_DATABASE_URL or labels/fkpd.sqlite")
    s.add_argument("--artifact-dir", default=None, help="default: $FKPD_ARTIFACT_DIR or labels/artifacts")
    s.set_defaults(fn=_cmd_labels_import)
    _add_annotator_parsers(sub)  # fkpd annotators invite|revoke|list|mode
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "task", None) is None and args.cmd == "pipeline":
        args.task = DEFAULT_TASK
    try:
        return int(args.fn(args) or 0)
    except FKPDError as exc:
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # one line, whatever a library wrote
        return 2
    except KeyboardInterrupt:
        print("interrupted; checkpoints written so far are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
