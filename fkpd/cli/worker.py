"""``fkpd worker``: run the preference store's queued jobs (bootstrap, alignment rounds, compare)."""

from __future__ import annotations

import argparse
import os
import threading

from fkpd.cli.common import add_store_args, command


def _cmd_worker(args: argparse.Namespace) -> int:
    """Claim and run queued jobs until interrupted (SIGINT/SIGTERM stop the worker; its current job goes back to
    the queue at its next step and resumes on the next start)."""
    import logging

    from fkpd.store import Store, run_worker

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
                   sweep_grace_s=args.sweep_grace_s or None)
    print(f"worker ran {n} job(s)")
    return 0


def add_parsers(sub) -> None:
    """``fkpd worker``."""
    s = command(sub, "worker", _cmd_worker,
                "run background jobs (bootstrap, alignment rounds) from the preference store")
    add_store_args(s)
    s.add_argument("--once", action="store_true", help="run at most one job, then exit")
    s.add_argument("--poll-s", type=float, default=1.0, help="seconds between polls of an empty queue")
    s.add_argument("--stale-after-s", type=float, default=120.0,
                   help="requeue/fail running jobs whose heartbeat is older than this")
    s.add_argument("--max-attempts", type=int, default=2,
                   help="a job whose worker died is requeued until it has run this many times (the "
                        "bootstrap and alignment-round handlers are safe to re-run)")
    s.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default; 1 leaves a core free on a shared machine)")
    s.add_argument("--parent-pid", type=int, default=0,
                   help="stop (after the current job) when this process exits; the app passes its own pid")
    s.add_argument("--sweep-grace-s", type=float, default=3600.0,
                   help="while idle, remove temporary files of killed writes and clip files no row names once "
                        "older than this (0: never sweep)")
