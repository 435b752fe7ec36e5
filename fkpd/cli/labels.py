"""``fkpd labels import`` (published human labels into a project) and ``fkpd prefs export``
(a project's comparisons as a file, the Data page's download).

``fkpd prefs export`` writes the bytes of :func:`fkpd.studio.export_bytes`, the function
behind the Data page's download, for the same filters: the layouts (Parquet: one row
per comparison with both segments; HDF5: ``/comparisons/<column>`` and
``/segments/<clip_id>/``) are documented in :mod:`fkpd.store.export` and read back by
:func:`fkpd.store.export.load_export`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from fkpd.cli.common import add_store_args, command, open_store
from fkpd.errors import FKPDError

FORMATS = {"parquet": (".parquet", ".pq"), "hdf5": (".h5", ".hdf5")}


def _cmd_labels_import(args: argparse.Namespace) -> int:
    """Import Preference Transformer / Uni-RLHF labels into a project of the preference store."""
    from fkpd.prefs.importers import cli_message, import_pt_labels

    with open_store(args) as store:
        created = None
        if args.create_project:
            created = _ensure_project(store, args)
        try:
            summary = import_pt_labels(
                store, args.project, args.dataset, args.labels, indices_file=args.indices_file,
                indices_2_file=args.indices_2_file, segment_length=args.segment_length, annotator=args.annotator,
                round=args.round, check_episode_bounds=not args.no_check_episode_bounds, index_space=args.index_space)
        except FKPDError as exc:  # name the keyword arguments as this command's flags
            note = (f" (project {args.project!r} was created and stays, its bootstrap queued; run this command again "
                    "once the labels are fixed)") if created else ""
            message = cli_message(str(exc)).replace(
                "create it with Store.create_project",
                f"pass --create-project TASK to create it (or `fkpd projects create {args.project} --task TASK`)")
            raise FKPDError(message + note) from None
    if created is not None:
        project, job = created
        print(f"created project {project.name!r} (task {project.task_id}); its bootstrap (job {job.id}) trains on "
              f"{args.dataset} once a worker runs it (fkpd worker)")
    print(f"imported {summary.n_comparisons} comparisons ({summary.n_clips} segments of {summary.segment_length} "
          f"steps from {summary.dataset}, indices as {summary.index_space} rows) into project {args.project!r} "
          f"as annotator {summary.annotator!r}; {summary.n_skipped_identical} queries compared a segment with itself "
          "and were skipped")
    return 0


def _ensure_project(store, args: argparse.Namespace):
    """``--create-project TASK``: the project of ``--project``, created for TASK (with
    its bootstrap on ``--dataset``) unless it exists. Returns ``(project, job)`` when it
    was created now, else None.

    Raises:
        FKPDError: the project exists with another task.
    """
    from fkpd.cli.projects import create_project

    existing = {p.name: p for p in store.list_projects()}
    name = args.project.strip()
    if name in existing:
        if existing[name].task_id != args.create_project:
            raise FKPDError(f"--create-project {args.create_project}: project {name!r} exists already, with task "
                            f"{existing[name].task_id}; import into it without --create-project, or name a new "
                            "project with --project")
        return None
    dataset = args.dataset
    if Path(dataset).expanduser().exists():  # the worker may run elsewhere: an absolute path
        dataset = str(Path(dataset).expanduser().resolve())
    return create_project(store, args, name, args.create_project, bootstrap={"dataset": dataset})


def _export_format(fmt: str | None, out: Path) -> str:
    """``--format``, or the format ``--out``'s suffix names.

    Raises:
        FKPDError: no format and an unknown suffix, or a suffix of the other format.
    """
    suffix = out.suffix.lower()
    named = next((name for name, suffixes in FORMATS.items() if suffix in suffixes), None)
    if fmt is None:
        if named is None:
            raise FKPDError(f"--out {str(out)!r}: pass --format parquet or --format hdf5 (or name the file *.parquet "
                            "or *.h5)")
        return named
    if named is not None and named != fmt:
        raise FKPDError(f"--out {str(out)!r} names a {named} file but --format is {fmt}; name an {fmt} export "
                        f"*{FORMATS[fmt][0]} (load_export reads the format from the name)")
    return fmt


def _check_filters(frame, project: str, rounds: Sequence[int] | None, annotators: Sequence[str] | None) -> None:
    """Every ``--rounds`` / ``--annotators`` value matches some comparison of the project.

    Raises:
        FKPDError: a value without any comparison (the message lists the ones there are).
    """
    for option, column, wanted in (("--rounds", "round", rounds), ("--annotators", "annotator", annotators)):
        have = sorted(set(frame[column].tolist()))
        missing = [w for w in wanted or () if w not in have]
        if missing:
            listed = ", ".join(map(str, have)) if have else "none yet"
            raise FKPDError(f"{option} {' '.join(map(str, missing))}: project {project!r} has no comparison "
                            f"{'in that round' if column == 'round' else 'by that annotator'} (there are "
                            f"comparisons {'in rounds' if column == 'round' else 'by'}: {listed})")


def _cmd_prefs_export(args: argparse.Namespace) -> int:
    """The project's comparisons (of ``--rounds`` by ``--annotators``) with their
    segments, as the Data page's download writes them."""
    from fkpd.io import atomic_path
    from fkpd.studio import export_bytes

    out = Path(args.out).expanduser()
    if out.is_dir():
        raise FKPDError(f"--out {str(out)!r} is a folder; give a file name such as {out / 'comparisons.parquet'}")
    fmt = _export_format(args.format, out)
    with open_store(args) as store:
        project = store.get_project(args.project)
        frame = store.comparisons_frame(project.id)
        _check_filters(frame, project.name, args.rounds, args.annotators)
        blob = export_bytes(store, project, fmt, rounds=args.rounds, annotators=args.annotators,
                            include_excluded=args.excluded == "include")
        excluded = [e.annotator for e in store.excluded_annotators(project.id)]
    if args.rounds:
        frame = frame[frame["round"].isin(args.rounds)]
    if args.annotators:
        frame = frame[frame["annotator"].isin(args.annotators)]
    if args.excluded == "omit":
        frame = frame[~frame["annotator"].isin(excluded)]
    try:
        with atomic_path(out) as tmp:
            tmp.write_bytes(blob)
    except OSError as exc:
        raise FKPDError(f"--out {str(out)!r} cannot be written: {exc}") from None
    which = "".join([f", rounds {', '.join(map(str, args.rounds))}" if args.rounds else "",
                     f", annotators {', '.join(args.annotators)}" if args.annotators else "",
                     f", without excluded annotators ({', '.join(excluded)})" if args.excluded == "omit" and excluded
                     else ""])
    print(f"wrote {len(frame)} comparisons of project {project.name!r}{which} to {out} ({fmt}, "
          f"{len(blob) / 1e6:.2f} MB)")
    return 0


def add_parsers(sub) -> None:
    """``fkpd labels import`` and ``fkpd prefs export``."""
    labels = sub.add_parser("labels", help="preference labels").add_subparsers(dest="labels_cmd", required=True)
    s = command(labels, "import", _cmd_labels_import,
                "import Preference Transformer / Uni-RLHF human labels over a D4RL dataset")
    s.add_argument("labels", help="labels file, or the published folder (PT: human_label/<dataset>/; Uni-RLHF: "
                                  "<dataset>_human_labels/)")
    s.add_argument("--dataset", required=True, help="the D4RL dataset the indices refer to: a file, a D4RL dataset "
                                                    "name (D4RL's cache directory) or minari:DATASET_ID")
    s.add_argument("--project", required=True, help="project name in the preference store")
    s.add_argument("--create-project", default=None, metavar="TASK",
                   help="create the project for this task id (fkpd tasks) when it does not exist, as `fkpd projects "
                        "create` does, with its bootstrap trained on --dataset")
    s.add_argument("--identity", choices=("invite", "open"), default="invite",
                   help="with --create-project: how annotators are known (invite links, or names they type)")
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
    add_store_args(s)

    prefs = sub.add_parser("prefs", help="a project's preference data").add_subparsers(dest="prefs_cmd",
                                                                                      required=True)
    s = command(prefs, "export", _cmd_prefs_export,
                "write a project's comparisons with their segments as Parquet or HDF5 (the Data page's download)")
    s.add_argument("--project", required=True, help="project name in the preference store")
    s.add_argument("--format", choices=tuple(FORMATS), default=None,
                   help="parquet or hdf5 (default: from --out's suffix, .parquet / .h5)")
    s.add_argument("--out", required=True, help="the file to write (replaced atomically)")
    s.add_argument("--rounds", type=int, nargs="+", default=None, metavar="N",
                   help="only comparisons of these rounds (default: all)")
    s.add_argument("--annotators", nargs="+", default=None, metavar="NAME",
                   help="only comparisons by these annotators (default: all)")
    s.add_argument("--excluded", choices=("include", "omit"), default="include",
                   help="comparisons of annotators an admin excluded from training (Data page): include them (the "
                        "default: the store keeps them) or omit them (the training set of the next round)")
    add_store_args(s)
