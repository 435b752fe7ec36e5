"""Segments, clip pairs and preference files: what annotators and teachers compare.

A *segment* σ = ((s_1, a_1) .. (s_L, a_L)) is a window of L consecutive steps of one
rollout (DESIGN.md §2, "Segment likelihood proxy"). A *pair* is two rollouts of the same
policy version from the same reset seed, with different sampling noise, cut at the same
steps (DESIGN.md §3, "Pairs"), so a comparison isolates the policy's behaviour.

Segment files are ``.npz`` written without pickles (``np.load(..., allow_pickle=False)``
reads them), the format the preference store (:meth:`fkpd.store.ArtifactDir.load_segment`)
also reads:

=================  ==============  ===============================================
key                shape / dtype   meaning
=================  ==============  ===============================================
``observations``   (L, Do) f32     observation before each action
``actions``        (L, Da) f32     action executed
``rewards``        (L,) f32        environment reward of each step
``success``        (L,) bool       MetaWorld ``info["success"]`` after each step (*)
``reset_seed``     () int64        the clip's reset seed
``start``          () int64        index of the segment's first step in its clip
``video``          () str          path of the rendered clip ('' when none)
``task_id``        () str          the task the clip was recorded on ('' unknown)
=================  ==============  ===============================================

Only the first three keys are required when reading (the store's import path writes
just those); a missing ``success`` reads as all False, the other keys as unknown.

A *preferences file* (:func:`save_preferences`, :func:`load_preferences`) is JSON::

    {"format": "fkpd-prefs/1", "task_id": "metaworld/door-open-v3",
     "pairs": [{"left": "segments/p0000_a.npz", "right": "segments/p0000_b.npz",
                "p_left": 1.0}, ...]}

with ``p_left`` in {1.0, 0.0, 0.5} or ``null`` for a skip (DESIGN.md §3); relative
segment paths are resolved against the file's directory. It stands in for the
preference database until that is plugged into the trainer, which only ever sees an
in-memory list of pairs.

Pairs of segments are made by :mod:`fkpd.prefs.pairs`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fkpd.errors import FKPDError
from fkpd.io import atomic_path
from fkpd.policy.rollout import Episode, StepRecord

PREFS_FORMAT = "fkpd-prefs/1"
SEGMENT_KEYS = ("observations", "actions", "rewards")  # required on load
VALID_P_LEFT = (1.0, 0.0, 0.5)


class PreferenceError(FKPDError, ValueError):
    """A segment or preferences file is missing or malformed, or a preference set is
    unusable (empty, wrong sizes, labels outside {1, 0, 0.5})."""


@dataclass
class Segment(StepRecord):
    """L consecutive steps of one clip.

    Attributes:
        observations: (L, Do) float32 observation before each action.
        actions: (L, Da) float32 executed actions, in ``[-1, 1]``.
        rewards: (L,) float32 ground-truth environment rewards.
        success: (L,) bool per-step success flags.
        reset_seed: the clip's reset seed (-1 when unknown).
        start: index of the first step in the clip.
        video: path of the rendered segment (MP4), or None.
        task_id: the task the clip was recorded on ('' when unknown).
        path: the ``.npz`` file it was loaded from or saved to, or None.

    Raises:
        PreferenceError: arrays of the wrong rank, differing lengths, L = 0, or NaN/inf.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    success: np.ndarray
    reset_seed: int = -1
    start: int = 0
    video: str | None = None
    task_id: str = ""
    path: Path | None = None

    def __post_init__(self) -> None:
        self.observations = np.asarray(self.observations, np.float32)
        self.actions = np.asarray(self.actions, np.float32)
        self.rewards = np.asarray(self.rewards, np.float32)
        self.success = np.asarray(self.success, bool)
        where = f" ({self.path})" if self.path else ""
        if self.observations.ndim != 2 or self.actions.ndim != 2 or self.rewards.ndim != 1 or self.success.ndim != 1:
            raise PreferenceError(
                f"segment{where}: need observations (L, Do), actions (L, Da), rewards (L,), success (L,); got "
                f"shapes {self.observations.shape}, {self.actions.shape}, {self.rewards.shape}, {self.success.shape}")
        n = {len(self.observations), len(self.actions), len(self.rewards), len(self.success)}
        if len(n) != 1 or 0 in n:
            raise PreferenceError(
                f"segment{where}: observations, actions, rewards and success must share one length L > 0; got "
                f"{len(self.observations)}, {len(self.actions)}, {len(self.rewards)}, {len(self.success)}")
        for name in ("observations", "actions", "rewards"):
            if not np.isfinite(getattr(self, name)).all():
                raise PreferenceError(f"segment{where}: `{name}` holds NaN/inf values; drop or re-record the clip")

    def save(self, path: Path | str) -> Path:
        """Write the segment as ``.npz`` (no pickles) atomically; returns the path.

        The file is written under a temporary name in the same directory and renamed,
        so a reader never sees a half-written segment.
        """
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, observations=self.observations, actions=self.actions, rewards=self.rewards,
                     success=self.success, reset_seed=np.int64(self.reset_seed), start=np.int64(self.start),
                     video=np.str_(self.video or ""), task_id=np.str_(self.task_id))
        self.path = path
        return path

    @classmethod
    def load(cls, path: Path | str) -> "Segment":
        """Read a segment ``.npz`` (pickled objects are refused); see the module docstring
        for the keys.

        Raises:
            PreferenceError: missing or unreadable file, a missing key, or bad arrays.
        """
        path = Path(path)
        if not path.is_file():
            raise PreferenceError(f"segment file {str(path)!r} does not exist; re-create the segment or fix the "
                                  "path in the preferences file")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:  # noqa: BLE001 - numpy/zipfile fail in many ways on a corrupt file
            raise PreferenceError(f"cannot read segment file {str(path)!r} as .npz ({type(exc).__name__}: {exc}); "
                                  "the file is corrupt or not a segment") from None
        if not isinstance(arrays, dict):  # a .npy file under a segment's name
            raise PreferenceError(f"segment file {str(path)!r} holds one array, not a segment .npz with "
                                  f"{list(SEGMENT_KEYS)}")
        missing = [k for k in SEGMENT_KEYS if k not in arrays]
        if missing:
            raise PreferenceError(f"segment file {str(path)!r} lacks {missing}; a segment .npz must hold "
                                  f"{list(SEGMENT_KEYS)}")
        for key in (*SEGMENT_KEYS, "success"):
            if key in arrays and arrays[key].dtype.kind not in "biuf":
                raise PreferenceError(f"segment file {str(path)!r}: `{key}` holds {arrays[key].dtype} values, not "
                                      "numbers; re-create the segment")
        meta = {}
        for key, default, kind in (("reset_seed", -1, int), ("start", 0, int), ("video", "", str),
                                   ("task_id", "", str)):
            value = arrays.get(key)
            if value is None:
                meta[key] = default
                continue
            if value.ndim != 0 or (value.dtype.kind in "US") != (kind is str) or value.dtype.kind == "f":
                raise PreferenceError(f"segment file {str(path)!r}: `{key}` must be a single "
                                      f"{'string' if kind is str else 'integer'}, got {value.dtype} of shape "
                                      f"{value.shape}; re-create the segment")
            meta[key] = kind(value)
        success = arrays.get("success", np.zeros(len(arrays["actions"]) if arrays["actions"].ndim else 0, bool))
        return cls(arrays["observations"], arrays["actions"], arrays["rewards"], success,
                   reset_seed=meta["reset_seed"], start=meta["start"], video=meta["video"] or None,
                   task_id=meta["task_id"], path=path)


def cut_segment(episode: Episode, start: int, length: int, task_id: str = "") -> Segment:
    """Steps ``start .. start+length-1`` of ``episode`` (fewer if the episode ends first).

    Frames, when the episode has them, are not copied (:mod:`fkpd.prefs.pairs` writes
    videos).
    """
    sl = slice(int(start), int(start) + int(length))
    return Segment(episode.observations[sl], episode.actions[sl], episode.rewards[sl], episode.success[sl],
                   reset_seed=episode.reset_seed, start=int(start), task_id=task_id)


# -- preferences files ---------------------------------------------------------------
def check_p_left(p_left, where: str = "") -> float | None:
    """Validate a label: ``p_left`` in {1.0, 0.0, 0.5} or None (skip), DESIGN.md §3.

    Raises:
        PreferenceError: any other value.
    """
    if p_left is None:
        return None
    try:
        p = float(p_left)
    except (TypeError, ValueError):
        p = math.nan
    if p not in VALID_P_LEFT:
        raise PreferenceError(f"{where}p_left is {p_left!r}; labels must be 1.0 (left preferred), 0.0 (right "
                              "preferred), 0.5 (equal) or null (skip)")
    return p


def save_preferences(path: Path | str, task_id: str,
                     items: Sequence[tuple[Segment, Segment, float | None]]) -> Path:
    """Write a preferences file listing ``(left, right, p_left)``; segments must be saved.

    Segment paths are stored relative to the file's directory when they lie below it.

    Raises:
        PreferenceError: a segment without a file, or an invalid ``p_left``.
    """
    path = Path(path)
    root = path.parent.resolve()
    rows = []
    for i, (left, right, p) in enumerate(items):
        entry = {}
        for side, seg in (("left", left), ("right", right)):
            if seg.path is None:
                raise PreferenceError(f"pair {i}: the {side} segment has no file; call Segment.save first")
            sp = Path(seg.path).resolve()
            entry[side] = sp.relative_to(root).as_posix() if sp.is_relative_to(root) else str(sp)
        entry["p_left"] = check_p_left(p, f"pair {i}: ")
        rows.append(entry)
    from fkpd.config import save_json

    save_json(path, {"format": PREFS_FORMAT, "task_id": task_id, "pairs": rows})
    return path


def load_preferences(path: Path | str) -> tuple[str | None, list[tuple[Segment, Segment, float | None]]]:
    """Read a preferences file and its segments.

    Returns:
        ``(task_id, [(left, right, p_left), ...])`` with ``p_left`` None for skips.

    Raises:
        PreferenceError: missing or malformed file, a missing or malformed segment
            file (the message names the pair and the path), or an invalid label.
    """
    path = Path(path)
    if not path.is_file():
        raise PreferenceError(f"preferences file {str(path)!r} does not exist; write one with "
                              "fkpd.prefs.segments.save_preferences or pass the right path")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PreferenceError(f"preferences file {str(path)!r} is not valid JSON ({exc})") from None
    except OSError as exc:
        raise PreferenceError(f"cannot read preferences file {str(path)!r} ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != PREFS_FORMAT or not isinstance(data.get("pairs"), list):
        raise PreferenceError(f"preferences file {str(path)!r} is not an {PREFS_FORMAT!r} file (expected an object "
                              "with format and a list of pairs)")
    task_id = data.get("task_id")
    if task_id is not None and not isinstance(task_id, str):
        raise PreferenceError(f"preferences file {str(path)!r}: task_id is {task_id!r}; it must be a task id string "
                              "such as 'metaworld/door-open-v3', or null")
    items = []
    for i, row in enumerate(data["pairs"]):
        where = f"preferences file {str(path)!r}, pair {i}"
        if not isinstance(row, dict) or not {"left", "right", "p_left"} <= set(row):
            raise PreferenceError(f"{where}: needs keys left, right, p_left")
        segs = []
        for side in ("left", "right"):
            segs.append(Segment.load(_segment_path(path, row[side], f"{where}: {side}")))
        items.append((segs[0], segs[1], check_p_left(row["p_left"], f"{where}: ")))
    return task_id, items


def _segment_path(prefs: Path, value: object, where: str) -> Path:
    """The segment file a preferences row names, resolved against the file's directory.

    Raises:
        PreferenceError: ``value`` is not a non-empty path string, or names no file.
    """
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise PreferenceError(f"{where} segment is {value!r}; it must be the path of a segment .npz file (relative "
                              "to the preferences file's folder, or absolute)")
    sp = Path(value)
    sp = sp if sp.is_absolute() else prefs.parent / sp
    if not sp.is_file():
        raise PreferenceError(f"{where} segment file {str(sp)!r} does not exist; restore it or remove the pair")
    return sp
