"""Invite mode end to end in a real browser (issue #14): headless Chromium (Debian's
``chromium``) driven by Playwright against ``streamlit run app/streamlit_app.py`` on a small
pre-bootstrapped project switched to ``invite`` identity mode.

Two annotators open their invite links in two browser contexts. A link with only a name
creates nobody. One annotator's browser forges an answer for the pair the page leased to
the other (as a hostile client would, through the player's state): it is refused, shown
as not stored, and logged in the app's terminal, and the lease holder's own answer is
still stored. Skipped without Chromium or Playwright, except under ``CI``.
"""

from __future__ import annotations

import os
import time

import pytest

from app_harness import launch_app, stop_app
from conftest_app import PROJECT, bootstrapped_project, project_dir, studio_env  # noqa: F401
from conftest_store import wait_for
from fkpd.store import Store
from test_app_browser import ARTIFACTS, CHROMIUM_ARGS, browser_path, video_state

FORGE = """(el, pair) => {
  let node = el, st;
  while (node && !(st = node.__fkpd)) node = node.parentNode || node.host;  // up to the player's host
  st.answers.push({pair: pair, outcome: "left", shown_ms: Date.now()});
  st.setStateValue("answers", st.answers.slice());
  return st.answers.length;
}"""


@pytest.fixture
def invite_app(project_dir, tmp_path):
    chromium = browser_path()
    store = Store(f"sqlite:///{project_dir / 'fkpd.sqlite'}", project_dir / "artifacts")
    store.update_project(PROJECT, identity="invite")
    tokens = {name: store.create_invite(PROJECT, name).token for name in ("mallory", "bob")}
    log = tmp_path / "streamlit.log"
    proc, url = launch_app({**os.environ, **studio_env(project_dir)}, log)
    try:
        yield url, chromium, store, tokens, log
    finally:
        stop_app(proc)
        store.close()


def _open(browser, url: str):
    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    return page


def _current_pair(page) -> int:
    player = page.locator(".fkpd-player")
    wait_for(lambda: player.get_attribute("data-pair-id"), 60, what="a pair on screen")
    wait_for(lambda: video_state(page, "left")["ready"] >= 3, 30, what="the video to be ready")
    return int(player.get_attribute("data-pair-id"))


def test_invite_mode_refuses_and_logs_answers_for_pairs_leased_to_someone_else(invite_app):
    from playwright.sync_api import expect, sync_playwright

    url, chromium, store, tokens, log = invite_app
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)

        # A name alone is not an identity in invite mode, and creates nobody.
        stranger = _open(browser, f"{url}/?annotator=eve")
        expect(stranger.get_by_text("Invitation needed")).to_be_visible(timeout=60_000)
        assert "eve" not in [a.name for a in store.list_annotators()]

        mallory = _open(browser, f"{url}/?token={tokens['mallory']}")
        mallorys = _current_pair(mallory)
        bob = _open(browser, f"{url}/?token={tokens['bob']}")
        bobs = _current_pair(bob)
        bob_shown = time.monotonic()
        assert bobs != mallorys
        expect(bob.get_by_text("bob", exact=True)).to_be_visible(timeout=30_000)  # the sidebar names the invited annotator

        # Mallory's browser sends an answer for the pair leased to bob.
        assert mallory.locator(".fkpd-player").evaluate(FORGE, bobs) == 1
        expect(mallory.get_by_text(f"your answer to pair {bobs} was not stored")).to_be_visible(timeout=30_000)
        expect(mallory.get_by_text("is not leased to annotator 'mallory'")).to_be_visible()
        mallory.screenshot(path=ARTIFACTS / "label-invite-refused.png")
        assert store.comparisons_frame(PROJECT).empty, "the forged answer was not stored"
        wait_for(lambda: f"refused the answer of annotator 'mallory' for pair {bobs}" in log.read_text(), 10,
                 what="the refusal in the app's log")
        assert f"refused an answer of annotator 'mallory' for pair {bobs}" in log.read_text()

        # Bob's own answer to his pair is accepted, and so is mallory's to hers, once both
        # clips played the minimum viewing time (1.5 s; an earlier press is not stored).
        time.sleep(max(0.0, bob_shown + 2.0 - time.monotonic()))
        bob.keyboard.press("ArrowRight")
        mallory.keyboard.press("ArrowDown")
        wait_for(lambda: len(store.comparisons_frame(PROJECT)) == 2, 20, what="both answers")
        time.sleep(1.0)  # a rerun must not store anything twice
        frame = store.comparisons_frame(PROJECT)
        assert sorted(frame[["pair_id", "annotator", "outcome"]].values.tolist()) == sorted(
            [[bobs, "bob", "right"], [mallorys, "mallory", "equal"]])

        # A revoked link stops working at the next rerun.
        store.revoke_invites(PROJECT, "mallory")
        mallory.reload()
        expect(mallory.get_by_text("Invitation needed")).to_be_visible(timeout=30_000)
        browser.close()
