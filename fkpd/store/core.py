"""Engine and session plumbing of the preference store, and the row lookups every part uses.

:class:`StoreCore` is the base of :class:`fkpd.store.Store`: it opens the database (and
migrates it), hands out sessions (:meth:`StoreCore.session`), knows the clock
(:meth:`StoreCore.now`) and the artifact directory, and resolves a project, annotator or
row given by name, id or view (:meth:`StoreCore.project_row`,
:meth:`StoreCore.annotator_row`, :meth:`StoreCore.get_row`), which the catalogue,
assignment and report mixins, the job queue (:mod:`fkpd.store.queue`) and label
importers (:mod:`fkpd.prefs.importers`) build on.

It is thread-safe (one engine with a connection pool; every method runs its own short
transaction) and may be created in many processes against the same database. A forked
child (e.g. a DataLoader worker) drops the inherited connections and opens its own.

On SQLite every writing transaction (``session(write=True)``) starts with ``BEGIN
IMMEDIATE`` (see :mod:`fkpd.store.db`), which serialises writers across threads and
processes, and writers queue on a file lock so none of them starves
(:class:`fkpd.store.db.SqliteWriteGate`).
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from sqlalchemy import Table, select
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError
from sqlalchemy.orm import Session

from fkpd.store import models as m
from fkpd.store.artifact_stores import open_artifacts
from fkpd.store.artifacts import ArtifactData, ArtifactStore
from fkpd.store.db import (
    WRITE,
    default_database_url,
    init_db,
    make_engine,
    sqlite_write_gate,
)
from fkpd.store.errors import NotFoundError, StoreInputError, StoreUnavailableError
from fkpd.store.models import as_utc, utcnow
from fkpd.store.queue import JobQueue
from fkpd.store.views import AnnotatorInfo, ProjectInfo

#: Settings every project has; :meth:`Store.create_project` fills in what is not given.
#: ``labels_per_pair``: answers that complete a pair; ``lease_seconds``: how long a pair
#: handed out stays reserved; ``second_opinions``: answers a completed pair may take
#: beyond ``labels_per_pair`` from other annotators, handed out only when no open pair is
#: free for them (:meth:`fkpd.store.Store.lease_pairs`; 0: never).
DEFAULT_SETTINGS: dict[str, Any] = {"labels_per_pair": 1, "lease_seconds": 120.0, "second_opinions": 1}


def validate_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``DEFAULT_SETTINGS`` updated with ``settings``, after checking known keys.

    Raises:
        StoreInputError: ``labels_per_pair`` is not an int ≥ 1, ``lease_seconds`` is
            not a number > 0, or ``second_opinions`` is not an int ≥ 0.
    """
    merged = {**DEFAULT_SETTINGS, **dict(settings)}
    labels = merged["labels_per_pair"]
    if isinstance(labels, bool) or not isinstance(labels, int) or labels < 1:
        raise StoreInputError(f"labels_per_pair must be an integer >= 1, got {labels!r}")
    lease = merged["lease_seconds"]
    if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not lease > 0:
        raise StoreInputError(f"lease_seconds must be a number > 0, got {lease!r}")
    merged["lease_seconds"] = float(lease)
    extra = merged["second_opinions"]
    if isinstance(extra, bool) or not isinstance(extra, int) or extra < 0:
        raise StoreInputError(f"second_opinions must be an integer >= 0, got {extra!r}")
    return merged


_ENGINES: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _drop_inherited_connections() -> None:
    """In a forked child, drop (without closing) the connections inherited from the
    parent, so the child never talks on, or shuts down, the parent's sockets; a child
    that uses a store opens fresh connections."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_drop_inherited_connections)


def clean_name(name: str, what: str) -> str:
    """``name`` without surrounding spaces.

    Raises:
        StoreInputError: ``name`` is not a string, is empty or only whitespace, or is
            longer than :data:`fkpd.store.models.NAME_LEN` characters (``what`` names it
            in the message: ``"project"``, ``"annotator"``).
    """
    if not isinstance(name, str) or not name.strip():
        raise StoreInputError(f"{what} name must be a non-empty string, got {name!r}")
    name = name.strip()
    if len(name) > m.NAME_LEN:
        raise StoreInputError(f"{what} name is {len(name)} characters; at most {m.NAME_LEN} allowed")
    return name


def unavailable(url: URL, exc: BaseException) -> StoreUnavailableError:
    """The :class:`StoreUnavailableError` for a database that could not be opened:
    which one (password hidden), the driver's first line, and what to do."""
    shown = url.render_as_string(hide_password=True)
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    first = detail[0] if detail else type(exc).__name__
    if url.get_backend_name() == "sqlite":
        if "not a database" in first or "malformed" in first:
            hint = (f"the file {url.database} is not an FKPD Studio (SQLite) database; move it away, or point "
                    "FKPD_DATABASE_URL / --database-url at the right file")
        else:
            hint = ("check that the path is right and writable (FKPD_DATABASE_URL / --database-url), and that the "
                    "disk is not full")
    else:
        hint = ("check that the database server is running and reachable, and that FKPD_DATABASE_URL / "
                "--database-url names the right host, port, user and database")
    return StoreUnavailableError(f"cannot open the database {shown}: {first}; {hint}")


_S = TypeVar("_S", bound="StoreCore")


class StoreCore:
    """Database and artifact plumbing of :class:`fkpd.store.Store` (its base class); the
    arguments are documented there.
    """


    def __init__(
        self,
        url: str | URL | None = None,
        artifact_dir: str | os.PathLike[str] | ArtifactStore | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
        migrate: bool = True,
        engine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            self.url = make_url(url or default_database_url())
        except (ArgumentError, ValueError) as exc:
            raise StoreInputError(
                f"{url or default_database_url()!r} is not a database URL ({exc}); use "
                "sqlite:///path/to/file.sqlite or postgresql+psycopg://user@host/db"
            ) from None
        try:
            self.engine = make_engine(self.url, **dict(engine_kwargs or {}))
        except OSError as exc:  # the SQLite file's folder cannot be created
            raise unavailable(self.url, exc) from None
        self._write_gate = sqlite_write_gate(self.url)
        _ENGINES.add(self.engine)
        self.artifacts: ArtifactStore = open_artifacts(artifact_dir)
        self._clock = clock or utcnow
        self._jobs: JobQueue | None = None
        if migrate:
            try:
                init_db(self.engine)
            except (DBAPIError, OSError) as exc:
                self.engine.dispose()
                raise unavailable(self.url, exc) from None
            except BaseException:
                self.engine.dispose()
                raise

    # ------------------------------------------------------------------ plumbing

    def __repr__(self) -> str:
        return (
            f"Store(url={self.url.render_as_string(hide_password=True)!r}, "
            f"artifact_dir={self.artifacts.location!r})"
        )

    def __enter__(self: _S) -> _S:
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
        """Absolute artifact directory; for a remote store (``FKPD_ARTIFACT_URL``), the
        local staging directory its jobs write folders in (:meth:`ArtifactStore.workdir`)."""
        return self.artifacts.root

    @property
    def artifact_location(self) -> str:
        """Where the artifacts are, for messages: the directory or the URL."""
        return self.artifacts.location

    @property
    def jobs(self) -> JobQueue:
        """The job queue on this store's database (:class:`fkpd.store.queue.JobQueue`)."""
        if self._jobs is None:
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
        """Write an artifact atomically; see :meth:`ArtifactStore.write_atomic`.

        Returns:
            ``(relpath, sha256)`` to pass to :meth:`Store.add_clip` or
            :meth:`Store.add_policy_version`.
        """
        return self.artifacts.write_atomic(relpath, data, to_path=to_path)

    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """Absolute path of an artifact in a local artifact directory.

        Code that must also work with a remote store reads through
        ``store.artifacts.read_bytes`` / ``local_file`` and writes folders under
        ``store.artifacts.workdir`` instead (:class:`ArtifactStore`).

        Raises:
            ArtifactPathError: the path is absolute, contains ``..``, or escapes the
                artifact directory; or the store is remote.
        """
        return self.artifacts.resolve(relpath)

    # ------------------------------------------------------------------ lookups

    def project_row(self, s: Session, project: Any) -> m.Project:
        """The project row for a name (surrounding spaces ignored), an id or a
        :class:`ProjectInfo`, in session ``s``.

        Raises:
            StoreInputError: ``project`` is none of those.
            NotFoundError: no such project (the message lists up to 20 existing ones).
        """
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

    def annotator_row(self, s: Session, annotator: Any) -> m.Annotator:
        """The annotator row for a name (surrounding spaces ignored), an id or an
        :class:`AnnotatorInfo`, in session ``s``.

        Raises:
            StoreInputError: ``annotator`` is none of those, or an empty name.
            NotFoundError: no such annotator.
        """
        if isinstance(annotator, AnnotatorInfo):
            annotator = annotator.id
        if isinstance(annotator, int) and not isinstance(annotator, bool):
            row = s.get(m.Annotator, annotator)
        elif isinstance(annotator, str):
            name = clean_name(annotator, "annotator")
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
    def get_row(s: Session, model: type, key: int, what: str) -> Any:
        """The ``model`` row with primary key ``key``, in session ``s``.

        Raises:
            NotFoundError: no such row (``"<what> <key> not found"``).
        """
        row = s.get(model, key)
        if row is None:
            raise NotFoundError(f"{what} {key!r} not found")
        return row

    # ------------------------------------------------------------------ shared pair queries

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
    def _lock_pair(s: Session, pair_id: int) -> m.Pair | None:
        """Load a pair with its row locked (``FOR UPDATE``; a no-op on SQLite, where the
        whole write transaction already holds the database lock)."""
        return s.scalars(
            select(m.Pair)
            .where(m.Pair.id == pair_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).first()

