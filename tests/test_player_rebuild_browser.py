"""The pair player still takes the arrow keys after Streamlit rebuilt it (commit 875caa7).

Streamlit runs the player's JS again on every rerun that changes its data (an answer:
the next pair) on the same element, without calling the previous run's cleanup; each run
used to add a document ``keydown`` listener, and when the element was later replaced,
only the last run's listener was removed, so a listener of the replaced player stayed on
the document and ran first. It called ``preventDefault`` on an arrow key for its
detached player, and the player on screen ignored the press (no answer stored, no hint);
bench/bench_session.py found it. Now a player keeps one listener per element (each run
replaces the previous one) and a detached player's listener ignores keys; the test also
counts the player's live document listeners (one, whatever the reruns).

Here: answer one pair in the browser (the rerun runs the player's JS again with the next
pair), go to the Data page and back to Label (Streamlit replaces the player element; the
same pair comes back, no new one), check the old element left the page and a new one
shows the pair, then press an arrow key after the minimum viewing time: the answer is in
the store and the next pair shows. The second pair's clips are held paused until the
annotator has left (an annotator who leaves right after answering), so the replaced
player has not seen the minimum viewing time and cannot answer in the new one's place.
Headless Chromium (Debian's ``chromium``) with Playwright against ``streamlit run`` on the
tiny pre-bootstrapped project, without local workers; skipped without Chromium or
Playwright (fails under ``CI``), like tests/test_app_browser.py.
"""

from __future__ import annotations

import os
import time

from app_harness import launch_app, stop_app
from conftest_app import PROJECT, bootstrapped_project, project_dir, studio_env  # noqa: F401
from conftest_store import wait_for
from fkpd.store import Store
from test_app_browser import ARTIFACTS, browser_path, chromium_page, video_state
from test_label_quality_browser import HOLD_PLAYBACK


#: Counts the pair player's live document keydown listeners (recognised by their source).
COUNT_KEY_LISTENERS = """
(() => {
  const live = new Set();
  window.__playerKeyListeners = () => live.size;
  const add = EventTarget.prototype.addEventListener, remove = EventTarget.prototype.removeEventListener;
  Document.prototype.addEventListener = function (type, fn, opts) {
    if (type === "keydown" && String(fn).includes("KEYS[e.key]")) live.add(fn);
    return add.call(this, type, fn, opts);
  };
  Document.prototype.removeEventListener = function (type, fn, opts) {
    if (type === "keydown") live.delete(fn);
    return remove.call(this, type, fn, opts);
  };
})();
"""


def _watch_both_clips(page) -> None:
    """Wait until the pair on screen may be answered: both clips play, then one loop of
    the 12-step clips (0.43 s, shorter than the 1.5 s minimum) and then some."""
    for side in ("left", "right"):
        wait_for(lambda: (v := video_state(page, side))["ready"] >= 3 and not v["paused"], 30,
                 what=f"the {side} clip to play")
    time.sleep(1.0)


def test_arrow_keys_reach_the_player_after_streamlit_rebuilt_it(project_dir, tmp_path):
    from playwright.sync_api import expect

    chromium = browser_path()
    store = Store(f"sqlite:///{project_dir / 'fkpd.sqlite'}", project_dir / "artifacts")
    proc, url = launch_app({**os.environ, **studio_env(project_dir)}, tmp_path / "streamlit.log")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with chromium_page(chromium) as page:
            page.add_init_script(HOLD_PLAYBACK)  # window.__fkpdHold: play() does nothing while true
            page.add_init_script("window.__fkpdHold = false")
            page.add_init_script(COUNT_KEY_LISTENERS)
            page.goto(f"{url}/?annotator=ada")
            player = page.locator(".fkpd-player")

            # A first answer; the second pair's clips stay paused in this player.
            first = int(wait_for(lambda: player.get_attribute("data-pair-id"), 60, what="the first pair"))
            _watch_both_clips(page)
            page.evaluate("window.__fkpdHold = true")
            page.keyboard.press("ArrowLeft")
            second = int(wait_for(lambda: player.get_attribute("data-pair-id") not in ("", str(first))
                                  and player.get_attribute("data-pair-id"), 10, what="the second pair"))
            wait_for(lambda: len(store.comparisons_frame(PROJECT)) == 1, 15, what="the first answer")
            # The answer's rerun ran the player's JS again: it now holds the pair after the second.
            expect(page.locator(".fkpd-status")).to_contain_text(f"Pair {second} ")
            expect(page.locator(".fkpd-status")).to_contain_text("next pair loaded")
            assert video_state(page, "left")["paused"] and video_state(page, "right")["paused"]
            assert page.evaluate("window.__playerKeyListeners()") == 1, "one keydown listener per player, not per rerun"
            old = player.element_handle()

            # Data and back: Streamlit replaces the player; the same pair comes back.
            page.get_by_role("link", name="Data").click()
            expect(player).to_have_count(0)
            assert not old.evaluate("e => e.isConnected"), "the Data page still holds the player"
            page.evaluate("window.__fkpdHold = false")
            page.get_by_role("link", name="Label").click()
            expect(player).to_have_count(1)
            wait_for(lambda: player.get_attribute("data-pair-id") == str(second), 30, what="the second pair again")
            new = player.element_handle()
            assert page.evaluate("([a, b]) => a !== b && !a.isConnected && b.isConnected", [old, new]), \
                "the player on screen should be a new element and the old one detached"
            assert len(store.comparisons_frame(PROJECT)) == 1, "going back must not answer anything"

            # The player on screen takes the key: stored, and the next pair shows.
            _watch_both_clips(page)
            page.keyboard.press("ArrowRight")
            try:
                wait_for(lambda: len(store.comparisons_frame(PROJECT)) == 2, 15, what="the answer after the rebuild")
                wait_for(lambda: player.get_attribute("data-pair-id") not in ("", str(second)), 10,
                         what="the next pair after the rebuild")
            finally:
                page.screenshot(path=ARTIFACTS / "label-after-rebuild.png")
            assert page.evaluate("window.__playerKeyListeners()") == 1, "the replaced player's listener is gone"
            frame = store.comparisons_frame(PROJECT)
            assert sorted(frame[["pair_id", "annotator", "outcome"]].values.tolist()) == \
                sorted([[first, "ada", "left"], [second, "ada", "right"]])
    finally:
        stop_app(proc)
        store.close()
