"""Active query selection (fkpd.train.acquisition, issue #13 point 4): candidate pools,
the three rules on constructed and rolled-out candidates, the loop, the CLI flags, and the
app's setting (batches, top-ups, Rounds page)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest_app import ADMIN_PASSWORD, PAIRS, PROJECT, bootstrapped_project, project_dir, project_store  # noqa: F401
from test_app import app  # noqa: F401  (fixture used by name)
from fkpd.envs import make_env
from fkpd.errors import ConfigError
from fkpd.policy import DiffusionPolicy
from fkpd.prefs.pairs import CANDIDATE_LAYER, PairPlan, RolloutPairSource, pair_seed, rollout_pairs
from fkpd.prefs.segments import Segment
from fkpd.train.acquisition import (AcquisitionPairSource, check_selection, choose, clip_distance,
                                    disagreement_scores, diversity_scores, implicit_margins, select_pairs)

TASK = "metaworld/door-open-v3"


def test_a_pool_starts_with_todays_plan_and_its_layers_never_share_reset_seeds():
    plan = PairPlan.for_round(seed=2, round_=3, pairs=4, horizon=50, length=16, start=None, first=5)
    pool = PairPlan.pool(2, 3, 4, 50, 16, start=None, first=5, factor=3)
    assert len(pool) == 12
    head = pool.take(range(4))
    assert head.reset_seeds == plan.reset_seeds, "layer 0 is the batch without selection"
    np.testing.assert_array_equal(head.noise_seeds, plan.noise_seeds)
    np.testing.assert_array_equal(head.starts, plan.starts)
    assert pool.reset_seeds[4:8] == tuple(pair_seed(2, 3, CANDIDATE_LAYER + 5 + i) for i in range(4))
    # a round's batch (pairs 0..3) and a top-up (4..5) with another factor: no reset seed twice
    batch, top_up = PairPlan.pool(2, 3, 4, 50, 16, factor=3), PairPlan.pool(2, 3, 2, 50, 16, first=4, factor=10)
    seeds = batch.reset_seeds + top_up.reset_seeds
    assert len(set(seeds)) == len(seeds) == 32
    assert all(pair_seed(2, 3, 0) <= s < pair_seed(2, 4, 0) for s in seeds), "inside round 3's seed range"
    assert PairPlan.pool(2, 3, 4, 50, 16, factor=1).reset_seeds == PairPlan.for_round(2, 3, 4, 50, 16).reset_seeds
    for bad in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match="candidate factor must be an integer from 1 to 10"):
            PairPlan.pool(2, 3, 4, 50, 16, factor=bad)
    with pytest.raises(ValueError, match="at most 10000 pairs per round"):
        PairPlan.pool(2, 3, 4, 50, 16, first=CANDIDATE_LAYER - 2, factor=2)


def test_disagreement_scores_rank_the_pairs_the_model_is_least_sure_of_first():
    z = np.array([[4.0, 5.0, 4.5],      # sure: the first clip
                  [0.1, -0.1, 0.05],    # margin near zero
                  [-6.0, -5.0, -7.0],   # sure: the second clip
                  [8.0, -8.0, 7.5],     # large margins that disagree in sign
                  [0.0, 0.0, 0.0]])     # θ = ref, or two identical clips
    s = disagreement_scores(z)
    assert s[4] == 0.0 and s[1] < 0.05 and s[3] < 0.2 and min(s[0], s[2]) > 0.45
    assert list(choose(s, 3, largest=False)) == [1, 3, 4], "the three unsure pairs, in pool order"
    assert list(choose(np.zeros(5), 2, largest=False)) == [0, 1], "ties keep pool order: today's pairs"
    assert disagreement_scores(np.array([[1e6, -1e6]]))[0] == 0.0, "no overflow"
    with pytest.raises(ValueError, match=r"z must be \(C, K\)"):
        disagreement_scores(np.zeros(3))
    with pytest.raises(ValueError, match="cannot choose 6 of 5"):
        choose(s, 6, largest=False)


def _seg(obs: np.ndarray) -> Segment:
    n = len(obs)
    return Segment(obs.astype(np.float32), np.zeros((n, 4), np.float32), np.zeros(n, np.float32), np.zeros(n, bool))


def test_diversity_picks_the_pairs_whose_clips_visit_the_most_different_states():
    rng = np.random.default_rng(0)
    a = np.cumsum(rng.normal(size=(10, 3)), 0)
    near, far = a + 0.1, a[::-1] + np.array([5.0, 0.0, 0.0])
    assert clip_distance(a, a) == 0.0
    assert clip_distance(a, far) == pytest.approx(clip_distance(far, a))
    pairs = [(_seg(a), _seg(near)), (_seg(a), _seg(a)), (_seg(far), _seg(a)), (_seg(near), _seg(far))]
    s = diversity_scores(pairs)
    assert s[1] == 0.0 and s[0] < s[2] and s[0] < s[3]
    assert list(choose(s, 2, largest=True)) == [2, 3]
    # each dimension is standardised over the pool: scaling one dimension changes nothing
    scaled = [(_seg(x.observations * [1000.0, 1.0, 1.0]), _seg(y.observations * [1000.0, 1.0, 1.0]))
              for x, y in pairs]
    np.testing.assert_allclose(diversity_scores(scaled), s, rtol=1e-6)


def test_bad_rule_names_and_factors_are_refused_clearly(tiny_checkpoint):
    from fkpd.cli import main
    from fkpd.train.loop import LoopConfig

    with pytest.raises(ValueError, match="query selection must be one of uniform, disagreement, diversity"):
        check_selection("entropy", 3)
    with pytest.raises(ValueError, match="candidate factor must be an integer from 1 to 10"):
        check_selection("diversity", 0)
    base = RolloutPairSource([], pairs=2, length=6)
    with pytest.raises(ValueError, match="'disagreement' needs the reference policy"):
        AcquisitionPairSource(base, "disagreement", 3)
    assert select_pairs(base, "uniform", 3) is base, "uniform keeps today's source itself"
    with pytest.raises(ConfigError, match="--query-selection must be one of uniform, disagreement, diversity"):
        LoopConfig(query_selection="Disagreement")
    with pytest.raises(ConfigError, match="--candidate-factor must be an integer from 1 to 10, got 11"):
        LoopConfig(candidate_factor=11)
    assert main(["loop", "--query-selection", "random", "--bc-checkpoint", str(tiny_checkpoint)]) == 2


def test_cli_errors_name_the_flags_also_from_a_config_file(capsys, tmp_path):
    from fkpd.cli import main

    assert main(["loop", "--candidate-factor", "0"]) == 2
    assert "--candidate-factor must be an integer from 1 to 10, got 0" in capsys.readouterr().err
    config = tmp_path / "loop.toml"
    config.write_text('[loop]\nquery_selection = "diversity"\ncandidate_factor = 12\n')
    assert main(["loop", "--config", str(config)]) == 2
    assert "--candidate-factor must be an integer from 1 to 10, got 12" in capsys.readouterr().err


@pytest.fixture(scope="module")
def policies(tiny_checkpoint):
    """π_ref (the tiny BC policy) and a π_θ whose weights were moved away from it."""
    ref = DiffusionPolicy.load(tiny_checkpoint)
    pol = DiffusionPolicy.load(tiny_checkpoint)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pol.net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return pol, ref


@pytest.fixture(scope="module")
def envs():
    envs = [make_env(TASK, max_episode_steps=12, render_size=(32, 32)) for _ in range(4)]
    yield envs
    for env in envs:
        env.close()


def _same(pairs, other) -> bool:
    return all(np.allclose(a.actions, c.actions, atol=1e-5) and np.allclose(b.observations, d.observations, atol=1e-5)
               and a.reset_seed == c.reset_seed for (a, b), (c, d) in zip(pairs, other, strict=True))


def test_each_rule_picks_what_it_should_from_rolled_out_candidates(policies, envs):
    pol, ref = policies
    base = RolloutPairSource(envs, pairs=2, length=6, seed=1, task_id=TASK)
    today = base.make_pairs(pol, 1)
    # uniform: today's pairs, seeds and clips
    uniform = AcquisitionPairSource(base, "uniform", 3)
    assert _same(uniform.make_pairs(pol, 1), today) and list(uniform.last.chosen) == [0, 1]
    # the pool the rules choose from: factor 3 (layer 0 = today's pairs)
    pool = PairPlan.pool(1, 1, 2, 12, 6, factor=3)
    candidates = rollout_pairs(pol, envs, pool, task_id=TASK)
    assert _same(candidates[:2], today)

    dis = AcquisitionPairSource(base, "disagreement", 3, reference=ref)
    seen = []
    got = dis.make_pairs(pol, 1, on_clip=seen.append)
    scores = disagreement_scores(implicit_margins(pol, ref, candidates, seed=pair_seed(1, 1, 0)))
    expected = choose(scores, 2, largest=False)
    assert list(dis.last.chosen) == list(expected) and dis.last.candidates == 6
    np.testing.assert_allclose(dis.last.scores, scores)
    assert _same(got, [candidates[k] for k in expected]), "reproducible: the same clips as the pool rolled out here"
    assert [(c.pair, c.side, c.request.reset_seed) for c in seen] == [
        (k, j, pool.reset_seeds[c]) for k, c in enumerate(expected) for j in (0, 1)], "batch order, pool seeds"

    div = AcquisitionPairSource(base, "diversity", 3)
    got = div.make_pairs(pol, 1)
    expected = choose(diversity_scores(candidates), 2, largest=True)
    assert list(div.last.chosen) == list(expected) and _same(got, [candidates[k] for k in expected])

    # θ = ref (round 1): every margin is 0, so disagreement rolls out no pool and gives today's pairs
    plain = AcquisitionPairSource(base, "disagreement", 3, reference=ref)
    assert [a.reset_seed for a, _ in plain.make_pairs(ref, 1)] == [a.reset_seed for a, _ in today]
    assert plain.last.candidates == 2 and "every margin is 0" in plain.last.note

    # on constructed candidates: a pair of two identical clips (margin exactly 0) is picked first
    a, b = candidates[3]
    made = [(a, b), (b, b), (b, a)]
    z = implicit_margins(pol, ref, made, draws=3, seed=0)
    assert np.all(z[1] == 0.0) and np.all(z[0] != 0.0)
    assert list(choose(disagreement_scores(z), 1, largest=False)) == [1]


def test_only_the_chosen_pairs_are_rendered(policies, envs):
    pol, _ = policies
    base = RolloutPairSource(envs, pairs=1, length=6, seed=3, task_id=TASK, render=True)
    src = AcquisitionPairSource(base, "diversity", 3)
    seen, progress = [], []
    got = src.make_pairs(pol, 2, on_clip=seen.append, progress=lambda d, t: progress.append((d, t)))
    assert [(c.pair, c.side) for c in seen] == [(0, 0), (0, 1)], "2 clips rendered, not 6"
    assert all(c.episode.frames is not None and len(c.episode.frames) == 7 for c in seen)  # L + 1 frames
    assert progress[-1] == (8, 8), "6 candidate clips, then the 2 shown ones again, with frames"
    pool = PairPlan.pool(3, 2, 1, 12, 6, factor=3)
    assert [c.request.reset_seed for c in seen[::2]] == [pool.reset_seeds[k] for k in src.last.chosen]
    assert all(a.reset_seed == b.reset_seed for a, b in got)


def _loop(tmp_path, tiny_checkpoint, tiny_dataset, rule):
    from fkpd.train.align import AlignConfig
    from fkpd.train.loop import LoopConfig, run_loop

    cfg = LoopConfig(task=TASK, rounds=2, pairs_per_round=2, segment_length=6, max_episode_steps=12, eval_episodes=2,
                     n_envs=4, bc_checkpoint=str(tiny_checkpoint), dataset=str(tiny_dataset), seed=1,
                     out_dir=str(tmp_path / rule), query_selection=rule, candidate_factor=2,
                     continue_from="latest", validation_episodes=0)  # round 2 rolls out from π_1
    acfg = AlignConfig(steps=2, batch_pairs=2, bc_batch_size=16, device="cpu", log_every=1, threads=1)
    return run_loop(cfg, acfg, progress=False, log=lambda s: None)


@pytest.mark.parametrize("rule", ["disagreement", "diversity"])  # uniform: the plain loop of test_engine/test_cli
def test_the_loop_runs_with_each_rule(tmp_path, tiny_checkpoint, tiny_dataset, rule):
    summary = _loop(tmp_path, tiny_checkpoint, tiny_dataset, rule)
    rows = summary["rounds"]
    assert len(rows) == 3 and summary["loop"]["query_selection"] == rule
    assert [r["labels"] for r in rows[1:]] == [2, 4]
    saved = json.loads((tmp_path / rule / "loop.json").read_text())
    first, second = saved["rounds"][1]["query_selection"], saved["rounds"][2]["query_selection"]
    assert second["rule"] == rule and second["candidates"] == 4 and len(second["chosen"]) == 2
    if rule == "disagreement":  # round 1 rolls out from π_0 = π_ref: no pool
        assert first["candidates"] == 2 and first["chosen"] == [0, 1] and first["note"]
    else:
        assert first["candidates"] == 4 and first["score_chosen"] >= first["score_pool"]
    assert len(list((tmp_path / rule / "round2" / "segments").glob("*.npz"))) == 4, "only the chosen pairs are saved"


def test_the_app_setting_is_validated_and_used_by_rounds_and_top_ups(project_store):  # noqa: F811
    from fkpd.store import run_worker
    from fkpd.studio import BatchSettings, ParamError, RoundParams, StudioError, enqueue_round
    from fkpd.studio.history import ROUND_PARAMS
    from fkpd.studio.topup import batch_settings

    assert (BatchSettings().query_selection, BatchSettings().candidate_factor) == ("uniform", 3)
    for bad in ({"query_selection": "entropy"}, {"query_selection": 3}, {"candidate_factor": 0},
                {"candidate_factor": 11}, {"candidate_factor": 2.5}, {"candidate_factor": True}):
        with pytest.raises(ParamError, match=next(iter(bad))):
            BatchSettings(**bad)
        with pytest.raises(ParamError, match=next(iter(bad))):
            RoundParams.from_params(bad)
    project = project_store.get_project(PROJECT)
    with pytest.raises(StudioError, match="query_selection"):
        enqueue_round(project_store, project, {"query_selection": "most-uncertain"})
    settings, beta = batch_settings(project_store, project)
    assert settings.query_selection == "uniform" and beta is None, "version 0's recorded settings"
    # a round started on the Rounds page is remembered: its rule applies to later top-ups
    project_store.update_project(project.id, settings={ROUND_PARAMS: {"query_selection": "diversity",
                                                                      "candidate_factor": 2, "beta": 200.0}})
    settings, beta = batch_settings(project_store, project)
    assert (settings.query_selection, settings.candidate_factor, beta) == ("diversity", 2, 200.0)
    assert settings.pairs_per_batch == PAIRS, "the other settings stay version 0's"
    # fresh pairs (query selection applies to them; extension clips, the default while a
    # start state has room, are not chosen among candidates: tests/test_topup_extension.py)
    job = project_store.jobs.enqueue(project.id, "top_up", {"pairs": 1, "extend": False})
    assert run_worker(project_store, once=True, handler_modules=["fkpd.studio"], heartbeat_s=0.5,
                      stale_after_s=None) == 1
    done = project_store.jobs.get(job.id)
    assert done.status == "succeeded", done.error
    assert len(done.result["pair_ids"]) == 1
    folder = max(project_store.resolve(f"projects/{project.id}/batches").glob("round001-*"),
                 key=lambda d: d.stat().st_mtime)
    assert sorted(f.name for f in folder.glob("*.mp4")) == ["p000_a.mp4", "p000_b.mp4"], \
        "only the chosen pair's clips were rendered"
    pool = PairPlan.pool(0, 1, 1, 60, 12, first=PAIRS, factor=2)
    seeds = [Segment.load(f).reset_seed for f in sorted(folder.glob("*.npz"))]
    assert seeds[0] == seeds[1] and seeds[0] in pool.reset_seeds


def test_the_rounds_page_offers_the_query_selection_and_remembers_it(app, project_store):  # noqa: F811
    from fkpd.studio.history import ROUND_PARAMS
    from fkpd.studio.topup import batch_settings

    project = project_store.get_project(PROJECT)
    project_store.update_project(project.id, settings={ROUND_PARAMS: {"query_selection": "diversity",
                                                                      "candidate_factor": 4}})
    at = app()
    at.switch_page("pages/rounds.py").run()
    at.text_input(key="admin_pw").input(ADMIN_PASSWORD)
    next(b for b in at.button if b.label == "Sign in").click().run()
    assert not at.exception
    assert at.selectbox(key="query_selection").value == "diversity", "the project's current rule"
    assert at.number_input(key="candidate_factor").value == 4
    ada = project_store.get_or_create_annotator("ada")
    project_store.answer(project_store.next_pair(project.id, ada).id, ada, "left")
    at.selectbox(key="query_selection").select("disagreement")
    next(b for b in at.button if b.label == "Run alignment round").click().run()
    assert any("Queued alignment round" in m.value for m in at.success)
    job = project_store.jobs.list(project.id, status="queued")[0]
    assert (job.params["query_selection"], job.params["candidate_factor"]) == ("disagreement", 4)
    assert batch_settings(project_store, project)[0].query_selection == "disagreement", "top-ups follow it"
