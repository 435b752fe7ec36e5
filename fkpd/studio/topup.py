"""The ``top_up`` job: more pairs from the served policy, so annotators never wait.

After the bootstrap an annotator should always have a pair on screen: while people label
the current batch, while a round trains, evaluates and renders its batch. A batch alone
runs dry (20 pairs at the defaults, then minutes of training), so the worker renders
*top-up* pairs whenever the open pairs run low:

* **Target**: at least ``max(10, 2 × active annotators)`` open (unanswered, not retired)
  pairs of the served version's round and later ones (:func:`top_up_target`); an
  annotator is active while they hold a lease or answered in the last 5 minutes
  (:meth:`fkpd.store.Store.pair_supply`). Two per annotator because each one holds the
  pair on screen and the prefetched next one.
* **What is rendered**: pairs of the served version ``v``, for round ``r + 1``, the round
  its own batch is for, in one of two ways:

  1. **Extension clips first** (:mod:`fkpd.prefs.extension`). A pair is two rollouts of
     one version from one reset seed (DESIGN.md §3), and a reset seed may have more than
     two clips: one more clip from a start state that has ``g`` clips in the round's pairs
     (a new sampling-noise seed, the same segment start and length L) makes ``g`` new
     pairs, one with each of them. A fresh pair costs two rendered clips for one pair; an
     extension clip costs one for ``g >= 2``. Rendering is what limits the supply on a CPU
     (issue #13: two annotators use 1.33 clips/s as fresh pairs while a round trains and
     renders about 0.6), so the top-up extends the round's groups
     (:meth:`fkpd.store.Store.seed_groups`) whenever one has room: smallest groups first
     (every start state gets a 3rd clip before any gets a 4th), at most
     :data:`fkpd.prefs.extension.MAX_CLIPS_PER_SEED` (K = 4) clips, so 6 pairs, per start
     state. Each clip is rolled out with the served policy, rendered in the render
     processes, written atomically and, after the fence, registered with its new pairs
     as soon as its video is written (:class:`fkpd.studio.progressive.ExtensionBatch`);
     the new clip is left in about half of its pairs. Dataset pairs are never extended;
     gold pairs are marked among the new pairs as in a batch.
  2. **Fresh pairs** when no group has room (or with the parameter ``{"extend": false}``):
     current-policy pairs through the round engine's pair source
     (:func:`fkpd.studio.batches.round_engine`, :func:`render_batch`) with the batch
     settings recorded with version 0. Their reset seeds continue the round's pair index
     (``first`` = the pairs the round has already, extension pairs included; the seed
     rule in :mod:`fkpd.prefs.pairs`), so they never repeat a reset seed of the round.
     Fresh top-ups are rollouts only, also in projects whose batches mix in dataset
     pairs. They are chosen by the project's query selection (:func:`batch_settings`:
     the rule and candidate factor of the latest round started on the Rounds page, else
     version 0's), like the batches (:mod:`fkpd.train.acquisition`); query selection
     applies to fresh pairs only, extension clips are not chosen among candidates.

  So a round's pairs go: its batch, extension clips until every start state has K
  clips, fresh pairs, their extension, and so on.
* **How many**: fresh pairs: the shortfall, rounded up to whole lock-step rollout
  batches (``n_envs / 2`` pairs), at most a batch size per job; extension clips: until
  their new pairs reach that number or a batch size (``pairs_per_batch``), whichever is
  larger (they are cheap, and fewer, larger jobs pay the job's start, loading the policy
  and starting the render processes, less often), or the groups are full. One job does
  not mix extension clips and fresh pairs; the next check queues more.
* **When**: once the round's own batch has pairs. The bootstrap or the round that
  registered ``v`` renders that batch, pair by pair; while it does, only extension clips
  of its registered pairs top it up (they reuse those pairs' reset seeds, so they never
  collide with the batch's; the two workers render side by side), and fresh top-ups wait
  until that job has ended, so they never stand in for a batch or take its pair indices.
  An annotator sees "nothing to label" only during the bootstrap.
* **Trainable like any other**: top-up pairs are ordinary pairs of round ``r + 1``;
  :meth:`fkpd.store.Store.next_pair` hands them out (the latest round with open pairs)
  and every later round trains on their answers (:meth:`fkpd.store.Store.training_pairs`).

Who renders: a worker runs one job at a time, so a top-up cannot run while the same
worker trains. The app starts two local workers (:func:`fkpd.studio.start_local_workers`):
one for bootstraps, rounds and comparisons, one restricted to ``top_up``
(``fkpd worker --kinds top_up``), which renders while the first trains;
rendering takes one core, training the other. A single ``fkpd worker`` runs every kind and tops up between jobs.
Who queues: idle workers (:mod:`fkpd.studio.upkeep`), at most one ``top_up`` job queued
or running per project (:meth:`fkpd.store.JobQueue.enqueue_unless`); after a failed
top-up they wait :data:`RETRY_AFTER_S` before queueing another.

Crash safety is the batches' (:mod:`fkpd.studio.batches`): a pair is registered (its
clips, then the pair) once both its files are complete under their final names; a top-up
stopped half-way keeps the pairs it registered, and the next one continues the round's
pair index after them. An extension clip is registered (one transaction), then its
pairs (one :meth:`~fkpd.store.Store.add_pairs` call, another), once its files are
complete: a crash in between leaves at most one clip row with no pair (harmless, as in a
batch; it belongs to no group). A retried job
recomputes the groups from the store, so clips whose pairs were registered are not
rendered again, and a clip that was not gets the same noise seed (the plan is
deterministic).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

from fkpd.config import json_safe
from fkpd.envs import get_task
from fkpd.prefs.extension import ExtensionClip, plan_extension, rollout_extension
from fkpd.prefs.pairs import close_envs
from fkpd.store import JobContext, JobView, PolicyVersionInfo, ProjectInfo, Store, register_handler
from fkpd.studio.batches import (
    INLINE_RENDER_FRAMES,
    Stage,
    apply_threads,
    checkpoint_dir,
    make_envs,
    render_batch,
    round_engine,
    served_versions,
)
from fkpd.studio.config import ACTIVE, TOP_UP
from fkpd.studio.errors import ParamError
from fkpd.studio.labelling import mark_gold
from fkpd.studio.params import BatchSettings, check_finite
from fkpd.studio.progressive import ExtensionBatch

log = logging.getLogger(__name__)

#: Open pairs kept ahead with no annotator active (and the floor with few).
MIN_OPEN_PAIRS = 10
#: An annotator is active while holding a lease or for this long after an answer.
ACTIVE_WITHIN_S = 300.0
#: After a failed top-up, idle workers wait this long before queueing another.
RETRY_AFTER_S = 120.0


def top_up_target(active_annotators: int) -> int:
    """Open pairs to keep ahead: ``max(10, 2 × active annotators)``."""
    return max(MIN_OPEN_PAIRS, 2 * int(active_annotators))


@dataclass(frozen=True)
class TopUpState:
    """The pair supply of a project's served version.

    Attributes:
        version: the served version ``v`` (pairs come from it).
        round: ``v.round + 1``, the round its pairs are labelled for.
        open_pairs: open pairs of that round and later ones.
        round_pairs: pairs the round has, whatever their status (the next pair index).
        active_annotators: annotators active now.
        target: :func:`top_up_target` of them.
        rendering: the job that registered ``version`` is still queued or running, so it
            is still adding the round's own batch, pair by pair.
    """

    version: PolicyVersionInfo
    round: int
    open_pairs: int
    round_pairs: int
    active_annotators: int
    target: int
    rendering: bool = False

    @property
    def batch_ready(self) -> bool:
        """The round's own batch is registered (fresh top-ups only follow it): the round has
        pairs and the job that renders them has ended."""
        return self.round_pairs > 0 and not self.rendering

    @property
    def extension_only(self) -> bool:
        """The round's batch is being registered, pair by pair, and has pairs already: only
        extension clips may top it up now (they reuse reset seeds of registered pairs, so
        they never collide with the batch's; fresh pairs would take its pair indices)."""
        return self.round_pairs > 0 and self.rendering

    @property
    def shortfall(self) -> int:
        return max(0, self.target - self.open_pairs)


def top_up_state(store: Store, project: ProjectInfo) -> TopUpState | None:
    """The served version's pair supply, or None before the bootstrap registered version 0.

    Raises:
        NotFoundError: unknown project.
    """
    versions = served_versions(store, project)
    if not versions:
        return None
    version = versions[-1]
    supply = store.pair_supply(project.id, min_round=version.round + 1, active_within_s=ACTIVE_WITHIN_S)
    job_id = version.metrics.get("job_id")
    rendering = isinstance(job_id, int) and store.jobs.get(job_id).status in ACTIVE
    return TopUpState(version, version.round + 1, supply.open_pairs, supply.round_pairs, supply.active_annotators,
                      top_up_target(supply.active_annotators), rendering)


def _recently_failed(store: Store, project: ProjectInfo) -> bool:
    last = next((j for j in store.jobs.list(project.id, limit=50) if j.kind == TOP_UP), None)
    if last is None or last.status != "failed" or last.finished_at is None:
        return False
    return store.now() - last.finished_at < timedelta(seconds=RETRY_AFTER_S)


def maybe_top_up(store: Store, project: ProjectInfo) -> JobView | None:
    """Queue a ``top_up`` job when the served version's open pairs are below the target
    and its batch exists (while the batch is still being registered: only when one of
    its registered start states can take an extension clip), unless one is queued or
    running (or one failed within :data:`RETRY_AFTER_S`).

    Returns:
        The queued job, or None.

    Raises:
        NotFoundError: unknown project.
    """
    state = top_up_state(store, project)
    if state is None or state.round_pairs == 0 or state.shortfall == 0 or _recently_failed(store, project):
        return None
    if state.extension_only and not plan_extension(store.seed_groups(project.id, state.round, state.version.id), 1):
        return None  # the batch is still rendering and its registered start states are full
    job = store.jobs.enqueue_unless(project.id, TOP_UP, {}, statuses=ACTIVE)
    if job is not None:
        log.info("project %s: %d open pairs of round %d, target %d (%d active annotators): queued top-up job %s",
                 project.name, state.open_pairs, state.round, state.target, state.active_annotators, job.id)
    return job


#: The batch settings a project's rounds may change for its later batches and top-ups.
SELECTION_FIELDS = ("query_selection", "candidate_factor")


def batch_settings(store: Store, project: ProjectInfo, reference: PolicyVersionInfo | None = None
                   ) -> tuple[BatchSettings, float | None]:
    """The project's batch settings now: version 0's recorded ones (``reference``; the
    defaults before the bootstrap) with the :data:`SELECTION_FIELDS` of the round
    parameters it remembers (:data:`fkpd.studio.history.ROUND_PARAMS`: the latest round
    started on the Rounds page, which automatic rounds use too), and that round's β
    (None when none is remembered). Remembered values this version refuses are ignored.

    Raises:
        NotFoundError: unknown project.
    """
    from fkpd.studio.history import remembered_round_params

    if reference is None:
        reference = next((v for v in served_versions(store, project) if v.round == 0), None)
    names = {f.name for f in dataclasses.fields(BatchSettings)}
    recorded = {k: v for k, v in (((reference.metrics.get("bootstrap") or {}).get("settings") or {})
                                  if reference is not None else {}).items() if k in names}
    remembered = remembered_round_params(store, project)
    chosen = {k: remembered[k] for k in SELECTION_FIELDS if k in remembered}
    try:
        settings = BatchSettings(**{**recorded, **chosen})
    except ParamError:
        log.warning("project %s: ignoring the remembered query selection %s", project.name, chosen)
        settings = BatchSettings(**recorded)
    beta = remembered.get("beta")
    return settings, float(beta) if isinstance(beta, (int, float)) and not isinstance(beta, bool) else None


def top_up_size(shortfall: int, settings: BatchSettings) -> int:
    """Pairs one top-up renders: the shortfall rounded up to whole lock-step rollout
    batches (``n_envs // 2`` pairs), at most ``max(pairs_per_batch, n_envs // 2)``; 0
    without a shortfall."""
    if shortfall <= 0:
        return 0
    per = max(1, settings.n_envs // 2)
    return min(per * math.ceil(shortfall / per), max(settings.pairs_per_batch, per))


def parse_params(params: dict[str, Any]) -> int | None:
    """The ``top_up`` job's parameters: ``{}`` (render the shortfall), ``{"pairs": n}``
    (render at least ``n`` pairs, 1..1000; exactly ``n`` fresh ones), and optionally
    ``"extend": false`` (fresh pairs only, no extension clips).

    Returns:
        ``pairs``, or None.

    Raises:
        ParamError: an unknown key, ``pairs`` that is not an int in 1..1000, or
            ``extend`` that is not a bool.
    """
    params = check_finite(params, TOP_UP)
    unknown = sorted(set(params) - {"pairs", "extend"})
    if unknown:
        raise ParamError(f"unknown top_up parameter(s) {unknown}; known: ['extend', 'pairs']")
    pairs = params.get("pairs")
    if pairs is not None and (isinstance(pairs, bool) or not isinstance(pairs, int) or not 1 <= pairs <= 1000):
        raise ParamError(f"top_up parameter 'pairs' must be an integer between 1 and 1000, got {pairs!r}")
    if not isinstance(params.get("extend", True), bool):
        raise ParamError(f"top_up parameter 'extend' must be true or false, got {params['extend']!r}")
    return pairs


def render_extension(ctx: JobContext, project: ProjectInfo, version: PolicyVersionInfo, round_: int,
                     settings: BatchSettings, plan: Sequence[ExtensionClip],
                     progress: Callable[[float, str], None] | None = None) -> list[int]:
    """Roll out, render, write and register the extension clips of ``plan`` with
    ``version`` (the served policy), each with its new pairs of ``round_``
    (:class:`fkpd.studio.progressive.ExtensionBatch`), then mark gold pairs among them.

    Clips are rolled out ``n_envs`` at a time recording physics states and rendered in
    worker processes (in the registration thread when the whole plan is at most
    :data:`fkpd.studio.batches.INLINE_RENDER_FRAMES` frames), into a new folder
    ``projects/<id>/batches/round<r>-v<version>-x<token>/``.

    Returns:
        The new pair ids, in plan order.

    Raises:
        ArtifactIntegrityError / CheckpointError: the version's checkpoint is missing,
            changed or corrupt.
        JobLostError / JobCancelled / WorkerStopping: stopped between two clips; the
            clips and pairs registered so far stay.
    """
    from fkpd.policy import DiffusionPolicy

    store, task = ctx.store, project.task_id
    policy = DiffusionPolicy.load(checkpoint_dir(store, version), task_id=task)
    frames = sum(c.length + 1 for c in plan)
    folder = f"projects/{project.id}/batches/round{round_:03d}-v{version.id}-x{uuid.uuid4().hex[:8]}"
    sink = ExtensionBatch(store, project, version, round_, folder, plan, get_task(task).fps, job_id=ctx.job_id,
                          fence=ctx.ensure_current, progress=progress, render_size=settings.render_size,
                          render_workers=0 if frames <= INLINE_RENDER_FRAMES else None, warm=True)
    envs = make_envs(task, settings, len(plan))
    try:
        rollout_extension(policy, envs, plan, render=True, task_id=task, on_clip=sink, progress=sink.settle_first,
                          record="states")
        pair_ids = sink.finish()
    finally:
        sink.close()
        close_envs(envs)
    mark_gold(store, project, pair_ids)
    return pair_ids


@register_handler(TOP_UP)
def top_up(ctx: JobContext) -> dict[str, Any]:
    """Job handler: render top-up pairs from the served version (see the module docstring).

    Parameters: ``{}``, ``{"pairs": n}``, ``{"extend": false}`` (:func:`parse_params`).

    Returns:
        JSON result: ``policy_version_id``, ``round``, ``first_pair`` (the index of the
        first new pair in its round), ``pair_ids`` (the pairs added; empty when nothing
        was needed), ``extension_pairs`` and ``fresh_pairs`` (how many of them came from
        extension clips and from fresh pairs), ``extension_clips`` (clips rendered to
        extend groups) and ``reason`` (why nothing was rendered, or "").

    Raises:
        ParamError: bad parameters.
        RoundError: the version's checkpoint has no round-0 reference.
        ArtifactIntegrityError / CheckpointError: the served checkpoint is missing,
            changed or corrupt.
        JobCancelled / WorkerStopping: stopped between two clips; the pairs registered
            so far stay.
    """
    from fkpd.studio.errors import RoundError

    store = ctx.store
    wanted = parse_params(ctx.params)
    project = store.get_project(ctx.job.project_id)
    state = top_up_state(store, project)
    if state is None or state.round_pairs == 0:
        reason = ("no policy version yet (the bootstrap renders the first batch)" if state is None else
                  f"round {state.round} has no batch yet (the job that registered version {state.version.id} "
                  "renders it)")
        return {"policy_version_id": None if state is None else state.version.id, "round": None, "first_pair": None,
                "pair_ids": [], "extension_pairs": 0, "fresh_pairs": 0, "extension_clips": 0, "reason": reason}
    reference = next((v for v in served_versions(store, project) if v.round == 0), None)
    if reference is None:
        raise RoundError(f"project {project.name!r} has no round-0 policy version; run a bootstrap job first")
    settings, beta = batch_settings(store, project, reference)
    n = wanted or top_up_size(state.shortfall, settings)
    base = {"policy_version_id": state.version.id, "round": state.round, "first_pair": state.round_pairs,
            "extension_pairs": 0, "fresh_pairs": 0, "extension_clips": 0}
    if n == 0:
        return {**base, "pair_ids": [], "reason": f"{state.open_pairs} open pairs, target {state.target}"}
    stage = Stage(ctx, 0.0, 1.0)

    def progress(fraction: float, message: str) -> None:
        stage(fraction, f"top-up for round {state.round}: {message.replace('rendering batch: ', '')}")
        ctx.check_cancelled()

    # Extension clips are cheap (g >= 2 pairs each): without an explicit number a job
    # renders at least a batch's worth of pairs, so its start (loading the policy,
    # starting the render processes) is paid for fewer, larger jobs.
    plan = (plan_extension(store.seed_groups(project.id, state.round, state.version.id),
                           n if wanted else max(n, settings.pairs_per_batch))
            if ctx.params.get("extend", True) else [])
    if not plan and state.extension_only:
        return {**base, "pair_ids": [], "reason": f"round {state.round}'s batch is still being rendered and its "
                                                  "registered start states are full; fresh pairs wait for it"}
    if plan:
        apply_threads(settings.threads)
        pair_ids = render_extension(ctx, project, state.version, state.round, settings, plan, progress)
        log.info("job %s added %d top-up pairs to round %d from %d extension clips of version %s of project %s",
                 ctx.job_id, len(pair_ids), state.round, len(plan), state.version.id, project.name)
        return json_safe({**base, "pair_ids": pair_ids, "extension_pairs": len(pair_ids),
                          "extension_clips": len(plan), "reason": ""})
    overrides: dict[str, Any] = {"pairs_per_batch": n}
    if "dataset_share" in {f.name for f in dataclasses.fields(BatchSettings)}:
        overrides["dataset_share"] = 0.0  # top-ups are fresh rollouts of the served version
    settings = dataclasses.replace(settings, **overrides)
    apply_threads(settings.threads)
    engine = round_engine(store, project, settings, reference, ctx.job_id, first_pair=state.round_pairs, beta=beta)
    pair_ids = render_batch(engine, state.version, state.round, progress=progress)
    log.info("job %s added %d fresh top-up pairs (round %d, pairs %d..%d) from version %s of project %s", ctx.job_id,
             len(pair_ids), state.round, state.round_pairs, state.round_pairs + len(pair_ids) - 1, state.version.id,
             project.name)
    return json_safe({**base, "pair_ids": pair_ids, "fresh_pairs": len(pair_ids), "reason": ""})


__all__ = ["ACTIVE_WITHIN_S", "MIN_OPEN_PAIRS", "RETRY_AFTER_S", "SELECTION_FIELDS", "TopUpState", "batch_settings",
           "maybe_top_up", "parse_params", "render_extension", "top_up", "top_up_size", "top_up_state", "top_up_target"]
