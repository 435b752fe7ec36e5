"""Issue #13, point 1: ``make run`` (``python -m fkpd.studio.serve``) creates the project,
queues its bootstrap and starts the local workers before any browser connects; Ctrl-C
stops everything and puts the running job back in the queue; a second start resumes it.

Runs the real launcher, Streamlit server and workers on the tiny project settings of
``conftest_app``; no browser is opened at any point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest_app import PROJECT, TINY_BOOTSTRAP, studio_env
from conftest_store import wait_for
from fkpd.store import Store
from fkpd.studio import StudioConfig
from fkpd.studio.serve import prepare

REPO = Path(__file__).resolve().parents[1]
#: Long enough BC that Ctrl-C lands while it trains.
SLOW_BOOTSTRAP = {**TINY_BOOTSTRAP, "bc_steps": 500, "bc": {**TINY_BOOTSTRAP["bc"], "save_every": 25}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(root: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, **studio_env(root, FKPD_START_WORKER="1", FKPD_WORKER_THREADS="1",
                                      FKPD_BOOTSTRAP=json.dumps(SLOW_BOOTSTRAP))}
    return subprocess.Popen([sys.executable, "-m", "fkpd.studio.serve", "app/streamlit_app.py", "--server.port",
                             str(_free_port()), "--server.headless", "true"], cwd=REPO, env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _ctrl_c(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """What a terminal's Ctrl-C does: SIGINT to the whole foreground process group; then
    wait until every process of the group is gone."""
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=timeout_s)

    def group_gone() -> bool:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(group_gone, timeout_s, 0.2, what="the workers and the server to exit after Ctrl-C")


def _bc_step(message: str | None) -> int:
    """i of a ``training BC: step i/N`` progress message (-1 otherwise)."""
    text = message or ""
    if not text.startswith("training BC: step "):
        return -1
    return int(text.removeprefix("training BC: step ").split("/")[0])


def _first_job(store: Store):
    from fkpd.store import NotFoundError

    try:
        return next(iter(store.jobs.list(PROJECT)), None)
    except NotFoundError:  # the database exists, the project not yet
        return None


def test_prepare_queues_the_bootstrap_without_the_app(tmp_path):
    cfg = StudioConfig.from_env(studio_env(tmp_path))  # FKPD_START_WORKER=0: no worker here
    line, workers = prepare(cfg)
    assert workers == [] and "queued the bootstrap job" in line
    with cfg.open_store() as store:
        assert [(j.kind, j.status) for j in store.jobs.list(PROJECT)] == [("bootstrap", "queued")]
    line, _ = prepare(cfg)
    assert "queued" not in line, "a second start queues nothing"


def test_make_run_starts_the_bootstrap_with_no_browser_and_ctrl_c_then_a_second_start_resume(tmp_path):
    root = tmp_path / "studio"
    log = tmp_path / "serve.log"
    t0 = time.monotonic()
    proc = _launch(root, log)
    try:
        db = root / "fkpd.sqlite"
        wait_for(db.exists, 60, 0.1, what="the store to be created")
        with Store(f"sqlite:///{db}", root / "artifacts") as store:
            job = wait_for(lambda: _first_job(store), 60, 0.1, what="the bootstrap job")
            queued_s = time.monotonic() - t0
            assert job.kind == "bootstrap"
            running = wait_for(lambda: (j := store.jobs.get(job.id)).status == "running" and j, 60, 0.1,
                               what="a worker to start the bootstrap")
            running_s = time.monotonic() - t0
            assert running.worker_id
            wait_for(lambda: _bc_step(store.jobs.get(job.id).message) >= 60, 180, 0.2,
                     what="behaviour cloning to save its state")
            print(f"\nmake run -> bootstrap queued {queued_s:.1f} s, running {running_s:.1f} s (no browser)")
            _ctrl_c(proc)
            stopped = store.jobs.get(job.id)
            assert stopped.status == "queued", (stopped.status, log.read_text()[-3000:])
            assert [e["event"] for e in stopped.history][-1] == "released"

            proc = _launch(root, log)  # a second start resumes the same job
            done = wait_for(lambda: (j := store.jobs.get(job.id)).done and j, 300, 0.5, what="the resumed bootstrap")
            assert done.status == "succeeded", done.error
            assert done.attempts == 2 and done.result["bc"] == "resumed"
            assert [j.kind for j in store.jobs.list(PROJECT) if j.kind == "bootstrap"] == ["bootstrap"]
            # with no browser, the idle workers keep pairs coming after the bootstrap
            wait_for(lambda: any(j.kind == "top_up" and j.status == "succeeded" for j in store.jobs.list(PROJECT)),
                     120, 0.5, what="a top-up after the bootstrap")
    finally:
        if proc.poll() is None:
            _ctrl_c(proc)
    text = log.read_text()
    assert "local workers started" in text
