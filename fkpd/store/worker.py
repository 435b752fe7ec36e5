"""Job worker: runs queued jobs (:mod:`fkpd.store.queue`) in this process.

* :class:`Worker` loops claim → run the handler in this process, with a heartbeat thread
  → finish / fail (exception text and traceback stored in ``error``). A worker asked to
  stop (its ``stop`` event: Ctrl-C, SIGTERM, the app that started it exited) makes the
  handler's next ``ctx.check_cancelled()`` raise :class:`~fkpd.store.errors.WorkerStopping`
  and puts the job back in the queue (:meth:`~fkpd.store.queue.JobQueue.release`); handlers must be safe to
  re-run anyway, since a worker can die at any instruction.
* While a job runs, a heartbeat thread writes its latest progress every ``heartbeat_s``
  (:meth:`JobContext.beat`); a worker that stops heart-beating has its job recovered by
  another worker's :meth:`~fkpd.store.queue.JobQueue.recover_stale`.
* A handler gets a :class:`JobContext`: the job, its parameters, the store, and the
  progress / cancellation hooks. :func:`current_job` returns it anywhere in the handler's
  thread, and :meth:`JobContext.ensure_current` is the fence artifact writers call before
  each write: once the job was recovered by another worker (or cancelled, or finished),
  it raises :class:`~fkpd.store.errors.JobLostError`, so a worker that was frozen past its
  heartbeat stops writing into the job's folders.
* While idle, a worker sweeps the artifact directory (:func:`fkpd.store.sweep.sweep_artifacts`):
  temporary files of killed writes and clip files no row names, once older than a grace
  period (``sweep_grace_s``), every ``sweep_every_s``; each removal is logged.
* While idle, a worker also runs the *idle hooks* (:func:`register_idle_hook`) every
  ``idle_every_s``: callables ``hook(store)`` that look at the store and queue work
  (the studio's automatic rounds and top-up pairs, :mod:`fkpd.studio.upkeep`). A hook's
  exception is logged, never raised. Hooks run in a worker that serves the default
  handler registry (or is given ``idle_hooks``), never in one given its own handlers.
* A worker may serve a subset of the job kinds (``kinds`` / ``skip_kinds``), so one
  process can keep rendering pairs while another trains
  (``fkpd worker --kinds top_up``, or ``$FKPD_WORKER_KINDS``; see :func:`run_worker`).

:func:`run_worker` is the body of the one worker command, ``fkpd worker``
(:mod:`fkpd.cli`); it imports the modules that register handlers
(:func:`fkpd.store.queue.register_handler`) first.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from fkpd.store.errors import (
    JobCancelled,
    JobLostError,
    JobStateError,
    StoreInputError,
    WorkerStopping,
)
from fkpd.store.queue import HANDLERS, Handler, JobView, check_progress
from fkpd.store.sweep import DEFAULT_GRACE_S, sweep_artifacts

if TYPE_CHECKING:
    from fkpd.store.store import Store

log = logging.getLogger(__name__)

_CURRENT: contextvars.ContextVar["JobContext | None"] = contextvars.ContextVar("fkpd_current_job", default=None)


#: A hook run by idle workers: ``hook(store)``; see :func:`register_idle_hook`.
IdleHook = Callable[["Store"], None]

#: The default idle hooks, run by workers of the default handler registry.
IDLE_HOOKS: list[IdleHook] = []


def register_idle_hook(hook: IdleHook) -> IdleHook:
    """Run ``hook(store)`` in every idle worker of the default registry, every
    ``idle_every_s`` (see :class:`Worker`); usable as a decorator. Registering the same
    function twice keeps one entry. A hook must be quick (a few queries) and safe to run
    from several workers at once: it queues jobs, it does not run them.

    Returns:
        ``hook``.
    """
    if hook not in IDLE_HOOKS:
        IDLE_HOOKS.append(hook)
    return hook


def current_job() -> "JobContext | None":
    """The :class:`JobContext` of the job running in this thread (set by
    :meth:`Worker.execute` around the handler call), or None outside a job."""
    return _CURRENT.get()


class JobContext:
    """What a handler gets: the job, the store, and progress/cancellation hooks.

    Attributes:
        store: the :class:`~fkpd.store.Store` (for reading comparisons, registering the
            new policy version, writing artifacts).
        job: the job as claimed.
        params: the job's parameters (a copy).
        artifact_dir: absolute artifact directory (a remote store's local staging
            directory; ``store.artifacts`` reads and writes the artifacts themselves).
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
        fraction = check_progress(fraction)
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

    def ensure_current(self) -> None:
        """Fence: return only if this worker still runs this attempt of the job. Call it
        right before writing an artifact or a row on the job's behalf.

        Raises:
            JobLostError: the job was recovered by another worker, claimed again,
                cancelled or finished meanwhile (recorded in :attr:`lost` too).
        """
        if self.lost is not None:
            raise self.lost
        try:
            self.store.jobs.check_owner(self.job_id, self.worker_id, self.job.attempts)
        except JobLostError as exc:
            self.lost = exc
            raise

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
    """Daemon thread that calls :meth:`JobContext.beat` every ``interval_s`` seconds
    until stopped or the job is lost."""

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
        max_attempts: passed to :meth:`~fkpd.store.queue.JobQueue.recover_stale`.
        sweep_grace_s: while idle, remove temporary files and unregistered clip files
            older than this (:func:`fkpd.store.sweep.sweep_artifacts`); None: never.
        sweep_every_s: seconds between two sweeps.
        kinds: claim only these job kinds (None: every kind with a handler).
        skip_kinds: never claim these kinds.
        idle_hooks: run while idle (see :func:`register_idle_hook`); default
            :data:`IDLE_HOOKS` when ``handlers`` is None, else none.
        idle_every_s: seconds between two runs of the idle hooks.
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
        sweep_grace_s: float | None = DEFAULT_GRACE_S,
        sweep_every_s: float = 600.0,
        kinds: Sequence[str] | None = None,
        skip_kinds: Sequence[str] = (),
        idle_hooks: Sequence[IdleHook] | None = None,
        idle_every_s: float = 2.0,
    ) -> None:
        if not heartbeat_s > 0:
            raise StoreInputError(f"heartbeat_s must be > 0, got {heartbeat_s!r}")
        if sweep_grace_s is not None and not sweep_grace_s > 0:
            raise StoreInputError(f"sweep_grace_s must be > 0 or None, got {sweep_grace_s!r}")
        self.store = store
        self.handlers: Mapping[str, Handler] = HANDLERS if handlers is None else handlers
        self.worker_id = worker_id or default_worker_id()
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.max_attempts = max_attempts
        self.sweep_grace_s = sweep_grace_s
        self.sweep_every_s = sweep_every_s
        self._last_recovery = float("-inf")
        self._last_sweep = float("-inf")
        self.kinds = None if kinds is None else frozenset(kinds)
        self.skip_kinds = frozenset(skip_kinds)
        self.idle_hooks: Sequence[IdleHook] = (IDLE_HOOKS if handlers is None else ()) if idle_hooks is None \
            else list(idle_hooks)
        self.idle_every_s = idle_every_s
        self._last_idle = float("-inf")

    def claimable_kinds(self) -> list[str]:
        """The job kinds this worker claims: those with a handler, within ``kinds``,
        minus ``skip_kinds``."""
        return sorted(k for k in self.handlers
                      if (self.kinds is None or k in self.kinds) and k not in self.skip_kinds)

    def run_one(self, stop: threading.Event | None = None) -> JobView | None:
        """Claim one job and run it; returns its final state, or None if none was queued.

        Setting ``stop`` while the job runs releases it at its handler's next
        ``ctx.check_cancelled()`` (see :meth:`execute`).
        """
        job = self.store.jobs.claim(self.worker_id, self.claimable_kinds())
        return None if job is None else self.execute(job, stop)

    def execute(self, job: JobView, stop: threading.Event | None = None) -> JobView:
        """Run a claimed job's handler with heart-beating, then record how it ended.

        Returns the job's final state. A handler exception marks the job failed with the
        exception and its traceback; ``KeyboardInterrupt``/``SystemExit`` do the same and
        are then re-raised. Once ``stop`` is set, the handler's next
        ``ctx.check_cancelled()`` raises :class:`WorkerStopping` and the job goes back to
        the queue (:meth:`~fkpd.store.queue.JobQueue.release`).
        """
        queue = self.store.jobs
        ctx = JobContext(self.store, job, self.worker_id, stopping=stop)
        beat = _HeartbeatThread(ctx, self.heartbeat_s)
        log.info("worker %s runs job %s (%s)", self.worker_id, job.id, job.kind)
        interrupt: BaseException | None = None
        beat.start()
        token = _CURRENT.set(ctx)
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
            _CURRENT.reset(token)
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
        """Run :meth:`~fkpd.store.queue.JobQueue.recover_stale` if ``stale_after_s`` is set and it is due."""
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

    def sweep_if_due(self) -> int:
        """Sweep the artifact directory if ``sweep_grace_s`` is set and ``sweep_every_s``
        passed since the last sweep; returns the number of files removed. A failure is
        logged, never raised: sweeping must not stop a worker."""
        if self.sweep_grace_s is None:
            return 0
        now = time.monotonic()
        if now - self._last_sweep < self.sweep_every_s:
            return 0
        self._last_sweep = now
        try:
            report = sweep_artifacts(self.store, self.sweep_grace_s)
        except Exception:  # noqa: BLE001 - a full disk or a vanished folder must not kill the worker
            log.warning("sweeping %s failed", self.store.artifact_location, exc_info=True)
            return 0
        if report.removed:
            log.info("swept %d stale file(s) from %s", report.removed, self.store.artifact_location)
        return report.removed

    def idle_if_due(self) -> int:
        """Run the idle hooks if ``idle_every_s`` passed since they last ran; returns
        how many ran. A hook's exception is logged, never raised."""
        now = time.monotonic()
        if not self.idle_hooks or now - self._last_idle < self.idle_every_s:
            return 0
        self._last_idle = now
        for hook in list(self.idle_hooks):
            try:
                hook(self.store)
            except Exception:  # noqa: BLE001 - a hook must never stop a worker
                log.warning("idle hook %s failed", getattr(hook, "__qualname__", hook), exc_info=True)
        return len(self.idle_hooks)

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
                self.idle_if_due()
                self.sweep_if_due()
                stop.wait(poll_s)
        return ran


def kinds_from_env(name: str) -> list[str] | None:
    """The comma-separated job kinds in environment variable ``name``; None when unset or empty."""
    kinds = [k.strip() for k in os.environ.get(name, "").split(",") if k.strip()]
    return kinds or None


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
    sweep_grace_s: float | None = DEFAULT_GRACE_S,
    sweep_every_s: float = 600.0,
    kinds: Sequence[str] | None = None,
    skip_kinds: Sequence[str] = (),
) -> int:
    """Run a :class:`Worker` on ``store`` (the body of a ``worker`` CLI command).

    ``kinds`` / ``skip_kinds`` restrict the job kinds it claims (see :class:`Worker`);
    ``fkpd worker`` passes its ``--kinds`` / ``--skip-kinds`` flags; when not given, they
    are read from ``$FKPD_WORKER_KINDS`` / ``$FKPD_WORKER_SKIP_KINDS`` (comma-separated
    kinds; e.g. ``fkpd worker --kinds top_up`` runs a second worker that only renders
    top-up pairs).

    ``handler_modules`` are imported first so their ``@register_handler`` decorators
    fill :data:`HANDLERS`. In the main thread, SIGTERM and SIGINT make the worker stop:
    the current job goes back to the queue at its next check point (a job whose handler
    does not check again runs to its end), and a second SIGINT interrupts it at once
    (it is then marked failed). While idle the worker sweeps the artifact directory
    (``sweep_grace_s``, ``sweep_every_s``: see :class:`Worker`).

    Returns:
        The number of jobs run.

    Raises:
        ModuleNotFoundError: a handler module cannot be imported.
    """
    for name in handler_modules:
        importlib.import_module(name)
    if kinds is None:
        kinds = kinds_from_env("FKPD_WORKER_KINDS")
    if not skip_kinds:
        skip_kinds = kinds_from_env("FKPD_WORKER_SKIP_KINDS") or ()
    worker = Worker(
        store,
        handlers,
        worker_id=worker_id,
        heartbeat_s=heartbeat_s,
        stale_after_s=stale_after_s,
        max_attempts=max_attempts,
        sweep_grace_s=sweep_grace_s,
        sweep_every_s=sweep_every_s,
        kinds=kinds,
        skip_kinds=skip_kinds,
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
