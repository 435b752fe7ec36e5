"""D4RL tasks: the D4RL HDF5 layout and its errors, dataset names and the cache directory,
normalised scores, and the Gymnasium v5 locomotion envs against the D4RL v2 layout."""

import os

import h5py
import numpy as np
import pytest

from fkpd.data import load_dataset
from fkpd.errors import ConfigError, DatasetError, UnknownTaskError

HOPPER = "d4rl/hopper-medium-v2"


def _hopper_episodes(n_eps=3, steps=25, seed=0):
    """Random-action Hopper-v5 episodes recorded the way D4RL's v2 files are: observation,
    action, reward, done flags, next observation, and the simulator state in infos."""
    from fkpd.envs.locomotion import LocomotionEnv

    env = LocomotionEnv("hopper", max_episode_steps=steps)
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations",
                            "qpos", "qvel")}
    for ep in range(n_eps):
        obs, _ = env.reset(seed=seed + ep)
        done = False
        while not done:
            qpos, qvel = env.state()
            act = rng.uniform(-1, 1, 3).astype(np.float32)
            nxt, r, term, trunc, _ = env.step(act)
            for k, v in (("observations", obs), ("actions", act), ("rewards", r), ("terminals", term),
                         ("timeouts", trunc and not term), ("next_observations", nxt), ("qpos", qpos),
                         ("qvel", qvel)):
                rows[k].append(v)
            obs, done = nxt, term or trunc
    env.close()
    return {k: np.asarray(v) for k, v in rows.items()}


def write_d4rl_file(path, rows=None, **overrides):
    """A file in the exact layout of a D4RL v2 locomotion file (``d4rl``'s get_dataset keys)."""
    rows = dict(rows if rows is not None else _hopper_episodes())
    arrays = {
        "observations": rows["observations"].astype(np.float32),
        "actions": rows["actions"].astype(np.float32),
        "rewards": rows["rewards"].astype(np.float32),
        "terminals": rows["terminals"].astype(bool),
        "timeouts": rows["timeouts"].astype(bool),
        "next_observations": rows["next_observations"].astype(np.float32),
        "infos/qpos": rows["qpos"].astype(np.float32),
        "infos/qvel": rows["qvel"].astype(np.float32),
        "infos/action_log_probs": np.zeros(len(rows["actions"]), np.float32),
        "metadata/policy/fc0/weight": np.zeros((4, 11), np.float32),
    }
    arrays.update(overrides)
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            if v is not None:
                f.create_dataset(k, data=v)
        f["metadata"].attrs["algorithm"] = "SAC"
    return path


@pytest.fixture(scope="module")
def hopper_rows():
    return _hopper_episodes()


# -- the layout and its errors --------------------------------------------------------------
def test_exact_d4rl_layout_loads(tmp_path, hopper_rows):
    path = write_d4rl_file(tmp_path / "hopper_medium-v2.hdf5", hopper_rows)
    ds = load_dataset(path, HOPPER)
    n = len(hopper_rows["actions"])
    assert ds.observations.shape == (n, 11) and ds.actions.shape == (n, 3) and ds.num_episodes == 3
    assert ds.infos["qpos"].shape == (n, 6) and "weight" not in ds.infos  # metadata/* is ignored
    np.testing.assert_array_equal(ds.rewards, hopper_rows["rewards"].astype(np.float32))
    # rewards and terminals as (N, 1), which d4rl's get_dataset also flattens
    flat = load_dataset(write_d4rl_file(tmp_path / "col.hdf5", hopper_rows,
                                        rewards=hopper_rows["rewards"][:, None].astype(np.float32),
                                        terminals=hopper_rows["terminals"][:, None]), HOPPER)
    np.testing.assert_array_equal(flat.rewards, ds.rewards)
    np.testing.assert_array_equal(flat.episode_ends, ds.episode_ends)


def test_missing_key_names_the_key(tmp_path, hopper_rows):
    with pytest.raises(DatasetError, match=r"missing key\(s\) \['terminals'\]"):
        load_dataset(write_d4rl_file(tmp_path / "a.hdf5", hopper_rows, terminals=None), HOPPER)


def test_mismatched_lengths_name_the_key(tmp_path, hopper_rows):
    n = len(hopper_rows["actions"])
    with pytest.raises(DatasetError, match=rf"key `timeouts` has {n - 5} rows but `observations` has {n}"):
        load_dataset(write_d4rl_file(tmp_path / "a.hdf5", hopper_rows,
                                     timeouts=hopper_rows["timeouts"][:-5]), HOPPER)
    with pytest.raises(DatasetError, match=r"key `next_observations` has shape \(\d+, 11\) but `observations` has"):
        load_dataset(write_d4rl_file(tmp_path / "b.hdf5", hopper_rows,
                                     next_observations=hopper_rows["next_observations"][1:]), HOPPER)
    with pytest.raises(DatasetError, match=r"key `rewards` must hold one value per step, shape \(N,\), got shape"):
        load_dataset(write_d4rl_file(tmp_path / "c.hdf5", hopper_rows,
                                     rewards=np.zeros((n, 3), np.float32)), HOPPER)


def test_wrong_observation_size_names_the_dimension(tmp_path, hopper_rows):
    n = len(hopper_rows["actions"])
    bad = write_d4rl_file(tmp_path / "a.hdf5", hopper_rows, observations=np.zeros((n, 17), np.float32),
                          next_observations=np.zeros((n, 17), np.float32))
    with pytest.raises(DatasetError, match=f"observation dimension is 17 but task {HOPPER} has Do=11"):
        load_dataset(bad, HOPPER)
    with pytest.raises(DatasetError, match="action dimension is 3 but task d4rl/walker2d-medium-v2 has Da=6"):
        load_dataset(bad, "d4rl/walker2d-medium-v2")


def test_truncated_file_says_so_with_byte_counts(tmp_path, hopper_rows):
    blob = write_d4rl_file(tmp_path / "full.hdf5", hopper_rows).read_bytes()
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(DatasetError, match=rf"is truncated: the file has {len(blob) * 2 // 3} bytes but its HDF5 "
                                           rf"header says {len(blob)}"):
        load_dataset(cut, HOPPER)


def test_nan_in_next_observations_names_key_and_row(tmp_path, hopper_rows):
    nxt = hopper_rows["next_observations"].astype(np.float32).copy()
    nxt[4, 2] = np.nan
    with pytest.raises(DatasetError, match="key `next_observations` holds 1 NaN/inf value.*row 4"):
        load_dataset(write_d4rl_file(tmp_path / "a.hdf5", hopper_rows, next_observations=nxt), HOPPER)


# -- dataset names and D4RL's cache directory ------------------------------------------------
def test_dataset_name_resolves_in_d4rl_cache_dir(tmp_path, monkeypatch, hopper_rows):
    from fkpd.data.d4rl import dataset_file, resolve_dataset
    from fkpd.envs.d4rl import _d4rl

    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    url = _d4rl().infos.DATASET_URLS["hopper-medium-v2"]
    assert dataset_file("hopper-medium-v2") == tmp_path / os.path.basename(url)
    with pytest.raises(DatasetError, match=rf"not in D4RL's cache directory: expected '{tmp_path}.*never downloads"):
        load_dataset("hopper-medium-v2", HOPPER)
    write_d4rl_file(dataset_file("hopper-medium-v2"), hopper_rows)
    ds = load_dataset("hopper-medium-v2", HOPPER)
    assert ds.path == dataset_file("hopper-medium-v2") and ds.num_episodes == 3
    assert resolve_dataset(HOPPER) == ds.path  # a locomotion task id names its dataset
    assert resolve_dataset("not-a-dataset") is None
    with pytest.raises(DatasetError, match="does not exist.*fkpd data generate"):
        load_dataset(tmp_path / "nope.hdf5", HOPPER)


def test_registry_takes_names_from_d4rl():
    from fkpd.envs.d4rl import _d4rl
    from fkpd.envs import get_task, list_tasks

    d4rl_tasks = list_tasks("d4rl")
    assert d4rl_tasks[:3] == ["d4rl/maze2d-umaze", "d4rl/maze2d-medium", "d4rl/maze2d-large"]
    urls = _d4rl().infos.DATASET_URLS
    loco = [t for t in d4rl_tasks if not t.startswith("d4rl/maze2d-")]
    assert len(loco) == 18 and all(t[len("d4rl/"):] in urls and t.endswith("-v2") for t in loco)
    assert {t.split("/")[1].split("-")[0] for t in loco} == {"hopper", "walker2d", "halfcheetah"}
    assert list_tasks() == list_tasks("metaworld") + d4rl_tasks
    spec = get_task("d4rl/halfcheetah-medium-replay-v2")
    assert (spec.obs_dim, spec.action_dim, spec.max_episode_steps, spec.d4rl_name) == (
        17, 6, 1000, "halfcheetah-medium-replay-v2")
    assert get_task("d4rl/maze2d-large").d4rl_name == "maze2d-large-v1"
    with pytest.raises(UnknownTaskError, match="'d4rl/hopper-medium-v0'.*d4rl/hopper-medium-v2"):
        get_task("d4rl/hopper-medium-v0")


def test_locomotion_has_no_generator():
    from fkpd.data import generate_dataset
    from fkpd.envs import scripted_policy

    with pytest.raises(DatasetError, match="no data generator.*--dataset hopper-medium-v2.*minari"):
        generate_dataset(HOPPER, 2, "unused.hdf5")
    with pytest.raises(ConfigError, match="no scripted policy"):
        scripted_policy(HOPPER)


# -- normalised scores -----------------------------------------------------------------------
def test_normalized_score_is_d4rls():
    from fkpd.envs import get_task
    from fkpd.envs.d4rl import _d4rl, normalized_score

    d4rl = _d4rl()
    for name, ret in (("hopper-medium-v2", 1500.0), ("walker2d-expert-v2", 4000.0),
                      ("halfcheetah-random-v2", -100.0), ("maze2d-umaze-v1", 120.0)):
        assert normalized_score(name, ret) == pytest.approx(100 * d4rl.get_normalized_score(name, ret))
    rets = [1000.0, 2000.0, 3000.0]
    expected = [100 * d4rl.get_normalized_score("hopper-medium-v2", r) for r in rets]
    np.testing.assert_allclose(get_task(HOPPER).normalized_score(rets), expected)
    s = get_task(HOPPER).score_summary(rets)
    assert s["d4rl_dataset"] == "hopper-medium-v2"
    assert s["d4rl_normalized_score"] == pytest.approx(np.mean(expected))
    assert s["d4rl_normalized_score_std"] == pytest.approx(np.std(expected))
    assert get_task("metaworld/door-open-v3").score_summary(rets) == {}
    with pytest.raises(UnknownTaskError, match="no reference scores"):
        normalized_score("nope-v9", 1.0)


def test_eval_summary_reports_d4rl_score():
    from fkpd.envs.d4rl import normalized_score
    from fkpd.policy.rollout import EvalResult

    res = EvalResult(task_id="d4rl/maze2d-umaze", reset_seeds=[1, 2], returns=[100.0, 50.0],
                     successes=[True, False], lengths=[300, 300])
    summary = res.summary()
    assert summary["d4rl_dataset"] == "maze2d-umaze-v1" and "D4RL normalised score" in res.format()
    assert summary["d4rl_normalized_score"] == pytest.approx(np.mean(normalized_score("maze2d-umaze-v1", [100, 50])))
    mw = EvalResult(task_id="metaworld/door-open-v3", reset_seeds=[1], returns=[1.0], successes=[True], lengths=[5])
    assert "d4rl_normalized_score" not in mw.summary()


# -- Gymnasium v5 locomotion vs the D4RL v2 layout ----------------------------------------------
@pytest.mark.parametrize("env_name,nq,do,da,clipped", [("hopper", 6, 11, 3, True), ("walker2d", 9, 17, 6, True),
                                                     ("halfcheetah", 9, 17, 6, False)])
def test_v5_observations_have_the_d4rl_v2_layout(env_name, nq, do, da, clipped):
    """D4RL v2 data came from gym's v3 envs, whose ``_get_obs`` is qpos without the torso's
    x position, then qvel (clipped to ±10 for hopper and walker2d, not for halfcheetah)."""
    from fkpd.envs.locomotion import LOCOMOTION_ENVS, LocomotionEnv, observation_from_state
    from fkpd.envs import make_env

    assert LOCOMOTION_ENVS[env_name][1:] == (do, da)
    env = make_env(f"d4rl/{env_name}-medium-v2", max_episode_steps=5, render_size=(48, 64))
    assert isinstance(env, LocomotionEnv) and env.observation_space.shape == (do,) and env.action_space.shape == (da,)
    a, _ = env.reset(seed=3)
    b, _ = env.reset(seed=3)
    np.testing.assert_array_equal(a, b)  # seeded reset reproduces the initial state
    rng = np.random.default_rng(0)
    for _ in range(5):
        qpos, qvel = env.state()
        assert qpos.shape == (nq,) and qvel.shape == (nq,)
        vel = np.clip(qvel, -10, 10) if clipped else qvel
        np.testing.assert_allclose(a, np.concatenate([qpos[1:], vel]))
        np.testing.assert_allclose(a, observation_from_state(env_name, qpos, qvel))
        a, r, term, trunc, info = env.step(rng.uniform(-1, 1, da))
        assert info["success"] is False and isinstance(r, float)
    assert trunc
    # velocities beyond 10 show whether the layout clips them
    inner = env._env
    qpos, qvel = env.state()
    inner.set_state(qpos, np.full_like(qvel, 30.0))
    obs = inner._get_obs()
    assert np.allclose(obs[nq - 1:], 10.0 if clipped else 30.0)
    frame = env.render()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
    env.close()


def test_locomotion_bc_and_eval_from_the_d4rl_cache(tmp_path, monkeypatch, hopper_rows, capsys):
    """`fkpd train-bc --task d4rl/hopper-medium-v2` finds its dataset in D4RL's cache
    directory; `fkpd eval` reports the D4RL normalised score."""
    import json

    from fkpd.cli import main
    from fkpd.data.d4rl import dataset_file
    from fkpd.envs.d4rl import normalized_score
    from fkpd.policy import read_checkpoint_meta

    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    dataset_file("hopper-medium-v2").parent.mkdir()
    write_d4rl_file(dataset_file("hopper-medium-v2"), hopper_rows)
    out = tmp_path / "bc"
    assert main(["train-bc", "--task", HOPPER, "--out-dir", str(out), "--steps", "5", "--batch-size", "16",
                 "--eval-every", "0", "--hidden-dim", "32", "--n-blocks", "1", "--threads", "1"]) == 0
    ckpt = out / "checkpoint"
    assert read_checkpoint_meta(ckpt)["dataset"] == "hopper-medium-v2"
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--episodes", "1", "--workers", "1", "--json", str(tmp_path / "e.json")]) == 0
    assert "(hopper-medium-v2)" in capsys.readouterr().out
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["d4rl_normalized_score"] == pytest.approx(normalized_score("hopper-medium-v2", ev["mean_return"]))


# -- the task as a value -------------------------------------------------------------------------
def test_task_spec_carries_its_family_behaviour():
    """Family-specific behaviour is asked of the spec, not of the id's prefix."""
    from fkpd.envs import find_task, get_task

    door, maze, hopper = get_task("metaworld/door-open-v3"), get_task("d4rl/maze2d-umaze"), get_task(HOPPER)
    assert get_task(door) is door and find_task("nope/x") is None and find_task("d4rl/hopper-medium-v0") is None
    assert (door.family.name, maze.family.name, hopper.family.name) == ("metaworld", "maze2d", "locomotion")
    assert [s.is_maze for s in (door, maze, hopper)] == [False, True, False]
    assert [s.has_scripted_policy for s in (door, maze, hopper)] == [True, True, False]
    assert [s.has_success for s in (door, maze, hopper)] == [True, True, False]
    assert [s.own_dataset for s in (door, maze, hopper)] == ["", "", "hopper-medium-v2"]
    assert [s.default_camera for s in (door, maze, hopper)] == ["corner", None, None]
    assert door.intent_teachers == ("smooth", "high-gripper") and maze.intent_teachers == hopper.intent_teachers == (
        "smooth",)
    assert "robot arm" in door.instructions and "(door-open-v3)" in door.instructions
    assert "red goal disc" in maze.instructions and "one-legged hopper robot (hopper-medium-v2)" in hopper.instructions
    assert maze.score_summary([100.0])["d4rl_dataset"] == "maze2d-umaze-v1" and maze.score_summary([]) == {}
    with pytest.raises(UnknownTaskError, match="no reference scores"):
        door.normalized_score(1.0)
