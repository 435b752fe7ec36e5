"""The report opened from disk in headless Chromium (Debian's ``chromium``) with the
network cut off: every request other than the file itself is aborted (and recorded), and
host names resolve to nothing. Every ``<video>`` must play from its embedded ``data:``
URI (readyState ≥ 2, ``videoWidth`` > 0, ``currentTime`` advancing) and every plot must
load, with no request leaving the file. Skipped without Chromium or Playwright, except
under ``CI``, where it fails (as tests/test_app_browser.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest_app import PROJECT

pytest.register_assert_rewrite("conftest_report")  # loaded as a plugin (below): rewrite it as one
from conftest_report import EPISODES, SIZE, open_store  # noqa: E402
from test_app_browser import CHROMIUM_ARGS, browser_path  # noqa: E402

pytest_plugins = ["conftest_report"]
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("FKPD_TEST_ARTIFACTS", REPO / "test-artifacts"))


def test_report_videos_play_in_chromium_with_no_network(compared_project, tmp_path):
    from playwright.sync_api import sync_playwright

    from fkpd.studio.report import write_report

    chromium = browser_path()
    root, job_id = compared_project
    out = tmp_path / "report.html"
    with open_store(root) as store:
        report = write_report(store, store.get_project(PROJECT), out, episodes=EPISODES, render_size=SIZE)
    assert report.clips.source == f"clips of compare job {job_id}"

    requests, blocked = [], []

    def block(route):
        blocked.append(route.request.url)
        route.abort()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium,
                                     args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP * ~NOTFOUND"])
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                      else block(route))
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("request", lambda r: requests.append(r.url))
        page.goto(out.as_uri())

        assert page.locator("#rounds-table tbody tr").count() == 2
        images = page.locator("img")
        assert images.count() == 4
        for i in range(images.count()):
            img = images.nth(i)
            img.scroll_into_view_if_needed()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())

        videos = page.locator("video")
        assert videos.count() == EPISODES
        for i in range(EPISODES):
            video = videos.nth(i)
            video.scroll_into_view_if_needed()  # Chromium pauses muted autoplay off screen
            handle = video.element_handle()
            page.wait_for_function("v => v.readyState >= 2 && v.videoWidth > 0", arg=handle)
            video.evaluate("v => v.play()")
            start = video.evaluate("v => v.currentTime")
            deadline = time.time() + 20
            while video.evaluate("v => v.currentTime") <= start + 0.2 and time.time() < deadline:
                page.wait_for_timeout(100)
            state = video.evaluate("v => ({t: v.currentTime, w: v.videoWidth, h: v.videoHeight, err: v.error && "
                                   "v.error.code, paused: v.paused, ready: v.readyState})")
            assert state["t"] > start + 0.2 and not state["paused"] and state["err"] is None, state
            assert state["w"] > 2 * SIZE and state["h"] > SIZE, state
        page.screenshot(path=ARTIFACTS / "report.png", full_page=True)
        browser.close()

    assert blocked == [], f"the report asked the network for {blocked}"
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
