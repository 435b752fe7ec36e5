"""Logic of the labelling app (``app/``): the pages only lay out what this module returns.

The app is a thin Streamlit front end over :class:`fkpd.store.Store` and the job queue.
Everything that decides something lives here, so it is tested without a browser:

* :class:`StudioConfig` — where the store is, which project and task, which bootstrap
  parameters, whether to start a local worker; read from the environment
  (``FKPD_*`` variables, see :meth:`StudioConfig.from_env`).
* :func:`open_project` — creates the default project on first start and queues its
  bootstrap job; a second start finds both and resumes.
* :func:`start_local_worker` — ``fkpd worker`` as a child process that exits with the app.
* :class:`AdminAuth` — the admin password or token (Streamlit secrets, the environment, or
  a random token written to ``labels/admin_token`` on first start).
* :func:`lease_for_display` — the current pair and the prefetched next one, with their
  videos checked; a pair whose video is missing or corrupt is set aside
  (:meth:`Store.retire_pair`) and reported instead of crashing the page.
* :func:`record_answers` — answers sent by the browser, stored idempotently.
* :func:`rounds_history`, :func:`enqueue_round`, :func:`enqueue_compare` and the
  ``compare`` job handler, :func:`export_bytes` — the Rounds, Data and Compare pages.

No function here takes a filesystem path from the browser: videos are read from the
artifact directory by clip id (:meth:`Store.resolve` refuses paths that escape it), and
exports are written to a temporary file and returned as bytes.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fkpd.envs import DEFAULT_TASK
from fkpd.errors import FKPDError
from fkpd.studio.rounds import served_versions
from fkpd.store import (
    AnnotatorInfo,
    ArtifactPathError,
    ClipView,
    JobContext,
    JobView,
    NotFoundError,
    PairUnavailableError,
    PairView,
    ProjectInfo,
    Store,
    StoreInputError,
    register_handler,
)
from fkpd.store.db import labels_dir

log = logging.getLogger(__name__)

COMPARE = "compare"
TRAINING_KINDS = ("bootstrap", "alignment_round")
ACTIVE = ("queued", "running")
#: Answers the label page accepts; the keyboard shortcuts map onto them.
OUTCOMES = ("left", "right", "equal", "skip")
#: Alignment parameters an admin may set from the Rounds page (everything else keeps
#: AlignConfig's defaults); see :class:`fkpd.studio.rounds.RoundParams`.
ROUND_FIELDS = ("regularizer", "beta", "lam", "steps", "lr", "pairs_per_batch", "eval_episodes")

DEFAULT_INSTRUCTIONS = (
    "Watch both clips of the robot arm. Choose the clip whose behaviour you prefer: the one "
    "that makes more progress on the task ({task}) in a way you would want a robot to act. "
    "Equal if you cannot tell them apart or like them equally; Skip if neither clip can be judged."
)
_TIE_SKIP = "Equal if you cannot tell them apart or like them equally; Skip if neither clip can be judged."
_LOCOMOTION_BODIES = {"hopper": "one-legged hopper", "walker2d": "two-legged walker",
                      "halfcheetah": "half-cheetah"}


def default_instructions(task_id: str) -> str:
    """The instructions a new project of ``task_id`` starts with: what the clips show and
    what to prefer (MetaWorld: the arm's progress on the task; ``d4rl/maze2d-*``: the ball
    heading for the red goal disc; D4RL locomotion: the gait moving the robot forward)."""
    name = task_id.split("/")[-1]
    if task_id.startswith("d4rl/maze2d-"):
        return ("Watch both clips of the ball rolling through the maze, seen from above. Choose the clip whose "
                "behaviour you prefer: the one that heads for the red goal disc more directly, moving the way "
                f"you would want it to. {_TIE_SKIP}")
    if task_id.startswith("d4rl/"):
        body = _LOCOMOTION_BODIES.get(name.split("-", 1)[0], "robot")
        return (f"Watch both clips of the {body} robot ({name}). Choose the clip whose movement you prefer: the "
                "one that moves forward better (faster, steadier, without falling) in a way you would want a "
                f"robot to move. {_TIE_SKIP}")
    return DEFAULT_INSTRUCTIONS.format(task=name)


class StudioError(FKPDError, ValueError):
    """Bad input from the app (an empty annotator name, a bad round parameter, ...)."""


# ------------------------------------------------------------------ configuration


@dataclass
class StudioConfig:
    """Where and what the app serves.

    Attributes:
        database_url: store URL; "" means ``$FKPD_DATABASE_URL`` or ``labels/fkpd.sqlite``.
        artifact_dir: "" means ``$FKPD_ARTIFACT_DIR`` or ``labels/artifacts``.
        project: project name shown and labelled.
        task: task id of the project when it is created.
        bootstrap: parameters of the bootstrap job queued on first start
            (:class:`fkpd.studio.rounds.BootstrapParams`, flat).
        start_worker: start a local ``fkpd worker`` child process.
        worker_threads: torch threads of that worker (0: torch's default); 1 leaves a
            core to the app on a 2-core machine.
    """

    database_url: str = ""
    artifact_dir: str = ""
    project: str = "door-open"
    task: str = DEFAULT_TASK
    bootstrap: dict[str, Any] = field(default_factory=dict)
    start_worker: bool = True
    worker_threads: int = 1

    @property
    def worker_log(self) -> Path:
        """The local worker's log: next to the artifact directory (``labels/worker.log``
        by default), so an app on another store never writes into ``labels/``."""
        return (Path(self.artifact_dir).parent if self.artifact_dir else labels_dir()) / "worker.log"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "StudioConfig":
        """Read ``FKPD_DATABASE_URL``, ``FKPD_ARTIFACT_DIR``, ``FKPD_PROJECT``,
        ``FKPD_TASK``, ``FKPD_BOOTSTRAP`` (JSON object), ``FKPD_START_WORKER`` (0/1) and
        ``FKPD_WORKER_THREADS``.

        The project name defaults to the task's short name (``door-open`` for
        ``metaworld/door-open-v3``).

        Raises:
            StudioError: ``FKPD_BOOTSTRAP`` is not a JSON object, or a number is malformed.
        """
        env = os.environ if env is None else env
        task = env.get("FKPD_TASK", "").strip() or DEFAULT_TASK
        default_project = task.split("/", 1)[-1].removesuffix("-v3").removesuffix("-v2")
        raw = env.get("FKPD_BOOTSTRAP", "").strip()
        try:
            bootstrap = json.loads(raw) if raw else {}
        except json.JSONDecodeError as exc:
            raise StudioError(f"FKPD_BOOTSTRAP is not valid JSON ({exc}); give a JSON object such as "
                              '\'{"bc_steps": 4000}\'') from exc
        if not isinstance(bootstrap, dict):
            raise StudioError(f"FKPD_BOOTSTRAP must be a JSON object, got {raw!r}")
        try:
            threads = int(env.get("FKPD_WORKER_THREADS", "1") or 1)
        except ValueError as exc:
            raise StudioError(f"FKPD_WORKER_THREADS must be an integer, got {env.get('FKPD_WORKER_THREADS')!r}") \
                from exc
        return cls(database_url=env.get("FKPD_DATABASE_URL", "").strip(),
                   artifact_dir=env.get("FKPD_ARTIFACT_DIR", "").strip(),
                   project=env.get("FKPD_PROJECT", "").strip() or default_project, task=task,
                   bootstrap=bootstrap,
                   start_worker=env.get("FKPD_START_WORKER", "1").strip().lower() not in ("0", "false", "no"),
                   worker_threads=threads)

    def open_store(self) -> Store:
        """The store (migrated to the current schema)."""
        return Store(self.database_url or None, self.artifact_dir or None)


def open_project(store: Store, cfg: StudioConfig) -> tuple[ProjectInfo, JobView | None]:
    """The configured project, created (with its bootstrap job queued) on first start.

    A later start finds the project and queues nothing: a bootstrap that was running when
    the last app stopped is requeued by the worker's stale-job recovery and resumes from
    its saved dataset and BC state (:func:`fkpd.studio.rounds.bootstrap`). A bootstrap that
    *failed* is not retried automatically; the Label page shows its error and an admin
    can retry (:func:`retry_bootstrap`).

    Returns:
        ``(project, job)`` where ``job`` is the bootstrap job queued now, or None.

    Raises:
        UnknownTaskError: the configured task does not exist.
    """
    from fkpd.envs import get_task
    from fkpd.studio.rounds import BootstrapParams

    get_task(cfg.task)  # a clear error for a typo in FKPD_TASK
    BootstrapParams.from_params(cfg.bootstrap)  # and for a bad FKPD_BOOTSTRAP
    existing = {p.name: p for p in store.list_projects()}
    if cfg.project in existing:
        return existing[cfg.project], None
    from fkpd.store import AlreadyExistsError

    try:
        project = store.create_project(cfg.project, cfg.task,
                                       instructions=default_instructions(cfg.task))
    except AlreadyExistsError:  # another app process created it a moment ago
        return store.get_project(cfg.project), None
    job = store.jobs.enqueue(project.id, "bootstrap", cfg.bootstrap)
    return project, job


def current_version(store: Store, project: ProjectInfo):
    """The served policy: the newest version with a checkpoint, or None before bootstrap."""
    versions = served_versions(store, project)
    return versions[-1] if versions else None


def retry_bootstrap(store: Store, project: ProjectInfo, params: Mapping[str, Any]) -> JobView:
    """Queue the bootstrap again (after a failure).

    Raises:
        StudioError: the project already has a policy version, or a training job is
            queued or running.
    """
    if current_version(store, project) is not None:
        raise StudioError(f"project {project.name!r} is already bootstrapped")
    if active_training_job(store, project) is not None:
        raise StudioError("a training job is already queued or running")
    return store.jobs.enqueue(project.id, "bootstrap", dict(params))


def active_training_job(store: Store, project: ProjectInfo) -> JobView | None:
    """The queued or running bootstrap / alignment round of the project, if any."""
    jobs = [j for j in store.jobs.list(project.id, status=ACTIVE, limit=20) if j.kind in TRAINING_KINDS]
    return jobs[-1] if jobs else None


def latest_training_job(store: Store, project: ProjectInfo) -> JobView | None:
    """The newest bootstrap / alignment round of the project, whatever its status."""
    return next((j for j in store.jobs.list(project.id, limit=50) if j.kind in TRAINING_KINDS), None)


def job_summary(job: JobView) -> str:
    """One line for a job: kind, id, status, progress and message."""
    what = {"bootstrap": "Bootstrap", "alignment_round": "Alignment round", COMPARE: "Comparison"}.get(
        job.kind, job.kind)
    line = f"{what} (job {job.id}): {job.status}"
    if job.status == "running":
        line += f", {100 * job.progress:.0f}%"
        if job.message:
            line += f" — {job.message}"
    elif job.status == "queued":
        line += ", waiting for the worker"
    return line


def error_headline(job: JobView) -> str:
    """The last line of a failed job's traceback: the message a person needs."""
    lines = [ln for ln in (job.error or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "failed without an error message"


# ------------------------------------------------------------------ local worker


def start_local_worker(cfg: StudioConfig, log_file: Path | None = None) -> subprocess.Popen:
    """Start ``fkpd worker`` in a child process that stops when this process exits.

    The worker runs the bootstrap, alignment-round and compare jobs. It gets
    ``--parent-pid`` so it also stops if the app is killed without a chance to clean up.
    Its output goes to ``log_file`` (default :attr:`StudioConfig.worker_log`).

    Returns:
        The child process.
    """
    log_file = log_file or cfg.worker_log
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if cfg.database_url:
        env["FKPD_DATABASE_URL"] = cfg.database_url
    if cfg.artifact_dir:
        env["FKPD_ARTIFACT_DIR"] = cfg.artifact_dir
    cmd = [sys.executable, "-m", "fkpd.cli", "worker", "--parent-pid", str(os.getpid()),
           "--threads", str(cfg.worker_threads), "--stale-after-s", "60"]
    with open(log_file, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)


REPO_ROOT = Path(__file__).resolve().parents[1]
APP_SCRIPT = REPO_ROOT / "app" / "streamlit_app.py"


def launch_app(env: Mapping[str, str], log_file: Path, port: int | None = None,
               timeout_s: float = 60.0) -> tuple[subprocess.Popen, str]:
    """Start ``streamlit run app/streamlit_app.py`` headless and wait until it answers.

    For the browser test and ``bench/bench_ui.py``. The server runs in a session of its
    own, so :func:`stop_app` also stops the worker it starts.

    Args:
        env: environment of the server (the ``FKPD_*`` variables of :class:`StudioConfig`).
        log_file: where the server's output goes.
        port: TCP port; default a free one.
        timeout_s: how long to wait for ``/_stcore/health``.

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
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP_SCRIPT), "--server.port", str(port),
         "--server.headless", "true"],
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


# ------------------------------------------------------------------ access


class AdminAuth:
    """Checks the admin password.

    The secret comes from, in order: Streamlit secrets ``admin_password``
    (``.streamlit/secrets.toml``), the environment variable ``FKPD_ADMIN_PASSWORD``, or a
    random token created on first use and kept in ``labels/admin_token`` (readable only by
    its owner), whose path is printed in the app's terminal. Comparison is constant-time.
    """

    TOKEN_FILE = "admin_token"

    def __init__(self, secret: str | None = None, token_dir: Path | None = None) -> None:
        self.source = "argument" if secret else ""
        if not secret:
            secret = os.environ.get("FKPD_ADMIN_PASSWORD", "").strip() or None
            self.source = "FKPD_ADMIN_PASSWORD" if secret else ""
        if not secret:
            path = (token_dir or labels_dir()) / self.TOKEN_FILE
            secret = self._token(path)
            self.source = str(path)
        self._secret = secret

    @staticmethod
    def _token(path: Path) -> str:
        """The token in ``path``, created first if absent.

        The token is written to a private temporary file and hard-linked into place, so
        the file appears complete or not at all: two app processes starting at once on a
        fresh checkout both end up with the one token that won the link.

        Raises:
            StudioError: the file exists but holds no token.
        """
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            token = secrets.token_urlsafe(18) + "\n"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(token)
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first: use theirs
            except OSError:  # a filesystem without hard links: exclusive create, then write
                try:
                    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
                        fh.write(token)
                except FileExistsError:
                    pass
            finally:
                tmp.unlink(missing_ok=True)
        token = path.read_text().strip()
        if not token:
            raise StudioError(f"the admin token file {path} is empty; delete it and restart the app to get a new "
                              "token, or set FKPD_ADMIN_PASSWORD")
        return token

    def check(self, password: str | None) -> bool:
        """True if ``password`` is the admin secret."""
        if not password:
            return False
        return hmac.compare_digest(password.strip().encode(), self._secret.encode())


def clean_annotator_name(name: str | None) -> str:
    """The annotator's name, stripped.

    Raises:
        StudioError: empty, longer than 64 characters, or containing control characters.
    """
    name = (name or "").strip()
    if not name:
        raise StudioError("Please enter your name: every answer is stored under it.")
    if len(name) > 64:
        raise StudioError("That name is longer than 64 characters; please use a shorter one.")
    if any(ord(c) < 32 for c in name):
        raise StudioError("The name contains control characters; please type it again.")
    return name


# ------------------------------------------------------------------ labelling


@dataclass(frozen=True)
class DisplayPair:
    """A leased pair ready for the browser: both videos as base64 MP4."""

    id: int
    round: int
    policy_version_id: int
    left_clip: int
    right_clip: int
    left_b64: str
    right_b64: str

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "round": self.round, "version": self.policy_version_id,
                "left": {"clip": self.left_clip, "b64": self.left_b64},
                "right": {"clip": self.right_clip, "b64": self.right_b64}}


@lru_cache(maxsize=64)
def _video_b64(path: str, sha256: str | None, mtime_ns: int, size: int) -> str:
    """Base64 of a verified video file (cached per file version)."""
    data = Path(path).read_bytes()
    if sha256 is not None:
        import hashlib

        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("its content does not match the checksum recorded when it was rendered")
    return base64.b64encode(data).decode("ascii")


def clip_video_b64(clip: ClipView) -> str:
    """The clip's MP4 as base64, checked against its recorded sha256.

    Raises:
        FileNotFoundError: the clip has no video, or the file is gone.
        ValueError: the file changed since it was registered.
    """
    if clip.video_file is None:
        raise FileNotFoundError(f"clip {clip.id} has no video")
    path = Path(clip.video_file)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"the video of clip {clip.id} is missing ({path.name})") from None
    try:
        return _video_b64(str(path), clip.video_sha256, st.st_mtime_ns, st.st_size)
    except FileNotFoundError:
        raise FileNotFoundError(f"the video of clip {clip.id} is missing ({path.name})") from None


def lease_for_display(store: Store, project: ProjectInfo, annotator: AnnotatorInfo,
                      count: int = 2) -> tuple[list[DisplayPair], list[str]]:
    """The pair to show now and the next one (prefetched), with their videos.

    A pair whose video is missing or corrupt is retired (never offered again, to anyone)
    and reported in the returned notices; the next pair takes its place.

    Returns:
        ``(pairs, notices)``: up to ``count`` pairs, and one message per pair set aside.
    """
    notices: list[str] = []
    for _ in range(100):  # each pass retires at least one bad pair, or returns
        leased: list[PairView] = store.lease_pairs(project.id, annotator.id, count)
        good: list[DisplayPair] = []
        bad = False
        for pair in leased:
            try:
                left, right = clip_video_b64(pair.left), clip_video_b64(pair.right)
            except (OSError, ValueError) as exc:
                store.retire_pair(pair.id)
                notices.append(f"Pair {pair.id} was set aside and skipped: {exc}. Tell whoever runs the project; "
                               "the other pairs are unaffected.")
                log.warning("retired pair %s: %s", pair.id, exc)
                bad = True
                continue
            good.append(DisplayPair(pair.id, pair.round, pair.policy_version_id, pair.left.id, pair.right.id,
                                    left, right))
        if not bad:
            return good, notices
    return good, notices


def record_answers(store: Store, annotator: AnnotatorInfo, answers: Iterable[Mapping[str, Any]],
                   recorded: set[int]) -> list[str]:
    """Store answers sent by the browser, each at most once.

    Args:
        store: the store.
        annotator: who answered.
        answers: ``{"pair": id, "outcome": "left"|"right"|"equal"|"skip", "shown_ms": epoch
            ms}`` objects, in the order given (the browser keeps every answer of the
            session until the page reloads, so they arrive again on every rerun).
        recorded: pair ids already stored in this browser session; updated in place. The
            store is idempotent per (pair, annotator) as well, so a repeat is harmless.

    Returns:
        Messages for answers that could not be stored (a pair that was retired or filled
        by someone else meanwhile, a malformed entry).
    """
    problems = []
    for item in answers or ():
        try:
            pair_id = int(item["pair"])
            outcome = str(item["outcome"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"ignored a malformed answer {item!r}")
            continue
        if pair_id in recorded:
            continue
        if outcome not in OUTCOMES:
            problems.append(f"ignored answer {outcome!r} for pair {pair_id}")
            recorded.add(pair_id)
            continue
        shown = item.get("shown_ms")
        shown_at = (datetime.fromtimestamp(float(shown) / 1000.0, tz=timezone.utc)
                    if isinstance(shown, (int, float)) and shown > 0 else None)
        try:
            store.answer(pair_id, annotator.id, outcome, shown_at=shown_at)
        except (PairUnavailableError, NotFoundError, StoreInputError) as exc:
            problems.append(f"your answer to pair {pair_id} was not stored: {exc}")
        recorded.add(pair_id)
    return problems


# ------------------------------------------------------------------ rounds


def rounds_history(store: Store, project: ProjectInfo):
    """One row per policy version: round, labels used, success rate, implicit accuracy, ...

    Returns:
        A pandas DataFrame (empty with the columns when there is no version yet);
        ``success_rate`` and ``implicit_acc`` are fractions in [0, 1]. When a version
        has a D4RL normalised score (``d4rl/`` tasks, 0-100 scale) the frame has a
        ``d4rl_score`` column after ``mean_return``; the intent teachers' scores recorded
        by the evaluation (``intent_smooth``, ``intent_high_gripper``; higher is closer
        to the intent, :func:`fkpd.prefs.teachers.intent_scores`) come before
        ``implicit_acc``. A version that holds imported labels
        (no checkpoint) shows ``— (imported labels)`` as its regulariser.
    """
    import pandas as pd

    cols = ["round", "version", "created", "labels_used", "success_rate", "mean_return", "implicit_acc",
            "implicit_acc_before", "reward_margin", "regularizer", "beta", "lam", "steps", "eval_episodes"]
    rows = []
    for v in store.list_policy_versions(project.id):
        m = v.metrics
        kind = "— (imported labels)" if m.get("source") == "import" else "— (BC)" if v.round == 0 else None
        rows.append({"round": v.round, "version": v.id, "created": v.created_at,
                     "labels_used": m.get("labels_used", 0), "success_rate": m.get("success_rate"),
                     "mean_return": m.get("mean_return"), "d4rl_score": m.get("d4rl_normalized_score"),
                     "implicit_acc": m.get("implicit_acc"),
                     "implicit_acc_before": m.get("implicit_acc_before"), "reward_margin": m.get("reward_margin"),
                     "regularizer": m.get("regularizer", kind),
                     "beta": m.get("beta"), "lam": m.get("lam"), "steps": m.get("steps", m.get("bc_steps")),
                     "eval_episodes": m.get("episodes"),
                     **{k: m[k] for k in m if k.startswith("intent_")}})
    if any(r["d4rl_score"] is not None for r in rows):
        cols.insert(cols.index("mean_return") + 1, "d4rl_score")
    intents = sorted({k for r in rows for k in r if k.startswith("intent_")})
    at = cols.index("implicit_acc")
    cols[at:at] = intents
    return pd.DataFrame(rows, columns=cols)


def enqueue_round(store: Store, project: ProjectInfo, params: Mapping[str, Any]) -> JobView:
    """Queue an alignment round with the admin's parameters.

    Args:
        params: a subset of :data:`ROUND_FIELDS`; the others keep their defaults.

    Raises:
        StudioError: an unknown or invalid parameter, no policy version yet, no comparison
            to train on, or a training job already queued or running.
    """
    from fkpd.studio.rounds import RoundParams

    unknown = sorted(set(params) - set(ROUND_FIELDS))
    if unknown:
        raise StudioError(f"unknown round parameter(s) {unknown}; allowed: {list(ROUND_FIELDS)}")
    try:
        RoundParams.from_params(dict(params))
    except FKPDError as exc:
        raise StudioError(str(exc)) from exc
    if current_version(store, project) is None:
        raise StudioError("the project has no policy yet: wait for the bootstrap to finish")
    job = active_training_job(store, project)
    if job is not None:
        raise StudioError(f"{job_summary(job)}; wait for it to finish before starting another round")
    if not store.count_training_pairs(project.id):
        raise StudioError("no comparison to train on yet: label some pairs Left, Right or Equal first "
                          "(skips are not trained on)")
    return store.jobs.enqueue(project.id, "alignment_round", dict(params))


# ------------------------------------------------------------------ data


def export_bytes(store: Store, project: ProjectInfo, fmt: str) -> bytes:
    """The project's comparisons with their segments as a Parquet or HDF5 file, in memory.

    Raises:
        StudioError: unknown format.
    """
    from fkpd.store.export import export_comparisons

    if fmt not in ("parquet", "hdf5"):
        raise StudioError(f"unknown export format {fmt!r}; choose parquet or hdf5")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"comparisons.{'h5' if fmt == 'hdf5' else 'parquet'}"
        export_comparisons(store, project.id, fmt, out)
        return out.read_bytes()


# ------------------------------------------------------------------ compare


@dataclass
class CompareParams:
    """Parameters of a ``compare`` job: the same reset seeds rolled out by two versions.

    Attributes:
        version_a, version_b: policy version ids of the project.
        episodes: number of reset seeds (1..16).
        seed: first reset seed (the evaluation seeds of :mod:`fkpd.policy.rollout` by default).
        render_size: video height and width in pixels.
    """

    version_a: int
    version_b: int
    episodes: int = 4
    seed: int = 10_000
    render_size: int = 224

    def __post_init__(self) -> None:
        for name in ("version_a", "version_b", "episodes", "seed", "render_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise StudioError(f"compare parameter {name!r} must be an integer, got {value!r}")
        if not 1 <= self.episodes <= 16:
            raise StudioError(f"compare 'episodes' must be between 1 and 16, got {self.episodes}")
        if not 32 <= self.render_size <= 640:
            raise StudioError(f"compare 'render_size' must be between 32 and 640 pixels, got {self.render_size}")


def enqueue_compare(store: Store, project: ProjectInfo, version_a: int, version_b: int, episodes: int = 4,
                    render_size: int = 224) -> JobView:
    """Queue a comparison of two policy versions of the project.

    Raises:
        StudioError: bad parameters, a version of another project, or one without a
            checkpoint (imported labels, which cannot be rolled out).
    """
    params = CompareParams(int(version_a), int(version_b), int(episodes), render_size=int(render_size))
    versions = {v.id: v for v in store.list_policy_versions(project.id)}
    for vid in (params.version_a, params.version_b):
        if vid not in versions:
            raise StudioError(f"policy version {vid} is not a version of project {project.name!r}")
        if versions[vid].checkpoint_path is None:
            raise StudioError(f"policy version {vid} holds imported labels, not a policy, so it cannot be rolled "
                              "out; pick a version with a checkpoint")
    return store.jobs.enqueue(project.id, COMPARE, dict(params.__dict__))


@register_handler(COMPARE)
def compare(ctx: JobContext) -> dict[str, Any]:
    """Job handler: roll out the same reset seeds with two policy versions and save videos.

    Each version plays full episodes (the horizon the project was bootstrapped with) from reset seeds
    ``seed .. seed + episodes - 1`` with its own sampling noise; videos are written
    atomically to ``projects/<id>/compare/job<j>/``.

    Returns:
        ``{"version_a", "version_b", "episodes": [{"seed", "a": {"video", "return",
        "success"}, "b": {...}}]}`` with video paths relative to the artifact directory.

    Raises:
        StudioError: bad parameters.
        ArtifactIntegrityError / CheckpointError: a version's checkpoint is missing or corrupt.
    """
    from fkpd.envs import get_task, make_env
    from fkpd.policy import DiffusionPolicy
    from fkpd.policy.rollout import write_video
    from fkpd.studio.rounds import _checkpoint_dir
    from fkpd.policy.rollout import ClipRequest, rollout_clips

    store = ctx.store
    params = CompareParams(**ctx.params)
    project = store.get_project(ctx.job.project_id)
    spec = get_task(project.task_id)
    horizon = _project_horizon(store, project)
    seeds = list(range(params.seed, params.seed + params.episodes))
    out: dict[str, Any] = {"version_a": params.version_a, "version_b": params.version_b,
                           "episodes": [{"seed": s} for s in seeds]}
    envs = [make_env(project.task_id, max_episode_steps=horizon, render_size=(params.render_size, params.render_size))
            for _ in range(min(8, params.episodes))]
    try:
        for side_i, (side, vid) in enumerate((("a", params.version_a), ("b", params.version_b))):
            version = store.get_policy_version(vid)
            policy = DiffusionPolicy.load(_checkpoint_dir(store, version), task_id=project.task_id)
            requests = [ClipRequest(s, 1000 + s, max_steps=horizon, render_from=0) for s in seeds]
            for b0 in range(0, len(requests), len(envs)):
                episodes = rollout_clips(policy, envs, requests[b0:b0 + len(envs)])
                for k, ep in enumerate(episodes, start=b0):
                    rel = f"projects/{project.id}/compare/job{ctx.job_id}/seed{seeds[k]}_v{vid}.mp4"
                    video, _ = store.write_artifact_atomic(
                        rel, lambda path, frames=ep.frames: write_video(frames, path, fps=spec.fps), to_path=True)
                    out["episodes"][k][side] = {"video": video, "return": float(ep.ret),
                                                "success": bool(ep.succeeded)}
                    done = side_i * len(seeds) + k + 1
                    ctx.progress(done / (2 * len(seeds)), f"rendering: episode {done}/{2 * len(seeds)}")
                ctx.check_cancelled()
    finally:
        for env in envs:
            env.close()
    return out


def _project_horizon(store: Store, project: ProjectInfo) -> int:
    """The episode length the project was bootstrapped with: the batch settings recorded
    with its first version that has a checkpoint, as alignment rounds read them."""
    from fkpd.studio.rounds import RoundParams

    versions = served_versions(store, project)
    recorded = (versions[0].metrics.get("bootstrap") or {}).get("settings") if versions else None
    return RoundParams().settings(recorded).horizon(project.task_id)


def compare_videos(store: Store, job: JobView) -> list[dict[str, Any]]:
    """The finished compare job's episodes with absolute video paths (None when missing)."""
    rows = []
    for ep in (job.result or {}).get("episodes", []):
        row = {"seed": ep.get("seed")}
        for side in ("a", "b"):
            info = dict(ep.get(side) or {})
            path = None
            if info.get("video"):
                try:
                    p = store.resolve(info["video"])
                    path = p if p.exists() else None
                except ArtifactPathError:  # a bad stored path shows as a missing video
                    path = None
            info["path"] = path
            row[side] = info
        rows.append(row)
    return rows


def version_label(v) -> str:
    """``v3 · round 2 · 40% success`` for a PolicyVersionInfo; on D4RL tasks the D4RL
    normalised score follows (``v3 · round 2 · 0% success · D4RL score 41.5``), and a
    version of imported labels reads ``v4 · imported labels``."""
    if v.metrics.get("source") == "import":
        return f"v{v.id} · imported labels"
    sr = v.metrics.get("success_rate")
    tail = f" · {100 * sr:.0f}% success" if isinstance(sr, (int, float)) else ""
    score = v.metrics.get("d4rl_normalized_score")
    tail += f" · D4RL score {score:.1f}" if isinstance(score, (int, float)) else ""
    name = "BC" if v.round == 0 else f"round {v.round}"
    return f"v{v.id} · {name}{tail}"


__all__: Sequence[str] = (
    "AdminAuth", "CompareParams", "DisplayPair", "StudioConfig", "StudioError", "active_training_job", "current_version",
    "served_versions",
    "clean_annotator_name", "clip_video_b64", "compare", "compare_videos", "default_instructions", "enqueue_compare",
    "enqueue_round",
    "error_headline", "export_bytes", "job_summary", "latest_training_job", "launch_app", "lease_for_display",
    "open_project", "stop_app",
    "record_answers", "retry_bootstrap", "rounds_history", "start_local_worker", "version_label",
)
