"""Issue #13 in a real browser: an admin turns automatic rounds on (a round after 2 new
comparisons), an annotator answers 2 pairs with the arrow keys, and a round starts by
itself, trains, and the next pairs come from the new version, while the annotator always
has a pair on screen (top-up pairs keep coming while the round trains).

Headless Chromium (Debian's ``chromium``) with Playwright against ``streamlit run`` and
its own two local workers on the tiny pre-bootstrapped project; skipped without Chromium
or Playwright (fails under ``CI``), like tests/test_app_browser.py.
"""

from __future__ import annotations

import time

from app_harness import stop_app
from conftest_app import ADMIN_PASSWORD, PROJECT, bootstrapped_project, project_dir  # noqa: F401
from conftest_store import wait_for
from fkpd.store import Store
from test_app_browser import ARTIFACTS, browser_path, chromium_page, start_app, video_state


def test_a_round_starts_automatically_after_n_answers(project_dir, tmp_path):
    from playwright.sync_api import expect

    chromium = browser_path()
    root = project_dir
    store = Store(f"sqlite:///{root / 'fkpd.sqlite'}", root / "artifacts")
    store.update_project(PROJECT, settings={"round_params": {"steps": 5}})  # what the admin chose last time
    v0 = store.latest_policy_version(PROJECT)
    proc, url = start_app(root, tmp_path / "streamlit.log")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with chromium_page(chromium) as page:

            # The admin sets automatic rounds to 2 new comparisons.
            page.goto(f"{url}/rounds")
            page.get_by_label("Admin password").fill(ADMIN_PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.get_by_label("after this many new comparisons").fill("2")
            page.get_by_role("button", name="Save automatic rounds").click()
            expect(page.get_by_text("Automatic rounds on: a round after 2 new comparisons")).to_be_visible()
            expect(page.get_by_text("0 of 2 new comparisons")).to_be_visible(timeout=10_000)

            # The annotator answers two pairs; nobody clicks anything on the Rounds page.
            page.goto(f"{url}/?annotator=ada")
            player = page.locator(".fkpd-player")
            for key in ("ArrowLeft", "ArrowRight"):
                wait_for(lambda: player.get_attribute("data-pair-id"), 60, what="a pair")
                wait_for(lambda: video_state(page, "left")["ready"] >= 3, 30, what="the video")
                shown = player.get_attribute("data-pair-id")
                time.sleep(2.0)  # both clips have played for a while
                page.keyboard.press(key)
                wait_for(lambda: player.get_attribute("data-pair-id") not in ("", shown), 30, what="the next pair")
            wait_for(lambda: len(store.comparisons_frame(PROJECT)) == 2, 15, what="the two comparisons")
            job = wait_for(lambda: next((j for j in store.jobs.list(PROJECT) if j.kind == "alignment_round"), None),
                           30, 0.2, what="an automatic round")
            assert job.params["steps"] == 5
            # While it trains and renders, the annotator always has a pair on screen.
            empty = 0
            while not (current := store.jobs.get(job.id)).done:
                empty += player.get_attribute("data-pair-id") in (None, "")
                time.sleep(0.5)
            assert current.status == "succeeded", current.error
            assert empty == 0, f"no pair on screen at {empty} checks during the round"
            page.screenshot(path=ARTIFACTS / "label-during-auto-round.png")
            v1 = store.latest_policy_version(PROJECT)
            assert v1.round == 1 and v1.parent_id == v0.id and v1.metrics["labels_used"] == 2
            assert [j.kind for j in store.jobs.list(PROJECT) if j.kind == "alignment_round"] == ["alignment_round"]
            jobs = [(j.id, j.kind, j.status, j.message) for j in store.jobs.list(PROJECT)]
            assert any(k == "top_up" for _, k, _, _ in jobs), jobs

            # The next pairs come from the new version; the Rounds page counts afresh.
            page.reload()
            wait_for(lambda: player.get_attribute("data-version") == str(v1.id), 90, what="a pair from the new version")
            expect(page.get_by_text(f"Clips of v{v1.id} (round 1)")).to_be_visible()
            page.screenshot(path=ARTIFACTS / "label-after-auto-round.png")
            page.goto(f"{url}/rounds")
            expect(page.get_by_text("0 of 2 new comparisons")).to_be_visible(timeout=10_000)
            page.screenshot(path=ARTIFACTS / "rounds-auto.png")
    finally:
        stop_app(proc)
        store.close()
