"""Small frozen records the store returns instead of ORM objects.

They are detached copies: safe to cache, to hand between threads, and to keep after the
session that read them is gone. Annotator-facing records (:class:`PairView`,
:class:`ClipView`) never carry ground truth (return, success) or the reset seed, so the
labelling page cannot leak them; researcher-facing ones (:class:`ClipRecord`) do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from fkpd.store import models as m
from fkpd.store.outcomes import Outcome, outcome_to_p_left


@dataclass(frozen=True)
class ProjectInfo:
    """A project. ``settings`` includes ``labels_per_pair`` and ``lease_seconds``;
    ``identity`` is ``"open"`` (annotators name themselves) or ``"invite"`` (annotators
    come through invite links, :meth:`fkpd.store.Store.create_invite`)."""

    id: int
    name: str
    task_id: str
    instructions: str
    settings: dict[str, Any]
    created_at: datetime
    identity: str = "open"

    @property
    def labels_per_pair(self) -> int:
        """How many answers close a pair (skips count too)."""
        return int(self.settings["labels_per_pair"])

    @property
    def lease_seconds(self) -> float:
        """How long :meth:`fkpd.store.Store.next_pair` reserves a pair for an annotator."""
        return float(self.settings["lease_seconds"])

    @classmethod
    def of(cls, row: m.Project) -> "ProjectInfo":
        return cls(row.id, row.name, row.task_id, row.instructions, dict(row.settings), row.created_at,
                   row.identity or "open")


@dataclass(frozen=True)
class AnnotatorInfo:
    """An annotator (a person, a scripted teacher, or ``imported:<file>``)."""

    id: int
    name: str
    is_admin: bool
    created_at: datetime

    @classmethod
    def of(cls, row: m.Annotator) -> "AnnotatorInfo":
        return cls(row.id, row.name, row.is_admin, row.created_at)


@dataclass(frozen=True)
class PolicyVersionInfo:
    """A policy version; ``checkpoint_path`` is relative to the artifact directory."""

    id: int
    project_id: int
    checkpoint_path: str | None
    checkpoint_sha256: str | None
    parent_id: int | None
    round: int
    metrics: dict[str, Any]
    created_at: datetime

    @classmethod
    def of(cls, row: m.PolicyVersion) -> "PolicyVersionInfo":
        return cls(
            row.id,
            row.project_id,
            row.checkpoint_path,
            row.checkpoint_sha256,
            row.parent_id,
            row.round,
            dict(row.metrics),
            row.created_at,
        )


@dataclass(frozen=True)
class ClipRecord:
    """Everything about a clip, ground truth included: for trainers and analysis only.

    Attributes:
        segment_path / video_path: relative to the artifact directory.
        length: L, number of environment steps in the segment.
        gt_return: sum of environment rewards over the segment (None if unknown).
        gt_success: whether the task was solved within the segment (None if unknown).
        meta: free-form provenance (e.g. ``{"source": ..., "start_index": ...}``).
    """

    id: int
    policy_version_id: int
    reset_seed: int | None
    segment_path: str
    segment_sha256: str
    video_path: str | None
    video_sha256: str | None
    fps: float
    length: int
    gt_return: float | None
    gt_success: bool | None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, row: m.Clip) -> "ClipRecord":
        return cls(
            row.id,
            row.policy_version_id,
            row.reset_seed,
            row.segment_path,
            row.segment_sha256,
            row.video_path,
            row.video_sha256,
            row.fps,
            row.length,
            row.gt_return,
            row.gt_success,
            dict(row.meta or {}),
        )


@dataclass(frozen=True)
class ClipView:
    """What the labelling page may know about a clip: no ground truth, no seed.

    Attributes:
        video_file: absolute path of the video in a local artifact directory; None when
            the clip has no video or the artifacts are remote (read ``video_path``
            through ``Store.artifacts.read_bytes`` then).
        length: L, number of environment steps.
        video_path: the video's path relative to the artifact store, or None.
    """

    id: int
    video_file: Path | None
    video_sha256: str | None
    fps: float
    length: int
    video_path: str | None = None


@dataclass(frozen=True)
class PairView:
    """A pair leased to one annotator until ``lease_expires_at`` (UTC)."""

    id: int
    project_id: int
    round: int
    policy_version_id: int
    left: ClipView
    right: ClipView
    lease_expires_at: datetime


@dataclass(frozen=True)
class ComparisonRecord:
    """One stored answer.

    Attributes:
        created: True if the call that returned this record inserted it; False if the
            answer already existed (a double click or a rerun), in which case the stored
            answer is returned unchanged.
        pair_done: whether the pair had all its labels after this answer.
    """

    id: int
    pair_id: int
    annotator_id: int
    outcome: Outcome
    shown_at: datetime | None
    answered_at: datetime
    created: bool = False
    pair_done: bool = False

    @property
    def p_left(self) -> float | None:
        """1.0 / 0.0 / 0.5 for left / right / equal; None for skip."""
        return outcome_to_p_left(self.outcome)


class TrainingPair(NamedTuple):
    """One non-skip comparison for the trainer: ``left, right, p_left = pair``."""

    left: ClipRecord
    right: ClipRecord
    p_left: float


@dataclass(frozen=True)
class SeedGroup:
    """The clips of one policy version from one reset seed (and one segment start) among
    the pairs of one round (:meth:`fkpd.store.Store.seed_groups`): the start states a
    top-up may give one more clip (:mod:`fkpd.prefs.extension`).

    Attributes:
        reset_seed: the clips' reset seed.
        start: first step of their segments in the rollout (the clips' ``meta["start"]``);
            None when the clips do not record it (such a group cannot be extended).
        length: L, steps of the longest segment of the group.
        clip_ids: the clips, ascending (their count is :attr:`clips`).
        noise_seeds: the sampling-noise seeds the clips record (``meta["noise_seed"]``),
            in ``clip_ids`` order; clips that record none are left out.
        first_pair: the smallest id among the group's pairs (the group's place in its round).
        pairs: the group's pairs in the round.
        retired: one of those pairs is retired (e.g. a clip that cannot be shown).
    """

    reset_seed: int
    start: int | None
    length: int
    clip_ids: tuple[int, ...]
    noise_seeds: tuple[int, ...]
    first_pair: int
    pairs: int
    retired: bool = False

    @property
    def clips(self) -> int:
        """How many clips the group has."""
        return len(self.clip_ids)


class PairSupply(NamedTuple):
    """The labelling queue of a project at one moment (:meth:`fkpd.store.Store.pair_supply`).

    Attributes:
        open_pairs: open pairs (not done, not retired) of the rounds counted.
        round_pairs: pairs ever added to the first round counted, whatever their status.
        active_annotators: annotators holding a live lease or who answered recently.
    """

    open_pairs: int
    round_pairs: int
    active_annotators: int


#: Statuses a job never leaves.
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class JobView:
    """A snapshot of one job.

    Attributes:
        progress: fraction done, 0..1.
        heartbeat_at: last sign of life from the worker (UTC), None unless started.
        error: failure text (exception and traceback, or the stale-recovery reason).
        attempts: how many times the job was claimed.
        cancel_requested: :meth:`fkpd.store.queue.JobQueue.cancel` was called while it ran.
        result: the handler's JSON result once succeeded.
        history: the job's events, oldest first, each ``{"at": ISO time (UTC), "event":
            "queued" | "claimed" | "released" | "recovered" | "failed" | "succeeded" |
            "cancelled", "attempt": int, "worker": str | None, "reason": str}``; a job
            whose worker died keeps its ``recovered`` event after it succeeds.
    """

    id: int
    project_id: int
    kind: str
    params: dict[str, Any]
    status: str
    progress: float
    message: str
    heartbeat_at: datetime | None
    error: str | None
    worker_id: str | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: dict[str, Any] | None
    history: tuple[dict[str, Any], ...] = ()

    @property
    def done(self) -> bool:
        """True once the job reached succeeded, failed or cancelled."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def of(cls, row: m.Job) -> "JobView":
        """A detached snapshot of a job row."""
        return cls(
            id=row.id,
            project_id=row.project_id,
            kind=row.kind,
            params=dict(row.params or {}),
            status=row.status,
            progress=row.progress,
            message=row.message,
            heartbeat_at=row.heartbeat_at,
            error=row.error,
            worker_id=row.worker_id,
            attempts=row.attempts,
            cancel_requested=row.cancel_requested,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            result=None if row.result is None else dict(row.result),
            history=tuple(dict(e) for e in (row.history or ())),
        )


@dataclass(frozen=True)
class InviteInfo:
    """An invite link of a project (never its token, which only its creator sees once).

    Attributes:
        annotator: the name of the annotator the link speaks for.
        revoked_at: when it was revoked (UTC), or None while it is valid.
        token: the token itself, only on the record :meth:`fkpd.store.Store.create_invite`
            returns (None everywhere else: the store keeps only its sha256).
    """

    id: int
    project_id: int
    annotator_id: int
    annotator: str
    created_at: datetime
    revoked_at: datetime | None
    token: str | None = None

    @property
    def active(self) -> bool:
        """True while the invite is not revoked."""
        return self.revoked_at is None


@dataclass(frozen=True)
class ExclusionInfo:
    """An annotator whose comparisons in a project are left out of training
    (:meth:`fkpd.store.Store.exclude_annotator`); the comparisons stay in the store.

    Attributes:
        annotator: the annotator's name.
        excluded_at: when (UTC).
        excluded_by: who excluded them (free text, e.g. ``"admin"``), or None.
        reason: why, as given ("" when none).
    """

    project_id: int
    annotator_id: int
    annotator: str
    excluded_at: datetime
    excluded_by: str | None
    reason: str
