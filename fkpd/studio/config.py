"""The app's configuration and first start, and what every other studio module shares.

* :class:`StudioConfig` — where the store is, which project and task, which bootstrap
  parameters, whether to start a local worker; read from the environment
  (``FKPD_*`` variables, see :meth:`StudioConfig.from_env`).
* :func:`open_project` — creates the default project together with its bootstrap job
  (one transaction) on first start; a later start finds both and resumes, and queues a
  bootstrap for a project that has neither a policy version nor one.
* :func:`start_local_worker` — ``fkpd worker`` as a child process that exits with the app;
  :func:`start_local_workers` — the app's two: one for training jobs, one that renders
  top-up pairs meanwhile (:mod:`fkpd.studio.topup`).
* :class:`StudioError` (bad input from the app), the job kinds and answers the pages share
  (:data:`ACTIVE`, :data:`OUTCOMES`, :data:`ROUND_FIELDS`, ...) and
  :func:`default_instructions`, a new project's labelling instructions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from fkpd.envs import DEFAULT_TASK, get_task
from fkpd.envs.metaworld import INSTRUCTIONS as DEFAULT_INSTRUCTIONS  # noqa: F401 (re-exported)
from fkpd.store import JobView, ProjectInfo, Store
from fkpd.store.artifacts import is_url
from fkpd.store.db import labels_dir
from fkpd.store.models import IDENTITY_MODES
from fkpd.studio.errors import StudioError
from fkpd.studio.params import ROUND_FIELDS, TRAINING_KINDS, BootstrapParams  # noqa: F401 (re-exported)

#: Largest automatic-round threshold accepted (comparisons).
MAX_AUTO_ROUND_EVERY = 100_000

ACTIVE = ("queued", "running")
#: Project setting: start an alignment round once this many new trainable comparisons
#: arrived since the latest version (an int >= 1); 0 or missing: rounds start by hand
#: (:mod:`fkpd.studio.autoround`).
AUTO_ROUND_EVERY = "auto_round_every"
#: Job kind that renders more pairs from the served version (:mod:`fkpd.studio.topup`).
TOP_UP = "top_up"
#: Answers the label page accepts; the keyboard shortcuts map onto them.
OUTCOMES = ("left", "right", "equal", "skip")


def default_instructions(task_id: str) -> str:
    """The instructions a new project of ``task_id`` starts with: what the clips show and
    what to prefer (:attr:`fkpd.envs.TaskSpec.instructions`; MetaWorld: the arm's progress
    on the task; ``d4rl/maze2d-*``: the ball heading for the red goal disc; D4RL
    locomotion: the gait moving the robot forward).

    Raises:
        UnknownTaskError: ``task_id`` is not registered.
    """
    return get_task(task_id).instructions



# ------------------------------------------------------------------ configuration


@dataclass
class StudioConfig:
    """Where and what the app serves.

    Attributes:
        database_url: store URL; "" means ``$FKPD_DATABASE_URL`` or ``labels/fkpd.sqlite``.
        artifact_dir: "" means ``$FKPD_ARTIFACT_DIR`` or ``labels/artifacts``.
        artifact_url: an object store for the artifacts instead of a folder
            (``s3://bucket/prefix``; :mod:`fkpd.store.remote_artifacts`), which wins over
            ``artifact_dir``; "" means ``$FKPD_ARTIFACT_URL`` or none. The local workers
            get it as ``FKPD_ARTIFACT_URL``.
        project: the app's default project: created on first start, and opened by a link
            that names no other (``?project=NAME``; the app serves every project of the
            store, :mod:`fkpd.studio.projects`).
        task: task id of the project when it is created.
        bootstrap: parameters of the bootstrap job queued on first start
            (:class:`fkpd.studio.params.BootstrapParams`, flat).
        start_worker: start a local ``fkpd worker`` child process.
        worker_threads: torch threads of that worker (0: torch's default); 1 leaves a
            core to the app on a 2-core machine.
        worker_nice: niceness of the local workers (``fkpd worker --nice``, 0..19): the
            app's own process answers clicks first while they train and render; they
            still get every cycle the app does not use.
        identity: how annotators of a *new* project are known: ``"invite"`` (invite links
            with a random token, the default) or ``"open"`` (the name in the URL, for
            demos); an existing project keeps its mode (``fkpd annotators mode``).
        auto_rounds: automatic rounds of a *new* project: start one after this many new
            trainable comparisons; None (the default): the batch size
            (``pairs_per_batch``); 0: rounds start by hand. An admin changes it on the
            Rounds page (:func:`fkpd.studio.autoround.set_auto_rounds`).
    """

    database_url: str = ""
    artifact_dir: str = ""
    artifact_url: str = ""
    project: str = "door-open"
    task: str = DEFAULT_TASK
    bootstrap: dict[str, Any] = field(default_factory=dict)
    start_worker: bool = True
    worker_threads: int = 1
    worker_nice: int = 10
    identity: str = "invite"
    auto_rounds: int | None = None

    @property
    def worker_log(self) -> Path:
        """The local worker's log: next to the artifact directory (``labels/worker.log``
        by default), so an app on another store never writes into ``labels/``."""
        local = self.artifact_dir and not is_url(self.artifact_dir)
        return (Path(self.artifact_dir).parent if local else labels_dir()) / "worker.log"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "StudioConfig":
        """Read ``FKPD_DATABASE_URL``, ``FKPD_ARTIFACT_DIR``, ``FKPD_ARTIFACT_URL``, ``FKPD_PROJECT``,
        ``FKPD_TASK``, ``FKPD_BOOTSTRAP`` (JSON object), ``FKPD_START_WORKER`` (0/1),
        ``FKPD_WORKER_THREADS``, ``FKPD_IDENTITY`` (``invite`` or ``open``, for a new
        project) and ``FKPD_AUTO_ROUNDS`` (a new project's automatic rounds: an integer
        N >= 1, or ``0``/``off`` for rounds by hand; default the batch size).

        The project name defaults to the task's short name (``door-open`` for
        ``metaworld/door-open-v3``).

        Raises:
            StudioError: ``FKPD_BOOTSTRAP`` is not a JSON object, a number is malformed,
                ``FKPD_IDENTITY`` is neither ``invite`` nor ``open``, or ``FKPD_AUTO_ROUNDS`` is
                not a count.
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
        identity = env.get("FKPD_IDENTITY", "").strip().lower() or "invite"
        if identity not in IDENTITY_MODES:
            raise StudioError(f"FKPD_IDENTITY must be 'invite' (annotators come through invite links) or 'open' "
                              f"(annotators type their name), got {env.get('FKPD_IDENTITY')!r}")
        auto = env.get("FKPD_AUTO_ROUNDS", "").strip().lower()
        auto_rounds: int | None = None
        if auto in ("0", "off", "no", "false"):
            auto_rounds = 0
        elif auto:
            try:
                auto_rounds = int(auto)
            except ValueError:
                auto_rounds = -1
            if not 1 <= auto_rounds <= MAX_AUTO_ROUND_EVERY:
                raise StudioError(f"FKPD_AUTO_ROUNDS must be a number of comparisons between 1 and "
                                  f"{MAX_AUTO_ROUND_EVERY}, or 0 (rounds by hand), got {env.get('FKPD_AUTO_ROUNDS')!r}")
        return cls(database_url=env.get("FKPD_DATABASE_URL", "").strip(),
                   artifact_dir=env.get("FKPD_ARTIFACT_DIR", "").strip(),
                   artifact_url=env.get("FKPD_ARTIFACT_URL", "").strip(),
                   project=env.get("FKPD_PROJECT", "").strip() or default_project, task=task,
                   bootstrap=bootstrap,
                   start_worker=env.get("FKPD_START_WORKER", "1").strip().lower() not in ("0", "false", "no"),
                   worker_threads=threads, identity=identity, auto_rounds=auto_rounds)

    def open_store(self) -> Store:
        """The store (migrated to the current schema)."""
        return Store(self.database_url or None, self.artifact_url or self.artifact_dir or None)


def open_project(store: Store, cfg: StudioConfig) -> tuple[ProjectInfo, JobView | None]:
    """The configured project, created with its bootstrap job queued on first start.

    A new project starts with automatic rounds (:data:`AUTO_ROUND_EVERY`) after
    :attr:`StudioConfig.auto_rounds` comparisons (default: the bootstrap's batch size).
    The project and its bootstrap job are created in one transaction
    (:meth:`Store.create_project_with_job`): a bootstrap that cannot be queued (a bad
    ``FKPD_BOOTSTRAP``) leaves no project behind. A later start finds the project: a
    bootstrap that was running when the last app stopped is requeued by the worker's
    stale-job recovery and resumes from its saved dataset and BC state
    (:func:`fkpd.studio.bootstrap.bootstrap`). A project that has no servable policy
    version and no bootstrap job queued, running or succeeded (one that was stranded, or
    whose bootstrap failed or was cancelled) gets a new bootstrap with the current
    settings; the check and the insert are one transaction, so two apps starting at once
    queue one.

    Returns:
        ``(project, job)`` where ``job`` is the bootstrap job queued now, or None.

    Raises:
        UnknownTaskError: the configured task does not exist.
        ParamError: ``FKPD_BOOTSTRAP`` holds a bad value (NaN included).
        StoreInputError: the bootstrap parameters are not strict JSON.
    """
    from fkpd.envs import get_task
    from fkpd.store import AlreadyExistsError

    get_task(cfg.task)  # a clear error for a typo in FKPD_TASK
    boot = BootstrapParams.from_params(cfg.bootstrap)  # and for a bad FKPD_BOOTSTRAP (ParamError, NaN included)
    existing = {p.name: p for p in store.list_projects()}
    if cfg.project not in existing:
        every = boot.batch.pairs_per_batch if cfg.auto_rounds is None else cfg.auto_rounds
        try:
            return store.create_project_with_job(cfg.project, cfg.task, "bootstrap", dict(cfg.bootstrap),
                                                 instructions=default_instructions(cfg.task), identity=cfg.identity,
                                                 settings={AUTO_ROUND_EVERY: every})
        except AlreadyExistsError:  # another app process created it a moment ago
            existing[cfg.project] = store.get_project(cfg.project)
    project = existing[cfg.project]
    if any(v.checkpoint_path is not None for v in store.list_policy_versions(project.id)):
        return project, None
    return project, store.jobs.enqueue_unless(project.id, "bootstrap", dict(cfg.bootstrap),
                                              statuses=("queued", "running", "succeeded"))


# ------------------------------------------------------------------ local worker


def start_local_worker(cfg: StudioConfig, log_file: Path | None = None, *, kinds: tuple[str, ...] = (),
                       skip_kinds: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start ``fkpd worker`` in a child process that stops when this process exits.

    The worker runs the bootstrap, alignment-round, compare and top-up jobs (or only
    ``kinds``, never ``skip_kinds``). It gets ``--parent-pid`` so it also stops if the
    app is killed without a chance to clean up. Its output goes to ``log_file`` (default
    :attr:`StudioConfig.worker_log`).

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
    if cfg.artifact_url:
        env["FKPD_ARTIFACT_URL"] = cfg.artifact_url
    elif cfg.artifact_dir:
        env.pop("FKPD_ARTIFACT_URL", None)  # the worker uses the app's folder, as the app does
    env["FKPD_WORKER_KINDS"] = ",".join(kinds)  # read by fkpd.store.run_worker
    env["FKPD_WORKER_SKIP_KINDS"] = ",".join(skip_kinds)
    cmd = [sys.executable, "-m", "fkpd.cli", "worker", "--parent-pid", str(os.getpid()),
           "--threads", str(cfg.worker_threads), "--nice", str(cfg.worker_nice), "--stale-after-s", "60"]
    with open(log_file, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)


def start_local_workers(cfg: StudioConfig) -> list[subprocess.Popen]:
    """The app's local workers, both logging to :attr:`StudioConfig.worker_log`: one for
    every job kind but ``top_up`` (bootstrap, rounds, comparisons), and one for
    ``top_up`` only (``FKPD_WORKER_KINDS=top_up``), so pairs keep coming while a round
    trains (a worker runs one job at a time). Both run the idle checks that queue automatic rounds and top-ups
    (:mod:`fkpd.studio.upkeep`). The top-up worker uses one torch thread.

    Returns:
        ``[training worker, top-up worker]``.
    """
    main = start_local_worker(cfg, skip_kinds=(TOP_UP,))
    renderer = start_local_worker(dataclasses.replace(cfg, worker_threads=1), kinds=(TOP_UP,))
    return [main, renderer]


__all__ = ["ACTIVE", "AUTO_ROUND_EVERY", "DEFAULT_INSTRUCTIONS", "MAX_AUTO_ROUND_EVERY", "OUTCOMES", "ROUND_FIELDS",
           "TOP_UP", "TRAINING_KINDS", "StudioConfig", "StudioError", "default_instructions", "open_project",
           "start_local_worker", "start_local_workers"]
