"""The ``alignment_round`` job: one round of the round engine, with people as labellers.

Run by a worker (``fkpd worker``); the Rounds page only enqueues it
(:func:`fkpd.studio.enqueue_round`). The round itself is :class:`fkpd.train.engine.RoundEngine`'s, the
same code ``fkpd loop`` runs; :mod:`fkpd.studio.batches` wires it to the store.

**alignment_round** (DESIGN.md §1, steps 3-4), for the served version π_{r−1}, as round r,
one past the highest round of the project (:func:`next_round`):

1. read every non-skip comparison of the project (:meth:`Store.training_pairs`), load
   its segments (sha256-checked) and convert the labels to winner-first pairs
   (:func:`fkpd.train.align.pairs_from_labels`);
2. :func:`fkpd.train.align.align` with reference = the round-0 BC version and init = π_{r−1},
   into a directory of its own, ``projects/<id>/rounds/round<r>-job<j>-a<k>-<token>/``;
3. a short evaluation of the new checkpoint;
4. only then register policy version r (parent π_{r−1}, metrics: implicit accuracy,
   success rate, labels used, ...);
5. render the next batch from version r and register its clips, then its pairs, for
   round r+1.

After a roll-back (:func:`fkpd.studio.batches.roll_back`) the served version is older
than the project's last round, so r is not the parent's round + 1: it counts on from the
rolled-back version's, whose batch (round r) already exists. Otherwise the new version
would repeat that round number and find "its" next batch already rendered by the
rolled-back version, and annotators would never see the new policy's clips.

Why this order is crash-safe, and how long work reports progress and stops: see
:mod:`fkpd.studio.batches`.

Shapes follow DESIGN.md §3: L segment length, Do/Da observation/action dims.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import Any

from fkpd.config import json_safe
from fkpd.store import JobContext, PolicyVersionInfo, ProjectInfo, Store, register_handler
from fkpd.studio.batches import (Stage, Watch, apply_threads, checkpoint_dir, ensure_sole_training_job, every_core,
                                 render_if_missing, round_engine, served_versions, training_threads)
from fkpd.studio.errors import RoundError
from fkpd.studio.params import ALIGNMENT_ROUND, RoundParams
from fkpd.train.engine import NoLabelsError, RoundEngine, RoundResult
from fkpd.train.evaluate import describe_comparison

log = logging.getLogger(__name__)


@register_handler(ALIGNMENT_ROUND)
def alignment_round(ctx: JobContext) -> dict[str, Any]:
    """Job handler: align on all comparisons → evaluate → register version r → next batch.

    See the module docstring for the order of operations and why it is crash-safe.
    Parameters: :class:`RoundParams` (flat): AlignConfig fields (``regularizer``,
    ``beta``, ``lam``, ``steps``, ...) and BatchSettings overrides (``pairs_per_batch``,
    ``eval_episodes``, ...).

    Returns:
        JSON result: ``policy_version_id``, ``round``, ``parent_id``, ``reference_id``,
        ``labels_used``, ``implicit_acc`` (0..1, None with only ties),
        ``success_rate`` (0..1), ``mean_return``, ``next_round`` and ``pair_ids`` (the
        pairs this run added).

    Raises:
        RoundError: bad parameters, no policy version yet (run bootstrap first), no
            comparisons to train on, another training job running, or the served version
            changed (a version registered or rolled back to) while this round trained.
        TrainingError: a NaN/inf loss; nothing is registered and the previous
            checkpoint is untouched.
        FKPDError: other alignment, checkpoint or artifact errors.
    """
    store = ctx.store
    params = RoundParams.from_params(ctx.params)
    project = store.get_project(ctx.job.project_id)
    ensure_sole_training_job(ctx)
    versions = served_versions(store, project)
    reference = next((v for v in versions if v.round == 0), None)
    if reference is None:
        raise RoundError(f"project {project.name!r} has no round-0 policy version with a checkpoint; run a "
                         "bootstrap job first")
    settings = params.settings((reference.metrics.get("bootstrap") or {}).get("settings"))
    apply_threads(settings.threads)
    align_cfg = params.align_config(settings)
    # aligning and evaluating on every core unless the batch settings say otherwise (every_core)
    align_cfg = dataclasses.replace(align_cfg, threads=training_threads(align_cfg.threads))
    engine = round_engine(store, project, settings, reference, ctx.job_id, align_cfg)
    mine = [v for v in versions if v.metrics.get("job_id") == ctx.job_id and v.metrics.get("kind") == ALIGNMENT_ROUND]
    if mine:  # an earlier attempt of this job registered the version, then died before its batch
        version = mine[-1]
        ctx.progress(0.85, f"version {version.id} was registered by an earlier attempt; rendering its batch")
    else:
        version = _train_and_register(ctx, engine, project, reference, previous=versions[-1])
    pair_ids = render_if_missing(ctx, engine, project, version, 0.85)
    m = version.metrics
    return json_safe({
        "policy_version_id": version.id, "round": version.round, "parent_id": version.parent_id,
        "reference_id": m.get("reference_id"), "labels_used": m.get("labels_used"),
        "implicit_acc": m.get("implicit_acc"), "success_rate": m.get("success_rate"),
        "mean_return": m.get("mean_return"), "vs_parent": m.get("vs_parent"), "next_round": version.round + 1,
        "pair_ids": pair_ids})


def next_round(store: Store, project: ProjectInfo) -> int:
    """The round number of the project's next version: 1 + the highest round of any of
    its versions, rolled back ones included (so round numbers, and the batches they
    name, are never reused after a roll-back).

    Raises:
        NotFoundError: unknown project.
    """
    return 1 + max((v.round for v in store.list_policy_versions(project.id)), default=0)


def _train_and_register(ctx: JobContext, engine: RoundEngine, project: ProjectInfo, reference: PolicyVersionInfo,
                        previous: PolicyVersionInfo) -> PolicyVersionInfo:
    """Steps 1-4 of a round (see the module docstring), through
    :meth:`fkpd.train.engine.RoundEngine.run_round`; returns the registered version."""
    store = ctx.store
    round_ = next_round(store, project)
    ctx.progress(0.0, "loading comparisons")
    init_dir = checkpoint_dir(store, previous)
    out_rel = (f"projects/{project.id}/rounds/round{round_:03d}-job{ctx.job_id}-a{ctx.job.attempts}-"
               f"{uuid.uuid4().hex[:8]}")
    out = store.artifacts.workdir(out_rel)  # a remote store's staging folder, uploaded before registering
    steps = engine.align_cfg.steps
    stage = Stage(ctx, 0.05, 0.75)

    def started(n_pairs: int, n_labels: int) -> None:
        stage(0.0, f"aligning: step 0/{steps} ({n_pairs} pairs from {n_labels} comparisons)")

    def register(result: RoundResult) -> PolicyVersionInfo:
        ctx.check_cancelled()
        latest = served_versions(store, project)[-1]
        if latest.id != previous.id:
            raise RoundError(f"the served policy changed to version {latest.id} (registered or rolled back to) "
                             f"while this round trained from version {previous.id}; this round's checkpoint {out} "
                             "is left unregistered. Enqueue a new round.")
        cfg, a = result.config, result.alignment
        ckpt_rel = f"{out_rel}/{result.checkpoint.resolve().relative_to(out.resolve()).as_posix()}"
        hashes = store.artifacts.publish_dir(result.checkpoint, ckpt_rel)
        checkpoint = f"{ckpt_rel}/model.safetensors"
        return store.add_policy_version(project.id, checkpoint, checkpoint_sha256=hashes[checkpoint],
                                        parent_id=previous.id, round=round_,
                                        metrics=json_safe({
            "kind": ALIGNMENT_ROUND, "job_id": ctx.job_id, "reference_id": reference.id,
            "objective": cfg.objective, "regularizer": cfg.regularizer, "beta": cfg.beta, "lam": cfg.lam,
            "c_bc": cfg.c_bc, "steps": cfg.steps,
            "labels_used": result.labels_used, "trained_pairs": result.trained_pairs,
            "implicit_acc": a.after.get("implicit_acc"), "implicit_acc_before": a.before.get("implicit_acc"),
            "reward_margin": a.after.get("reward_margin"), "dpo_loss": a.after.get("dpo"),
            "train": a.metrics, **result.evaluation, "align_s": result.align_s, "eval_s": result.eval_s,
            "steps_per_s": a.steps_per_s, "vs_parent": result.comparison}))

    try:
        with every_core(engine.align_cfg.threads):  # the batch's rollouts after it take the worker's count
            result = engine.run_round(round_, init_dir, out, register=register, on_start=started,
                                      on_step=Watch(ctx, stage, "aligning"), eval_progress=Stage(ctx, 0.75, 0.85),
                                      parent_evaluation=previous.metrics)
    except NoLabelsError:
        answered, total = store.batch_progress(project.id)
        raise RoundError(
            f"no comparisons to train on in project {project.name!r}: no pair was answered left, right or equal "
            f"yet (skips are never trained on; latest batch: {answered}/{total} answers). Label some pairs, "
            f"then enqueue the round again. Version {previous.id} stays the served policy.") from None
    version = result.registered
    log.info("job %s registered policy version %s (round %s) of project %s: %s", ctx.job_id, version.id, round_,
             project.name, describe_comparison(result.comparison, f"version {previous.id}"))
    return version
