"""Job queue: background work (training, rendering) that never blocks labelling.

Life of a job::

    queued --claim--> running --finish--> succeeded
       |                 |------fail----> failed
       |                 |--(handler acknowledges cancel)--> cancelled
       |                 |--release (its worker was asked to stop)--> queued again
       |                 '--recover_stale--> failed, or queued again (attempts < max_attempts)
       '--cancel--> cancelled

* :class:`JobQueue` (``store.jobs``) holds the transitions. :meth:`JobQueue.claim` is atomic
  across threads and processes (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN
  IMMEDIATE`` on SQLite): each queued job is handed to exactly one worker.
* A running job proves it is alive by heart-beating (:meth:`JobQueue.heartbeat`). When a
  worker dies (SIGKILL, OOM, power loss) its heartbeat stops, and
  :meth:`JobQueue.recover_stale` marks the job failed (or queues it again) with the reason
  ``worker heartbeat lost (last seen …)``. Workers run it while idle.
* Transitions that come from a worker (heartbeat, finish, fail) are fenced by
  ``worker_id``: once a job was recovered or re-claimed, the old worker gets
  :class:`~fkpd.store.errors.JobLostError` and its late result is discarded.
* The worker that runs the jobs (:class:`fkpd.store.worker.Worker`, started by ``fkpd
  worker``) puts a job it cannot finish because it was asked to stop back in the queue
  (:meth:`JobQueue.release`).
* Every transition appends an event to the job's ``history`` (``queued``, ``claimed``,
  ``released``, ``recovered``, ``failed``, ``succeeded``, ``cancelled``, each with its
  time, attempt, worker and reason), so ``message`` and ``error`` may be overwritten by
  the next attempt while the story of every attempt stays in the row.
* Parameters and results are strict JSON: NaN, Infinity and values JSON cannot hold are
  refused (:class:`~fkpd.store.errors.StoreInputError`) before anything is written, so a
  job behaves the same on SQLite and on PostgreSQL (whose JSON has no NaN).

Handlers are plain callables ``handler(ctx: JobContext) -> dict | None`` (``ctx`` is a
:class:`fkpd.store.worker.JobContext`; the returned mapping must be JSON-serialisable; it
becomes the job's ``result``), registered per kind in :data:`HANDLERS`, typically from the
module that implements them::

    from fkpd.store import register_handler

    @register_handler("alignment_round")
    def alignment_round(ctx):
        for step in range(n):
            ...
            ctx.progress((step + 1) / n, f"step {step + 1}/{n}")
            ctx.check_cancelled()
        return {"policy_version_id": new_id}

and ``run_worker(store, handler_modules=["that.module"])`` imports such modules first.

The queue needs only the store's plumbing (:class:`QueueDatabase`: sessions, the clock,
project lookup), so it does not import :class:`fkpd.store.Store`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Callable, ContextManager, Iterable, Mapping, MutableMapping, Protocol, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from fkpd.store import models as m
from fkpd.store.errors import JobLostError, NotFoundError, StoreInputError
from fkpd.store.jobrecords import json_mapping, record_event
from fkpd.store.views import TERMINAL_STATUSES, JobView

__all__ = [
    "HANDLERS",
    "TERMINAL_STATUSES",
    "Handler",
    "JobQueue",
    "JobView",
    "QueueDatabase",
    "check_progress",
    "record_event",
    "register_handler",
]

#: A job handler: called with the :class:`fkpd.store.worker.JobContext` of a claimed job;
#: returns the job's JSON-serialisable result, or None.
Handler = Callable[[Any], "Mapping[str, Any] | None"]

#: The default handler registry, ``{kind: handler}``; fill it with :func:`register_handler`.
HANDLERS: dict[str, Handler] = {}

_MAX_KIND_LEN = 64


def register_handler(
    kind: str,
    func: Handler | None = None,
    *,
    replace: bool = False,
    registry: MutableMapping[str, Handler] | None = None,
) -> Any:
    """Register ``func`` as the handler of jobs of ``kind``; usable as a decorator.

    Args:
        kind: job kind, e.g. ``"bootstrap"`` or ``"alignment_round"``.
        func: the handler; omit to use ``@register_handler(kind)``.
        replace: allow replacing an existing handler of that kind.
        registry: where to register (default :data:`HANDLERS`).

    Returns:
        ``func`` (or, as a decorator, a function that registers and returns it).

    Raises:
        StoreInputError: ``kind`` is empty/too long, or already has a different handler
            and ``replace`` is False.
    """
    table = HANDLERS if registry is None else registry
    _check_kind(kind)

    def add(handler: Handler) -> Handler:
        current = table.get(kind)
        if current is not None and current is not handler and not replace:
            raise StoreInputError(
                f"job kind {kind!r} already has handler {_qualname(current)}; pass "
                "replace=True to override it"
            )
        table[kind] = handler
        return handler

    return add if func is None else add(func)


def _check_kind(kind: str) -> None:
    if not isinstance(kind, str) or not kind.strip() or len(kind) > _MAX_KIND_LEN:
        raise StoreInputError(
            f"job kind must be a non-empty string of at most {_MAX_KIND_LEN} characters, got {kind!r}"
        )


def _qualname(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}"


def check_progress(progress: float) -> float:
    """``progress`` as a float.

    Raises:
        StoreInputError: ``progress`` is not a number in [0, 1].
    """
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
        raise StoreInputError(f"progress must be a number in [0, 1], got {progress!r}")
    return float(progress)


class QueueDatabase(Protocol):
    """What :class:`JobQueue` uses of the store (:class:`fkpd.store.core.StoreCore`)."""

    def session(self, write: bool = False) -> ContextManager[Session]:
        """A session in one transaction (``write=True`` for read-then-write ones)."""
        ...

    def now(self) -> datetime:
        """Current time, aware UTC."""
        ...

    def project_row(self, s: Session, project: Any) -> m.Project:
        """The project row for a name, an id or a ``ProjectInfo``; raises ``NotFoundError``."""
        ...


class JobQueue:
    """Job transitions on a store's database; get it as ``store.jobs``.

    Args:
        store: the store (any :class:`QueueDatabase`, in practice the
            :class:`fkpd.store.Store` whose ``jobs`` this is).
    """

    def __init__(self, store: QueueDatabase) -> None:
        self.store = store

    # ------------------------------------------------------------------ helpers

    def _locked(self, s: Session, job_id: int) -> m.Job:
        job = s.scalars(
            select(m.Job)
            .where(m.Job.id == job_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).first()
        if job is None:
            raise NotFoundError(f"job {job_id!r} not found")
        return job

    def _owned(self, s: Session, job_id: int, worker_id: str | None) -> m.Job:
        job = self._locked(s, job_id)
        if job.status != "running" or (worker_id is not None and job.worker_id != worker_id):
            owner = "" if worker_id is None else f" under worker {worker_id!r}"
            detail = f" ({job.error.splitlines()[0]})" if job.error else ""
            raise JobLostError(
                f"job {job_id} is no longer running{owner}: status {job.status}, worker "
                f"{job.worker_id!r}{detail}; stop working on it"
            )
        return job

    # ------------------------------------------------------------------ queue side

    @staticmethod
    def prepare(kind: str, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """Check a job's kind and parameters before any transaction; returns the params as
        plain JSON (a deep copy).

        Raises:
            StoreInputError: bad kind, or params that are not strict JSON (NaN, Infinity,
                a set, a non-string key, ...); nothing is written.
        """
        _check_kind(kind)
        clean = json_mapping(params or {}, "job params")
        assert clean is not None
        return clean

    def insert(self, s: Session, project: m.Project, kind: str, params: dict[str, Any]) -> m.Job:
        """Add a queued job in the caller's transaction ``s`` (``params`` from :meth:`prepare`).

        For store code that creates a job together with other rows in one transaction
        (:meth:`fkpd.store.Store.create_project` with a first job).
        """
        now = self.store.now()
        job = m.Job(
            project_id=project.id,
            kind=kind,
            params=params,
            status="queued",
            progress=0.0,
            message="",
            attempts=0,
            cancel_requested=False,
            created_at=now,
            history=[],
        )
        record_event(job, "queued", now)
        s.add(job)
        s.flush()
        return job

    def enqueue(self, project: Any, kind: str, params: Mapping[str, Any] | None = None) -> JobView:
        """Queue a job.

        Args:
            project: project name or id.
            kind: handler kind (see :data:`HANDLERS`).
            params: strict-JSON parameters, handed to the handler as ``ctx.params``.

        Raises:
            NotFoundError: unknown project.
            StoreInputError: bad kind, or params that are not strict JSON (NaN and
                Infinity included); nothing is written.
        """
        clean = self.prepare(kind, params)
        with self.store.session(write=True) as s:
            proj = self.store.project_row(s, project)
            return JobView.of(self.insert(s, proj, kind, clean))

    def enqueue_unless(
        self,
        project: Any,
        kind: str,
        params: Mapping[str, Any] | None = None,
        *,
        statuses: Iterable[str] = ("queued", "running", "succeeded"),
    ) -> JobView | None:
        """Queue a job of ``kind`` unless the project already has one in ``statuses``;
        the check and the insert are one transaction (the project row is locked on
        PostgreSQL), so two processes calling it at once queue one job.

        Returns:
            The new job, or None when one of ``kind`` in ``statuses`` exists.

        Raises:
            NotFoundError: unknown project.
            StoreInputError: bad kind or params (as :meth:`enqueue`).
        """
        clean = self.prepare(kind, params)
        wanted = list(statuses)
        with self.store.session(write=True) as s:
            proj = self.store.project_row(s, project)
            s.execute(select(m.Project.id).where(m.Project.id == proj.id).with_for_update())
            existing = s.scalar(
                select(m.Job.id)
                .where(m.Job.project_id == proj.id, m.Job.kind == kind, m.Job.status.in_(wanted))
                .limit(1)
            )
            if existing is not None:
                return None
            return JobView.of(self.insert(s, proj, kind, clean))

    def get(self, job_id: int) -> JobView:
        """A job by id.

        Raises:
            NotFoundError: no such job.
        """
        with self.store.session() as s:
            job = s.get(m.Job, job_id)
            if job is None:
                raise NotFoundError(f"job {job_id!r} not found")
            return JobView.of(job)

    def list(
        self, project: Any = None, *, status: str | Iterable[str] | None = None, limit: int = 100
    ) -> list[JobView]:
        """Jobs, newest first, optionally of one project and/or with given status(es)."""
        with self.store.session() as s:
            query = select(m.Job).order_by(m.Job.id.desc()).limit(limit)
            if project is not None:
                query = query.where(m.Job.project_id == self.store.project_row(s, project).id)
            if status is not None:
                statuses = [status] if isinstance(status, str) else list(status)
                query = query.where(m.Job.status.in_(statuses))
            return [JobView.of(j) for j in s.scalars(query)]

    def cancel(self, job_id: int) -> JobView:
        """Cancel a job: a queued job is cancelled at once; a running one is asked to stop
        (``cancel_requested``; its handler sees ``ctx.cancelled()``); a finished job is
        returned unchanged.

        Raises:
            NotFoundError: no such job.
        """
        with self.store.session(write=True) as s:
            job = self._locked(s, job_id)
            if job.status == "queued":
                job.status = "cancelled"
                job.finished_at = self.store.now()
                job.message = "cancelled before it started"
                record_event(job, "cancelled", job.finished_at, job.message)
            elif job.status == "running":
                job.cancel_requested = True
            s.flush()
            return JobView.of(job)

    # ------------------------------------------------------------------ worker side

    def claim(self, worker_id: str, kinds: Sequence[str] | None = None) -> JobView | None:
        """Atomically take the oldest queued job (of ``kinds``, if given) for a worker.

        The job becomes ``running`` with ``started_at`` and ``heartbeat_at`` set to now,
        ``worker_id`` recorded and ``attempts`` incremented. Returns None when nothing is
        queued. Safe under any number of concurrent workers: each job is claimed once.

        Raises:
            StoreInputError: empty ``worker_id``.
        """
        if not isinstance(worker_id, str) or not worker_id.strip():
            raise StoreInputError(f"worker_id must be a non-empty string, got {worker_id!r}")
        if kinds is not None and not kinds:
            return None
        with self.store.session(write=True) as s:
            query = (
                select(m.Job)
                .where(m.Job.status == "queued")
                .order_by(m.Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
                .execution_options(populate_existing=True)
            )
            if kinds is not None:
                query = query.where(m.Job.kind.in_(list(kinds)))
            job = s.scalars(query).first()
            if job is None:
                return None
            now = self.store.now()
            job.status = "running"
            job.worker_id = worker_id
            job.started_at = now
            job.heartbeat_at = now
            job.finished_at = None
            job.attempts += 1
            job.progress = 0.0
            job.message = f"started by {worker_id} (attempt {job.attempts})"
            record_event(job, "claimed", now, job.message)
            s.flush()
            return JobView.of(job)

    def heartbeat(
        self,
        job_id: int,
        progress: float | None = None,
        message: str | None = None,
        *,
        worker_id: str | None = None,
    ) -> JobView:
        """Record that a running job is alive, with optional progress (0..1) and message.

        Returns:
            The job; check ``cancel_requested`` to learn whether to stop.

        Raises:
            StoreInputError: progress outside [0, 1].
            JobLostError: the job is not running (under ``worker_id``, if given).
        """
        if progress is not None:
            progress = check_progress(progress)
        with self.store.session(write=True) as s:
            job = self._owned(s, job_id, worker_id)
            job.heartbeat_at = self.store.now()
            if progress is not None:
                job.progress = progress
            if message is not None:
                job.message = message
            s.flush()
            return JobView.of(job)

    def check_owner(self, job_id: int, worker_id: str, attempt: int | None = None) -> None:
        """Fence for a worker about to write on a job's behalf (artifacts, rows).

        Raises:
            JobLostError: the job is not running under ``worker_id`` (recovered as stale,
                claimed again, finished or cancelled meanwhile), or, when ``attempt`` is
                given, it runs a later attempt than ``attempt``.
            NotFoundError: no such job.
        """
        with self.store.session() as s:
            job = s.get(m.Job, job_id)
            if job is None:
                raise NotFoundError(f"job {job_id!r} not found")
            if job.status == "running" and job.worker_id == worker_id and (attempt is None or job.attempts == attempt):
                return
            raise JobLostError(
                f"job {job_id} is no longer this worker's (attempt {attempt}): it is {job.status} under worker "
                f"{job.worker_id!r}, attempt {job.attempts}; stop writing on its behalf"
            )

    def finish(
        self, job_id: int, result: Mapping[str, Any] | None = None, *, worker_id: str | None = None
    ) -> JobView:
        """Mark a running job succeeded with a JSON-serialisable ``result``.

        Raises:
            StoreInputError: ``result`` is not a JSON-serialisable mapping.
            JobLostError: the job is not running (under ``worker_id``, if given).
        """
        clean = json_mapping(result, "job result")
        with self.store.session(write=True) as s:
            job = self._owned(s, job_id, worker_id)
            now = self.store.now()
            job.status = "succeeded"
            job.result = clean
            job.progress = 1.0
            job.error = None
            job.heartbeat_at = now
            job.finished_at = now
            record_event(job, "succeeded", now)
            s.flush()
            return JobView.of(job)

    def fail(self, job_id: int, error: str, *, worker_id: str | None = None) -> JobView:
        """Mark a running job failed; ``error`` should hold the exception and traceback.

        Raises:
            JobLostError: the job is not running (under ``worker_id``, if given).
        """
        return self._end(job_id, "failed", worker_id, error=str(error) or "failed without a message")

    def mark_cancelled(self, job_id: int, *, worker_id: str | None = None) -> JobView:
        """Mark a running job cancelled (its handler stopped after :meth:`cancel`).

        Raises:
            JobLostError: the job is not running (under ``worker_id``, if given).
        """
        return self._end(job_id, "cancelled", worker_id, message="cancelled while running")

    def release(self, job_id: int, reason: str, *, worker_id: str | None = None) -> JobView:
        """Put a running job back in the queue because its worker is stopping.

        The job becomes ``queued`` again (worker, start and heartbeat cleared, progress 0,
        ``message`` = ``"<reason>; queued again"``); ``attempts`` keeps counting claims. A
        job asked to cancel is marked cancelled instead.

        Raises:
            JobLostError: the job is not running (under ``worker_id``, if given).
        """
        with self.store.session(write=True) as s:
            job = self._owned(s, job_id, worker_id)
            now = self.store.now()
            if job.cancel_requested:
                job.status = "cancelled"
                job.finished_at = job.heartbeat_at = now
                job.message = "cancelled while running"
                record_event(job, "cancelled", now, job.message)
            else:
                record_event(job, "released", now, reason)
                job.status = "queued"
                job.worker_id = None
                job.started_at = None
                job.heartbeat_at = None
                job.progress = 0.0
                job.message = f"{reason}; queued again"
            s.flush()
            return JobView.of(job)

    def _end(
        self,
        job_id: int,
        status: str,
        worker_id: str | None,
        *,
        error: str | None = None,
        message: str | None = None,
    ) -> JobView:
        with self.store.session(write=True) as s:
            job = self._owned(s, job_id, worker_id)
            now = self.store.now()
            job.status = status
            job.heartbeat_at = now
            job.finished_at = now
            if error is not None:
                job.error = error
                job.message = error.strip().splitlines()[0][:500]
            if message is not None:
                job.message = message
            record_event(job, status, now, job.message)
            s.flush()
            return JobView.of(job)

    def recover_stale(self, timeout_s: float, *, max_attempts: int = 1) -> list[JobView]:
        """Fail or requeue running jobs whose worker stopped heart-beating.

        A running job whose ``heartbeat_at`` is older than ``timeout_s`` gets the reason
        ``worker heartbeat lost (last seen <time> by worker <id>)`` in ``error`` and
        ``message``; it is queued again if it was claimed fewer than ``max_attempts``
        times and not asked to cancel, else marked failed.

        Args:
            timeout_s: heartbeat age that counts as dead; keep it several heartbeat
                intervals long.
            max_attempts: total claims a job may get (1 = never retry).

        Returns:
            The recovered jobs after the change.

        Raises:
            StoreInputError: ``timeout_s`` ≤ 0 or ``max_attempts`` < 1.
        """
        if not timeout_s > 0:
            raise StoreInputError(f"timeout_s must be > 0, got {timeout_s!r}")
        if max_attempts < 1:
            raise StoreInputError(f"max_attempts must be >= 1, got {max_attempts!r}")
        recovered = []
        with self.store.session(write=True) as s:
            now = self.store.now()
            cutoff = now - timedelta(seconds=timeout_s)
            stale = s.scalars(
                select(m.Job)
                .where(m.Job.status == "running", m.Job.heartbeat_at < cutoff)
                .order_by(m.Job.id)
                .with_for_update(skip_locked=True)
                .execution_options(populate_existing=True)
            ).all()
            for job in stale:
                last = job.heartbeat_at
                reason = (
                    f"worker heartbeat lost (last seen {last.isoformat(timespec='seconds')}, "
                    f"{(now - last).total_seconds():.1f} s ago, by worker {job.worker_id!r})"
                )
                job.error = reason
                record_event(job, "recovered", now, reason)
                if job.attempts < max_attempts and not job.cancel_requested:
                    job.status = "queued"
                    job.message = f"{reason}; queued again (attempt {job.attempts} of {max_attempts} failed)"
                    job.worker_id = None
                    job.started_at = None
                    job.heartbeat_at = None
                    job.progress = 0.0
                else:
                    job.status = "failed"
                    job.message = reason
                    job.finished_at = now
                    record_event(job, "failed", now, reason)
                recovered.append(job)
            s.flush()
            return [JobView.of(j) for j in recovered]
