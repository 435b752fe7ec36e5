"""The ``bootstrap`` and ``alignment_round`` jobs (``fkpd.studio.bootstrap``, ``fkpd.studio.alignment``) against a real store.

Every test runs on an SQLite file and, with ``FKPD_TEST_DATABASE_URL`` set, on
PostgreSQL (``db_url`` from ``tests/conftest_store.py``). Nothing is mocked: data
generation, behaviour cloning, alignment, MuJoCo rendering, H.264 encoding, and a real
worker process killed with SIGKILL.

Everything is tiny (4 episodes of 60 steps, a 64-wide one-block policy, 30 BC steps,
10 alignment steps, 3 pairs of 8-step clips at 64x64). The first test generates and
trains in an artifact directory of its own; the others share one, each with a database
of its own, so only the first of them trains BC and the later ones reuse it, as a re-run
after a crash does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from sqlalchemy import select

from conftest_store import db_url, wait_for  # noqa: F401  (fixtures are used by name)
from fkpd.policy import DiffusionPolicy, read_checkpoint_meta
from fkpd.studio.params import ALIGNMENT_ROUND, BOOTSTRAP
from fkpd.prefs.segments import Segment
from fkpd.store import JobContext, Store, Worker, run_worker, sha256_file
from fkpd.store import models as m

TASK = "metaworld/door-open-v3"
PROJECT = "door"
PAIRS = 3
L = 8
TINY = {
    "dataset_episodes": 4, "max_episode_steps": 60, "bc_steps": 30,
    "bc": {"batch_size": 32, "warmup_steps": 5, "save_every": 10},
    "policy": {"hidden_dim": 64, "n_blocks": 1},
    "pairs_per_batch": PAIRS, "segment_length": L, "render_size": 64, "n_envs": 2, "eval_episodes": 2,
    "threads": 1,
}  # fmt: skip
ALIGN = {"steps": 10, "batch_pairs": 4, "bc_batch_size": 32, "warmup_steps": 2}
WORKER = """
import sys
from fkpd.store import Store, run_worker
with Store(sys.argv[1], sys.argv[2]) as store:
    run_worker(store, handler_modules=["fkpd.studio"], poll_s=0.1, worker_id="doomed", heartbeat_s=0.2,
               stale_after_s=None)
"""


def spawn_worker(store: Store, log: Path) -> subprocess.Popen:
    """An ``fkpd``-style worker in a child process (worker id ``doomed``), logging to ``log``."""
    url = store.url.render_as_string(hide_password=False)
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", WORKER, url, str(store.artifact_dir)], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "MUJOCO_GL": "egl"})


def assert_alive(proc: subprocess.Popen, log: Path) -> None:
    if proc.poll() is not None:
        pytest.fail(f"worker exited with {proc.returncode}:\n{log.read_text()}")


@pytest.fixture(scope="module")
def shared_artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture
def store(db_url, shared_artifacts):  # noqa: F811
    with Store(db_url, shared_artifacts) as s:
        s.create_project(PROJECT, TASK, "Which arm opens the door?")
        yield s


@pytest.fixture
def fresh_store(db_url, tmp_path):  # noqa: F811
    """A store with an artifact directory of its own: its bootstrap always generates and trains."""
    with Store(db_url, tmp_path / "artifacts") as s:
        s.create_project(PROJECT, TASK, "Which arm opens the door?")
        yield s


def run_job(store: Store, kind: str, params: dict | None = None):
    """Enqueue one job and run it with the worker the ``fkpd worker`` command runs."""
    job = store.jobs.enqueue(PROJECT, kind, params or {})
    assert run_worker(store, once=True, handler_modules=["fkpd.studio"], heartbeat_s=0.2, stale_after_s=None) == 1
    return store.jobs.get(job.id)


def bootstrap(store: Store):
    job = run_job(store, BOOTSTRAP, TINY)
    assert job.status == "succeeded", job.error
    return job


def all_rows(store: Store, model):
    with store.session() as s:
        return s.scalars(select(model).order_by(model.id)).all()


def assert_artifacts_intact(store: Store) -> list:
    """Every checkpoint and clip row names a complete file with the recorded sha256."""
    for version in all_rows(store, m.PolicyVersion):
        if version.checkpoint_path is not None:
            path = store.resolve(version.checkpoint_path)
            assert sha256_file(path) == version.checkpoint_sha256, version.checkpoint_path
            DiffusionPolicy.load(path.parent, task_id=TASK)  # complete: config.json + weights that match it
    clips = all_rows(store, m.Clip)
    for clip in clips:
        for rel, sha in ((clip.segment_path, clip.segment_sha256), (clip.video_path, clip.video_sha256)):
            assert rel is not None and sha256_file(store.resolve(rel)) == sha, rel
    return clips


def answer_batch(store: Store, annotator: str, outcomes: list[str]) -> list[int]:
    me = store.get_or_create_annotator(annotator)
    answered = []
    for outcome in outcomes:
        pair = store.next_pair(PROJECT, me)
        store.answer(pair.id, me, outcome)
        answered.append(pair.id)
    return answered


# --------------------------------------------------------------------------- bootstrap


@pytest.mark.slow
def test_bootstrap_registers_version_0_clips_and_an_open_batch(fresh_store, monkeypatch, tmp_path):
    store = fresh_store
    reports = []
    report = JobContext.progress

    def recording(ctx, fraction, message=None):
        reports.append((fraction, message))
        report(ctx, fraction, message)

    monkeypatch.setattr(JobContext, "progress", recording)
    job = run_job(store, BOOTSTRAP, TINY)
    assert job.status == "succeeded", job.error
    assert job.result["dataset"] == "generated" and job.result["bc"] == "trained"
    messages = [msg for _, msg in reports]
    assert messages[0] == "generating dataset: 4 episodes"
    assert {"training BC: step 0/30", "training BC: step 30/30", "evaluating: episode 2/2",
            f"rendering batch: clip {2 * PAIRS}/{2 * PAIRS}"} <= set(messages)
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    (v0,) = store.list_policy_versions(PROJECT)
    assert (v0.round, v0.parent_id) == (0, None)
    assert job.result["policy_version_id"] == v0.id and job.result["next_round"] == 1
    assert 0.0 <= v0.metrics["success_rate"] <= 1.0 and v0.metrics["episodes"] == 2
    assert v0.metrics["bootstrap"]["settings"]["pairs_per_batch"] == PAIRS
    assert read_checkpoint_meta(store.resolve(v0.checkpoint_path))["step"] == 30
    assert job.progress == 1.0

    clips = assert_artifacts_intact(store)
    assert len(clips) == 2 * PAIRS and {c.policy_version_id for c in clips} == {v0.id}
    batch_dir = store.resolve(clips[0].segment_path).parent
    assert sorted(p.name for p in batch_dir.iterdir()) == sorted(
        f"p{k:03d}_{s}.{ext}" for k in range(PAIRS) for s in "ab" for ext in ("npz", "mp4")
    ), "the batch folder holds exactly the registered files, no temporary ones"
    for clip in clips:
        seg = Segment.load(store.resolve(clip.segment_path))
        assert len(seg) == clip.length == L and seg.task_id == TASK
        assert clip.gt_return == pytest.approx(seg.ret) and clip.gt_success == seg.succeeded
        video = store.resolve(clip.video_path)
        assert video.read_bytes()[4:8] == b"ftyp"
        with imageio.get_reader(str(video)) as reader:
            assert reader.get_data(0).shape == (64, 64, 3)

    # one open batch of round 1; both clips of a pair start from the same reset seed
    assert store.batch_progress(PROJECT, 1) == (0, PAIRS)
    pair = store.next_pair(PROJECT, store.get_or_create_annotator("ann"))
    assert pair.round == 1 and pair.policy_version_id == v0.id
    left, right = store.get_clip(pair.left.id), store.get_clip(pair.right.id)
    assert left.reset_seed == right.reset_seed
    assert not np.array_equal(Segment.load(store.resolve(left.segment_path)).actions,
                              Segment.load(store.resolve(right.segment_path)).actions)
    assert pair.left.video_file == store.resolve(left.video_path) and not hasattr(pair.left, "gt_return")

    # a re-run is a no-op: same version, no new pairs; other settings are refused
    again = run_job(store, BOOTSTRAP, TINY)
    assert again.status == "succeeded", again.error
    assert again.result["policy_version_id"] == v0.id and again.result["pair_ids"] == []
    assert again.result["dataset"] == again.result["bc"] == "reused"
    assert len(store.list_policy_versions(PROJECT)) == 1 and store.batch_progress(PROJECT, 1) == (0, PAIRS)
    other = run_job(store, BOOTSTRAP, {**TINY, "bc_steps": 31})
    assert other.status == "failed" and "bootstrapped once" in other.error

    # a bootstrap that finds the finished dataset and checkpoint (a re-run after a crash
    # between training and registering, here from a new database) reuses them
    with Store(f"sqlite:///{tmp_path / 'second.sqlite'}", store.artifact_dir) as second:
        second.create_project(PROJECT, TASK)
        job = run_job(second, BOOTSTRAP, TINY)
        assert job.status == "succeeded", job.error
        assert job.result["dataset"] == job.result["bc"] == "reused"
        (reused,) = second.list_policy_versions(PROJECT)
        assert (reused.checkpoint_path, reused.checkpoint_sha256) == (v0.checkpoint_path, v0.checkpoint_sha256)
        assert second.batch_progress(PROJECT, 1) == (0, PAIRS)
        assert len(assert_artifacts_intact(second)) == 2 * PAIRS


# --------------------------------------------------------------------------- alignment rounds


@pytest.mark.slow
def test_alignment_round_registers_version_1_and_renders_its_batch(store):
    bootstrap(store)
    (v0,) = store.list_policy_versions(PROJECT)
    answer_batch(store, "ann", ["left", "equal", "skip"])
    v0_sha = sha256_file(store.resolve(v0.checkpoint_path))

    # a diverging round (β overflows float32: NaN loss) fails and changes nothing
    bad = run_job(store, ALIGNMENT_ROUND, {**ALIGN, "beta": 1e300})
    assert bad.status == "failed" and "TrainingError" in bad.error and "untouched" in bad.error
    assert store.list_policy_versions(PROJECT) == [v0]
    assert sha256_file(store.resolve(v0.checkpoint_path)) == v0_sha

    job = run_job(store, ALIGNMENT_ROUND, ALIGN)
    assert job.status == "succeeded", job.error
    v1 = store.latest_policy_version(PROJECT)
    assert (v1.round, v1.parent_id) == (1, v0.id) and job.result["policy_version_id"] == v1.id
    assert v1.metrics["labels_used"] == 2 and v1.metrics["trained_pairs"] == 2, "the skip is not trained on"
    assert v1.metrics["reference_id"] == v0.id and v1.metrics["regularizer"] == "forward"
    assert 0.0 <= v1.metrics["implicit_acc"] <= 1.0 and 0.0 <= v1.metrics["success_rate"] <= 1.0
    meta = read_checkpoint_meta(store.resolve(v1.checkpoint_path))
    v0_dir = str(store.resolve(v0.checkpoint_path).parent)
    assert meta["reference"] == v0_dir and meta["parent"] == v0_dir and meta["round"] == 1
    assert sha256_file(store.resolve(v0.checkpoint_path)) == v0_sha

    # the next batch is round 2, rolled out by version 1, and served first
    assert store.batch_progress(PROJECT, 2) == (0, PAIRS)
    pair = store.next_pair(PROJECT, store.get_or_create_annotator("newcomer"))
    assert pair.round == 2 and pair.policy_version_id == v1.id
    assert {store.get_clip(c.id).policy_version_id for c in (pair.left, pair.right)} == {v1.id}

    # round 2 starts from version 1 and keeps version 0 as the reference
    job = run_job(store, ALIGNMENT_ROUND, ALIGN)
    assert job.status == "succeeded", job.error
    v2 = store.latest_policy_version(PROJECT)
    assert (v2.round, v2.parent_id, v2.metrics["reference_id"]) == (2, v1.id, v0.id)
    meta = read_checkpoint_meta(store.resolve(v2.checkpoint_path))
    assert meta["parent"] == str(store.resolve(v1.checkpoint_path).parent) and meta["reference"] == v0_dir
    assert store.batch_progress(PROJECT, 3) == (0, PAIRS)
    assert len(assert_artifacts_intact(store)) == 3 * 2 * PAIRS


@pytest.mark.slow
def test_a_round_after_a_roll_back_trains_from_the_parent_and_renders_a_new_batch(store):
    """Round numbers are never reused: after version 1 is rolled back, the next round
    trains from version 0 as round 2 and renders batch 3 from the new version (batch 2,
    rolled out by the rolled-back version 1, stays and is labelled too)."""
    from fkpd.studio import current_version, roll_back, rounds_history

    bootstrap(store)
    project = store.get_project(PROJECT)
    v0 = store.latest_policy_version(PROJECT)
    answer_batch(store, "ann", ["left", "right", "equal"])
    assert run_job(store, ALIGNMENT_ROUND, ALIGN).status == "succeeded"
    v1 = store.latest_policy_version(PROJECT)
    assert v1.round == 1 and store.batch_progress(PROJECT, 2) == (0, PAIRS)

    assert roll_back(store, project).id == v0.id
    # the open batch is still the rolled-back version's; its answers train the next round
    pair = store.next_pair(PROJECT, store.get_or_create_annotator("ann"))
    assert (pair.round, pair.policy_version_id) == (2, v1.id)
    store.answer(pair.id, store.get_or_create_annotator("ann"), "left")

    job = run_job(store, ALIGNMENT_ROUND, ALIGN)
    assert job.status == "succeeded", job.error
    v2 = store.latest_policy_version(PROJECT)
    assert (v2.round, v2.parent_id, v2.metrics["reference_id"]) == (2, v0.id, v0.id)
    assert v2.metrics["labels_used"] == PAIRS + 1, "the rolled-back version's comparison is trained on"
    meta = read_checkpoint_meta(store.resolve(v2.checkpoint_path))
    assert meta["parent"] == str(store.resolve(v0.checkpoint_path).parent) and meta["round"] == 2
    assert current_version(store, project).id == v2.id
    assert job.result["next_round"] == 3 and len(job.result["pair_ids"]) == PAIRS
    assert store.batch_progress(PROJECT, 3) == (0, PAIRS), "a batch of the new version, not none"
    pair = store.next_pair(PROJECT, store.get_or_create_annotator("newcomer"))
    assert (pair.round, pair.policy_version_id) == (3, v2.id), "the new version's clips are served first"
    hist = rounds_history(store, project).set_index("version")
    assert hist.loc[v1.id, "status"] == "rolled back" and hist.loc[v2.id, "status"] == "served"
    assert sorted(hist["round"]) == [0, 1, 2], "every version has a round of its own"
    assert_artifacts_intact(store)


@pytest.mark.slow
def test_ctrl_c_puts_a_training_bootstrap_back_in_the_queue(fresh_store, tmp_path):
    """Ctrl-C (SIGINT) on a worker that is training BC: it stops at the next step, the job is
    queued again with BC's saved state kept for the next start, and the process exits."""
    store = fresh_store
    job = store.jobs.enqueue(PROJECT, BOOTSTRAP, {**TINY, "bc_steps": 1_000_000})
    log = tmp_path / "worker.log"
    proc = spawn_worker(store, log)
    try:
        def past_first_save() -> bool:
            assert_alive(proc, log)
            msg = store.jobs.get(job.id).message or ""
            return msg.startswith("training BC: step") and int(msg.split()[-1].split("/")[0]) > 20
        wait_for(past_first_save, 120, 0.1, what="BC to train past its first saved state")
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    back = store.jobs.get(job.id)
    assert back.status == "queued" and back.worker_id is None and back.attempts == 1
    assert back.message.endswith("is stopping; queued again")
    (state,) = store.artifact_dir.glob("projects/*/bootstrap-*/bc/train_state/state.json")
    assert json.loads(state.read_text())["step"] >= 20, "the next start resumes BC from its saved state"
    assert store.list_policy_versions(PROJECT) == [], "nothing was registered"
    store.jobs.cancel(job.id)


@pytest.mark.slow
def test_killing_the_worker_mid_round_loses_nothing(store, tmp_path):
    bootstrap(store)
    v0 = store.latest_policy_version(PROJECT)
    answered = answer_batch(store, "ann", ["left", "right"])  # one pair of the batch stays open
    before = store.comparisons_frame(PROJECT)
    assert len(before) == 2

    slow = {**ALIGN, "steps": 1_000_000, "log_every": 1}
    job = store.jobs.enqueue(PROJECT, ALIGNMENT_ROUND, slow)
    log = tmp_path / "worker.log"
    proc = spawn_worker(store, log)
    try:
        def training() -> bool:
            assert_alive(proc, log)
            view = store.jobs.get(job.id)
            return view.message.startswith("aligning: step") and view.progress > 0.05
        wait_for(training, 120, 0.1, what="the worker to report alignment progress")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    orphan = store.jobs.get(job.id)
    assert (orphan.status, orphan.worker_id) == ("running", "doomed")

    wait_for(lambda: store.jobs.recover_stale(0.4, max_attempts=2), 10, what="stale recovery")
    recovered = store.jobs.get(job.id)
    assert recovered.status == "queued" and recovered.error.startswith("worker heartbeat lost (last seen ")
    assert "'doomed'" in recovered.error

    # every comparison is still there, version 0 is still served, the batch is still labellable
    after = store.comparisons_frame(PROJECT)
    assert after.equals(before)
    assert store.latest_policy_version(PROJECT) == v0
    assert store.list_policy_versions(PROJECT) == [v0]
    pair = store.next_pair(PROJECT, store.get_or_create_annotator("newcomer"))
    assert pair is not None and pair.round == 1 and pair.policy_version_id == v0.id and pair.id not in answered
    assert store.batch_progress(PROJECT, 1) == (2, PAIRS)
    assert len(assert_artifacts_intact(store)) == 2 * PAIRS, "the killed round registered no clip"

    # a healthy worker retries the job; cancelling it stops training between two steps, nothing is registered
    worker = Worker(store, heartbeat_s=0.2, stale_after_s=None)
    ended = {}
    thread = threading.Thread(target=lambda: ended.update(view=worker.run_one()))
    thread.start()
    try:
        wait_for(lambda: store.jobs.get(job.id).message.startswith("aligning: step"), 120, 0.1,
                 what="the retry to train")
    finally:
        store.jobs.cancel(job.id)
        thread.join(60)
    assert not thread.is_alive(), "the worker returned from the cancelled job"
    assert ended["view"].status == "cancelled" and ended["view"].attempts == 2
    assert store.list_policy_versions(PROJECT) == [v0]

    # the next round trains on every comparison made before the crash
    done = run_job(store, ALIGNMENT_ROUND, ALIGN)
    assert done.status == "succeeded", done.error
    v1 = store.latest_policy_version(PROJECT)
    assert v1.parent_id == v0.id and v1.metrics["labels_used"] == 2
    assert_artifacts_intact(store)


@pytest.mark.slow
def test_round_without_comparisons_fails_clearly(store):
    bootstrap(store)
    v0 = store.latest_policy_version(PROJECT)
    job = run_job(store, ALIGNMENT_ROUND, ALIGN)
    assert job.status == "failed"
    assert job.message.startswith("RoundError: no comparisons to train on in project 'door'")
    assert f"Version {v0.id} stays the served policy" in job.error

    answer_batch(store, "ann", ["skip"] * PAIRS)  # only skips: still nothing to train on
    job = run_job(store, ALIGNMENT_ROUND, ALIGN)
    assert job.status == "failed" and "skips are never trained on; latest batch: 3/3 answers" in job.error
    assert store.list_policy_versions(PROJECT) == [v0]
    assert len(store.comparisons_frame(PROJECT)) == PAIRS


@pytest.mark.slow
def test_a_retried_round_whose_version_was_registered_only_renders_its_batch(store):
    bootstrap(store)
    v0 = store.latest_policy_version(PROJECT)
    # the state a worker leaves when it dies between registering version 1 and its batch
    job = store.jobs.enqueue(PROJECT, ALIGNMENT_ROUND, ALIGN)
    v1 = store.add_policy_version(PROJECT, v0.checkpoint_path, parent_id=v0.id, round=1,
                                  metrics={"kind": ALIGNMENT_ROUND, "job_id": job.id, "labels_used": 0})
    assert store.batch_progress(PROJECT, 2) == (0, 0)
    assert store.next_pair(PROJECT, store.get_or_create_annotator("ann")).round == 1, "the old batch is served"

    assert run_worker(store, once=True, handler_modules=["fkpd.studio"], heartbeat_s=0.2, stale_after_s=None) == 1
    done = store.jobs.get(job.id)
    assert done.status == "succeeded", done.error
    assert done.result["policy_version_id"] == v1.id and len(done.result["pair_ids"]) == PAIRS
    assert store.list_policy_versions(PROJECT) == [v0, v1], "no second training"
    assert store.batch_progress(PROJECT, 2) == (0, PAIRS)
    assert store.next_pair(PROJECT, store.get_or_create_annotator("newcomer")).policy_version_id == v1.id
    assert_artifacts_intact(store)


def test_bad_parameters_fail_before_any_work(store):
    cases = [
        (BOOTSTRAP, {"bogus": 1}, "unknown bootstrap parameter(s) ['bogus']; known: ["),
        (BOOTSTRAP, {"bc": {"steps": 5}}, "set the number of BC steps with 'bc_steps'"),
        (BOOTSTRAP, {"pairs_per_batch": 0}, "'pairs_per_batch' must be an integer >= 1, got 0"),
        (BOOTSTRAP, {"task": "metaworld/button-press-v3"}, "differs from project 'door'"),
        (BOOTSTRAP, {"render_size": [64]}, "'render_size' must be an int or [height, width]"),
        (ALIGNMENT_ROUND, {"beta": -1}, "--beta must be a finite number > 0, got -1"),
        (ALIGNMENT_ROUND, {"checkpoint": "x"}, "unknown alignment_round parameter(s) ['checkpoint']"),
        (ALIGNMENT_ROUND, {}, "has no round-0 policy version with a checkpoint; run a bootstrap job first"),
    ]
    for kind, params, message in cases:
        job = run_job(store, kind, params)
        assert job.status == "failed" and message in job.error, (kind, params, job.error)
    assert store.list_policy_versions(PROJECT) == [] and all_rows(store, m.Clip) == []
