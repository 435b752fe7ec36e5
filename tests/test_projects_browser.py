"""Several projects in one app (issue #16, point 1), in headless Chromium: an admin
creates a second project (``d4rl/maze2d-umaze``, tiny settings) on the Projects page,
the app's own workers run its bootstrap, and an annotator moves between the two projects
with the sidebar's picker and with links (``?project=``); every answer lands in the
project whose pair was on screen (checked in the store). Screenshots go to
``test-artifacts/`` (``$FKPD_TEST_ARTIFACTS``). Skipped without Chromium or Playwright
(fails under CI), as tests/test_app_browser.py.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest_app import ADMIN_PASSWORD, PROJECT, bootstrapped_project, project_dir  # noqa: F401
from conftest_store import wait_for
from fkpd.store import Store
from app_harness import launch_app, stop_app
from conftest_app import studio_env
from test_app_browser import ARTIFACTS, CHROMIUM_ARGS, browser_path, video_state

MAZE = "maze"
#: What the admin types in "Other bootstrap settings": a tiny policy, 32×32 clips.
MAZE_EXTRA = {"max_episode_steps": 30, "render_size": 32, "n_envs": 2, "threads": 1,
              "bc": {"batch_size": 16, "warmup_steps": 2, "save_every": 10}, "policy": {"hidden_dim": 32, "n_blocks": 1}}


@pytest.fixture
def live_app(project_dir, tmp_path):  # noqa: F811
    chromium = browser_path()
    env = {**os.environ, **studio_env(project_dir, FKPD_START_WORKER="1", FKPD_WORKER_THREADS="1")}
    proc, url = launch_app(env, tmp_path / "streamlit.log", serve=True)  # as make run: the workers start at once
    try:
        yield url, chromium, project_dir
    finally:
        stop_app(proc)


def _answer(page, key: str, versions: set[int]) -> int:
    """Press ``key`` on the pair on screen, once it is a pair of one of ``versions`` (the
    project's policy versions), until the player moves on (a press before the clips were
    watched long enough is not taken); the answered pair's id."""
    player = page.locator(".fkpd-player")
    wait_for(lambda: (v := player.get_attribute("data-version")) and int(v) in versions, 60,
             what=f"a pair of version {sorted(versions)}")
    shown = player.get_attribute("data-pair-id")
    for side in ("left", "right"):
        wait_for(lambda: video_state(page, side)["ready"] >= 3, 30, what=f"the {side} video")
    page.evaluate("document.activeElement && document.activeElement.blur()")  # keys go to the page, not a widget
    deadline = time.time() + 20
    while player.get_attribute("data-pair-id") == shown and time.time() < deadline:
        page.keyboard.press(key)
        time.sleep(0.5)
    assert player.get_attribute("data-pair-id") != shown, "the answer was not taken"
    return int(shown)


def _href(page) -> str:
    """The address bar now (``page.url`` is updated only while Playwright handles events)."""
    return page.evaluate("location.href")


def _pick(page, name: str) -> None:
    """Choose ``name`` in the sidebar's project picker."""
    page.locator("[data-testid=stSidebar] [data-testid=stSelectbox]").click()
    page.get_by_role("option", name=name).click()


def test_admin_creates_a_project_and_an_annotator_labels_both(live_app):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # a busy CI machine (reset below: the setting is global)
    try:
        _admin_creates_and_ada_labels(live_app)
    finally:
        expect.set_options(timeout=5_000)  # Playwright's default


def _admin_creates_and_ada_labels(live_app) -> None:
    from playwright.sync_api import expect, sync_playwright

    url, chromium, root = live_app
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    store = Store(f"sqlite:///{root / 'fkpd.sqlite'}", root / "artifacts")
    door = store.get_project(PROJECT)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        admin = browser.new_page(viewport={"width": 1280, "height": 900})
        admin.set_default_timeout(30_000)
        admin.goto(f"{url}/projects")
        expect(admin.get_by_label("Admin password")).to_be_visible(timeout=90_000)  # the first run imports torch
        admin.get_by_label("Admin password").fill(ADMIN_PASSWORD)
        admin.get_by_role("button", name="Sign in").click()
        admin.get_by_label("Project name", exact=True).fill(MAZE)
        admin.locator("[data-testid=stMain] [data-testid=stSelectbox]").filter(has_text="Task").click()
        admin.keyboard.type("maze2d-umaze")
        admin.get_by_role("option", name="d4rl/maze2d-umaze", exact=True).click()
        admin.get_by_text("Open (a typed name; demos)").click()
        for label, value in (("Pairs per batch", 2), ("Clip length L (0: the task's)", 8), ("Generated episodes", 2),
                             ("BC steps", 10), ("Evaluation episodes", 1)):
            admin.get_by_label(label, exact=True).fill(str(value))
        admin.get_by_label("Other bootstrap settings (JSON object)", exact=True).fill(json.dumps(MAZE_EXTRA))
        admin.screenshot(path=ARTIFACTS / "projects-new.png")
        admin.get_by_role("button", name="Create project").click()
        expect(admin.get_by_text(f"Created project '{MAZE}'")).to_be_visible()
        maze = store.get_project(MAZE)
        job, = store.jobs.list(maze.id)
        assert job.kind == "bootstrap" and job.params["bc_steps"] == 10 and job.params["render_size"] == 32

        # The annotator starts on the default project (no ?project=): one answer there.
        page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        page.set_default_timeout(30_000)
        page.goto(f"{url}/?annotator=ada")
        door_versions = {v.id for v in store.list_policy_versions(PROJECT)}
        first = _answer(page, "ArrowLeft", door_versions)
        wait_for(lambda: len(store.comparisons_frame(PROJECT)) == 1, 15, what="the first answer in the store")
        assert f"project={PROJECT}" in _href(page) and "annotator=ada" in _href(page)

        done = wait_for(lambda: (j := store.jobs.get(job.id)).done and j, 90, what="the maze bootstrap")
        assert done.status == "succeeded", done.error

        # The picker: the maze project's pair, and its answer lands in the maze project.
        _pick(page, f"{MAZE} · d4rl/maze2d-umaze")
        wait_for(lambda: f"project={MAZE}" in _href(page), 30, what="?project=maze in the URL")
        assert "annotator=ada" in _href(page)
        maze_versions = {v.id for v in store.list_policy_versions(MAZE)}
        assert maze_versions and not maze_versions & door_versions
        second = _answer(page, "ArrowRight", maze_versions)
        wait_for(lambda: len(store.comparisons_frame(MAZE)) == 1, 15, what="the maze answer in the store")
        page.screenshot(path=ARTIFACTS / "projects-maze-label.png")

        # Another page keeps the project.
        page.get_by_role("link", name="Data").click()
        expect(page.get_by_text("1 of 1 comparisons")).to_be_visible()
        assert f"project={MAZE}" in _href(page)

        # A link opens the other project again.
        page.goto(f"{url}/?project={PROJECT}&annotator=ada")
        third = _answer(page, "ArrowDown", door_versions)
        browser.close()

    def answers(project: str) -> list:
        return store.comparisons_frame(project)[["pair_id", "annotator", "outcome"]].values.tolist()

    wait_for(lambda: len(answers(PROJECT)) == 2 and len(answers(MAZE)) == 1, 10, what="the answers in the store")
    assert answers(PROJECT) == [[first, "ada", "left"], [third, "ada", "equal"]]
    assert answers(MAZE) == [[second, "ada", "right"]]
    assert store.get_project(MAZE).id != door.id
    store.close()
