import numpy as np
import pytest

from fkpd.envs import DEFAULT_TASK, get_task, list_tasks, make_env, scripted_policy
from fkpd.errors import UnknownTaskError


def test_registry_has_every_metaworld_v3_task():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    tasks = list_tasks("metaworld")  # list_tasks() also lists the d4rl/ tasks (tests/test_d4rl.py)
    assert len(tasks) == len(ALL_V3_ENVIRONMENTS) >= 50
    assert DEFAULT_TASK in tasks and "metaworld/button-press-v3" in tasks
    spec = get_task(DEFAULT_TASK)
    assert (spec.obs_dim, spec.action_dim) == (39, 4)


def test_unknown_task_lists_known_ids():
    with pytest.raises(UnknownTaskError) as err:
        get_task("metaworld/door-opn-v3")
    msg = str(err.value)
    assert "door-opn-v3" in msg and "metaworld/door-open-v3" in msg and "metaworld/button-press-v3" in msg


@pytest.mark.parametrize("task", [DEFAULT_TASK, "metaworld/button-press-v3"])
def test_seeded_reset_reproduces_initial_state(task):
    env = make_env(task, max_episode_steps=5)
    a, _ = env.reset(seed=7)
    env.step(env.action_space.sample())
    b, _ = env.reset(seed=7)
    c, _ = env.reset(seed=8)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3  # another seed moves the object or goal
    assert a.shape == (39,)


def test_step_info_success_and_truncation():
    env = make_env(DEFAULT_TASK, max_episode_steps=3)
    obs, _ = env.reset(seed=0)
    oracle = scripted_policy(DEFAULT_TASK)
    for i in range(3):
        obs, r, term, trunc, info = env.step(oracle(obs))
        assert isinstance(info["success"], bool)
        assert isinstance(r, float)
    assert trunc and not term


def test_scripted_policy_solves_default_task():
    env = make_env(DEFAULT_TASK, max_episode_steps=150)
    oracle = scripted_policy(DEFAULT_TASK)
    obs, _ = env.reset(seed=0)
    success = False
    for _ in range(150):
        obs, _, _, _, info = env.step(oracle(obs))
        success |= info["success"]
    assert success


def test_render_is_upright_and_sized():
    env = make_env(DEFAULT_TASK, render_size=(96, 128))
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (96, 128, 3) and frame.dtype == np.uint8

    def red_arm_row(f):  # mean image row of the red Sawyer arm's pixels
        mask = (f[..., 0] > 120) & (f[..., 1] < 70) & (f[..., 2] < 70)
        assert mask.sum() > 100
        return np.nonzero(mask)[0].mean()

    for _ in range(30):
        env.step(np.array([0, 0, -1, 0], np.float32))
    low = red_arm_row(env.render())
    for _ in range(60):
        env.step(np.array([0, 0, 1, 0], np.float32))
    high = red_arm_row(env.render())
    # Raising the hand moves the arm up the image (smaller row index) only when the
    # frame is upright; MuJoCo's raw offscreen image is upside down.
    assert high < low - 2, (high, low)
