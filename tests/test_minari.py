"""Minari datasets created locally with Minari's own DataCollector load into the D4RL layout."""

import json
import os

import numpy as np
import pytest

from fkpd.data import load_dataset
from fkpd.errors import DatasetError

UMAZE = "d4rl/maze2d-umaze"


@pytest.fixture()
def minari_root(tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root


def _collect(env, dataset_id, episodes, policy, steps):
    import minari

    col = minari.DataCollector(env, record_infos=True)
    for ep in range(episodes):
        obs, _ = col.reset(seed=ep)
        for _ in range(steps):
            obs, _, term, trunc, _ = col.step(policy(obs))
            if term or trunc:
                break
    col.create_dataset(dataset_id=dataset_id, algorithm_name="fkpd scripted planner", author="FKPD Studio tests",
                       author_email="tests@example.org", code_permalink="tests/test_minari.py",
                       description="a tiny test dataset")
    col.close()


def test_minari_dataset_from_the_data_collector_loads(minari_root, tmp_path, capsys):
    import warnings

    from fkpd.cli import main
    from fkpd.envs import make_env, scripted_policy

    env = make_env(UMAZE, max_episode_steps=40)
    oracle = scripted_policy(UMAZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _collect(env, "fkpd/maze2d-umaze-test-v0", 3, oracle, 40)
    ds = load_dataset("minari:fkpd/maze2d-umaze-test-v0", UMAZE)
    assert ds.observations.shape == (120, 4) and ds.actions.shape == (120, 2)
    assert ds.num_episodes == 3 and list(ds.episode_ends) == [40, 80, 120]
    assert ds.attrs["source"] == "minari" and ds.attrs["dataset_id"] == "fkpd/maze2d-umaze-test-v0"
    assert ds.infos["success"].dtype == bool and ds.infos["success"].shape == (120,)
    np.testing.assert_array_equal(ds.rewards > 0, ds.infos["success"])
    # the first observation of each episode is the collector's reset observation
    for ep, s in enumerate(ds.episodes()):
        np.testing.assert_allclose(ds.observations[s.start], env.reset(seed=ep)[0], atol=1e-6)
    # a D4RL-layout copy through the CLI reads back the same, and is not taken for a D4RL-frame file
    out = tmp_path / "minari.hdf5"
    assert main(["data", "import", "minari:fkpd/maze2d-umaze-test-v0", "--out", str(out), "--task", UMAZE]) == 0
    assert "wrote" in capsys.readouterr().out
    back = load_dataset(out, UMAZE)
    np.testing.assert_array_equal(back.observations, ds.observations)
    np.testing.assert_array_equal(back.episode_ends, ds.episode_ends)
    assert main(["data", "info", "minari:fkpd/maze2d-umaze-test-v0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 3
    with pytest.raises(DatasetError, match=r"observation dimension is 4 but task d4rl/hopper-medium-v2 has Do=11"):
        load_dataset("minari:fkpd/maze2d-umaze-test-v0", "d4rl/hopper-medium-v2")
    env.close()


def test_dict_observations_use_their_observation_entry(minari_root):
    """Gymnasium-Robotics' goal-conditioned PointMaze (dict observations, as Minari's
    D4RL/pointmaze datasets): ``observation`` is used, the desired goal kept as infos/goal."""
    import warnings

    import gymnasium as gym

    from fkpd.envs._mujoco import quiet
    from fkpd.envs.maze import MazeOracle

    with quiet():
        import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    env = gym.make("PointMaze_UMaze-v3", max_episode_steps=20, continuing_task=True, reset_target=False)
    os.unlink(env.unwrapped.tmp_xml_file_path)  # the maze MJCF Gymnasium-Robotics leaves in /tmp
    oracle = MazeOracle.for_maze("umaze")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _collect(env, "fkpd/pointmaze-dict-test-v0", 2, lambda o: oracle(o["observation"]), 20)
    ds = load_dataset("minari:fkpd/pointmaze-dict-test-v0", UMAZE)
    assert ds.observations.shape == (40, 4) and ds.infos["goal"].shape == (40, 2)
    assert ds.num_episodes == 2 and ds.attrs["env_id"] == "PointMaze_UMaze-v3"
    from fkpd.data.minari import load_minari

    with pytest.raises(DatasetError, match=r"keys \['achieved_goal', 'desired_goal', 'observation'\], without 'qpos'"):
        load_minari("fkpd/pointmaze-dict-test-v0", obs_key="qpos")
    env.close()


def test_missing_minari_dataset_lists_local_ones(minari_root):
    with pytest.raises(DatasetError, match=r"Minari dataset 'fkpd/absent-v0' cannot be read.*never downloads"):
        load_dataset("minari:fkpd/absent-v0")
