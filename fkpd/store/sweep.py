"""Sweeping the artifact directory: what killed writers and killed jobs leave behind.

Writers never leave a partial file under a final name (:func:`fkpd.io.atomic_path`), but a
writer killed mid-write leaves its temporary file, ``.<name>.<random>.part<suffix>``, and a
job or an import killed between writing clip files and registering them leaves files no
row names. :func:`sweep_artifacts` removes, once they are older than a grace period:

* **temporary files**: any ``.*.part*`` file of :func:`fkpd.io.atomic_path` anywhere
  under the artifact directory;
* **unregistered clip files**: ``.npz`` / ``.mp4`` files under a batch folder
  (``projects/<id>/batches/<batch>/``) or an import folder (``imported/<id>/...``) that
  no clip row names, judged per folder: a folder is only swept when *every* file in it
  is older than the grace period, so a batch being rendered right now is never touched;
  emptied folders are removed.

Nothing else is touched: datasets, BC state and checkpoints (which jobs resume from),
compare videos, exports. Every removal is logged (``fkpd.store.sweep``, INFO) and
returned. The worker runs it while idle (:class:`fkpd.store.worker.Worker`).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from sqlalchemy import select

from fkpd.store import models as m

if TYPE_CHECKING:
    from fkpd.store.store import Store

log = logging.getLogger(__name__)

#: Default age (seconds) after which a temporary or unregistered file is swept.
DEFAULT_GRACE_S = 3600.0
#: The temporary files of :func:`fkpd.io.atomic_path`: ``.<name>.<mkstemp random>.part<suffix>``.
PART_FILE = re.compile(r"^\..+\.part(\.[^./]*)?$")
#: Folders holding clip files, relative to the artifact directory.
CLIP_FOLDERS = ("projects/*/batches/*", "imported/*")
CLIP_SUFFIXES = (".npz", ".mp4")


@dataclass
class SweepReport:
    """What one sweep removed (paths relative to the artifact directory)."""

    part_files: list[str] = field(default_factory=list)
    unregistered: list[str] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)

    @property
    def removed(self) -> int:
        """Files removed."""
        return len(self.part_files) + len(self.unregistered)


def _age_s(path: Path, now: float) -> float | None:
    try:
        return now - path.lstat().st_mtime
    except FileNotFoundError:
        return None


def _remove(path: Path, root: Path, why: str, age_s: float) -> str | None:
    rel = path.relative_to(root).as_posix()
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("sweep: could not remove %s (%s): %s", rel, why, exc)
        return None
    log.info("sweep: removed %s (%s, %.1f h old)", rel, why, age_s / 3600)
    return rel


def _registered(store: "Store") -> set[str]:
    """Every segment and video path clip rows name."""
    with store.session() as s:
        rows = s.execute(select(m.Clip.segment_path, m.Clip.video_path)).all()
    return {p for row in rows for p in row if p}


def _clip_folders(root: Path) -> Iterable[Path]:
    for pattern in CLIP_FOLDERS:
        for folder in root.glob(pattern):
            if folder.is_dir() and not folder.is_symlink():
                yield folder


def sweep_artifacts(store: "Store", grace_s: float = DEFAULT_GRACE_S, *, now: float | None = None) -> SweepReport:
    """Remove stale temporary files and unregistered clip files (see the module docstring).

    Args:
        store: the store whose artifact directory is swept.
        grace_s: minimum age (from the file's modification time), seconds; > 0.
        now: the current time as ``time.time()`` (tests pass a later one).

    Returns:
        What was removed.

    Raises:
        ValueError: ``grace_s`` ≤ 0.
    """
    if not grace_s > 0:
        raise ValueError(f"grace_s must be > 0, got {grace_s!r}")
    now = time.time() if now is None else now
    root = store.artifact_dir
    report = SweepReport()
    if not root.is_dir():
        return report
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            if PART_FILE.match(name):
                path = Path(dirpath, name)
                age = _age_s(path, now)
                if age is not None and age > grace_s:
                    rel = _remove(path, root, "temporary file of an interrupted write", age)
                    if rel:
                        report.part_files.append(rel)
    folders = list(_clip_folders(root))
    if folders:
        registered = _registered(store)
        for folder in folders:
            _sweep_folder(folder, root, registered, grace_s, now, report)
    return report


def _sweep_folder(folder: Path, root: Path, registered: set[str], grace_s: float, now: float,
                  report: SweepReport) -> None:
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    ages = [_age_s(p, now) for p in files]
    if any(a is None or a <= grace_s for a in ages):
        return  # something in it is recent: a batch or an import may still be writing here
    for path, age in zip(files, ages):
        if path.suffix in CLIP_SUFFIXES and path.relative_to(root).as_posix() not in registered:
            rel = _remove(path, root, "clip file no row names (a batch or import that was cut off)", age or 0.0)
            if rel:
                report.unregistered.append(rel)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        _rmdir(sub, root, report)
    _rmdir(folder, root, report)


def _rmdir(folder: Path, root: Path, report: SweepReport) -> None:
    try:
        folder.rmdir()  # only if empty
    except OSError:
        return
    report.folders.append(folder.relative_to(root).as_posix())
