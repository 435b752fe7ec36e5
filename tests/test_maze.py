"""Maze2d on Gymnasium-Robotics' PointMaze: D4RL's maps, goals and physics, the env's
guarantees, the waypoint planner and the offline data generator."""

import ast
import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest

from fkpd.data import dataset_info, generate_dataset, load_dataset
from fkpd.envs import get_task, make_env, scripted_policy
from fkpd.data.d4rl import from_d4rl_frame
from fkpd.envs.maze import MAZES, MazeEnv, bfs_distances, cell_center, free_cells, maze_map
from fkpd.prefs.segments import load_preferences

UMAZE = "d4rl/maze2d-umaze"


@pytest.fixture(scope="module")
def d4rl_maze_model():
    """D4RL's own maze2d definitions (``d4rl/pointmaze/maze_model.py``): its map strings,
    ``parse_maze`` and the MJCF builder ``point_maze``, taken from the installed package's
    source (that module itself imports mujoco-py, which is not installed)."""
    from fkpd.envs.d4rl import _d4rl

    root = Path(_d4rl().__file__).parent / "pointmaze"
    spec = importlib.util.spec_from_file_location("d4rl_dynamic_mjc", root / "dynamic_mjc.py")
    mjc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mjc)
    tree = ast.parse((root / "maze_model.py").read_text())
    keep = [n for n in tree.body if (isinstance(n, ast.FunctionDef) and n.name in ("parse_maze", "point_maze"))
            or (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in n.targets))]
    ns = {"np": np, "MJCModel": mjc.MJCModel}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "d4rl_maze_model", "exec"), ns)
    return ns


D4RL_MAPS = {"umaze": "U_MAZE", "medium": "MEDIUM_MAZE", "large": "LARGE_MAZE"}


@pytest.mark.parametrize("size", ["umaze", "medium", "large"])
def test_maps_and_goal_cells_are_d4rls(size, d4rl_maze_model):
    ns = d4rl_maze_model
    arr = ns["parse_maze"](ns[D4RL_MAPS[size]])
    np.testing.assert_array_equal(np.asarray(maze_map(size)) == 1, arr == ns["WALL"])
    assert tuple(int(i) for i in np.argwhere(arr == ns["GOAL"])[0]) == MAZES[size].goal_cell


@pytest.mark.parametrize("size", ["umaze", "large"])
def test_d4rl_frame_conversion_preserves_physics(size, d4rl_maze_model):
    """Random forces from random states in D4RL's own model and in PointMaze give the same
    trajectory after :func:`from_d4rl_frame` (walls, the 0.2 offset and the axes included)."""
    import mujoco

    ns = d4rl_maze_model
    with ns["point_maze"](ns[D4RL_MAPS[size]]).asfile() as f:
        model = mujoco.MjModel.from_xml_path(f.name)
    data = mujoco.MjData(model)
    env = MazeEnv(size)
    rng = np.random.default_rng(0)
    free = free_cells(maze_map(size))
    worst = 0.0
    for _ in range(3):
        data.qpos[:] = np.array(free[rng.integers(len(free))], float) + rng.uniform(-0.1, 0.1, 2)
        data.qvel[:] = rng.normal(0, 0.1, 2)
        mujoco.mj_forward(model, data)
        start = from_d4rl_frame(size, observations=np.r_[data.qpos, data.qvel][None])["observations"][0]
        env.reset(seed=0)
        env._env.point_env.set_state(start[:2], start[2:])
        for _ in range(150):
            a = rng.uniform(-1, 1, 2)
            data.qvel[:] = np.clip(data.qvel, -5, 5)  # D4RL's MazeEnv.step: clip velocity, then simulate
            mujoco.mj_forward(model, data)
            data.ctrl[:] = a
            mujoco.mj_step(model, data)
            obs, *_ = env.step(from_d4rl_frame(size, actions=a[None])["actions"][0])
            ours = from_d4rl_frame(size, observations=np.r_[data.qpos, data.qvel][None])["observations"][0]
            worst = max(worst, float(np.abs(ours - obs).max()))
    env.close()
    assert worst < 1e-8


def test_env_guarantees_and_top_down_render():
    spec = get_task(UMAZE)
    assert (spec.obs_dim, spec.action_dim, spec.max_episode_steps) == (4, 2, 300)
    env = make_env(UMAZE, max_episode_steps=4, render_size=(64, 80))
    a, info = env.reset(seed=5)
    env.step(env.action_space.sample())
    b, _ = env.reset(seed=5)
    c, _ = env.reset(seed=6)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4,) and np.abs(a - c).max() > 1e-3 and isinstance(info["success"], bool)
    for _ in range(4):
        obs, r, term, trunc, info = env.step([0.0, 0.0])
        assert isinstance(info["success"], bool) and r == float(info["success"]) and not term
    assert trunc
    # The ball starting on the goal: success and reward 1 at once, as D4RL's sparse reward.
    env.reset(seed=0, options={"reset_cell": MAZES["umaze"].goal_cell})
    _, r, _, _, info = env.step([0.0, 0.0])
    assert r == 1.0 and info["success"]
    frame = env.render()
    assert frame.shape == (64, 80, 3) and frame.dtype == np.uint8
    # Upright: the goal (top-left cell of the U) shows red in the top-left of the frame.
    red = (frame[..., 0].astype(int) - frame[..., 1:].max(-1)) > 60
    ys, xs = np.nonzero(red)
    assert len(ys) > 10 and ys.mean() < 32 and xs.mean() < 40
    env.close()


@pytest.mark.parametrize("size", ["umaze", "medium"])
def test_waypoint_planner_reaches_the_goal_from_every_cell(size):
    task = f"d4rl/maze2d-{size}"
    env, oracle = make_env(task), scripted_policy(task)
    grid = maze_map(size)
    dist = bfs_distances(grid, MAZES[size].goal_cell)
    assert np.isfinite(dist[np.asarray(grid) == 0]).all() and np.isinf(dist[np.asarray(grid) == 1]).all()
    for cell in free_cells(grid):
        obs, _ = env.reset(seed=1, options={"reset_cell": cell})
        steps = 0
        while not np.linalg.norm(obs[:2] - env.goal) < 0.5:
            obs, *_ = env.step(oracle(obs))
            steps += 1
            assert steps <= 30 * (dist[cell] + 2), f"no progress from {cell}"
    np.testing.assert_allclose(env.goal, cell_center(grid, MAZES[size].goal_cell))
    env.close()


def test_generator_writes_the_d4rl_layout(tmp_path):
    path = generate_dataset(UMAZE, 10, tmp_path / "maze.hdf5", seed=3, progress=False)
    with h5py.File(path) as f:
        for k in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations",
                  "infos/success", "infos/reset_seed", "infos/behaviour"):
            assert k in f
        assert f.attrs["task_id"] == UMAZE
    ds = load_dataset(path, UMAZE)
    assert ds.observations.shape == (3000, 4) and ds.actions.shape == (3000, 2) and ds.num_episodes == 10
    assert "frame" not in ds.attrs  # written here: already in PointMaze's frame
    info = dataset_info(ds)
    beh = info["behaviours"]
    assert beh["expert"]["success_rate"] == 1.0 and beh["expert"]["return_mean"] > 150
    if "miscalibrated" in beh:
        assert beh["miscalibrated"]["return_mean"] < beh["expert"]["return_mean"] / 2
    np.testing.assert_array_equal(ds.rewards > 0, ds.infos["success"])
    env = make_env(UMAZE)
    for s in list(ds.episodes())[:3]:  # the stored reset seed replays the initial state
        obs, _ = env.reset(seed=int(ds.infos["reset_seed"][s.start]))
        np.testing.assert_allclose(obs, ds.observations[s.start], atol=1e-6)
    env.close()


def test_original_d4rl_maze_file_is_converted(tmp_path):
    """A maze2d file without FKPD's task_id attribute is read as D4RL's frame."""
    goal = np.array(MAZES["umaze"].goal_cell, float)  # D4RL's target, in its qpos frame
    n = 4
    obs = np.tile(np.r_[goal - 0.2, 1.0, 0.0], (n, 1)).astype(np.float32)  # ball at the goal cell's centre
    with h5py.File(tmp_path / "maze2d-umaze-sparse-v1.hdf5", "w") as f:
        f["observations"] = obs
        f["actions"] = np.tile([1.0, 0.0], (n, 1)).astype(np.float32)
        f["rewards"] = np.ones(n, np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = np.r_[np.zeros(n - 1, bool), True]
        f["infos/goal"] = np.tile(goal, (n, 1))
    ds = load_dataset(tmp_path / "maze2d-umaze-sparse-v1.hdf5", UMAZE)
    centre = cell_center(maze_map("umaze"), MAZES["umaze"].goal_cell)
    np.testing.assert_allclose(ds.observations[0], np.r_[centre, 0.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(ds.actions[0], [0.0, -1.0])  # D4RL's +x (down the rows) is PointMaze's -y
    np.testing.assert_allclose(ds.infos["goal"][0], centre + [0.2, -0.2], atol=1e-6)
    assert "converted from D4RL" in ds.attrs["frame"]
    raw = load_dataset(tmp_path / "maze2d-umaze-sparse-v1.hdf5")  # no task: as stored
    np.testing.assert_array_equal(raw.observations, obs)


def test_maze_segments_default_to_whole_episodes():
    """Sparse reward: maze2d clips are whole episodes unless set; other tasks keep L = 64."""
    from fkpd.errors import ConfigError
    from fkpd.train.loop import LoopConfig
    from fkpd.studio.errors import RoundError
    from fkpd.studio.params import BatchSettings

    for size, m in MAZES.items():
        assert get_task(f"d4rl/maze2d-{size}").segment_length == m.horizon
    assert get_task("metaworld/door-open-v3").segment_length == 64
    assert get_task("d4rl/hopper-medium-v2").segment_length == 64
    assert BatchSettings().length(UMAZE) == 300
    assert BatchSettings(max_episode_steps=120).length(UMAZE) == 120, "capped at the horizon"
    assert BatchSettings(segment_length=32).length(UMAZE) == 32
    assert BatchSettings().length("metaworld/door-open-v3") == 64
    with pytest.raises(RoundError, match="segment_length"):
        BatchSettings(segment_length=-1)
    with pytest.raises(ConfigError, match="--segment-length must be >= 0"):
        LoopConfig(segment_length=-1)


@pytest.mark.slow
def test_loop_runs_end_to_end_offline(tmp_path, capsys):
    """`fkpd loop --task d4rl/maze2d-umaze --teacher return` at toy sizes: generated data,
    BC, a round of pairs labelled by the return teacher, alignment, evaluation with the
    D4RL normalised score; then `fkpd eval` of the aligned checkpoint."""
    import json

    from fkpd.cli import main
    from fkpd.envs.d4rl import normalized_score

    out = tmp_path / "loop"
    args = ["loop", "--task", UMAZE, "--teacher", "return", "--rounds", "1", "--pairs-per-round", "4",
            "--max-episode-steps", "120", "--eval-episodes", "2", "--n-envs", "4",
            "--bc-episodes", "8", "--bc-steps", "30", "--steps", "4", "--batch-pairs", "2", "--bc-batch-size", "16",
            "--hidden-dim", "32", "--n-blocks", "1", "--device", "cpu", "--threads", "1", "--out-dir", str(out)]
    assert main(args) == 0
    assert "D4RL score" in capsys.readouterr().out
    summary = json.loads((out / "loop.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["labels"] == 4
    assert sum(rounds[1]["outcomes"].values()) == 4
    # maze2d labels whole episodes by default (sparse reward), here the 120-step horizon
    assert summary["loop"]["segment_length"] == 120
    _, labelled = load_preferences(out / "prefs.json")
    assert {len(seg) for left, right, _ in labelled for seg in (left, right)} == {120}
    for r in rounds:
        assert r["d4rl_dataset"] == "maze2d-umaze-v1"
        # the score is affine in the return, so the mean score is the score of the mean return
        assert r["d4rl_normalized_score"] == pytest.approx(normalized_score("maze2d-umaze-v1", r["mean_return"]))
        assert 0.0 <= r["success_rate"] <= 1.0 and r["ood_action_dist"] >= 0
    assert summary["dataset"] == str(out / "data.hdf5")
    assert load_dataset(out / "data.hdf5", UMAZE).attrs["task_id"] == UMAZE
    ckpt = rounds[1]["checkpoint"]
    assert main(["eval", ckpt, "--episodes", "2", "--workers", "1", "--json", str(tmp_path / "eval.json")]) == 0
    text = capsys.readouterr().out
    assert "D4RL normalised score" in text and "(maze2d-umaze-v1)" in text
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["task_id"] == UMAZE and ev["episodes"] == 2
    assert ev["d4rl_normalized_score"] == pytest.approx(normalized_score("maze2d-umaze-v1", ev["mean_return"]))
