"""Shared fixtures. Heavy artefacts (a tiny generated dataset, a tiny trained policy)
are built once per session and reused by the tests that only read them."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import sys  # noqa: E402

import pytest  # noqa: E402

TASK = "metaworld/door-open-v3"


@pytest.fixture(autouse=True)
def _keep_main_module(monkeypatch):
    """Put ``sys.modules["__main__"]`` back after every test. Streamlit's AppTest installs
    the app script there; left in place, every later multiprocessing *spawn* child runs
    the app script instead of pytest's main, dies, and a pool respawns it forever (seen
    as a hang in test_store's concurrent-migration test after an AppTest that did not
    restore it)."""
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """6 episodes of 60 steps of the default perturbed recipe on door-open."""
    from fkpd.data import generate_dataset

    path = tmp_path_factory.mktemp("data") / "tiny.hdf5"
    return generate_dataset(TASK, 6, path, seed=1, max_episode_steps=60, progress=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dataset, tmp_path_factory):
    """A small policy trained for a few steps on the tiny dataset."""
    from fkpd.policy import PolicyConfig
    from fkpd.train.bc import BCConfig, train_bc

    out = tmp_path_factory.mktemp("bc")
    cfg = BCConfig(task=TASK, dataset=str(tiny_dataset), out_dir=str(out), steps=30, batch_size=32,
                   eval_every=0, save_every=30, log_every=10, warmup_steps=5)
    return train_bc(cfg, PolicyConfig(hidden_dim=64, n_blocks=1), progress=False)
