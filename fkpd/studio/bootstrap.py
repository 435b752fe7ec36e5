"""The ``bootstrap`` job: offline data → behaviour cloning → version 0 → first batch.

Run by a worker (``fkpd worker``); the app only enqueues it (:func:`fkpd.studio.open_project`).

**bootstrap** (DESIGN.md §1, step 1, then the first batch of step 2):

1. the offline dataset: generated into ``projects/<id>/bootstrap-<key>/dataset.hdf5``
   (skipped when a complete file is there) for MetaWorld and maze2d tasks; or, read where
   it is, the dataset named by the ``dataset`` parameter (a file, a D4RL dataset name or
   ``minari:ID``), which D4RL locomotion tasks default to their own D4RL dataset
   (:meth:`BootstrapParams.dataset_source`, :func:`resolve_bootstrap_dataset`);
2. behaviour cloning into ``.../bc/`` with ``resume=True`` (a finished run is reused, an
   interrupted one resumes from its last saved training state);
3. a short evaluation of the BC checkpoint;
4. register policy version 0 (round 0, no parent);
5. render the first labelling batch from version 0 and register its clips, then its
   pairs, for round 1.

``<key>`` is a hash of everything that changes the data or the trained weights (task,
episodes, horizon, seed, BC and policy settings; or the named dataset instead of the
generation settings), so a re-run with the same parameters reuses the finished dataset
and checkpoint, and one with other parameters never mixes with them.

Why this order is crash-safe, and how long work reports progress and stops: see
:mod:`fkpd.studio.batches`.

Shapes follow DESIGN.md §3: L segment length, Do/Da observation/action dims.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from fkpd.config import json_safe, to_json_dict
from fkpd.data import generate_dataset, load_dataset
from fkpd.errors import DatasetError
from fkpd.policy import DiffusionPolicy, read_checkpoint_meta
from fkpd.store import JobContext, register_handler, sha256_file
from fkpd.studio.batches import (Stage, Watch, apply_threads, dataset_pairs, ensure_sole_training_job, evaluator,
                                 every_core, render_if_missing, round_engine, served_versions)
from fkpd.studio.errors import RoundError
from fkpd.studio.params import BOOTSTRAP, BootstrapParams
from fkpd.train.bc import train_bc

log = logging.getLogger(__name__)


def _saved_bc_step(out: Path) -> int | None:
    """The step of BC's saved training state in ``out`` (None when there is none)."""
    try:
        return int(json.loads((out / "train_state" / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_bootstrap_dataset(source: str, task: str, named: bool = True) -> str:
    """What :func:`fkpd.data.load_dataset`, BC and alignment read for a bootstrap's
    named dataset (:meth:`BootstrapParams.dataset_source`), checked to be there.

    Looked up in this order, as :func:`fkpd.data.load_dataset` does: ``minari:ID``; an
    existing file (a relative path from the worker's working directory); a D4RL dataset
    name, in D4RL's cache directory (:func:`fkpd.envs.d4rl.dataset_file`).

    Args:
        source: the dataset as named (not empty).
        task: the project's task, for messages.
        named: True when ``source`` is the ``dataset`` parameter, False when it is a
            locomotion task's own D4RL dataset (for messages).

    Returns:
        An existing file's absolute path; a D4RL dataset name whose file is in D4RL's
        cache directory (kept as a name, so that later rounds look it up the same way);
        or ``minari:DATASET_ID`` unchanged (:func:`fkpd.data.minari.open_minari` says
        where it looked when it is missing).

    Raises:
        RoundError: no such file and not a D4RL dataset name or ``minari:`` id, or a
            D4RL dataset that is not in D4RL's cache directory; the message gives the
            path looked for and what to do (nothing is downloaded).
    """
    if source.startswith("minari:"):
        return source
    path = Path(source).expanduser()
    if path.exists():
        return str(path.resolve())
    from fkpd.data.d4rl import dataset_file
    from fkpd.envs.d4rl import dataset_urls, is_d4rl_name

    if named:
        what, fix = "named by bootstrap parameter 'dataset'", "or change 'dataset' in FKPD_BOOTSTRAP"
    else:
        what = f"task {task}'s own D4RL dataset; D4RL locomotion data is not generated"
        fix = "or name another dataset in FKPD_BOOTSTRAP, e.g. '{\"dataset\": \"/data/hopper_medium-v2.hdf5\"}'"
    if is_d4rl_name(source):
        file = dataset_file(source)
        if file.is_file():
            return source
        folder = ("$D4RL_DATASET_DIR" if os.environ.get("D4RL_DATASET_DIR")
                  else "~/.d4rl/datasets, since $D4RL_DATASET_DIR is not set")
        raise RoundError(
            f"bootstrap dataset {source!r} ({what}) is not in D4RL's cache directory on the worker's machine: "
            f"looked for {str(file)!r} (the directory is {folder}). FKPD Studio never downloads: fetch "
            f"{dataset_urls()[source]} into that directory or set $D4RL_DATASET_DIR for the worker, {fix}.")
    raise RoundError(
        f"bootstrap dataset {source!r} ({what}) was not found: there is no file {str(path.absolute())!r} (a "
        f"relative path is read from the worker's working directory, {os.getcwd()}), and it is neither a D4RL "
        f"dataset name (e.g. hopper-medium-v2, maze2d-umaze-v1) nor minari:DATASET_ID. Put the file there, {fix}.")


def _bootstrap_dataset(ctx: JobContext, store, root: str, task: str, params: BootstrapParams,
                       outcome: dict[str, Any]) -> tuple[Path, str]:
    """The bootstrap's generated dataset ``<root>/dataset.hdf5``: reused when a readable
    one is there (in a remote store: downloaded into the local cache), else generated
    (into the artifact directory, or a remote store's staging folder, then uploaded).

    Returns:
        ``(local path, sha256)``.
    """
    rel = f"{root}/dataset.hdf5"
    artifacts = store.artifacts
    dataset = artifacts.workdir(root) / "dataset.hdf5"
    if not artifacts.is_local and not dataset.is_file() and artifacts.exists(rel):
        cached = artifacts.local_file(rel)  # written by an earlier attempt on another machine
        try:
            load_dataset(cached, task_id=task)
            return cached, sha256_file(cached)
        except DatasetError:
            pass
    try:
        load_dataset(dataset, task_id=task)
    except DatasetError:  # missing (a crash leaves only a .part file) or unreadable
        outcome["dataset"] = "generated"
        settings = params.batch
        ctx.progress(0.0, f"generating dataset: {params.dataset_episodes} episodes")
        generate_dataset(task, params.dataset_episodes, dataset, seed=settings.seed,
                         max_episode_steps=settings.horizon(task), progress=False,
                         on_episode=Watch(ctx, Stage(ctx, 0.0, 0.1), "generating dataset", "episode"))
    return dataset, artifacts.publish_file(dataset, rel)[1]


@register_handler(BOOTSTRAP)
def bootstrap(ctx: JobContext) -> dict[str, Any]:
    """Job handler: offline data → BC → version 0 → first labelling batch (round 1).

    See the module docstring for the order of operations and why it is crash-safe.
    Parameters: :class:`BootstrapParams` (flat). Idempotent: a finished dataset or BC
    run is reused, an interrupted BC run resumes from its last saved state, a version 0
    made with the same parameters is reused, and the batch is rendered only if round 1
    has no pairs.

    Policy versions without a checkpoint (labels imported with
    :func:`fkpd.prefs.importers.import_pt_labels`) are not policies and are ignored here.

    Returns:
        JSON result: ``policy_version_id``, ``round`` (0), ``success_rate`` (0..1),
        ``mean_return`` (and ``d4rl_normalized_score`` on ``d4rl/`` tasks), ``dataset``
        (``generated``/``reused``, or ``named`` for a dataset read where it is), ``bc``
        (``trained``/``resumed``/``reused``), ``next_round`` (1) and ``pair_ids`` (the
        pairs this run added; empty when the batch existed).

    Raises:
        RoundError: bad parameters, a named dataset that is missing (the message says
            where it was looked for) or does not fit the task, or cannot give dataset pairs
            with ``dataset_share > 0`` (checked before BC trains), a task other than the
            project's, another training job running for the project, or a project
            already bootstrapped with other parameters or already aligned.
        FKPDError: from data generation, BC (TrainingError on a NaN loss) or
            checkpoint loading.
    """
    store = ctx.store
    params = BootstrapParams.from_params(ctx.params)
    project = store.get_project(ctx.job.project_id)
    task = params.task or project.task_id
    if task != project.task_id:
        raise RoundError(f"bootstrap task {task!r} differs from project {project.name!r}'s task "
                         f"{project.task_id!r}; leave 'task' out or create a project for {task}")
    settings = params.batch
    apply_threads(settings.threads)
    ensure_sole_training_job(ctx)
    key = params.key(task)
    versions = served_versions(store, project)
    outcome = {"dataset": "reused", "bc": "reused"}
    if versions:
        version = versions[0]
        recorded = (version.metrics.get("bootstrap") or {}).get("key")
        if recorded != key:
            raise RoundError(
                f"project {project.name!r} already has policy version {version.id} (round {version.round}) "
                f"from other bootstrap parameters (key {recorded!r}; these give {key!r}); a project is "
                "bootstrapped once. Create a new project to start from other settings.")
        if len(versions) > 1:
            raise RoundError(f"project {project.name!r} is already bootstrapped and has {len(versions) - 1} "
                             "later version(s); enqueue alignment_round jobs instead")
        ctx.progress(0.8, f"version 0 (id {version.id}) exists; reusing it")
        evaluation = {k: version.metrics[k] for k in ("success_rate", "mean_return", "d4rl_normalized_score")
                      if k in version.metrics}
    else:
        root = f"projects/{project.id}/bootstrap-{key}"
        source = params.dataset_source(task)
        recorded_data: dict[str, Any]
        if source:  # a named dataset (or a locomotion task's own), read where it is
            dataset: Path | str = resolve_bootstrap_dataset(source, task, named=bool(params.dataset))
            outcome["dataset"] = "named"
            ctx.progress(0.0, f"reading dataset {source}")
            try:
                ds = load_dataset(dataset, task_id=task)
            except DatasetError as exc:
                raise RoundError(f"bootstrap dataset {source!r} cannot be used for {task}: {exc}") from exc
            recorded_data = {"dataset_source": str(dataset), "dataset_episodes": ds.num_episodes,
                             "dataset_steps": int(len(ds.actions))}
            del ds
        else:
            dataset, data_sha = _bootstrap_dataset(ctx, store, root, task, params, outcome)
            recorded_data = {"dataset": f"{root}/dataset.hdf5", "dataset_sha256": data_sha,
                             "dataset_episodes": params.dataset_episodes}
        if settings.dataset_share > 0:  # a dataset that cannot give dataset pairs is refused before BC trains on it
            ctx.progress(0.05, "checking that the dataset's episodes replay (dataset_share > 0)")
            checked = dataset_pairs(task, str(dataset), settings, settings.pairs_per_batch, 0, 1)  # RoundError: why
            checked.replay.close()  # its environment; the batch opens its own after BC
        bc_cfg = params.bc_config(task, dataset, store.artifacts.workdir(f"{root}/bc"))
        out = Path(bc_cfg.out_dir)
        saved = _saved_bc_step(out)
        if saved is None:
            outcome["bc"] = "trained"
        elif saved < bc_cfg.steps or not (out / "checkpoint").is_dir():
            outcome["bc"] = "resumed"
        stage = Stage(ctx, 0.1, 0.7)
        stage((saved or 0) / bc_cfg.steps, f"training BC: step {saved or 0}/{bc_cfg.steps}")
        # every core: nothing else runs during a bootstrap (no batch to top up yet, nobody
        # labelling); BC 4000 steps at 34 vs 46-55 steps/s on 2 cores
        with every_core(bc_cfg.threads) as threads:
            ckpt = train_bc(dataclasses.replace(bc_cfg, threads=threads), params.policy_config(), progress=False,
                            on_step=Watch(ctx, stage, "training BC"))
        meta = read_checkpoint_meta(ckpt)
        policy = DiffusionPolicy.load(ckpt, task_id=task)
        evaluation = evaluator(task, settings)(policy, progress=Stage(ctx, 0.7, 0.8))
        ctx.check_cancelled()
        checkpoint = f"{root}/bc/checkpoint/model.safetensors"
        hashes = store.artifacts.publish_dir(ckpt, f"{root}/bc/checkpoint")  # a remote store: uploaded now
        version = store.add_policy_version(
            project.id, checkpoint, checkpoint_sha256=hashes[checkpoint], parent_id=None, round=0,
            metrics=json_safe({
                "kind": BOOTSTRAP, "job_id": ctx.job_id, **evaluation, "train": meta.get("metrics", {}),
                "bc_steps": meta.get("step"),
                "bootstrap": {"key": key, **recorded_data, "settings": to_json_dict(settings)}}))
        log.info("job %s registered policy version %s (round 0) of project %s", ctx.job_id, version.id, project.name)
    engine = round_engine(store, project, settings, version, ctx.job_id)
    pair_ids = render_if_missing(ctx, engine, project, version, 0.8)
    return json_safe({"policy_version_id": version.id, "round": version.round, **evaluation, **outcome,
                       "next_round": version.round + 1, "pair_ids": pair_ids})
