"""``fkpd report`` and ``fkpd demo``: a project's shareable report and its demo video.

``report`` writes :func:`fkpd.studio.report.build_report`'s page, the file the Rounds
page offers as a download: one HTML file with nothing outside it (rounds table, plots,
label statistics, before/after videos). ``demo`` writes the before/after episodes alone
as one side-by-side MP4 (:func:`fkpd.studio.report.write_demo`). Both reuse the clips of
a finished comparison of the two versions (the Compare page) when there is one, and
render the episodes otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fkpd.cli.common import add_store_args, command, open_store
from fkpd.errors import FKPDError


def _version_id(text: str) -> int:
    """``3`` or ``v3`` -> 3 (argparse type of ``--versions``)."""
    try:
        value = int(text.strip().removeprefix("v"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a policy version id such as 3 or v3 (see fkpd projects "
                                         "show P)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a policy version id (they start at 1)")
    return value


def _out_path(args: argparse.Namespace, suffixes: tuple[str, ...]) -> Path:
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise FKPDError(f"--out {args.out!r} is a directory; give a file name such as {out / ('report' + suffixes[0])}")
    if out.suffix.lower() not in suffixes:
        raise FKPDError(f"--out {args.out!r} must end in {' or '.join(suffixes)}")
    if not out.parent.exists():
        raise FKPDError(f"--out {args.out!r}: the folder {str(out.parent)!r} does not exist; create it first")
    return out


def _project(store, args: argparse.Namespace):
    from fkpd.store import NotFoundError

    try:
        return store.get_project(args.project)
    except NotFoundError as exc:
        raise FKPDError(f"--project {args.project!r}: {exc} (fkpd projects list shows them)") from None


def _checked(fn, *a, **kw):
    """Run ``fn``; a ReportError about the versions starts with ``--versions:`` (the
    counts' ``'episodes'`` / ``'render_size'`` become flags in :func:`fkpd.cli.main`)."""
    from fkpd.studio.report import ReportError

    try:
        return fn(*a, **kw)
    except ReportError as exc:
        raise FKPDError(f"--{exc.about}: {exc}" if exc.about else str(exc)) from None


class _Bar:
    """A tqdm bar for the ``progress(done, total, what)`` callbacks of fkpd.studio.report."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int, what: str) -> None:
        from tqdm.auto import tqdm

        if self.bar is None or self.bar.total != total or self.bar.desc != what:
            self.close()
            self.bar = tqdm(total=total, desc=what, unit="episode", leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _write(write, args: argparse.Namespace, out):
    """``write(store, project, out, ...)`` (:func:`~fkpd.studio.report.write_report` or
    :func:`~fkpd.studio.report.write_demo`) with the command's flags and a progress bar."""
    bar = _Bar()
    try:
        with open_store(args) as store:
            return _checked(write, store, _project(store, args), out, versions=args.versions,
                            episodes=args.episodes, render_size=args.render_size, progress=bar)
    finally:
        bar.close()


def _cmd_report(args: argparse.Namespace) -> int:
    from fkpd.studio.report import write_report

    out = _out_path(args, (".html", ".htm"))
    report = _write(write_report, args, out)
    print(f"wrote {out} ({report.summary()}); one file with nothing outside it: open it in a browser or send it")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fkpd.studio.report import write_demo

    out = _out_path(args, (".mp4",))
    demo = _write(write_demo, args, out)
    c = demo.clips
    print(f"wrote {out} ({demo.n_bytes / 1e6:.2f} MB): {len(c.episodes)} episode(s) of v{c.version_a.id} (left) vs "
          f"v{c.version_b.id} (right) on reset seeds {c.episodes[0].seed}-{c.episodes[-1].seed}, {demo.frames} "
          f"frames of {demo.width}x{demo.height} at {demo.fps} fps ({c.source})")
    return 0


def add_parsers(sub) -> None:
    """Register ``report`` and ``demo``."""
    from fkpd.studio.report import (DEMO_EPISODES, DEMO_RENDER_SIZE, MAX_EPISODES, REPORT_EPISODES,
                                    REPORT_RENDER_SIZE)

    versions_help = ("the two policy versions of the before/after videos, A (left) then B (right), e.g. 1 3 "
                     "(default: the first served version, BC, and the one served now)")
    s = command(sub, "report", _cmd_report,
                "write the project's report: one self-contained HTML file (rounds table, plots, label statistics, "
                "before/after videos)")
    s.add_argument("--project", required=True, help="project name in the preference store")
    s.add_argument("--out", required=True, help="the HTML file to write, e.g. report.html")
    s.add_argument("--versions", nargs=2, type=_version_id, default=None, metavar=("A", "B"), help=versions_help)
    s.add_argument("--episodes", type=int, default=REPORT_EPISODES,
                   help=f"before/after episodes, 0 to {MAX_EPISODES} (0: no videos; default {REPORT_EPISODES})")
    s.add_argument("--render-size", type=int, default=REPORT_RENDER_SIZE,
                   help=f"video frame size in pixels, each side (default {REPORT_RENDER_SIZE}; keeps the file small)")
    add_store_args(s)

    s = command(sub, "demo", _cmd_demo,
                "write the before/after episodes as one side-by-side MP4 (A left, B right, same reset seeds)")
    s.add_argument("--project", required=True, help="project name in the preference store")
    s.add_argument("--versions", nargs=2, type=_version_id, default=None, metavar=("A", "B"), help=versions_help)
    s.add_argument("--episodes", type=int, default=DEMO_EPISODES,
                   help=f"episodes one after another, 1 to {MAX_EPISODES} (default {DEMO_EPISODES})")
    s.add_argument("--render-size", type=int, default=DEMO_RENDER_SIZE,
                   help=f"frame size of each half in pixels (default {DEMO_RENDER_SIZE})")
    s.add_argument("--out", required=True, help="the MP4 file to write, e.g. demo.mp4")
    add_store_args(s)


__all__ = ["add_parsers"]
