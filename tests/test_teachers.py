"""Scripted teachers (B-Pref variants, intent teachers) and the label conventions."""

import math

import numpy as np
import pytest

from fkpd.errors import ConfigError, FKPDError
from fkpd.prefs.segments import PreferenceError, Segment
from fkpd.prefs.teachers import (TEACHERS, HighGripperTeacher, ReturnTeacher, SmoothTeacher, Teacher, make_teacher,
                           outcome_to_p_left, to_winner_first)

OUTCOMES = {"left", "right", "equal", "skip"}


def seg(rewards=None, actions=None, hand_z=None):
    n = len(rewards if rewards is not None else actions if actions is not None else hand_z)
    rewards = np.zeros(n) if rewards is None else np.asarray(rewards, float)
    n = len(rewards)
    obs = np.zeros((n, 39), np.float32)
    if hand_z is not None:
        obs[:, 2] = hand_z
    actions = np.zeros((n, 4)) if actions is None else np.asarray(actions)
    return Segment(obs, actions, rewards, np.zeros(n, bool))


def test_outcome_to_p_left_is_the_one_mapping():
    assert [outcome_to_p_left(o) for o in ("left", "right", "equal", "skip")] == [1.0, 0.0, 0.5, None]
    with pytest.raises(FKPDError, match="unknown outcome"):
        outcome_to_p_left("maybe")


def test_to_winner_first():
    a, b = seg([1.0]), seg([2.0])
    assert to_winner_first(a, b, 1.0) == (a, b, 1.0)
    w, l, p = to_winner_first(a, b, 0.0)
    assert (w, l, p) == (b, a, 1.0)
    assert to_winner_first(a, b, 0.5) == (a, b, 0.5)
    assert to_winner_first(a, b, None) is None  # skip: never trained on
    with pytest.raises(PreferenceError, match="p_left is 0.7"):
        to_winner_first(a, b, 0.7)
    # round trip: outcome -> p_left -> winner first
    for outcome, first in (("left", a), ("right", b), ("equal", a)):
        assert to_winner_first(a, b, outcome_to_p_left(outcome))[0] is first


def test_rational_teacher_picks_higher_return():
    t = ReturnTeacher()
    lo, hi = seg([1, 1, 1]), seg([1, 2, 1])
    assert t.label(hi, lo) == "left" and t.label(lo, hi) == "right"
    assert t.label(lo, seg([1, 1, 1])) == "equal"  # exact tie
    assert isinstance(t, Teacher)


def test_mistake_probability():
    lo, hi = seg([0, 0]), seg([1, 1])
    always = ReturnTeacher(eps=1.0)
    assert all(always.label(hi, lo) == "right" for _ in range(20))
    half = ReturnTeacher(eps=0.5, seed=3)
    flips = np.mean([half.label(hi, lo) == "right" for _ in range(2000)])
    assert 0.45 < flips < 0.55


def test_skip_and_equal_thresholds():
    t = ReturnTeacher(skip_threshold=5.0, equal_threshold=1.0)
    assert t.label(seg([1, 1]), seg([2, 2])) == "skip"  # both below 5
    assert t.label(seg([3, 3]), seg([1, 1])) == "left"  # 6 > 5: not skipped
    assert t.label(seg([2.5, 2.5]), seg([1, 1])) == "skip"  # 5 does not exceed 5 (B-Pref keeps max > threshold)
    assert t.label(seg([3, 3]), seg([3, 2.5])) == "equal"  # |6 - 5.5| < 1
    assert t.label(seg([3, 3]), seg([3, 2])) == "left"  # |6 - 5| = 1: not equal
    # equal wins over a mistake (B-Pref applies the equal margin last)
    assert ReturnTeacher(eps=1.0, equal_threshold=1.0).label(seg([3, 3]), seg([3, 2.5])) == "equal"


def test_boltzmann_statistics():
    beta = 0.7
    t = ReturnTeacher(beta=beta, seed=0)
    a, b = seg([1.0, 1.0]), seg([0.5, 0.5])  # returns 2 vs 1
    n = 4000
    p_hat = np.mean([t.label(a, b) == "left" for _ in range(n)])
    p = 1 / (1 + math.exp(-beta * 1.0))
    assert abs(p_hat - p) < 4 * math.sqrt(p * (1 - p) / n)
    coin = ReturnTeacher(beta=0.0, seed=2)
    assert 0.45 < np.mean([coin.label(a, b) == "left" for _ in range(2000)]) < 0.55


def test_myopic_discount_weighs_recent_steps():
    early, late = seg([3, 0, 0, 0]), seg([0, 0, 0, 2.5])
    assert ReturnTeacher().label(early, late) == "left"  # 3 > 2.5
    assert ReturnTeacher(gamma=0.5).label(early, late) == "right"  # 3·0.125 < 2.5
    assert ReturnTeacher(gamma=0.5).score(early, discounted=True) == pytest.approx(0.375)


def test_seeded_teachers_repeat():
    pairs = [(seg(np.random.default_rng(i).random(5)), seg(np.random.default_rng(i + 100).random(5)))
             for i in range(50)]
    t1, t2 = ReturnTeacher(beta=2.0, eps=0.2, seed=7), ReturnTeacher(beta=2.0, eps=0.2, seed=7)
    a = [t1.label(*p) for p in pairs]
    assert a == [t2.label(*p) for p in pairs]
    t3 = ReturnTeacher(beta=2.0, eps=0.2, seed=8)
    assert a != [t3.label(*p) for p in pairs]
    assert set(a) <= OUTCOMES and len(set(a)) > 1


def test_smooth_teacher_ignores_reward_and_prefers_low_jerk():
    rng = np.random.default_rng(0)
    jerky = seg(rewards=np.full(10, 10.0), actions=rng.uniform(-1, 1, (10, 4)))
    smooth = seg(rewards=np.zeros(10), actions=np.tile(np.linspace(-0.5, 0.5, 10)[:, None], (1, 4)))
    t = SmoothTeacher()
    assert t.label(jerky, smooth) == "right" and t.label(smooth, jerky) == "left"
    assert t.intent_score(smooth) > t.intent_score(jerky)
    assert t.intent_score(seg(actions=np.full((6, 4), 0.3))) == 0.0
    d = np.diff(jerky.actions, axis=0)
    assert t.intent_score(jerky) == pytest.approx(-np.square(d).sum(1).mean(), rel=1e-6)


def test_high_gripper_teacher():
    t = HighGripperTeacher(height=0.2)
    high = seg(rewards=np.zeros(4), hand_z=[0.25, 0.3, 0.22, 0.21])
    low = seg(rewards=np.full(4, 10.0), hand_z=[0.1, 0.15, 0.3, 0.3])
    assert t.label(high, low) == "left"
    assert t.intent_score(high) == 0.0
    assert t.intent_score(low) == pytest.approx(np.mean([-0.1, -0.05, 0.0, 0.0]))
    assert ReturnTeacher().label(high, low) == "right"  # the intent disagrees with the task reward


def test_make_teacher_presets_and_errors():
    assert set(TEACHERS) >= {"return", "stoch", "mistake", "myopic", "equal", "skip", "smooth", "high-gripper"}
    assert make_teacher("stoch").beta == 1.0
    assert make_teacher("mistake").eps == 0.1
    assert make_teacher("myopic").gamma == 0.9
    assert make_teacher("equal", score_scale=200.0).equal_threshold == pytest.approx(20.0)
    assert make_teacher("skip", score_scale=200.0).skip_threshold == pytest.approx(20.0)
    assert make_teacher("high-gripper", height=0.3).height == 0.3
    assert make_teacher("return").name == "return"
    with pytest.raises(ConfigError, match="unknown teacher 'nope'; known teachers: return"):
        make_teacher("nope")
    with pytest.raises(ConfigError, match=r"eps .* must be in \[0, 1\], got 1.5"):
        ReturnTeacher(eps=1.5)
    with pytest.raises(ConfigError, match="gamma"):
        ReturnTeacher(gamma=0.0)


def test_intent_scores_per_task_family():
    from fkpd.prefs.segments import Segment
    from fkpd.prefs.teachers import intent_scores

    still = Segment(np.zeros((5, 39)), np.zeros((5, 4)), np.zeros(5), np.zeros(5, bool))
    jerky = Segment(np.zeros((5, 39)), np.tile([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]], (3, 1))[:5], np.zeros(5),
                    np.zeros(5, bool))
    mw = intent_scores([still], "metaworld/door-open-v3")
    assert mw == {"intent_smooth": 0.0, "intent_high_gripper": pytest.approx(-0.2)}
    assert intent_scores([jerky], "metaworld/door-open-v3")["intent_smooth"] == pytest.approx(-4.0)
    assert set(intent_scores([still], "d4rl/maze2d-umaze")) == {"intent_smooth"}, "hand height is MetaWorld's"
    assert intent_scores([], "metaworld/door-open-v3") == {}
