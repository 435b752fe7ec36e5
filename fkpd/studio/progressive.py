"""Progressive batches: a labelling batch becomes labelable pair by pair as its clips land.

:class:`ProgressiveBatch` is the clip sink of one batch (:meth:`fkpd.studio.batches.StoreLabeller.clip_writer`).
The rollout hands it each clip as soon as the clip is rolled out
(:func:`fkpd.prefs.pairs.rollout_pairs`); clips rolled out with ``record="states"``
(physics states instead of frames) go to a :class:`fkpd.envs.render.ClipRenderer`, whose
worker processes render and encode them while the policy rolls out the next clips. One
registration thread then takes the pairs in batch order (pair 0, pair 1, ...; a pair
whose clips are in waits for the pairs before it, so pair ids, the order annotators get
pairs in, follow the batch, dataset pairs spread through it included) and, for each,
once both videos are encoded:

1. writes both videos and segments under their final names atomically
   (:meth:`fkpd.store.Store.write_artifact_atomic`; a reader never sees a half-written
   file);
2. checks that this worker still runs this attempt of the job (the fence), then
   registers the two clips (one transaction) and the pair (another).

The rollout waits once, for the first pair to be registered, so that pair's renders get
the CPU to themselves; after that it runs ahead of the renders.

So the pair appears in :meth:`fkpd.store.Store.next_pair` the moment its second video is
complete, and never before: a pair row is only ever added after both of its files are
whole on disk. The first pair of the bootstrap is labelable seconds after the first two
clips are rolled out, instead of after the whole batch.

Crash safety: a crash leaves the pairs registered so far (each complete) and at most two
clip rows without a pair (harmless, as before). A retried job completes the batch: it
rolls the same plan out again and registers only the pairs whose index the job did not
register yet (``skip``; :func:`fkpd.studio.batches.render_if_missing`).

:class:`ExtensionBatch` is the same for a top-up's *extension clips* (one more clip from
a reset seed that has clips already, :mod:`fkpd.prefs.extension`): each clip's files are
written, then the clip is registered and then its new pairs, in plan order, as soon as
its video is encoded. Both sinks share :class:`ClipRegistrar` (render processes, the
registration thread, atomic clip files, the fence).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from fkpd.envs import DEFAULT_RENDER_SIZE, make_env
from fkpd.envs.render import ClipRenderer, render_states, write_video
from fkpd.prefs.extension import ExtensionClip
from fkpd.prefs.pairs import RolledClip
from fkpd.store import PolicyVersionInfo, ProjectInfo, Store

log = logging.getLogger(__name__)


class ClipRegistrar:
    """What the progressive clip sinks share: the render processes
    (:class:`fkpd.envs.render.ClipRenderer`, or rendering in the registration thread),
    one registration thread that writes each clip's files under their final names
    atomically and registers rows in the order it is given work, the fence, and the first
    error, which stops the sink.

    Args:
        store: the store.
        project: the project.
        version: the version the clips come from.
        round_: the round the pairs are labelled for.
        folder: artifact folder of the clips' files.
        total: clips in all, for progress messages.
        fps: playback rate of the videos.
        job_id: recorded in each clip's ``meta``.
        fence: called right before each registration; raises to stop it
            (:meth:`fkpd.store.JobContext.ensure_current`).
        progress: optional ``(fraction, message)`` callback after each registration,
            called from the registration thread; an exception it raises stops the sink.
        render_size: ``(height, width)`` of rendered frames (clips recorded as states).
        render_workers: render processes (default :func:`fkpd.envs.render.default_render_workers`);
            0 renders in the registration thread instead (for small batches, where
            starting processes would cost more than it saves).
        warm: start the render processes now rather than at the first clip of states.
    """

    def __init__(self, store: Store, project: ProjectInfo, version: PolicyVersionInfo, round_: int, folder: str,
                 total: int, fps: int, job_id: int | None = None, fence: Callable[[], None] = lambda: None,
                 progress: Callable[[float, str], None] | None = None,
                 render_size: tuple[int, int] = DEFAULT_RENDER_SIZE, render_workers: int | None = None,
                 warm: bool = False) -> None:
        self.store, self.project, self.version, self.round = store, project, version, int(round_)
        self.folder, self.total, self.fps, self.job_id = folder, int(total), int(fps), job_id
        self.fence, self.progress = fence, progress
        self.render_size, self.render_workers = tuple(render_size), render_workers
        self._queued: list[Future] = []
        self._registrar = ThreadPoolExecutor(1, thread_name_prefix=f"register-round{round_}")
        self._renderer: ClipRenderer | None = None
        self._env: Any = None  # the registration thread's own, with render_workers=0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._closed = False
        if warm and render_workers != 0:
            self.renderer()

    def renderer(self) -> ClipRenderer:
        """The sink's render processes (started on first use)."""
        if self._renderer is None:
            self._renderer = ClipRenderer(self.project.task_id, self.render_size, fps=self.fps,
                                          workers=self.render_workers)
        return self._renderer

    def _render(self, clip: RolledClip, what: str) -> Future | None:
        """Submit a clip recorded as states to the render processes (None: it has frames,
        or it is rendered in the registration thread).

        Raises:
            ValueError: the clip has neither frames nor states.
        """
        if clip.episode.frames is None and clip.episode.states is not None:
            return self.renderer().submit(clip.request.reset_seed, clip.episode.states) \
                if self.render_workers != 0 else None
        if clip.episode.frames is None:
            raise ValueError(f"{what} has neither frames nor physics states to make a video from; roll it out "
                             "with render=True")
        return None

    def _raise_if_failed(self) -> None:
        with self._lock:
            if self._error is not None:
                raise self._error

    def _queue(self, register: Callable[..., None], *args: Any) -> Future:
        """Run ``register(*args)`` in the registration thread, after the work queued before;
        the first error it raises is kept and stops the sink."""
        def run() -> None:
            self._raise_if_failed()
            try:
                register(*args)
            except BaseException as exc:
                with self._lock:
                    self._error = self._error or exc
                raise

        job = self._registrar.submit(run)
        self._queued.append(job)
        return job

    def _wait_first(self) -> None:
        """Wait until the first registration is done (a no-op before anything is queued)."""
        if self._queued:
            self._queued[0].result()

    def _write(self, clip: RolledClip, job: Future | None, stem: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Both files of one clip (``stem`` + ``.mp4`` / ``.npz``), under their final names;
        its clip row, with ``meta`` beside the usual fields."""
        store, seg = self.store, clip.segment
        if job is not None:
            rendered = Path(job.result())
            try:
                video, video_sha = store.write_artifact_atomic(f"{stem}.mp4", rendered.read_bytes())
            finally:
                rendered.unlink(missing_ok=True)
        else:
            frames = clip.episode.frames
            if frames is None:  # render_workers=0: render here, in the registration thread
                if self._env is None:
                    self._env = make_env(self.project.task_id, render_size=self.render_size)
                frames = render_states(self._env, clip.request.reset_seed, clip.episode.states)
            video, video_sha = store.write_artifact_atomic(
                f"{stem}.mp4", lambda path: write_video(frames, path, fps=self.fps), to_path=True)
        seg.video = video
        segment, segment_sha = store.write_artifact_atomic(f"{stem}.npz", seg.save, to_path=True)
        return dict(
            policy_version_id=self.version.id, segment_path=segment, segment_sha256=segment_sha,
            video_path=video, video_sha256=video_sha, length=len(seg), fps=float(self.fps),
            reset_seed=int(clip.request.reset_seed) if clip.shared_start else None, gt_return=seg.ret,
            gt_success=seg.succeeded,
            meta={"round": self.round, **meta, "start": int(seg.start), "noise_seed": int(clip.request.noise_seed),
                  "job_id": self.job_id, **clip.meta})

    def _finish_queued(self) -> None:
        """Wait for every queued registration, check the fence, then :meth:`close`.

        Raises:
            what a registration raised (the first error), JobLostError (the fence).
        """
        try:
            for job in self._queued:
                job.result()
            self.fence()
        finally:
            self.close()

    def _close_env(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    def close(self) -> None:
        """Stop registering (work already queued still runs) and stop the render processes,
        dropping clips not yet started; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._error is not None or any(not j.done() for j in self._queued):
            for job in self._queued:
                job.cancel()
        self._registrar.submit(self._close_env)  # in the thread that made it (its GL context)
        self._registrar.shutdown(wait=True)
        if self._renderer is not None:
            self._renderer.close(cancel=self._error is not None)
            self._renderer = None


class ProgressiveBatch(ClipRegistrar):
    """The clip sink of one batch: renders, writes and registers its pairs one by one (see
    the module docstring).

    Args:
        folder: artifact folder of the batch's files (``.../p{k:03d}_{a,b}.{mp4,npz}``).
        total: clips in the batch, for progress messages.
        skip: batch indices of pairs registered already (a retried job): their clips are
            dropped.
        the others: as :class:`ClipRegistrar`.
    """

    def __init__(self, store: Store, project: ProjectInfo, version: PolicyVersionInfo, round_: int, folder: str,
                 total: int, fps: int, job_id: int | None = None, fence: Callable[[], None] = lambda: None,
                 progress: Callable[[float, str], None] | None = None,
                 render_size: tuple[int, int] = DEFAULT_RENDER_SIZE, render_workers: int | None = None,
                 skip: set[int] | frozenset[int] = frozenset(), warm: bool = False) -> None:
        super().__init__(store, project, version, round_, folder, total, fps, job_id, fence, progress, render_size,
                         render_workers, warm)
        self.skip = set(skip)
        self.pair_ids: dict[int, int] = {}  # batch index -> pair id
        self._sides: dict[int, dict[int, tuple[RolledClip, Future | None]]] = {}
        self._ready: set[int] = set()  # pairs with both clips in, not yet queued for registration
        self._next = 0  # the batch index registered next

    def __call__(self, clip: RolledClip) -> None:
        """Take one rolled-out clip (the :data:`fkpd.prefs.pairs.ClipSink`).

        Raises:
            whatever stopped an earlier registration (a lost job, a cancelled one, a
            render error), so the rollout stops too.
        """
        self._raise_if_failed()
        k, side = int(clip.pair), int(clip.side)
        if k in self.skip:
            return
        self.fence()
        job = self._render(clip, f"clip {side} of pair {k}")
        sides = self._sides.setdefault(k, {})
        sides[side] = (clip, job)
        if len(sides) == 2:
            self._ready.add(k)
        first = not self._queued
        while self._next in self._ready or self._next in self.skip:  # in batch order
            if self._next in self._ready:
                self._ready.discard(self._next)
                self._queue(self._register, self._next)
            self._next += 1
        if first:
            # the first pair first: the rollout of the next clips waits until it is
            # labelable, so its two renders have the CPU to themselves
            self._wait_first()

    def _register(self, k: int) -> None:
        """Write pair ``k``'s files and register its clips, then the pair (registration thread)."""
        rows = [self._write(*self._sides[k][side], stem=f"{self.folder}/p{k:03d}_{'ab'[side]}",
                            meta={"pair": k, "side": "ab"[side]}) for side in (0, 1)]
        self.fence()  # a job taken over meanwhile registers nothing
        ids = [c.id for c in self.store.add_clips(rows)]
        self.pair_ids[k] = self.store.add_pairs(self.project.id, [(ids[0], ids[1])], round=self.round)[0]
        del self._sides[k]
        if self.progress is not None:
            done = 2 * len(self.pair_ids)
            self.progress(done / self.total, f"rendering batch: clip {done}/{self.total}")

    def finish(self, pairs: int) -> list[int]:
        """Wait until every pair is registered and stop the render processes.

        Args:
            pairs: pairs in the batch (skipped ones included).

        Returns:
            The new pair ids, in batch order.

        Raises:
            what a registration raised (the first error), JobLostError when the job is
            no longer this worker's (the fence); ValueError when the clips handed over do
            not make ``pairs`` pairs.
        """
        self._finish_queued()
        if self._sides or len(self.pair_ids) + len(self.skip) != pairs:
            raise ValueError(f"round {self.round}: the clips written make {len(self.pair_ids)} pairs (and "
                             f"{len(self._sides)} halves) besides the {len(self.skip)} registered before, for a batch "
                             f"of {pairs} pairs; roll the batch out with this writer")
        return [self.pair_ids[k] for k in sorted(self.pair_ids)]


class ExtensionBatch(ClipRegistrar):
    """The clip sink of a top-up's extension clips (:mod:`fkpd.prefs.extension`): each clip,
    as soon as its video is encoded, is written (``.../x{i:03d}.{mp4,npz}``), then, after
    the fence, registered (one transaction) with its new pairs (one :meth:`Store.add_pairs`
    call, another), in plan order, so a clip's pairs with the clips this plan added to its
    group before it can be made. The first new pairs are labelable while later clips
    still render.

    Clips arrive as ``RolledClip(pair=i, ...)`` for clip ``i`` of ``plan``
    (:func:`fkpd.prefs.extension.rollout_extension`). Their ``meta`` records
    ``extension: true`` and ``clip`` (the number in the group) besides the usual fields.

    Args:
        plan: the extension clips (:func:`fkpd.prefs.extension.plan_extension`).
        the others: as :class:`ClipRegistrar` (``total`` is ``len(plan)``).
    """

    def __init__(self, store: Store, project: ProjectInfo, version: PolicyVersionInfo, round_: int, folder: str,
                 plan: Sequence[ExtensionClip], fps: int, job_id: int | None = None,
                 fence: Callable[[], None] = lambda: None, progress: Callable[[float, str], None] | None = None,
                 render_size: tuple[int, int] = DEFAULT_RENDER_SIZE, render_workers: int | None = None,
                 warm: bool = False) -> None:
        super().__init__(store, project, version, round_, folder, len(plan), fps, job_id, fence, progress,
                         render_size, render_workers, warm)
        self.plan = list(plan)
        self.clip_ids: dict[int, int] = {}  # plan index -> clip id
        self.pair_ids: dict[int, list[int]] = {}  # plan index -> its new pairs

    def __call__(self, clip: RolledClip) -> None:
        """Take extension clip ``clip.pair`` of the plan (a :data:`fkpd.prefs.pairs.ClipSink`).

        Raises:
            whatever stopped an earlier registration, so the rollout stops too.
        """
        self._raise_if_failed()
        self.fence()
        i = int(clip.pair)
        self._queue(self._register, i, clip, self._render(clip, f"extension clip {i}"))

    def settle_first(self, _done: int = 0) -> None:
        """Wait until the first clip is registered (call between lock-step batches, e.g. as
        the rollout's progress callback): the next rollout then does not compete with the
        first clip's render, and its pairs are labelable sooner."""
        self._wait_first()

    def _register(self, i: int, clip: RolledClip, job: Future | None) -> None:
        """Write clip ``i``'s files, register it, then its pairs (registration thread)."""
        planned = self.plan[i]
        row = self._write(clip, job, stem=f"{self.folder}/x{i:03d}", meta={"extension": True, "clip": planned.number})
        self.fence()  # a job taken over meanwhile registers nothing
        self.clip_ids[i] = self.store.add_clips([row])[0].id
        self.pair_ids[i] = self.store.add_pairs(self.project.id, planned.pairs(self.clip_ids[i], self.clip_ids),
                                                round=self.round)
        if self.progress is not None:
            self.progress(len(self.clip_ids) / self.total, f"extension clip {len(self.clip_ids)}/{self.total}")

    def finish(self) -> list[int]:
        """Wait until every clip and its pairs are registered and stop the render processes.

        Returns:
            The new pair ids, in plan order.

        Raises:
            what a registration raised (the first error), JobLostError (the fence);
            ValueError when fewer clips than planned were handed over.
        """
        self._finish_queued()
        if len(self.clip_ids) != len(self.plan):
            raise ValueError(f"round {self.round}: {len(self.clip_ids)} of {len(self.plan)} extension clips were "
                             "written; roll the plan out with this writer")
        return [p for i in sorted(self.pair_ids) for p in self.pair_ids[i]]
