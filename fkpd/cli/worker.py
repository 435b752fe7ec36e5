"""``fkpd worker``: run the preference store's queued jobs (bootstrap, alignment rounds, compare, top-up pairs).

``--kinds`` / ``--skip-kinds`` (comma-separated job kinds) restrict what the worker
claims, e.g. ``fkpd worker --kinds top_up`` renders top-up pairs while another worker
trains; without them, ``$FKPD_WORKER_KINDS`` / ``$FKPD_WORKER_SKIP_KINDS`` are read
(:func:`fkpd.store.run_worker`), and without those every kind is run.
"""

from __future__ import annotations

import argparse
import os
import threading

from fkpd.cli.common import add_store_args, command
from fkpd.errors import FKPDError


def job_kinds(value: str | None, flag: str) -> list[str] | None:
    """The job kinds of a ``--kinds`` / ``--skip-kinds`` value (comma-separated), checked
    against the registered handlers; None when not given.

    Raises:
        FKPDError: an empty list, or a kind no handler runs (the message lists the known ones).
    """
    if value is None:
        return None
    from fkpd.store import HANDLERS

    import fkpd.studio  # noqa: F401 (registers the studio's handlers)

    kinds = [k.strip() for k in value.split(",") if k.strip()]
    if not kinds:
        raise FKPDError(f"{flag} needs at least one job kind, e.g. {flag} top_up; known: {', '.join(sorted(HANDLERS))}")
    unknown = [k for k in kinds if k not in HANDLERS]
    if unknown:
        raise FKPDError(f"{flag} {','.join(unknown)}: no such job kind; known: {', '.join(sorted(HANDLERS))}")
    return kinds


def _cmd_worker(args: argparse.Namespace) -> int:
    """Claim and run queued jobs until interrupted (SIGINT/SIGTERM stop the worker; its current job goes back to
    the queue at its next step and resumes on the next start)."""
    import logging

    from fkpd.store import Store, run_worker

    kinds, skip_kinds = job_kinds(args.kinds, "--kinds"), job_kinds(args.skip_kinds, "--skip-kinds")
    if args.nice:
        if args.nice < 0 or args.nice > 19:
            raise FKPDError(f"--nice must be from 0 to 19, got {args.nice}")
        os.nice(args.nice)  # inherited by the render processes the jobs start
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    store = Store(args.database_url, args.artifact_dir)
    print(f"worker on {store.backend} ({store.artifact_location}); Ctrl-C stops it (a running job goes back to the queue; "
          "Ctrl-C twice interrupts it at once)", flush=True)
    stop = threading.Event()
    if args.parent_pid:
        def watch_parent() -> None:  # the app that started us is gone: stop
            while not stop.wait(2.0):
                try:
                    os.kill(args.parent_pid, 0)
                except ProcessLookupError:
                    print(f"parent process {args.parent_pid} exited; stopping (a running job goes back to the "
                          "queue)", flush=True)
                    stop.set()
                except PermissionError:
                    pass

        threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    n = run_worker(store, once=args.once, poll_s=args.poll_s, stale_after_s=args.stale_after_s,
                   max_attempts=args.max_attempts, handler_modules=["fkpd.studio"], stop=stop,
                   sweep_grace_s=args.sweep_grace_s or None, kinds=kinds, skip_kinds=skip_kinds or ())
    print(f"worker ran {n} job(s)")
    return 0


def add_parsers(sub) -> None:
    """``fkpd worker``."""
    s = command(sub, "worker", _cmd_worker,
                "run background jobs (bootstrap, alignment rounds) from the preference store")
    add_store_args(s)
    s.add_argument("--once", action="store_true", help="run at most one job, then exit")
    s.add_argument("--kinds", default=None, metavar="K,...",
                   help="claim only these job kinds, comma-separated (bootstrap, alignment_round, compare, top_up; "
                        "default: $FKPD_WORKER_KINDS, else all), e.g. --kinds top_up for a worker that only renders "
                        "top-up pairs while another trains")
    s.add_argument("--skip-kinds", default=None, metavar="K,...",
                   help="never claim these job kinds, comma-separated (default: $FKPD_WORKER_SKIP_KINDS, else none)")
    s.add_argument("--poll-s", type=float, default=1.0, help="seconds between polls of an empty queue")
    s.add_argument("--stale-after-s", type=float, default=120.0,
                   help="requeue/fail running jobs whose heartbeat is older than this")
    s.add_argument("--max-attempts", type=int, default=2,
                   help="a job whose worker died is requeued until it has run this many times (the "
                        "bootstrap and alignment-round handlers are safe to re-run)")
    s.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 leaves a core free on a shared machine)")
    s.add_argument("--nice", type=int, default=0, metavar="N",
                   help="lower this worker's CPU priority by N (0..19, os.nice; its render processes inherit it), so "
                        "an app on the same machine answers clicks first while a round trains (the app starts its "
                        "local workers with 10)")
    s.add_argument("--parent-pid", type=int, default=0,
                   help="stop (after the current job) when this process exits; the app passes its own pid")
    s.add_argument("--sweep-grace-s", type=float, default=3600.0,
                   help="while idle, remove temporary files of killed writes and clip files no row names once "
                        "older than this (0: never sweep)")
