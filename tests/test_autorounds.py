"""Issue #13, points 1-3: the project starts with no browser, rounds start by themselves,
and top-up pairs keep annotators busy.

Store-level rules run on SQLite and on PostgreSQL (``FKPD_TEST_DATABASE_URL``) with
synthetic projects (:func:`conftest_store.make_project`); the jobs themselves (a real
top-up render, a real automatic round) run on the tiny bootstrapped SQLite project of
``conftest_app``.
"""

from __future__ import annotations

import threading

import pytest

from conftest_app import PAIRS, PROJECT, bootstrapped_project, project_dir, project_store, studio_env  # noqa: F401
from conftest_store import artifact_dir, db_url, make_clips, make_project, store  # noqa: F401
from fkpd.store import Store, Worker, run_worker
from fkpd.studio import (
    StudioConfig,
    StudioError,
    auto_round_state,
    enqueue_round,
    maybe_start_round,
    maybe_top_up,
    open_project,
    set_auto_rounds,
    top_up_state,
)
from fkpd.studio.config import AUTO_ROUND_EVERY, TOP_UP
from fkpd.studio.topup import parse_params, top_up_size, top_up_target
from fkpd.studio.upkeep import upkeep


def _served_project(store: Store, n_pairs: int, every: int | None = None):
    """A project with a version 0 that has a (fake) checkpoint and ``n_pairs`` open pairs of
    round 1 from it; automatic rounds after ``every`` comparisons when given."""
    project = store.create_project("proj", "metaworld/door-open-v3", "", exist_ok=True)
    ckpt, _ = store.write_artifact_atomic("ckpt/model.safetensors", b"not really weights")
    version = store.add_policy_version(project.id, ckpt, round=0, metrics={"kind": "bootstrap"})
    pairs = [tuple(make_clips(store, version.id, seed)) for seed in range(n_pairs)]
    store.add_pairs(project.id, pairs, round=1)
    if every is not None:
        store.update_project(project.id, settings={AUTO_ROUND_EVERY: every})
    return store.get_project(project.id), version


def _answer(store: Store, project, who: str, n: int, outcome: str = "left") -> None:
    ann = store.get_or_create_annotator(who)
    for _ in range(n):
        pair = store.next_pair(project.id, ann)
        assert pair is not None, "ran out of pairs"
        store.answer(pair.id, ann, outcome)


# ------------------------------------------------------------------ automatic rounds (both backends)


def test_a_round_starts_after_n_new_comparisons_and_never_twice(store):
    project, v0 = _served_project(store, 6, every=3)
    state = auto_round_state(store, project)
    assert (state.every, state.new, state.due) == (3, 0, False)
    assert "0 of 3 new comparisons" in state.describe()
    _answer(store, project, "ada", 2)
    _answer(store, project, "ada", 1, "skip")  # skips are never trained on, so they do not count
    assert maybe_start_round(store, project) is None and auto_round_state(store, project).new == 2
    _answer(store, project, "bob", 1, "equal")
    assert auto_round_state(store, project).due
    job = maybe_start_round(store, project)
    assert job is not None and job.kind == "alignment_round"
    assert maybe_start_round(store, project) is None, "never two at once"
    assert "Alignment round (job" in auto_round_state(store, project).describe()
    assert [j.kind for j in store.jobs.list(project.id)] == ["alignment_round"]
    # the round registers version 1, trained on the 3 comparisons: the count starts again
    claimed = store.jobs.claim("w")
    ckpt, _ = store.write_artifact_atomic("ckpt1/model.safetensors", b"v1")
    store.add_policy_version(project.id, ckpt, parent_id=v0.id, round=1, metrics={"labels_used": 3})
    store.jobs.finish(claimed.id, {}, worker_id="w")
    assert auto_round_state(store, project).new == 0
    assert maybe_start_round(store, project) is None


def test_concurrent_checks_queue_one_round(store):
    project, _ = _served_project(store, 4, every=1)
    _answer(store, project, "ada", 2)
    results: list = []
    barrier = threading.Barrier(4)

    def check() -> None:
        barrier.wait()
        results.append(maybe_start_round(store, project))

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r is not None for r in results) == 1
    assert [j.kind for j in store.jobs.list(project.id)] == ["alignment_round"]


def test_off_means_manual_and_a_failed_round_pauses_until_the_setting_is_saved(store):
    project, _ = _served_project(store, 6)
    _answer(store, project, "ada", 3)
    assert not auto_round_state(store, project).enabled, "a project without the setting starts rounds by hand"
    assert maybe_start_round(store, project) is None
    assert "off" in auto_round_state(store, project).describe()
    project = set_auto_rounds(store, project, 2)
    assert maybe_start_round(store, project) is not None
    job = store.jobs.claim("w")
    store.jobs.fail(job.id, "Traceback...\nTrainingError: loss is NaN", worker_id="w")
    state = auto_round_state(store, project)
    assert state.paused and "loss is NaN" in state.paused and not state.due
    assert maybe_start_round(store, project) is None, "a failing round is not retried in a loop"
    project = set_auto_rounds(store, project, 2)  # the admin saves the setting again: resumed
    assert auto_round_state(store, project).paused is None
    assert maybe_start_round(store, project) is not None
    project = set_auto_rounds(store, project, 0)
    assert not auto_round_state(store, project).enabled
    for bad in (-1, 1.5, True, "3", 10**9):
        with pytest.raises(StudioError, match="integer between 1 and"):
            set_auto_rounds(store, project, bad)


def test_automatic_rounds_use_the_last_parameters_an_admin_chose(store):
    project, _ = _served_project(store, 6, every=2)
    _answer(store, project, "ada", 1)
    manual = enqueue_round(store, project, {"steps": 7, "beta": 250.0})
    store.jobs.cancel(manual.id)
    project = set_auto_rounds(store, project, 2)  # resume after the cancelled round
    _answer(store, project, "ada", 1)
    job = maybe_start_round(store, project)
    assert job is not None and (job.params["steps"], job.params["beta"]) == (7, 250.0)


# ------------------------------------------------------------------ top-up rules (both backends)


def test_top_up_is_queued_when_open_pairs_run_low_and_only_after_the_batch(store):
    project = store.create_project("proj", "metaworld/door-open-v3", "", exist_ok=True)
    assert top_up_state(store, project) is None and maybe_top_up(store, project) is None, "before the bootstrap"
    ckpt, _ = store.write_artifact_atomic("ckpt/model.safetensors", b"weights")
    version = store.add_policy_version(project.id, ckpt, round=0)
    state = top_up_state(store, project)
    assert (state.round, state.open_pairs, state.batch_ready) == (1, 0, False)
    assert maybe_top_up(store, project) is None, "the bootstrap renders round 1's batch first"
    store.add_pairs(project.id, [tuple(make_clips(store, version.id, s)) for s in range(12)], round=1)
    state = top_up_state(store, project)
    assert (state.open_pairs, state.round_pairs, state.target, state.shortfall) == (12, 12, 10, 0)
    assert maybe_top_up(store, project) is None
    _answer(store, project, "ada", 3)
    state = top_up_state(store, project)
    assert (state.open_pairs, state.active_annotators, state.target) == (9, 1, 10)
    job = maybe_top_up(store, project)
    assert job is not None and job.kind == TOP_UP and job.params == {}
    assert maybe_top_up(store, project) is None, "one top-up at a time"
    # six annotators holding leases raise the target to 12
    for who in ("b", "c", "d", "e", "f"):
        store.lease_pairs(project.id, store.get_or_create_annotator(who).id, 1)
    assert top_up_state(store, project).target == 12
    # a failed top-up is not retried at once
    claimed = store.jobs.claim("w", [TOP_UP])
    store.jobs.fail(claimed.id, "boom", worker_id="w")
    assert maybe_top_up(store, project) is None


def test_upkeep_is_an_idle_hook_of_the_default_worker(store):
    project, _ = _served_project(store, 2, every=1)
    _answer(store, project, "ada", 1)
    queued = upkeep(store)
    assert sorted(j.kind for j in queued) == ["alignment_round", TOP_UP]
    assert upkeep(store) == []
    assert upkeep in Worker(store).idle_hooks, "fkpd worker's default worker runs it"
    assert not Worker(store, handlers={}).idle_hooks, "a worker with its own handlers runs no hooks"
    assert Worker(store, kinds=[TOP_UP]).claimable_kinds() == [TOP_UP]
    assert TOP_UP not in Worker(store, skip_kinds=[TOP_UP]).claimable_kinds()


def test_top_up_sizes_and_parameters():
    from fkpd.studio import BatchSettings
    from fkpd.studio import ParamError

    s = BatchSettings(pairs_per_batch=20, n_envs=8)
    assert [top_up_size(k, s) for k in (0, 1, 4, 5, 10, 50)] == [0, 4, 4, 8, 12, 20]
    assert top_up_target(0) == 10 and top_up_target(7) == 14
    assert parse_params({}) is None and parse_params({"pairs": 3}) == 3
    for bad in ({"pairs": 0}, {"pairs": 2.0}, {"pairs": True}, {"extra": 1}):
        with pytest.raises(ParamError):
            parse_params(bad)


def test_pair_plan_top_up_seeds_continue_the_round_and_never_collide():
    from fkpd.prefs.pairs import MAX_PAIRS_PER_ROUND, PairPlan, pair_seed

    import numpy as np

    batch = PairPlan.for_round(0, 2, 20, horizon=200, length=64)
    same = PairPlan.for_round(0, 2, 20, horizon=200, length=64, first=0)
    assert batch.reset_seeds == same.reset_seeds and np.array_equal(batch.noise_seeds, same.noise_seeds)
    more = PairPlan.for_round(0, 2, 8, horizon=200, length=64, first=20)
    assert more.reset_seeds == tuple(pair_seed(0, 2, i) for i in range(20, 28))
    assert not set(batch.reset_seeds) & set(more.reset_seeds)
    with pytest.raises(ValueError, match="do not fit the seed plan"):
        PairPlan.for_round(0, 2, 10, horizon=200, length=64, first=MAX_PAIRS_PER_ROUND - 5)


# ------------------------------------------------------------------ real jobs on the bootstrapped project


def test_open_project_turns_automatic_rounds_on_for_a_new_project(tmp_path):
    cfg = StudioConfig.from_env(studio_env(tmp_path))
    with cfg.open_store() as store:
        project, job = open_project(store, cfg)
        assert job.kind == "bootstrap" and project.settings[AUTO_ROUND_EVERY] == PAIRS
    off = StudioConfig.from_env(studio_env(tmp_path / "b", FKPD_AUTO_ROUNDS="0"))
    with off.open_store() as store:
        assert open_project(store, off)[0].settings[AUTO_ROUND_EVERY] == 0
    assert StudioConfig.from_env({"FKPD_AUTO_ROUNDS": "50"}).auto_rounds == 50
    with pytest.raises(StudioError, match="FKPD_AUTO_ROUNDS"):
        StudioConfig.from_env({"FKPD_AUTO_ROUNDS": "many"})


def test_top_up_renders_trainable_pairs(project_store):
    store = project_store
    project = store.get_project(PROJECT)
    ada = store.get_or_create_annotator("ada")
    batch = store.lease_pairs(project.id, ada.id, PAIRS)
    assert len(batch) == PAIRS
    added, firsts = [], []
    while (job := maybe_top_up(store, project)) is not None:  # what idle workers do, until the target is met
        assert run_worker(store, once=True, handler_modules=["fkpd.studio"], heartbeat_s=0.5,
                          stale_after_s=None) == 1
        done = store.jobs.get(job.id)
        assert done.status == "succeeded", done.error
        firsts.append(done.result["first_pair"])
        added += done.result["pair_ids"]
        assert len(firsts) < 5, "the target is reached in a few jobs"
    state = top_up_state(store, project)
    # shortfall 10 - 4 = 6: one job of at most a batch (4 pairs: two extension clips of 2
    # pairs each), then the remaining 2, rounded up to a batch's worth (extension clips are
    # cheap: two more clips, 4 pairs)
    assert firsts == [PAIRS, PAIRS + 4] and len(added) == 8
    assert state.open_pairs == 12 and state.target == 10 and state.round_pairs == PAIRS + 8
    # the top-up pairs are handed out (same round, ada holds the batch) and their answers are training data
    bob = store.get_or_create_annotator("bob")
    leased = store.lease_pairs(project.id, bob.id, 20)
    assert {p.id for p in leased} == set(added) and {p.round for p in leased} == {1}
    assert {p.policy_version_id for p in leased} == {batch[0].policy_version_id}, "from the served version"
    seeds = [store.get_clip(p.left.id).reset_seed for p in batch + leased]
    assert set(seeds[PAIRS:]) == set(seeds[:PAIRS]), "extension clips: every start state of the batch gets a 3rd clip"
    for p in leased:
        assert store.get_clip(p.right.id).reset_seed == store.get_clip(p.left.id).reset_seed
        store.answer(p.id, bob, "right")
    assert store.count_training_pairs(project.id) == 8
    from fkpd.studio.batches import StoreLabeller

    labels = StoreLabeller(store, project).labels()
    assert len(labels) == 8 and all(p == 0.0 for _, _, p in labels)


def test_an_automatic_round_runs_after_n_answers_with_no_browser(project_store):
    """The worker's idle check queues the round after PAIRS answers; the round trains,
    registers version 1 and renders round 2; the next check queues nothing more."""
    store = project_store
    project = store.get_project(PROJECT)
    store.update_project(project.id, settings={"round_params": {"steps": 3}})
    assert auto_round_state(store, project).every == PAIRS
    _answer(store, project, "ada", PAIRS - 1)
    assert [j.kind for j in upkeep(store)] == [TOP_UP], "not yet: a top-up only"
    store.jobs.cancel(store.jobs.list(project.id, status="queued")[0].id)
    _answer(store, project, "ada", 1)
    queued = [j for j in upkeep(store) if j.kind == "alignment_round"]
    assert len(queued) == 1 and queued[0].params["steps"] == 3
    assert run_worker(store, once=True, handler_modules=["fkpd.studio"], heartbeat_s=0.5, stale_after_s=None) >= 1
    done = store.jobs.get(queued[0].id)
    assert done.status == "succeeded", done.error
    v1 = store.latest_policy_version(project.id)
    assert v1.round == 1 and v1.metrics["labels_used"] == PAIRS
    assert auto_round_state(store, project).new == 0
    assert not [j for j in upkeep(store) if j.kind == "alignment_round"]
