"""What ``make run`` starts: the project, its bootstrap and the local workers, then the app.

``python -m fkpd.studio.serve [APP_SCRIPT] [STREAMLIT OPTIONS ...]`` (the Makefile's
``run`` target) does, in order, before any browser connects:

1. reads :class:`~fkpd.studio.StudioConfig` from the environment and opens the store;
2. :func:`~fkpd.studio.open_project`: creates the project with its bootstrap job queued
   (one transaction), or finds it (a second start resumes: a job that was running is
   requeued by the workers' stale-job recovery or was put back by the last Ctrl-C);
3. starts the local workers (:func:`~fkpd.studio.start_local_workers`; not with
   ``FKPD_START_WORKER=0``), so the bootstrap runs at once;
4. runs ``streamlit run APP_SCRIPT`` as a child with ``FKPD_START_WORKER=0`` (the app
   then starts no worker of its own) and ``FKPD_LOCAL_WORKERS`` (the workers' pids, for
   the sidebar's "worker exited" notice).

Streamlit only runs the app's script when a browser opens a page, which is why the
project and the workers are started here rather than in the script; ``streamlit run
app/streamlit_app.py`` alone still works (the app then does steps 2-3 on the first page
view).

Stopping: Ctrl-C in the terminal reaches every process of the foreground group: Streamlit
stops, and each worker stops at its job's next step and puts the job back in the queue
(:func:`fkpd.store.run_worker`). SIGTERM to this process is passed on to the children the
same way. Either way this process waits for the workers (up to :data:`STOP_WAIT_S`, then
they are killed; their jobs are then requeued after 60 s without a heartbeat). A worker
whose parent died without a word stops by itself (``--parent-pid``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from fkpd.studio.config import StudioConfig, StudioError, open_project, start_local_workers

#: Seconds to wait for the workers after Streamlit stopped, before killing them.
STOP_WAIT_S = 30.0
#: The app's script, relative to the repository root.
DEFAULT_APP = Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"


def prepare(cfg: StudioConfig) -> tuple[str, list[subprocess.Popen]]:
    """Steps 1-3: the project (its bootstrap queued on first start) and the local workers.

    Returns:
        ``(one line saying what was done, the worker processes)``.

    Raises:
        StudioError: a bad ``FKPD_*`` setting.
        UnknownTaskError / ParamError: a bad task or bootstrap parameters.
        StoreUnavailableError: the database cannot be opened.
    """
    with cfg.open_store() as store:
        project, job = open_project(store, cfg)
        where = f"project {project.name!r} ({project.task_id}) on {store.backend}, artifacts in {store.artifact_location}"
    line = f"FKPD Studio: {where}"
    if job is not None:
        line += f"; queued the bootstrap job {job.id} (data, behaviour cloning, first batch)"
    workers = start_local_workers(cfg) if cfg.start_worker else []
    return line, workers


def _signal(procs: Sequence[subprocess.Popen], sig: int) -> None:
    """Send ``sig`` to each of ``procs`` that still runs."""
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass


def _wait_or_kill(procs: Sequence[subprocess.Popen], wait_s: float) -> None:
    """Wait up to ``wait_s`` in all for ``procs`` to exit, then kill the rest."""
    deadline = time.monotonic() + wait_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Run steps 1-4 and wait for Streamlit; returns its exit status (2 on a bad setting)."""
    args = list(sys.argv[1:] if argv is None else argv)
    app = args.pop(0) if args and not args[0].startswith("-") else str(DEFAULT_APP)
    t0 = time.monotonic()
    try:
        cfg = StudioConfig.from_env()
        line, workers = prepare(cfg)
    except Exception as exc:  # noqa: BLE001 - one line, as the CLI does, for every user error
        from fkpd.errors import FKPDError

        if isinstance(exc, (StudioError, FKPDError, ValueError)):
            print(f"FKPD Studio cannot start: {exc}", file=sys.stderr, flush=True)
            return 2
        raise
    print(f"{line} ({time.monotonic() - t0:.1f} s)", flush=True)
    if workers:
        print(f"FKPD Studio: local workers started (pids {', '.join(str(w.pid) for w in workers)}: rounds and "
              f"bootstrap, top-up pairs; log {cfg.worker_log})", flush=True)
    env = {**os.environ, "FKPD_START_WORKER": "0",
           "FKPD_LOCAL_WORKERS": ",".join(str(w.pid) for w in workers)}
    app_proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", app, *args], env=env)

    def forward(_signum: int, _frame) -> None:  # SIGTERM from a supervisor: stop the children as Ctrl-C would
        _signal([app_proc, *workers], signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    code = 0
    try:
        while True:
            try:
                code = app_proc.wait()
                break
            except KeyboardInterrupt:  # the terminal's Ctrl-C also reached the children; wait for them
                continue
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave workers behind
        _signal(workers, signal.SIGTERM)  # no-op for workers a Ctrl-C already stops
        _wait_or_kill(workers, STOP_WAIT_S)
    return code


if __name__ == "__main__":
    sys.exit(main())
