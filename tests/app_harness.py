"""Start and stop the Streamlit app for the browser test and ``bench/bench_ui.py``.

Test harness, not library code: :func:`launch_app` runs ``streamlit run
app/streamlit_app.py`` headless in a session of its own and waits until it answers;
:func:`stop_app` stops it and the local worker it started. ``bench/bench_ui.py`` puts
this directory on ``sys.path`` to import it (and ``bench/bench_session.py``, with
the Chromium flags and the player-finding script below).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_SCRIPT = REPO_ROOT / "app" / "streamlit_app.py"

#: Chromium's flags for the browser tests and benches: Debian's ``chromium`` headless,
#: without a sandbox (a container), a GPU or anything that phones home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

#: A JavaScript expression for the pair player's root element (``.fkpd-player``), in the
#: page or inside a component's shadow root; ``undefined`` when there is none. Spliced
#: into the benches' page scripts (``bench/bench_session.py``, ``bench/bench_ui.py``).
FIND_PLAYER_JS = ('(document.querySelector(".fkpd-player") || [...document.querySelectorAll("*")]'
                  '.map(e => e.shadowRoot).filter(Boolean).map(r => r.querySelector(".fkpd-player")).find(Boolean))')


def launch_app(env: Mapping[str, str], log_file: Path, port: int | None = None,
               timeout_s: float = 60.0, serve: bool = False) -> tuple[subprocess.Popen, str]:
    """Start ``streamlit run app/streamlit_app.py`` headless and wait until it answers.

    For the browser test and ``bench/bench_ui.py``. The server runs in a session of its
    own, so :func:`stop_app` also stops the worker it starts.

    Args:
        env: environment of the server (the ``FKPD_*`` variables of :class:`StudioConfig`).
        log_file: where the server's output goes.
        port: TCP port; default a free one.
        timeout_s: how long to wait for ``/_stcore/health``.
        serve: start it as ``make run`` does (``python -m fkpd.studio.serve``): the
            project and the local workers first, so they are ready before a page opens.

    Returns:
        ``(process, base_url)``.

    Raises:
        RuntimeError: the server exited or did not answer in time (with its log).
    """
    import socket
    import time
    import urllib.request

    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    launcher = ["fkpd.studio.serve"] if serve else ["streamlit", "run"]
    proc = subprocess.Popen(
        [sys.executable, "-m", *launcher, str(APP_SCRIPT), "--server.port", str(port), "--server.headless", "true"],
        cwd=REPO_ROOT, env=dict(env), stdout=log_file.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}:\n{log_file.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.3)
    stop_app(proc)
    raise RuntimeError(f"streamlit did not answer within {timeout_s:.0f} s:\n{log_file.read_text()}")


def stop_app(proc: subprocess.Popen) -> None:
    """Stop a server started by :func:`launch_app` and its worker (SIGTERM, then SIGKILL)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    except ProcessLookupError:
        pass

