"""Dataset pairs: segments of the offline dataset as a label source, and their replay for people.

The released code of the FKPD paper (DESIGN.md §2, "Two forms of the objective") labels
pairs of *offline dataset* segments, not rollouts of the current policy.
:class:`DatasetPairSource` makes such pairs for the round engine
(:class:`fkpd.train.engine.RoundEngine`), so the scripted teachers (``fkpd loop
--label-source dataset|mix``) and people (the app's ``dataset_share``) label them like any
other pair.

**A pair** is two segments of L consecutive steps from two *different* episodes of the
dataset, cut at the same step of both episodes (like the two clips of a rollout pair,
DESIGN.md §3). With ``same_reset_seed=True`` both episodes also share their reset seed
(``infos/reset_seed``), so the comparison starts from one initial state; that needs a
dataset with several episodes per reset seed. Generated data
(:func:`fkpd.data.generate_dataset`) has one episode per reset seed, and D4RL's files
have no reset seeds at all: there :class:`DatasetPairSource` refuses
``same_reset_seed=True`` with a :class:`DatasetPairError` that says so (the default,
``False``, pairs any two episodes). Episodes shorter than L are never used.

**Seed rule** (reproducible, and disjoint between the rounds of a run like
:meth:`fkpd.prefs.pairs.PairPlan.for_round`):

* the *episode pairs* come from one sequence per run: a round-robin schedule (the
  circle method) over the eligible episodes, shuffled by
  ``numpy.random.default_rng([STREAM, seed, 0, c])`` for cycle ``c`` = 0, 1, ...; with
  ``same_reset_seed`` one schedule per reset-seed group, the groups taking turns. Any
  E/2 consecutive items use each episode at most once, and a cycle holds every
  eligible pair once (E(E−1)/2 of them), after which a new shuffle begins and pairs
  repeat (with new sides and starts);
* pair ``i`` of round ``r`` is item ``(r−1)·n + i`` of that sequence, ``n`` the pairs
  per round (``stride``, default ``pairs``), so the rounds of a run use disjoint
  episode pairs until a cycle is used up. More pairs for a round that has ``n``
  already (``first + i >= n``: the app's top-up pairs) are items ``first + i − n`` of
  the round's own sequence, shuffled by ``default_rng([STREAM, seed, 2, r])``: distinct
  among themselves, but not guaranteed disjoint from the round's batch or other rounds;
* per pair, in order, from ``numpy.random.default_rng([STREAM, seed, 1, r, first])``:
  which episode is shown left (a fair coin), then the segment start: a fixed ``start``
  (clipped to ``0 .. min(T_a, T_b) − L``), or with ``start=None`` one uniform draw from
  that range (the draw happens either way).

**Replay for people.** Annotators cannot watch arrays, so a dataset segment is rendered
by replaying the episode's stored actions from its stored reset seed in the task's
environment (:class:`DatasetReplay`), recording frames from the segment's start. The
replay is trusted only when it reproduces the stored observations (within ``atol``, in
the observation's own units: metres on MetaWorld) at every step up to the segment's end;
otherwise — actions or observations recorded with noise, another simulator version, no
reset seeds — it raises :class:`ReplayError`, and the dataset is not used for rendering.
:meth:`DatasetReplay.check` replays whole episodes up front, so a dataset is refused
before a round starts rather than halfway through a batch.

Shapes follow DESIGN.md §3: L segment length, Do/Da observation/action dims, E episodes.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Sequence

import numpy as np

from fkpd.data import OfflineDataset
from fkpd.envs import DEFAULT_RENDER_SIZE, make_env
from fkpd.errors import DatasetError
from fkpd.policy.rollout import ClipRequest, Episode
from fkpd.prefs.pairs import ClipSink, PairSource, RolledClip, close_envs
from fkpd.prefs.segments import Segment

#: First entropy word of the dataset-pair generators (keeps them apart from other streams).
STREAM = 0x44415441  # "DATA"
#: Default tolerance of the replay check, in observation units (MetaWorld: metres).
REPLAY_ATOL = 1e-3


class DatasetPairError(DatasetError):
    """The dataset cannot give the pairs asked for (too few long-enough episodes, or no
    reset seed shared by two episodes when ``same_reset_seed`` is asked)."""


class ReplayError(DatasetError):
    """Replaying a dataset episode's actions from its reset seed does not reproduce its
    stored observations (or the dataset has no reset seeds): the dataset cannot be
    rendered for people."""


def _entropy(seed: int) -> int:
    return int(seed) % 2**63


def _circle(members: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Every unordered pair of ``members`` once, by the circle method: M − 1 rounds of
    M/2 disjoint pairs (M = len, padded to even with a bye that is skipped)."""
    items: list[int | None] = list(members)
    if len(items) % 2:
        items.append(None)
    m = len(items)
    fixed, rot = items[-1], items[:-1]
    for d in range(m - 1):
        day = [(rot[d % (m - 1)], fixed)] + [(rot[(d + s) % (m - 1)], rot[(d - s) % (m - 1)])
                                              for s in range(1, m // 2)]
        for a, b in day:
            if a is not None and b is not None:
                yield a, b


class DatasetPairSource(PairSource):
    """Pairs of L-step segments of an offline dataset, from different episodes (see the
    module docstring for the pairing and seed rules).

    Args:
        dataset: the offline dataset (``infos/success`` gives the segments' per-step
            success flags, else all False; ``infos/reset_seed`` their reset seed, else −1).
        pairs: pairs per round (>= 1).
        length: L, steps per segment (>= 1).
        seed: the run's seed.
        start: first step of both segments of every pair (clipped to fit both episodes);
            None draws one per pair.
        same_reset_seed: pair only episodes that share a reset seed.
        render: replay each segment to record frames (needs ``replay``, or ``task_id``
            to build the default :class:`DatasetReplay`).
        task_id: recorded in each segment; the task replayed in.
        replay: the replayer used when ``render``.
        first: index of the first pair in its round (more pairs for a round that has
            ``first`` dataset pairs already).
        stride: dataset pairs per round's batch, which the rounds' blocks of the
            sequence are spaced by (default ``pairs``).

    Raises:
        DatasetPairError: fewer than two episodes of at least L steps, or, with
            ``same_reset_seed``, no reset seed shared by two such episodes (the message
            says how many episodes and reset seeds the dataset has).
        ValueError: ``pairs < 1``, ``length < 1``, ``first < 0`` or ``stride < 1``.
    """

    def __init__(self, dataset: OfflineDataset, pairs: int, length: int, seed: int = 0, start: int | None = 0,
                 same_reset_seed: bool = False, render: bool = False, task_id: str = "",
                 replay: "DatasetReplay | None" = None, first: int = 0, stride: int | None = None) -> None:
        stride = int(pairs) if stride is None else int(stride)
        if int(pairs) < 1 or int(length) < 1 or int(first) < 0 or stride < 1:
            raise ValueError(f"need pairs, length, stride >= 1 and first >= 0, got pairs={pairs!r}, "
                             f"length={length!r}, first={first!r}, stride={stride!r}")
        self.ds, self.pairs, self.length, self.seed = dataset, int(pairs), int(length), int(seed)
        self.first, self.stride = int(first), stride
        self.start, self.same_reset_seed, self.task_id = start, bool(same_reset_seed), task_id
        self.render = bool(render)
        self.replay = replay if replay is not None or not render else DatasetReplay(task_id)
        starts, ends = dataset.episode_starts, dataset.episode_ends
        self.lengths = (ends - starts).astype(np.int64)
        eligible = np.flatnonzero(self.lengths >= self.length)
        where = f"dataset {str(dataset.path) if dataset.path else '(in memory)'}"
        if len(eligible) < 2:
            raise DatasetPairError(
                f"{where} has {len(eligible)} episode(s) of at least L = {self.length} steps (of "
                f"{dataset.num_episodes}); dataset pairs need two. Use a shorter segment length or more data.")
        seeds = dataset.infos.get("reset_seed")
        if self.same_reset_seed:
            if seeds is None:
                raise DatasetPairError(
                    f"{where} has no infos/reset_seed, so no two episodes are known to share a reset seed; "
                    "pair episodes from any reset seed (same_reset_seed=False, `fkpd loop` without "
                    "--dataset-same-seed)")
            ep_seeds = np.asarray(seeds)[starts[eligible]]
            groups = [eligible[ep_seeds == s] for s in np.unique(ep_seeds)]
            self.groups = [g for g in groups if len(g) >= 2]
            if not self.groups:
                raise DatasetPairError(
                    f"{where} has {len(eligible)} episodes of at least {self.length} steps but one episode per reset "
                    f"seed ({len(groups)} reset seeds), so no pair can share a reset seed; generated data has one "
                    "episode per seed. Pair episodes from any reset seed (same_reset_seed=False, `fkpd loop` "
                    "without --dataset-same-seed)")
        else:
            self.groups = [eligible]

    @property
    def candidates(self) -> int:
        """Distinct episode pairs one cycle of the sequence holds."""
        return sum(len(g) * (len(g) - 1) // 2 for g in self.groups)

    def episode_pairs(self, key: tuple[int, ...] = (0,)) -> Iterator[tuple[int, int]]:
        """An endless sequence of episode pairs ``(i, j)`` (episode indices): the run's
        (``key = (0,)``) or round r's own (``key = (2, r)``); see the module docstring."""
        for cycle in itertools.count():
            rng = np.random.default_rng([STREAM, _entropy(self.seed), *key, cycle])
            order = rng.permutation(len(self.groups))
            streams = [_circle([int(e) for e in rng.permutation(self.groups[g])]) for g in order]
            while streams:
                alive = []
                for s in streams:
                    pair = next(s, None)
                    if pair is not None:
                        alive.append(s)
                        yield pair
                streams = alive

    def plan(self, round_: int) -> list[tuple[int, int, int]]:
        """Round ``round_``'s pairs as ``(left episode, right episode, start)``.

        Returns:
            ``pairs`` triples; ``start`` is the first step of both segments within their
            episodes (``0 <= start <= min(T_left, T_right) − L``).
        """
        r, lo, hi = max(int(round_), 1), self.first, self.first + self.pairs
        base = (r - 1) * self.stride
        chosen = list(itertools.islice(self.episode_pairs(), base + min(lo, self.stride),
                                       base + min(hi, self.stride)))
        if hi > self.stride:
            chosen += itertools.islice(self.episode_pairs((2, r)), max(lo - self.stride, 0), hi - self.stride)
        rng = np.random.default_rng([STREAM, _entropy(self.seed), 1, r, self.first])
        out = []
        for i, j in chosen:
            if rng.random() < 0.5:
                i, j = j, i
            top = int(min(self.lengths[i], self.lengths[j])) - self.length
            drawn = int(rng.integers(0, top + 1))
            s = drawn if self.start is None else min(max(int(self.start), 0), top)
            out.append((i, j, s))
        return out

    def segment(self, episode: int, start: int) -> Segment:
        """The L-step segment of ``episode`` from its step ``start``."""
        ds = self.ds
        r0 = int(ds.episode_starts[episode]) + int(start)
        rows = slice(r0, r0 + self.length)
        success = ds.infos.get("success")
        seeds = ds.infos.get("reset_seed")
        return Segment(ds.observations[rows], ds.actions[rows], ds.rewards[rows],
                       np.zeros(self.length, bool) if success is None else np.asarray(success[rows], bool),
                       reset_seed=-1 if seeds is None else int(seeds[r0]), start=int(start), task_id=self.task_id)

    def make_pairs(self, policy, round_: int, *, on_clip: ClipSink | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[tuple[Segment, Segment]]:
        """Round ``round_``'s dataset pairs (``policy`` is not used). With ``render``, each
        clip is replayed (frames from the segment's start, L + 1 of them) before
        ``on_clip`` sees it.

        Raises:
            ReplayError: with ``render``, a replay that does not reproduce the stored
                observations; nothing after that clip is written.
        """
        plan = self.plan(round_)
        total, done = 2 * len(plan), 0
        pairs: list[tuple[Segment, Segment]] = []
        try:
            for k, (i, j, s) in enumerate(plan):
                segs = []
                for side, e in enumerate((i, j)):
                    seg = self.segment(e, s)
                    if on_clip is not None:
                        if self.render:
                            episode = self.replay.replay(self.ds, e, s + self.length, render_from=s)
                        else:
                            episode = self._stored_episode(e, s + self.length)
                        request = ClipRequest(seg.reset_seed, -1, max_steps=s + self.length,
                                              render_from=s if self.render else None)
                        row = int(self.ds.episode_starts[e]) + s
                        on_clip(RolledClip(k, side, request, episode, seg,
                                           meta={"source": "dataset", "episode": int(e), "dataset_row": row,
                                                 "dataset_reset_seed": seg.reset_seed, "noise_seed": None},
                                           shared_start=self.same_reset_seed))
                    segs.append(seg)
                    done += 1
                    if progress is not None:
                        progress(done, total)
                pairs.append((segs[0], segs[1]))
        finally:
            if self.replay is not None:
                self.replay.close()
        return pairs

    def _stored_episode(self, episode: int, stop: int) -> Episode:
        """The first ``stop`` stored steps of ``episode`` as an :class:`Episode` (no frames)."""
        ds = self.ds
        r0 = int(ds.episode_starts[episode])
        rows = slice(r0, r0 + stop)
        success = ds.infos.get("success")
        seeds = ds.infos.get("reset_seed")
        return Episode(-1 if seeds is None else int(seeds[r0]), ds.observations[rows], ds.actions[rows],
                       ds.rewards[rows], np.zeros(stop, bool) if success is None else np.asarray(success[rows], bool))


class DatasetReplay:
    """Replays dataset episodes in the task's environment: their stored actions from their
    stored reset seed, checked against their stored observations.

    Args:
        task_id: the task the dataset was recorded on.
        render_size: ``(height, width)`` of the frames in pixels.
        camera: camera name (None: the task's default).
        atol: largest absolute difference allowed between a replayed and a stored
            observation, in observation units (MetaWorld: metres); the stored ones are
            float32, so an exact simulator still differs by about 1e-7.

    The environment is made on first use with a horizon of the longest episode and kept
    until :meth:`close`.
    """

    def __init__(self, task_id: str, render_size: tuple[int, int] = DEFAULT_RENDER_SIZE, camera: str | None = None,
                 atol: float = REPLAY_ATOL) -> None:
        self.task_id, self.render_size, self.camera, self.atol = task_id, tuple(render_size), camera, float(atol)
        self._env = None
        self._horizon = 0

    def _env_for(self, steps: int):
        if self._env is None or self._horizon < steps:
            self.close()
            self._env = make_env(self.task_id, max_episode_steps=int(steps), render_size=self.render_size,
                                 camera=self.camera)
            self._horizon = int(steps)
        return self._env

    def replay(self, ds: OfflineDataset, episode: int, stop: int | None = None,
               render_from: int | None = None) -> Episode:
        """Replay the first ``stop`` steps of ``episode`` and check its observations.

        Args:
            ds: the dataset.
            episode: index of the episode (0 .. E−1).
            stop: steps to replay (default: the whole episode).
            render_from: record frames from this step on (frame ``k`` shows the state
                before action ``render_from + k``; ``stop − render_from + 1`` frames).

        Returns:
            The replayed :class:`Episode`: observations (stop, Do) as replayed, the
            stored actions (stop, Da), the replayed rewards and success flags, frames
            (when ``render_from`` is given) as (F, H, W, 3) uint8.

        Raises:
            ReplayError: the dataset has no ``infos/reset_seed``, or a replayed
                observation differs from the stored one by more than ``atol`` (the
                message names the episode, the step and the difference).
        """
        seeds = ds.infos.get("reset_seed")
        where = f"dataset {str(ds.path) if ds.path else '(in memory)'}"
        if seeds is None:
            raise ReplayError(
                f"{where} has no infos/reset_seed, so its episodes cannot be replayed from their initial state; it "
                "cannot be rendered for people. Use dataset pairs only with a scripted teacher (fkpd loop), or "
                "data generated by `fkpd data generate` (it records reset seeds)")
        r0, r1 = int(ds.episode_starts[episode]), int(ds.episode_ends[episode])
        stop = r1 - r0 if stop is None else min(int(stop), r1 - r0)
        reset_seed = int(seeds[r0])
        env = self._env_for(r1 - r0)
        obs, _ = env.reset(seed=reset_seed)
        stored = ds.observations[r0:r0 + stop]
        rows_o, rows_r, rows_s, frames = [], [], [], []
        for t in range(stop):
            if render_from is not None and t >= render_from:
                frames.append(env.render())
            o = np.asarray(obs, np.float32)
            err = float(np.max(np.abs(o - stored[t]))) if o.shape == stored[t].shape else float("inf")
            if not err <= self.atol:
                raise ReplayError(
                    f"{where}: replaying episode {episode} (reset seed {reset_seed}) from its stored actions does "
                    f"not reproduce its stored observations: at step {t} they differ by {err:.3g} (tolerance "
                    f"{self.atol:g}). The data was not recorded deterministically in this environment (noise in "
                    "the stored actions or observations, another simulator version); it cannot be rendered for "
                    "people. Use it only with a scripted teacher, or set dataset_share to 0")
            obs, reward, _terminated, _truncated, info = env.step(ds.actions[r0 + t])
            rows_o.append(o)
            rows_r.append(reward)
            rows_s.append(bool(info["success"]))
        if render_from is not None and stop >= render_from:
            frames.append(env.render())
        return Episode(reset_seed, np.asarray(rows_o, np.float32).reshape(stop, -1), ds.actions[r0:r0 + stop],
                       np.asarray(rows_r, np.float32), np.asarray(rows_s, bool),
                       np.asarray(frames, np.uint8) if render_from is not None else None)

    def check(self, ds: OfflineDataset, episodes: int = 2) -> None:
        """Replay the first ``episodes`` episodes whole (no frames) and check them.

        Raises:
            ReplayError: see :meth:`replay`.
        """
        try:
            for e in range(min(int(episodes), ds.num_episodes)):
                self.replay(ds, e)
        finally:
            self.close()

    def close(self) -> None:
        """Close the environment (a new one is made on the next replay)."""
        if self._env is not None:
            close_envs([self._env])
            self._env, self._horizon = None, 0
