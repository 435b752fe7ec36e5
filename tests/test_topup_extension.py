"""Issue #13 ("annotators never wait"): top-ups extend start states with one more clip.

* the plan (:mod:`fkpd.prefs.extension`), pure: smallest groups first, the K cap,
  deterministic noise seeds distinct within a group, balanced sides, a retried plan
  re-renders the same clips;
* the store's groups (:meth:`fkpd.store.Store.seed_groups`) on SQLite and PostgreSQL;
* real ``top_up`` jobs on the tiny bootstrapped project of ``conftest_app`` (copied into
  a fresh PostgreSQL schema for the PostgreSQL leg): an extension clip adds ``g`` pairs,
  each of two clips of one version, reset seed and segment start, none repeating a pair;
  they are handed out and trained on; full groups fall back to fresh pairs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from conftest_app import PAIRS, PROJECT, bootstrapped_project, project_dir  # noqa: F401
from conftest_store import artifact_dir, db_url, store  # noqa: F401
from fkpd.prefs.extension import (
    MAX_CLIPS_PER_SEED,
    ExtensionClip,
    extension_noise_seed,
    new_clip_left,
    plan_extension,
)
from fkpd.store import SeedGroup, Store, StoreInputError, run_worker
from fkpd.store import models as m


def group(seed: int, clips: int, first_pair: int | None = None, start: int | None = 5, retired: bool = False,
          noise: tuple[int, ...] | None = None) -> SeedGroup:
    """A group of ``clips`` clips (ids ``seed*100 + i``) from reset seed ``seed``."""
    ids = tuple(seed * 100 + i for i in range(clips))
    return SeedGroup(seed, start, 12, ids, tuple(range(clips)) if noise is None else noise,
                     seed if first_pair is None else first_pair, clips - 1, retired)


# ------------------------------------------------------------------ the plan (pure)


def test_smallest_groups_first_ties_by_place_in_the_round_until_enough_pairs():
    groups = [group(1, 3, first_pair=0), group(2, 2, first_pair=5), group(3, 2, first_pair=2), group(4, 3, first_pair=1)]
    plan = plan_extension(groups, 4)
    assert [(c.reset_seed, c.number) for c in plan] == [(3, 2), (2, 2)], "the 2-clip groups, earliest pair first"
    assert sum(c.new_pairs for c in plan) == 4
    plan = plan_extension(groups, 5)
    assert [(c.reset_seed, c.number) for c in plan] == [(3, 2), (2, 2), (1, 3)], "then the 3-clip ones"
    assert sum(c.new_pairs for c in plan) == 7, "pairs >= n: the last clip may give more than needed"
    # every start state gets a 3rd clip before any gets a 4th, even within one plan
    plan = plan_extension([group(s, 2) for s in range(5)], 100)
    assert [c.number for c in plan] == [2] * 5 + [3] * 5
    assert [c.reset_seed for c in plan] == list(range(5)) * 2
    assert plan_extension(groups, 0) == []


def test_the_cap_stops_each_group_at_k_clips():
    groups = [group(1, 2), group(2, 3), group(3, MAX_CLIPS_PER_SEED), group(4, 5)]
    plan = plan_extension(groups, 1000)
    assert Counter(c.reset_seed for c in plan) == {1: 2, 2: 1}, "each up to K = 4 clips; full ones never"
    assert sum(c.new_pairs for c in plan) == 2 + 3 + 3
    assert MAX_CLIPS_PER_SEED == 4
    assert plan_extension([group(1, 4), group(2, 4)], 10) == [], "all full: nothing to extend"
    assert len(plan_extension([group(1, 2)], 100, cap=6)) == 4
    assert plan_extension([group(1, 2)], 100, cap=2) == []
    # groups that cannot be extended: no recorded start, a retired pair
    assert plan_extension([group(1, 2, start=None), group(2, 2, retired=True)], 10) == []
    for bad in ({"pairs": -1}, {"pairs": 2.5}, {"cap": 1}, {"cap": True}):
        with pytest.raises(ValueError):
            plan_extension([group(1, 2)], **{"pairs": 3, **bad})


def test_noise_seeds_are_deterministic_and_distinct_within_a_group():
    groups = [group(s, 2, noise=(11 * s, 11 * s + 1)) for s in range(6)]
    plan = plan_extension(groups, 100)
    assert plan == plan_extension(groups, 100), "the same groups, the same plan"
    for s in range(6):
        seeds = [c.noise_seed for c in plan if c.reset_seed == s]
        assert len(seeds) == 2 and len(set(seeds) | {11 * s, 11 * s + 1}) == 4
        assert seeds == [extension_noise_seed(s, 2), extension_noise_seed(s, 3)]
    assert extension_noise_seed(7, 2) != extension_noise_seed(7, 3) != extension_noise_seed(8, 3)
    assert 0 <= extension_noise_seed(10**12, 9) < 2**62
    # a clash with a clip of the group is avoided (and stays deterministic)
    clash = extension_noise_seed(1, 2)
    other = plan_extension([group(1, 2, noise=(clash, 5))], 1)[0].noise_seed
    assert other != clash and other == extension_noise_seed(1, 2, taken={clash, 5})
    # the clip's request: same start state and segment, its own noise
    req = plan[0].request()
    assert (req.reset_seed, req.noise_seed, req.max_steps, req.render_from) == (0, plan[0].noise_seed, 17, 5)
    assert plan[0].request(render=False).render_from is None


def test_a_retried_plan_renders_the_clips_the_first_attempt_did_not_register():
    groups = [group(s, 2) for s in range(4)]
    plan = plan_extension(groups, 8)
    assert len(plan) == 4
    # the first attempt registered its first clip (id 999) and that clip's pairs, then died
    first = plan[0]
    grown = [SeedGroup(g.reset_seed, g.start, g.length, g.clip_ids + (999,), g.noise_seeds + (first.noise_seed,),
                       g.first_pair, g.pairs + 2) if g.reset_seed == first.reset_seed else g for g in groups]
    assert plan_extension(grown, 8 - first.new_pairs) == plan[1:]


def test_new_pairs_pair_the_new_clip_with_each_clip_of_its_group_on_alternating_sides():
    plan = plan_extension([group(1, 2)], 100)  # 2 -> 4 clips: clips 2 and 3
    assert [(c.number, c.partners, c.earlier) for c in plan] == [(2, (100, 101), ()), (3, (100, 101), (0,))]
    made = plan[0].pairs(500) + plan[1].pairs(501, {0: 500})
    assert made == [(500, 100), (101, 500), (100, 501), (501, 101), (500, 501)]
    assert len({frozenset(p) for p in made} | {frozenset((100, 101))}) == 6, "K = 4 clips: all 6 pairs, once each"
    with pytest.raises(KeyError):
        plan[1].pairs(501)  # the earlier clip of the plan is not registered yet
    left = [new_clip_left(c.number, j) for c in plan for j in range(c.new_pairs)]
    assert left == [True, False, False, True, False]
    # over a round (every group gets a 3rd clip) the new clip is left in exactly half the pairs
    wide = plan_extension([group(s, 2) for s in range(10)], 20)
    sides = Counter(p[0] == 1000 + i for i, c in enumerate(wide) for p in c.pairs(1000 + i))
    assert sides[True] == sides[False] == 10


# ------------------------------------------------------------------ the store's groups (both backends)


def _clip(store: Store, version_id: int, seed: int | None, k: int, **meta) -> int:
    rng = np.random.default_rng(k)
    rel, sha = store.artifacts.save_segment(f"seg/{version_id}-{seed}-{k}.npz", rng.normal(size=(6, 3)),
                                            rng.normal(size=(6, 2)), rng.normal(size=6))
    return store.add_clip(version_id, segment_path=rel, segment_sha256=sha, length=6 + k % 2, fps=30,
                          reset_seed=seed, meta=meta).id


def test_seed_groups_are_the_rounds_current_policy_clips_by_reset_seed_and_start(store):
    project = store.create_project("proj", "metaworld/door-open-v3", "")
    v0 = store.add_policy_version(project.id, round=0)
    v1 = store.add_policy_version(project.id, round=1, parent_id=v0.id)
    a = [_clip(store, v0.id, 7, k, start=3, noise_seed=40 + k) for k in range(3)]
    b = [_clip(store, v0.id, 8, k, start=0, noise_seed=50 + k) for k in range(2)]
    ids = store.add_pairs(project.id, [(b[0], b[1]), (a[0], a[1]), (a[2], a[0]), (a[1], a[2])], round=1)
    # not counted: dataset clips, clips without a reset seed, clips of another version or
    # round, a clip of no pair (a crashed extension), clips without a recorded start
    d = [_clip(store, v0.id, 9, k, start=0, source="dataset") for k in range(2)]
    n = [_clip(store, v0.id, None, k, start=0) for k in range(2)]
    o = [_clip(store, v1.id, 7, k, start=3) for k in range(2)]
    r = [_clip(store, v0.id, 7, 10 + k, start=3) for k in range(2)]
    _clip(store, v0.id, 7, 20, start=3, noise_seed=99)
    u = [_clip(store, v0.id, 10, k) for k in range(2)]
    store.add_pairs(project.id, [(d[0], d[1]), (n[0], n[1]), (u[0], u[1])], round=1)
    store.add_pairs(project.id, [(o[0], o[1])], round=2)
    store.add_pairs(project.id, [(r[0], r[1])], round=2)
    groups = store.seed_groups(project.id, 1, v0.id)
    assert [(g.reset_seed, g.start, g.clip_ids, g.clips, g.pairs, g.first_pair) for g in groups] == [
        (8, 0, tuple(b), 2, 1, ids[0]), (7, 3, tuple(a), 3, 3, ids[1]), (10, None, tuple(u), 2, 1, ids[0] + 6)]
    assert groups[1].noise_seeds == (40, 41, 42) and groups[1].length == 7 and groups[0].length == 7
    assert not any(g.retired for g in groups)
    assert store.seed_groups(project.id, 2, v0.id)[0].clip_ids == tuple(r), "round 2 has its own groups"
    assert store.seed_groups(project.id, 1, v1.id) == [] and store.seed_groups(project.id, 3, v0.id) == []
    store.retire_pair(ids[0])
    assert [g.retired for g in store.seed_groups(project.id, 1, v0.id)] == [True, False, False]
    with pytest.raises(StoreInputError):
        store.seed_groups(project.id, "1", v0.id)


# ------------------------------------------------------------------ real top-up jobs (both backends)


def _copy_project(src: Store, dst: Store) -> None:
    """Register the bootstrapped project of ``src`` in ``dst`` (same artifact directory):
    its versions, clips and pairs, with new ids."""
    project = src.get_project(PROJECT)
    copy = dst.create_project(project.name, project.task_id, project.instructions, project.settings,
                              identity=project.identity)
    versions: dict[int, int] = {}
    for v in src.list_policy_versions(project.id):
        metrics = {k: val for k, val in v.metrics.items() if k != "job_id"}  # the job is src's
        versions[v.id] = dst.add_policy_version(copy.id, v.checkpoint_path, checkpoint_sha256=v.checkpoint_sha256,
                                                parent_id=versions.get(v.parent_id), round=v.round,
                                                metrics=metrics).id
    with src.session() as s:
        pairs = s.execute(select(m.Pair.left_clip_id, m.Pair.right_clip_id, m.Pair.round)
                          .where(m.Pair.project_id == project.id).order_by(m.Pair.id)).all()
    for left, right, round_ in pairs:
        rows = []
        for c in (src.get_clip(left), src.get_clip(right)):
            rows.append(dict(policy_version_id=versions[c.policy_version_id], segment_path=c.segment_path,
                             segment_sha256=c.segment_sha256, video_path=c.video_path, video_sha256=c.video_sha256,
                             length=c.length, fps=c.fps, reset_seed=c.reset_seed, gt_return=c.gt_return,
                             gt_success=c.gt_success, meta=c.meta))
        ids = [c.id for c in dst.add_clips(rows)]
        dst.add_pairs(copy.id, [(ids[0], ids[1])], round=round_)


@pytest.fixture
def served(db_url: str, project_dir: Path):  # noqa: F811
    """The bootstrapped project (version 0, a batch of PAIRS pairs of round 1): the SQLite
    copy itself, or that copy registered in a fresh PostgreSQL schema."""
    sqlite = f"sqlite:///{project_dir / 'fkpd.sqlite'}"
    if db_url.startswith("sqlite"):
        with Store(sqlite, project_dir / "artifacts") as store:
            yield store
        return
    with Store(sqlite, project_dir / "artifacts") as src, Store(db_url, project_dir / "artifacts") as store:
        _copy_project(src, store)
        yield store


def test_the_job_takes_extend_true_or_false():
    from fkpd.studio import ParamError
    from fkpd.studio.topup import parse_params

    assert parse_params({"extend": False}) is None and parse_params({"pairs": 3, "extend": True}) == 3
    for bad in ({"extend": "no"}, {"extend": 0}, {"extend": None}):
        with pytest.raises(ParamError, match="extend"):
            parse_params(bad)


def _run_top_up(store: Store, params: dict) -> dict:
    project = store.get_project(PROJECT)
    job = store.jobs.enqueue(project.id, "top_up", params)
    assert run_worker(store, once=True, handler_modules=["fkpd.studio"], kinds=["top_up"], heartbeat_s=0.5,
                      stale_after_s=None) == 1
    done = store.jobs.get(job.id)
    assert done.status == "succeeded", done.error
    return done.result


def _round_pairs(store: Store, round_: int = 1) -> list[tuple[int, int, int]]:
    """``(pair id, left clip id, right clip id)`` of the round's pairs, by id."""
    project = store.get_project(PROJECT)
    with store.session() as s:
        return [tuple(r) for r in s.execute(select(m.Pair.id, m.Pair.left_clip_id, m.Pair.right_clip_id)
                                            .where(m.Pair.project_id == project.id, m.Pair.round == round_)
                                            .order_by(m.Pair.id))]


def _check_pairs_rule(store: Store, pairs) -> None:
    """DESIGN.md §3 for every pair: one version, one reset seed, one segment start and
    length; and no two pairs of the same two clips."""
    for _, left, right in pairs:
        a, b = store.get_clip(left), store.get_clip(right)
        assert a.policy_version_id == b.policy_version_id
        assert a.reset_seed == b.reset_seed is not None
        assert (a.meta["start"], a.length) == (b.meta["start"], b.length)
        assert a.meta["noise_seed"] != b.meta["noise_seed"]
    assert len({frozenset(p[1:]) for p in pairs}) == len(pairs), "a pair of clips never repeats"


def test_an_extension_clip_adds_one_pair_per_clip_of_its_group_and_they_are_labelled_and_trained(served):
    store = served
    project = store.get_project(PROJECT)
    batch = _round_pairs(store)
    assert len(batch) == PAIRS
    result = _run_top_up(store, {"pairs": 2 * PAIRS})
    # every start state gets a 3rd clip: 4 clips, 2 pairs each
    assert (result["extension_clips"], result["extension_pairs"], result["fresh_pairs"]) == (PAIRS, 2 * PAIRS, 0)
    assert result["first_pair"] == PAIRS and result["reason"] == ""
    pairs = _round_pairs(store)
    new = pairs[PAIRS:]
    assert [p[0] for p in new] == result["pair_ids"]
    _check_pairs_rule(store, pairs)
    groups = store.seed_groups(project.id, 1, store.latest_policy_version(project.id).id)
    assert sorted(g.clips for g in groups) == [3] * PAIRS and sorted(g.pairs for g in groups) == [3] * PAIRS
    old_clips = {c for p in batch for c in p[1:]}
    extension_clips = {c for p in new for c in p[1:]} - old_clips
    assert len(extension_clips) == PAIRS
    for clip_id in extension_clips:
        clip = store.get_clip(clip_id)
        assert clip.meta["extension"] is True and clip.meta["clip"] == 2 and clip.video_path
        assert store.resolve(clip.video_path).stat().st_size > 0 and store.resolve(clip.segment_path).is_file()
        partners = {p[1] if p[2] == clip_id else p[2] for p in new if clip_id in p[1:]}
        assert len(partners) == 2 and partners <= old_clips
        assert {store.get_clip(c).reset_seed for c in partners} == {clip.reset_seed}
    assert Counter(p[1] in extension_clips for p in new) == {True: PAIRS, False: PAIRS}, "balanced sides"
    # progressive: each clip's pairs were registered before the next clip was
    clips_in_order = sorted(extension_clips)
    with store.session() as s:
        pair_at = {i: at for i, at in s.execute(select(m.Pair.id, m.Pair.created_at)
                                                .where(m.Pair.id.in_([p[0] for p in new])))}
        clip_at = {i: at for i, at in s.execute(select(m.Clip.id, m.Clip.created_at)
                                                .where(m.Clip.id.in_(clips_in_order)))}
    for before, after in zip(clips_in_order, clips_in_order[1:]):
        its_pairs = [p[0] for p in new if before in p[1:]]
        assert max(pair_at[p] for p in its_pairs) <= clip_at[after]
    # open, handed out by next_pair (after the batch), answered, then training data
    ada = store.get_or_create_annotator("ada")
    handed = []
    while (pair := store.next_pair(project.id, ada)) is not None:
        handed.append(pair.id)
        assert pair.round == 1
        store.answer(pair.id, ada, "left" if len(handed) % 2 else "right")
    assert handed == [p[0] for p in pairs], "the batch, then the new pairs, in order"
    trained = {(tp.left.id, tp.right.id) for tp in store.training_pairs(project.id)}
    assert {p[1:] for p in new} <= trained and len(trained) == len(pairs)


def test_full_groups_fall_back_to_fresh_pairs(served):
    store = served
    project = store.get_project(PROJECT)
    result = _run_top_up(store, {"pairs": 1000})
    # K = 4 clips per start state: 2 more clips per group, 2 + 3 new pairs
    assert (result["extension_clips"], result["extension_pairs"]) == (2 * PAIRS, 5 * PAIRS)
    pairs = _round_pairs(store)
    _check_pairs_rule(store, pairs)
    seeds = Counter(store.get_clip(p[1]).reset_seed for p in pairs)
    assert sorted(seeds.values()) == [6] * PAIRS, "every start state: all 6 pairs of its 4 clips"
    version = store.latest_policy_version(project.id)
    assert sorted(g.clips for g in store.seed_groups(project.id, 1, version.id)) == [MAX_CLIPS_PER_SEED] * PAIRS
    # no group has room: today's fresh pairs, from reset seeds the round has not used
    result = _run_top_up(store, {"pairs": 2})
    assert (result["extension_pairs"], result["extension_clips"], result["fresh_pairs"]) == (0, 0, 2)
    assert result["first_pair"] == 6 * PAIRS
    fresh = _round_pairs(store)[6 * PAIRS:]
    assert [p[0] for p in fresh] == result["pair_ids"]
    _check_pairs_rule(store, _round_pairs(store))
    fresh_seeds = {store.get_clip(p[1]).reset_seed for p in fresh}
    assert len(fresh_seeds) == 2 and not fresh_seeds & set(seeds)
    assert all(not store.get_clip(c).meta.get("extension") for p in fresh for c in p[1:])
    # the next top-up extends the fresh pairs' start states
    result = _run_top_up(store, {"pairs": 1})
    assert (result["extension_clips"], result["extension_pairs"], result["fresh_pairs"]) == (1, 2, 0)
    last = _round_pairs(store)[-2:]
    assert {store.get_clip(p[1]).reset_seed for p in last} == {store.get_clip(fresh[0][1]).reset_seed}
    # and {"extend": false} asks for fresh pairs whatever the groups
    assert _run_top_up(store, {"pairs": 1, "extend": False})["fresh_pairs"] == 1


def test_while_the_batch_renders_only_extension_clips_top_it_up(served):
    """While the job that registered the served version still adds its batch, pair by
    pair, top-ups extend the registered pairs' start states and never render fresh pairs
    (those would take the batch's pair indices); with those start states full nothing is
    queued until the batch's job ends, and then fresh pairs follow."""
    from fkpd.studio.topup import maybe_top_up, top_up_state

    store = served
    project = store.get_project(PROJECT)
    version = store.latest_policy_version(project.id)
    rendering = store.jobs.enqueue(project.id, "alignment_round", {})  # stands for the job still adding the batch
    with store.session(write=True) as s:
        row = s.get(m.PolicyVersion, version.id)
        row.metrics = {**row.metrics, "job_id": rendering.id}
    state = top_up_state(store, project)
    assert state.extension_only and not state.batch_ready and state.shortfall > 0

    def run_queued() -> dict | None:
        job = maybe_top_up(store, project)
        if job is None:
            return None
        assert run_worker(store, once=True, handler_modules=["fkpd.studio"], kinds=["top_up"], heartbeat_s=0.5,
                          stale_after_s=None) == 1
        done = store.jobs.get(job.id)
        assert done.status == "succeeded", done.error
        return done.result

    ada = store.get_or_create_annotator("ada")
    results = []
    while (result := run_queued()) is not None:
        results.append(result)
        while (pair := store.next_pair(project.id, ada)) is not None:  # people answer: the supply runs low again
            store.answer(pair.id, ada, "left")
    assert results and all(r["fresh_pairs"] == 0 and r["extension_pairs"] > 0 for r in results)
    assert results[0]["extension_pairs"] >= PAIRS, "at least a batch's worth of pairs per extension job"
    assert sorted(g.clips for g in store.seed_groups(project.id, 1, version.id)) == [MAX_CLIPS_PER_SEED] * PAIRS
    assert len(_round_pairs(store)) == 6 * PAIRS
    _check_pairs_rule(store, _round_pairs(store))
    # a job queued by hand meanwhile renders nothing and says why
    assert "still being rendered" in _run_top_up(store, {"pairs": 2})["reason"]
    assert len(_round_pairs(store)) == 6 * PAIRS
    store.jobs.cancel(rendering.id)  # the batch's job ended: fresh pairs now
    result = run_queued()
    assert result is not None and result["fresh_pairs"] > 0 and result["first_pair"] == 6 * PAIRS
