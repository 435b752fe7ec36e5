"""The Label page's logic: pairs with their videos for the browser, and its answers.

* :func:`lease_for_display` — the current pair and the prefetched next one, with their
  videos checked; a pair whose video is missing or corrupt is set aside
  (:meth:`Store.retire_pair`) and reported instead of crashing the page.
* :func:`record_answers` — answers sent by the browser, stored idempotently.

No function here takes a filesystem path from the browser: videos are read from the
artifact directory by clip id (:meth:`Store.resolve` refuses paths that escape it).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from fkpd.store import (
    AnnotatorInfo,
    ClipView,
    NotFoundError,
    PairUnavailableError,
    PairView,
    ProjectInfo,
    Store,
    StoreInputError,
)
from fkpd.studio.config import OUTCOMES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DisplayPair:
    """A leased pair ready for the browser: both videos as base64 MP4."""

    id: int
    round: int
    policy_version_id: int
    left_clip: int
    right_clip: int
    left_b64: str
    right_b64: str

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "round": self.round, "version": self.policy_version_id,
                "left": {"clip": self.left_clip, "b64": self.left_b64},
                "right": {"clip": self.right_clip, "b64": self.right_b64}}


@lru_cache(maxsize=64)
def _video_b64(path: str, sha256: str | None, mtime_ns: int, size: int) -> str:
    """Base64 of a verified video file (cached per file version)."""
    data = Path(path).read_bytes()
    if sha256 is not None:
        import hashlib

        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("its content does not match the checksum recorded when it was rendered")
    return base64.b64encode(data).decode("ascii")


def clip_video_b64(clip: ClipView) -> str:
    """The clip's MP4 as base64, checked against its recorded sha256.

    Raises:
        FileNotFoundError: the clip has no video, or the file is gone.
        ValueError: the file changed since it was registered.
    """
    if clip.video_file is None:
        raise FileNotFoundError(f"clip {clip.id} has no video")
    path = Path(clip.video_file)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"the video of clip {clip.id} is missing ({path.name})") from None
    try:
        return _video_b64(str(path), clip.video_sha256, st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        raise FileNotFoundError(f"the video of clip {clip.id} is missing ({path.name})") from None


def lease_for_display(store: Store, project: ProjectInfo, annotator: AnnotatorInfo,
                      count: int = 2) -> tuple[list[DisplayPair], list[str]]:
    """The pair to show now and the next one (prefetched), with their videos.

    A pair whose video is missing or corrupt is retired (never offered again, to anyone)
    and reported in the returned notices; the next pair takes its place.

    Returns:
        ``(pairs, notices)``: up to ``count`` pairs, and one message per pair set aside.
    """
    notices: list[str] = []
    for _ in range(100):  # each pass retires at least one bad pair, or returns
        leased: list[PairView] = store.lease_pairs(project.id, annotator.id, count)
        good: list[DisplayPair] = []
        bad = False
        for pair in leased:
            try:
                left, right = clip_video_b64(pair.left), clip_video_b64(pair.right)
            except (OSError, ValueError) as exc:
                store.retire_pair(pair.id)
                notices.append(f"Pair {pair.id} was set aside and skipped: {exc}. Tell whoever runs the project; "
                               "the other pairs are unaffected.")
                log.warning("retired pair %s: %s", pair.id, exc)
                bad = True
                continue
            good.append(DisplayPair(pair.id, pair.round, pair.policy_version_id, pair.left.id, pair.right.id,
                                    left, right))
        if not bad:
            return good, notices
    return good, notices


def record_answers(store: Store, annotator: AnnotatorInfo, answers: Iterable[Mapping[str, Any]],
                   recorded: set[int]) -> list[str]:
    """Store answers sent by the browser, each at most once.

    Args:
        store: the store.
        annotator: who answered.
        answers: ``{"pair": id, "outcome": "left"|"right"|"equal"|"skip", "shown_ms": epoch
            ms}`` objects, in the order given (the browser keeps every answer of the
            session until the page reloads, so they arrive again on every rerun).
        recorded: pair ids already stored in this browser session; updated in place. The
            store is idempotent per (pair, annotator) as well, so a repeat is harmless.

    Returns:
        Messages for answers that could not be stored (a pair that was retired or filled
        by someone else meanwhile, a malformed entry).
    """
    problems = []
    for item in answers or ():
        try:
            pair_id = int(item["pair"])
            outcome = str(item["outcome"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"ignored a malformed answer {item!r}")
            continue
        if pair_id in recorded:
            continue
        if outcome not in OUTCOMES:
            problems.append(f"ignored answer {outcome!r} for pair {pair_id}")
            recorded.add(pair_id)
            continue
        shown = item.get("shown_ms")
        shown_at = (datetime.fromtimestamp(float(shown) / 1000.0, tz=timezone.utc)
                    if isinstance(shown, (int, float)) and shown > 0 else None)
        try:
            store.answer(pair_id, annotator.id, outcome, shown_at=shown_at)
        except (PairUnavailableError, NotFoundError, StoreInputError) as exc:
            problems.append(f"your answer to pair {pair_id} was not stored: {exc}")
        recorded.add(pair_id)
    return problems


__all__ = ["DisplayPair", "clip_video_b64", "lease_for_display", "record_answers"]
