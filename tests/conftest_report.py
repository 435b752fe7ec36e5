"""Fixtures of the report tests (tests/test_report.py, tests/test_report_browser.py).

Loaded as a plugin (``pytest_plugins = ["conftest_report"]`` in both modules), so its
session fixtures are built once per test session for both, not once per module as a
fixture imported by name would be.

The project is real and tiny: the bootstrap of ``tests/conftest_app.py`` (4 episodes of
60 steps, a 64-wide one-block policy, 30 BC steps, 2 evaluation episodes, 4 pairs of
12-step clips at 64×64), four answers by two annotators (left, right, equal, skip) and a
real 3-step alignment round, so it holds two versions, the second with its paired
comparison with the first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest_app import PROJECT, studio_env
from fkpd.store import Store, run_worker
from fkpd.studio import StudioConfig, enqueue_compare, enqueue_round, open_project

ANSWERS = (("ada", "left"), ("bob", "right"), ("ada", "equal"), ("bob", "skip"))
#: Before/after episodes and frame size of the tests' videos.
EPISODES, SIZE = 2, 64


def store_args(root: Path) -> list[str]:
    """``--database-url`` / ``--artifact-dir`` of the project under ``root``."""
    return ["--database-url", f"sqlite:///{root / 'fkpd.sqlite'}", "--artifact-dir", str(root / "artifacts")]


def open_store(root: Path) -> Store:
    return Store(f"sqlite:///{root / 'fkpd.sqlite'}", root / "artifacts")


def _run_one(store: Store, job) -> None:
    assert run_worker(store, once=True, handler_modules=["fkpd.studio"], heartbeat_s=0.5, stale_after_s=None) == 1
    done = store.jobs.get(job.id)
    assert done.status == "succeeded", done.error


@pytest.fixture(scope="session")
def report_project(tmp_path_factory) -> Path:
    """A directory with ``fkpd.sqlite`` and ``artifacts/`` of a project with two versions
    (BC and round 1) and four comparisons by ada and bob. Read-only for the tests."""
    root = tmp_path_factory.mktemp("report")
    cfg = StudioConfig.from_env(studio_env(root))
    with cfg.open_store() as store:
        project, job = open_project(store, cfg)
        _run_one(store, job)
        for name, outcome in ANSWERS:
            who = store.get_or_create_annotator(name)
            store.answer(store.next_pair(project.id, who).id, who, outcome)
        _run_one(store, enqueue_round(store, project, {"steps": 3}))
        assert [v.round for v in store.list_policy_versions(project.id)] == [0, 1]
    return root


@pytest.fixture(scope="session")
def compared_project(report_project, tmp_path_factory) -> tuple[Path, int]:
    """A copy of ``report_project`` with a finished compare job of its two versions
    (EPISODES episodes at SIZE pixels, as the Compare page queues it); returns
    ``(root, compare job id)``."""
    root = tmp_path_factory.mktemp("compared") / "studio"
    shutil.copytree(report_project, root)
    with open_store(root) as store:
        project = store.get_project(PROJECT)
        v1, v2 = store.list_policy_versions(project.id)
        job = enqueue_compare(store, project, v1.id, v2.id, episodes=EPISODES, render_size=SIZE)
        _run_one(store, job)
    return root, job.id
