"""Active query selection: roll out a candidate pool larger than the batch, show the pairs
an acquisition rule picks (issue #13, point 4).

Without selection every pair of a batch is two rollouts of the current policy from one
reset seed (:class:`fkpd.prefs.pairs.RolloutPairSource`). With it,
:class:`AcquisitionPairSource` rolls out ``c·n`` candidate pairs (``c`` the *candidate
factor*, :meth:`fkpd.prefs.pairs.PairPlan.pool`), scores them, and hands the ``n`` best
to the labeller. Rules (:data:`QUERY_SELECTIONS`):

* ``uniform`` — no selection: the batch is exactly today's pairs (same reset seeds,
  noise seeds and segments; nothing extra is rolled out). The default.
* ``disagreement`` — the pairs whose preference the current model is least sure of
  (:func:`disagreement_scores`): the model's preference probability σ(z), averaged over
  K (t, ε) draws, nearest ½, where z is DPO's implicit-reward margin
  (:func:`fkpd.train.losses.dpo_terms`, the quantity the trainer's implicit accuracy
  counts): a margin near zero, or draws that disagree in sign. Christiano et al.,
  "Deep Reinforcement Learning from Human Preferences", NeurIPS 2017 (queries where an
  ensemble of reward predictors disagrees), and Lee, Smith & Abbeel, "PEBBLE", ICML 2021
  (disagreement sampling: the std of the predicted preference probability over an
  ensemble); here the K noise draws of the diffusion likelihood proxy stand in for the
  ensemble, since the implicit reward model is the policy itself.
* ``diversity`` — the pairs whose two clips differ most in the states they visit
  (:func:`diversity_scores`): a symmetric nearest-neighbour (k = 1) distance between the
  two clips' state sets, after standardising each state dimension over the pool — the
  k-NN particle distance PEBBLE uses for its state-entropy exploration (Lee, Smith &
  Abbeel, ICML 2021, §4.1, after Singh et al. 2003 and Liu & Abbeel 2021). Note that
  PEBBLE's own *entropy-based sampling* ranks queries by the entropy of the predicted
  preference, not of states; choosing pairs for how different they are follows the
  diversity criterion of batch active preference learning (Bıyık & Sadigh, "Batch Active
  Preference-Based Learning of Reward Functions", CoRL 2018).

Ties keep pool order, and layer 0 of the pool is today's batch: a rule that cannot tell
candidates apart picks today's pairs. In particular ``disagreement`` while the policy is
the reference (round 1: π_0 = π_ref, every margin is exactly 0) rolls out no pool and
returns today's pairs.

Only the chosen pairs are rendered: the pool is rolled out without frames, the chosen
pairs are rolled out again from their reset and noise seeds with frames (when the base
source renders), and those re-rolled segments are what is shown and labelled. Batched
sampling is not bit-identical across batch compositions, so a re-rolled clip may differ
from its candidate by float rounding; the score was computed on the candidate.

Shapes follow DESIGN.md §3: C candidate pairs, n chosen pairs, K draws, L segment length,
Do observation dim.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from fkpd.policy import DiffusionPolicy
from fkpd.prefs.pairs import (MAX_CANDIDATE_FACTOR, ClipSink, PairPlan, PairSource, RolledClip, RolloutPairSource,
                              close_envs, pair_seed, rollout_pairs)
from fkpd.prefs.segments import Segment
from fkpd.train.align import AlignConfig, PairWindows
from fkpd.train.losses import dpo_terms

log = logging.getLogger(__name__)

#: Acquisition rules, the first the default.
QUERY_SELECTIONS = ("uniform", "disagreement", "diversity")
#: Candidates rolled out per shown pair by default.
DEFAULT_CANDIDATE_FACTOR = 3
#: (t, ε) draws per candidate for ``disagreement``.
DEFAULT_DRAWS = 4


def check_selection(rule: str, factor: int) -> None:
    """Check an acquisition rule and candidate factor.

    Raises:
        ValueError: ``rule`` not in :data:`QUERY_SELECTIONS`, or ``factor`` not an
            integer from 1 to :data:`~fkpd.prefs.pairs.MAX_CANDIDATE_FACTOR`. Callers that take
            them from users say which flag or setting was wrong.
    """
    if rule not in QUERY_SELECTIONS:
        raise ValueError(f"query selection must be one of {', '.join(QUERY_SELECTIONS)}, got {rule!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or not 1 <= factor <= MAX_CANDIDATE_FACTOR:
        raise ValueError(f"candidate factor must be an integer from 1 to {MAX_CANDIDATE_FACTOR}, got {factor!r}")


# ------------------------------------------------------------------ scores


@torch.no_grad()
def implicit_margins(policy: DiffusionPolicy, reference: DiffusionPolicy, pairs: Sequence[tuple[Segment, Segment]],
                     beta: float = AlignConfig.beta, draws: int = DEFAULT_DRAWS, seed: int = 0,
                     batch_pairs: int = 32) -> np.ndarray:
    """The implicit-reward margin z of every pair, ``draws`` times.

    z = −(β/2)·[(m_θ(a) − m_ref(a)) − (m_θ(b) − m_ref(b))] for the pair ``(a, b)``, as
    the trainer computes it (:func:`fkpd.train.losses.dpo_terms`, windows by
    :class:`fkpd.train.align.PairWindows` with the reference's normalisers), with a
    fresh shared (t, ε) per draw. z > 0: the model prefers ``a``.

    Args:
        policy: π_θ, the version the pairs were rolled out with.
        reference: π_ref.
        pairs: C unlabelled pairs ``(a, b)``.
        beta: β of the implicit reward (the trainer's).
        draws: K ≥ 1.
        seed: seeds the draws.
        batch_pairs: pairs per forward pass.

    Returns:
        (C, K) float64.

    Raises:
        PreferenceError: segments of another task or size than the policy's.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    windows = PairWindows([(a, b, 1.0) for a, b in pairs], reference)
    gen = torch.Generator().manual_seed(int(seed))
    out = np.zeros((len(windows), int(draws)))
    for b0 in range(0, len(windows), batch_pairs):
        idx = torch.arange(b0, min(b0 + batch_pairs, len(windows)))
        batch = windows.batch(idx).to(policy.device)
        for k in range(int(draws)):
            out[b0:b0 + len(idx), k] = dpo_terms(policy, reference, batch, beta, generator=gen).z.double().cpu().numpy()
    return out


def disagreement_scores(z: np.ndarray) -> np.ndarray:
    """How sure the model is of each pair's preference: |p̄ − ½|, with p̄ = mean over the K
    draws of σ(z_k), the model's probability that the first clip is preferred
    (Bradley-Terry on the implicit reward, as in DPO).

    Lower is less sure (chosen first): p̄ is near ½ when the margin is near zero, or when
    the draws disagree in sign (a high variance of z); ranking by it is ranking by the
    entropy of the predicted preference. The K (t, ε) draws play the ensemble members of
    Christiano et al. 2017 and of PEBBLE's disagreement sampling (Lee et al. 2021), see
    the module docstring. θ = ref (every z = 0) gives 0 for every pair.

    Args:
        z: (C, K) margins (:func:`implicit_margins`).

    Returns:
        (C,) float64 in [0, ½].

    Raises:
        ValueError: ``z`` is not (C, K) with K >= 1.
    """
    z = np.asarray(z, np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise ValueError(f"z must be (C, K) with K >= 1, got shape {z.shape}")
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow
    return np.abs(p.mean(1) - 0.5)


def clip_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric nearest-neighbour distance between two sets of states:
    ½·[mean_i min_j ‖a_i − b_j‖ + mean_j min_i ‖b_j − a_i‖] (a Chamfer distance; the k = 1
    particle distance of PEBBLE's state-entropy estimate, Lee et al. 2021).

    Args:
        a: (La, Do), b: (Lb, Do) states, already scaled.

    Returns:
        >= 0; 0 exactly when the two sets hold the same states.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)  # (La, Lb)
    return float(0.5 * (d.min(1).mean() + d.min(0).mean()))


def diversity_scores(pairs: Sequence[tuple[Segment, Segment]]) -> np.ndarray:
    """How differently the two clips of each pair behave: :func:`clip_distance` of their
    observations, each dimension divided by its standard deviation over every state of
    the pool (constant dimensions count 0). Higher is more different (chosen first).
    Lee et al. 2021 (PEBBLE, k-NN state distances); Bıyık & Sadigh 2018 (diverse
    queries), see the module docstring.

    Args:
        pairs: C pairs ``(a, b)`` of one task.

    Returns:
        (C,) float64, >= 0.
    """
    if not pairs:
        return np.zeros(0)
    states = np.concatenate([s.observations for pair in pairs for s in pair]).astype(np.float64)
    std = states.std(0)
    scale = np.where(std > 1e-12, 1.0 / np.where(std > 1e-12, std, 1.0), 0.0)
    return np.array([clip_distance(a.observations * scale, b.observations * scale) for a, b in pairs])


def choose(scores: np.ndarray, n: int, largest: bool) -> np.ndarray:
    """The ``n`` best candidates by ``scores`` (largest or smallest first, ties in pool
    order), returned in pool order.

    Raises:
        ValueError: ``n`` larger than the pool.
    """
    scores = np.asarray(scores, np.float64)
    if not 0 <= n <= len(scores):
        raise ValueError(f"cannot choose {n} of {len(scores)} candidates")
    order = np.argsort(-scores if largest else scores, kind="stable")
    return np.sort(order[:n])


def same_weights(a: DiffusionPolicy, b: DiffusionPolicy) -> bool:
    """Whether two policies have the same weights and normalisers (θ = ref)."""
    if a is b:
        return True
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


# ------------------------------------------------------------------ the pair source


@dataclass
class Selection:
    """What one batch's selection did.

    Attributes:
        rule: the acquisition rule.
        candidates: C, pairs rolled out to choose from (n when none were extra).
        chosen: (n,) pool index of each shown pair, in batch order.
        scores: (C,) the rule's score of each candidate (None for ``uniform``).
        note: why the pool was skipped, or "".
    """

    rule: str
    candidates: int
    chosen: np.ndarray
    scores: np.ndarray | None = None
    note: str = ""

    def summary(self) -> dict[str, Any]:
        """A JSON-able record: rule, candidates, chosen indices, mean score of the chosen
        and of all candidates (finite scores only), note."""
        out: dict[str, Any] = {"rule": self.rule, "candidates": int(self.candidates),
                               "chosen": [int(k) for k in self.chosen], "note": self.note}
        if self.scores is not None:
            def mean(v):
                v = v[np.isfinite(v)]
                return float(v.mean()) if len(v) else None
            out.update(score_chosen=mean(self.scores[self.chosen]), score_pool=mean(self.scores))
        return out


class AcquisitionPairSource(PairSource):
    """Current-policy pairs chosen from a candidate pool by an acquisition rule (see the
    module docstring).

    Args:
        base: the rollout source of the batch (its envs, pairs n, length, seed, start,
            render, task id and first index); with ``uniform`` it is used as it is.
        rule: one of :data:`QUERY_SELECTIONS`.
        factor: c, candidates per shown pair (1 .. 10; 1 rolls out no extra pair).
        reference: π_ref (a policy or its checkpoint directory); needed by
            ``disagreement``.
        beta: β of the implicit reward (the rounds' β).
        draws: K, (t, ε) draws per candidate for ``disagreement``.

    Attributes:
        last: the :class:`Selection` of the latest batch (None before one).

    Raises:
        ValueError: a bad rule or factor, or ``disagreement`` without a reference.
    """

    def __init__(self, base: RolloutPairSource, rule: str = "uniform", factor: int = DEFAULT_CANDIDATE_FACTOR,
                 reference: DiffusionPolicy | Path | str | None = None, beta: float = AlignConfig.beta,
                 draws: int = DEFAULT_DRAWS) -> None:
        check_selection(rule, factor)
        if rule == "disagreement" and reference is None:
            raise ValueError("query selection 'disagreement' needs the reference policy (π_ref) for the implicit "
                             "reward")
        self.base, self.rule, self.factor, self.reference = base, rule, int(factor), reference
        self.beta, self.draws = float(beta), int(draws)
        self.pairs = base.pairs
        self.last: Selection | None = None

    def _reference(self, policy: DiffusionPolicy) -> DiffusionPolicy:
        if not isinstance(self.reference, DiffusionPolicy):
            self.reference = DiffusionPolicy.load(self.reference, task_id=self.base.task_id or None,
                                                  device=policy.device)
        return self.reference

    def make_pairs(self, policy, round_: int, *, on_clip: ClipSink | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[tuple[Segment, Segment]]:
        base, n = self.base, self.base.pairs
        if self.rule == "uniform" or self.factor == 1:
            self.last = Selection(self.rule, n, np.arange(n))
            return base.make_pairs(policy, round_, on_clip=on_clip, progress=progress)
        if self.rule == "disagreement" and same_weights(policy, self._reference(policy)):
            self.last = Selection(self.rule, n, np.arange(n), note="the policy is the reference: every margin is 0, "
                                                                   "so the pairs are uniform's")
            return base.make_pairs(policy, round_, on_clip=on_clip, progress=progress)
        envs = base.envs(2 * n) if callable(base.envs) else base.envs
        try:
            pool = PairPlan.pool(base.seed, round_, n, int(envs[0].max_episode_steps), base.length, base.start,
                                 first=base.first, factor=self.factor)
            total = 2 * len(pool) + (2 * n if base.render else 0)
            step = None if progress is None else (lambda done: progress(done, total))
            clips: dict[tuple[int, int], RolledClip] = {}
            candidates = rollout_pairs(policy, envs, pool, render=False, task_id=base.task_id, progress=step,
                                       on_clip=lambda c: clips.__setitem__((c.pair, c.side), c))
            chosen, scores = self._choose(policy, candidates, n, round_)
            if base.render:  # roll the chosen pairs out again, rendering them (only they are rendered)
                done = 2 * len(pool)
                record = {"record": base.record} if hasattr(base, "record") else {}  # frames, or physics states
                pairs = rollout_pairs(policy, envs, pool.take(chosen), render=True, task_id=base.task_id,
                                      on_clip=on_clip, **record,
                                      progress=None if progress is None else (lambda d: progress(done + d, total)))
            else:
                pairs = [candidates[int(c)] for c in chosen]
                if on_clip is not None:
                    for k, c in enumerate(chosen):
                        for side in (0, 1):
                            clip = clips[(int(c), side)]
                            clip.pair = k
                            on_clip(clip)
        finally:
            if callable(base.envs):
                close_envs(envs)
        self.last = Selection(self.rule, len(pool), chosen, scores)
        log.info("round %d: %s chose %d of %d candidate pairs", round_, self.rule, n, len(pool))
        return pairs

    def _choose(self, policy, candidates, n: int, round_: int) -> tuple[np.ndarray, np.ndarray]:
        if self.rule == "disagreement":
            z = implicit_margins(policy, self._reference(policy), candidates, self.beta, self.draws,
                                 seed=pair_seed(self.base.seed, round_, self.base.first))
            scores = disagreement_scores(z)
            return choose(scores, n, largest=False), scores
        scores = diversity_scores(candidates)
        return choose(scores, n, largest=True), scores


def select_pairs(base: RolloutPairSource, rule: str = "uniform", factor: int = DEFAULT_CANDIDATE_FACTOR,
                 reference: DiffusionPolicy | Path | str | None = None, beta: float = AlignConfig.beta
                 ) -> PairSource:
    """``base`` itself for ``uniform`` (so today's batches are unchanged, object and all),
    else an :class:`AcquisitionPairSource` over it.

    Raises:
        ValueError: as :class:`AcquisitionPairSource`.
    """
    check_selection(rule, factor)
    if rule == "uniform":
        return base
    return AcquisitionPairSource(base, rule, factor, reference, beta)


__all__ = ["DEFAULT_CANDIDATE_FACTOR", "DEFAULT_DRAWS", "QUERY_SELECTIONS", "AcquisitionPairSource", "Selection",
           "check_selection", "choose", "clip_distance", "disagreement_scores", "diversity_scores",
           "implicit_margins", "same_weights", "select_pairs"]
