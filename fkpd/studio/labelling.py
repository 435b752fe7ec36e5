"""The Label page's logic: pairs with their videos for the browser, and its answers.

* :func:`lease_for_display` — the current pair and the prefetched next one, with their
  videos checked; a pair whose video is missing or corrupt is set aside
  (:meth:`Store.retire_pair`) and reported instead of crashing the page.
* :func:`record_answers` — answers sent by the browser, each checked on its own
  (a malformed one is skipped and logged, never raised) and stored idempotently, only
  for pairs leased to that annotator in that project, and only after the project's
  minimum viewing time (:class:`LabelQuality`), checked again on the server's clock.
* :class:`LabelQuality` — a project's label-quality settings (minimum viewing time, gold
  share and margin), read with :meth:`LabelQuality.of`, changed with
  :func:`set_label_quality`; :func:`set_assignment` changes who answers what (labels per
  pair, second opinions, lease time).

No function here takes a filesystem path from the browser: videos are read from the
artifact store by clip id (paths that escape it are refused). With a remote store
(``FKPD_ARTIFACT_URL``) the bytes come through :meth:`ArtifactStore.read_bytes`, from
the local read-through cache keyed by sha256 after the first time, and reach the player
as data, as local videos do.
"""

from __future__ import annotations

import base64
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from fkpd.store import (
    AnnotatorInfo,
    ArtifactIntegrityError,
    ArtifactStore,
    ClipView,
    NotLeasedError,
    PairView,
    ProjectInfo,
    Store,
    StoreError,
)
from fkpd.studio.config import OUTCOMES, StudioError

log = logging.getLogger(__name__)


#: Project settings of label quality (issue #13); see :class:`LabelQuality`.
MIN_VIEW_SECONDS = "min_view_seconds"
GOLD_SHARE = "gold_share"
GOLD_RETURN_MARGIN = "gold_return_margin"
#: Longest minimum viewing time accepted (seconds).
MAX_MIN_VIEW_SECONDS = 60.0


@dataclass(frozen=True)
class LabelQuality:
    """A project's label-quality settings (project settings of the same names; a missing
    one takes its default).

    Attributes:
        min_view_seconds: an answer (left, right, equal) counts only once both clips
            have played this long, or one full loop of the longer clip if that is
            shorter; 0 turns the minimum off. The player refuses earlier presses with a
            hint, and the server refuses earlier answers on its own clock
            (:meth:`fkpd.store.Store.answer`). 0..60 s, default 1.5.
        gold_share: fraction of each new batch's pairs made gold pairs (answer clear from
            ground truth, :meth:`fkpd.store.Store.mark_gold_pairs`), 0..1, default 0.05.
        gold_return_margin: relative return margin that makes a pair clear when success
            does not: ``|R_l − R_r| ≥ margin · max(|R_l|, |R_r|)``; ≥ 0, default 0.5
            (one clip earned at least twice the other's return).

    Raises (on creation):
        StudioError: a value out of its range, or not a number.
    """

    min_view_seconds: float = 1.5
    gold_share: float = 0.05
    gold_return_margin: float = 0.5

    def __post_init__(self) -> None:
        for name, hi in ((MIN_VIEW_SECONDS, MAX_MIN_VIEW_SECONDS), (GOLD_SHARE, 1.0), (GOLD_RETURN_MARGIN, 1e9)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= hi:
                raise StudioError(f"{name} must be a number from 0 to {hi:g}, got {value!r:.40}")
            object.__setattr__(self, name, float(value))

    @classmethod
    def of(cls, project: ProjectInfo) -> "LabelQuality":
        """The settings of ``project`` (a fresh :class:`ProjectInfo`: the app's cached one
        predates changes an admin made since).

        Raises:
            StudioError: a stored value is out of range.
        """
        settings = project.settings or {}
        return cls(**{name: settings[name] for name in (MIN_VIEW_SECONDS, GOLD_SHARE, GOLD_RETURN_MARGIN)
                      if settings.get(name) is not None})

    def as_settings(self) -> dict[str, float]:
        """The project settings these values are stored as."""
        return {MIN_VIEW_SECONDS: self.min_view_seconds, GOLD_SHARE: self.gold_share,
                GOLD_RETURN_MARGIN: self.gold_return_margin}


def set_label_quality(store: Store, project: ProjectInfo, **values: float) -> LabelQuality:
    """Change some of a project's label-quality settings (the Data page's admin form).

    Args:
        values: ``min_view_seconds``, ``gold_share`` and/or ``gold_return_margin``.

    Raises:
        StudioError: an unknown setting or a value out of range (nothing is changed).
    """
    unknown = sorted(set(values) - {MIN_VIEW_SECONDS, GOLD_SHARE, GOLD_RETURN_MARGIN})
    if unknown:
        raise StudioError(f"unknown label-quality setting(s) {unknown}; known: {MIN_VIEW_SECONDS}, {GOLD_SHARE}, "
                          f"{GOLD_RETURN_MARGIN}")
    current = LabelQuality.of(store.get_project(project.id))
    quality = LabelQuality(**{**current.as_settings(), **values})
    store.update_project(project.id, settings=quality.as_settings())
    return quality


#: The store's assignment settings an admin may change from the Data page
#: (:data:`fkpd.store.core.DEFAULT_SETTINGS`, checked by the store).
ASSIGNMENT_SETTINGS = ("labels_per_pair", "second_opinions", "lease_seconds")


def set_assignment(store: Store, project: ProjectInfo, **values: float) -> dict[str, Any]:
    """Change who answers what in a project (the Data page's admin form): answers that
    complete a pair, second opinions a completed pair may take beyond them, and how long
    a leased pair stays reserved (:meth:`fkpd.store.Store.lease_pairs`). They apply to
    the next leases; answers already stored are kept.

    Args:
        values: ``labels_per_pair`` (int ≥ 1), ``second_opinions`` (int ≥ 0) and/or
            ``lease_seconds`` (seconds, > 0). Whole floats are taken as ints.

    Returns:
        The project's three assignment settings after the change.

    Raises:
        StudioError: an unknown setting or a value out of range (nothing is changed).
    """
    unknown = sorted(set(values) - set(ASSIGNMENT_SETTINGS))
    if unknown:
        raise StudioError(f"unknown assignment setting(s) {unknown}; known: {', '.join(ASSIGNMENT_SETTINGS)}")
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if key != "lease_seconds" and isinstance(value, float) and value.is_integer():
            value = int(value)
        clean[key] = value
    try:
        info = store.update_project(project.id, settings=clean)
    except StoreError as exc:
        raise StudioError(f"{exc}; the settings were not changed") from exc
    return {k: info.settings[k] for k in ASSIGNMENT_SETTINGS}


def mark_gold(store: Store, project: ProjectInfo, pair_ids: Iterable[int]) -> dict[int, str]:
    """Make a share of a new batch's pairs gold pairs, per the project's settings
    (:class:`LabelQuality`; :meth:`fkpd.store.Store.mark_gold_pairs`). Called when a batch
    or top-up is registered (:func:`fkpd.studio.batches.render_batch`). A bad setting or a
    store error is logged, never raised: the batch stays labelable without gold pairs.

    Returns:
        ``{pair_id: expected outcome}`` of the pairs marked.
    """
    ids = list(pair_ids)
    if not ids:
        return {}
    try:
        quality = LabelQuality.of(store.get_project(project.id))
        gold = store.mark_gold_pairs(project.id, ids, share=quality.gold_share,
                                     return_margin=quality.gold_return_margin)
    except (StoreError, StudioError) as exc:
        log.warning("project %s: no gold pairs marked among pairs %s..%s: %s", project.name, ids[0], ids[-1], exc)
        return {}
    log.info("project %s: %d gold pair(s) among %d new pair(s)", project.name, len(gold), len(ids))
    return gold


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


@lru_cache(maxsize=64)
def _remote_video_b64(artifacts: ArtifactStore, relpath: str, sha256: str) -> str:
    """Base64 of a video read through a remote store, verified (cached per sha256)."""
    return base64.b64encode(artifacts.read_bytes(relpath, sha256)).decode("ascii")


def clip_video_b64(clip: ClipView, artifacts: ArtifactStore | None = None) -> str:
    """The clip's MP4 as base64, checked against its recorded sha256.

    Args:
        artifacts: the store's artifacts (``Store.artifacts``); needed when they are
            remote (the clip then has no local ``video_file``).

    Raises:
        FileNotFoundError: the clip has no video, or the file is gone.
        ValueError: the file changed since it was registered.
        ArtifactUnavailableError: a remote store cannot be reached (nothing is wrong
            with the clip).
    """
    if artifacts is not None and not artifacts.is_local and clip.video_path is not None:
        try:
            if clip.video_sha256 is None:
                return base64.b64encode(artifacts.read_bytes(clip.video_path)).decode("ascii")
            return _remote_video_b64(artifacts, clip.video_path, clip.video_sha256)
        except ArtifactIntegrityError as exc:
            raise ValueError(f"the video of clip {clip.id}: {exc}") from None
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
    unshowable: set[int] = set()  # completed pairs (second opinions) that cannot be shown: not retired
    for _ in range(100):  # each pass retires (or leaves out) at least one bad pair, or returns
        leased: list[PairView] = store.lease_pairs(project.id, annotator.id, count, exclude=unshowable)
        good: list[DisplayPair] = []
        bad = False
        for pair in leased:
            try:
                left, right = clip_video_b64(pair.left, store.artifacts), clip_video_b64(pair.right, store.artifacts)
            except (OSError, ValueError) as exc:
                if not store.retire_pair(pair.id):  # a completed pair keeps its answers and status
                    store.release(pair.id, annotator.id)
                    unshowable.add(pair.id)
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


def batch_caption(store: Store, project: ProjectInfo, pair: DisplayPair) -> str:
    """The Label page's progress line for the pair on screen, naming its version as the
    Rounds page does: ``Clips of v1 (round 0): 3 of 24 answers`` (the pair's round: its
    batch and top-up pairs; the clips of version v of round r are labelled to train round
    r + 1).

    Raises:
        NotFoundError: the pair's version is gone.
    """
    version = store.get_policy_version(pair.policy_version_id)
    answered, total = store.batch_progress(project.id, pair.round)
    return f"Clips of v{version.id} (round {version.round}): {answered} of {total} answers"


#: Largest pair id an answer may name (the store's row ids are 32-bit).
MAX_PAIR_ID = 2**31 - 1
#: ``shown_ms`` must fall between these epoch milliseconds (2000-01-01 and 2200-01-01).
SHOWN_MS_RANGE = (946_684_800_000, 7_258_118_400_000)


def parse_answer(item: Any) -> tuple[int, str, datetime | None]:
    """One answer from the browser as ``(pair_id, outcome, shown_at)``.

    Args:
        item: ``{"pair": int, "outcome": "left"|"right"|"equal"|"skip", "shown_ms":
            epoch milliseconds}``; ``shown_ms`` may be missing or null. The player's
            ``viewed_ms`` (how long both clips played) is informational: the minimum
            viewing time is checked on the server's clock (:func:`record_answers`).

    Raises:
        ValueError: not a mapping; a pair id that is not an int in ``[1, 2**31 - 1]``;
            an unknown outcome; a ``shown_ms`` that is not a finite number of epoch ms
            between the years 2000 and 2200.
    """
    if not isinstance(item, Mapping):
        raise ValueError(f"an answer must be an object, got {type(item).__name__}")
    pair_id = item.get("pair")
    if isinstance(pair_id, bool) or not isinstance(pair_id, int) or not 1 <= pair_id <= MAX_PAIR_ID:
        raise ValueError(f"pair must be an integer id between 1 and {MAX_PAIR_ID}, got {pair_id!r:.40}")
    outcome = item.get("outcome")
    if not isinstance(outcome, str) or outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r:.40}")
    shown = item.get("shown_ms")
    if shown is None:
        return pair_id, outcome, None
    if isinstance(shown, bool) or not isinstance(shown, (int, float)) or not math.isfinite(shown) \
            or not SHOWN_MS_RANGE[0] <= shown <= SHOWN_MS_RANGE[1]:
        raise ValueError(f"shown_ms must be epoch milliseconds between the years 2000 and 2200, got {shown!r:.40}")
    return pair_id, outcome, datetime.fromtimestamp(float(shown) / 1000.0, tz=timezone.utc)


def record_answers(store: Store, annotator: AnnotatorInfo, answers: Iterable[Mapping[str, Any]],
                   recorded: set[Any], *, project: ProjectInfo | None = None) -> list[str]:
    """Store answers sent by the browser, each at most once, each checked on its own.

    With ``project`` given, a left/right/equal answer is stored only once the pair has
    been on screen for the project's minimum viewing time (:class:`LabelQuality`,
    counted by the store on the server's clock from when the pair could first be shown,
    :meth:`fkpd.store.Store.answer`), so a request crafted around the player's own check
    is refused (:class:`~fkpd.store.TooEarlyError`, reported, not stored, not retried).

    A malformed answer (a pair id that is not a sane integer, an unknown outcome, a
    ``shown_ms`` that is not a plausible time, an entry that is not an object) is
    skipped and logged; it never raises and never stops the answers after it, which
    matters because the browser resends the whole list on every rerun. An answer for a
    pair not leased to ``annotator`` (or not of ``project``) is refused by the store
    (:class:`~fkpd.store.NotLeasedError`) and logged, and the lease holder's own answer
    is unaffected.

    Args:
        store: the store.
        annotator: who answered.
        answers: ``{"pair": id, "outcome": "left"|"right"|"equal"|"skip", "shown_ms": epoch
            ms}`` objects, in the order given (the browser keeps every answer of the
            session until the page reloads, so they arrive again on every rerun).
        recorded: what this browser session has dealt with (pair ids stored or refused,
            and markers of malformed entries already reported); updated in place. The
            store is idempotent per (pair, annotator) as well, so a repeat is harmless.
        project: the project the page serves; when given, answers for pairs of other
            projects are refused, and its minimum viewing time applies.

    Returns:
        Messages for answers that could not be stored (a pair that was retired, filled
        by someone else meanwhile or not leased to this annotator, a malformed entry),
        each reported once per session. A store failure that may pass (the database
        briefly unreachable) is reported and retried on the next rerun.
    """
    problems = []
    min_view = None
    if project is not None:
        try:
            min_view = LabelQuality.of(store.get_project(project.id)).min_view_seconds
        except Exception:  # noqa: BLE001 - unreadable settings: the default minimum, never none
            log.warning("could not read the label-quality settings of project %s", project.id, exc_info=True)
            min_view = LabelQuality().min_view_seconds
    for item in answers or ():
        try:
            pair_id, outcome, shown_at = parse_answer(item)
        except ValueError as exc:
            marker = ("malformed", repr(item)[:200])
            if marker not in recorded:
                recorded.add(marker)
                log.warning("skipped a malformed answer from annotator %r: %s (%.200r)", annotator.name, exc, item)
                problems.append(f"ignored a malformed answer ({exc})")
            continue
        if pair_id in recorded:
            continue
        try:
            store.answer(pair_id, annotator.id, outcome, shown_at=shown_at,
                         project=None if project is None else project.id,
                         min_view_seconds=min_view or None)
        except NotLeasedError as exc:
            log.warning("refused an answer of annotator %r for pair %s: %s", annotator.name, pair_id, exc)
            problems.append(f"your answer to pair {pair_id} was not stored: {exc}")
        except StoreError as exc:
            problems.append(f"your answer to pair {pair_id} was not stored: {exc}")
        except Exception as exc:  # noqa: BLE001 - e.g. the database briefly unreachable: retry on the next rerun
            log.warning("could not store the answer of %r for pair %s", annotator.name, pair_id, exc_info=True)
            problems.append(f"your answer to pair {pair_id} could not be stored just now ({type(exc).__name__}); "
                            "it is sent again with your next answer")
            continue
        recorded.add(pair_id)
    return problems


__all__ = ["DisplayPair", "GOLD_RETURN_MARGIN", "GOLD_SHARE", "LabelQuality", "MIN_VIEW_SECONDS", "batch_caption",
           "clip_video_b64", "lease_for_display", "mark_gold", "parse_answer", "record_answers",
           "set_label_quality"]
