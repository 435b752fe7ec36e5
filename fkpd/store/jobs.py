"""Job queue and worker: background work (training, rendering) that never blocks labelling.

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
* :class:`Worker` loops claim → run the handler in this process, with a heartbeat thread
  → finish / fail (exception text and traceback stored in ``error``). A worker asked to
  stop (its ``stop`` event: Ctrl-C, SIGTERM, the app that started it exited) makes the
  handler's next ``ctx.check_cancelled()`` raise :class:`~fkpd.store.errors.WorkerStopping`
  and puts the job back in the queue (:meth:`JobQueue.release`); handlers must be safe to
  re-run anyway, since a worker can die at any instruction.

Handlers are plain callables ``handler(ctx: JobContext) -> dict | None`` (the returned
mapping must be JSON-serialisable; it becomes the job's ``result``), registered per kind
in :data:`HANDLERS`, typically from the module that implements them::

    from fkpd.store.jobs import register_handler

    @register_handler("alignment_round")
    def alignment_round(ctx):
        for step in range(n):
            ...
            ctx.progress((step + 1) / n, f"step {step + 1}/{n}")
            ctx.check_cancelled()
        return {"policy_version_id": new_id}

and ``run_worker(store, handler_modules=["that.module"])`` imports such modules first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, MutableMapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from fkpd.store import models as m
from fkpd.store.errors import (
    JobCancelled,
    JobLostError,
    JobStateError,
    NotFoundError,
    StoreInputError,
    WorkerStopping,
)

if TYPE_CHECKING:
    from fkpd.store.store import Store

log = logging.getLogger(__name__)

Handler = Callable[["JobContext"], "Mapping[str, Any] | None"]

#: The default handler registry, ``{kind: handler}``; fill it with :func:`register_handler`.
HANDLERS: dict[str, Handler] = {}

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
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


@dataclass(frozen=True)
class JobView:
    """A snapshot of one job.

    Attributes:
        progress: fraction done, 0..1.
        heartbeat_at: last sign of life from the worker (UTC), None unless started.
        error: failure text (exception and traceback, or the stale-recovery reason).
        attempts: how many times the job was claimed.
        cancel_requested: :meth:`JobQueue.cancel` was called while it ran.
        result: the handler's JSON result once succeeded.
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

    @property
    def done(self) -> bool:
        """True once the job reached succeeded, failed or cancelled."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def of(cls, row: m.Job) -> "JobView":
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
        )


def _json_mapping(value: Mapping[str, Any] | None, what: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise StoreInputError(f"{what} must be a mapping (dict) or None, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as exc:
        raise StoreInputError(f"{what} must be JSON-serialisable: {exc}") from None


def _check_progress(progress: float) -> float:
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
        raise StoreInputError(f"progress must be a number in [0, 1], got {progress!r}")
    return float(progress)


class JobQueue:
    """Job transitions on a store's database; get it as ``store.jobs``."""

    def __init__(self, store: "Store") -> None:
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
            proj = self.store._project(s, project)
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
                query = query.where(m.Job.project_id == self.store._project(s, project).id)
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
            progress = _check_progress(progress)
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


class JobContext:
    """What a handler gets: the job, the store, and progress/cancellation hooks.

    Attributes:
        store: the :class:`~fkpd.store.Store` (for reading comparisons, registering the
            new policy version, writing artifacts).
        job: the job as claimed.
        params: the job's parameters (a copy).
        artifact_dir: absolute artifact directory.
        worker_id: the worker running the job.
        stopping: the worker's stop event; once set, :meth:`check_cancelled` raises
            :class:`~fkpd.store.errors.WorkerStopping`.
    """

    def __init__(self, store: "Store", job: JobView, worker_id: str, *, min_write_s: float = 0.5,
                 stopping: threading.Event | None = None) -> None:
        self.store = store
        self.stopping = stopping or threading.Event()
        self.job = job
        self.params: dict[str, Any] = dict(job.params)
        self.artifact_dir: Path = store.artifact_dir
        self.worker_id = worker_id
        self._min_write_s = min_write_s
        self._lock = threading.Lock()
        self._progress = 0.0
        self._message: str | None = None
        self._dirty = False
        self._last_write = 0.0
        self._cancel = False
        self.lost: JobLostError | None = None

    @property
    def job_id(self) -> int:
        """Id of the job being run."""
        return self.job.id

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report progress (0..1) and an optional status line.

        Written to the database at most every ``min_write_s`` seconds (the heartbeat
        thread writes the latest value in between), so calling it every step is fine.

        Raises:
            StoreInputError: ``fraction`` outside [0, 1].
            JobLostError: the job was taken away from this worker; stop at once.
        """
        fraction = _check_progress(fraction)
        with self._lock:
            self._progress = fraction
            if message is not None:
                self._message = message
            self._dirty = True
            due = time.monotonic() - self._last_write >= self._min_write_s
        if due or fraction >= 1.0:
            try:
                self.beat()
            except Exception:  # a database hiccup must not fail the job; retried later
                log.warning("progress report of job %s failed", self.job_id, exc_info=True)
        if self.lost is not None:
            raise self.lost

    def cancelled(self) -> bool:
        """True once someone called ``cancel`` on this job (seen at the last heartbeat)."""
        return self._cancel

    def check_cancelled(self) -> None:
        """Raise if the handler must stop here: call it between steps of long work.

        Raises:
            JobCancelled: cancel was requested; the worker marks the job cancelled.
            JobLostError: the job was taken away from this worker.
            WorkerStopping: the worker was asked to stop; it puts the job back in the
                queue.
        """
        if self.lost is not None:
            raise self.lost
        if self._cancel:
            raise JobCancelled(f"job {self.job_id} was cancelled")
        if self.stopping.is_set():
            raise WorkerStopping(f"worker {self.worker_id} is stopping")

    def beat(self) -> None:
        """Write a heartbeat with the latest progress now (the heartbeat thread calls this).

        Records a :class:`JobLostError` in :attr:`lost` instead of raising it; other
        errors (database unreachable) propagate and the progress is written next time.
        """
        with self._lock:
            progress = self._progress if self._dirty else None
            message = self._message if self._dirty else None
            self._dirty = False
            self._last_write = time.monotonic()
            try:
                view = self.store.jobs.heartbeat(
                    self.job_id, progress, message, worker_id=self.worker_id
                )
            except JobLostError as exc:
                self.lost = exc
                return
            except Exception:
                self._dirty = self._dirty or progress is not None or message is not None
                raise
        self._cancel = self._cancel or view.cancel_requested


class _HeartbeatThread(threading.Thread):
    def __init__(self, ctx: JobContext, interval_s: float) -> None:
        super().__init__(name=f"fkpd-heartbeat-{ctx.job_id}", daemon=True)
        self.ctx = ctx
        self.interval_s = interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                self.ctx.beat()
            except Exception:  # a database hiccup must not kill the job; retry next time
                log.warning("heartbeat for job %s failed", self.ctx.job_id, exc_info=True)
            if self.ctx.lost is not None:
                log.error("%s", self.ctx.lost)
                return

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=max(5.0, 2 * self.interval_s))


def default_worker_id() -> str:
    """``host:pid:random`` — unique per worker process."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Runs queued jobs in this process, one at a time.

    Args:
        store: the store whose queue to serve.
        handlers: ``{kind: handler}``; default :data:`HANDLERS` (read at every claim, so
            handlers registered later are picked up). Only kinds with a handler are
            claimed.
        worker_id: default :func:`default_worker_id`.
        heartbeat_s: seconds between heartbeats while a job runs.
        stale_after_s: while idle, recover jobs whose heartbeat is older than this
            (None: never). Keep it well above ``heartbeat_s``.
        max_attempts: passed to :meth:`JobQueue.recover_stale`.
    """

    def __init__(
        self,
        store: "Store",
        handlers: Mapping[str, Handler] | None = None,
        *,
        worker_id: str | None = None,
        heartbeat_s: float = 5.0,
        stale_after_s: float | None = 120.0,
        max_attempts: int = 1,
    ) -> None:
        if not heartbeat_s > 0:
            raise StoreInputError(f"heartbeat_s must be > 0, got {heartbeat_s!r}")
        self.store = store
        self.handlers: Mapping[str, Handler] = HANDLERS if handlers is None else handlers
        self.worker_id = worker_id or default_worker_id()
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.max_attempts = max_attempts
        self._last_recovery = float("-inf")

    def run_one(self, stop: threading.Event | None = None) -> JobView | None:
        """Claim one job and run it; returns its final state, or None if none was queued.

        Setting ``stop`` while the job runs releases it at its handler's next
        ``ctx.check_cancelled()`` (see :meth:`execute`).
        """
        job = self.store.jobs.claim(self.worker_id, sorted(self.handlers))
        return None if job is None else self.execute(job, stop)

    def execute(self, job: JobView, stop: threading.Event | None = None) -> JobView:
        """Run a claimed job's handler with heart-beating, then record how it ended.

        Returns the job's final state. A handler exception marks the job failed with the
        exception and its traceback; ``KeyboardInterrupt``/``SystemExit`` do the same and
        are then re-raised. Once ``stop`` is set, the handler's next
        ``ctx.check_cancelled()`` raises :class:`WorkerStopping` and the job goes back to
        the queue (:meth:`JobQueue.release`).
        """
        queue = self.store.jobs
        ctx = JobContext(self.store, job, self.worker_id, stopping=stop)
        beat = _HeartbeatThread(ctx, self.heartbeat_s)
        log.info("worker %s runs job %s (%s)", self.worker_id, job.id, job.kind)
        interrupt: BaseException | None = None
        beat.start()
        try:
            handler = self.handlers.get(job.kind)
            if handler is None:
                raise JobStateError(
                    f"no handler registered for job kind {job.kind!r}; known kinds: "
                    f"{sorted(self.handlers)}"
                )
            result = handler(ctx)
            end: Callable[[], JobView] = lambda: queue.finish(job.id, result, worker_id=self.worker_id)
        except JobCancelled:
            end = lambda: queue.mark_cancelled(job.id, worker_id=self.worker_id)
        except WorkerStopping as exc:
            reason = str(exc)
            end = lambda: queue.release(job.id, reason, worker_id=self.worker_id)
        except JobLostError as exc:
            ctx.lost = ctx.lost or exc
            end = lambda: queue.get(job.id)
        except BaseException as exc:
            text = f"{type(exc).__name__}: {exc}\n\n" + "".join(traceback.format_exception(exc))
            end = lambda: queue.fail(job.id, text, worker_id=self.worker_id)
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit
                interrupt = exc
        finally:
            beat.stop()
        try:
            view = self._settle(ctx, end)
        except StoreInputError as exc:  # the handler returned something not JSON-able
            reason = f"handler returned an invalid result: {exc}"
            view = self._settle(ctx, lambda: queue.fail(job.id, reason, worker_id=self.worker_id))
        if interrupt is not None:
            raise interrupt
        return view

    def _settle(self, ctx: JobContext, transition: Callable[[], JobView]) -> JobView:
        if ctx.lost is None:
            try:
                return transition()
            except JobLostError as exc:
                ctx.lost = exc
        log.warning("job %s was taken from worker %s: %s", ctx.job_id, self.worker_id, ctx.lost)
        return self.store.jobs.get(ctx.job_id)

    def recover_if_due(self) -> list[JobView]:
        """Run :meth:`JobQueue.recover_stale` if ``stale_after_s`` is set and it is due."""
        if self.stale_after_s is None:
            return []
        now = time.monotonic()
        if now - self._last_recovery < self.stale_after_s / 4:
            return []
        self._last_recovery = now
        recovered = self.store.jobs.recover_stale(self.stale_after_s, max_attempts=self.max_attempts)
        for job in recovered:
            log.warning("recovered job %s: %s", job.id, job.message)
        return recovered

    def run(
        self,
        *,
        once: bool = False,
        poll_s: float = 1.0,
        max_jobs: int | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """Serve the queue until ``stop`` is set (or, with ``once``, for one claim attempt).

        Args:
            once: try to claim one job, run it if there was one, and return.
            poll_s: sleep between claim attempts while the queue is empty.
            max_jobs: return after running this many jobs.
            stop: set it to make the loop return; a running job is put back in the queue
                at its handler's next ``ctx.check_cancelled()`` (or ends first, if its
                handler does not check again).

        Returns:
            The number of jobs run.
        """
        stop = stop or threading.Event()
        ran = 0
        while not stop.is_set():
            self.recover_if_due()
            job = self.run_one(stop)
            if job is not None:
                ran += 1
                log.info("job %s ended %s", job.id, job.status)
            if once or (max_jobs is not None and ran >= max_jobs):
                break
            if job is None:
                stop.wait(poll_s)
        return ran


def run_worker(
    store: "Store",
    once: bool = False,
    poll_s: float = 1.0,
    worker_id: str | None = None,
    *,
    handlers: Mapping[str, Handler] | None = None,
    handler_modules: Sequence[str] = (),
    heartbeat_s: float = 5.0,
    stale_after_s: float | None = 120.0,
    max_attempts: int = 1,
    max_jobs: int | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Run a :class:`Worker` on ``store`` (the body of a ``worker`` CLI command).

    ``handler_modules`` are imported first so their ``@register_handler`` decorators
    fill :data:`HANDLERS`. In the main thread, SIGTERM and SIGINT make the worker stop:
    the current job goes back to the queue at its next check point (a job whose handler
    does not check again runs to its end), and a second SIGINT interrupts it at once
    (it is then marked failed).

    Returns:
        The number of jobs run.

    Raises:
        ModuleNotFoundError: a handler module cannot be imported.
    """
    for name in handler_modules:
        importlib.import_module(name)
    worker = Worker(
        store,
        handlers,
        worker_id=worker_id,
        heartbeat_s=heartbeat_s,
        stale_after_s=stale_after_s,
        max_attempts=max_attempts,
    )
    stop = stop or threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def request_stop(signum: int, _frame: Any) -> None:
            log.warning("signal %s: worker %s stops; its current job goes back to the queue at its next check "
                        "point", signum, worker.worker_id)
            stop.set()
            if signum == signal.SIGINT:  # a second Ctrl-C interrupts the job itself
                signal.signal(signal.SIGINT, previous.get(signal.SIGINT, signal.default_int_handler))

        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, request_stop)
    try:
        return worker.run(once=once, poll_s=poll_s, max_jobs=max_jobs, stop=stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fkpd.store.jobs``: run a worker from the command line."""
    from fkpd.store.store import Store

    parser = argparse.ArgumentParser(description="Run an FKPD Studio job worker.")
    parser.add_argument("--url", help="database URL (default $FKPD_DATABASE_URL or labels/fkpd.sqlite)")
    parser.add_argument("--artifact-dir", help="artifact directory (default $FKPD_ARTIFACT_DIR or labels/artifacts)")
    parser.add_argument("--module", action="append", default=[], help="module that registers handlers (repeatable)")
    parser.add_argument("--once", action="store_true", help="run at most one job, then exit")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between polls of an empty queue")
    parser.add_argument("--worker-id", help="name of this worker (default host:pid:random)")
    parser.add_argument("--stale-after", type=float, default=120.0, help="recover jobs silent this long (s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with Store(args.url, args.artifact_dir) as store:
        run_worker(
            store,
            once=args.once,
            poll_s=args.poll,
            worker_id=args.worker_id,
            handler_modules=args.module,
            stale_after_s=args.stale_after,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
