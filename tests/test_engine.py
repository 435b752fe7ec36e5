"""The round engine (fkpd.train.engine) and its parts: the pair plan, pair sources,
labellers and the one evaluation, as both the headless loop and the worker use them."""

from __future__ import annotations

import numpy as np
import pytest

from fkpd.envs import make_env
from fkpd.policy import DiffusionPolicy
from fkpd.prefs.labellers import Labeller, ScriptedLabeller
from fkpd.prefs.pairs import PairPlan, RolloutPairSource, pair_seed
from fkpd.prefs.teachers import make_teacher
from fkpd.train.align import AlignConfig
from fkpd.train.engine import NoLabelsError, RoundEngine, round_seed
from fkpd.train.evaluate import Evaluator

TASK = "metaworld/door-open-v3"


def test_pair_plan_is_the_seed_rule_of_the_loop_and_the_worker():
    plan = PairPlan.for_round(seed=2, round_=3, pairs=4, horizon=50, length=16, start=0)
    assert plan.reset_seeds == tuple(1_000_000_000 + 10_000_000 * 2 + 100_000 * 3 + i for i in range(4))
    assert plan.reset_seeds[1] == pair_seed(2, 3, 1)
    # starts are drawn, then overridden by a fixed start, so the noise seeds do not depend on it
    rng = np.random.default_rng(pair_seed(2, 3, 0))
    drawn = rng.integers(0, 50 - 16 + 1, size=4)
    noise = rng.integers(0, 2**62, size=(4, 2))
    np.testing.assert_array_equal(plan.noise_seeds, noise)
    assert list(plan.starts) == [0, 0, 0, 0]
    random = PairPlan.for_round(2, 3, 4, 50, 16, start=None)
    np.testing.assert_array_equal(random.starts, drawn)
    np.testing.assert_array_equal(random.noise_seeds, plan.noise_seeds)
    assert list(PairPlan.for_round(2, 3, 4, 50, 16, start=45).starts) == [34] * 4, "clipped to T - L"
    assert PairPlan.for_round(0, 1, 2, 30, 64).length == 30, "L is capped at the horizon"
    requests = plan.requests(render=True)
    assert [(r.reset_seed, r.max_steps, r.render_from) for r in requests[:2]] == [(plan.reset_seeds[0], 16, 0)] * 2
    assert requests[0].noise_seed != requests[1].noise_seed
    assert all(r.render_from is None for r in plan.requests(render=False))
    with pytest.raises(ValueError, match="segment_length"):
        PairPlan.for_round(0, 1, 2, 30, 0)
    assert round_seed(2, 3) == 2003


class _Recorder(Labeller):
    """Answers left on every pair, or skips them all."""

    def __init__(self, skip: bool = False) -> None:
        self.skip, self.requests, self.items = skip, [], []

    def request(self, round_, pairs):
        self.requests.append((round_, len(pairs)))
        self.items += [(a, b, None if self.skip else 1.0) for a, b in pairs]

    def labels(self):
        return list(self.items)


def _engine(checkpoint, dataset, labeller, envs, **align):
    source = RolloutPairSource(envs, pairs=3, length=6, seed=1, task_id=TASK)
    cfg = AlignConfig(steps=3, batch_pairs=2, bc_batch_size=16, device="cpu", log_every=1, **align)
    return RoundEngine(TASK, checkpoint, str(dataset), 1, source, labeller, Evaluator(envs, 2, seed=1), cfg)


def test_engine_makes_batches_trains_on_all_labels_and_registers(tiny_checkpoint, tiny_dataset, tmp_path):
    envs = [make_env(TASK, max_episode_steps=12) for _ in range(3)]
    labeller = _Recorder()
    engine = _engine(tiny_checkpoint, tiny_dataset, labeller, envs)
    ref = DiffusionPolicy.load(tiny_checkpoint)
    seen = []
    pairs = engine.make_batch(ref, 1, on_clip=seen.append, progress=lambda d, t: None)
    assert len(pairs) == 3 and labeller.requests == [(1, 3)]
    assert [(c.pair, c.side) for c in seen] == [(k, j) for k in range(3) for j in range(2)]
    assert all(a.reset_seed == b.reset_seed == pair_seed(1, 1, k) for k, (a, b) in enumerate(pairs))
    # the same plan, rolled out again, gives the same clips (seeded per clip)
    again = engine.source.make_pairs(ref, 1)
    np.testing.assert_allclose(again[2][1].actions, pairs[2][1].actions, atol=1e-6)

    registered = []
    res = engine.run_round(1, tiny_checkpoint, tmp_path / "r1", register=lambda r: registered.append(r) or "v1")
    assert res.registered == "v1" and registered == [res]
    assert res.labels_used == 3 and res.trained_pairs == 3
    assert res.config.seed == round_seed(1, 1) and res.config.round == 1
    assert res.config.checkpoint == str(tiny_checkpoint) and res.config.init == str(tiny_checkpoint)
    assert res.config.dataset == str(tiny_dataset) and res.config.steps == 3
    assert (res.checkpoint / "model.safetensors").is_file()
    assert res.evaluation["episodes"] == 2 and 0.0 <= res.evaluation["success_rate"] <= 1.0
    assert {"mean_return", "success_ci95", "intent_smooth", "smoothness", "eval_s"} <= set(res.evaluation)
    # round 2 trains from round 1 on the labels of both rounds
    engine.make_batch(res.policy, 2)
    res2 = engine.run_round(2, res.checkpoint, tmp_path / "r2")
    assert res2.labels_used == 6 and res2.config.init == str(res.checkpoint) and res2.config.seed == 1002


def test_engine_refuses_to_train_without_labels(tiny_checkpoint, tiny_dataset, tmp_path):
    envs = [make_env(TASK, max_episode_steps=12)]
    engine = _engine(tiny_checkpoint, tiny_dataset, _Recorder(skip=True), envs)
    engine.make_batch(DiffusionPolicy.load(tiny_checkpoint), 1)
    with pytest.raises(NoLabelsError, match="no trainable labels for round 1 \\(3 labels"):
        engine.run_round(1, tiny_checkpoint, tmp_path / "r1")
    assert not (tmp_path / "r1").exists(), "nothing is trained or written"
    batch_only = RoundEngine(TASK, tiny_checkpoint, "", 0, engine.source, engine.labeller, engine.evaluator)
    with pytest.raises(ValueError, match="without align_cfg"):
        batch_only.align_config(1, tiny_checkpoint, tmp_path)


def test_scripted_labeller_labels_at_once_and_keeps_rounds(tiny_checkpoint):
    envs = [make_env(TASK, max_episode_steps=12) for _ in range(2)]
    source = RolloutPairSource(envs, pairs=2, length=6, seed=0, task_id=TASK)
    labeller = ScriptedLabeller(make_teacher("return", seed=0))
    policy = DiffusionPolicy.load(tiny_checkpoint)
    labeller.request(1, source.make_pairs(policy, 1))
    labeller.request(2, source.make_pairs(policy, 2))
    assert len(labeller.labels()) == 4 and len(labeller.new_labels(2)) == 2
    for a, b, p in labeller.labels():
        assert p in (1.0, 0.0, 0.5, None)
        if p in (1.0, 0.0):
            assert (p == 1.0) == (a.ret > b.ret) or a.ret == b.ret, "the return teacher prefers the higher return"
    assert labeller.rounds[1][1] == [("left" if p == 1.0 else "right" if p == 0.0 else "equal" if p == 0.5
                                      else "skip") for _, _, p in labeller.new_labels(1)]


def test_compare_with_parent_is_paired_and_flags_only_beyond_the_interval():
    from fkpd.train.evaluate import compare_with_parent, describe_comparison

    parent = {"episode_successes": [1] * 30 + [0] * 20, "episode_returns": [100.0] * 50}
    same = compare_with_parent(dict(parent), parent)
    assert same["delta_success"] == 0 and same["delta_success_ci95"] == [0.0, 0.0] and not same["worse"]
    # 15 of the parent's 30 successes lost on the same seeds: worse beyond the interval
    worse = {"episode_successes": [1] * 15 + [0] * 35, "episode_returns": [90.0] * 50}
    cmp = compare_with_parent(worse, parent)
    assert cmp["delta_success"] == pytest.approx(-0.3) and cmp["delta_success_ci95"][1] < 0 and cmp["worse"]
    assert cmp["metric"] == "success" and cmp["episodes"] == 50 and cmp["delta_return"] == pytest.approx(-10.0)
    assert "WORSE" in describe_comparison(cmp)
    # one episode fewer is within the interval: not flagged
    slight = {"episode_successes": [1] * 29 + [0] * 21, "episode_returns": [100.0] * 50}
    assert not compare_with_parent(slight, parent)["worse"]
    # pairing: the same success rate on other seeds is a change on each seed, and nets to 0
    shuffled = {"episode_successes": [0] * 20 + [1] * 30, "episode_returns": [100.0] * 50}
    assert compare_with_parent(shuffled, parent)["delta_success"] == 0.0
    # without successes (locomotion), the return decides; missing data gives no comparison
    flat = {"episode_successes": [0] * 20, "episode_returns": [50.0] * 20}
    lower = {"episode_successes": [0] * 20, "episode_returns": [40.0 + i % 3 for i in range(20)]}
    cmp = compare_with_parent(lower, flat)
    assert cmp["metric"] == "return" and cmp["worse"]
    text = describe_comparison(cmp)
    lo, hi = cmp["delta_return_ci95"]
    assert f"95% CI {lo:+.1f} to {hi:+.1f}; neither version succeeded" in text and text.endswith("WORSE beyond the interval")
    assert "neither version succeeded" not in describe_comparison(compare_with_parent(worse, parent))
    assert compare_with_parent(lower, None) is None and compare_with_parent({}, parent) is None
    assert describe_comparison(None) == "no paired comparison with its parent"


def test_engine_compares_each_round_with_its_parent(tiny_checkpoint, tiny_dataset, tmp_path):
    envs = [make_env(TASK, max_episode_steps=12) for _ in range(2)]
    engine = _engine(tiny_checkpoint, tiny_dataset, _Recorder(), envs)
    ref = DiffusionPolicy.load(tiny_checkpoint)
    parent_ev = engine.evaluator(ref)
    assert len(parent_ev["episode_successes"]) == len(parent_ev["episode_returns"]) == 2
    engine.make_batch(ref, 1)
    res = engine.run_round(1, tiny_checkpoint, tmp_path / "r1", parent_evaluation=parent_ev)
    assert res.comparison["episodes"] == 2 and "worse" in res.comparison
    assert res.comparison["delta_return"] == pytest.approx(res.evaluation["mean_return"] - parent_ev["mean_return"])
