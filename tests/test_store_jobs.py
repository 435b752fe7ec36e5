"""Job queue and worker: claims, heartbeats, stale recovery, cancellation, SIGKILL.

Runs on SQLite and, with ``FKPD_TEST_DATABASE_URL`` set, on PostgreSQL.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter
from datetime import datetime, timezone

import pytest

from conftest_store import (  # noqa: F401  (fixtures are used by name)
    artifact_dir,
    claim_until_empty,
    clock,
    clocked_store,
    db_url,
    make_project,
    spinning_worker,
    store,
    wait_for,
)
from fkpd.store import JobLostError, NotFoundError, StoreInputError
from fkpd.store.queue import HANDLERS, register_handler
from fkpd.store.worker import JobContext, Worker, run_worker

SPAWN = mp.get_context("spawn")
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def project(store):
    return store.create_project("proj", "metaworld/door-open-v3")


def test_enqueue_claim_heartbeat_finish(store, project):
    job = store.jobs.enqueue("proj", "bootstrap", {"steps": 10})
    assert (job.status, job.progress, job.attempts, job.params) == ("queued", 0.0, 0, {"steps": 10})
    assert store.jobs.claim("w1", kinds=["alignment_round"]) is None, "kind filter"
    running = store.jobs.claim("w1", kinds=["bootstrap"])
    assert running.id == job.id and running.status == "running" and running.worker_id == "w1"
    assert running.attempts == 1 and running.started_at is not None
    assert running.heartbeat_at == running.started_at
    assert store.jobs.claim("w2") is None, "the only job is taken"

    beat = store.jobs.heartbeat(job.id, 0.25, "epoch 1/4", worker_id="w1")
    assert (beat.progress, beat.message) == (0.25, "epoch 1/4")
    assert beat.heartbeat_at >= running.heartbeat_at
    with pytest.raises(StoreInputError, match=r"progress must be a number in \[0, 1\]"):
        store.jobs.heartbeat(job.id, 1.5)
    with pytest.raises(JobLostError, match="no longer running under worker 'w2'"):
        store.jobs.heartbeat(job.id, 0.5, worker_id="w2")

    done = store.jobs.finish(job.id, {"policy_version_id": 3}, worker_id="w1")
    assert (done.status, done.progress, done.result, done.error) == ("succeeded", 1.0, {"policy_version_id": 3}, None)
    assert done.finished_at is not None and done.done
    with pytest.raises(JobLostError):
        store.jobs.fail(job.id, "too late", worker_id="w1")
    assert [j.id for j in store.jobs.list("proj", status="succeeded")] == [job.id]


def test_bad_inputs(store, project):
    with pytest.raises(StoreInputError, match="JSON-serialisable"):
        store.jobs.enqueue("proj", "bootstrap", {"x": object()})
    with pytest.raises(StoreInputError, match="job kind"):
        store.jobs.enqueue("proj", "", {})
    with pytest.raises(NotFoundError, match="project"):
        store.jobs.enqueue("nope", "bootstrap")
    with pytest.raises(NotFoundError, match="job 42"):
        store.jobs.get(42)
    with pytest.raises(StoreInputError, match="worker_id"):
        store.jobs.claim(" ")
    with pytest.raises(StoreInputError, match="timeout_s"):
        store.jobs.recover_stale(0)


def test_cancel(store, project):
    queued = store.jobs.enqueue("proj", "bootstrap")
    cancelled = store.jobs.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert store.jobs.claim("w") is None
    running = store.jobs.enqueue("proj", "bootstrap")
    store.jobs.claim("w")
    asked = store.jobs.cancel(running.id)
    assert asked.status == "running" and asked.cancel_requested
    assert store.jobs.heartbeat(running.id, worker_id="w").cancel_requested
    assert store.jobs.mark_cancelled(running.id, worker_id="w").status == "cancelled"
    assert store.jobs.cancel(running.id).status == "cancelled", "finished jobs stay as they are"


def test_recover_stale_fails_or_requeues(clocked_store, clock):
    store = clocked_store
    store.create_project("proj", "t")
    a = store.jobs.enqueue("proj", "bootstrap")
    b = store.jobs.enqueue("proj", "bootstrap")
    store.jobs.claim("w-a")
    store.jobs.claim("w-b")
    clock.advance(20)
    store.jobs.heartbeat(b.id, 0.5, worker_id="w-b")
    clock.advance(15)  # a silent for 35 s, b for 15 s
    assert store.jobs.recover_stale(30, max_attempts=1) != []
    failed = store.jobs.get(a.id)
    assert failed.status == "failed" and failed.finished_at is not None
    assert failed.error.startswith("worker heartbeat lost (last seen 2026-01-01T00:00:00+00:00")
    assert "35.0 s ago" in failed.error and "'w-a'" in failed.error
    assert store.jobs.get(b.id).status == "running"

    clock.advance(30)
    (requeued,) = store.jobs.recover_stale(30, max_attempts=2)
    assert requeued.id == b.id and requeued.status == "queued" and requeued.worker_id is None
    assert "worker heartbeat lost" in requeued.message and "queued again" in requeued.message
    again = store.jobs.claim("w-c")
    assert again.id == b.id and again.attempts == 2
    with pytest.raises(JobLostError, match="no longer running under worker 'w-b'"):
        store.jobs.finish(b.id, {"late": True}, worker_id="w-b")
    assert store.jobs.finish(b.id, {"ok": True}, worker_id="w-c").error is None


def test_concurrent_claims_hand_out_each_job_once(store, project):
    jobs = {store.jobs.enqueue("proj", "bootstrap", {"i": i}).id for i in range(40)}
    url, artifacts = store.url.render_as_string(hide_password=False), str(store.artifact_dir)
    with SPAWN.Pool(3) as pool:
        pending = pool.starmap_async(claim_until_empty, [(url, artifacts, f"proc-{i}") for i in range(3)])
        threads = {}
        workers = [
            threading.Thread(target=lambda n=n: threads.__setitem__(n, claim_until_empty(url, artifacts, n)))
            for n in ("thread-0", "thread-1", "thread-2")
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        per_process = pending.get(timeout=120)
    claimed = [j for ids in per_process for j in ids] + [j for ids in threads.values() for j in ids]
    counts = Counter(claimed)
    assert set(counts) == jobs and set(counts.values()) == {1}, "every job claimed exactly once"
    views = [store.jobs.get(j) for j in jobs]
    assert all(v.status == "running" and v.attempts == 1 for v in views)


# --------------------------------------------------------------------------- worker


def test_register_handler():
    registry = {}

    @register_handler("k", registry=registry)
    def first(ctx):
        return None

    assert registry == {"k": first}
    assert register_handler("k", first, registry=registry) is first, "re-registering is fine"
    with pytest.raises(StoreInputError, match="already has handler"):
        register_handler("k", lambda ctx: None, registry=registry)
    register_handler("k", print, replace=True, registry=registry)
    assert registry["k"] is print
    assert "k" not in HANDLERS


def test_worker_runs_success_failure_and_bad_results(store, project):
    def ok(ctx: JobContext):
        for i in range(3):
            ctx.progress((i + 1) / 3, f"step {i + 1}")
        return {"n": ctx.params["n"], "artifacts": str(ctx.artifact_dir)}

    def boom(ctx):
        raise ValueError("bad hyperparameter beta=-1")

    def not_json(ctx):
        return {"x": object()}

    handlers = {"ok": ok, "boom": boom, "not_json": not_json}
    ids = [store.jobs.enqueue("proj", kind, {"n": 7}).id for kind in ("ok", "boom", "not_json")]
    other = store.jobs.enqueue("proj", "unregistered")
    worker = Worker(store, handlers, worker_id="w", heartbeat_s=0.05, stale_after_s=None)
    assert worker.run(poll_s=0.01, max_jobs=3) == 3
    ok_job, boom_job, bad_job = (store.jobs.get(i) for i in ids)
    assert ok_job.status == "succeeded" and ok_job.result == {"n": 7, "artifacts": str(store.artifact_dir)}
    assert boom_job.status == "failed"
    assert boom_job.error.startswith("ValueError: bad hyperparameter beta=-1")
    assert "Traceback (most recent call last)" in boom_job.error and "in boom" in boom_job.error
    assert boom_job.message == "ValueError: bad hyperparameter beta=-1"
    assert bad_job.status == "failed" and "invalid result" in bad_job.error
    assert store.jobs.get(other.id).status == "queued", "no handler, not claimed"
    assert run_worker(store, once=True, handlers=handlers, stale_after_s=None) == 0


def test_worker_cancellation_and_heartbeat_thread(store, project):
    started = threading.Event()

    def patient(ctx: JobContext):
        started.set()
        while True:  # only the heartbeat thread writes, and it brings the cancel flag
            ctx.check_cancelled()
            time.sleep(0.01)

    job = store.jobs.enqueue("proj", "patient")
    worker = Worker(store, {"patient": patient}, worker_id="w", heartbeat_s=0.05, stale_after_s=None)
    runner = threading.Thread(target=worker.run, kwargs={"once": True})
    runner.start()
    assert started.wait(10)
    first = store.jobs.get(job.id).heartbeat_at
    wait_for(lambda: store.jobs.get(job.id).heartbeat_at > first, 10, what="a heartbeat")
    store.jobs.cancel(job.id)
    runner.join(10)
    assert not runner.is_alive()
    final = store.jobs.get(job.id)
    assert final.status == "cancelled" and final.finished_at is not None


def test_stopping_worker_puts_the_running_job_back_in_the_queue(store, project):
    started = threading.Event()
    runs = []

    def stepwise(ctx: JobContext):
        runs.append(ctx.job.attempts)
        started.set()
        for _ in range(100):
            ctx.check_cancelled()
            time.sleep(0.01)
        return {"steps": 100}

    job = store.jobs.enqueue("proj", "stepwise")
    stop = threading.Event()
    worker = Worker(store, {"stepwise": stepwise}, worker_id="w", heartbeat_s=0.05, stale_after_s=None)
    runner = threading.Thread(target=worker.run, kwargs={"stop": stop})
    runner.start()
    assert started.wait(10)
    stop.set()
    runner.join(10)
    assert not runner.is_alive(), "the worker returns once its job is back in the queue"
    back = store.jobs.get(job.id)
    assert (back.status, back.worker_id, back.started_at, back.progress) == ("queued", None, None, 0.0)
    assert back.message == "worker w is stopping; queued again" and back.attempts == 1

    # the next worker runs it from the start
    done = Worker(store, {"stepwise": stepwise}, worker_id="w2", stale_after_s=None).run_one()
    assert (done.id, done.status, done.result, done.attempts) == (job.id, "succeeded", {"steps": 100}, 2)
    assert runs == [1, 2]


def test_release_is_fenced_and_honours_cancel(store, project):
    job = store.jobs.enqueue("proj", "k")
    store.jobs.claim("a")
    with pytest.raises(JobLostError):
        store.jobs.release(job.id, "stopping", worker_id="b")
    store.jobs.cancel(job.id)
    ended = store.jobs.release(job.id, "stopping", worker_id="a")
    assert ended.status == "cancelled" and ended.finished_at is not None, "a job asked to cancel is not requeued"
    with pytest.raises(JobLostError):
        store.jobs.release(job.id, "stopping", worker_id="a")


def test_worker_killed_with_sigkill_is_recovered(store):
    project, pairs = make_project(store, 3)
    version = store.latest_policy_version("proj")
    me = store.get_or_create_annotator("ann")
    for _ in pairs[:2]:
        pair = store.next_pair("proj", me)
        store.answer(pair.id, me, "left", NOW)
    before = store.comparisons_frame("proj")

    job = store.jobs.enqueue("proj", "test_spin", {"rounds": 1})
    url, artifacts = store.url.render_as_string(hide_password=False), str(store.artifact_dir)
    proc = SPAWN.Process(target=spinning_worker, args=(url, artifacts, "doomed"))
    proc.start()
    try:
        wait_for(lambda: store.jobs.get(job.id).progress > 0, 60, what="the worker to report progress")
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == -signal.SIGKILL
    orphan = store.jobs.get(job.id)
    assert orphan.status == "running" and orphan.worker_id == "doomed"

    assert store.jobs.recover_stale(60) == [], "a fresh heartbeat is not stale"
    time.sleep(0.6)
    (recovered,) = store.jobs.recover_stale(0.5, max_attempts=2)
    assert recovered.id == job.id and recovered.status == "queued"
    assert recovered.error.startswith("worker heartbeat lost (last seen ")
    assert "'doomed'" in recovered.error

    # the labelling data and the policy lineage are untouched
    after = store.comparisons_frame("proj")
    assert after.equals(before)
    assert store.latest_policy_version("proj") == version
    if store.backend == "sqlite":
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"

    # a healthy worker picks the requeued job up and completes it
    worker = Worker(store, {"test_spin": lambda ctx: {"resumed": True}}, heartbeat_s=0.05, stale_after_s=None)
    final = worker.run_one()
    assert final.id == job.id and final.status == "succeeded" and final.attempts == 2
    assert final.result == {"resumed": True} and final.error is None

    # with no attempts left a second loss is final
    second = store.jobs.enqueue("proj", "test_spin")
    store.jobs.claim("also-doomed")
    time.sleep(0.6)
    (failed,) = store.jobs.recover_stale(0.5, max_attempts=1)
    assert failed.id == second.id and failed.status == "failed"
    assert failed.error.startswith("worker heartbeat lost")
