"""Dataset pairs as a label source (issue #12, point 2): ``fkpd.prefs.dataset_pairs``,
``fkpd loop --label-source dataset|mix`` and the app's ``dataset_share``.

Nothing is mocked: the tiny generated door-open dataset (``tests/conftest.py``), MuJoCo
replays and rendering, the real loop CLI, and a real SQLite store with the worker's
bootstrap and alignment-round jobs (tiny settings as in ``tests/test_rounds.py``).
"""

from __future__ import annotations

import dataclasses
import json

import imageio.v2 as imageio
import numpy as np
import pytest

from conftest_store import db_url  # noqa: F401  (fixture used by name)
from fkpd.cli import main
from fkpd.data import load_dataset
from fkpd.prefs.dataset_pairs import DatasetPairError, DatasetPairSource, DatasetReplay, ReplayError
from fkpd.prefs.pairs import MixedPairSource, RolloutPairSource, dataset_slots, mix_sources
from fkpd.prefs.segments import Segment
from fkpd.store import Store, run_worker
from fkpd.studio.params import ALIGNMENT_ROUND, BOOTSTRAP, BatchSettings, ParamError, RoundParams

TASK = "metaworld/door-open-v3"
L = 8


@pytest.fixture(scope="module")
def ds(tiny_dataset):
    return load_dataset(tiny_dataset, task_id=TASK)


def with_infos(ds, **infos):
    """A copy of ``ds`` whose ``infos`` are replaced by ``infos`` (None drops a key)."""
    new = {**ds.infos, **infos}
    return dataclasses.replace(ds, infos={k: v for k, v in new.items() if v is not None})


def episode_of(ds, row: int) -> int:
    return int(np.searchsorted(ds.episode_ends, row, side="right"))


# --------------------------------------------------------------------------- the source


def test_pairs_are_from_two_episodes_with_length_L_and_the_datasets_own_arrays(ds):
    src = DatasetPairSource(ds, 5, L, seed=3, start=None, task_id=TASK)
    plan = src.plan(1)
    pairs = src.make_pairs(None, 1)
    assert len(pairs) == len(plan) == 5
    for (i, j, s), (left, right) in zip(plan, pairs):
        assert i != j and 0 <= s <= 60 - L
        for e, seg in ((i, left), (j, right)):
            rows = slice(int(ds.episode_starts[e]) + s, int(ds.episode_starts[e]) + s + L)
            assert len(seg) == L and seg.start == s and seg.task_id == TASK
            np.testing.assert_array_equal(seg.observations, ds.observations[rows])
            np.testing.assert_array_equal(seg.actions, ds.actions[rows])
            np.testing.assert_array_equal(seg.rewards, ds.rewards[rows])
            np.testing.assert_array_equal(seg.success, ds.infos["success"][rows])
            assert seg.reset_seed == int(ds.infos["reset_seed"][rows.start])
        assert left.reset_seed != right.reset_seed  # generated data: one episode per reset seed
    # the segments carry the dataset's success flags (60 steps of door-open never succeed:
    # mark some), so the teachers and the ground-truth columns see them
    flags = np.arange(len(ds.actions)) % 50 == 45
    marked = DatasetPairSource(with_infos(ds, success=flags), 15, L, seed=0, start=40)
    for (i, j, s), (a, b) in zip(marked.plan(1), marked.make_pairs(None, 1)):
        assert s == 40 and a.succeeded == flags[int(ds.episode_starts[i]) + 40:][:L].any()
        np.testing.assert_array_equal(b.success, flags[int(ds.episode_starts[j]) + 40:][:L])
    assert any(a.succeeded or b.succeeded for a, b in marked.make_pairs(None, 1))


def test_the_seed_rule_is_reproducible_and_rounds_use_disjoint_episode_pairs(ds):
    def segs(source, r):
        return [(a.observations, b.observations) for a, b in source.make_pairs(None, r)]

    a, b = DatasetPairSource(ds, 5, L, seed=7, start=None), DatasetPairSource(ds, 5, L, seed=7, start=None)
    for r in (1, 2, 5):
        assert a.plan(r) == b.plan(r)
        for (x1, y1), (x2, y2) in zip(segs(a, r), segs(b, r)):
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(y1, y2)
    assert DatasetPairSource(ds, 5, L, seed=8, start=None).plan(1) != a.plan(1)
    # 6 episodes: 15 episode pairs, used once each by rounds 1-3 of 5 pairs
    assert a.candidates == 15
    used = [frozenset((i, j)) for r in (1, 2, 3) for i, j, _ in a.plan(r)]
    assert len(set(used)) == 15
    # the first 3 pairs of a round use each episode once (one day of the round robin)
    assert sorted(e for i, j, _ in a.plan(1)[:3] for e in (i, j)) == list(range(6))
    # a fixed start cuts both segments at that step; the sides are a fair coin
    fixed = DatasetPairSource(ds, 15, L, seed=7, start=10)
    assert {s for _, _, s in fixed.plan(1)} == {10}
    assert 0 < sum(i < j for i, j, _ in fixed.plan(1)) < 15
    # more pairs for a round (top-ups) continue it without repeating its own pairs
    top = DatasetPairSource(ds, 4, L, seed=7, start=None, first=5, stride=5)
    assert len({frozenset((i, j)) for i, j, _ in top.plan(1)}) == 4


def test_same_reset_seed_pairs_and_what_happens_without_them(ds):
    # generated data has one episode per reset seed: refused, saying so
    with pytest.raises(DatasetPairError, match="one episode per reset seed .6 reset seeds."):
        DatasetPairSource(ds, 2, L, same_reset_seed=True)
    with pytest.raises(DatasetPairError, match="no infos/reset_seed"):
        DatasetPairSource(with_infos(ds, reset_seed=None), 2, L, same_reset_seed=True)
    # a dataset with two episodes per reset seed (seeds relabelled; arrays only, no replay)
    seeds = np.repeat(np.array([5, 5, 9, 9, 9, 11]), 60)
    twice = with_infos(ds, reset_seed=seeds)
    src = DatasetPairSource(twice, 4, L, seed=1, same_reset_seed=True)
    assert src.candidates == 1 + 3  # seed 5: one pair; seed 9: three; seed 11: none
    for left, right in src.make_pairs(None, 1):
        assert left.reset_seed == right.reset_seed and left.reset_seed in (5, 9)
        assert not np.array_equal(left.observations, right.observations)
    # episodes shorter than L are never used; fewer than two long enough is refused
    with pytest.raises(DatasetPairError, match="0 episode.s. of at least L = 61 steps"):
        DatasetPairSource(ds, 1, 61)
    # a dataset without success flags gives all-False success
    (a, b), = DatasetPairSource(with_infos(ds, success=None), 1, L).make_pairs(None, 1)
    assert not a.success.any() and not b.success.any()


def test_dataset_slots_spread_the_share_and_compose_over_batches():
    for share in (0.0, 0.25, 0.3, 0.5, 2 / 3, 1.0):
        slots, first = dataset_slots(share, 10)
        assert first == 0 and slots.sum() == int(np.floor(10 * share + 0.5))
        more, before = dataset_slots(share, 7, first=10)
        assert before == slots.sum() and more.sum() == dataset_slots(share, 17)[0].sum() - slots.sum()
        np.testing.assert_array_equal(np.concatenate([slots, more]), dataset_slots(share, 17)[0])
    np.testing.assert_array_equal(dataset_slots(0.5, 3)[0], [True, False, True])
    with pytest.raises(ValueError, match="between 0 and 1"):
        dataset_slots(1.5, 3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dataset_slots(float("nan"), 3)


def test_mix_sources_keeps_a_zero_share_as_the_policy_source_and_orders_a_mixed_batch(ds):
    policy = RolloutPairSource([], 4, L)
    assert mix_sources(4, 0.0, lambda n, f: policy, lambda n, f, s: pytest.fail("no dataset pairs")) is policy
    only = mix_sources(4, 1.0, lambda n, f: pytest.fail("no policy pairs"),
                       lambda n, f, s: DatasetPairSource(ds, n, L, first=f, stride=s))
    assert isinstance(only, DatasetPairSource) and (only.pairs, only.first, only.stride) == (4, 0, 4)
    # two dataset sources stand in for both kinds: the batch order follows the slots
    first, second = DatasetPairSource(ds, 2, L, seed=1), DatasetPairSource(ds, 2, L, seed=2)
    mixed = MixedPairSource(first, second, np.array([True, False, False, True]))
    seen, progress = [], []
    got = mixed.make_pairs(None, 1, on_clip=lambda c: seen.append((c.pair, c.side)),
                           progress=lambda done, total: progress.append((done, total)))
    want_first, want_second = first.make_pairs(None, 1), second.make_pairs(None, 1)
    for k, src, i in ((0, want_second, 0), (1, want_first, 0), (2, want_first, 1), (3, want_second, 1)):
        np.testing.assert_array_equal(got[k][0].observations, src[i][0].observations)
    assert seen == [(1, 0), (1, 1), (2, 0), (2, 1), (0, 0), (0, 1), (3, 0), (3, 1)]
    assert progress[-1] == (8, 8) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    with pytest.raises(ValueError, match="slots must mark 2 of 4"):
        MixedPairSource(first, second, np.array([True, False, False, False]))


# --------------------------------------------------------------------------- replay


def test_replay_reproduces_the_stored_observations_and_renders_frames(ds):
    replay = DatasetReplay(TASK, render_size=(32, 32))
    replay.check(ds, episodes=ds.num_episodes)  # every episode replays exactly
    try:
        ep = replay.replay(ds, 2, stop=20, render_from=12)
    finally:
        replay.close()
    rows = slice(int(ds.episode_starts[2]), int(ds.episode_starts[2]) + 20)
    assert ep.frames.shape == (20 - 12 + 1, 32, 32, 3) and ep.frames.dtype == np.uint8
    assert ep.frames.std() > 0
    np.testing.assert_allclose(ep.observations, ds.observations[rows], atol=1e-5)
    np.testing.assert_allclose(ep.rewards, ds.rewards[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ep.success, ds.infos["success"][rows])
    assert ep.reset_seed == int(ds.infos["reset_seed"][rows.start])

    # a rendered dataset source hands its clips to the writer with L + 1 frames
    clips = []
    src = DatasetPairSource(ds, 2, L, seed=0, start=5, render=True, task_id=TASK,
                            replay=DatasetReplay(TASK, render_size=(32, 32)))
    pairs = src.make_pairs(None, 1, on_clip=clips.append)
    assert len(clips) == 4 and [(c.pair, c.side) for c in clips] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for clip in clips:
        assert clip.episode.frames.shape == (L + 1, 32, 32, 3)
        assert clip.request.render_from == 5 and clip.request.reset_seed == clip.segment.reset_seed
        assert clip.meta["source"] == "dataset" and clip.meta["dataset_row"] == (
            int(ds.episode_starts[clip.meta["episode"]]) + 5)
        assert not clip.shared_start  # two episodes, two reset seeds
        assert clip.segment is pairs[clip.pair][clip.side]


def test_replay_refuses_a_dataset_whose_replay_diverges_or_that_has_no_reset_seeds(ds):
    rng = np.random.default_rng(0)
    noisy = dataclasses.replace(ds, actions=np.clip(ds.actions + 0.1 * rng.standard_normal(ds.actions.shape),
                                                    -1, 1).astype(np.float32))
    replay = DatasetReplay(TASK, render_size=(32, 32))
    with pytest.raises(ReplayError, match=r"replaying episode 0 \(reset seed \d+\) from its stored actions does "
                                          r"not reproduce its stored observations: at step \d+ they differ by"):
        replay.check(noisy)
    with pytest.raises(ReplayError, match="no infos/reset_seed.*cannot be rendered for people"):
        replay.check(with_infos(ds, reset_seed=None))
    # a wrong observation in the file (noise in the stored observations) is caught at its step
    obs = ds.observations.copy()
    obs[int(ds.episode_starts[1]) + 7] += 0.01
    with pytest.raises(ReplayError, match="episode 1 .* at step 7 they differ by 0.01"):
        replay.check(dataclasses.replace(ds, observations=obs))
    # a rendered source stops at the first diverging clip: nothing after it is written
    written = []
    src = DatasetPairSource(noisy, 2, L, seed=0, start=20, render=True, task_id=TASK, replay=replay)
    with pytest.raises(ReplayError):
        src.make_pairs(None, 1, on_clip=written.append)
    assert written == []


# --------------------------------------------------------------------------- fkpd loop


def loop_args(tiny_dataset, tiny_checkpoint, out, *extra):
    return ["loop", "--task", TASK, "--teacher", "smooth", "--rounds", "2", "--pairs-per-round", "3",
            "--segment-length", str(L), "--max-episode-steps", "20", "--eval-episodes", "2", "--n-envs", "3",
            "--bc-checkpoint", str(tiny_checkpoint), "--dataset", str(tiny_dataset), "--out-dir", str(out),
            "--steps", "4", "--batch-pairs", "2", "--bc-batch-size", "16", "--device", "cpu", *extra]


@pytest.mark.slow
def test_loop_labels_dataset_pairs(tiny_dataset, tiny_checkpoint, ds, tmp_path):
    out = tmp_path / "dataset"
    assert main(loop_args(tiny_dataset, tiny_checkpoint, out, "--label-source", "dataset")) == 0
    summary = json.loads((out / "loop.json").read_text())
    assert summary["loop"]["label_source"] == "dataset"
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and rounds[2]["labels"] == 6
    assert sum(rounds[1]["outcomes"].values()) == 3 and 0.0 <= rounds[2]["implicit_acc"] <= 1.0
    ds_seeds = set(ds.infos["reset_seed"].tolist())
    used = []
    for r in (1, 2):
        for k in range(3):
            a, b = (Segment.load(out / f"round{r}" / "segments" / f"p{k:04d}_{s}.npz") for s in "ab")
            assert len(a) == len(b) == L and a.reset_seed in ds_seeds and b.reset_seed in ds_seeds
            assert a.reset_seed != b.reset_seed
            used.append(frozenset((a.reset_seed, b.reset_seed)))
    assert len(set(used)) == 6, "the two rounds label disjoint episode pairs"


@pytest.mark.slow
def test_loop_mixes_dataset_and_policy_pairs_and_renders_both(tiny_dataset, tiny_checkpoint, ds, tmp_path):
    out = tmp_path / "mix"
    assert main(loop_args(tiny_dataset, tiny_checkpoint, out, "--label-source", "mix", "--dataset-share", "0.5",
                          "--rounds", "1", "--render", "true")) == 0
    rounds = json.loads((out / "loop.json").read_text())["rounds"]
    assert rounds[1]["labels"] == 3
    seg_dir = out / "round1" / "segments"
    ds_seeds = set(ds.infos["reset_seed"].tolist())
    for k, kind in enumerate(("dataset", "policy", "dataset")):  # dataset_slots(0.5, 3)
        a, b = (Segment.load(seg_dir / f"p{k:04d}_{s}.npz") for s in "ab")
        if kind == "dataset":
            assert a.reset_seed != b.reset_seed and {a.reset_seed, b.reset_seed} <= ds_seeds
        else:
            assert a.reset_seed == b.reset_seed >= 1_000_000_000
        for seg in (a, b):
            with imageio.get_reader(str(seg.video)) as reader:
                assert reader.count_frames() == L + 1


def test_loop_refuses_a_bad_label_source_or_share(tiny_dataset, tiny_checkpoint, tmp_path, capsys):
    assert main(loop_args(tiny_dataset, tiny_checkpoint, tmp_path / "a", "--label-source", "humans")) == 2
    assert "--label-source must be one of policy, dataset, mix, got 'humans'" in capsys.readouterr().err
    assert main(loop_args(tiny_dataset, tiny_checkpoint, tmp_path / "b", "--label-source", "mix",
                          "--dataset-share", "1.5")) == 2
    assert "--dataset-share must be between 0 and 1, got 1.5" in capsys.readouterr().err


# --------------------------------------------------------------------------- the app


PROJECT = "door"
TINY = {
    "dataset_episodes": 4, "max_episode_steps": 60, "bc_steps": 30,
    "bc": {"batch_size": 32, "warmup_steps": 5, "save_every": 10},
    "policy": {"hidden_dim": 64, "n_blocks": 1},
    "pairs_per_batch": 3, "segment_length": L, "render_size": 64, "n_envs": 2, "eval_episodes": 2,
    "threads": 1, "dataset_share": 0.5,
}  # fmt: skip
ALIGN = {"steps": 10, "batch_pairs": 4, "bc_batch_size": 32, "warmup_steps": 2}


def run_job(store: Store, kind: str, params: dict):
    job = store.jobs.enqueue(PROJECT, kind, params)
    assert run_worker(store, once=True, handler_modules=["fkpd.studio"], heartbeat_s=0.2, stale_after_s=None) == 1
    return store.jobs.get(job.id)


def batch_clips(store: Store, round_: int):
    """``[(left, right), ...]`` clip records of the round's pairs, in pair order."""
    from sqlalchemy import select

    from fkpd.store import models as m

    with store.session() as s:
        pairs = s.scalars(select(m.Pair).where(m.Pair.round == round_).order_by(m.Pair.id)).all()
        ids = [(p.left_clip_id, p.right_clip_id) for p in pairs]
    return [(store.get_clip(a), store.get_clip(b)) for a, b in ids]


def test_batch_settings_validate_the_dataset_share():
    assert BatchSettings().dataset_share == 0.0 and BatchSettings(dataset_share=1).dataset_share == 1.0
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(ParamError, match="'dataset_share' must be a number from 0 to 1"):
            BatchSettings(dataset_share=bad)
    with pytest.raises(ParamError, match="dataset_share"):
        RoundParams.from_params({"dataset_share": float("nan")})
    assert RoundParams.from_params({"dataset_share": 0.25}).batch == {"dataset_share": 0.25}


@pytest.mark.slow
def test_a_store_batch_with_a_dataset_share_registers_replayed_clips(db_url, tmp_path):  # noqa: F811
    from fkpd.studio.batches import dataset_pairs
    from fkpd.studio.errors import RoundError

    with Store(db_url, tmp_path / "artifacts") as store:
        store.create_project(PROJECT, TASK, "Which arm opens the door?")
        job = run_job(store, BOOTSTRAP, TINY)
        assert job.status == "succeeded", job.error
        (v0,) = store.list_policy_versions(PROJECT)
        assert v0.metrics["bootstrap"]["settings"]["dataset_share"] == 0.5
        data = load_dataset(store.resolve(v0.metrics["bootstrap"]["dataset"]), task_id=TASK)
        pairs = batch_clips(store, 1)
        assert [left.meta.get("source", "policy") for left, _ in pairs] == ["dataset", "policy", "dataset"]
        seen = set()
        for k, (left, right) in enumerate(pairs):
            for side, clip in zip("ab", (left, right)):
                assert clip.meta["pair"] == k and clip.meta["side"] == side and clip.length == L
                seg = Segment.load(store.resolve(clip.segment_path))
                with imageio.get_reader(str(store.resolve(clip.video_path))) as reader:
                    assert reader.count_frames() == L + 1 and reader.get_data(0).shape == (64, 64, 3)
                if clip.meta.get("source") == "dataset":
                    row = clip.meta["dataset_row"]
                    assert episode_of(data, row) == clip.meta["episode"]
                    np.testing.assert_array_equal(seg.observations, data.observations[row:row + L])
                    np.testing.assert_array_equal(seg.actions, data.actions[row:row + L])
                    # the store keeps reset seeds only for clips of one initial state: kept in meta
                    assert clip.reset_seed is None and clip.meta["noise_seed"] is None
                    assert clip.meta["dataset_reset_seed"] == int(data.infos["reset_seed"][row]) == seg.reset_seed
                    assert clip.gt_return == pytest.approx(float(data.rewards[row:row + L].sum()))
                else:
                    assert clip.reset_seed >= 1_000_000_000
            if left.meta.get("source") == "dataset":
                assert left.meta["episode"] != right.meta["episode"]
                seen.add(frozenset((left.meta["episode"], right.meta["episode"])))
            else:
                assert left.reset_seed == right.reset_seed

        # people's answers on dataset pairs train the next round like any other
        me = store.get_or_create_annotator("ann")
        for outcome in ("left", "right", "left"):
            store.answer(store.next_pair(PROJECT, me).id, me, outcome)
        job = run_job(store, ALIGNMENT_ROUND, ALIGN)
        assert job.status == "succeeded", job.error
        assert job.result["labels_used"] == 3
        nxt = batch_clips(store, 2)
        assert [left.meta.get("source", "policy") for left, _ in nxt] == ["dataset", "policy", "dataset"]
        later = {frozenset((a.meta["episode"], b.meta["episode"])) for a, b in nxt if a.meta.get("source")}
        assert len(later) == 2 and not later & seen, "round 2 labels other episode pairs than round 1"

    # a dataset that cannot be replayed is refused before anything is made, saying why
    no_seeds = tmp_path / "no_seeds.hdf5"
    from fkpd.data import write_dataset

    ends = np.zeros(len(data.actions), bool)
    ends[data.episode_ends - 1] = True
    write_dataset(no_seeds, {"observations": data.observations, "actions": data.actions, "rewards": data.rewards,
                             "terminals": np.zeros_like(ends), "timeouts": ends},
                  infos={"success": data.infos["success"]})
    settings = BatchSettings(**{k: v for k, v in TINY.items() if k in ("pairs_per_batch", "segment_length",
                                                                        "render_size", "dataset_share")})
    with pytest.raises(RoundError, match="dataset_share is 0.5 but the project's dataset cannot give dataset pairs "
                                         "for people: .*no infos/reset_seed.*Set dataset_share to 0"):
        dataset_pairs(TASK, str(no_seeds), settings, 1, 0, 1)
    # ... and a bootstrap on such a dataset fails before behaviour cloning trains on it
    with Store(db_url, tmp_path / "artifacts") as store:
        store.create_project("no-seeds", TASK, "Which arm opens the door?")
        job = store.jobs.enqueue("no-seeds", BOOTSTRAP, {**TINY, "dataset": str(no_seeds)})
        assert run_worker(store, once=True, handler_modules=["fkpd.studio"], heartbeat_s=0.2,
                          stale_after_s=None) == 1
        failed = store.jobs.get(job.id)
        assert failed.status == "failed" and "dataset_share is 0.5" in failed.error and "reset_seed" in failed.error
        assert store.list_policy_versions("no-seeds") == []
        project_id = store.get_project("no-seeds").id
        made = tmp_path / "artifacts" / "projects" / str(project_id)
        assert not list(made.rglob("state.json")) and not list(made.rglob("model.safetensors")), "BC never started"
