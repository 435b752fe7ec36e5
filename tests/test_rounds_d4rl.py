"""D4RL projects through the real worker: ``bootstrap`` and ``alignment_round`` on a
maze2d task (generated data) and a locomotion task (the task's own D4RL file, found by
name in D4RL's cache directory), with clips rendered as for MetaWorld; and labels in
Preference Transformer's published layout imported into the locomotion project and
trained on.

Everything is tiny (a few short episodes, a 64-wide one-block policy, 30 BC steps, 10
alignment steps, 2 pairs of 8-step clips at 64x64, one torch thread). Nothing is
downloaded: the hopper file is written here in the exact D4RL v2 layout
(``tests/test_d4rl.py``). SQLite only: the PostgreSQL leg of ``tests/test_rounds.py``
covers the store side.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from sqlalchemy import select

from fkpd.studio.errors import RoundError
from fkpd.studio.params import ALIGNMENT_ROUND, BOOTSTRAP, BootstrapParams
from fkpd.prefs.segments import Segment
from fkpd.store import Store, run_worker, sha256_file
from fkpd.store import models as m
from fkpd.studio import StudioConfig, StudioError, enqueue_compare, open_project, rounds_history, version_label
import test_rounds
from test_d4rl import _hopper_episodes, write_d4rl_file

PAIRS = 2
TINY = {**test_rounds.TINY, "pairs_per_batch": PAIRS}  # the MetaWorld round tests' tiny settings, 2 pairs
ALIGN = test_rounds.ALIGN
L = test_rounds.L
HOPPER = "d4rl/hopper-medium-v2"


def run_job(store: Store, project: str, kind: str, params: dict):
    """Enqueue one job and run it with the worker ``fkpd worker`` runs."""
    job = store.jobs.enqueue(project, kind, params)
    assert run_worker(store, once=True, handler_modules=["fkpd.studio"], heartbeat_s=0.2, stale_after_s=None) == 1
    return store.jobs.get(job.id)


def assert_clips_rendered(store: Store, version, task: str, pairs: int = PAIRS) -> None:
    """The version's batch: ``pairs`` pairs of clips whose videos are H.264 MP4s of 64x64
    frames and whose segments are at most L steps of the task, all matching their sha256."""
    with store.session() as s:
        clips = s.scalars(select(m.Clip).where(m.Clip.policy_version_id == version.id)).all()
    assert len(clips) == 2 * pairs
    for clip in clips:
        video = store.resolve(clip.video_path)
        assert sha256_file(video) == clip.video_sha256 and video.read_bytes()[4:8] == b"ftyp"
        with imageio.get_reader(str(video)) as reader:
            assert reader.get_meta_data()["codec"] == "h264"
            assert reader.get_data(0).shape == (64, 64, 3)
        seg = Segment.load(store.resolve(clip.segment_path))
        assert 1 <= len(seg) == clip.length <= L and seg.task_id == task


def answer(store: Store, project: str, outcomes: list[str]) -> None:
    me = store.get_or_create_annotator("ann")
    for outcome in outcomes:
        store.answer(store.next_pair(project, me).id, me, outcome)


@pytest.fixture
def store(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'fkpd.sqlite'}", tmp_path / "artifacts") as s:
        yield s


# --------------------------------------------------------------------------- maze2d


@pytest.mark.slow
def test_maze2d_project_bootstraps_and_aligns(store):
    store.create_project("maze", "d4rl/maze2d-umaze")
    job = run_job(store, "maze", BOOTSTRAP, TINY)
    assert job.status == "succeeded", job.error
    assert job.result["dataset"] == "generated" and job.result["bc"] == "trained"
    (v0,) = store.list_policy_versions("maze")
    assert (v0.round, v0.parent_id) == (0, None) and "d4rl_normalized_score" in v0.metrics
    assert v0.metrics["bootstrap"]["dataset"].endswith("/dataset.hdf5")
    assert_clips_rendered(store, v0, "d4rl/maze2d-umaze")
    assert store.batch_progress("maze", 1) == (0, PAIRS)
    hist = rounds_history(store, store.get_project("maze"))
    assert hist.loc[0, "d4rl_score"] == pytest.approx(v0.metrics["d4rl_normalized_score"])
    assert version_label(v0).startswith(f"v{v0.id} · BC · ") and " · D4RL score " in version_label(v0)

    answer(store, "maze", ["left", "right"])
    job = run_job(store, "maze", ALIGNMENT_ROUND, ALIGN)
    assert job.status == "succeeded", job.error
    v1 = store.latest_policy_version("maze")
    assert (v1.round, v1.parent_id, v1.metrics["labels_used"]) == (1, v0.id, 2)
    assert store.batch_progress("maze", 2) == (0, PAIRS)
    assert_clips_rendered(store, v1, "d4rl/maze2d-umaze")


# --------------------------------------------------------------------------- locomotion


def _valid_q_starts(path: Path, count: int) -> list[int]:
    """``count`` start indices (in d4rl.qlearning_dataset rows) of L-step segments that
    stay inside one episode of the file."""
    from fkpd.data import load_dataset
    from fkpd.prefs.importers import d4rl_qlearning_rows

    ds = load_dataset(path)
    rows = d4rl_qlearning_rows(ds.timeouts)
    ends = np.zeros(len(ds.rewards), bool)
    ends[ds.episode_ends - 1] = True
    cum = np.concatenate([[0], np.cumsum(ends)])
    ok = [s for s in range(len(rows) - L + 1) if cum[rows[s + L - 1]] == cum[rows[s]]]
    assert len(ok) >= count, "the random hopper episodes are too short for the test"
    return [ok[i] for i in np.linspace(0, len(ok) - 1, count).round().astype(int)]


@pytest.mark.slow
def test_locomotion_project_bootstraps_from_the_d4rl_cache_and_trains_on_imported_labels(
        store, tmp_path, monkeypatch):
    from fkpd.data.d4rl import dataset_file
    from fkpd.prefs.importers import import_pt_labels

    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    path = dataset_file("hopper-medium-v2")
    path.parent.mkdir()
    write_d4rl_file(path, _hopper_episodes(n_eps=4, steps=40))
    store.create_project("hopper", HOPPER)

    job = run_job(store, "hopper", BOOTSTRAP, TINY)
    assert job.status == "succeeded", job.error
    assert job.result["dataset"] == "named" and job.result["bc"] == "trained"
    (v0,) = store.list_policy_versions("hopper")
    boot = v0.metrics["bootstrap"]
    assert boot["dataset_source"] == "hopper-medium-v2" and "dataset" not in boot
    assert boot["dataset_episodes"] == 4 and boot["key"] == BootstrapParams.from_params(TINY).key(HOPPER)
    assert isinstance(v0.metrics["d4rl_normalized_score"], float) and v0.metrics["success_rate"] == 0.0
    assert_clips_rendered(store, v0, HOPPER)

    # Preference Transformer's folder layout, indexed over the same D4RL file, found by name
    starts = _valid_q_starts(path, 6)
    folder = tmp_path / "human_label" / "hopper-medium-v2"
    folder.mkdir(parents=True)
    for name, value in (("indices_num3", np.array(starts[:3])), ("indices_2_num3", np.array(starts[3:])),
                        ("label_human", [0, 1, -1])):
        with open(folder / name, "wb") as f:
            pickle.dump(value, f)
    summary = import_pt_labels(store, "hopper", "hopper-medium-v2", folder, segment_length=L)
    assert summary.n_comparisons == 3 and summary.dataset == str(path)
    imported = store.get_policy_version(summary.policy_version_id)
    assert version_label(imported) == f"v{imported.id} · imported labels"
    with pytest.raises(StudioError, match="holds imported labels, not a policy"):
        enqueue_compare(store, store.get_project("hopper"), v0.id, imported.id)
    assert rounds_history(store, store.get_project("hopper"))["regularizer"].tolist() == [
        "— (BC)", "— (imported labels)"]

    # the imported version has no checkpoint: a re-run of the bootstrap still finds version 0
    again = run_job(store, "hopper", BOOTSTRAP, TINY)
    assert again.status == "succeeded", again.error
    assert again.result["policy_version_id"] == v0.id and again.result["pair_ids"] == []

    answer(store, "hopper", ["left"])
    job = run_job(store, "hopper", ALIGNMENT_ROUND, ALIGN)
    assert job.status == "succeeded", job.error
    v1 = store.latest_policy_version("hopper")
    assert (v1.round, v1.parent_id, v1.metrics["reference_id"]) == (1, v0.id, v0.id)
    assert v1.metrics["labels_used"] == 4, "3 imported comparisons + 1 answered in the app"
    assert_clips_rendered(store, v1, HOPPER)


def test_a_missing_bootstrap_dataset_fails_clearly(store, tmp_path, monkeypatch):
    """Nothing is trained when the dataset is not there; the error says where it looked."""
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.chdir(tmp_path)
    store.create_project("hopper", HOPPER)
    store.create_project("maze", "d4rl/maze2d-umaze")
    here = re.escape(str(tmp_path))
    cases = [
        ("hopper", {}, rf"'hopper-medium-v2' \(task {HOPPER}'s own D4RL dataset; D4RL locomotion data is not "
                       rf"generated\) is not in D4RL's cache directory on the worker's machine: looked for "
                       rf"'{here}/d4rl/hopper_medium-v2.hdf5'.*never downloads: fetch http"),
        ("maze", {"dataset": "maze2d-umaze-v1"}, r"'maze2d-umaze-v1' \(named by bootstrap parameter 'dataset'\) "
                                                 r"is not in D4RL's cache directory.*maze2d-umaze-sparse-v1.hdf5"),
        ("maze", {"dataset": "data/maze.hdf5"}, rf"'data/maze.hdf5' .* there is no file '{here}/data/maze.hdf5' "
                                                rf"\(a relative path is read from the worker's working directory"),
        ("maze", {"dataset": 3}, "parameter 'dataset' must be a file path, a D4RL dataset name or minari:"),
    ]
    for project, params, message in cases:
        job = run_job(store, project, BOOTSTRAP, {**TINY, **params})
        # a bad value is a ParamError (a RoundError: fkpd.studio.errors); a missing file a RoundError
        kind = "ParamError" if params == {"dataset": 3} else "RoundError"
        assert job.status == "failed" and job.error.startswith(f"{kind}: "), job.error
        assert re.search(message, job.error), job.error
    # a file of the wrong task is refused before training, naming the dimension
    write_d4rl_file(tmp_path / "hopper.hdf5", _hopper_episodes(n_eps=1, steps=10))
    job = run_job(store, "maze", BOOTSTRAP, {**TINY, "dataset": "hopper.hdf5"})
    assert job.status == "failed" and "observation dimension is 11 but task d4rl/maze2d-umaze has Do=4" in job.error
    assert store.list_policy_versions("hopper") == store.list_policy_versions("maze") == []


def test_the_bootstrap_key_changes_with_the_dataset():
    metaworld = BootstrapParams.from_params(TINY)
    named = BootstrapParams.from_params({**TINY, "dataset": "/data/a.hdf5"})
    other = BootstrapParams.from_params({**TINY, "dataset": "/data/b.hdf5"})
    task = "metaworld/door-open-v3"
    assert len({metaworld.key(task), named.key(task), other.key(task)}) == 3
    assert metaworld.dataset_source(task) == "" and named.dataset_source(task) == "/data/a.hdf5"
    # a locomotion task's default is its own D4RL dataset; naming it explicitly is the same key
    loco = BootstrapParams.from_params(TINY)
    assert loco.dataset_source(HOPPER) == "hopper-medium-v2"
    assert loco.key(HOPPER) == BootstrapParams.from_params({**TINY, "dataset": "hopper-medium-v2"}).key(HOPPER)
    # generation settings do not matter for a named dataset
    assert named.key(task) == BootstrapParams.from_params({**TINY, "dataset": "/data/a.hdf5",
                                                          "dataset_episodes": 7}).key(task)


def test_the_app_starts_d4rl_projects_with_their_own_instructions(store):
    """FKPD_TASK picks the task, FKPD_BOOTSTRAP (set by whoever runs the server) may name
    the dataset; the queued bootstrap carries it, and the instructions fit the task."""
    env = {"FKPD_TASK": HOPPER, "FKPD_BOOTSTRAP": '{"dataset": "/data/hopper_medium-v2.hdf5", "bc_steps": 10}'}
    project, job = open_project(store, StudioConfig.from_env(env))
    assert (project.name, project.task_id) == ("hopper-medium", HOPPER)
    assert job.kind == BOOTSTRAP and job.params == {"dataset": "/data/hopper_medium-v2.hdf5", "bc_steps": 10}
    assert "one-legged hopper robot" in project.instructions and "robot arm" not in project.instructions
    maze, _ = open_project(store, StudioConfig.from_env({"FKPD_TASK": "d4rl/maze2d-umaze"}))
    assert maze.name == "maze2d-umaze" and "red goal disc" in maze.instructions
    door, _ = open_project(store, StudioConfig.from_env({}))
    assert door.instructions.startswith("Watch both clips of the robot arm") and "(door-open-v3)" in door.instructions
    with pytest.raises(RoundError, match="parameter 'dataset' must be"):
        open_project(store, StudioConfig.from_env({"FKPD_TASK": HOPPER, "FKPD_PROJECT": "x",
                                                   "FKPD_BOOTSTRAP": '{"dataset": ["a"]}'}))
