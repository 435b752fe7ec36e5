"""Issue #16, point 6: artifacts on object storage, end to end, with no shared disk.

A tiny project keeps its artifacts on an S3-compatible server (``moto`` in server mode on
127.0.0.1, ``FKPD_ARTIFACT_URL=s3://...``, endpoint in ``FSSPEC_S3_ENDPOINT_URL``). A
worker *process* bootstraps it and runs one alignment round; the Streamlit app, started
as its own process, serves the Label page; headless Chromium plays the round's clips.
The worker, the app and this test each have a local cache directory of their own and no
artifact directory at all: checkpoints, datasets, segments and clips pass only through
the bucket.

Skipped without Chromium or Playwright, except under ``CI`` (see test_app_browser).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from app_harness import launch_app, stop_app  # noqa: E402
from conftest_app import TINY_BOOTSTRAP, studio_env  # noqa: E402
from conftest_store import wait_for  # noqa: E402
from test_app_browser import ARTIFACTS, CHROMIUM_ARGS, browser_path  # noqa: E402
from test_artifacts_s3 import s3_server  # noqa: E402,F401

from fkpd.store import ArtifactDir, run_worker  # noqa: E402
from fkpd.store.remote_artifacts import RemoteArtifacts  # noqa: E402
from fkpd.studio import StudioConfig, enqueue_round, open_project  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fkpd-accept"
#: Even smaller than the app tests' project: 2 pairs, 1 evaluation episode.
BOOTSTRAP = {**TINY_BOOTSTRAP, "bc_steps": 10, "pairs_per_batch": 2, "eval_episodes": 1, "n_envs": 2}


def test_bootstrap_round_and_clips_play_from_s3(s3_server, tmp_path, monkeypatch):
    import s3fs
    from playwright.sync_api import sync_playwright

    chromium = browser_path()
    s3fs.S3FileSystem(endpoint_url=s3_server).mkdir(BUCKET)
    url = f"s3://{BUCKET}/studio"
    env = {**studio_env(tmp_path, FKPD_BOOTSTRAP=json.dumps(BOOTSTRAP), FKPD_AUTO_ROUNDS="0"),
           "FKPD_ARTIFACT_URL": url}
    env.pop("FKPD_ARTIFACT_DIR")
    for key in ("FKPD_ARTIFACT_DIR", "FKPD_ARTIFACT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FKPD_ARTIFACT_CACHE", str(tmp_path / "cache-test"))

    cfg = StudioConfig.from_env(env)
    assert cfg.artifact_url == url
    store = cfg.open_store()
    assert isinstance(store.artifacts, RemoteArtifacts) and store.artifact_location == url
    project, boot = open_project(store, cfg)

    # A worker process with a cache of its own, as on another machine, for the round.
    worker_env = {**os.environ, **env, "FKPD_ARTIFACT_CACHE": str(tmp_path / "cache-worker"),
                  "FKPD_WORKER_KINDS": "alignment_round"}
    (tmp_path / "worker-cwd").mkdir()
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "fkpd.cli", "worker", "--threads", "1",
                                   "--parent-pid", str(os.getpid())], cwd=tmp_path / "worker-cwd",
                                  env=worker_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    app = None
    try:
        # The bootstrap runs here, with this process's cache, while the worker starts.
        assert run_worker(store, once=True, handler_modules=["fkpd.studio"], heartbeat_s=0.5, stale_after_s=None,
                          kinds=["bootstrap"]) == 1
        assert store.jobs.get(boot.id).status == "succeeded", store.jobs.get(boot.id).error
        v0 = store.latest_policy_version(project.id)

        bob = store.get_or_create_annotator("bob")
        store.answer(store.lease_pairs(project.id, bob.id, 1)[0].id, bob.id, "left")
        job = enqueue_round(store, project, {"steps": 3})
        # The app, with a cache of its own, starts while the worker trains.
        app_env = {**os.environ, **env, "FKPD_ARTIFACT_CACHE": str(tmp_path / "cache-app"), "FKPD_START_WORKER": "0"}
        app, base = launch_app(app_env, tmp_path / "streamlit.log")

        def finished(job_id: int):
            job = store.jobs.get(job_id)
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            return job.done and job

        done = wait_for(lambda: finished(job.id), 240, 0.5, what="the alignment round on the worker")
        assert done.status == "succeeded", done.error
        v1 = store.latest_policy_version(project.id)
        assert v1.round == 1 and v1.parent_id == v0.id and v1.metrics["labels_used"] == 1

        # Everything is in the bucket; nobody has an artifact directory.
        listing = store.artifacts.list(f"projects/{project.id}")
        boot_meta = v0.metrics["bootstrap"]
        for rel in (v0.checkpoint_path, v1.checkpoint_path, boot_meta["dataset"]):
            assert rel in listing
        assert v1.checkpoint_path.replace("model.safetensors", "config.json") in listing
        assert store.artifacts.sha256(boot_meta["dataset"]) == boot_meta["dataset_sha256"]
        clips = [p for p in listing if p.endswith(".mp4")]
        assert len(clips) == 2 * 2 * BOOTSTRAP["pairs_per_batch"], listing  # the batches of rounds 1 and 2
        assert not any(tmp_path.rglob("artifacts")) and not (REPO / "labels" / "artifacts" / "projects" /
                                                                 str(project.id)).exists()
        # The worker read version 0 and the dataset from the bucket into its own cache.
        worker_cache = tmp_path / "cache-worker" / "sha256"
        assert (worker_cache / v0.checkpoint_sha256[:2] / v0.checkpoint_sha256 / "config.json").is_file()
        assert (worker_cache / boot_meta["dataset_sha256"][:2] / boot_meta["dataset_sha256"] / "dataset.hdf5").is_file()

        # The app serves round 2's clips from the bucket.
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(60_000)
            page.goto(base)
            page.get_by_role("textbox", name="Your name").fill("ada")
            page.get_by_role("button", name="Start labelling").click()
            player = page.locator(".fkpd-player")
            shown = int(wait_for(lambda: player.get_attribute("data-pair-id"), 60, what="the first pair"))
            assert player.get_attribute("data-version") == str(v1.id)
            for side in ("left", "right"):
                state = wait_for(lambda: (s := page.locator(f"video.fkpd-{side}").evaluate(
                    "v => ({ready: v.readyState, w: v.videoWidth, h: v.videoHeight})"))["ready"] >= 2 and s, 30,
                    what=f"the {side} video to play")
                assert state["w"] > 0 and state["h"] > 0, state
            page.screenshot(path=ARTIFACTS / "label-s3.png")
            browser.close()
        # The app read them through its own read-through cache, keyed by sha256.
        leased = {p.id: p for p in store.lease_pairs(project.id, store.get_or_create_annotator("ada").id, 2)}
        cached = {p.parent.name for p in (tmp_path / "cache-app" / "sha256").rglob("*.mp4")}
        assert {leased[shown].left.video_sha256, leased[shown].right.video_sha256} <= cached
    finally:
        if app is not None:
            stop_app(app)
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        store.close()
    assert not isinstance(store.artifacts, ArtifactDir)

