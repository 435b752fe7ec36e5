"""Relational schema of the preference store (SQLAlchemy 2 declarative ORM).

The schema is created and evolved only by the Alembic revisions in
``fkpd/store/migrations/versions`` (see :func:`fkpd.store.db.init_db`); these classes must
stay in step with them, which ``tests/test_store.py`` checks by diffing the migrated
database against this metadata.

Conventions:

* every timestamp is a timezone-aware UTC ``datetime`` in Python (:class:`UTCDateTime`);
* enumerations are short strings guarded by CHECK constraints (no database enum types,
  so adding a value later is a one-line migration on both SQLite and PostgreSQL);
* artifact paths are POSIX paths relative to the artifact directory, each with the
  hex sha256 of the file.

Ground truth (``Clip.gt_return``, ``Clip.gt_success``) lives here for analysis, but is never
copied into an annotator-facing view (:class:`fkpd.store.views.ClipView`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import text
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

PAIR_STATUSES = ("open", "done", "retired")
OUTCOMES = ("left", "right", "equal", "skip")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
#: How the app knows who labels a project: ``open`` (the name in the URL, for demos) or
#: ``invite`` (a link with a random token; the default for new projects).
IDENTITY_MODES = ("open", "invite")

SHA256_LEN = 64
PATH_LEN = 1024
NAME_LEN = 200


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always returned timezone-aware (UTC).

    Naive datetimes given to the database are taken to be UTC already. SQLite has no
    time-zone support, so the UTC wall time is stored there without an offset; the
    fixed-width text format keeps ``<``/``>`` comparisons in SQL correct.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else as_utc(value)


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime (naive input is taken to be UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    """Current time as an aware UTC datetime (the store's default clock)."""
    return datetime.now(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    """Declarative base with the constraint naming convention Alembic relies on."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Project(Base):
    """A labelling project: one task, its instructions and settings.

    ``settings`` holds at least ``labels_per_pair`` (int ≥ 1, default 1) and
    ``lease_seconds`` (float > 0, default 120); other keys are kept for callers.
    ``identity`` is one of :data:`IDENTITY_MODES` (checked by the store, not by a CHECK
    constraint, so migration 0002 adds it without rebuilding the table); rows that
    predate it are ``open``.
    """

    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    task_id: Mapped[str] = mapped_column(String(NAME_LEN))
    instructions: Mapped[str] = mapped_column(Text, default="")
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    identity: Mapped[str] = mapped_column(String(16), default="invite", server_default="open")


class Annotator(Base):
    """A person (or a scripted teacher, or an importer) who answers comparisons."""

    __tablename__ = "annotators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PolicyVersion(Base):
    """One trained policy. ``checkpoint_path`` is None for imported offline data."""

    __tablename__ = "policy_versions"
    __table_args__ = (Index("ix_policy_versions_project_round", "project_id", "round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    checkpoint_path: Mapped[Optional[str]] = mapped_column(String(PATH_LEN))
    checkpoint_sha256: Mapped[Optional[str]] = mapped_column(String(SHA256_LEN))
    parent_id: Mapped[Optional[int]] = mapped_column(ForeignKey("policy_versions.id"))
    round: Mapped[int] = mapped_column(Integer, default=0)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Clip(Base):
    """One rolled-out (or imported) segment: arrays in a .npz, optionally a video."""

    __tablename__ = "clips"
    __table_args__ = (
        CheckConstraint("length > 0", name="length_positive"),
        CheckConstraint("fps > 0", name="fps_positive"),
        Index("ix_clips_policy_version_seed", "policy_version_id", "reset_seed"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    policy_version_id: Mapped[int] = mapped_column(ForeignKey("policy_versions.id"))
    reset_seed: Mapped[Optional[int]] = mapped_column(BigInteger)
    segment_path: Mapped[str] = mapped_column(String(PATH_LEN))
    segment_sha256: Mapped[str] = mapped_column(String(SHA256_LEN))
    video_path: Mapped[Optional[str]] = mapped_column(String(PATH_LEN))
    video_sha256: Mapped[Optional[str]] = mapped_column(String(SHA256_LEN))
    fps: Mapped[float] = mapped_column(Float)
    length: Mapped[int] = mapped_column(Integer)
    gt_return: Mapped[Optional[float]] = mapped_column(Float)
    gt_success: Mapped[Optional[bool]] = mapped_column(Boolean)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Pair(Base):
    """Two clips to compare, queued for labelling in one round of one project.

    ``gold`` is ``"left"`` or ``"right"`` for a *gold pair* (one whose answer is clear
    from ground truth, :meth:`fkpd.store.Store.mark_gold_pairs`), None otherwise; it is
    checked by the store, not by a CHECK constraint (migration 0003 adds it without
    rebuilding the table), and never reaches an annotator-facing view.
    """

    __tablename__ = "pairs"
    __table_args__ = (
        CheckConstraint(_in("status", PAIR_STATUSES), name="status_valid"),
        CheckConstraint("left_clip_id <> right_clip_id", name="distinct_clips"),
        Index("ix_pairs_queue", "project_id", "status", "round", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    round: Mapped[int] = mapped_column(Integer)
    left_clip_id: Mapped[int] = mapped_column(ForeignKey("clips.id"))
    right_clip_id: Mapped[int] = mapped_column(ForeignKey("clips.id"))
    status: Mapped[str] = mapped_column(String(16), default="open")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[Optional[datetime]] = mapped_column()
    gold: Mapped[Optional[str]] = mapped_column(String(8))


class Lease(Base):
    """A pair handed to an annotator until ``expires_at``; expired rows are ignored.

    ``leased_at`` is the earliest moment the pair can have been on the annotator's
    screen: when it was leased, moved later when the annotator answers the pair before
    it (the page shows a prefetched pair only after that answer); the minimum viewing
    time of :meth:`fkpd.store.Store.answer` is counted from it.
    """

    __tablename__ = "leases"
    __table_args__ = (
        UniqueConstraint("pair_id", "annotator_id", name="uq_leases_pair_annotator"),
        Index("ix_leases_annotator_expires", "annotator_id", "expires_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    leased_at: Mapped[datetime] = mapped_column()
    expires_at: Mapped[datetime] = mapped_column()


class Comparison(Base):
    """One answer of one annotator for one pair (unique per pair and annotator)."""

    __tablename__ = "comparisons"
    __table_args__ = (
        UniqueConstraint("pair_id", "annotator_id", name="uq_comparisons_pair_annotator"),
        CheckConstraint(_in("outcome", OUTCOMES), name="outcome_valid"),
        Index("ix_comparisons_annotator", "annotator_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pair_id: Mapped[int] = mapped_column(ForeignKey("pairs.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    outcome: Mapped[str] = mapped_column(String(8))
    shown_at: Mapped[Optional[datetime]] = mapped_column()
    answered_at: Mapped[datetime] = mapped_column()


class AnnotatorExclusion(Base):
    """An annotator whose comparisons in a project are left out of training (issue #13).

    The comparisons stay in the store; deleting the row (:meth:`fkpd.store.Store.include_annotator`)
    takes them back into training.
    """

    __tablename__ = "annotator_exclusions"
    __table_args__ = (
        UniqueConstraint("project_id", "annotator_id", name="uq_annotator_exclusions_project_annotator"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    excluded_at: Mapped[datetime] = mapped_column()
    excluded_by: Mapped[Optional[str]] = mapped_column(String(NAME_LEN))
    reason: Mapped[str] = mapped_column(Text, default="")


class Job(Base):
    """A background job (training, rendering) run by a worker; see :mod:`fkpd.store.queue`."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status_valid"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
        Index("ix_jobs_queue", "status", "kind", "id"),
        Index("ix_jobs_project", "project_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    kind: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    heartbeat_at: Mapped[Optional[datetime]] = mapped_column()
    error: Mapped[Optional[str]] = mapped_column(Text)
    worker_id: Mapped[Optional[str]] = mapped_column(String(NAME_LEN))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[Optional[datetime]] = mapped_column()
    finished_at: Mapped[Optional[datetime]] = mapped_column()
    result: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON)
    #: Events of the job, oldest first: ``{"at", "event", "attempt", "worker", "reason"}``
    #: (see :mod:`fkpd.store.queue`).
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list, server_default=text("'[]'"))


class Invite(Base):
    """An invite link of a project: its token's sha256 (never the token) and the
    annotator it speaks for; a revoked invite (``revoked_at`` set) is refused."""

    __tablename__ = "invites"
    __table_args__ = (Index("ix_invites_project_annotator", "project_id", "annotator_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"))
    annotator_id: Mapped[int] = mapped_column(ForeignKey("annotators.id"))
    token_sha256: Mapped[str] = mapped_column(String(SHA256_LEN), unique=True)
    created_at: Mapped[datetime] = mapped_column()
    revoked_at: Mapped[Optional[datetime]] = mapped_column()
