"""Teachers: who labels a pair of segments, behind one interface shared with humans.

Every labeller, scripted or human, answers a pair ``(left, right)`` with one of the
outcomes ``"left"``, ``"right"``, ``"equal"`` or ``"skip"`` (the values of
:class:`fkpd.store.Outcome`, which the Streamlit page stores for annotators). Two
functions, and only these, turn outcomes into training labels (DESIGN.md §3):

* :func:`outcome_to_p_left`: left → 1.0, right → 0.0, equal → 0.5, skip → None
  (re-exported from :mod:`fkpd.store.outcomes`, where the mapping is written once);
* :func:`to_winner_first`: ``(left, right, p_left)`` → ``(winner, loser, p)`` with
  ``p`` the probability that the first segment is preferred (1.0, or 0.5 for a tie);
  skips give None and are never trained on.

Scripted teachers follow B-Pref (Lee, Smith, Dragan & Abbeel, "B-Pref: Benchmarking
Preference-Based Reinforcement Learning", NeurIPS Datasets & Benchmarks 2021, its
simulated teachers and the order in which its reference code applies them):
a teacher scores each segment by a (possibly discounted) sum of per-step values and

1. *skips* the pair when neither undiscounted score exceeds ``skip_threshold``;
2. marks it *equal* when the undiscounted scores differ by less than ``equal_threshold``;
3. otherwise compares *myopic* scores Σ_h γ^(L−1−h) v_h (γ = 1: plain sums; γ < 1
   weighs the end of the segment more),
4. either rationally (``beta = inf``: the higher score wins, exact ties are equal) or
   by a *Boltzmann* draw P[left] = σ(β·(S_left − S_right)), β the rationality
   (inverse temperature) constant of B-Pref's stochastic teacher,
5. and finally makes a *mistake* (flips left/right) with probability ``eps``.

The step values are the task reward for :class:`ReturnTeacher`, and an intent that is
*not* the task reward for the intent teachers (:class:`SmoothTeacher`,
:class:`HighGripperTeacher`), which also expose :meth:`ScriptedTeacher.intent_score` so
that how well a policy matches the intent can be measured on any rollout.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Sequence, TypeVar

import numpy as np

from fkpd.envs import get_task
from fkpd.errors import ConfigError
from fkpd.prefs.segments import Segment, check_p_left
from fkpd.store.outcomes import OUTCOME_VALUES, outcome_to_p_left

__all__ = ["Teacher", "ScriptedTeacher", "ReturnTeacher", "SmoothTeacher", "HighGripperTeacher",
           "TEACHERS", "INTENT_TEACHERS", "intent_scores", "make_teacher", "outcome_to_p_left", "to_winner_first", "OUTCOME_VALUES"]

S = TypeVar("S")


def to_winner_first(left: S, right: S, p_left: float | None) -> tuple[S, S, float] | None:
    """The one conversion of a labelled pair to winner-first order (DESIGN.md §3).

    Args:
        left, right: the two segments as shown.
        p_left: 1.0 (left preferred), 0.0 (right preferred), 0.5 (equal) or None (skip).

    Returns:
        ``(winner, loser, p)`` with ``p`` = P[first preferred]: ``(left, right, 1.0)``,
        ``(right, left, 1.0)`` or ``(left, right, 0.5)``; None for a skip, which is
        stored but never trained on.

    Raises:
        PreferenceError: ``p_left`` outside {1.0, 0.0, 0.5, None}.
    """
    p = check_p_left(p_left)
    if p is None:
        return None
    if p == 0.0:
        return right, left, 1.0
    return left, right, p


class Teacher(ABC):
    """Anything that labels pairs: a scripted teacher here, a human through the app."""

    name: str = "teacher"

    @abstractmethod
    def label(self, left: Segment, right: Segment) -> str:
        """Compare two segments of the same length from the same reset seed.

        Returns:
            one of ``"left"``, ``"right"``, ``"equal"``, ``"skip"``.
        """


class ScriptedTeacher(Teacher):
    """A B-Pref simulated teacher over per-step values ``v_h`` of a segment.

    Subclasses define :meth:`step_values`; the decision procedure is the same for all
    (see the module docstring for the order of the steps).

    Args:
        beta: rationality (inverse temperature) β; ``inf`` is a rational teacher,
            ``0`` a coin flip. B-Pref's "Stoch" teacher uses β = 1.
        eps: probability of flipping the answer ("Mistake": 0.1).
        equal_threshold: label ``equal`` when undiscounted scores differ by less than
            this, in score units ("Equal"). 0 disables it.
        skip_threshold: skip when neither undiscounted score exceeds this, in score
            units ("Skip"). ``-inf`` disables it.
        gamma: myopic discount γ in (0, 1] ("Myopic": 0.9).
        seed: seeds the teacher's random number generator.

    Raises:
        ConfigError: a parameter out of range.
    """

    def __init__(self, beta: float = math.inf, eps: float = 0.0, equal_threshold: float = 0.0,
                 skip_threshold: float = -math.inf, gamma: float = 1.0, seed: int = 0) -> None:
        if not beta >= 0:
            raise ConfigError(f"teacher beta must be >= 0 (inf for a rational teacher), got {beta!r}")
        if not 0.0 <= eps <= 1.0:
            raise ConfigError(f"teacher eps (mistake probability) must be in [0, 1], got {eps!r}")
        if not equal_threshold >= 0:
            raise ConfigError(f"teacher equal_threshold must be >= 0, got {equal_threshold!r}")
        if not 0.0 < gamma <= 1.0:
            raise ConfigError(f"teacher gamma (myopic discount) must be in (0, 1], got {gamma!r}")
        self.beta = float(beta)
        self.eps = float(eps)
        self.equal_threshold = float(equal_threshold)
        self.skip_threshold = float(skip_threshold)
        self.gamma = float(gamma)
        self.rng = np.random.default_rng(seed)

    @abstractmethod
    def step_values(self, segment: Segment) -> np.ndarray:
        """Per-step values ``v_h`` (L,) or (L−1,) whose sum is the teacher's score."""

    def score(self, segment: Segment, discounted: bool = False) -> float:
        """Σ_h v_h, or the myopic Σ_h γ^(K−1−h) v_h over the K step values."""
        v = np.asarray(self.step_values(segment), np.float64)
        if discounted and self.gamma < 1.0:
            v = v * self.gamma ** np.arange(len(v) - 1, -1, -1)
        return float(v.sum())

    def intent_score(self, segment: Segment) -> float:
        """How well a segment (or a whole episode) matches this teacher's intent:
        the mean step value (higher is better), comparable across lengths."""
        v = np.asarray(self.step_values(segment), np.float64)
        return float(v.mean()) if len(v) else float("nan")

    def label(self, left: Segment, right: Segment) -> str:
        """B-Pref decision, steps 1-5 of the module docstring; see :meth:`Teacher.label`."""
        s_l, s_r = self.score(left), self.score(right)
        if max(s_l, s_r) <= self.skip_threshold:
            return "skip"
        equal = abs(s_l - s_r) < self.equal_threshold
        d_l, d_r = self.score(left, discounted=True), self.score(right, discounted=True)
        if math.isinf(self.beta):
            if d_l == d_r:
                return "equal"
            left_wins = d_l > d_r
        else:
            p_left = 1.0 / (1.0 + math.exp(-max(min(self.beta * (d_l - d_r), 700.0), -700.0)))
            left_wins = bool(self.rng.random() < p_left)
        if self.eps > 0 and self.rng.random() < self.eps:
            left_wins = not left_wins
        if equal:
            return "equal"
        return "left" if left_wins else "right"


class ReturnTeacher(ScriptedTeacher):
    """Prefers the segment with the higher ground-truth return (environment reward).

    With default parameters it is B-Pref's rational "Oracle" teacher.
    """

    name = "return"

    def step_values(self, segment: Segment) -> np.ndarray:
        """The rewards ``(L,)``, MetaWorld's shaped reward in [0, 10] per step."""
        return segment.rewards


class SmoothTeacher(ScriptedTeacher):
    """Prefers smooth motion: lower mean squared change between consecutive actions.

    The task reward plays no part. Step values are ``−‖a_{h+1} − a_h‖²`` (L−1,), in
    squared action units (actions are in [-1, 1]^Da); the intent score is their mean,
    0 for constant actions.
    """

    name = "smooth"

    def step_values(self, segment: Segment) -> np.ndarray:
        a = np.asarray(segment.actions, np.float64)
        return -np.square(np.diff(a, axis=0)).sum(axis=1)


class HighGripperTeacher(ScriptedTeacher):
    """Prefers keeping the hand above a height, whatever the task needs.

    Step values are ``min(z_h − height, 0)`` in metres, z the hand height
    (MetaWorld ``obs[2]``): 0 while the hand is at or above ``height``, negative by the
    shortfall below it. The intent score is their mean (0 is best).

    Args:
        height: target minimum hand height in metres. The default 0.2 m is above the
            median hand height (0.15 m) in door-open demonstrations, so the intent
            conflicts with the task.
        **kwargs: B-Pref parameters of :class:`ScriptedTeacher`.
    """

    name = "high-gripper"
    HAND_Z = 2

    def __init__(self, height: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.height = float(height)

    def step_values(self, segment: Segment) -> np.ndarray:
        z = np.asarray(segment.observations, np.float64)[:, self.HAND_Z]
        return np.minimum(z - self.height, 0.0)


#: Named teachers for ``fkpd loop --teacher``: class and B-Pref parameters. Thresholds
#: of ``equal``/``skip`` are fractions of the mean segment score the caller passes as
#: ``score_scale`` (B-Pref sets them relative to the average segment return).
TEACHERS: dict[str, tuple[type[ScriptedTeacher], dict]] = {
    "return": (ReturnTeacher, {}),
    "stoch": (ReturnTeacher, {"beta": 1.0}),
    "mistake": (ReturnTeacher, {"eps": 0.1}),
    "myopic": (ReturnTeacher, {"gamma": 0.9}),
    "equal": (ReturnTeacher, {"equal_frac": 0.1}),
    "skip": (ReturnTeacher, {"skip_frac": 0.1}),
    "smooth": (SmoothTeacher, {}),
    "high-gripper": (HighGripperTeacher, {}),
}


#: Intent teachers whose scores every evaluation of the app records, where they apply: a
#: task's :attr:`fkpd.envs.TaskSpec.intent_teachers` says which mean something on it
#: (``high-gripper``, the hand height, is MetaWorld's ``obs[2]``).
INTENT_TEACHERS: tuple[str, ...] = ("smooth", "high-gripper")


def intent_scores(segments: Sequence[Segment], task_id: str) -> dict[str, float]:
    """Mean intent score of every applicable intent teacher over whole episodes.

    Args:
        segments: episodes (or segments) of one policy, as :class:`Segment`.
        task_id: their task; its spec's :attr:`~fkpd.envs.TaskSpec.intent_teachers`
            decide which intent teachers apply.

    Returns:
        ``{"intent_smooth": ..., "intent_high_gripper": ...}`` (keys with ``-`` turned
        into ``_``); units as in each teacher's :meth:`ScriptedTeacher.intent_score`;
        empty without segments.

    Raises:
        UnknownTaskError: ``task_id`` is not registered.
    """
    out: dict[str, float] = {}
    if not segments:
        return out
    for name in get_task(task_id).intent_teachers:
        teacher = make_teacher(name)
        out[f"intent_{name.replace('-', '_')}"] = float(np.mean([teacher.intent_score(s) for s in segments]))
    return out


def make_teacher(name: str, seed: int = 0, score_scale: float = 1.0, **overrides) -> ScriptedTeacher:
    """Build a named teacher from :data:`TEACHERS`.

    Args:
        name: a key of :data:`TEACHERS`.
        seed: the teacher's random seed.
        score_scale: mean |score| of a segment, scaling the ``equal``/``skip`` presets'
            thresholds (``equal_frac``·scale, ``skip_frac``·scale).
        **overrides: constructor parameters that replace the preset's.

    Raises:
        ConfigError: unknown name or bad parameter.
    """
    if name not in TEACHERS:
        raise ConfigError(f"unknown teacher {name!r}; known teachers: {', '.join(TEACHERS)}")
    cls, preset = TEACHERS[name]
    kwargs = dict(preset)
    if "equal_frac" in kwargs:
        kwargs["equal_threshold"] = kwargs.pop("equal_frac") * abs(score_scale)
    if "skip_frac" in kwargs:
        kwargs["skip_threshold"] = kwargs.pop("skip_frac") * abs(score_scale)
    kwargs.update(overrides)
    teacher = cls(seed=seed, **kwargs)
    teacher.name = name
    return teacher
