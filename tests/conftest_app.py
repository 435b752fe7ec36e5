"""Fixtures of the app tests: a small project bootstrapped once, copied per test.

The bootstrap is real (data generation, behaviour cloning, evaluation, MuJoCo rendering,
H.264 encoding) but tiny: 4 episodes of 60 steps, a 64-wide one-block policy trained for
30 steps, a first batch of PAIRS pairs of 12-step clips at 64×64.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fkpd.store import Store, run_worker
from fkpd.studio import StudioConfig, open_project

TASK = "metaworld/door-open-v3"
PROJECT = "door-open"
PAIRS = 4
ADMIN_PASSWORD = "test-admin-secret"
TINY_BOOTSTRAP = {
    "dataset_episodes": 4, "max_episode_steps": 60, "bc_steps": 30,
    "bc": {"batch_size": 32, "warmup_steps": 5, "save_every": 10},
    "policy": {"hidden_dim": 64, "n_blocks": 1},
    "pairs_per_batch": PAIRS, "segment_length": 12, "render_size": 64, "n_envs": 4, "eval_episodes": 2,
    "threads": 1,
}  # fmt: skip


def studio_env(root: Path, **extra: str) -> dict[str, str]:
    """The FKPD_* environment of an app serving the project under ``root``; the project
    is created in ``open`` identity mode (annotators type their name), which these tests
    exercise; tests/test_app_invite_browser.py switches it to ``invite``."""
    return {"FKPD_DATABASE_URL": f"sqlite:///{root / 'fkpd.sqlite'}", "FKPD_ARTIFACT_DIR": str(root / "artifacts"),
            "FKPD_TASK": TASK, "FKPD_PROJECT": PROJECT, "FKPD_BOOTSTRAP": json.dumps(TINY_BOOTSTRAP),
            "FKPD_ADMIN_PASSWORD": ADMIN_PASSWORD, "FKPD_START_WORKER": "0", "FKPD_IDENTITY": "open", **extra}


@pytest.fixture(scope="session")
def bootstrapped_project(tmp_path_factory) -> Path:
    """A directory holding ``fkpd.sqlite`` and ``artifacts/`` of a bootstrapped project."""
    root = tmp_path_factory.mktemp("studio")
    cfg = StudioConfig.from_env(studio_env(root))
    with cfg.open_store() as store:
        project, job = open_project(store, cfg)
        assert job is not None and job.kind == "bootstrap"
        assert run_worker(store, once=True, handler_modules=["fkpd.studio"], heartbeat_s=0.5,
                          stale_after_s=None) == 1
        done = store.jobs.get(job.id)
        assert done.status == "succeeded", done.error
        assert store.batch_progress(project.id) == (0, PAIRS)
    return root


@pytest.fixture
def project_dir(bootstrapped_project: Path, tmp_path: Path) -> Path:
    """A private copy of the bootstrapped project (tests may answer, retire, delete)."""
    dest = tmp_path / "studio"
    shutil.copytree(bootstrapped_project, dest)
    return dest


@pytest.fixture
def project_store(project_dir: Path):
    with Store(f"sqlite:///{project_dir / 'fkpd.sqlite'}", project_dir / "artifacts") as store:
        yield store
