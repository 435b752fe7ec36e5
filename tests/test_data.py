import json

import h5py
import numpy as np
import pytest
import torch

from fkpd.data import (REQUIRED_KEYS, DataRecipe, Normalizer, WindowSampler, dataset_info, generate_dataset,
                       load_dataset)
from fkpd.errors import DatasetError

TASK = "metaworld/door-open-v3"


def test_hdf5_round_trip(tiny_dataset):
    ds = load_dataset(tiny_dataset, TASK)
    with h5py.File(tiny_dataset) as f:
        for k in REQUIRED_KEYS:
            assert k in f
        np.testing.assert_array_equal(ds.observations, f["observations"][()])
        np.testing.assert_array_equal(ds.actions, f["actions"][()])
        assert f.attrs["task_id"] == TASK
        assert json.loads(f.attrs["recipe"])["expert_frac"] == DataRecipe().expert_frac
    assert ds.num_episodes == 6 and len(ds.actions) == 6 * 60
    assert ds.observations.shape == (360, 39) and ds.actions.shape == (360, 4)
    # one reset seed per episode, success flags present, next_observations consistent
    seeds = [np.unique(ds.infos["reset_seed"][s]) for s in ds.episodes()]
    assert all(len(s) == 1 for s in seeds) and len({int(s[0]) for s in seeds}) == 6
    assert ds.infos["success"].dtype == bool
    with h5py.File(tiny_dataset) as f:
        nxt = f["next_observations"][()]
    first = next(ds.episodes())
    np.testing.assert_allclose(nxt[first][:-1], ds.observations[first][1:])
    info = dataset_info(ds)
    assert info["episodes"] == 6 and info["steps"] == 360
    assert sum(b["episodes"] for b in info["behaviours"].values()) == 6


def test_generated_episode_replays_from_its_seed(tiny_dataset):
    """The stored reset seed reproduces the stored initial observation."""
    from fkpd.envs import make_env

    ds = load_dataset(tiny_dataset, TASK)
    env = make_env(TASK)
    for s in list(ds.episodes())[:2]:
        obs, _ = env.reset(seed=int(ds.infos["reset_seed"][s.start]))
        np.testing.assert_allclose(obs, ds.observations[s.start], atol=1e-5)


def test_clean_recipe_is_unperturbed(tmp_path):
    path = generate_dataset(TASK, 2, tmp_path / "clean.hdf5", recipe=DataRecipe.clean(), max_episode_steps=120,
                            progress=False)
    ds = load_dataset(path, TASK)
    assert ds.episode_success().all()
    from fkpd.envs import scripted_policy

    oracle = scripted_policy(TASK)
    s = next(ds.episodes())
    expected = np.clip(np.stack([oracle(o.astype(np.float64)) for o in ds.observations[s][:20]]), -1, 1)
    np.testing.assert_allclose(ds.actions[s][:20], expected, atol=1e-5)


def _write(path, **overrides):
    n = 10
    arrays = dict(observations=np.zeros((n, 39), np.float32), actions=np.zeros((n, 4), np.float32),
                  rewards=np.zeros(n, np.float32), terminals=np.zeros(n, bool),
                  timeouts=np.r_[np.zeros(n - 1, bool), [True]])
    arrays.update(overrides)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if v is not None:
                f.create_dataset(k, data=v)
    return path


def test_generation_reports_episodes_and_stops_without_writing(tmp_path):
    seen = []
    out = generate_dataset(TASK, 2, tmp_path / "d.hdf5", max_episode_steps=10, progress=False,
                           on_episode=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 2), (2, 2)] and load_dataset(out).num_episodes == 2

    def stop(i, n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(TASK, 3, tmp_path / "stopped.hdf5", max_episode_steps=10, progress=False, on_episode=stop)
    assert list(tmp_path.iterdir()) == [out], "a stopped generation writes nothing"


def test_missing_file_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist.*fkpd data generate"):
        load_dataset(tmp_path / "nope.hdf5", TASK)


def test_missing_key_error(tmp_path):
    with pytest.raises(DatasetError, match=r"missing key\(s\) \['timeouts'\]"):
        load_dataset(_write(tmp_path / "a.hdf5", timeouts=None), TASK)


def test_wrong_observation_dimension_error(tmp_path):
    with pytest.raises(DatasetError, match="observation dimension is 17 but task .* Do=39"):
        load_dataset(_write(tmp_path / "a.hdf5", observations=np.zeros((10, 17), np.float32)), TASK)


def test_wrong_action_dimension_error(tmp_path):
    with pytest.raises(DatasetError, match="action dimension is 6 but task .* Da=4"):
        load_dataset(_write(tmp_path / "a.hdf5", actions=np.zeros((10, 6), np.float32)), TASK)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_actions_error(tmp_path, bad):
    act = np.zeros((10, 4), np.float32)
    act[3, 1] = bad
    with pytest.raises(DatasetError, match="`actions` holds 1 NaN/inf value.*row 3"):
        load_dataset(_write(tmp_path / "a.hdf5", actions=act), TASK)


def test_mismatched_lengths_error(tmp_path):
    with pytest.raises(DatasetError, match="`rewards` has 7 rows but `observations` has 10"):
        load_dataset(_write(tmp_path / "a.hdf5", rewards=np.zeros(7, np.float32)), TASK)


def test_truncated_file_error(tmp_path, tiny_dataset):
    blob = open(tiny_dataset, "rb").read()
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset(cut, TASK)


def test_normaliser_round_trip():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5)).astype(np.float32) * [1, 10, 0.1, 3, 0]
    norm = Normalizer.fit(x)
    y = norm.normalize(x)
    assert y[:, :4].min() >= -1 - 1e-5 and y[:, :4].max() <= 1 + 1e-5
    np.testing.assert_allclose(y[:, :4].min(0), -1, atol=1e-5)
    np.testing.assert_allclose(norm.unnormalize(y), x, atol=1e-5)  # constant column included
    t = torch.from_numpy(x)
    np.testing.assert_allclose(norm.unnormalize(norm.normalize(t)).numpy(), x, atol=1e-5)
    again = Normalizer.from_state_dict(json.loads(json.dumps(norm.state_dict())))
    np.testing.assert_allclose(again.normalize(x), y)


def test_windows_pad_at_episode_edges(tiny_dataset):
    ds = load_dataset(tiny_dataset, TASK)
    ws = WindowSampler(ds, n_obs_steps=2, horizon=4)
    assert len(ws) == len(ds.actions)
    obs, act = ws.get(torch.tensor([0, 59, 60]))
    assert obs.shape == (3, 2, 39) and act.shape == (3, 4, 4)
    o = torch.from_numpy(ws.obs_normalizer.normalize(ds.observations))
    a = torch.from_numpy(ws.action_normalizer.normalize(ds.actions))
    torch.testing.assert_close(obs[0, 0], o[0])  # history padded with the first obs
    torch.testing.assert_close(obs[0, 1], o[0])
    torch.testing.assert_close(act[1, 0], a[59])  # last step of episode 0
    torch.testing.assert_close(act[1, 3], a[59])  # padded with the last action, not episode 1's
    torch.testing.assert_close(obs[2, 0], o[60])  # episode 1 does not see episode 0
    torch.testing.assert_close(act[2], a[60:64])
