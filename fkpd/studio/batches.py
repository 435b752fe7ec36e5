"""The round engine wired to the preference store: batches for people, their answers as labels.

The worker's jobs (:mod:`fkpd.studio.bootstrap`, :mod:`fkpd.studio.alignment`) run
rounds through :class:`fkpd.train.engine.RoundEngine`, as ``fkpd loop`` does; this
module supplies the store side:

* :class:`StoreLabeller`: a batch's clips are rendered apart from the rollout and
  registered pair by pair as they land (:meth:`StoreLabeller.clip_writer`,
  :class:`fkpd.studio.progressive.ProgressiveBatch`: both files of a pair written, then
  its clips, then the pair, so a batch is labelable from its first pair on);
  :meth:`StoreLabeller.request` waits for the last pair; the labels are every non-skip
  comparison people stored (:meth:`StoreLabeller.labels`);
* :func:`round_engine`: the engine of a project (reference = version 0, its dataset,
  its batch settings);
* progress adapters that map a stage's progress into the job's and honour
  cancellation (:class:`Stage`, :class:`Watch`), and the version helpers shared by the
  jobs and the app (:func:`served_versions`, :func:`checkpoint_dir`).

Why the jobs' order of work is crash-safe (a worker may be SIGKILLed at any instruction;
the steps are those of :mod:`fkpd.studio.bootstrap` and :mod:`fkpd.studio.alignment`):

* Nothing is registered before the file it names is complete: datasets, checkpoints,
  segments and videos are written under a temporary name and renamed
  (:meth:`Store.write_artifact_atomic`, :meth:`DiffusionPolicy.save`,
  :func:`fkpd.data.generate_dataset`), and rows are added after the rename. A crash
  leaves at most an unregistered directory or temporary file behind.
* The served policy is the latest registered version. A new version is registered after
  its checkpoint was written *and* evaluated, in one transaction, so a crash before
  step 4 leaves the previous version served; the previous checkpoint is only ever read.
* Jobs never change or delete comparisons or pairs; they only add rows. The previous
  batch stays open and is what :meth:`Store.next_pair` hands out (the latest round with
  open pairs) until the new batch's first pair is added; the new batch's pairs are added
  one by one, each after both of its videos are complete on disk. A crash between
  registering a pair's clips and the pair leaves clip rows whose files exist but that no
  pair uses: harmless.
* Re-running is safe. A retried ``alignment_round`` job that finds a version registered
  by its own earlier attempt (``metrics["job_id"]``) skips to step 5; a batch is
  rendered only when its round has no pairs yet, or completed when this job registered
  part of it (:func:`render_if_missing`); ``bootstrap`` reuses version 0.

Long work (data generation, BC, alignment) runs in the job's thread: the trainers call
back after every step (``on_step`` / ``on_episode``), and :class:`Watch` turns that into
``ctx.progress(fraction, "training BC: step i/N")`` and checks whether the job was
cancelled or taken away; :class:`fkpd.store.JobCancelled` /
``JobLostError`` raised there stop the trainer between two steps, and its output is
never registered (the worker's heartbeat runs in its own thread meanwhile). A cut-off BC
resumes from its last saved state. Cancellation is honoured until the new version is
registered; the batch rendering that follows runs to the end.

Shapes follow DESIGN.md §3: L segment length, Do/Da observation/action dims.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fkpd.data import load_dataset
from fkpd.envs import DEFAULT_RENDER_SIZE, get_task, make_env
from fkpd.errors import DatasetError
from fkpd.prefs.labellers import Label, Labeller
from fkpd.prefs.dataset_pairs import DatasetPairSource, DatasetReplay
from fkpd.prefs.pairs import PairSource, RolledClip, RolloutPairSource, mix_sources
from fkpd.prefs.segments import Segment
from fkpd.store import JobContext, PolicyVersionInfo, ProjectInfo, Store, current_job
from fkpd.studio.errors import RoundError
from fkpd.studio.labelling import mark_gold
from fkpd.studio.params import TRAINING_KINDS, BatchSettings
from fkpd.studio.progressive import ProgressiveBatch
from fkpd.train.acquisition import select_pairs
from fkpd.train.align import AlignConfig, SegmentRef
from fkpd.train.engine import RoundEngine
from fkpd.train.evaluate import Evaluator

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ progress


class Stage:
    """Maps one stage's own progress (0..1) into ``[lo, hi]`` of the job's progress."""

    def __init__(self, ctx: JobContext, lo: float, hi: float) -> None:
        self.ctx, self.lo, self.hi = ctx, lo, hi

    def __call__(self, fraction: float, message: str) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.ctx.progress(self.lo + (self.hi - self.lo) * fraction, message)


class Watch:
    """The ``on_step`` / ``on_episode`` callback of a trainer running inside a job: every
    call reports ``"<what>: <unit> i/N"`` through ``stage`` (``JobContext.progress``
    writes to the store at most every few seconds) and checks for cancellation.

    Raises (from the call):
        JobCancelled / JobLostError / WorkerStopping: the job was cancelled, taken away,
            or its worker is stopping (from :meth:`JobContext.check_cancelled`); the
            trainer stops there.
    """

    def __init__(self, ctx: JobContext, stage: Stage, what: str, unit: str = "step") -> None:
        self.ctx, self.stage, self.what, self.unit = ctx, stage, what, unit

    def __call__(self, done: int, total: int) -> None:
        self.stage(done / total, f"{self.what}: {self.unit} {done}/{total}")
        self.ctx.check_cancelled()


# ------------------------------------------------------------------ versions and jobs


def ensure_sole_training_job(ctx: JobContext) -> None:
    """Raise unless this job is the project's only running bootstrap/alignment round.

    Raises:
        RoundError: another training job of the project is running.
    """
    others = [j for j in ctx.store.jobs.list(ctx.job.project_id, status="running")
              if j.kind in TRAINING_KINDS and j.id != ctx.job_id]
    if others:
        other = others[0]
        raise RoundError(
            f"job {other.id} ({other.kind}) is still running for this project (last heartbeat "
            f"{other.heartbeat_at}); only one bootstrap/alignment_round job runs per project at a time. "
            "Wait for it to finish, or cancel it (a job whose worker died is failed by stale recovery).")


#: Project setting listing the ids of versions an admin rolled back (set aside): they are
#: kept in the store and in the history but never served or trained from again.
ROLLED_BACK = "rolled_back_versions"


def served_versions(store: Store, project: ProjectInfo) -> list[PolicyVersionInfo]:
    """The project's policy versions that can be served, oldest first: those with a
    checkpoint (versions that only hold imported labels are left out) that were not
    rolled back (:func:`roll_back`). The last one is the served policy, which the next
    round trains from and renders its batch with."""
    rolled = set(store.get_project(project.id).settings.get(ROLLED_BACK) or ())
    return [v for v in store.list_policy_versions(project.id) if v.checkpoint_path is not None and v.id not in rolled]


def roll_back(store: Store, project: ProjectInfo) -> PolicyVersionInfo:
    """Set the served version aside and serve its parent again (one click on the Rounds
    page). The version stays in the store and the history, marked rolled back; its
    comparisons keep training later rounds, which start from the parent.

    Returns:
        The version served now.

    Raises:
        RoundError: only version 0 is served (nothing to roll back to).
    """
    versions = served_versions(store, project)
    if len(versions) < 2:
        raise RoundError("only the behaviour-cloned version 0 is served; there is no earlier version to roll back to")
    rolled = list(store.get_project(project.id).settings.get(ROLLED_BACK) or ())
    store.update_project(project.id, settings={ROLLED_BACK: rolled + [versions[-1].id]})
    log.info("project %s: version %s rolled back; version %s is served again", project.name, versions[-1].id,
             versions[-2].id)
    return versions[-2]


def checkpoint_dir(store: Store, version: PolicyVersionInfo) -> Path:
    """The local checkpoint directory of a version, after checking the file's sha256: the
    artifact directory's own folder, or, with a remote store, a copy of the checkpoint
    (weights and ``config.json``) in its local cache keyed by the weights' sha256.

    Raises:
        RoundError: the version has no checkpoint.
        ArtifactIntegrityError: the checkpoint file is missing or was changed.
    """
    if version.checkpoint_path is None:
        raise RoundError(f"policy version {version.id} has no checkpoint (imported data?); it cannot be rolled "
                         "out or trained from")
    if version.checkpoint_sha256 or not store.artifacts.is_local:
        path = store.artifacts.local_file(version.checkpoint_path, version.checkpoint_sha256 or None, siblings=True)
    else:
        path = store.resolve(version.checkpoint_path)
    return path.parent


def local_dataset(store: Store, relpath: str, sha256: str | None = None) -> Path:
    """A local path of a dataset kept in the artifact store (a bootstrap's generated
    ``dataset.hdf5``): the file itself in a local artifact directory (not re-hashed, as
    before), or, with a remote store, the local cache's copy, checked against ``sha256``
    when the bootstrap recorded it.

    Raises:
        ArtifactIntegrityError: a remote dataset is missing or changed.
    """
    if store.artifacts.is_local:
        return store.resolve(relpath)
    return store.artifacts.local_file(relpath, sha256)


def make_envs(task: str, settings: BatchSettings, count: int) -> list:
    """``min(n_envs, count)`` (at least 1) environments of ``task`` with the settings'
    horizon and render size."""
    horizon = settings.horizon(task)
    return [make_env(task, max_episode_steps=horizon, render_size=settings.render_size)
            for _ in range(max(1, min(settings.n_envs, count)))]


def apply_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when ``threads > 0``."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def training_threads(threads: int = 0) -> int:
    """Torch CPU threads for a job's training: ``threads``, or every core when it is 0."""
    return threads if threads > 0 else (os.cpu_count() or 1)


@contextlib.contextmanager
def every_core(threads: int = 0) -> Iterator[int]:
    """Torch CPU threads for one stretch of a job's training, then the worker's own count again.

    The app's training worker runs with one torch thread (``fkpd worker --threads 1``),
    which suits the rollouts of a batch (the render processes take the other cores) but
    leaves a core idle while BC trains or a round aligns and evaluates. Inside this
    block torch uses :func:`training_threads` threads (every core unless ``threads`` is
    set). The app's local workers are niced (:attr:`fkpd.studio.config.StudioConfig.worker_nice`),
    so the app's own process still answers clicks first (``bench/bench_ui.py
    --during-round``: p95 20.5 ms while a round aligns on both cores).

    Yields:
        The thread count used inside the block.
    """
    import torch

    before = torch.get_num_threads()
    n = training_threads(threads)
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ the store as labeller


class StoreLabeller(Labeller):
    """People label through the store: batches become clips and pairs for annotators,
    comparisons come back as labels.

    Args:
        store: the store.
        project: the project.
        job_id: recorded in each clip's ``meta``.
        render_size: ``(height, width)`` of videos rendered from recorded physics states
            (the batch settings' ``render_size``); None: the render processes start with
            the first such clip, at the default size.
        render_workers: render processes (default: the CPU count, at most 4).
    """

    def __init__(self, store: Store, project: ProjectInfo, job_id: int | None = None,
                 render_size: tuple[int, int] | None = None, render_workers: int | None = None) -> None:
        self.store, self.project, self.job_id = store, project, job_id
        self.render_size, self.render_workers = render_size, render_workers
        self._batches: dict[int, ProgressiveBatch] = {}
        self.pair_ids: dict[int, list[int]] = {}
        #: per round, batch indices of pairs registered before (a retried job); set by
        #: :func:`render_if_missing`
        self.skip: dict[int, set[int]] = {}

    def clip_writer(self, version: PolicyVersionInfo, round_: int, total: int,
                    progress: Callable[[float, str], None] | None = None) -> Callable[[RolledClip], None]:
        """A clip sink for the batch of ``round_`` rolled out from ``version``
        (:class:`fkpd.studio.progressive.ProgressiveBatch`): clips recorded as physics
        states are rendered and encoded (H.264 MP4, L + 1 frames) in worker processes
        while the rollout goes on; as soon as both videos of a pair are complete, the
        pair's videos and segment ``.npz`` files are written atomically to a new folder
        ``projects/<id>/batches/round<r>-v<version>-<token>/``, its clips registered
        (ground-truth return and success included, never shown to annotators), then the
        pair: annotators get it at once. :meth:`request` waits for the last pair.

        Writes are fenced on the job's current attempt: inside a worker's job
        (:func:`fkpd.store.current_job`), each clip, and each registration, first checks
        that this worker still runs this attempt of the job
        (:meth:`JobContext.ensure_current`), so a worker whose job was recovered by
        another one (it was frozen past its heartbeat) stops instead of writing into the
        batch folder.

        Args:
            version: the version the clips come from.
            round_: the round they are labelled for.
            total: clips in the batch (for progress messages).
            progress: optional ``(fraction, message)`` callback, once per registered pair
                (from the registration thread; an exception it raises stops the batch).

        Raises (from the returned writer):
            JobLostError: the job is no longer this worker's attempt; nothing more is written.
        """
        ctx = current_job()
        fence = ctx.ensure_current if ctx is not None and ctx.job_id == self.job_id else (lambda: None)
        folder = f"projects/{self.project.id}/batches/round{round_:03d}-v{version.id}-{uuid.uuid4().hex[:8]}"
        old = self._batches.pop(round_, None)
        if old is not None:
            old.close()
        batch = ProgressiveBatch(self.store, self.project, version, round_, folder, total,
                                 get_task(self.project.task_id).fps, job_id=self.job_id, fence=fence,
                                 progress=progress, render_size=self.render_size or DEFAULT_RENDER_SIZE,
                                 render_workers=self.render_workers, skip=self.skip.pop(round_, set()),
                                 warm=self.render_size is not None)
        self._batches[round_] = batch
        return batch

    def request(self, round_: int, pairs: Sequence[tuple[Segment, Segment]]) -> None:
        """Wait until the batch of ``round_`` written by :meth:`clip_writer` is registered;
        the new pair ids go to ``pair_ids[round_]``, in batch order.

        Raises:
            RoundError: the batch was not rolled out with this labeller's clip writer, or
                its clips do not make ``len(pairs)`` pairs.
        """
        batch = self._batches.pop(round_, None)
        if batch is None:
            raise RoundError(f"round {round_}: no clip was written for {len(pairs)} pairs; roll the batch out with "
                             "this labeller's clip_writer")
        try:
            self.pair_ids[round_] = batch.finish(len(pairs))
        except ValueError as exc:
            raise RoundError(str(exc)) from exc

    def abort(self, round_: int) -> None:
        """Stop the batch of ``round_`` after a failed rollout: pairs already complete stay
        registered, the rest is dropped with the render processes."""
        batch = self._batches.pop(round_, None)
        if batch is not None:
            batch.close()

    def labels(self) -> list[Label]:
        """Every non-skip comparison of the project as ``(left, right, p_left)``, except
        those of annotators excluded from training (:meth:`Store.exclude_annotator`).

        The segments are :class:`fkpd.train.align.SegmentRef` handles (the clip's id,
        recorded length and the project's task): a file is read, after its sha256 is
        checked, only when the trainer's batch needs it
        (:class:`fkpd.train.align.PairWindows` streams them through a bounded cache), so
        reading the labels costs one query however many there are. Segments without
        per-step success flags (imported data) get ``success = False``.

        Raises (when a segment is read):
            ArtifactIntegrityError: a segment file is missing or was changed.
            PreferenceError: a segment file holds malformed arrays or another length.
        """
        store = self.store
        task = self.project.task_id
        refs: dict[int, SegmentRef] = {}

        def segment(clip) -> SegmentRef:
            if clip.id not in refs:
                def load(clip=clip) -> Segment:
                    arrays = store.artifacts.load_segment(clip.segment_path, clip.segment_sha256)
                    length = len(arrays["actions"])
                    return Segment(
                        arrays["observations"], arrays["actions"], arrays["rewards"],
                        arrays.get("success", np.zeros(length, bool)),
                        reset_seed=-1 if clip.reset_seed is None else int(clip.reset_seed),
                        start=int(arrays.get("start", 0)), task_id=str(arrays.get("task_id", "")),
                        path=store.resolve(clip.segment_path) if store.artifacts.is_local else None)

                refs[clip.id] = SegmentRef(clip.id, clip.length, task, load)
            return refs[clip.id]

        return [(segment(tp.left), segment(tp.right), tp.p_left) for tp in store.training_pairs(self.project.id)]


#: Batches of at most this many frames are rendered in the job's own process (in the
#: registration thread): starting render processes takes seconds, about as long as
#: rendering 100 frames of MetaWorld on a CPU.
INLINE_RENDER_FRAMES = 400


def evaluator(task: str, settings: BatchSettings) -> Evaluator:
    """The short evaluation of a project's versions: ``settings.eval_episodes`` episodes
    with the settings' seed, horizon and ``n_envs`` (environments made per evaluation)."""
    return Evaluator(lambda n: make_envs(task, settings, n), settings.eval_episodes, settings.seed)


def round_engine(store: Store, project: ProjectInfo, settings: BatchSettings, reference: PolicyVersionInfo,
                 job_id: int | None = None, align_cfg: AlignConfig | None = None,
                 first_pair: int = 0, beta: float | None = None) -> RoundEngine:
    """The round engine of ``project``: reference = version 0 (``reference``, its
    checkpoint sha256-checked), the dataset it was cloned from, current-policy pairs of
    the batch settings rendered for people, the store as labeller, and a short
    evaluation (``settings.eval_episodes``). A ``settings.dataset_share`` of the pairs
    are dataset pairs (:func:`dataset_pairs`; its RoundError is raised here, before
    anything is trained or rendered). ``first_pair`` > 0 makes more pairs for a
    round that already has that many (top-up pairs, :mod:`fkpd.studio.topup`; the seed
    rule is :mod:`fkpd.prefs.pairs`'). With ``settings.query_selection`` other than
    ``uniform`` the current-policy pairs are chosen from ``settings.candidate_factor``
    times as many candidates (:mod:`fkpd.train.acquisition`; ``disagreement`` scores
    them with the implicit reward at ``beta``, default ``align_cfg``'s β); only the
    chosen pairs are rendered."""
    task = project.task_id
    boot = reference.metrics.get("bootstrap") or {}
    # generated data lives in the artifact directory; a named dataset is read where it is
    dataset = (str(local_dataset(store, boot["dataset"], boot.get("dataset_sha256"))) if boot.get("dataset")
               else str(boot.get("dataset_source") or ""))
    start = None if settings.segment_start < 0 else settings.segment_start

    ref_dir = checkpoint_dir(store, reference)
    beta = beta if beta is not None else (align_cfg or AlignConfig()).beta

    def policy_pairs(n: int, first: int) -> PairSource:
        return select_pairs(
            RolloutPairSource(lambda c: make_envs(task, settings, c), n, settings.length(task), seed=settings.seed,
                              start=start, render=True, task_id=task, first=first, record="states"),
            settings.query_selection, settings.candidate_factor, reference=ref_dir, beta=beta)

    source = mix_sources(settings.pairs_per_batch, settings.dataset_share, policy_pairs,
                         lambda n, first, stride: dataset_pairs(task, dataset, settings, n, first, stride),
                         first=first_pair)
    frames = 2 * settings.pairs_per_batch * (settings.length(task) + 1)
    labeller = StoreLabeller(store, project, job_id, render_size=settings.render_size,
                             render_workers=0 if frames <= INLINE_RENDER_FRAMES else None)
    return RoundEngine(task, ref_dir, dataset, settings.seed, source, labeller, evaluator(task, settings), align_cfg)


def dataset_pairs(task: str, dataset: str, settings: BatchSettings, pairs: int, first: int,
                  stride: int) -> DatasetPairSource:
    """The dataset pairs of a batch (``settings.dataset_share > 0``), rendered by replay,
    after checking that the dataset's first episodes replay exactly
    (:meth:`fkpd.prefs.dataset_pairs.DatasetReplay.check`).

    Raises:
        RoundError: the dataset cannot be read, has no reset seeds, does not replay, or
            has too few episodes of L steps; the message says why and to set
            ``dataset_share`` to 0.
    """
    replay = DatasetReplay(task, render_size=settings.render_size)
    try:
        ds = load_dataset(dataset, task_id=task)
        replay.check(ds)
        return DatasetPairSource(ds, pairs, settings.length(task), seed=settings.seed,
                                 start=None if settings.segment_start < 0 else settings.segment_start, render=True,
                                 task_id=task, replay=replay, first=first, stride=stride)
    except DatasetError as exc:
        raise RoundError(f"dataset_share is {settings.dataset_share:g} but the project's dataset cannot give "
                         f"dataset pairs for people: {exc}. Set dataset_share to 0 (current-policy pairs only)."
                         ) from exc


def render_batch(engine: RoundEngine, version: PolicyVersionInfo, round_: int, *,
                 progress: Callable[[float, str], None] | None = None) -> list[int]:
    """Roll out, save and register the labelling batch of ``round_`` from ``version``
    (:meth:`fkpd.train.engine.RoundEngine.make_batch` with the store's clip writer).

    Pair ``i`` is two clips of ``version`` from the reset seed
    :func:`fkpd.prefs.pairs.pair_seed` ``(seed, round_, i)`` with different sampling
    noise, cut at the same L steps (DESIGN.md §3); with ``dataset_share > 0`` that
    share of the pairs (:func:`fkpd.prefs.pairs.dataset_slots`) are instead two
    segments of the offline dataset, replayed from their reset seeds to render them
    (:mod:`fkpd.prefs.dataset_pairs`; their clips' ``meta`` says ``source: dataset``).
    Clips are rolled out ``n_envs`` at a time, recording physics states; worker
    processes render and encode them meanwhile, and each pair is registered as soon as
    both its videos are written (:class:`fkpd.studio.progressive.ProgressiveBatch`), so
    the batch is labelable from its first pair on.
    With a query selection (:mod:`fkpd.train.acquisition`) the candidates are rolled out
    first without frames (progress "choosing pairs"), then only the chosen pairs are
    rendered and saved.

    Returns:
        The new pair ids, in order.

    Raises:
        ArtifactIntegrityError: the version's checkpoint is missing or changed.
        CheckpointError: the checkpoint is corrupt or for another task.
    """
    from fkpd.policy import DiffusionPolicy

    labeller: StoreLabeller = engine.labeller  # type: ignore[assignment]
    policy = DiffusionPolicy.load(checkpoint_dir(labeller.store, version), task_id=engine.task_id)
    total = 2 * engine.source.pairs  # type: ignore[attr-defined]
    rolled = [total]  # clips rolled out in all, candidates included (known from the first callback)

    def rolling(done: int, clips: int) -> None:
        rolled[0] = max(clips, total)
        if progress is not None and clips > total and done <= clips - total:
            progress(done / clips, f"rendering batch: choosing pairs: candidate clip {done}/{clips - total}")

    def writing(fraction: float, message: str) -> None:
        if progress is not None:
            extra = rolled[0] - total
            progress((extra + fraction * total) / rolled[0], message)

    on_clip = labeller.clip_writer(version, round_, total, writing)
    if progress is not None:
        progress(0.0, f"rendering batch: rolling out, clip 0/{total}")
    try:
        engine.make_batch(policy, round_, on_clip=on_clip, progress=rolling)
    finally:
        labeller.abort(round_)  # after a failure: stop the render processes (a no-op once registered)
    pair_ids = labeller.pair_ids.pop(round_)
    mark_gold(labeller.store, labeller.project, pair_ids)  # a share of gold pairs (issue #13), hidden from annotators
    return pair_ids


def render_if_missing(ctx: JobContext, engine: RoundEngine, project: ProjectInfo, version: PolicyVersionInfo,
                      progress_from: float) -> list[int]:
    """Render the batch of round ``version.round + 1`` unless that round has pairs; returns
    the pair ids added. A batch this job registered part of (an earlier attempt stopped
    half-way) is completed: the same plan is rolled out again and only the pairs it has
    not registered yet are rendered (:meth:`fkpd.store.Store.batch_pair_indices`)."""
    round_ = version.round + 1
    if ctx.store.batch_progress(project.id, round_)[1] > 0:
        done = ctx.store.batch_pair_indices(project.id, round_, ctx.job_id)
        if not done or len(done) >= engine.source.pairs:  # type: ignore[attr-defined]
            return []  # another job's batch, or complete
        engine.labeller.skip[round_] = done  # type: ignore[attr-defined]
    return render_batch(engine, version, round_, progress=Stage(ctx, progress_from, 1.0))
