"""Label quality in a real browser (issue #13, point 5), one app start for three checks:

* a key pressed before both clips have played stores nothing and shows the "Watch both
  clips first" hint (the videos are held paused until the check is done);
* a gold pair answered wrongly lowers that annotator's gold accuracy, read through the
  function the Data page shows (``Store.annotator_stats``), while the Label page's HTML
  never says which pairs are gold;
* an admin excludes an annotator on the Data page, and that annotator's comparisons are
  not in the next round's training set (``StoreLabeller.labels``, what the round reads).

Headless Chromium (Debian's ``chromium``) with Playwright against ``streamlit run`` on the
tiny pre-bootstrapped project, without local workers; skipped without Chromium or
Playwright (fails under ``CI``), like tests/test_app_browser.py.
"""

from __future__ import annotations

import os
import time

from app_harness import launch_app, stop_app
from conftest_app import ADMIN_PASSWORD, PROJECT, bootstrapped_project, project_dir, studio_env  # noqa: F401
from conftest_store import wait_for
from fkpd.store import Store
from fkpd.studio.batches import StoreLabeller
from test_app_browser import ARTIFACTS, browser_path, chromium_page, video_state

# Videos do not start until the test lets them (window.__fkpdHold = false), so the first
# key press certainly comes before the minimum viewing time.
HOLD_PLAYBACK = """
window.__fkpdHold = true;
const play = HTMLMediaElement.prototype.play;
HTMLMediaElement.prototype.play = function () { return window.__fkpdHold ? Promise.resolve() : play.call(this); };
"""


def test_minimum_viewing_time_gold_accuracy_and_exclusion(project_dir, tmp_path):
    from playwright.sync_api import expect

    chromium = browser_path()
    store = Store(f"sqlite:///{project_dir / 'fkpd.sqlite'}", project_dir / "artifacts")
    project = store.get_project(PROJECT)
    open_pairs = [p.id for p in store.lease_pairs(PROJECT, store.get_or_create_annotator("probe"), 4)]
    for pid in open_pairs:
        store.release(pid, "probe")
    gold = store.mark_gold_pairs(PROJECT, open_pairs, share=1.0, return_margin=0.0)
    bob = store.get_or_create_annotator("bob")  # bob answers the first pair through the store
    bobs = store.next_pair(PROJECT, bob)
    store.answer(bobs.id, bob, "left", project=PROJECT)
    proc, url = launch_app({**os.environ, **studio_env(project_dir)}, tmp_path / "streamlit.log")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with chromium_page(chromium) as page:
            page.add_init_script(HOLD_PLAYBACK)

            # Too early: a hint, nothing stored.
            page.goto(f"{url}/?annotator=ada")
            player = page.locator(".fkpd-player")
            wait_for(lambda: player.get_attribute("data-pair-id"), 60, what="a pair")
            wait_for(lambda: video_state(page, "left")["ready"] >= 2, 30, what="the video")
            shown = int(player.get_attribute("data-pair-id"))
            assert shown in gold, f"pair {shown} on screen; gold pairs {gold}"
            page.keyboard.press("ArrowLeft")
            expect(page.locator(".fkpd-hint")).to_contain_text("Watch both clips first")
            page.screenshot(path=ARTIFACTS / "label-too-early.png")
            time.sleep(1.0)
            assert len(store.comparisons_frame(PROJECT)) == 1 and int(player.get_attribute("data-pair-id")) == shown
            assert "gold" not in page.content().lower(), "the Label page never says which pairs are gold"

            # Both clips play; then the gold pair is answered wrongly.
            page.evaluate("window.__fkpdHold = false")
            page.keyboard.press("r")
            wait_for(lambda: not video_state(page, "left")["paused"], 10, what="the clips to play")
            time.sleep(1.0)  # one loop of the 12-step clips (0.43 s) and then some
            wrong = "ArrowRight" if gold[shown] == "left" else "ArrowLeft"
            page.keyboard.press(wrong)
            wait_for(lambda: len(store.comparisons_frame(PROJECT)) == 2, 15, what="ada's answer")
            stats = store.annotator_stats(PROJECT)
            assert stats.loc["ada", ["gold_n", "gold_correct"]].tolist() == [1, 0]
            assert stats.loc["ada", "gold_accuracy"] == 0.0

            # The admin excludes bob on the Data page; the next round trains without him.
            assert len(StoreLabeller(store, project).labels()) == 2
            page.get_by_role("link", name="Data").click()
            page.get_by_label("Admin password").fill(ADMIN_PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.locator("[data-testid=stSelectbox]").filter(has_text="Annotator to exclude").click()
            page.get_by_role("option", name="bob").click()
            page.get_by_role("button", name="Exclude from training").click()
            expect(page.get_by_text("Excluded from training: bob")).to_be_visible()
            expect(page.get_by_role("button", name="Include bob again")).to_be_visible()
            page.screenshot(path=ARTIFACTS / "data-quality.png", full_page=True)
            assert [e.annotator for e in store.excluded_annotators(PROJECT)] == ["bob"]
            labels = StoreLabeller(store, project).labels()
            assert len(labels) == 1 and labels[0][2] == (1.0 if wrong == "ArrowLeft" else 0.0), "only ada's answer"
            assert len(store.comparisons_frame(PROJECT)) == 2, "bob's comparison stays in the store"
    finally:
        stop_app(proc)
        store.close()
