"""The preference store: projects, policy versions, clips, pairs, leases and answers.

:class:`Store` is the one object the labelling app, the worker and the trainers share.
It is thread-safe (one engine with a connection pool; every method runs its own short
transaction) and may be created in many processes against the same database. A forked
child (e.g. a DataLoader worker) drops the inherited connections and opens its own.

Assignment rules (:meth:`Store.next_pair` / :meth:`Store.answer`):

* An annotator is offered pairs of the **latest round that still has open pairs**, oldest
  pair first, that they have not answered, and whose answers plus other annotators'
  unexpired leases are fewer than the project's ``labels_per_pair``.
* The pair is **leased** to the annotator for ``lease_seconds``. While the lease runs,
  calling :meth:`~Store.next_pair` again returns the same pair (and extends the lease), and
  nobody else gets it once it is fully leased (with ``labels_per_pair=1``: nobody else at
  all). Expired leases are ignored, so an abandoned pair returns to the pool.
* :meth:`~Store.answer` is idempotent per (pair, annotator): a double click, a page rerun
  or a retry after a lost reply returns the stored answer instead of adding a second one
  (unique constraint, ``ON CONFLICT DO NOTHING``). A new answer is refused once the pair
  already holds ``labels_per_pair`` answers, so a pair never gets more than that.
* **Every answer counts toward completion, skips included**: a pair is ``done`` after
  ``labels_per_pair`` answers of any outcome. A skip usually means the pair is not worth
  judging (both clips equally broken, nothing happens); handing it to more people wastes
  their time and would keep a round from ever finishing. Skips are stored and reported
  (:meth:`~Store.annotator_stats`) but never trained on (:meth:`~Store.training_pairs`).
* Late answers are accepted while the pair has room: if a lease expired and nobody else
  filled the pair, the answer is stored.

Concurrency: on PostgreSQL a candidate pair is locked with ``SELECT … FOR UPDATE SKIP
LOCKED`` and re-checked with a fresh statement after the lock is held (under READ
COMMITTED a fresh statement sees every lease committed before the lock was granted);
answers take the pair's row lock too, so every change to a pair's leases and answers is
serialised per pair. On SQLite every writing transaction starts with ``BEGIN IMMEDIATE``
(see :mod:`fkpd.store.db`), which serialises writers across threads and processes, and
writers queue on a file lock so none of them starves
(:class:`fkpd.store.db.SqliteWriteGate`).
"""

from __future__ import annotations

import itertools
import os
import weakref
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Sequence

from sqlalchemy import ColumnElement, Table, and_, delete, exists, func, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, aliased

from fkpd.store import models as m
from fkpd.store.artifacts import ArtifactData, ArtifactDir, normalize_relpath
from fkpd.store.db import (
    WRITE,
    default_artifact_dir,
    default_database_url,
    init_db,
    make_engine,
    sqlite_write_gate,
)
from fkpd.store.errors import (
    AlreadyExistsError,
    NotFoundError,
    PairUnavailableError,
    StoreInputError,
)
from fkpd.store.models import as_utc, utcnow
from fkpd.store.outcomes import Outcome, outcome_to_p_left
from fkpd.store.views import (
    AnnotatorInfo,
    ClipRecord,
    ClipView,
    ComparisonRecord,
    PairView,
    PolicyVersionInfo,
    ProjectInfo,
    TrainingPair,
)

if TYPE_CHECKING:
    import pandas as pd

    from fkpd.store.jobs import JobQueue

#: Settings every project has; :meth:`Store.create_project` fills in what is not given.
DEFAULT_SETTINGS: dict[str, Any] = {"labels_per_pair": 1, "lease_seconds": 120.0}


def validate_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``DEFAULT_SETTINGS`` updated with ``settings``, after checking known keys.

    Raises:
        StoreInputError: ``labels_per_pair`` is not an int ≥ 1, or ``lease_seconds`` is
            not a number > 0.
    """
    merged = {**DEFAULT_SETTINGS, **dict(settings)}
    labels = merged["labels_per_pair"]
    if isinstance(labels, bool) or not isinstance(labels, int) or labels < 1:
        raise StoreInputError(f"labels_per_pair must be an integer >= 1, got {labels!r}")
    lease = merged["lease_seconds"]
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not lease > 0:
        raise StoreInputError(f"lease_seconds must be a number > 0, got {lease!r}")
    merged["lease_seconds"] = float(lease)
    return merged


_ENGINES: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _drop_inherited_connections() -> None:
    """In a forked child, drop (without closing) the connections inherited from the
    parent, so the child never talks on, or shuts down, the parent's sockets; a child
    that uses a store opens fresh connections."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_drop_inherited_connections)


def _clean_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StoreInputError(f"{what} name must be a non-empty string, got {name!r}")
    name = name.strip()
    if len(name) > m.NAME_LEN:
        raise StoreInputError(f"{what} name is {len(name)} characters; at most {m.NAME_LEN} allowed")
    return name


class Store:
    """Preference store on SQLite or PostgreSQL, plus the artifact directory beside it.

    Args:
        url: SQLAlchemy database URL; default ``$FKPD_DATABASE_URL`` or the SQLite file
            ``labels/fkpd.sqlite`` under the repository root. ``postgresql://`` URLs use
            psycopg 3.
        artifact_dir: folder for videos, segments and checkpoints; default
            ``$FKPD_ARTIFACT_DIR`` or ``labels/artifacts``.
        clock: returns the current time (aware, or naive UTC); tests inject a fake one.
            Lease expiry and job heartbeats are judged by this clock, so all processes
            sharing a database should have synchronised clocks.
        migrate: run :func:`fkpd.store.db.init_db` (``alembic upgrade head``) on open.
        engine_kwargs: extra arguments for :func:`sqlalchemy.create_engine`.
    """

    def __init__(
        self,
        url: str | URL | None = None,
        artifact_dir: str | os.PathLike[str] | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        migrate: bool = True,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.url = make_url(url or default_database_url())
        self.engine = make_engine(self.url, **dict(engine_kwargs or {}))
        self._write_gate = sqlite_write_gate(self.url)
        _ENGINES.add(self.engine)
        self.artifacts = ArtifactDir(artifact_dir or default_artifact_dir())
        self._clock = clock or utcnow
        self._jobs: JobQueue | None = None
        if migrate:
            try:
                init_db(self.engine)
            except BaseException:
                self.engine.dispose()
                raise

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return (
            f"Store(url={self.url.render_as_string(hide_password=True)!r}, "
            f"artifact_dir={str(self.artifacts.root)!r})"
        )

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    @property
    def artifact_dir(self) -> Path:
        """Absolute artifact directory."""
        return self.artifacts.root

    @property
    def jobs(self) -> "JobQueue":
        """The job queue on this store's database (:class:`fkpd.store.jobs.JobQueue`)."""
        if self._jobs is None:
            from fkpd.store.jobs import JobQueue

            self._jobs = JobQueue(self)
        return self._jobs

    def now(self) -> datetime:
        """Current time from the store's clock, as an aware UTC datetime."""
        return as_utc(self._clock())

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """A session in one transaction, committed on success and rolled back on error.

        Meant for code inside :mod:`fkpd.store`; ``write=True`` makes SQLite take the
        write lock at ``BEGIN`` (``BEGIN IMMEDIATE``), which every read-then-write
        transaction needs to be safe against other processes, and queues SQLite writers
        fairly (:class:`fkpd.store.db.SqliteWriteGate`).
        """
        gate = self._write_gate.hold() if write and self._write_gate is not None else nullcontext()
        with gate, self.engine.connect() as conn:
            if write:
                conn.execution_options(**{WRITE: True})
            with Session(bind=conn, expire_on_commit=False, autoflush=True) as session:
                with session.begin():
                    yield session

    def insert(self, table: Table):  # -> dialect Insert with on_conflict_* methods
        """``INSERT`` for this backend (supports ``on_conflict_do_nothing/update``)."""
        if self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    # ------------------------------------------------------------------ artifacts

    def write_artifact_atomic(
        self, relpath: str | os.PathLike[str], data: ArtifactData, *, to_path: bool = False
    ) -> tuple[str, str]:
        """Write a file under the artifact dir atomically; see :meth:`ArtifactDir.write_atomic`.

        Returns:
            ``(relpath, sha256)`` to pass to :meth:`add_clip` or :meth:`add_policy_version`.
        """
        return self.artifacts.write_atomic(relpath, data, to_path=to_path)

    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """Absolute path of an artifact.

        Raises:
            ArtifactPathError: the path is absolute, contains ``..``, or escapes the
                artifact directory.
        """
        return self.artifacts.resolve(relpath)

    # ------------------------------------------------------------------ lookups

    def _project(self, s: Session, project: Any) -> m.Project:
        if isinstance(project, ProjectInfo):
            project = project.id
        if isinstance(project, int) and not isinstance(project, bool):
            row = s.get(m.Project, project)
        elif isinstance(project, str):
            row = s.scalars(select(m.Project).where(m.Project.name == project.strip())).first()
        else:
            raise StoreInputError(f"project must be a name, an id or a ProjectInfo, got {project!r}")
        if row is None:
            names = s.scalars(select(m.Project.name).order_by(m.Project.name).limit(20)).all()
            raise NotFoundError(
                f"project {project!r} not found; create it with Store.create_project"
                + (f" or use one of: {', '.join(names)}" if names else "")
            )
        return row

    def _annotator(self, s: Session, annotator: Any) -> m.Annotator:
        if isinstance(annotator, AnnotatorInfo):
            annotator = annotator.id
        if isinstance(annotator, int) and not isinstance(annotator, bool):
            row = s.get(m.Annotator, annotator)
        elif isinstance(annotator, str):
            name = _clean_name(annotator, "annotator")
            row = s.scalars(select(m.Annotator).where(m.Annotator.name == name)).first()
        else:
            raise StoreInputError(
                f"annotator must be a name, an id or an AnnotatorInfo, got {annotator!r}"
            )
        if row is None:
            raise NotFoundError(
                f"annotator {annotator!r} not found; register them first with "
                "Store.get_or_create_annotator"
            )
        return row

    @staticmethod
    def _get(s: Session, model: type, key: int, what: str) -> Any:
        row = s.get(model, key)
        if row is None:
            raise NotFoundError(f"{what} {key!r} not found")
        return row

    # ------------------------------------------------------------------ projects

    def create_project(
        self,
        name: str,
        task_id: str,
        instructions: str = "",
        settings: Mapping[str, Any] | None = None,
        *,
        exist_ok: bool = False,
    ) -> ProjectInfo:
        """Create a labelling project.

        Args:
            name: unique, non-empty.
            task_id: task registry id, e.g. ``metaworld/door-open-v3``.
            instructions: text shown to annotators above the videos.
            settings: merged over :data:`DEFAULT_SETTINGS` (``labels_per_pair``,
                ``lease_seconds``); other keys are stored as given.
            exist_ok: return the existing project of that name instead of raising
                (its instructions and settings are left unchanged).

        Raises:
            StoreInputError: empty name/task id or invalid settings.
            AlreadyExistsError: the name is taken and ``exist_ok`` is False.
        """
        name = _clean_name(name, "project")
        if not isinstance(task_id, str) or not task_id.strip():
            raise StoreInputError(f"task_id must be a non-empty string, got {task_id!r}")
        merged = validate_settings(settings or {})
        with self.session(write=True) as s:
            table = m.Project.__table__
            stmt = (
                self.insert(table)
                .values(
                    name=name,
                    task_id=task_id.strip(),
                    instructions=instructions or "",
                    settings=merged,
                    created_at=self.now(),
                )
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(table.c.id)
            )
            new_id = s.execute(stmt).scalar()
            if new_id is None and not exist_ok:
                raise AlreadyExistsError(
                    f"project {name!r} already exists; pick another name or pass exist_ok=True"
                )
            return ProjectInfo.of(self._project(s, name if new_id is None else new_id))

    def get_project(self, project: Any) -> ProjectInfo:
        """A project by name or id.

        Raises:
            NotFoundError: no such project.
        """
        with self.session() as s:
            return ProjectInfo.of(self._project(s, project))

    def list_projects(self) -> list[ProjectInfo]:
        """All projects, oldest first."""
        with self.session() as s:
            return [ProjectInfo.of(p) for p in s.scalars(select(m.Project).order_by(m.Project.id))]

    def update_project(
        self,
        project: Any,
        *,
        instructions: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> ProjectInfo:
        """Change a project's instructions and/or merge new settings into its settings.

        Raises:
            NotFoundError: no such project.
            StoreInputError: invalid settings.
        """
        with self.session(write=True) as s:
            row = self._project(s, project)
            if instructions is not None:
                row.instructions = instructions
            if settings is not None:
                row.settings = validate_settings({**row.settings, **dict(settings)})
            s.flush()
            return ProjectInfo.of(row)

    # ------------------------------------------------------------------ annotators

    def get_or_create_annotator(self, name: str, *, is_admin: bool = False) -> AnnotatorInfo:
        """The annotator called ``name`` (surrounding spaces ignored), created if new.

        ``is_admin`` applies only when the annotator is created; use :meth:`set_admin`
        to change it later. Safe to call concurrently with the same name.

        Raises:
            StoreInputError: ``name`` is empty or only whitespace.
        """
        name = _clean_name(name, "annotator")
        with self.session(write=True) as s:
            table = m.Annotator.__table__
            s.execute(
                self.insert(table)
                .values(name=name, is_admin=bool(is_admin), created_at=self.now())
                .on_conflict_do_nothing(index_elements=["name"])
            )
            return AnnotatorInfo.of(self._annotator(s, name))

    def get_annotator(self, annotator: Any) -> AnnotatorInfo:
        """An annotator by name or id.

        Raises:
            NotFoundError: no such annotator.
        """
        with self.session() as s:
            return AnnotatorInfo.of(self._annotator(s, annotator))

    def set_admin(self, annotator: Any, is_admin: bool) -> AnnotatorInfo:
        """Grant or revoke admin rights.

        Raises:
            NotFoundError: no such annotator.
        """
        with self.session(write=True) as s:
            row = self._annotator(s, annotator)
            row.is_admin = bool(is_admin)
            s.flush()
            return AnnotatorInfo.of(row)

    def list_annotators(self) -> list[AnnotatorInfo]:
        """All annotators, by name."""
        with self.session() as s:
            rows = s.scalars(select(m.Annotator).order_by(m.Annotator.name))
            return [AnnotatorInfo.of(a) for a in rows]

    # ------------------------------------------------------------------ policy versions

    def add_policy_version(
        self,
        project: Any,
        checkpoint_path: str | None = None,
        *,
        checkpoint_sha256: str | None = None,
        parent_id: int | None = None,
        round: int = 0,
        metrics: Mapping[str, Any] | None = None,
    ) -> PolicyVersionInfo:
        """Register a trained policy.

        Args:
            checkpoint_path: path relative to the artifact directory (write the file
                first, e.g. with :meth:`write_artifact_atomic`); None for data sources
                that have no checkpoint (imported datasets).
            checkpoint_sha256: hash of the checkpoint file; computed from the file when
                omitted.
            parent_id: the version this one was trained from, if any.
            round: alignment round (0 for the behaviour-cloned reference).
            metrics: JSON-serialisable evaluation results.

        Raises:
            NotFoundError: unknown project or parent.
            ArtifactPathError / ArtifactIntegrityError: bad or missing checkpoint path.
            StoreInputError: the parent belongs to another project, or round < 0.
        """
        if round < 0:
            raise StoreInputError(f"round must be >= 0, got {round}")
        if checkpoint_path is not None:
            if checkpoint_sha256 is None:
                checkpoint_sha256 = self.artifacts.sha256(checkpoint_path)
            else:
                self.artifacts.resolve(checkpoint_path)
            checkpoint_path = normalize_relpath(checkpoint_path)
        with self.session(write=True) as s:
            proj = self._project(s, project)
            row = self._insert_policy_version(
                s, proj, checkpoint_path, checkpoint_sha256, parent_id, round, metrics
            )
            return PolicyVersionInfo.of(row)

    def _insert_policy_version(
        self,
        s: Session,
        proj: m.Project,
        checkpoint_path: str | None,
        checkpoint_sha256: str | None,
        parent_id: int | None,
        round: int,
        metrics: Mapping[str, Any] | None,
    ) -> m.PolicyVersion:
        if parent_id is not None:
            parent = self._get(s, m.PolicyVersion, parent_id, "parent policy version")
            if parent.project_id != proj.id:
                raise StoreInputError(
                    f"parent policy version {parent_id} belongs to project "
                    f"{parent.project_id}, not {proj.name!r}"
                )
        row = m.PolicyVersion(
            project_id=proj.id,
            checkpoint_path=checkpoint_path,
            checkpoint_sha256=checkpoint_sha256,
            parent_id=parent_id,
            round=int(round),
            metrics=dict(metrics or {}),
            created_at=self.now(),
        )
        s.add(row)
        s.flush()
        return row

    def get_policy_version(self, version_id: int) -> PolicyVersionInfo:
        """A policy version by id.

        Raises:
            NotFoundError: no such version.
        """
        with self.session() as s:
            return PolicyVersionInfo.of(self._get(s, m.PolicyVersion, version_id, "policy version"))

    def latest_policy_version(self, project: Any) -> PolicyVersionInfo | None:
        """The most recently registered policy version of a project, or None."""
        with self.session() as s:
            proj = self._project(s, project)
            row = s.scalars(
                select(m.PolicyVersion)
                .where(m.PolicyVersion.project_id == proj.id)
                .order_by(m.PolicyVersion.id.desc())
                .limit(1)
            ).first()
            return None if row is None else PolicyVersionInfo.of(row)

    def list_policy_versions(self, project: Any) -> list[PolicyVersionInfo]:
        """All policy versions of a project, oldest first."""
        with self.session() as s:
            proj = self._project(s, project)
            rows = s.scalars(
                select(m.PolicyVersion)
                .where(m.PolicyVersion.project_id == proj.id)
                .order_by(m.PolicyVersion.id)
            )
            return [PolicyVersionInfo.of(r) for r in rows]

    # ------------------------------------------------------------------ clips

    def add_clip(
        self,
        policy_version_id: int,
        *,
        segment_path: str,
        length: int,
        fps: float,
        reset_seed: int | None = None,
        segment_sha256: str | None = None,
        video_path: str | None = None,
        video_sha256: str | None = None,
        gt_return: float | None = None,
        gt_success: bool | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> ClipRecord:
        """Register a clip whose files are already in the artifact directory.

        Args:
            policy_version_id: the policy that produced the segment.
            segment_path: ``.npz`` with observations (L, Do), actions (L, Da),
                rewards (L,), relative to the artifact directory.
            length: L, environment steps.
            fps: video playback rate, > 0.
            reset_seed: seed of ``env.reset`` the rollout started from (None for
                imported segments, which have no reset).
            segment_sha256 / video_sha256: hashes; computed from the files when omitted.
            gt_return / gt_success: ground truth, kept from annotators.
            meta: JSON-serialisable provenance.

        Raises:
            NotFoundError: unknown policy version.
            ArtifactPathError / ArtifactIntegrityError: bad path or missing file.
            StoreInputError: length ≤ 0 or fps ≤ 0.
        """
        return self.add_clips(
            [
                dict(
                    policy_version_id=policy_version_id,
                    segment_path=segment_path,
                    length=length,
                    fps=fps,
                    reset_seed=reset_seed,
                    segment_sha256=segment_sha256,
                    video_path=video_path,
                    video_sha256=video_sha256,
                    gt_return=gt_return,
                    gt_success=gt_success,
                    meta=meta,
                )
            ]
        )[0]

    def add_clips(self, clips: Sequence[Mapping[str, Any]]) -> list[ClipRecord]:
        """Register many clips in one transaction; each mapping takes :meth:`add_clip`'s
        keyword arguments (``policy_version_id`` included). Raises as :meth:`add_clip`."""
        prepared = [self._prepare_clip(c) for c in clips]
        with self.session(write=True) as s:
            return [ClipRecord.of(r) for r in self._insert_clips(s, prepared)]

    def _prepare_clip(self, clip: Mapping[str, Any]) -> dict[str, Any]:
        """Validate one clip's fields and hash its files (outside any transaction)."""
        c = dict(clip)
        if c.get("length", 0) <= 0 or c.get("fps", 0) <= 0:
            raise StoreInputError(
                f"clip length and fps must be > 0, got length={c.get('length')!r}, "
                f"fps={c.get('fps')!r}"
            )
        for key in ("segment", "video"):
            path = c.get(f"{key}_path")
            if path is None:
                continue
            if c.get(f"{key}_sha256") is None:
                c[f"{key}_sha256"] = self.artifacts.sha256(path)
            c[f"{key}_path"] = normalize_relpath(path)
        c["meta"] = dict(c.get("meta") or {})
        return c

    def _insert_clips(self, s: Session, prepared: Sequence[Mapping[str, Any]]) -> list[m.Clip]:
        version_ids = {c["policy_version_id"] for c in prepared}
        found = set(s.scalars(select(m.PolicyVersion.id).where(m.PolicyVersion.id.in_(version_ids))))
        if version_ids - found:
            raise NotFoundError(f"policy version(s) {sorted(version_ids - found)} not found")
        now = self.now()
        rows = [m.Clip(created_at=now, **c) for c in prepared]
        s.add_all(rows)
        s.flush()
        return rows

    def get_clip(self, clip_id: int) -> ClipRecord:
        """Everything about a clip, ground truth included (not for annotator pages).

        Raises:
            NotFoundError: no such clip.
        """
        with self.session() as s:
            return ClipRecord.of(self._get(s, m.Clip, clip_id, "clip"))

    # ------------------------------------------------------------------ pairs

    def add_pair(
        self, project: Any, left_clip_id: int, right_clip_id: int, round: int | None = None
    ) -> int:
        """Queue two clips for comparison; returns the pair id.

        The clips must differ, come from the same policy version of this project and,
        for rollouts, from the same reset seed (DESIGN.md §3). ``round`` defaults to the
        policy version's round.

        Raises:
            NotFoundError: unknown project or clip.
            StoreInputError: the clips break one of the rules above.
        """
        return self.add_pairs(project, [(left_clip_id, right_clip_id)], round=round)[0]

    def add_pairs(
        self, project: Any, pairs: Iterable[tuple[int, int]], round: int | None = None
    ) -> list[int]:
        """Queue many pairs in one transaction; returns their ids in order.

        Raises as :meth:`add_pair`; nothing is stored if any pair is invalid.
        """
        with self.session(write=True) as s:
            proj = self._project(s, project)
            return [r.id for r in self._insert_pairs(s, proj, pairs, round)]

    def _insert_pairs(
        self,
        s: Session,
        proj: m.Project,
        pairs: Iterable[tuple[int, int]],
        round: int | None,
        status: str = "open",
    ) -> list[m.Pair]:
        pairs = [(int(a), int(b)) for a, b in pairs]
        clip_ids = {c for p in pairs for c in p}
        clips = {
            c.id: (c, pv)
            for c, pv in s.execute(
                select(m.Clip, m.PolicyVersion)
                .join(m.PolicyVersion, m.PolicyVersion.id == m.Clip.policy_version_id)
                .where(m.Clip.id.in_(clip_ids))
            )
        }
        now = self.now()
        rows = []
        for left_id, right_id in pairs:
            pair_round = self._check_pair(proj, clips, left_id, right_id)
            rows.append(
                m.Pair(
                    project_id=proj.id,
                    round=pair_round if round is None else int(round),
                    left_clip_id=left_id,
                    right_clip_id=right_id,
                    status=status,
                    created_at=now,
                    completed_at=None if status == "open" else now,
                )
            )
        s.add_all(rows)
        s.flush()
        return rows

    @staticmethod
    def _check_pair(
        proj: m.Project, clips: dict[int, tuple[m.Clip, m.PolicyVersion]], left_id: int, right_id: int
    ) -> int:
        missing = [c for c in (left_id, right_id) if c not in clips]
        if missing:
            raise NotFoundError(f"clip(s) {missing} not found")
        if left_id == right_id:
            raise StoreInputError(f"a pair needs two different clips, got {left_id} twice")
        (left, pv), (right, _) = clips[left_id], clips[right_id]
        if left.policy_version_id != right.policy_version_id:
            raise StoreInputError(
                f"clips {left_id} and {right_id} come from policy versions "
                f"{left.policy_version_id} and {right.policy_version_id}; a pair compares two "
                "rollouts of the same policy version"
            )
        if pv.project_id != proj.id:
            raise StoreInputError(
                f"clips {left_id} and {right_id} belong to project {pv.project_id}, not {proj.name!r}"
            )
        if (
            left.reset_seed is not None
            and right.reset_seed is not None
            and left.reset_seed != right.reset_seed
        ):
            raise StoreInputError(
                f"clips {left_id} and {right_id} start from reset seeds {left.reset_seed} and "
                f"{right.reset_seed}; a pair compares rollouts from the same initial state"
            )
        return pv.round

    def retire_open_pairs(self, project: Any, before_round: int | None = None) -> int:
        """Mark open pairs of rounds older than ``before_round`` as retired.

        ``before_round`` defaults to the project's latest round. Retired pairs are never
        offered again; their answers are kept. Returns the number of pairs retired.
        """
        with self.session(write=True) as s:
            proj = self._project(s, project)
            if before_round is None:
                before_round = self._latest_round(s, proj.id)
                if before_round is None:
                    return 0
            result = s.execute(
                m.Pair.__table__.update()
                .where(
                    m.Pair.project_id == proj.id,
                    m.Pair.round < before_round,
                    m.Pair.status == "open",
                )
                .values(status="retired", completed_at=self.now())
            )
            return int(result.rowcount or 0)

    def retire_pair(self, pair_id: int) -> bool:
        """Set one open pair aside (status ``retired``): it is never offered again.

        For a pair that cannot be shown, e.g. because a clip's video file is missing or
        corrupt. Its answers, if any, are kept; retired pairs do not count in
        :meth:`batch_progress`. Returns True if the pair was open and is now retired.

        Raises:
            NotFoundError: unknown pair.
        """
        with self.session(write=True) as s:
            pair = self._lock_pair(s, pair_id)
            if pair is None:
                raise NotFoundError(f"pair {pair_id!r} not found")
            if pair.status != "open":
                return False
            pair.status = "retired"
            pair.completed_at = self.now()
            s.execute(delete(m.Lease.__table__).where(m.Lease.__table__.c.pair_id == pair.id))
            return True

    # ------------------------------------------------------------------ assignment

    @staticmethod
    def _latest_round(s: Session, project_id: int, open_only: bool = False) -> int | None:
        """Highest round with pairs (with open pairs if ``open_only``), or None.

        Written as ``ORDER BY round DESC LIMIT 1`` rather than ``max(round)`` so both
        databases read one entry of the ``ix_pairs_queue`` index instead of all of them.
        """
        query = select(m.Pair.round).where(m.Pair.project_id == project_id)
        if open_only:
            query = query.where(m.Pair.status == "open")
        return s.scalar(query.order_by(m.Pair.round.desc()).limit(1))

    @staticmethod
    def _available(annotator_id: int, labels_per_pair: int, now: datetime) -> ColumnElement[bool]:
        """SQL condition: ``Pair`` is open, unanswered by the annotator, and has room."""
        answers = (
            select(func.count(m.Comparison.id))
            .where(m.Comparison.pair_id == m.Pair.id)
            .scalar_subquery()
        )
        others_leases = (
            select(func.count(m.Lease.id))
            .where(
                m.Lease.pair_id == m.Pair.id,
                m.Lease.expires_at > now,
                m.Lease.annotator_id != annotator_id,
            )
            .scalar_subquery()
        )
        answered_by_me = exists().where(
            m.Comparison.pair_id == m.Pair.id, m.Comparison.annotator_id == annotator_id
        )
        return and_(
            m.Pair.status == "open",
            ~answered_by_me,
            answers + others_leases < labels_per_pair,
        )

    def next_pair(self, project: Any, annotator: Any) -> PairView | None:
        """Lease the next pair to label to ``annotator``, or return None if none is free.

        Returns the pair of the latest round with open pairs that the annotator already
        holds (extending its lease) if there is one; otherwise leases the oldest eligible
        pair of that round (see the module docstring for the rules) for the project's
        ``lease_seconds``. Same as ``lease_pairs(project, annotator, 1)``.

        Raises:
            NotFoundError: unknown project or annotator.
        """
        pairs = self.lease_pairs(project, annotator, 1)
        return pairs[0] if pairs else None

    def lease_pairs(self, project: Any, annotator: Any, count: int = 2) -> list[PairView]:
        """Lease up to ``count`` pairs to ``annotator``: the one to show now, then the next.

        The labelling page asks for two so that it can load the next pair's videos while
        the annotator judges the current one (prefetching). The pairs the annotator
        already holds come first, oldest first, with their leases extended; the rest are
        newly leased under the rules of :meth:`next_pair`. After answering the first
        pair, the next call returns the second one first, so the order is stable.

        Returns:
            Between 0 and ``count`` pairs; fewer when the batch is running out.

        Raises:
            StoreInputError: ``count`` < 1.
            NotFoundError: unknown project or annotator.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise StoreInputError(f"count must be an int >= 1, got {count!r}")
        now = self.now()
        with self.session(write=True) as s:
            proj = self._project(s, project)
            ann = self._annotator(s, annotator)
            settings = validate_settings(proj.settings)
            expires = now + timedelta(seconds=settings["lease_seconds"])
            round_ = self._latest_round(s, proj.id, open_only=True)
            if round_ is None:
                return []
            pairs = self._renew_held_leases(s, proj.id, ann.id, now, expires, count, round_)
            while len(pairs) < count:
                pair = self._lease_new(s, ann.id, proj.id, round_, settings["labels_per_pair"], now, expires,
                                       exclude=[p.id for p in pairs])
                if pair is None:
                    break
                pairs.append(pair)
            return [self._pair_view(s, p, expires) for p in pairs]

    def _lease_new(self, s: Session, annotator_id: int, project_id: int, round_: int, labels_per_pair: int,
                   now: datetime, expires: datetime, exclude: list[int]) -> m.Pair | None:
        """Lease the oldest available pair of ``round_`` not in ``exclude``; None if none."""
        available = self._available(annotator_id, labels_per_pair, now)
        rejected = list(exclude)
        while True:
            query = (
                select(m.Pair)
                .where(m.Pair.project_id == project_id, m.Pair.round == round_, available)
                .order_by(m.Pair.id)
                .limit(1)
                .with_for_update(skip_locked=True, of=m.Pair)
                .execution_options(populate_existing=True)
            )
            if rejected:
                query = query.where(m.Pair.id.not_in(rejected))
            pair = s.scalars(query).first()
            if pair is None:
                return None
            # We hold the row lock now. On PostgreSQL the statement above ran on a
            # snapshot taken before the lock was granted; a fresh statement sees any
            # lease or answer committed by the transaction that held it before us.
            # (SQLite needs no re-check: the transaction holds the database lock.)
            if self.backend == "postgresql" and s.scalar(
                select(m.Pair.id).where(m.Pair.id == pair.id, available)
            ) is None:
                rejected.append(pair.id)
                continue
            lease = m.Lease.__table__
            s.execute(delete(lease).where(lease.c.pair_id == pair.id, lease.c.expires_at <= now))
            s.execute(
                self.insert(lease)
                .values(pair_id=pair.id, annotator_id=annotator_id, leased_at=now, expires_at=expires)
                .on_conflict_do_update(
                    index_elements=["pair_id", "annotator_id"],
                    set_={"leased_at": now, "expires_at": expires},
                )
            )
            return pair

    def _renew_held_leases(
        self, s: Session, project_id: int, annotator_id: int, now: datetime, expires: datetime, limit: int,
        round_: int,
    ) -> list[m.Pair]:
        """Renew (and return, oldest first) up to ``limit`` live leases of the annotator on
        open pairs of ``round_``; leases on older rounds are left to expire, so a new batch
        takes over from the previous one at once."""
        leases = m.Lease.__table__
        held = s.scalars(
            select(leases.c.pair_id)
            .where(leases.c.annotator_id == annotator_id, leases.c.expires_at > now)
            .order_by(leases.c.pair_id)
        ).all()
        renewed_pairs: list[m.Pair] = []
        for pair_id in held:
            if len(renewed_pairs) >= limit:
                break
            pair = self._lock_pair(s, pair_id)
            if pair is None or pair.project_id != project_id or pair.status != "open" or pair.round != round_:
                continue
            # Under the pair lock, a fresh statement: renew only a lease that is still live.
            renewed = s.execute(
                leases.update()
                .where(
                    leases.c.pair_id == pair_id,
                    leases.c.annotator_id == annotator_id,
                    leases.c.expires_at > now,
                )
                .values(expires_at=expires)
            ).rowcount
            if renewed:
                renewed_pairs.append(pair)
        return renewed_pairs

    @staticmethod
    def _lock_pair(s: Session, pair_id: int) -> m.Pair | None:
        """Load a pair with its row locked (``FOR UPDATE``; a no-op on SQLite, where the
        whole write transaction already holds the database lock)."""
        return s.scalars(
            select(m.Pair)
            .where(m.Pair.id == pair_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).first()

    def _pair_view(self, s: Session, pair: m.Pair, expires: datetime) -> PairView:
        clips = {
            c.id: c
            for c in s.scalars(
                select(m.Clip).where(m.Clip.id.in_((pair.left_clip_id, pair.right_clip_id)))
            )
        }
        left, right = clips[pair.left_clip_id], clips[pair.right_clip_id]
        return PairView(
            id=pair.id,
            project_id=pair.project_id,
            round=pair.round,
            policy_version_id=left.policy_version_id,
            left=self._clip_view(left),
            right=self._clip_view(right),
            lease_expires_at=expires,
        )

    def _clip_view(self, clip: m.Clip) -> ClipView:
        return ClipView(
            id=clip.id,
            video_file=None if clip.video_path is None else self.artifacts.resolve(clip.video_path),
            video_sha256=clip.video_sha256,
            fps=clip.fps,
            length=clip.length,
        )

    def release(self, pair_id: int, annotator: Any) -> bool:
        """Give a leased pair back without answering; True if a lease was dropped."""
        with self.session(write=True) as s:
            ann = self._annotator(s, annotator)
            lease = m.Lease.__table__
            result = s.execute(
                delete(lease).where(lease.c.pair_id == pair_id, lease.c.annotator_id == ann.id)
            )
            return bool(result.rowcount)

    def answer(
        self,
        pair_id: int,
        annotator: Any,
        outcome: Outcome | str,
        shown_at: datetime | None = None,
    ) -> ComparisonRecord:
        """Store an annotator's answer for a pair; idempotent per (pair, annotator).

        Args:
            pair_id: the pair answered.
            annotator: name, id or :class:`AnnotatorInfo`.
            outcome: ``left``, ``right``, ``equal`` or ``skip``.
            shown_at: when the pair was shown (aware, or naive UTC); None if unknown.

        Returns:
            The stored comparison. If this annotator had already answered the pair, the
            earlier answer is returned unchanged with ``created=False`` (the new outcome
            is ignored). The annotator's lease on the pair is released either way.

        Raises:
            StoreInputError: unknown outcome.
            NotFoundError: unknown pair or annotator.
            PairUnavailableError: the pair is retired, or already has
                ``labels_per_pair`` answers from others; fetch the next pair.
        """
        outcome = Outcome.parse(outcome)
        shown = None if shown_at is None else as_utc(shown_at)
        now = self.now()
        comparisons, leases = m.Comparison.__table__, m.Lease.__table__
        with self.session(write=True) as s:
            pair = self._lock_pair(s, pair_id)
            if pair is None:
                raise NotFoundError(f"pair {pair_id!r} not found")
            ann = self._annotator(s, annotator)
            drop_my_lease = delete(leases).where(
                leases.c.pair_id == pair.id, leases.c.annotator_id == ann.id
            )
            answers = s.scalars(select(m.Comparison).where(m.Comparison.pair_id == pair.id)).all()
            existing = next((c for c in answers if c.annotator_id == ann.id), None)
            if existing is not None:
                s.execute(drop_my_lease)
                return self._record(existing, created=False, pair_done=pair.status == "done")
            if pair.status != "open":
                raise PairUnavailableError(
                    f"pair {pair.id} is {pair.status} and takes no more answers; "
                    "ask for the next pair"
                )
            project = self._get(s, m.Project, pair.project_id, "project")
            k = validate_settings(project.settings)["labels_per_pair"]
            if len(answers) >= k:
                raise PairUnavailableError(
                    f"pair {pair.id} already has {len(answers)} answer(s) (labels_per_pair={k}); "
                    "ask for the next pair"
                )
            new_id = s.execute(
                self.insert(comparisons)
                .values(
                    pair_id=pair.id,
                    annotator_id=ann.id,
                    outcome=outcome.value,
                    shown_at=shown,
                    answered_at=now,
                )
                .on_conflict_do_nothing(index_elements=["pair_id", "annotator_id"])
                .returning(comparisons.c.id)
            ).scalar()
            if new_id is None:  # cannot happen under the pair lock; kept as a safety net
                existing = self._comparison(s, pair.id, ann.id)
                assert existing is not None
                s.execute(drop_my_lease)
                return self._record(existing, created=False, pair_done=pair.status == "done")
            done = len(answers) + 1 >= k
            if done:
                pair.status = "done"
                pair.completed_at = now
                s.execute(delete(leases).where(leases.c.pair_id == pair.id))
            else:
                s.execute(drop_my_lease)
            return ComparisonRecord(
                id=new_id,
                pair_id=pair.id,
                annotator_id=ann.id,
                outcome=outcome,
                shown_at=shown,
                answered_at=now,
                created=True,
                pair_done=done,
            )

    @staticmethod
    def _comparison(s: Session, pair_id: int, annotator_id: int) -> m.Comparison | None:
        return s.scalars(
            select(m.Comparison).where(
                m.Comparison.pair_id == pair_id, m.Comparison.annotator_id == annotator_id
            )
        ).first()

    @staticmethod
    def _record(row: m.Comparison, *, created: bool, pair_done: bool) -> ComparisonRecord:
        return ComparisonRecord(
            id=row.id,
            pair_id=row.pair_id,
            annotator_id=row.annotator_id,
            outcome=Outcome(row.outcome),
            shown_at=row.shown_at,
            answered_at=row.answered_at,
            created=created,
            pair_done=pair_done,
        )

    # ------------------------------------------------------------------ reporting

    def batch_progress(self, project: Any, round: int | None = None) -> tuple[int, int]:
        """Labelling progress of one round as ``(answered, total)`` answers.

        ``total`` is ``labels_per_pair`` × the round's pairs that are not retired;
        ``answered`` counts their answers (skips included, at most ``labels_per_pair``
        per pair). ``round`` defaults to the project's latest round; ``(0, 0)`` when
        the round has no pairs.
        """
        with self.session() as s:
            proj = self._project(s, project)
            k = validate_settings(proj.settings)["labels_per_pair"]
            if round is None:
                round = self._latest_round(s, proj.id)
                if round is None:
                    return (0, 0)
            counts = (
                select(m.Pair.id, func.count(m.Comparison.id).label("n"))
                .outerjoin(m.Comparison, m.Comparison.pair_id == m.Pair.id)
                .where(
                    m.Pair.project_id == proj.id,
                    m.Pair.round == round,
                    m.Pair.status != "retired",
                )
                .group_by(m.Pair.id)
            )
            per_pair = [n for _, n in s.execute(counts)]
            return (sum(min(n, k) for n in per_pair), k * len(per_pair))

    def comparisons_frame(
        self,
        project: Any,
        round: int | None = None,
        annotator: Any = None,
        *,
        include_ground_truth: bool = False,
    ) -> "pd.DataFrame":
        """Every comparison of a project as a DataFrame, one row per answer, by id.

        Columns: ``comparison_id, pair_id, round, policy_version_id, annotator_id,
        annotator, outcome, p_left`` (NaN for skips), ``shown_at, answered_at`` (UTC),
        ``left_clip_id, right_clip_id, left_seed, right_seed``; with
        ``include_ground_truth`` also ``left_return, right_return, left_success,
        right_success`` (for analysis; never show these to annotators).

        Args:
            round / annotator: optional filters.

        Raises:
            NotFoundError: unknown project or annotator.
        """
        import pandas as pd

        left, right = aliased(m.Clip), aliased(m.Clip)
        columns = [
            m.Comparison.id.label("comparison_id"),
            m.Comparison.pair_id,
            m.Pair.round,
            left.policy_version_id,
            m.Comparison.annotator_id,
            m.Annotator.name.label("annotator"),
            m.Comparison.outcome,
            m.Comparison.shown_at,
            m.Comparison.answered_at,
            m.Pair.left_clip_id,
            m.Pair.right_clip_id,
            left.reset_seed.label("left_seed"),
            right.reset_seed.label("right_seed"),
        ]
        if include_ground_truth:
            columns += [
                left.gt_return.label("left_return"),
                right.gt_return.label("right_return"),
                left.gt_success.label("left_success"),
                right.gt_success.label("right_success"),
            ]
        with self.session() as s:
            proj = self._project(s, project)
            query = (
                select(*columns)
                .join(m.Pair, m.Pair.id == m.Comparison.pair_id)
                .join(left, left.id == m.Pair.left_clip_id)
                .join(right, right.id == m.Pair.right_clip_id)
                .join(m.Annotator, m.Annotator.id == m.Comparison.annotator_id)
                .where(m.Pair.project_id == proj.id)
                .order_by(m.Comparison.id)
            )
            if round is not None:
                query = query.where(m.Pair.round == round)
            if annotator is not None:
                query = query.where(m.Comparison.annotator_id == self._annotator(s, annotator).id)
            rows = s.execute(query).all()
        names = [c.key for c in columns]
        frame = pd.DataFrame.from_records([tuple(r) for r in rows], columns=names)
        p_left = [outcome_to_p_left(o) for o in frame["outcome"]]
        frame.insert(names.index("outcome") + 1, "p_left", pd.Series(p_left, dtype="float64"))
        for col in ("shown_at", "answered_at"):
            frame[col] = pd.to_datetime(frame[col], utc=True)
        for col in ("left_seed", "right_seed"):
            frame[col] = frame[col].astype("Int64")
        return frame

    def training_pairs(self, project: Any, *, max_round: int | None = None) -> list[TrainingPair]:
        """Non-skip comparisons as ``(left clip, right clip, p_left)``, oldest first.

        A pair answered by several annotators appears once per answer.

        Args:
            max_round: only pairs of rounds ≤ this.
        """
        left, right = aliased(m.Clip), aliased(m.Clip)
        with self.session() as s:
            proj = self._project(s, project)
            query = (
                select(m.Comparison.outcome, left, right)
                .join(m.Pair, m.Pair.id == m.Comparison.pair_id)
                .join(left, left.id == m.Pair.left_clip_id)
                .join(right, right.id == m.Pair.right_clip_id)
                .where(m.Pair.project_id == proj.id, m.Comparison.outcome != Outcome.SKIP.value)
                .order_by(m.Comparison.id)
            )
            if max_round is not None:
                query = query.where(m.Pair.round <= max_round)
            out = []
            for outcome, lclip, rclip in s.execute(query):
                p = outcome_to_p_left(outcome)
                assert p is not None
                out.append(TrainingPair(ClipRecord.of(lclip), ClipRecord.of(rclip), p))
            return out

    def count_training_pairs(self, project: Any, *, max_round: int | None = None) -> int:
        """``len(training_pairs(project, max_round=...))`` as one COUNT query (no clip records loaded)."""
        with self.session() as s:
            proj = self._project(s, project)
            query = (
                select(func.count(m.Comparison.id))
                .join(m.Pair, m.Pair.id == m.Comparison.pair_id)
                .where(m.Pair.project_id == proj.id, m.Comparison.outcome != Outcome.SKIP.value)
            )
            if max_round is not None:
                query = query.where(m.Pair.round <= max_round)
            return int(s.execute(query).scalar_one())

    def annotator_stats(self, project: Any) -> "pd.DataFrame":
        """Per-annotator answer counts and rates for a project.

        Returns:
            One row per annotator (index: annotator name) with ``annotator_id,
            n_answers, n_left, n_right, n_equal, n_skip``, ``tie_rate`` (equal / all),
            ``skip_rate`` (skip / all), ``left_rate`` (left / (left + right); 0.5 means
            no side bias, NaN without decisive answers) and ``median_seconds`` (median
            time from shown to answered, NaN when unknown).
        """
        import pandas as pd

        frame = self.comparisons_frame(project)
        columns = [
            "annotator_id", "n_answers", "n_left", "n_right", "n_equal", "n_skip",
            "tie_rate", "skip_rate", "left_rate", "median_seconds",
        ]  # fmt: skip
        rows = {}
        for name, group in frame.groupby("annotator", sort=True):
            counts = group["outcome"].value_counts()
            n = len(group)
            n_left, n_right = int(counts.get("left", 0)), int(counts.get("right", 0))
            seconds = (group["answered_at"] - group["shown_at"]).dt.total_seconds()
            rows[name] = [
                int(group["annotator_id"].iloc[0]),
                n,
                n_left,
                n_right,
                int(counts.get("equal", 0)),
                int(counts.get("skip", 0)),
                counts.get("equal", 0) / n,
                counts.get("skip", 0) / n,
                n_left / (n_left + n_right) if n_left + n_right else float("nan"),
                float(seconds.median()) if seconds.notna().any() else float("nan"),
            ]
        stats = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
        stats.index.name = "annotator"
        return stats

    def pairwise_agreement(self, project: Any) -> "pd.DataFrame":
        """How often two annotators gave the same non-skip answer on the same pair.

        Returns:
            One row per annotator pair that shares at least one pair where both gave a
            non-skip answer: ``annotator_a, annotator_b`` (alphabetical), ``n_shared``,
            ``n_agree`` and ``agreement = n_agree / n_shared``. Empty when no pair has
            overlapping labels.
        """
        import pandas as pd

        frame = self.comparisons_frame(project)
        frame = frame[frame["outcome"] != Outcome.SKIP.value]
        tally: dict[tuple[str, str], list[int]] = {}
        for _, group in frame.groupby("pair_id"):
            answers = sorted(zip(group["annotator"], group["outcome"]))
            for (a, oa), (b, ob) in itertools.combinations(answers, 2):
                shared = tally.setdefault((a, b), [0, 0])
                shared[0] += 1
                shared[1] += int(oa == ob)
        records = [
            (a, b, n, agree, agree / n) for (a, b), (n, agree) in sorted(tally.items())
        ]
        return pd.DataFrame.from_records(
            records, columns=["annotator_a", "annotator_b", "n_shared", "n_agree", "agreement"]
        )
