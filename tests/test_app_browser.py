"""End to end in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright against ``streamlit run app/streamlit_app.py`` with its own local worker, on a
small pre-bootstrapped project.

Checks that both videos really play, that a key press stores exactly one comparison and
shows the next pair, and that an alignment round started from the Rounds page completes
and the next batch comes from the new policy version. Saves a 1280×800 screenshot of every
page to ``test-artifacts/`` (``$FKPD_TEST_ARTIFACTS``), which git ignores.

Without Chromium or Playwright the test is skipped, except when ``CI`` is set: then it
fails, so CI can never pass without it (install: ``apt-get install -y chromium``; never
``playwright install``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from app_harness import CHROMIUM_ARGS, launch_app, stop_app
from conftest_app import ADMIN_PASSWORD, PROJECT, bootstrapped_project, project_dir, studio_env  # noqa: F401
from conftest_store import wait_for
from fkpd.store import Store

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("FKPD_TEST_ARTIFACTS", REPO / "test-artifacts"))


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set, so the browser test may not be skipped: {reason}")
    pytest.skip(reason)


def browser_path() -> str:
    """Debian's chromium; the test is skipped without it (fails under CI)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _skip_or_fail("playwright is not installed (pip install -r requirements.txt)")
    path = shutil.which("chromium")
    if path is None:
        _skip_or_fail("chromium is not on PATH (apt-get install -y chromium)")
    return path


@contextmanager
def chromium_page(chromium: str, timeout_ms: int = 60_000):
    """One 1280×800 page of a headless Chromium at ``chromium`` (:func:`browser_path`),
    Playwright's default timeout set to ``timeout_ms``; the browser is closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(timeout_ms)
            yield page
        finally:
            browser.close()


def start_app(project_root: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``streamlit run`` on a free port with its own local worker; returns (process, base URL)."""
    env = {**os.environ, **studio_env(project_root, FKPD_START_WORKER="1", FKPD_WORKER_THREADS="1")}
    return launch_app(env, log)


def video_state(page, side: str) -> dict:
    return page.locator(f"video.fkpd-{side}").evaluate(
        "v => ({ready: v.readyState, t: v.currentTime, paused: v.paused, muted: v.muted, loop: v.loop,"
        " w: v.getBoundingClientRect().width, h: v.getBoundingClientRect().height, src: !!v.getAttribute('src')})")


@pytest.fixture
def live_app(project_dir, tmp_path):
    chromium = browser_path()
    proc, url = start_app(project_dir, tmp_path / "streamlit.log")
    try:
        yield url, chromium, project_dir
    finally:
        stop_app(proc)


def test_label_round_and_next_batch_in_a_real_browser(live_app):
    from playwright.sync_api import expect

    url, chromium, root = live_app
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{root / 'fkpd.sqlite'}", root / "artifacts")
    v0 = store.latest_policy_version(PROJECT)
    with chromium_page(chromium) as page:
        page.goto(url)

        # The name is asked once; an empty one is refused.
        name_box = page.get_by_role("textbox", name="Your name")
        page.get_by_role("button", name="Start labelling").click()
        expect(page.get_by_text("Please enter your name")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "label-name.png")
        name_box.fill("ada")
        page.get_by_role("button", name="Start labelling").click()

        # Both videos play: same size, muted, looping, ready and advancing.
        player = page.locator(".fkpd-player")
        wait_for(lambda: player.get_attribute("data-pair-id"), 60, what="the first pair")
        for side in ("left", "right"):
            wait_for(lambda: video_state(page, side)["ready"] >= 3, 30, what=f"the {side} video to be ready")
        first = {side: video_state(page, side) for side in ("left", "right")}
        time.sleep(0.6)
        later = {side: video_state(page, side) for side in ("left", "right")}
        for side in ("left", "right"):
            assert later[side]["ready"] >= 3 and not later[side]["paused"], later[side]
            assert later[side]["muted"] and later[side]["loop"], later[side]
            assert later[side]["t"] != first[side]["t"], f"the {side} video is not advancing: {later[side]}"
        assert (first["left"]["w"], first["left"]["h"]) == (first["right"]["w"], first["right"]["h"]) > (100, 100)
        expect(page.get_by_text("Watch both clips")).to_be_visible()
        page.screenshot(path=ARTIFACTS / "label.png")

        # One key press: exactly one comparison, and the next pair shows at once: the
        # hidden videos that prefetched it trade places with the visible ones (no reload).
        shown = int(player.get_attribute("data-pair-id"))
        hidden = "v => ({src: v.getAttribute('src'), ready: v.readyState})"
        wait_for(lambda: all(page.locator(f"video.fkpd-pre-{side}").evaluate(hidden)["ready"] >= 3
                             for side in ("left", "right")), 30, what="the next pair prefetched")
        prefetched = {side: page.locator(f"video.fkpd-pre-{side}").evaluate(hidden)["src"] for side in ("left", "right")}
        page.keyboard.press("ArrowLeft")
        on_screen = {side: page.locator(f"video.fkpd-{side}").evaluate(hidden) for side in ("left", "right")}
        assert player.get_attribute("data-pair-id") not in ("", str(shown))
        for side in ("left", "right"):
            assert on_screen[side]["src"] == prefetched[side] and on_screen[side]["ready"] >= 2, (side, on_screen)
        wait_for(lambda: len(store.comparisons_frame(PROJECT)) > 0, 10, what="the comparison")
        time.sleep(1.5)  # a rerun or a repeated state update must not store it twice
        frame = store.comparisons_frame(PROJECT)
        assert frame[["pair_id", "annotator", "outcome"]].values.tolist() == [[shown, "ada", "left"]]
        wait_for(lambda: video_state(page, "left")["ready"] >= 3, 30, what="the next pair's video")

        # An alignment round from the Rounds page completes.
        page.get_by_role("link", name="Rounds").click()
        expect(page.get_by_text("Only an admin can start a round")).to_be_visible()
        page.get_by_label("Admin password").fill("wrong")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_text("Wrong password")).to_be_visible()
        page.get_by_label("Admin password").fill(ADMIN_PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("Parameters").click()
        page.get_by_label("Steps").fill("5")
        page.screenshot(path=ARTIFACTS / "rounds-form.png")
        page.get_by_role("button", name="Run alignment round").click()
        expect(page.get_by_text("Queued alignment round")).to_be_visible()
        # the newest job but the top-up pairs the idle workers render meanwhile (issue #13)
        job = next(j for j in store.jobs.list(PROJECT, status=("queued", "running", "succeeded", "failed"))
                   if j.kind != "top_up")
        assert job.kind == "alignment_round" and job.params["steps"] == 5
        done = wait_for(lambda: (j := store.jobs.get(job.id)).done and j, 240, what="the alignment round")
        assert done.status == "succeeded", done.error
        expect(page.get_by_text(f"Alignment round (job {job.id}): succeeded")).to_be_visible(timeout=30_000)
        v1 = store.latest_policy_version(PROJECT)
        assert v1.round == 1 and v1.parent_id == v0.id and v1.metrics["labels_used"] == 1
        page.screenshot(path=ARTIFACTS / "rounds.png")

        # The next batch comes from the new version.
        page.get_by_role("link", name="Label").click()
        wait_for(lambda: player.get_attribute("data-version") == str(v1.id), 60, what="a pair from the new version")
        wait_for(lambda: video_state(page, "left")["ready"] >= 3, 30, what="the new batch's video")
        pair = store.lease_pairs(PROJECT, "ada", 1)[0]
        assert pair.policy_version_id == v1.id and pair.round == 2
        page.screenshot(path=ARTIFACTS / "label-next-batch.png")

        for name, title in (("Data", "Preference data"), ("Compare", "Compare policy versions")):
            page.get_by_role("link", name=name).click()
            expect(page.get_by_text(title)).to_be_visible()
            time.sleep(1.0)
            page.screenshot(path=ARTIFACTS / f"{name.lower()}.png")
    store.close()
