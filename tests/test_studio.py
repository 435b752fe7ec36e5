"""fkpd.studio: the logic behind the app pages, against a real (SQLite) store."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest_app import PAIRS, PROJECT, TINY_BOOTSTRAP, bootstrapped_project, project_dir, \
    project_store, studio_env  # noqa: F401  (fixtures are used by name)
from fkpd.errors import UnknownTaskError
from fkpd.store import run_worker
from fkpd.studio import (
    AdminAuth,
    CompareParams,
    StudioConfig,
    StudioError,
    clean_annotator_name,
    compare_videos,
    enqueue_compare,
    enqueue_round,
    export_bytes,
    lease_for_display,
    open_project,
    record_answers,
    retry_bootstrap,
    rounds_history,
)


def test_config_from_env_defaults_and_errors():
    cfg = StudioConfig.from_env({})
    assert (cfg.project, cfg.task, cfg.start_worker, cfg.bootstrap) == ("door-open", "metaworld/door-open-v3",
                                                                        True, {})
    cfg = StudioConfig.from_env({"FKPD_TASK": "metaworld/button-press-v3", "FKPD_START_WORKER": "0",
                                 "FKPD_BOOTSTRAP": '{"bc_steps": 10}'})
    assert (cfg.project, cfg.start_worker, cfg.bootstrap) == ("button-press", False, {"bc_steps": 10})
    assert StudioConfig.from_env({}).worker_log.parts[-2:] == ("labels", "worker.log")
    assert StudioConfig.from_env({"FKPD_ARTIFACT_DIR": "/data/proj/artifacts"}).worker_log == \
        Path("/data/proj/worker.log"), "an app on another store logs next to it, not into labels/"
    with pytest.raises(StudioError, match="FKPD_BOOTSTRAP is not valid JSON"):
        StudioConfig.from_env({"FKPD_BOOTSTRAP": "{bc_steps: 10"})
    with pytest.raises(StudioError, match="must be a JSON object"):
        StudioConfig.from_env({"FKPD_BOOTSTRAP": "[1]"})


def test_open_project_creates_once_and_queues_one_bootstrap(tmp_path):
    cfg = StudioConfig.from_env(studio_env(tmp_path))
    with cfg.open_store() as store:
        project, job = open_project(store, cfg)
        assert job.kind == "bootstrap" and job.params == TINY_BOOTSTRAP
        again, job2 = open_project(store, cfg)
        assert again.id == project.id and job2 is None, "a second start resumes, it queues nothing"
        assert [j.kind for j in store.jobs.list(project.id)] == ["bootstrap"]
        with pytest.raises(StudioError, match="training job is already queued"):
            retry_bootstrap(store, project, {})


def test_open_project_rejects_a_bad_task_or_bootstrap(tmp_path):
    with StudioConfig.from_env(studio_env(tmp_path)).open_store() as store:
        with pytest.raises(UnknownTaskError):
            open_project(store, StudioConfig.from_env(studio_env(tmp_path, FKPD_TASK="metaworld/nope-v3")))
        with pytest.raises(Exception, match="unknown bootstrap parameter"):
            open_project(store, StudioConfig.from_env(studio_env(tmp_path, FKPD_BOOTSTRAP='{"bogus": 1}')))
        assert store.list_projects() == [], "nothing is created from a bad configuration"


def test_admin_auth_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("FKPD_ADMIN_PASSWORD", raising=False)
    assert AdminAuth("s3cret").check("s3cret") and not AdminAuth("s3cret").check("wrong")
    assert not AdminAuth("s3cret").check("") and not AdminAuth("s3cret").check(None)
    monkeypatch.setenv("FKPD_ADMIN_PASSWORD", "from-env")
    auth = AdminAuth(token_dir=tmp_path)
    assert auth.source == "FKPD_ADMIN_PASSWORD" and auth.check("from-env")
    monkeypatch.delenv("FKPD_ADMIN_PASSWORD")
    auth = AdminAuth(token_dir=tmp_path)
    token_file = tmp_path / AdminAuth.TOKEN_FILE
    token = token_file.read_text().strip()
    assert len(token) >= 20 and auth.check(token) and not auth.check("from-env")
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600, "only the owner may read the token"
    assert AdminAuth(token_dir=tmp_path).check(token), "the token is kept across restarts"


def test_admin_token_created_once_by_concurrent_starts(tmp_path, monkeypatch):
    """App processes starting together on a fresh checkout agree on one complete token."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.delenv("FKPD_ADMIN_PASSWORD", raising=False)
    for trial in range(5):
        d = tmp_path / f"t{trial}"
        with ThreadPoolExecutor(8) as pool:
            sources = list(pool.map(lambda _: AdminAuth(token_dir=d), range(16)))
        token = (d / AdminAuth.TOKEN_FILE).read_text().strip()
        assert len(token) >= 20 and all(a.check(token) for a in sources)
        assert sorted(p.name for p in d.iterdir()) == [AdminAuth.TOKEN_FILE], "no temporary files are left"
    # a filesystem without hard links still gets a token
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(1, "Operation not permitted")))
    token = AdminAuth._token(tmp_path / "nolink" / AdminAuth.TOKEN_FILE)
    assert len(token) >= 20 and sorted(p.name for p in (tmp_path / "nolink").iterdir()) == [AdminAuth.TOKEN_FILE]
    (tmp_path / "t0" / AdminAuth.TOKEN_FILE).write_text("\n")
    with pytest.raises(StudioError, match="admin token file .* is empty; delete it"):
        AdminAuth(token_dir=tmp_path / "t0")


@pytest.mark.parametrize("bad, msg", [("", "enter your name"), ("   ", "enter your name"),
                                      ("x" * 65, "longer than 64"), ("a\tb", "control characters")])
def test_annotator_name_is_checked(bad, msg):
    with pytest.raises(StudioError, match=msg):
        clean_annotator_name(bad)
    assert clean_annotator_name("  ada ") == "ada"


def test_lease_for_display_prefetches_and_answers_are_stored_once(project_store):
    store = project_store
    project = store.get_project(PROJECT)
    ada = store.get_or_create_annotator("ada")
    pairs, notices = lease_for_display(store, project, ada)
    assert len(pairs) == 2 and notices == []
    assert pairs[0].left_b64 and pairs[0].right_b64 != pairs[0].left_b64
    first, second = pairs[0].id, pairs[1].id
    recorded: set[int] = set()
    answers = [{"pair": first, "outcome": "left", "shown_ms": 1.7e12}]
    assert record_answers(store, ada, answers, recorded) == []
    # The browser sends the whole list again with every new answer; each is stored once.
    answers.append({"pair": second, "outcome": "equal", "shown_ms": 1.7e12})
    assert record_answers(store, ada, answers, recorded) == []
    assert record_answers(store, ada, answers, set()) == [], "a fresh session repeating them is harmless too"
    frame = store.comparisons_frame(project.id)
    assert frame[["pair_id", "outcome"]].values.tolist() == [[first, "left"], [second, "equal"]]
    assert frame["shown_at"].notna().all()
    assert [p.id for p in lease_for_display(store, project, ada)[0]][0] not in (first, second)
    problems = record_answers(store, ada, [{"pair": "x"}, {"pair": 10**6, "outcome": "left"},
                                           {"pair": first + 99, "outcome": "sideways"}], set())
    assert len(problems) == 3 and "malformed" in problems[0] and "sideways" in problems[2]


def test_a_missing_video_sets_the_pair_aside_and_the_next_one_shows(project_store):
    store = project_store
    project = store.get_project(PROJECT)
    ada = store.get_or_create_annotator("ada")
    first = store.next_pair(project.id, ada)
    store.release(first.id, ada)
    first.left.video_file.unlink()
    pairs, notices = lease_for_display(store, project, ada)
    assert first.id not in [p.id for p in pairs] and len(pairs) == 2
    assert len(notices) == 1 and f"Pair {first.id}" in notices[0] and "missing" in notices[0]
    assert store.batch_progress(project.id) == (0, PAIRS - 1), "the retired pair left the batch"
    # A corrupted file (checksum mismatch) is set aside the same way.
    victim = pairs[0]
    clip = store.next_pair(project.id, ada).right
    clip.video_file.write_bytes(b"not a video")
    store.release(victim.id, ada)
    pairs, notices = lease_for_display(store, project, ada)
    assert victim.id not in [p.id for p in pairs] and "checksum" in notices[0]


def test_an_unshowable_second_opinion_is_skipped_and_left_to_others(project_store):
    """A completed pair whose video is gone cannot be retired (it keeps its answers): the
    Label page skips it with a notice, shows the next completed pairs, and does not keep
    it leased (another annotator can still take it)."""
    store = project_store
    project = store.get_project(PROJECT)
    ada, bob, carl = (store.get_or_create_annotator(n) for n in ("ada", "bob", "carl"))
    for pair in store.lease_pairs(project.id, ada, count=10_000):
        store.answer(pair.id, ada, "left")
    newest = store.lease_pairs(project.id, bob, count=1)[0]  # the first second opinion bob would get
    store.release(newest.id, bob)
    video = newest.left.video_file
    saved = video.read_bytes()
    video.unlink()
    pairs, notices = lease_for_display(store, project, bob)
    assert len(pairs) == 2 and newest.id not in [p.id for p in pairs]
    assert len(notices) == 1 and f"Pair {newest.id}" in notices[0]
    frame = store.comparisons_frame(project.id)
    assert (frame["pair_id"] == newest.id).sum() == 1, "a completed pair keeps its answer"
    video.write_bytes(saved)
    assert newest.id in [p.id for p in store.lease_pairs(project.id, carl, count=10_000)], \
        "bob holds no lease on it: carl may give it a second opinion"


def test_enqueue_round_checks_parameters_and_state(project_store):
    store = project_store
    project = store.get_project(PROJECT)
    with pytest.raises(StudioError, match="unknown round parameter"):
        enqueue_round(store, project, {"checkpoint": "/etc/passwd"})
    with pytest.raises(StudioError, match="regularizer"):
        enqueue_round(store, project, {"regularizer": "sideways"})
    with pytest.raises(StudioError, match="no comparison to train on"):
        enqueue_round(store, project, {"steps": 5})
    ada = store.get_or_create_annotator("ada")
    store.answer(store.next_pair(project.id, ada).id, ada, "skip")
    with pytest.raises(StudioError, match="no comparison to train on"):
        enqueue_round(store, project, {"steps": 5})
    store.answer(store.next_pair(project.id, ada).id, ada, "right")
    job = enqueue_round(store, project, {"steps": 5, "regularizer": "forward", "beta": 100.0})
    assert job.kind == "alignment_round" and job.params["beta"] == 100.0
    with pytest.raises(StudioError, match="wait for it to finish"):
        enqueue_round(store, project, {"steps": 5})


def test_history_export_and_compare_job(project_store, tmp_path):
    store = project_store
    project = store.get_project(PROJECT)
    hist = rounds_history(store, project)
    assert hist["round"].tolist() == [0] and 0.0 <= hist.loc[0, "success_rate"] <= 1.0
    ada = store.get_or_create_annotator("ada")
    store.answer(store.next_pair(project.id, ada).id, ada, "left")
    blob = export_bytes(store, project, "parquet")
    import io

    import pandas as pd

    assert len(pd.read_parquet(io.BytesIO(blob))) == 1
    with pytest.raises(StudioError, match="unknown export format"):
        export_bytes(store, project, "csv")
    v0 = store.latest_policy_version(project.id)
    with pytest.raises(StudioError, match="not a version of project"):
        enqueue_compare(store, project, v0.id, v0.id + 100)
    with pytest.raises(StudioError, match="between 1 and 16"):
        CompareParams(v0.id, v0.id, episodes=0)
    job = enqueue_compare(store, project, v0.id, v0.id, episodes=2, render_size=48)
    assert run_worker(store, once=True, handler_modules=["fkpd.studio"], stale_after_s=None) == 1
    job = store.jobs.get(job.id)
    assert job.status == "succeeded", job.error
    rows = compare_videos(store, job)
    assert [r["seed"] for r in rows] == [10_000, 10_001]
    for row in rows:
        for side in ("a", "b"):
            assert row[side]["path"].stat().st_size > 0 and isinstance(row[side]["success"], bool)
        # the same version on the same seed with the same noise seed: the same episode
        assert row["a"]["return"] == pytest.approx(row["b"]["return"])


def test_current_version_skips_versions_that_only_hold_imported_labels(project_store):
    from fkpd.studio import current_version, served_versions

    store = project_store
    project = store.get_project(PROJECT)
    v0 = store.latest_policy_version(project.id)
    imported = store.add_policy_version(project.id, None, round=0, metrics={"kind": "imported"})
    assert store.latest_policy_version(project.id).id == imported.id
    assert current_version(store, project).id == v0.id
    assert [v.id for v in served_versions(store, project)] == [v0.id]
    with pytest.raises(StudioError, match="cannot be rolled out"):
        enqueue_compare(store, project, v0.id, imported.id)


def test_versions_record_intent_scores_shown_in_the_history(project_store):
    store = project_store
    project = store.get_project(PROJECT)
    v0 = store.latest_policy_version(project.id)
    assert {"intent_smooth", "intent_high_gripper"} <= set(v0.metrics), "the bootstrap evaluation records them"
    assert v0.metrics["intent_smooth"] <= 0.0 and v0.metrics["intent_high_gripper"] <= 0.0
    hist = rounds_history(store, project)
    assert hist.loc[0, "intent_smooth"] == pytest.approx(v0.metrics["intent_smooth"])
    assert list(hist.columns).index("intent_smooth") < list(hist.columns).index("implicit_acc")


def test_job_parameters_are_typed_and_checked_once_where_they_enter():
    import math

    from fkpd.studio import BootstrapParams, ParamError, RoundError, RoundParams, StudioError, round_defaults

    assert issubclass(ParamError, RoundError) and issubclass(ParamError, StudioError)
    for bad, match in (({"beta": math.nan}, "beta is nan"), ({"lam": math.inf}, "lam is inf"),
                       ({"steps": "many"}, "'steps' must be a int"), ({"beta": True}, "'beta' must be a float"),
                       ({"regularizer": "sideways"}, "--regularizer must be one of"),
                       ({"eval_episodes": 0}, "eval_episodes"), ({"warp": 9}, "unknown alignment_round")):
        with pytest.raises(ParamError, match=match):
            RoundParams.from_params(bad)
    params = RoundParams.from_params({"beta": 250, "steps": 10, "pairs_per_batch": 4})
    assert params.to_params() == {"beta": 250, "steps": 10, "pairs_per_batch": 4}
    settings = params.settings({"seed": 3, "threads": 1, "unknown_old_key": 1})
    assert (settings.seed, settings.pairs_per_batch) == (3, 4)
    cfg = params.align_config(settings)
    assert (cfg.beta, cfg.steps, cfg.threads, cfg.log_every) == (250, 10, 1, 1)
    for bad, match in (({"bc": {"lr": "fast"}}, "'lr' must be a float"), ({"bc": {"lr": math.nan}}, "bc.lr is nan"),
                       ({"bc": {"lr": -1.0}}, "BCConfig.lr must be > 0"),
                       ({"policy": {"hidden_dim": 2.5}}, "'hidden_dim' must be a int"),
                       ({"render_size": [8, 8]}, "render_size")):
        with pytest.raises(ParamError, match=match):
            BootstrapParams.from_params(bad)
    assert round_defaults()["beta"] == 500.0 and set(round_defaults()) >= {"regularizer", "lam", "steps"}


def test_enqueue_round_stores_checked_parameters(project_store):
    import math

    from fkpd.studio import ParamError

    store = project_store
    project = store.get_project(PROJECT)
    with pytest.raises(ParamError, match="beta is nan"):
        enqueue_round(store, project, {"beta": math.nan})
    assert [j.kind for j in store.jobs.list(project.id)] == ["bootstrap"], "nothing queued for a bad value"


def test_a_worse_round_is_flagged_and_an_admin_can_roll_it_back(project_store):
    from fkpd.studio import RoundError, current_version, roll_back, served_versions
    from fkpd.train.evaluate import compare_with_parent

    store = project_store
    project = store.get_project(PROJECT)
    v0 = store.latest_policy_version(project.id)
    assert len(v0.metrics["episode_successes"]) == v0.metrics["episodes"], "the bootstrap keeps per-episode results"
    with pytest.raises(RoundError, match="no earlier version"):
        roll_back(store, project)
    n = v0.metrics["episodes"]
    parent = {"episode_successes": [1] * n, "episode_returns": [10.0] * n}
    child = {"episode_successes": [0] * n, "episode_returns": [1.0] * n}
    cmp = compare_with_parent(child, parent)
    v1 = store.add_policy_version(project.id, v0.checkpoint_path, parent_id=v0.id, round=1,
                                  metrics={"kind": "alignment_round", "success_rate": 0.0, "vs_parent": cmp,
                                           "success_ci95": [0.0, 0.3]})
    hist = rounds_history(store, project)
    assert hist.set_index("version").loc[v1.id, "vs_parent"].endswith("WORSE")
    assert hist.set_index("version").loc[v1.id, "status"] == "served"
    assert hist.set_index("version").loc[v1.id, "success_ci95"] == "0–30%"
    assert roll_back(store, project).id == v0.id
    assert current_version(store, project).id == v0.id, "the parent is served again"
    assert [v.id for v in served_versions(store, project)] == [v0.id]
    hist = rounds_history(store, project)
    assert hist.set_index("version").loc[v1.id, "status"] == "rolled back", "kept in the history"
    assert hist.set_index("version").loc[v0.id, "status"] == "served"
    assert store.get_policy_version(v1.id).id == v1.id, "nothing is deleted"


def test_local_workers_run_niced_below_the_app(tmp_path):
    """The app's local workers run at ``worker_nice`` below the app (``fkpd worker --nice``),
    so the app answers clicks first while a round trains (issue #15); a bad niceness is
    refused with the range."""
    import subprocess
    import sys
    import time

    from fkpd.studio import StudioConfig, start_local_worker

    cfg = StudioConfig(database_url=f"sqlite:///{tmp_path / 'fkpd.sqlite'}", artifact_dir=str(tmp_path / "artifacts"),
                       worker_nice=7)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    proc = start_local_worker(cfg, tmp_path / "worker.log")
    try:
        deadline = time.time() + 60
        while os.getpriority(os.PRIO_PROCESS, proc.pid) != min(mine + 7, 19):
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.time() < deadline, "the worker never lowered its priority"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(30)
    bad = subprocess.run([sys.executable, "-m", "fkpd.cli", "worker", "--nice", "25", "--once",
                          "--database-url", cfg.database_url, "--artifact-dir", cfg.artifact_dir],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--nice must be from 0 to 19" in bad.stderr + bad.stdout


def test_bc_and_a_round_train_on_every_core_and_give_the_worker_its_threads_back(tmp_path):
    """With ``threads`` 0 the bootstrap's BC and a round's alignment use every core (the
    app's worker runs with one torch thread, niced below the app), recorded in the BC
    checkpoint and the round's config; the worker's thread count is restored for the
    batch that follows (issue #15: first pair and rounds sooner)."""
    import json

    import torch

    from fkpd.policy import read_checkpoint_meta
    from fkpd.studio.batches import checkpoint_dir

    env = {**studio_env(tmp_path), "FKPD_BOOTSTRAP": json.dumps({**TINY_BOOTSTRAP, "threads": 0})}
    cfg = StudioConfig.from_env(env)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with cfg.open_store() as store:
            project, job = open_project(store, cfg)
            assert run_worker(store, once=True, handler_modules=["fkpd.studio"], stale_after_s=None) == 1
            assert store.jobs.get(job.id).status == "succeeded", store.jobs.get(job.id).error
            assert torch.get_num_threads() == 1, "the worker's thread count is back"
            v0 = store.latest_policy_version(project.id)
            meta = read_checkpoint_meta(checkpoint_dir(store, v0))
            assert meta["train"]["threads"] == (os.cpu_count() or 1)
            ada = store.get_or_create_annotator("ada")
            for outcome in ("left", "right"):
                store.answer(store.next_pair(project.id, ada).id, ada, outcome)
            round_job = enqueue_round(store, project, {"steps": 3})
            assert run_worker(store, once=True, handler_modules=["fkpd.studio"], stale_after_s=None) == 1
            assert store.jobs.get(round_job.id).status == "succeeded", store.jobs.get(round_job.id).error
            assert torch.get_num_threads() == 1, "the worker's thread count is back after the round"
            v1 = store.latest_policy_version(project.id)
            assert v1.round == 1
            config = json.loads((checkpoint_dir(store, v1).parent / "config.json").read_text())
            assert config["align"]["threads"] == (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)
