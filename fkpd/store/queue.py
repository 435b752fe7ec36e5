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

import json
from datetime import datetime, timedelta
from typing import Any, Callable, ContextManager, Iterable, Mapping, MutableMapping, Protocol, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from fkpd.store import models as m
from fkpd.store.errors import JobLostError, NotFoundError, StoreInputError
from fkpd.store.views import TERMINAL_STATUSES, JobView

__all__ = [
    "HANDLERS",
    "TERMINAL_STATUSES",
    "Handler",
    "JobQueue",
    "JobView",
    "QueueDatabase",
    "check_progress",
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


def _json_mapping(value: Mapping[str, Any] | None, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise StoreInputError(f"{what} must be a mapping (dict) or None, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as exc:
        raise StoreInputError(f"{what} must be JSON-serialisable: {exc}") from None


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

    def enqueue(self, project: Any, kind: str, params: Mapping[str, Any] | None = None) -> JobView:
        """Queue a job.

        Args:
            project: project name or id.
            kind: handler kind (see :data:`HANDLERS`).
            params: JSON-serialisable parameters, handed to the handler as ``ctx.params``.

        Raises:
            NotFoundError: unknown project.
            StoreInputError: bad kind or params that are not JSON-serialisable.
        """
        _check_kind(kind)
        clean = _json_mapping(params or {}, "job params")
        with self.store.session(write=True) as s:
            proj = self.store.project_row(s, project)
            job = m.Job(
                project_id=proj.id,
                kind=kind,
                params=clean,
                status="queued",
                progress=0.0,
                message="",
                attempts=0,
                cancel_requested=False,
                created_at=self.store.now(),
            )
            s.add(job)
            s.flush()
            return JobView.of(job)

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

    def finish(
        self, job_id: int, result: Mapping[str, Any] | None = None, *, worker_id: str | None = None
    ) -> JobView:
        """Mark a running job succeeded with a JSON-serialisable ``result``.

        Raises:
            StoreInputError: ``result`` is not a JSON-serialisable mapping.
            JobLostError: the job is not running (under ``worker_id``, if given).
        """
        clean = _json_mapping(result, "job result")
        with self.store.session(write=True) as s:
            job = self._owned(s, job_id, worker_id)
            now = self.store.now()
            job.status = "succeeded"
            job.result = clean
            job.progress = 1.0
            job.error = None
            job.heartbeat_at = now
            job.finished_at = now
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
            if job.cancel_requested:
                job.status = "cancelled"
                job.finished_at = job.heartbeat_at = self.store.now()
                job.message = "cancelled while running"
            else:
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
                recovered.append(job)
            s.flush()
            return [JobView.of(j) for j in recovered]
