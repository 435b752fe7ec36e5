"""Projects as the app and ``fkpd projects`` create, list and pick them.

One app serves every project of its store: the sidebar's picker and the ``?project=NAME``
URL parameter choose one per browser tab (``app/studio_ui.py``); the project the app was
started with (``FKPD_PROJECT`` / ``FKPD_TASK``, :class:`fkpd.studio.StudioConfig`) is the
default. This module holds what the New-project form of the app's Projects page and
``fkpd projects create|list|show`` (:mod:`fkpd.cli.projects`) share:

* :func:`create_project` — a project with its bootstrap job queued in one transaction
  (through :func:`fkpd.studio.open_project`, the app's first start), then its
  instructions; the local workers, or any ``fkpd worker``, pick the job up.
* :func:`bootstrap_settings` — the bootstrap parameters from a few named settings plus a
  JSON object of others (``--bootstrap`` / the form's "Other bootstrap settings").
* :func:`dataset_param` — the ``dataset`` parameter from a source kind (generated, D4RL
  dataset name, file path, Minari id), checked where the app can check it.
* :func:`project_summary` — what a project holds now (versions, comparisons, training
  job), for ``projects list|show`` and the Projects page.
* :func:`resolve_project` — the project a request names, or the default with a message;
  :func:`project_for_token` — the project of an invite link that does not name one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from fkpd.errors import FKPDError
from fkpd.store import JobView, ProjectInfo, Store
from fkpd.studio.config import MAX_AUTO_ROUND_EVERY, StudioConfig, open_project
from fkpd.studio.errors import StudioError

#: Bootstrap settings offered by name (``fkpd projects create`` flags, the New-project
#: form's fields): name -> (type, help). Others go in the JSON object
#: (:class:`fkpd.studio.params.BootstrapParams`, :class:`fkpd.studio.params.BatchSettings`).
BOOTSTRAP_FIELDS: dict[str, tuple[type, str]] = {
    "dataset": (str, "offline data instead of generating it: a D4RL-layout file, a D4RL dataset name or "
                     "minari:DATASET_ID (default: generated; D4RL locomotion tasks: their own dataset)"),
    "dataset_episodes": (int, "episodes of generated data (default 100)"),
    "bc_steps": (int, "behaviour-cloning steps (default 4000)"),
    "pairs_per_batch": (int, "pairs per labelling batch (default 20)"),
    "segment_length": (int, "L, steps per clip (default: the task's)"),
    "eval_episodes": (int, "evaluation episodes of each new version (default 10)"),
    "max_episode_steps": (int, "horizon in steps (default: the task's)"),
    "seed": (int, "seeds the dataset, BC, alignment and clips (default 0)"),
}

#: Where a new project's offline data comes from (the New-project form's choice):
#: kind -> what the form's text field then holds.
DATASET_KINDS: dict[str, str] = {
    "generated": "nothing: the scripted policy's demonstrations are generated (D4RL locomotion tasks read "
                 "their own D4RL dataset instead)",
    "d4rl": "a D4RL dataset name, e.g. maze2d-umaze-v1, looked up in $D4RL_DATASET_DIR or ~/.d4rl/datasets",
    "file": "the path of a D4RL-layout HDF5 file on the worker's machine",
    "minari": "a Minari dataset id, e.g. D4RL/door/human-v2 (read from Minari's local datasets)",
}


def task_choices() -> list[str]:
    """Every registered task id (:func:`fkpd.envs.list_tasks`): MetaWorld's, then D4RL's."""
    from fkpd.envs import list_tasks

    return list_tasks()


def dataset_param(kind: str, value: str, task: str, *, check_files: bool = True) -> str:
    """The bootstrap's ``dataset`` parameter for a source ``kind`` of :data:`DATASET_KINDS`.

    Args:
        kind: ``generated`` (returns ``""``), ``d4rl``, ``file`` or ``minari``.
        value: the name, path or id typed (ignored for ``generated``).
        task: the project's task, for messages.
        check_files: also check that a file or a D4RL dataset is there
            (:func:`fkpd.studio.bootstrap.resolve_bootstrap_dataset`); only true where
            the workers share this machine's files.

    Returns:
        ``""``, a D4RL dataset name, an absolute file path, or ``minari:ID``.

    Raises:
        StudioError: an unknown kind, an empty value, a name that is not a D4RL dataset
            name, or (``check_files``) a file or D4RL dataset that is not there.
    """
    if kind not in DATASET_KINDS:
        raise StudioError(f"dataset source must be one of {', '.join(DATASET_KINDS)}, got {kind!r}")
    value = (value or "").strip()
    if kind == "generated":
        return ""
    if not value:
        noun = {"d4rl": "D4RL dataset name", "file": "file path", "minari": "Minari dataset id"}[kind]
        raise StudioError(f"the dataset source is '{kind}' but no {noun} was given; type it, or choose 'generated'")
    if kind == "minari":
        value = value if value.startswith("minari:") else f"minari:{value}"
        if value == "minari:":
            raise StudioError("give the Minari dataset id after 'minari:', e.g. minari:D4RL/door/human-v2")
        return value
    if kind == "d4rl":
        from fkpd.envs.d4rl import is_d4rl_name

        if not is_d4rl_name(value):
            raise StudioError(f"{value!r} is not a D4RL dataset name (e.g. maze2d-umaze-v1, hopper-medium-v2); for "
                              "a file choose 'file'")
    else:
        path = Path(value).expanduser()
        if check_files and not path.is_file():
            raise StudioError(f"there is no file {str(path)!r} on this machine; give the absolute path of a "
                              "D4RL-layout HDF5 file")
        value = str(path.resolve()) if path.is_file() else value
    if check_files:
        from fkpd.studio.bootstrap import resolve_bootstrap_dataset

        try:
            resolve_bootstrap_dataset(value, task)
        except FKPDError as exc:
            raise StudioError(str(exc)) from None
    return value


def bootstrap_settings(fields: Mapping[str, Any], extra: str | Mapping[str, Any] | None = None, *,
                       extra_name: str = "--bootstrap") -> dict[str, Any]:
    """A bootstrap's parameters: the JSON object ``extra`` with ``fields`` on top.

    Args:
        fields: named settings (:data:`BOOTSTRAP_FIELDS`); None values are left out.
        extra: other settings, a JSON object as text or a mapping (``FKPD_BOOTSTRAP``'s
            form); None or blank: none.
        extra_name: what ``extra`` is called in messages (a flag or a form field).

    Returns:
        The flat parameters; a ``dataset`` that is an existing file becomes its absolute
        path (the worker may run in another directory). Not validated yet:
        :func:`create_project` does (:meth:`fkpd.studio.params.BootstrapParams.from_params`).

    Raises:
        StudioError: ``extra`` is not valid JSON or not an object.
    """
    params: dict[str, Any] = {}
    if isinstance(extra, str) and extra.strip():
        try:
            params = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise StudioError(f"{extra_name} is not valid JSON ({exc}); give an object such as "
                              "'{\"bc_steps\": 2000, \"policy\": {\"hidden_dim\": 128}}'") from None
        if not isinstance(params, dict):
            raise StudioError(f"{extra_name} must be a JSON object, got {extra!r}")
    elif isinstance(extra, Mapping):
        params = dict(extra)
    params.update({k: v for k, v in fields.items() if v is not None})
    if isinstance(params.get("dataset"), str) and params["dataset"] and Path(params["dataset"]).expanduser().exists():
        params["dataset"] = str(Path(params["dataset"]).expanduser().resolve())
    return params


def check_auto_rounds(every: int | None, name: str = "--auto-rounds") -> int | None:
    """``every`` if it is None (the batch size) or 0..:data:`MAX_AUTO_ROUND_EVERY`.

    Raises:
        StudioError: out of range (``name`` says which flag or field).
    """
    if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                              or not 0 <= every <= MAX_AUTO_ROUND_EVERY):
        raise StudioError(f"{name} must be a number of comparisons from 1 to {MAX_AUTO_ROUND_EVERY}, or 0 for "
                          f"rounds by hand, got {every!r}")
    return every


def create_project(store: Store, name: str, task: str, bootstrap: Mapping[str, Any], *, instructions: str = "",
                   identity: str = "invite", auto_rounds: int | None = None) -> tuple[ProjectInfo, JobView | None]:
    """Create project ``name`` of ``task`` with its bootstrap job queued at once, as the
    app's first start does (:func:`fkpd.studio.open_project`: one transaction), then set
    its ``instructions`` when given (the task's own otherwise).

    Args:
        name: a new project name (trimmed; 1-200 characters).
        task: a registered task id (:func:`task_choices`).
        bootstrap: the bootstrap parameters (:func:`bootstrap_settings`).
        identity: ``invite`` (invite links) or ``open`` (annotators type a name).
        auto_rounds: an automatic round after this many new comparisons; None: the batch
            size; 0: rounds by hand.

    Returns:
        ``(project, bootstrap job)``; the job is None when another process created the
        project a moment ago.

    Raises:
        StudioError: an empty, over-long or taken name, an unknown task or identity mode,
            or ``auto_rounds`` out of range.
        ParamError: a bad bootstrap setting (the message names it).
    """
    from fkpd.envs import get_task
    from fkpd.errors import UnknownTaskError
    from fkpd.store.models import IDENTITY_MODES, NAME_LEN
    from fkpd.studio.params import BootstrapParams

    clean = (name or "").strip() if isinstance(name, str) else ""
    if not clean:
        raise StudioError("the project needs a name, e.g. maze-demo")
    if len(clean) > NAME_LEN:
        raise StudioError(f"the project name is {len(clean)} characters; at most {NAME_LEN} are allowed")
    if any(not ch.isprintable() for ch in clean):
        raise StudioError("the project name may not hold control characters (tabs, line breaks)")
    try:
        get_task(task)
    except UnknownTaskError as exc:  # its message lists the known task ids
        raise StudioError(str(exc.args[0]) if exc.args else f"unknown task {task!r}") from None
    if identity not in IDENTITY_MODES:
        raise StudioError(f"identity must be 'invite' or 'open', got {identity!r}")
    check_auto_rounds(auto_rounds, "automatic rounds")
    BootstrapParams.from_params(bootstrap)  # ParamError naming the setting, before the name check's query
    if any(p.name == clean for p in store.list_projects()):
        raise StudioError(f"project {clean!r} exists already; pick another name (see it with `fkpd projects show "
                          f"{clean}`, or in the app's project picker)")
    cfg = StudioConfig(project=clean, task=task, bootstrap=dict(bootstrap), start_worker=False, identity=identity,
                       auto_rounds=auto_rounds)
    project, job = open_project(store, cfg)
    if instructions and instructions.strip():
        project = store.update_project(project.id, instructions=instructions.strip())
    return project, job


def project_summary(store: Store, project: ProjectInfo) -> dict[str, Any]:
    """What a project holds now, as JSON-ready values: name, id, task, identity, created,
    settings, instructions, versions (count), served_version (label or None),
    comparisons, outcomes (counts of left/right/equal/skip), annotators, batch (answers
    and needed), training_job (id, kind, status, summary, error; or None)."""
    from fkpd.studio.history import current_version, error_headline, job_summary, latest_training_job, \
        version_label

    frame = store.comparisons_frame(project.id)
    served = current_version(store, project)
    job = latest_training_job(store, project)
    counts = frame["outcome"].value_counts().to_dict() if len(frame) else {}
    done, total = store.batch_progress(project.id)
    return {
        "name": project.name, "id": project.id, "task": project.task_id, "identity": project.identity,
        "created": project.created_at.isoformat(), "settings": project.settings,
        "instructions": project.instructions,
        "versions": len(store.list_policy_versions(project.id)),
        "served_version": version_label(served) if served is not None else None,
        "comparisons": int(len(frame)), "outcomes": {k: int(counts.get(k, 0)) for k in ("left", "right", "equal",
                                                                                       "skip")},
        "annotators": int(frame["annotator"].nunique()) if len(frame) else 0,
        "batch": {"answers": done, "needed": total},
        "training_job": None if job is None else {
            "id": job.id, "kind": job.kind, "status": job.status, "summary": job_summary(job),
            "error": error_headline(job) if job.status == "failed" else None},
    }


def resolve_project(projects: list[ProjectInfo], requested: str | None, default: str) -> tuple[ProjectInfo, str]:
    """The project a link or the picker asks for, among ``projects``.

    Args:
        projects: the store's projects (:meth:`fkpd.store.Store.list_projects`).
        requested: the ``?project=`` value (or None / blank: none asked for).
        default: the app's default project (:attr:`StudioConfig.project`).

    Returns:
        ``(project, problem)``: the requested project and ``""``, or the default (the
        first project when the default is gone) and a sentence saying the requested one
        does not exist.

    Raises:
        StudioError: the store holds no project at all.
    """
    if not projects:
        raise StudioError("the store holds no project; start the app with FKPD_TASK, or run fkpd projects create")
    by_name = {p.name: p for p in projects}
    fallback = by_name.get(default, projects[0])
    if requested is None or not str(requested).strip():
        return fallback, ""
    wanted = str(requested).strip()
    if wanted in by_name:
        return by_name[wanted], ""
    shown = wanted if len(wanted) <= 60 else wanted[:57] + "..."
    return fallback, (f"There is no project {shown!r} (the link may be mistyped or the project not created yet); "
                      f"showing {fallback.name!r}. Pick a project in the sidebar.")


def project_for_token(store: Store, projects: list[ProjectInfo] | tuple[ProjectInfo, ...],
                      token: str | None) -> ProjectInfo | None:
    """The project among ``projects`` whose valid invite ``token`` is (one query per
    project tried), or None. For invite links made before links carried the project
    (``?token=`` alone)."""
    from fkpd.store import InvalidTokenError, NotFoundError

    if not token:
        return None
    for project in projects:
        try:
            store.annotator_for_token(project.id, token)
        except (InvalidTokenError, NotFoundError):
            continue
        return project
    return None


__all__ = ["BOOTSTRAP_FIELDS", "DATASET_KINDS", "bootstrap_settings", "check_auto_rounds", "create_project",
           "dataset_param", "project_for_token", "project_summary", "resolve_project", "task_choices"]
