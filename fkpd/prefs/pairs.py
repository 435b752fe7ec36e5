"""Pair sources: where the segment pairs of a round come from (DESIGN.md §5).

A *pair source* makes the pairs whose labels a round asks for, in the spirit of
``imitation``'s fragmenter and trajectory generator (one small interface, so the round
engine does not care where pairs come from):

* :class:`RolloutPairSource`: two rollouts of the current policy version from the same
  reset seed, with different sampling noise, cut at the same steps (DESIGN.md §3,
  "Pairs");
* :class:`fkpd.prefs.dataset_pairs.DatasetPairSource`: two segments of the offline
  dataset from different episodes (the released FKPD code's preference data);
* :class:`MixedPairSource`: a batch of both, dataset pairs spread evenly through it
  (:func:`dataset_slots`).

Every rollout pair of every round is fixed by :class:`PairPlan`, the one seed rule shared by
``fkpd loop`` and the app's worker:

* reset seed of pair ``i`` of round ``r``: :func:`pair_seed` ``(seed, r, i)``
  (disjoint from dataset and evaluation seeds);
* segment starts, then the two sampling-noise seeds of each pair, drawn in that order
  from ``numpy.random.default_rng(pair_seed(seed, r, 0))``; a fixed ``start`` overrides
  the drawn starts (the draw still happens, so the noise seeds do not depend on it).
* more pairs for the same round (the app's *top-up* pairs, rendered while people label
  and a round trains) continue the index: a plan of ``n`` pairs starting at index ``f``
  (``PairPlan.for_round(..., first=f)``) has the reset seeds ``pair_seed(seed, r, f)``
  … ``pair_seed(seed, r, f + n − 1)`` and draws from ``default_rng(pair_seed(seed, r,
  f))``. ``f`` is the number of pairs the round already has, so a fresh pair never
  reuses a reset seed of its round; ``first = 0`` is the round's own batch, unchanged.
  Indices stay below 100 000, where round r + 1's seeds begin. (Top-ups also add
  *extension clips* to a reset seed that has clips, on purpose: one more clip from the
  same start state makes a pair with each of them, :mod:`fkpd.prefs.extension`.)
* a *candidate pool* (active query selection, :mod:`fkpd.train.acquisition`: roll out
  more pairs than are shown and choose among them) of ``c·n`` candidates for the ``n``
  pairs from index ``f`` is ``c`` layers (:meth:`PairPlan.pool`): layer 0 is the plan
  above (``PairPlan.for_round(..., first=f)``, the pairs shown without selection), layer
  ``m`` is ``PairPlan.for_round(..., first=m·10 000 + f)``. Layer ``m`` uses indices
  ``m·10 000 + f`` … so the candidates of one round never share a reset seed, whatever
  batches and factors its pairs came in, as long as the round has at most 10 000 pairs
  and ``c <= 10`` (:data:`CANDIDATE_LAYER`, :data:`MAX_CANDIDATE_FACTOR`).

Shapes follow DESIGN.md §3: L segment length, Do/Da observation/action dims.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fkpd.envs import DEFAULT_SEGMENT_LENGTH
from fkpd.policy.rollout import ClipRequest, Episode, rollout_clips, write_video
from fkpd.prefs.segments import Segment, cut_segment


@dataclass
class RolledClip:
    """One clip of a pair, just rolled out.

    Attributes:
        pair: index ``k`` of its pair in the batch.
        side: 0 (left, ``a``) or 1 (right, ``b``).
        request: what was rolled out (reset seed, noise seed, steps, first rendered step).
        episode: the rollout, with ``frames`` from the segment's start when rendering.
        segment: the segment cut from it.
        meta: what a clip writer records beside the usual fields (dataset clips:
            ``source``, ``episode``, ``dataset_row``; empty for rollouts).
        shared_start: both clips of the pair start from the same reset seed (rollout
            pairs; dataset pairs only with ``same_reset_seed``). A store records the
            clip's reset seed only then, since a pair there compares clips from one
            initial state.
    """

    pair: int
    side: int
    request: ClipRequest
    episode: Episode
    segment: Segment
    meta: dict = field(default_factory=dict)
    shared_start: bool = True


#: ``on_clip(clip)``: called once per clip as soon as it is rolled out. Writers of clip
#: files (videos, ``.npz``) hook in here, so only one batch of frames is held in memory.
ClipSink = Callable[[RolledClip], None]

log = logging.getLogger(__name__)


#: Pairs one round may hold (its batch and its top-ups): pair indices stay below this,
#: so round r's reset seeds never reach round r + 1's (:func:`pair_seed`).
MAX_PAIRS_PER_ROUND = 100_000
#: Index offset between the layers of a candidate pool (:meth:`PairPlan.pool`); a round
#: whose pairs are chosen from pools holds at most this many pairs.
CANDIDATE_LAYER = 10_000
#: Most candidates per shown pair (layers of a pool): ``MAX_CANDIDATE_FACTOR · CANDIDATE_LAYER``
#: = :data:`MAX_PAIRS_PER_ROUND`.
MAX_CANDIDATE_FACTOR = MAX_PAIRS_PER_ROUND // CANDIDATE_LAYER


def pair_seed(seed: int, round_: int, i: int) -> int:
    """Reset seed of pair ``i`` of round ``round_`` (disjoint from data and eval seeds)."""
    return 1_000_000_000 + 10_000_000 * int(seed) + 100_000 * int(round_) + int(i)


@dataclass(frozen=True)
class PairPlan:
    """The clips of one batch of pairs, before anything is rolled out.

    Attributes:
        reset_seeds: one reset seed per pair (both clips start from it).
        starts: (n,) first step of each pair's segment.
        noise_seeds: (n, 2) sampling-noise seed of each pair's two clips.
        length: L, steps per segment.
    """

    reset_seeds: tuple[int, ...]
    starts: np.ndarray
    noise_seeds: np.ndarray
    length: int

    @classmethod
    def draw(cls, reset_seeds: Sequence[int], rng_seed: int, horizon: int, length: int,
             start: int | None = 0) -> "PairPlan":
        """Draw starts and noise seeds for ``reset_seeds`` (see the module docstring).

        Args:
            reset_seeds: one per pair.
            rng_seed: seeds the draw.
            horizon: T, the episode length in steps; L is capped at it.
            length: L, steps per segment (>= 1).
            start: first step of every segment, clipped to ``0 .. T−L``; None draws
                one start uniformly from ``0 .. T−L`` per pair.

        Raises:
            ValueError: ``length < 1``.
        """
        if length < 1:
            raise ValueError(f"segment_length must be >= 1, got {length}")
        rng = np.random.default_rng(rng_seed)
        length = min(int(length), int(horizon))
        starts = rng.integers(0, horizon - length + 1, size=len(reset_seeds))
        if start is not None:
            starts[:] = min(max(int(start), 0), horizon - length)
        noise = rng.integers(0, 2**62, size=(len(reset_seeds), 2))
        return cls(tuple(int(s) for s in reset_seeds), starts, noise, length)

    @classmethod
    def for_round(cls, seed: int, round_: int, pairs: int, horizon: int, length: int,
                  start: int | None = 0, first: int = 0) -> "PairPlan":
        """The plan of round ``round_``'s ``pairs`` pairs from index ``first`` on: reset
        seeds :func:`pair_seed` ``(seed, round_, first + i)``, drawn with
        ``pair_seed(seed, round_, first)`` (see the module docstring).

        Raises:
            ValueError: ``first < 0``, or ``first + pairs`` beyond :data:`MAX_PAIRS_PER_ROUND`.
        """
        if first < 0 or first + pairs > MAX_PAIRS_PER_ROUND:
            raise ValueError(f"pairs {first}..{first + pairs - 1} of round {round_} do not fit the seed plan "
                             f"(at most {MAX_PAIRS_PER_ROUND} pairs per round)")
        seeds = [pair_seed(seed, round_, first + i) for i in range(pairs)]
        return cls.draw(seeds, pair_seed(seed, round_, first), horizon, length, start)

    @classmethod
    def pool(cls, seed: int, round_: int, pairs: int, horizon: int, length: int, start: int | None = 0,
             first: int = 0, factor: int = 1) -> "PairPlan":
        """The candidate pool of ``factor·pairs`` pairs for the ``pairs`` pairs from index
        ``first`` of round ``round_`` (see the module docstring): layer ``m`` =
        ``for_round(seed, round_, pairs, ..., first=m·CANDIDATE_LAYER + first)``, layers
        in order, so candidates ``0 .. pairs−1`` are exactly :meth:`for_round`'s plan.

        Raises:
            ValueError: ``factor`` outside ``1 ..`` :data:`MAX_CANDIDATE_FACTOR`, or
                (``factor > 1``) ``first + pairs`` beyond :data:`CANDIDATE_LAYER`.
        """
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or not (
                1 <= factor <= MAX_CANDIDATE_FACTOR):
            raise ValueError(f"candidate factor must be an integer from 1 to {MAX_CANDIDATE_FACTOR}, got {factor!r}")
        if factor > 1 and first + pairs > CANDIDATE_LAYER:
            raise ValueError(f"pairs {first}..{first + pairs - 1} of round {round_} do not fit the candidate seed "
                             f"plan (at most {CANDIDATE_LAYER} pairs per round when pairs are chosen from a pool)")
        return cls.concat([cls.for_round(seed, round_, pairs, horizon, length, start,
                                         first=m * CANDIDATE_LAYER + first) for m in range(int(factor))])

    @classmethod
    def concat(cls, plans: Sequence["PairPlan"]) -> "PairPlan":
        """One plan of ``plans``' pairs, in order (all of one segment length L).

        Raises:
            ValueError: no plan, or plans of different lengths.
        """
        if not plans or len({p.length for p in plans}) != 1:
            raise ValueError(f"concat needs plans of one segment length, got {[p.length for p in plans]}")
        return cls(tuple(s for p in plans for s in p.reset_seeds), np.concatenate([p.starts for p in plans]),
                   np.concatenate([p.noise_seeds for p in plans]), plans[0].length)

    def take(self, index: Sequence[int]) -> "PairPlan":
        """The plan of pairs ``index`` (in that order), e.g. the pairs chosen from a pool."""
        index = np.asarray(index, np.int64)
        return PairPlan(tuple(self.reset_seeds[int(k)] for k in index), self.starts[index], self.noise_seeds[index],
                        self.length)

    def __len__(self) -> int:
        return len(self.reset_seeds)

    def requests(self, render: bool) -> list[ClipRequest]:
        """Two :class:`~fkpd.policy.rollout.ClipRequest` per pair (left, right), rolled
        out only up to the segment's end, with frames from its start when ``render``."""
        return [ClipRequest(self.reset_seeds[k], int(self.noise_seeds[k, j]),
                            max_steps=int(self.starts[k]) + self.length,
                            render_from=int(self.starts[k]) if render else None)
                for k in range(len(self)) for j in range(2)]


def rollout_pairs(policy, envs: Sequence, plan: PairPlan, *, render: bool = False, task_id: str = "",
                  on_clip: ClipSink | None = None, progress: Callable[[int], None] | None = None,
                  record: str = "frames") -> list[tuple[Segment, Segment]]:
    """Roll out the clips of ``plan`` ``len(envs)`` at a time and cut their segments.

    Args:
        policy: a :class:`fkpd.policy.DiffusionPolicy`.
        envs: environments of the policy's task (their count is the batch size).
        plan: the batch.
        render: record frames from each segment's start (for ``on_clip``).
        task_id: recorded in each segment.
        on_clip: optional :data:`ClipSink`, called per clip in order.
        progress: optional ``(clips done)`` callback, after each batch of clips.
        record: with ``render``, ``"frames"`` (rendered during the rollout, in
            ``episode.frames``) or ``"states"`` (physics states in ``episode.states``, for
            a sink that renders them apart, :class:`fkpd.envs.render.ClipRenderer`); see
            :func:`fkpd.policy.rollout.rollout_clips`.

    Returns:
        ``[(left, right), ...]``, one segment pair per planned pair.
    """
    requests = plan.requests(render)
    cuts = [(int(plan.starts[i // 2]), plan.length) for i in range(len(requests))]
    segments = rollout_segments(policy, envs, requests, cuts, task_id=task_id, record=record, progress=progress,
                                on_clip=on_clip,
                                clip_of=lambda i, req, ep, seg: RolledClip(i // 2, i % 2, req, ep, seg))
    return [(segments[2 * k], segments[2 * k + 1]) for k in range(len(plan))]


def rollout_segments(policy, envs: Sequence, requests: Sequence[ClipRequest], cuts: Sequence[tuple[int, int]], *,
                     clip_of: Callable[[int, ClipRequest, Episode, Segment], RolledClip], task_id: str = "",
                     on_clip: ClipSink | None = None,
                     progress: Callable[[int], None] | None = None, record: str = "frames") -> list[Segment]:
    """Roll out ``requests`` ``len(envs)`` at a time (:func:`fkpd.policy.rollout.rollout_clips`)
    and cut clip ``i``'s segment at ``cuts[i] = (start, L)`` (:func:`fkpd.prefs.segments.cut_segment`).
    The loop under :func:`rollout_pairs` and :func:`fkpd.prefs.extension.rollout_extension`.

    Args:
        clip_of: ``(i, request, episode, segment) -> RolledClip``, what ``on_clip`` gets.
        on_clip: optional :data:`ClipSink`, called per clip in order, as soon as its
            lock-step batch is rolled out.
        progress: optional ``(clips done)`` callback, after each lock-step batch.
        task_id, record: as :func:`rollout_pairs`.

    Returns:
        One segment per request, in order.
    """
    segments: list[Segment] = []
    for b0 in range(0, len(requests), len(envs)):
        for i, ep in enumerate(rollout_clips(policy, envs, requests[b0:b0 + len(envs)], record=record), start=b0):
            seg = cut_segment(ep, int(cuts[i][0]), int(cuts[i][1]), task_id=task_id)
            if on_clip is not None:
                on_clip(clip_of(i, requests[i], ep, seg))
            segments.append(seg)
        if progress is not None:
            progress(len(segments))
    return segments


class PairSource(ABC):
    """Makes the pairs a round asks labels for."""

    @abstractmethod
    def make_pairs(self, policy, round_: int, *, on_clip: ClipSink | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[tuple[Segment, Segment]]:
        """The pairs of round ``round_``, made with ``policy`` (the version of round
        ``round_ − 1``).

        Args:
            policy: the current :class:`fkpd.policy.DiffusionPolicy`.
            round_: the round the pairs will be labelled for (>= 1).
            on_clip: optional :data:`ClipSink` (writes each clip's files).
            progress: optional ``(clips done, clips in all)`` callback.
        """


class RolloutPairSource(PairSource):
    """Current-policy rollouts: pair ``k`` of round ``r`` is two clips of the policy from
    reset seed :func:`pair_seed` ``(seed, r, k)`` (:meth:`PairPlan.for_round`).

    Args:
        envs: environments of the task, built with the horizon T (their count is the
            rollout batch size); or a factory ``make_envs(clips) -> envs`` called per
            batch, whose environments are closed afterwards.
        pairs: pairs per round.
        length: L, steps per segment (capped at T).
        seed: the run's seed.
        start: first step of every segment; None draws one per pair.
        render: record frames (pass an ``on_clip`` that writes them).
        task_id: recorded in each segment.
        first: index of the first pair (0: the round's batch; more pairs for a round
            that has ``f`` already start at ``f``, see the module docstring).
        record: with ``render``, what the clips keep: ``"frames"``, or ``"states"`` for a
            sink that renders them apart (:func:`rollout_pairs`).
    """

    def __init__(self, envs: Sequence | Callable[[int], list], pairs: int, length: int, seed: int = 0,
                 start: int | None = 0, render: bool = False, task_id: str = "", first: int = 0,
                 record: str = "frames") -> None:
        self.envs, self.pairs, self.length, self.seed = envs, int(pairs), int(length), int(seed)
        self.start, self.render, self.task_id, self.first = start, bool(render), task_id, int(first)
        self.record = record

    def make_pairs(self, policy, round_: int, *, on_clip: ClipSink | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[tuple[Segment, Segment]]:
        envs = self.envs(2 * self.pairs) if callable(self.envs) else self.envs
        try:
            plan = PairPlan.for_round(self.seed, round_, self.pairs, int(envs[0].max_episode_steps), self.length,
                                      self.start, first=self.first)
            total = 2 * len(plan)
            return rollout_pairs(policy, envs, plan, render=self.render, task_id=self.task_id, on_clip=on_clip,
                                 progress=None if progress is None else (lambda done: progress(done, total)),
                                 record=self.record)
        finally:
            if callable(self.envs):
                close_envs(envs)


def dataset_slots(share: float, pairs: int, first: int = 0) -> tuple[np.ndarray, int]:
    """Where a batch mixes in dataset pairs: pair ``k`` of a round (0, 1, ...) is a
    dataset pair when ``⌊(k+1)·share + ½⌋ > ⌊k·share + ½⌋``, so they are spread evenly
    through the round and ``round(share · n)`` of its first ``n`` pairs (halves up) are
    dataset pairs, whatever batches the round's pairs come in.

    Args:
        share: fraction of dataset pairs, 0..1.
        pairs: pairs of this batch.
        first: index of the batch's first pair in its round (more pairs for a round
            that has ``first`` already).

    Returns:
        ``(slots, dataset_first)``: (pairs,) bool, True for the batch's dataset pairs;
        and how many of the round's first ``first`` pairs are dataset pairs (the
        current-policy ones are ``first − dataset_first``).

    Raises:
        ValueError: ``share`` outside 0..1 (NaN included).
    """
    if not 0.0 <= float(share) <= 1.0:
        raise ValueError(f"dataset share must be between 0 and 1, got {share!r}")

    def count(k):  # dataset pairs among the round's first k pairs
        return np.floor(np.asarray(k, np.float64) * float(share) + 0.5).astype(np.int64)

    k = np.arange(int(first), int(first) + int(pairs))
    return count(k + 1) > count(k), int(count(int(first)))


class MixedPairSource(PairSource):
    """A batch of two sources' pairs (current-policy and dataset pairs), in one order.

    Pair ``k`` of the batch comes from ``second`` where ``slots[k]`` (see
    :func:`dataset_slots`), else from ``first``, in order; each source keeps its own
    seed rule for its own pairs. Clips reach ``on_clip`` with their batch index as
    ``pair``: ``first``'s clips, then ``second``'s, each in order, so a clip writer that
    relies on the order must sort by ``(pair, side)``.

    Args:
        first: the first source (e.g. :class:`RolloutPairSource`); its ``pairs``
            attribute is its count per batch.
        second: the second source (e.g. a dataset source), likewise.
        slots: (first.pairs + second.pairs,) bool, True where a pair is ``second``'s.

    Raises:
        ValueError: ``slots`` does not hold ``second.pairs`` True values among
            ``first.pairs + second.pairs``.
    """

    def __init__(self, first: PairSource, second: PairSource, slots: np.ndarray) -> None:
        self.first, self.second, self.slots = first, second, np.asarray(slots, bool)
        n1, n2 = int(first.pairs), int(second.pairs)  # type: ignore[attr-defined]
        if self.slots.shape != (n1 + n2,) or int(self.slots.sum()) != n2:
            raise ValueError(f"slots must mark {n2} of {n1 + n2} pairs, got {self.slots.astype(int).tolist()}")
        self.pairs = n1 + n2

    def make_pairs(self, policy, round_: int, *, on_clip: ClipSink | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[tuple[Segment, Segment]]:
        total = 2 * self.pairs
        out: list[tuple[Segment, Segment] | None] = [None] * self.pairs
        done = 0
        for source, where in ((self.first, ~self.slots), (self.second, self.slots)):
            index = np.flatnonzero(where)
            if not len(index):
                continue

            def sink(clip: RolledClip, index=index) -> None:
                clip.pair = int(index[clip.pair])
                on_clip(clip)

            def step(n: int, _total: int, offset=done) -> None:
                progress(offset + n, total)

            got = source.make_pairs(policy, round_, on_clip=None if on_clip is None else sink,
                                    progress=None if progress is None else step)
            for k, pair in zip(index, got):
                out[int(k)] = pair
            done += 2 * len(index)
        return out  # type: ignore[return-value]


def mix_sources(pairs: int, share: float, policy: Callable[[int, int], PairSource],
                dataset: Callable[[int, int, int], PairSource], first: int = 0) -> PairSource:
    """The source of a batch of ``pairs`` pairs of which a ``share`` are dataset pairs
    (:func:`dataset_slots`).

    Args:
        pairs: pairs of the batch.
        share: fraction of dataset pairs, 0..1.
        policy: ``policy(n, first)`` builds the current-policy source of ``n`` pairs
            whose first is the round's ``first``-th current-policy pair.
        dataset: ``dataset(n, first, stride)`` builds the dataset source likewise;
            ``stride`` is the dataset pairs of a round's batch (from index 0).
        first: index of the batch's first pair in its round.

    Returns:
        ``policy(pairs, first)`` itself when no pair of the batch is a dataset pair (so
        a share of 0 changes nothing), the dataset source itself when all are, else a
        :class:`MixedPairSource`.
    """
    slots, data_first = dataset_slots(share, pairs, first)
    n_data = int(slots.sum())
    stride = max(int(dataset_slots(share, pairs)[0].sum()), 1)
    if n_data == 0:
        return policy(int(pairs), int(first) - data_first)
    if n_data == int(pairs):
        return dataset(n_data, data_first, stride)
    return MixedPairSource(policy(int(pairs) - n_data, int(first) - data_first),
                           dataset(n_data, data_first, stride), slots)


def close_envs(envs: Sequence) -> None:
    """Close environments; a failure to close is logged, never raised (it must not hide
    the outcome of the work that used them)."""
    for env in envs:
        try:
            env.close()
        except Exception:  # noqa: BLE001
            log.debug("closing an environment failed", exc_info=True)


def clip_files_writer(out_dir: Path | str, fps: int = 30) -> ClipSink:
    """A :data:`ClipSink` that saves each segment as ``OUT/p{k:04d}_{a,b}.npz`` and, when
    the episode has frames, its clip as ``.mp4`` next to it (``fkpd loop``'s layout)."""
    out = Path(out_dir)

    def write(clip: RolledClip) -> None:
        stem = out / f"p{clip.pair:04d}_{'ab'[clip.side]}"
        frames = clip.episode.frames
        if frames is not None and len(frames):
            clip.segment.video = str(write_video(frames, stem.with_suffix(".mp4"), fps=fps))
        clip.segment.save(stem.with_suffix(".npz"))

    return write


def collect_pairs(policy, envs: Sequence, reset_seeds: Sequence[int], segment_length: int = DEFAULT_SEGMENT_LENGTH,
                  seed: int = 0, out_dir: Path | str | None = None, render: bool = False, fps: int = 30,
                  task_id: str = "", start: int | None = None, progress=None) -> list[tuple[Segment, Segment]]:
    """Roll out one pair of clips per reset seed and cut one segment pair from each.

    :meth:`PairPlan.draw` with ``rng_seed=seed`` and :func:`rollout_pairs`: both clips
    of a pair start from the same reset seed and use different sampling-noise
    generators (DESIGN.md §3, "Pairs"), cut at the same steps (``start``, or a uniform
    draw from ``0 .. T−L`` per pair when None; the whole clip when ``T <= L``).

    Args:
        policy: the current :class:`fkpd.policy.DiffusionPolicy`.
        envs: environments of the policy's task (their count sets the batch size).
        reset_seeds: one reset seed per pair.
        segment_length: L, steps per segment.
        seed: seeds the segment starts and the sampling noise.
        out_dir: when given, segments are saved there as ``p{i:04d}_{a,b}.npz``
            (and ``.mp4`` clips when ``render``).
        render: render the segment steps to MP4 (needs ``out_dir``).
        fps: frame rate of the clips.
        task_id: recorded in each segment.
        start: first step of every segment (clipped to ``0 .. T−L``); None: random.
        progress: optional ``(clips done)`` callback.

    Returns:
        ``[(left, right), ...]``, one pair per reset seed.

    Raises:
        ValueError: ``segment_length < 1``, or ``render`` without ``out_dir``.
    """
    if render and out_dir is None:
        raise ValueError("render=True needs out_dir to write the clips to")
    plan = PairPlan.draw(reset_seeds, seed, int(envs[0].max_episode_steps), segment_length, start)
    sink = clip_files_writer(out_dir, fps) if out_dir is not None else None
    return rollout_pairs(policy, envs, plan, render=render, task_id=task_id, on_clip=sink, progress=progress)
