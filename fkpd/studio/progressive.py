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
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from fkpd.envs import DEFAULT_RENDER_SIZE, make_env
from fkpd.envs.render import ClipRenderer, render_states, write_video
from fkpd.prefs.pairs import RolledClip
from fkpd.store import PolicyVersionInfo, ProjectInfo, Store

log = logging.getLogger(__name__)


class ProgressiveBatch:
    """The clip sink of one batch: renders, writes and registers its pairs one by one (see
    the module docstring).

    Args:
        store: the store.
        project: the project.
        version: the version the clips come from.
        round_: the round the pairs are labelled for.
        folder: artifact folder of the batch's files (``.../p{k:03d}_{a,b}.{mp4,npz}``).
        total: clips in the batch, for progress messages.
        fps: playback rate of the videos.
        job_id: recorded in each clip's ``meta``.
        fence: called right before each registration; raises to stop it
            (:meth:`fkpd.store.JobContext.ensure_current`).
        progress: optional ``(fraction, message)`` callback after each registered pair,
            called from the registration thread; an exception it raises stops the batch.
        render_size: ``(height, width)`` of rendered frames (clips recorded as states).
        render_workers: render processes (default :func:`fkpd.envs.render.default_render_workers`);
            0 renders in the registration thread instead (for small batches, where
            starting processes would cost more than it saves).
        skip: batch indices of pairs registered already (a retried job): their clips are
            dropped.
        warm: start the render processes now rather than at the first clip of states.
    """

    def __init__(self, store: Store, project: ProjectInfo, version: PolicyVersionInfo, round_: int, folder: str,
                 total: int, fps: int, job_id: int | None = None, fence: Callable[[], None] = lambda: None,
                 progress: Callable[[float, str], None] | None = None,
                 render_size: tuple[int, int] = DEFAULT_RENDER_SIZE, render_workers: int | None = None,
                 skip: set[int] | frozenset[int] = frozenset(), warm: bool = False) -> None:
        self.store, self.project, self.version, self.round = store, project, version, int(round_)
        self.folder, self.total, self.fps, self.job_id = folder, int(total), int(fps), job_id
        self.fence, self.progress = fence, progress
        self.render_size, self.render_workers = tuple(render_size), render_workers
        self.skip = set(skip)
        self.pair_ids: dict[int, int] = {}  # batch index -> pair id
        self._sides: dict[int, dict[int, tuple[RolledClip, Future | None]]] = {}
        self._queued: list[Future] = []
        self._ready: set[int] = set()  # pairs with both clips in, not yet queued for registration
        self._next = 0  # the batch index registered next
        self._registrar = ThreadPoolExecutor(1, thread_name_prefix=f"register-round{round_}")
        self._renderer: ClipRenderer | None = None
        self._env: Any = None  # the registration thread's own, with render_workers=0
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        if warm and render_workers != 0:
            self.renderer()

    def renderer(self) -> ClipRenderer:
        """The batch's render processes (started on first use)."""
        if self._renderer is None:
            self._renderer = ClipRenderer(self.project.task_id, self.render_size, fps=self.fps,
                                          workers=self.render_workers)
        return self._renderer

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
        job = None
        if clip.episode.frames is None and clip.episode.states is not None:
            if self.render_workers != 0:
                job = self.renderer().submit(clip.request.reset_seed, clip.episode.states)
        elif clip.episode.frames is None:
            raise ValueError(f"clip {side} of pair {k} has neither frames nor physics states to make a video from; "
                             "roll it out with render=True")
        sides = self._sides.setdefault(k, {})
        sides[side] = (clip, job)
        if len(sides) == 2:
            self._ready.add(k)
        first = not self._queued
        while self._next in self._ready or self._next in self.skip:  # in batch order
            if self._next in self._ready:
                self._ready.discard(self._next)
                self._queued.append(self._registrar.submit(self._register, self._next))
            self._next += 1
        if first and self._queued:
            # the first pair first: the rollout of the next clips waits until it is
            # labelable, so its two renders have the CPU to themselves
            self._queued[0].result()

    def _raise_if_failed(self) -> None:
        with self._lock:
            if self._error is not None:
                raise self._error

    def _register(self, k: int) -> None:
        """Write pair ``k``'s files and register its clips, then the pair (registration thread)."""
        self._raise_if_failed()
        try:
            rows = [self._write(*self._sides[k][side]) for side in (0, 1)]
            self.fence()  # a job taken over meanwhile registers nothing
            ids = [c.id for c in self.store.add_clips(rows)]
            self.pair_ids[k] = self.store.add_pairs(self.project.id, [(ids[0], ids[1])], round=self.round)[0]
            del self._sides[k]
            if self.progress is not None:
                done = 2 * len(self.pair_ids)
                self.progress(done / self.total, f"rendering batch: clip {done}/{self.total}")
        except BaseException as exc:
            with self._lock:
                self._error = self._error or exc
            raise

    def _write(self, clip: RolledClip, job: Future | None) -> dict[str, Any]:
        """Both files of one clip, under their final names; its clip row."""
        store, k, side, seg = self.store, clip.pair, clip.side, clip.segment
        stem = f"{self.folder}/p{k:03d}_{'ab'[side]}"
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
            meta={"round": self.round, "pair": k, "side": "ab"[side], "start": int(seg.start),
                  "noise_seed": int(clip.request.noise_seed), "job_id": self.job_id, **clip.meta})

    def _close_env(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

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
        try:
            for job in self._queued:
                job.result()
            self.fence()
        finally:
            self.close()
        if self._sides or len(self.pair_ids) + len(self.skip) != pairs:
            raise ValueError(f"round {self.round}: the clips written make {len(self.pair_ids)} pairs (and "
                             f"{len(self._sides)} halves) besides the {len(self.skip)} registered before, for a batch "
                             f"of {pairs} pairs; roll the batch out with this writer")
        return [self.pair_ids[k] for k in sorted(self.pair_ids)]

    def close(self) -> None:
        """Stop registering (pairs already queued still are) and stop the render processes,
        dropping clips not yet started; idempotent."""
        if self._error is not None or any(not j.done() for j in self._queued):
            for job in self._queued:
                job.cancel()
        self._registrar.submit(self._close_env)  # in the thread that made it (its GL context)
        self._registrar.shutdown(wait=True)
        if self._renderer is not None:
            self._renderer.close(cancel=self._error is not None)
            self._renderer = None
