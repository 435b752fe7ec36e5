"""Hostile and unlucky input against the store, the worker and the Label page (issue #14:
defects 1-3, 8-10, 12, invite identity, sweeping and fencing).

Each test reproduces what an outside probe found; the store tests run on SQLite and, with
``FKPD_TEST_DATABASE_URL`` set, on PostgreSQL (``tests/conftest_store.py``). Modules that
are new with the fixes are imported inside the tests, so on older code each test fails on
its own instead of the whole file failing to import.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import event, select, text

from conftest_app import PROJECT, bootstrapped_project, project_dir, project_store  # noqa: F401
from conftest_store import (  # noqa: F401  (fixtures are used by name)
    artifact_dir,
    clock,
    clocked_store,
    db_url,
    make_project,
    store,
    wait_for,
)
from fkpd.errors import FKPDError
from fkpd.store import PairUnavailableError, Store, StoreError, StoreInputError
from fkpd.store import models as m

REPO = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
NAN_BOOTSTRAP = {"bc": {"lr": float("nan")}}


def _studio_cfg(**kw):
    from fkpd.studio import StudioConfig

    return StudioConfig(project="door", task="metaworld/door-open-v3", start_worker=False, **kw)


def _job_rows(store: Store) -> list[m.Job]:
    with store.session() as s:
        return list(s.scalars(select(m.Job).order_by(m.Job.id)))


# --------------------------------------------------------------------------- 1. stranded bootstrap


def test_a_project_is_never_created_without_its_bootstrap_job(store):
    """Defect 1: the project was committed, then the bootstrap enqueued separately; when the
    enqueue failed the project stayed without a bootstrap, and later starts queued nothing."""
    from fkpd.studio import open_project

    def refuse(*_args):
        raise RuntimeError("the database refused the job row")

    event.listen(m.Job, "before_insert", refuse)
    try:
        with pytest.raises(RuntimeError, match="refused the job row"):
            open_project(store, _studio_cfg())
    finally:
        event.remove(m.Job, "before_insert", refuse)
    assert store.list_projects() == [], "a failed bootstrap enqueue must leave no project behind"

    project, job = open_project(store, _studio_cfg())
    assert job is not None and job.kind == "bootstrap" and job.project_id == project.id
    assert open_project(store, _studio_cfg())[1] is None, "a second start queues nothing"


def test_a_start_repairs_a_project_stranded_without_bootstrap(store):
    """Defect 1: a store from before the fix may hold a project with no version and no
    bootstrap; the next start queues one (once, however many apps start)."""
    from fkpd.studio import open_project

    store.create_project("door", "metaworld/door-open-v3")
    project, job = open_project(store, _studio_cfg(bootstrap={"bc_steps": 10}))
    assert job is not None and job.kind == "bootstrap" and job.params == {"bc_steps": 10}
    assert open_project(store, _studio_cfg())[1] is None
    # A bootstrap that failed (or was cancelled) is replaced by the next start too.
    claimed = store.jobs.claim("w")
    store.jobs.fail(claimed.id, "boom", worker_id="w")
    again = open_project(store, _studio_cfg())[1]
    assert again is not None and again.id != job.id
    assert [j.status for j in store.jobs.list(project.id)] == ["queued", "failed"]


def test_create_project_with_job_is_one_transaction(store):
    with pytest.raises(StoreInputError, match=r"bc\.lr is nan"):
        store.create_project_with_job("p", "metaworld/door-open-v3", "bootstrap", NAN_BOOTSTRAP)
    assert store.list_projects() == [] and _job_rows(store) == []
    project, job = store.create_project_with_job("p", "metaworld/door-open-v3", "bootstrap", {"bc_steps": 5},
                                                 instructions="look", identity="open")
    assert (project.name, project.identity, project.instructions) == ("p", "open", "look")
    assert (job.project_id, job.kind, job.params, job.status) == (project.id, "bootstrap", {"bc_steps": 5}, "queued")
    with pytest.raises(StoreError, match="already exists"):
        store.create_project_with_job("p", "metaworld/door-open-v3", "bootstrap", {})
    assert len(_job_rows(store)) == 1


# --------------------------------------------------------------------------- 2. NaN in job params


@pytest.mark.parametrize("bad, where", [
    ({"bc": {"lr": float("nan")}}, r"bc\.lr is nan"),
    ({"steps": float("inf")}, "steps is inf"),
    ({"lams": [1.0, float("-inf")]}, r"lams\[1\] is -inf"),
    ({"x": {1, 2}}, "x is a set"),
    ({"x": object()}, "x is a object"),
])
def test_enqueue_refuses_nan_infinity_and_non_json_before_writing(store, bad, where):
    """Defect 2: NaN was stored on SQLite and failed deep in the driver on PostgreSQL."""
    make_project(store, 1)
    with pytest.raises(StoreInputError, match=f"job params must be JSON-serialisable: {where}"):
        store.jobs.enqueue("proj", "bootstrap", bad)
    assert _job_rows(store) == [], "nothing is written"


def test_a_nan_result_fails_the_job_with_a_clear_reason(store):
    make_project(store, 1)
    job = store.jobs.enqueue("proj", "k", {})
    store.jobs.claim("w")
    with pytest.raises(StoreInputError, match="job result must be JSON-serialisable: acc is nan"):
        store.jobs.finish(job.id, {"acc": float("nan")}, worker_id="w")
    assert store.jobs.get(job.id).status == "running", "a refused result changes nothing"


# --------------------------------------------------------------------------- 3. job history


def test_a_recovered_job_keeps_the_recovery_after_it_succeeds(clocked_store, clock):
    """Defect 3: the recovery reason was overwritten on the next claim and cleared on finish."""
    store = clocked_store
    make_project(store, 1)
    job = store.jobs.enqueue("proj", "bootstrap", {})
    store.jobs.claim("doomed")
    clock.advance(300)  # the worker died: no heartbeat for 5 minutes
    [recovered] = store.jobs.recover_stale(60, max_attempts=3)
    assert recovered.status == "queued"
    store.jobs.claim("rescuer")
    clock.advance(5)
    store.jobs.release(job.id, "worker rescuer is stopping", worker_id="rescuer")
    store.jobs.claim("rescuer")
    done = store.jobs.finish(job.id, {"ok": True}, worker_id="rescuer")
    assert done.status == "succeeded" and done.error is None
    events = [(e["event"], e["attempt"], e["worker"]) for e in done.history]
    assert events == [("queued", 0, None), ("claimed", 1, "doomed"), ("recovered", 1, "doomed"),
                      ("claimed", 2, "rescuer"), ("released", 2, "rescuer"), ("claimed", 3, "rescuer"),
                      ("succeeded", 3, "rescuer")]
    recovery = done.history[2]
    assert "worker heartbeat lost" in recovery["reason"] and "'doomed'" in recovery["reason"]
    assert done.history[4]["reason"] == "worker rescuer is stopping"
    assert all(datetime.fromisoformat(e["at"]).tzinfo is not None for e in done.history)
    assert store.jobs.get(job.id).history == done.history, "the history is in the row"


def test_failures_and_cancellations_are_in_the_history(store):
    make_project(store, 1)
    a = store.jobs.enqueue("proj", "k", {})
    b = store.jobs.enqueue("proj", "k", {})
    store.jobs.claim("w")
    failed = store.jobs.fail(a.id, "ValueError: bad\n\ntraceback...", worker_id="w")
    assert [e["event"] for e in failed.history] == ["queued", "claimed", "failed"]
    assert failed.history[-1]["reason"] == "ValueError: bad"
    cancelled = store.jobs.cancel(b.id)
    assert [e["event"] for e in cancelled.history] == ["queued", "cancelled"]


# --------------------------------------------------------------------------- 8. unreachable database


def test_an_unreachable_or_foreign_database_is_a_one_line_store_error(tmp_path):
    """Defect 8: a refused connection or a file that is not SQLite raised driver errors."""
    from fkpd.store import StoreUnavailableError

    with pytest.raises(StoreUnavailableError, match="cannot open the database postgresql.*127.0.0.1:1.*check that the "
                                                     "database server is running"):
        Store("postgresql+psycopg://postgres@127.0.0.1:1/x", tmp_path / "a")
    junk = tmp_path / "notes.sqlite"
    junk.write_bytes(b"these are my notes, not a database " * 100)
    with pytest.raises(StoreUnavailableError, match="is not an FKPD Studio \\(SQLite\\) database; move it away"):
        Store(f"sqlite:///{junk}", tmp_path / "a")
    assert junk.read_bytes().startswith(b"these are my notes"), "the file is left as it was"
    with pytest.raises(StoreInputError, match="not a database URL"):
        Store("::not a url::", tmp_path / "a")


@pytest.mark.parametrize("url", ["postgresql+psycopg://postgres@127.0.0.1:1/x", "sqlite:///{junk}"])
def test_fkpd_worker_on_a_bad_database_prints_one_line_and_exits_2(tmp_path, url):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(os.urandom(4096))
    env = {**os.environ, "FKPD_DATABASE_URL": url.format(junk=junk), "FKPD_ARTIFACT_DIR": str(tmp_path / "a"),
           "MUJOCO_GL": "egl"}
    proc = subprocess.run([sys.executable, "-m", "fkpd.cli", "worker", "--once"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot open the database"), proc.stderr
    assert "Traceback" not in proc.stderr and ("check that" in lines[0] or "move it away" in lines[0])


# --------------------------------------------------------------------------- 9. answers without a lease


def test_only_the_annotator_a_pair_is_leased_to_can_answer_it(store, caplog):
    """Defect 9: Store.answer checked neither the lease nor the project."""
    _, pairs = make_project(store, 3)
    mallory, bob = store.get_or_create_annotator("mallory"), store.get_or_create_annotator("bob")
    assert store.next_pair("proj", bob).id == pairs[0]
    caplog.set_level(logging.WARNING, logger="fkpd")
    with pytest.raises(PairUnavailableError, match=f"pair {pairs[0]} is not leased to annotator 'mallory'"):
        store.answer(pairs[0], mallory, "left", NOW)
    assert "refused the answer of annotator 'mallory'" in caplog.text
    with pytest.raises(PairUnavailableError, match="not leased"):
        store.answer(pairs[2], mallory, "left", NOW)  # a pair nobody leased
    assert store.comparisons_frame("proj").empty
    record = store.answer(pairs[0], bob, "right", NOW)
    assert record.created and record.pair_done, "the lease holder's own answer is accepted"
    from fkpd.store import NotLeasedError

    assert issubclass(NotLeasedError, PairUnavailableError), "callers handling a taken pair handle this too"


def test_an_answer_into_another_project_is_refused(store):
    from fkpd.store import NotLeasedError
    from fkpd.studio import record_answers

    _, pairs = make_project(store, 1, name="proj")
    other, _ = make_project(store, 1, name="other")
    ada = store.get_or_create_annotator("ada")
    assert store.next_pair("proj", ada).id == pairs[0]
    with pytest.raises(NotLeasedError, match="does not belong to project 'other'"):
        store.answer(pairs[0], ada, "left", NOW, project="other")
    problems = record_answers(store, ada, [{"pair": pairs[0], "outcome": "left"}], set(), project=other)
    assert len(problems) == 1 and "does not belong to project 'other'" in problems[0]
    assert store.comparisons_frame("proj").empty
    store.answer(pairs[0], ada, "left", NOW, project="proj")
    assert len(store.comparisons_frame("proj")) == 1


def test_record_answers_refuses_and_logs_answers_for_pairs_leased_to_others(store, caplog):
    from fkpd.studio import record_answers

    project, pairs = make_project(store, 4, labels_per_pair=1)
    mallory, bob = store.get_or_create_annotator("mallory"), store.get_or_create_annotator("bob")
    bobs = [p.id for p in store.lease_pairs("proj", bob, 2)]
    mine = [p.id for p in store.lease_pairs("proj", mallory, 2)]
    caplog.set_level(logging.WARNING, logger="fkpd")
    answers = [{"pair": bobs[0], "outcome": "left", "shown_ms": 1.7e12},
               {"pair": mine[0], "outcome": "right", "shown_ms": 1.7e12}]
    problems = record_answers(store, mallory, answers, set())
    assert len(problems) == 1 and f"pair {bobs[0]} was not stored" in problems[0]
    assert f"refused an answer of annotator 'mallory' for pair {bobs[0]}" in caplog.text
    assert record_answers(store, bob, [{"pair": bobs[0], "outcome": "equal"}], set()) == []
    frame = store.comparisons_frame("proj")
    assert sorted(zip(frame["pair_id"], frame["annotator"])) == sorted([(bobs[0], "bob"), (mine[0], "mallory")])


# --------------------------------------------------------------------------- 10. malformed answers


def test_one_malformed_answer_does_not_lose_the_valid_ones_after_it(store, caplog):
    """Defect 10: a pair id of 2**70 or shown_ms of 1e20 raised, and the player resends its
    list on every rerun, so every later answer of the session was lost."""
    from fkpd.studio import record_answers

    project, _ = make_project(store, 3)
    project = store.update_project("proj", settings={"min_view_seconds": 0})  # no minimum viewing time here
    ada = store.get_or_create_annotator("ada")
    leased = [p.id for p in store.lease_pairs("proj", ada, 3)]
    hostile = [{"pair": 2**70, "outcome": "left", "shown_ms": 1.7e12},
               {"pair": leased[0], "outcome": "left", "shown_ms": 1e20},
               {"pair": leased[0], "outcome": "left", "shown_ms": float("nan")},
               {"pair": True, "outcome": "left"}, {"pair": 1.5, "outcome": "left"}, {"pair": "1", "outcome": "left"},
               {"pair": leased[0], "outcome": ["left"]}, {"pair": leased[0]}, ["not", "an", "object"], "junk", None]
    answers = hostile + [{"pair": leased[1], "outcome": "right", "shown_ms": 1.7e12}]
    recorded: set = set()
    caplog.set_level(logging.WARNING, logger="fkpd")
    problems = record_answers(store, ada, answers, recorded)
    assert len(problems) == len(hostile) and all("malformed" in p for p in problems), problems
    assert "skipped a malformed answer from annotator 'ada'" in caplog.text
    answers.append({"pair": leased[2], "outcome": "equal", "shown_ms": 1.7e12})
    assert record_answers(store, ada, answers, recorded, project=project) == [], "each problem is reported once"
    frame = store.comparisons_frame("proj")
    assert frame[["pair_id", "outcome"]].values.tolist() == [[leased[1], "right"], [leased[2], "equal"]]
    assert frame["shown_at"].notna().all()


def test_store_answer_refuses_ids_the_database_cannot_hold(store):
    _, pairs = make_project(store, 1)
    ada = store.get_or_create_annotator("ada")
    store.next_pair("proj", ada)
    for bad in (2**70, 2**31, 0, -1, True, "1", 1.0):
        with pytest.raises(StoreInputError, match="pair id must be an integer id"):
            store.answer(bad, ada, "left", NOW)
    with pytest.raises(StoreInputError, match="shown_at must be a datetime"):
        store.answer(pairs[0], ada, "left", 1e20)
    assert store.answer(pairs[0], ada, "left", NOW).created


# --------------------------------------------------------------------------- invite identity


def test_invite_tokens_are_stored_hashed_map_to_their_annotator_and_can_be_revoked(store):
    from fkpd.store import InvalidTokenError

    make_project(store, 1, name="proj")
    make_project(store, 1, name="other")
    invite = store.create_invite("proj", "  ada ")
    assert invite.annotator == "ada" and invite.active and len(invite.token) >= 40
    with store.session() as s:
        stored = s.execute(text("SELECT token_sha256 FROM invites")).scalars().all()
    assert stored == [hashlib.sha256(invite.token.encode()).hexdigest()], "only the hash is stored"
    assert store.annotator_for_token("proj", invite.token).name == "ada"
    for bad in (invite.token + "x", "", None, "x" * 5000, invite.token.upper()):
        with pytest.raises(InvalidTokenError, match="not valid for this project"):
            store.annotator_for_token("proj", bad)
    with pytest.raises(InvalidTokenError):
        store.annotator_for_token("other", invite.token)  # a link of one project does not open another
    second = store.create_invite("proj", "ada")
    assert [i.token for i in store.list_invites("proj")] == [None, None], "tokens are never listed"
    assert store.revoke_invites("proj", "ada") == 2 and store.revoke_invites("proj", "ada") == 0
    for token in (invite.token, second.token):
        with pytest.raises(InvalidTokenError, match="revoked"):
            store.annotator_for_token("proj", token)
    assert [i.active for i in store.list_invites("proj")] == [False, False]
    third = store.create_invite("proj", "bob")
    assert store.revoke_invites("proj", invite_id=third.id) == 1
    with pytest.raises(StoreError):
        store.revoke_invites("proj", invite_id=10_000)


def test_new_projects_default_to_invite_and_existing_ones_stay_open(db_url, artifact_dir):
    """Migration 0002 gives projects that existed before it the ``open`` mode."""
    from alembic import command

    from fkpd.store.db import WRITE, alembic_config, make_engine

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            conn.execution_options(**{WRITE: True})
            with conn.begin():
                cfg = alembic_config()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "0001")
                conn.execute(text("INSERT INTO projects (name, task_id, instructions, settings, created_at) VALUES "
                                  "('old', 'metaworld/door-open-v3', '', '{\"labels_per_pair\": 1, "
                                  "\"lease_seconds\": 120.0}', '2026-01-01 00:00:00')"))
                conn.execute(text("INSERT INTO jobs (project_id, kind, params, status, progress, message, attempts, "
                                  "cancel_requested, created_at) VALUES (1, 'bootstrap', '{}', 'queued', 0, '', 0, "
                                  "false, '2026-01-01 00:00:00')"))
    finally:
        engine.dispose()
    with Store(db_url, artifact_dir) as store:
        assert store.get_project("old").identity == "open"
        assert store.jobs.list("old")[0].history == ()
        assert store.create_project("new", "metaworld/door-open-v3").identity == "invite"
        assert store.update_project("old", identity="invite").identity == "invite"
        with pytest.raises(StoreInputError, match="identity mode must be one of open, invite"):
            store.update_project("old", identity="oidc")


def test_fkpd_annotators_invite_list_revoke_and_mode(tmp_path, capsys):
    from fkpd.cli import main

    url, art = f"sqlite:///{tmp_path / 'fkpd.sqlite'}", str(tmp_path / "artifacts")
    with Store(url, art) as store:
        store.create_project("door", "metaworld/door-open-v3", identity="open")
    common = ["--project", "door", "--database-url", url, "--artifact-dir", art]
    assert main(["annotators", "invite", "ada", "--base-url", "http://studio:8501", *common]) == 0
    out, err = capsys.readouterr()
    link = out.strip()
    assert link.startswith("http://studio:8501/?token=") and "shown only once" in err and "open mode" in err
    assert main(["annotators", "mode", "invite", *common]) == 0
    with Store(url, art) as store:
        assert store.get_project("door").identity == "invite"
        assert store.annotator_for_token("door", link.split("token=")[1]).name == "ada"
    capsys.readouterr()
    assert main(["annotators", "list", *common]) == 0
    assert "identity mode invite" in capsys.readouterr().out
    assert main(["annotators", "revoke", "ada", *common]) == 0
    assert "revoked 1 invite link" in capsys.readouterr().out
    assert main(["annotators", "invite", "  ", *common]) == 2
    assert main(["annotators", "list", "--project", "nope", "--database-url", url, "--artifact-dir", art]) == 2
    assert "project 'nope' not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- sweeping


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_the_worker_sweeps_stale_part_files_and_unregistered_clip_files(store, caplog):
    """Also seen: .part files of killed writes and unregistered segment files of killed
    imports and batches were never swept."""
    from fkpd.store import Worker, sweep_artifacts

    make_project(store, 1)
    root = store.artifact_dir
    registered = ["seg/v1/s0_0.npz", "seg/v1/s0_1.npz"]  # make_project's clips, outside clip folders
    files = {
        "stale_part": "projects/1/batches/round001-v1-aaaa/.p000_a.mp4.k2j4h5g6.part.mp4",
        "fresh_part": "projects/1/bootstrap-x/.dataset.hdf5.abcd1234.part.hdf5",
        "old_unregistered": "projects/1/batches/round001-v1-aaaa/p000_a.npz",
        "old_unregistered_video": "projects/1/batches/round001-v1-aaaa/p000_a.mp4",
        "busy_folder_old": "projects/1/batches/round002-v1-bbbb/p000_a.npz",
        "busy_folder_new": "projects/1/batches/round002-v1-bbbb/p000_b.npz",
        "killed_import": "imported/1/labels/seg_000000010.npz",
        "dataset": "projects/1/bootstrap-x/dataset.hdf5",
        "checkpoint": "projects/1/rounds/round001-job1-a1-cccc/model.safetensors",
    }
    for rel in files.values():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    for key, rel in files.items():
        _age(root / rel, 60 if key in ("fresh_part", "busy_folder_new") else 3 * 3600)
    # A registered clip in a batch folder stays, old as it is.
    kept = "projects/1/batches/round003-v1-dddd/p000_a.npz"
    (root / kept).parent.mkdir(parents=True)
    (root / kept).write_bytes(b"y")
    store.add_clip(store.latest_policy_version("proj").id, segment_path=kept, length=6, fps=30)
    _age(root / kept, 3 * 3600)
    for rel in registered:
        _age(root / rel, 3 * 3600)

    caplog.set_level(logging.INFO, logger="fkpd")
    assert sweep_artifacts(store, grace_s=4 * 3600).removed == 0, "nothing is older than the grace period"
    worker = Worker(store, handlers={}, sweep_grace_s=3600, sweep_every_s=600)
    assert worker.run(once=False, max_jobs=None, poll_s=0.01, stop=_stop_after(0.3)) == 0
    gone = {k for k, rel in files.items() if not (root / rel).exists()}
    assert gone == {"stale_part", "old_unregistered", "old_unregistered_video", "killed_import"}
    assert (root / kept).exists() and all((root / rel).exists() for rel in registered)
    assert not (root / "projects/1/batches/round001-v1-aaaa").exists(), "the emptied batch folder is removed"
    assert "sweep: removed projects/1/batches/round001-v1-aaaa/p000_a.npz" in caplog.text
    assert "temporary file of an interrupted write" in caplog.text
    assert worker.sweep_if_due() == 0, "at most one sweep per sweep_every_s"


def _stop_after(seconds: float):
    import threading

    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return stop


# --------------------------------------------------------------------------- fencing


def _tiny_clip(k: int, side: int):
    from fkpd.policy.rollout import ClipRequest, Episode
    from fkpd.prefs.pairs import RolledClip
    from fkpd.prefs.segments import Segment

    rng = np.random.default_rng(k * 2 + side)
    obs, act, rew = rng.normal(size=(4, 3)), rng.uniform(-1, 1, size=(4, 2)), rng.normal(size=4)
    success = np.zeros(4, bool)
    frames = rng.integers(0, 255, size=(5, 16, 16, 3), dtype=np.uint8)
    episode = Episode(reset_seed=k, observations=obs, actions=act, rewards=rew, success=success, frames=frames)
    request = ClipRequest(reset_seed=k, noise_seed=100 + side, max_steps=4, render_from=0)
    segment = Segment(observations=obs, actions=act, rewards=rew, success=success, reset_seed=k)
    return RolledClip(pair=k, side=side, request=request, episode=episode, segment=segment)


def test_a_worker_whose_job_was_recovered_stops_writing_clips(clocked_store, clock):
    """Also seen: a worker frozen past its heartbeat wrote a clip into the batch folder after
    its job had been recovered by another worker."""
    from fkpd.store import JobLostError, Worker
    from fkpd.studio.batches import StoreLabeller

    store = clocked_store
    project, _ = make_project(store, 1)
    version = store.latest_policy_version("proj")
    seen: dict = {}

    def batch_files():
        return sorted(p.name for p in store.artifact_dir.glob("projects/*/batches/*/[!.]*"))  # no temporary file

    def frozen_round(ctx):
        labeller = StoreLabeller(store, project, ctx.job_id)
        write = labeller.clip_writer(version, 1, 4)
        write(_tiny_clip(0, 0))  # while the job is this worker's, clips are written: a pair at a time
        write(_tiny_clip(0, 1))
        seen["written"] = wait_for(lambda: len(batch_files()) == 4 and batch_files(), what="pair 0's files")
        clock.advance(600)  # the worker freezes past its heartbeat ...
        store.jobs.recover_stale(60, max_attempts=2)  # ... another worker recovers the job ...
        seen["other"] = store.jobs.claim("rescuer").id  # ... and runs it again
        try:
            write(_tiny_clip(1, 0))
        except JobLostError as exc:
            seen["lost"] = str(exc)
        else:
            seen["wrote_after_recovery"] = True
        try:
            labeller.request(1, [])
        except JobLostError:
            seen["registration_fenced"] = True

    job = store.jobs.enqueue("proj", "frozen_round", {})
    ended = Worker(store, {"frozen_round": frozen_round}, worker_id="frozen", heartbeat_s=3600,
                   stale_after_s=None, sweep_grace_s=None).run_one()
    assert seen["written"] == ["p000_a.mp4", "p000_a.npz", "p000_b.mp4", "p000_b.npz"]
    assert "wrote_after_recovery" not in seen and "no longer this worker's" in seen["lost"]
    assert sorted(p.name for p in store.artifact_dir.glob("projects/*/batches/*/*")) == seen["written"]
    assert seen.get("registration_fenced"), "registering the batch is fenced too"
    assert ended.id == job.id == seen["other"] and ended.status == "running" and ended.worker_id == "rescuer"


# --------------------------------------------------------------------------- 12 and invite mode in the app


@pytest.fixture
def app(project_dir, monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from conftest_app import studio_env

    for k, v in studio_env(project_dir).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # see tests/test_app.py
    st.cache_resource.clear()
    yield lambda: AppTest.from_file(str(REPO / "app" / "streamlit_app.py"), default_timeout=60)
    st.cache_resource.clear()


def _texts(at) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "info", "warning", "error", "success", "caption",
                                               "subheader", "text") for e in getattr(at, kind))


def _sidebar_script(app_dir: str, name: str) -> None:
    """The app's sidebar alone (AppTest drops the sidebar of an st.navigation entry script)."""
    import sys
    from types import SimpleNamespace

    import streamlit as st

    sys.path.insert(0, app_dir)
    from studio_ui import sidebar

    st.session_state["annotator"] = name
    project = SimpleNamespace(name="door-open", task_id="metaworld/door-open-v3")
    sidebar(SimpleNamespace(project=project, worker=None, cfg=None, exited_worker=lambda: None))


def test_the_annotator_name_is_not_rendered_as_markdown():
    """Defect 12: links and images in a name rendered in the sidebar."""
    from streamlit.testing.v1 import AppTest

    name = "[click](http://evil.example/)![x](http://evil.example/x.png)"
    at = AppTest.from_function(_sidebar_script, args=(str(REPO / "app"), name), default_timeout=30)
    at.run()
    assert not at.exception
    shown = [e.value for e in at.sidebar.markdown]
    assert any("door-open" in v for v in shown), "the sidebar was rendered"
    assert not [v for v in shown if "evil.example" in v], "the name went through Markdown"
    assert name in [e.value for e in at.sidebar.text], "the name is shown as plain text"


def test_invite_mode_maps_tokens_to_annotators_and_a_name_creates_nobody(app, project_store):
    project_store.update_project(PROJECT, identity="invite")
    at = app()
    at.query_params["annotator"] = "eve"
    at.run()
    assert not at.exception
    assert "Invitation needed" in _texts(at) and "by invitation" in _texts(at)
    assert project_store.list_annotators() == [], "opening a link with a new name creates nobody"
    invite = project_store.create_invite(PROJECT, "ada")
    at = app()
    at.query_params["token"] = invite.token
    at.run()
    assert not at.exception
    assert "Watch both clips" in _texts(at) and at.session_state["annotator"] == "ada"
    assert at.session_state["invited"] is True and at.query_params["token"] == invite.token
    bob = project_store.get_or_create_annotator("bob")
    assert project_store.next_pair(PROJECT, bob).id == 4, "ada holds the shown pair and two ahead"
    project_store.revoke_invites(PROJECT, "ada")
    at.run()
    assert "Invitation needed" in _texts(at) and "revoked" in _texts(at)


def test_the_rounds_page_creates_and_revokes_invite_links_for_the_admin(app, project_store):
    from conftest_app import ADMIN_PASSWORD

    at = app()
    at.switch_page("pages/rounds.py").run()
    assert "Only an admin can manage who labels" in _texts(at)
    at.text_input(key="admin_pw").input(ADMIN_PASSWORD)
    next(b for b in at.button if b.label == "Sign in").click().run()
    at.radio(key="identity_mode").set_value("invite").run()
    assert project_store.get_project(PROJECT).identity == "invite"
    at.text_input(key="invite_name").input("ada")
    next(b for b in at.button if b.label == "Create invite link").click().run()
    assert not at.exception
    link = at.code[0].value
    assert "/?token=" in link
    assert project_store.annotator_for_token(PROJECT, link.split("token=")[1]).name == "ada"
    revoke = next(b for b in at.button if b.label == "Revoke")
    revoke.click().run()
    assert project_store.list_invites(PROJECT, include_revoked=False) == []

