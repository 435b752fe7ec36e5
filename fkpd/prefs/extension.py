"""Extension clips: more pairs per rendered clip, from start states that have clips already.

DESIGN.md §3: a pair is two rollouts of the same policy version from the same reset seed
(same initial state), cut at the same steps. Nothing limits a reset seed to two clips: a
*group* of ``g`` clips of one version from one reset seed and segment start (the clips
of a round's pairs, :meth:`fkpd.store.Store.seed_groups`) gets one more clip (a new
sampling-noise seed, same start and length L), and the new clip makes ``g`` new pairs,
one with each clip of the group. A fresh pair costs two rendered clips; an extension
clip yields ``g >= 2`` pairs. Rendering is what limits the supply of pairs on a CPU
(issue #13), so the app's top-ups extend groups first (:mod:`fkpd.studio.topup`).

The plan (:func:`plan_extension`) is pure and deterministic, so a retried job that
recomputes it from the store re-renders the very clips the first attempt did not
register:

* **Which groups**: smallest first (every start state gets a 3rd clip before any gets a
  4th), ties by the group's first pair id (its place in the round), then reset seed;
  one clip at a time until the new pairs reach the number wanted. A group grows to at
  most :data:`MAX_CLIPS_PER_SEED` clips (K = 4: 6 pairs per start state), so a round's
  comparisons keep covering many start states. Groups whose clips do not record their
  segment start, and groups with a retired pair (a clip that could not be shown), are
  never extended.
* **Noise seed** of the group's clip number ``g`` (its existing clips are 0 .. g−1):
  :func:`extension_noise_seed` ``(reset_seed, g)``, drawn from
  ``numpy.random.default_rng((EXTENSION_SALT, reset_seed, g, attempt))`` with the first
  ``attempt`` (0, 1, ...) whose seed differs from every noise seed of the group.
* **Sides**: the new clip is the left clip of its ``j``-th new pair (partners in clip
  order: the group's clips, then clips this plan added to it before) when ``g + j`` is
  even, else the right one. Each extension alternates sides, and the extensions of a
  group start on alternate sides, so no side is systematically the newer clip's (2 of
  the 5 new pairs of a group grown from 2 to 4 clips have it on the left).

Shapes follow DESIGN.md §3: L segment length.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from fkpd.policy.rollout import ClipRequest
from fkpd.prefs.pairs import ClipSink, RolledClip, rollout_segments
from fkpd.prefs.segments import Segment
from fkpd.store.views import SeedGroup

#: K: most clips one group (one policy version, reset seed and segment start within a
#: round) may hold. 4 clips make 6 pairs per start state: more pairs per rendered clip,
#: while a round's comparisons still spread over many start states.
MAX_CLIPS_PER_SEED = 4
#: Mixed into the noise-seed draw of extension clips (:func:`extension_noise_seed`).
EXTENSION_SALT = 0x6578_7465  # "exte"


def extension_noise_seed(reset_seed: int, number: int, taken: Iterable[int] = ()) -> int:
    """The sampling-noise seed of clip ``number`` of the group of ``reset_seed``: in
    ``[0, 2**62)``, deterministic, and not in ``taken`` (the group's other noise seeds).

    Raises:
        ValueError: ``number < 0``.
    """
    if number < 0:
        raise ValueError(f"clip number must be >= 0, got {number}")
    taken = set(int(t) for t in taken)
    attempt = 0
    while True:
        seed = int(np.random.default_rng((EXTENSION_SALT, int(reset_seed) % 2**63, int(number), attempt))
                   .integers(0, 2**62))
        if seed not in taken:
            return seed
        attempt += 1


def new_clip_left(number: int, j: int) -> bool:
    """Whether clip ``number`` of a group is the left clip of its ``j``-th new pair."""
    return (int(number) + int(j)) % 2 == 0


@dataclass(frozen=True)
class ExtensionClip:
    """One more clip for a group, and the pairs it makes.

    Attributes:
        reset_seed: the group's reset seed.
        start: first step of the segment (the group's).
        length: L, steps of the segment (the group's).
        number: ``g``, the clip's number in its group (the group has ``g`` clips before it).
        noise_seed: its sampling-noise seed (:func:`extension_noise_seed`).
        partners: ids of the group's clips in the store, ascending.
        earlier: plan indices of the clips this plan adds to the group before this one.
    """

    reset_seed: int
    start: int
    length: int
    number: int
    noise_seed: int
    partners: tuple[int, ...]
    earlier: tuple[int, ...] = ()

    @property
    def new_pairs(self) -> int:
        """Pairs the clip makes: one with each clip of its group."""
        return len(self.partners) + len(self.earlier)

    def request(self, render: bool = True) -> ClipRequest:
        """The :class:`~fkpd.policy.rollout.ClipRequest`: rolled out to the segment's end,
        with frames (or states) from its start when ``render``."""
        return ClipRequest(self.reset_seed, self.noise_seed, max_steps=self.start + self.length,
                           render_from=self.start if render else None)

    def pairs(self, clip_id: int, planned: Mapping[int, int] | None = None) -> list[tuple[int, int]]:
        """The ``(left, right)`` clip ids of the new pairs, once the clip is registered as
        ``clip_id``; ``planned`` maps the plan indices in :attr:`earlier` to their clip ids.

        Raises:
            KeyError: an earlier clip of the plan is not in ``planned`` (register in plan order).
        """
        others = list(self.partners) + [int((planned or {})[i]) for i in self.earlier]
        return [(int(clip_id), o) if new_clip_left(self.number, j) else (o, int(clip_id))
                for j, o in enumerate(others)]


def extendable(group: SeedGroup, cap: int = MAX_CLIPS_PER_SEED) -> bool:
    """Whether ``group`` may get one more clip: it records its segment start, has no
    retired pair, and fewer than ``cap`` clips."""
    return group.start is not None and not group.retired and 0 < group.clips < cap


def plan_extension(groups: Sequence[SeedGroup], pairs: int, cap: int = MAX_CLIPS_PER_SEED) -> list[ExtensionClip]:
    """The extension clips that make at least ``pairs`` new pairs (fewer when the groups
    fill up first), by the rule of the module docstring.

    Args:
        groups: the round's groups of one version (:meth:`fkpd.store.Store.seed_groups`).
        pairs: new pairs wanted (0: none).
        cap: K, most clips per group (>= 2).

    Returns:
        The clips in the order to roll them out and register them (an earlier clip of the
        same group comes first); empty when no group has room.

    Raises:
        ValueError: ``pairs < 0`` or ``cap < 2``.
    """
    if isinstance(pairs, bool) or int(pairs) != pairs or pairs < 0:
        raise ValueError(f"pairs must be an integer >= 0, got {pairs!r}")
    if isinstance(cap, bool) or int(cap) != cap or cap < 2:
        raise ValueError(f"the cap on clips per reset seed must be an integer >= 2, got {cap!r}")
    heap = [(g.clips, g.first_pair, g.reset_seed, k) for k, g in enumerate(groups) if extendable(g, cap)]
    heapq.heapify(heap)
    added: dict[int, list[int]] = {}  # group -> plan indices of its new clips
    taken: dict[int, set[int]] = {}  # group -> its noise seeds
    plan: list[ExtensionClip] = []
    made = 0
    while heap and made < pairs:
        clips, first_pair, reset_seed, k = heapq.heappop(heap)
        group = groups[k]
        seeds = taken.setdefault(k, set(group.noise_seeds))
        noise = extension_noise_seed(reset_seed, clips, seeds)
        seeds.add(noise)
        plan.append(ExtensionClip(int(reset_seed), int(group.start), int(group.length), int(clips), noise,
                                  tuple(group.clip_ids), tuple(added.get(k, ()))))
        added.setdefault(k, []).append(len(plan) - 1)
        made += clips
        if clips + 1 < cap:
            heapq.heappush(heap, (clips + 1, first_pair, reset_seed, k))
    return plan


def rollout_extension(policy, envs: Sequence, plan: Sequence[ExtensionClip], *, render: bool = True,
                      task_id: str = "", on_clip: ClipSink | None = None,
                      progress: Callable[[int], None] | None = None, record: str = "frames") -> list[Segment]:
    """Roll out the clips of ``plan`` ``len(envs)`` at a time and cut each at its group's
    start and length (:func:`fkpd.prefs.pairs.rollout_segments`).

    Args:
        policy: the served :class:`fkpd.policy.DiffusionPolicy` (the groups' version).
        envs: environments of its task, built with the horizon the groups were rolled out at.
        plan: from :func:`plan_extension`.
        render, task_id, progress, record: as :func:`fkpd.prefs.pairs.rollout_pairs`.
        on_clip: optional :data:`~fkpd.prefs.pairs.ClipSink`; clip ``i`` of the plan
            arrives as ``RolledClip(pair=i, side=0, ...)``, in plan order.

    Returns:
        One segment (L steps) per clip, in plan order.
    """
    requests = [c.request(render) for c in plan]
    return rollout_segments(policy, envs, requests, [(c.start, c.length) for c in plan], task_id=task_id,
                            on_clip=on_clip, progress=progress, record=record,
                            clip_of=lambda i, req, ep, seg: RolledClip(i, 0, req, ep, seg))


__all__ = ["EXTENSION_SALT", "MAX_CLIPS_PER_SEED", "ExtensionClip", "extendable", "extension_noise_seed",
           "new_clip_left", "plan_extension", "rollout_extension"]
