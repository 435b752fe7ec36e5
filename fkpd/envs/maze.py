"""Maze2d tasks: ``d4rl/maze2d-<size>``, D4RL's maze2d on Gymnasium-Robotics' PointMaze,
and a scripted planner.

D4RL's maze2d (Fu et al., 2020) is a force-actuated point mass (2-D position and
velocity) that must reach a fixed goal cell of a maze. Gymnasium-Robotics' PointMaze v3
is its port to the maintained MuJoCo bindings with the same ball (timestep 0.01 s, one
physics step per action, gear 100, joint damping 1, velocity clipped to ±5 m/s) and the
same U-maze, medium and large maps, but a *centred* frame: cell (row i, column j) has
its centre at ``x = j + 0.5 − W/2``, ``y = L/2 − i − 0.5`` (W columns, L rows, 1 m
cells; :func:`cell_center`), where D4RL used ``(x, y) = (i, j)``.

:class:`MazeEnv` follows D4RL's evaluation protocol for ``maze2d-<size>-v1`` in that
frame: the goal is fixed at the centre of D4RL's goal cell (its map's ``G``), every
reset puts the ball in a uniformly drawn free cell (the goal cell included, as D4RL's
``reset_model``) with uniform ±0.1 m position noise and N(0, 0.1²) velocity noise, and
the reward is D4RL's sparse one, 1 when the ball is within 0.5 m of the goal, else 0,
for D4RL's horizon (300, 600, 800 steps). Returns therefore normalise with D4RL's
reference scores (:func:`fkpd.envs.d4rl.normalized_score`). Observations are D4RL's
``(x, y, vx, vy)`` (Do = 4; the goal is fixed, so it is not observed) and actions the
2-D force in ``[-1, 1]`` (Da = 2).

Original D4RL maze2d files are in D4RL's frame, where ``qpos = (x, y)`` is in cell units
with ``x`` along rows and ``y`` along columns and, a quirk of D4RL's model (the ball's
body sits at (1.2, 1.2), the walls at (i + 1, j + 1)), the ball is physically 0.2 m past
``qpos`` along both. :func:`fkpd.data.d4rl.from_d4rl_frame` maps their states and actions to
the centred frame with the same physics (checked against D4RL's own model in
``tests/test_maze.py``), and :func:`fkpd.data.load_dataset` applies it to a maze2d file that FKPD Studio did not
write (no ``task_id`` attribute naming a maze2d task, not from Minari).

The scripted policy (:class:`MazeOracle`) is D4RL's data-collection controller in
spirit (``d4rl/pointmaze/waypoint_controller.py``): a planner over the maze grid gives
the next waypoint, a PD controller ``a = clip(kp (w − p) + kd v, −1, 1)`` with D4RL's
gains (kp = 10, kd = −1) drives the ball there. The planner here is a breadth-first
search from the goal cell (shortest 4-connected paths; D4RL ran Q-iteration on the
same grid), and the waypoint is the centre of the next cell on the path, re-planned
from the ball's cell at every step, so the controller is stateless. The dataset
generator (:func:`fkpd.data.generate_dataset`) adds the per-episode perturbations of
:class:`fkpd.data.DataRecipe`: Gaussian noise, random-action stretches, and a wrong
belief about the goal cell (:func:`wrong_goal`), which makes clips whose difference is
plain to see: one ball heads for the red goal, the other for a corner.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np

from fkpd.envs._mujoco import physics_state, plain_scene, quiet, refresh_kinematics, restore_physics_state
from fkpd.envs.spec import DEFAULT_RENDER_SIZE, TIE_SKIP, TaskFamily, TaskSpec

#: D4RL's sparse-reward and success radius around the goal, metres.
GOAL_RADIUS = 0.5
#: D4RL's reset noise: uniform position noise (± metres) and velocity noise std (m/s).
RESET_POS_NOISE = 0.1
RESET_VEL_NOISE = 0.1
#: Where D4RL's ball is relative to its ``qpos`` in cell units (body at 1.2, walls at +1.0).
D4RL_BALL_OFFSET = 0.2
#: D4RL's waypoint-controller gains (``WaypointController(p_gain=10.0, d_gain=-1.0)``).
P_GAIN = 10.0
D_GAIN = -1.0


@dataclass(frozen=True)
class MazeSpec:
    """One maze2d task.

    Attributes:
        size: ``umaze``, ``medium`` or ``large``.
        map_name: the map's name in ``gymnasium_robotics.envs.maze.maps`` (the same walls
            as D4RL's ``U_MAZE``, ``MEDIUM_MAZE``, ``LARGE_MAZE``).
        goal_cell: (row, column) of the ``G`` in D4RL's map string.
        horizon: D4RL's ``max_episode_steps`` of ``maze2d-<size>-v1``.
        d4rl_name: the D4RL dataset whose reference scores normalise returns.
    """

    size: str
    map_name: str
    goal_cell: tuple[int, int]
    horizon: int
    d4rl_name: str


MAZES: dict[str, MazeSpec] = {
    "umaze": MazeSpec("umaze", "U_MAZE", (1, 1), 300, "maze2d-umaze-v1"),
    "medium": MazeSpec("medium", "MEDIUM_MAZE", (6, 6), 600, "maze2d-medium-v1"),
    "large": MazeSpec("large", "LARGE_MAZE", (7, 9), 800, "maze2d-large-v1"),
}


def maze_map(size: str) -> list[list[int]]:
    """The wall map of a maze, rows of 1 (wall) and 0 (free), from Gymnasium-Robotics."""
    with quiet():
        from gymnasium_robotics.envs.maze import maps
    return [[int(c) if c in (0, 1) else 0 for c in row] for row in getattr(maps, MAZES[size].map_name)]


def cell_center(grid: Sequence[Sequence[int]], cell: Sequence[int]) -> np.ndarray:
    """Centre ``(x, y)`` in metres of cell ``(row, column)`` in PointMaze's centred frame
    (Gymnasium-Robotics' ``Maze.cell_rowcol_to_xy`` with 1 m cells)."""
    rows, cols = len(grid), len(grid[0])
    return np.array([cell[1] + 0.5 - cols / 2.0, rows / 2.0 - cell[0] - 0.5])


def cell_of(grid: Sequence[Sequence[int]], xy: Sequence[float]) -> tuple[int, int]:
    """The (row, column) of the cell containing point ``xy`` (clipped to the grid)."""
    rows, cols = len(grid), len(grid[0])
    i = math.floor(rows / 2.0 - float(xy[1]))
    j = math.floor(float(xy[0]) + cols / 2.0)
    return min(max(i, 0), rows - 1), min(max(j, 0), cols - 1)


def free_cells(grid: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Every free cell, in row-major order."""
    return [(i, j) for i, row in enumerate(grid) for j, c in enumerate(row) if c == 0]


def bfs_distances(grid: Sequence[Sequence[int]], goal: tuple[int, int]) -> np.ndarray:
    """Steps from every cell to ``goal`` along 4-connected free cells; ``inf`` for walls
    and unreachable cells. ``(rows, cols) float64``."""
    dist = np.full((len(grid), len(grid[0])), np.inf)
    dist[goal] = 0
    queue = deque([goal])
    while queue:
        i, j = queue.popleft()
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            a, b = i + di, j + dj
            if 0 <= a < len(grid) and 0 <= b < len(grid[0]) and grid[a][b] == 0 and dist[a, b] == np.inf:
                dist[a, b] = dist[i, j] + 1
                queue.append((a, b))
    return dist


class MazeOracle:
    """Waypoint planner + PD controller: ``obs (4,) -> action (2,) float32``.

    Args:
        grid: the maze's wall map (:func:`maze_map`).
        goal_cell: (row, column) to reach; the controller stops at its centre.
        p_gain, d_gain: PD gains (D4RL's 10 and −1).
    """

    def __init__(self, grid: Sequence[Sequence[int]], goal_cell: tuple[int, int], p_gain: float = P_GAIN,
                 d_gain: float = D_GAIN) -> None:
        self.grid = [list(r) for r in grid]
        self.goal_cell = (int(goal_cell[0]), int(goal_cell[1]))
        self.goal = cell_center(self.grid, self.goal_cell)
        self.dist = bfs_distances(self.grid, self.goal_cell)
        self.p_gain, self.d_gain = float(p_gain), float(d_gain)
        self._free = free_cells(self.grid)

    @classmethod
    def for_maze(cls, size: str, goal_cell: tuple[int, int] | None = None) -> "MazeOracle":
        """The oracle of maze ``size`` toward ``goal_cell`` (default: the task's goal)."""
        return cls(maze_map(size), goal_cell or MAZES[size].goal_cell)

    def waypoint(self, xy: np.ndarray) -> np.ndarray:
        """The point to steer to from ``xy``: the centre of the next cell on a shortest
        path, or the goal itself from the goal cell."""
        cell = cell_of(self.grid, xy)
        if not np.isfinite(self.dist[cell]):  # on a wall's edge: use the nearest free cell
            cell = min(self._free, key=lambda c: float(np.sum((cell_center(self.grid, c) - xy) ** 2)))
        if cell == self.goal_cell:
            return self.goal
        i, j = cell
        nbrs = [(i + di, j + dj) for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1))]
        nxt = min((c for c in nbrs if 0 <= c[0] < len(self.grid) and 0 <= c[1] < len(self.grid[0])),
                  key=lambda c: self.dist[c])
        return cell_center(self.grid, nxt)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        """The PD force toward :meth:`waypoint`: ``obs (4,) -> action (2,) float32`` in [-1, 1]."""
        obs = np.asarray(obs, np.float64)
        target = self.waypoint(obs[:2])
        return np.clip(self.p_gain * (target - obs[:2]) + self.d_gain * obs[2:4], -1.0, 1.0).astype(np.float32)


def wrong_goal(oracle: MazeOracle, env: "MazeEnv", rng: np.random.Generator) -> MazeOracle:
    """The miscalibrated maze policy of :class:`fkpd.data.DataRecipe`: the planner believes
    the goal is in a free cell drawn uniformly from ``rng``, other than the true goal cell and
    the ball's start cell (``env.position``, just reset), goes there and stays. The oracle
    itself when no such cell exists."""
    start = cell_of(oracle.grid, env.position)
    choices = [c for c in free_cells(oracle.grid) if c not in (oracle.goal_cell, start)]
    if not choices:
        return oracle
    cell = choices[int(rng.integers(len(choices)))]
    return MazeOracle(oracle.grid, cell, oracle.p_gain, oracle.d_gain)


class MazeEnv(gym.Env):
    """``d4rl/maze2d-<size>`` on Gymnasium-Robotics' PointMaze, with D4RL's protocol.

    Observations ``(4,) float64`` = ball ``(x, y)`` in metres (centred frame) and
    velocity ``(vx, vy)`` in m/s; actions ``(2,) float32`` in ``[-1, 1]``, the force on
    the ball (×100 N). Reward 1.0 while within :data:`GOAL_RADIUS` of the goal, else 0
    (D4RL's sparse maze2d reward). Never terminates; ``truncated`` at the horizon.

    * ``reset(seed=s)`` reproduces the same initial state for the same ``s`` (see the
      module docstring for the start distribution);
    * ``info["success"]`` is True while the ball is within 0.5 m of the goal;
    * ``render()`` returns an upright ``(H, W, 3) uint8`` top-down view of the whole
      maze: the ball green, the goal's success disc (radius 0.5 m) translucent red.

    Args:
        size: ``umaze``, ``medium`` or ``large``.
        max_episode_steps: horizon; default D4RL's for the maze.
        render_size: ``(height, width)`` of frames in pixels.
        camera: None for the top-down view; ``"free"`` for Gymnasium-Robotics' default
            oblique camera.
        shadows: render shadows, reflections and multisampling (:func:`fkpd.envs._mujoco.plain_scene`).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, size: str = "umaze", max_episode_steps: int | None = None,
                 render_size: tuple[int, int] = DEFAULT_RENDER_SIZE, camera: str | None = None,
                 shadows: bool = False) -> None:
        with quiet():
            from gymnasium_robotics.envs.maze import maps
            from gymnasium_robotics.envs.maze.point_maze import PointMazeEnv
        self.maze_spec = MAZES[size]
        self.size = size
        self.grid = maze_map(size)
        self._env = PointMazeEnv(maze_map=getattr(maps, self.maze_spec.map_name), render_mode="rgb_array",
                                 reward_type="sparse", continuing_task=True, reset_target=False,
                                 height=int(render_size[0]), width=int(render_size[1]))
        # Gymnasium-Robotics writes the maze's MJCF to a temporary file per env and leaves it.
        Path(self._env.tmp_xml_file_path).unlink(missing_ok=True)
        self._env.position_noise_range = 0.0  # goal and start exactly at cell centres; noise is ours
        # Clip legibility: the goal marker becomes a flat translucent disc of the success
        # radius (0.5 m) on the floor, under the ball (a sphere of 0.2 m at z = 0), so a ball
        # at the goal stays visible and nothing floats out of place in the top-down view.
        import mujoco

        model = self._env.point_env.model
        self._target_site = self._env.target_site_id
        model.site_type[self._target_site] = mujoco.mjtGeom.mjGEOM_CYLINDER
        model.site_size[self._target_site] = [GOAL_RADIUS, 0.005, 0.0]
        model.site_rgba[self._target_site] = [1.0, 0.1, 0.1, 0.45]
        self.max_episode_steps = int(self.maze_spec.horizon if max_episode_steps is None else max_episode_steps)
        self.goal_cell = self.maze_spec.goal_cell
        self.goal = cell_center(self.grid, self.goal_cell)
        self.start_cells = free_cells(self.grid)  # D4RL's empty_and_goal_locations
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float64)
        self.action_space = self._env.action_space
        self.render_mode = "rgb_array"
        self._camera = camera
        self._shadows = bool(shadows)
        self._render_ready = False
        self._t = 0
        self._obs = np.zeros(4)

    @property
    def position(self) -> np.ndarray:
        """The ball's ``(x, y)`` in metres."""
        return self._obs[:2].copy()

    def _info(self) -> dict[str, Any]:
        return {"success": bool(np.linalg.norm(self._obs[:2] - self.goal) <= GOAL_RADIUS), "goal": self.goal.copy()}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset; the same ``seed`` gives the same start cell, position and velocity.

        Args:
            options: ``{"reset_cell": (row, col)}`` to choose the start cell.

        Returns:
            ``(obs (4,) float64, info)``.
        """
        super().reset(seed=seed)
        rng = self.np_random
        cell = self.start_cells[int(rng.integers(len(self.start_cells)))]
        if options and options.get("reset_cell") is not None:
            cell = tuple(int(c) for c in options["reset_cell"])
        pos = cell_center(self.grid, cell) + rng.uniform(-RESET_POS_NOISE, RESET_POS_NOISE, size=2)
        vel = rng.normal(0.0, RESET_VEL_NOISE, size=2)
        self._env.reset(options={"goal_cell": np.array(self.goal_cell), "reset_cell": np.array(cell)})
        self._env.point_env.model.site_pos[self._target_site][2] = -0.09  # the disc on the floor (z = -0.1)
        self._env.point_env.set_state(pos, vel)
        self._t = 0
        self._obs = np.concatenate([pos, vel]).astype(np.float64)
        return self._obs.copy(), self._info()

    def step(self, action):
        """Step once (one physics step of 0.01 s). Returns ``(obs, reward, False, truncated, info)``."""
        action = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        obs, _, _, _, _ = self._env.step(action)
        self._obs = np.asarray(obs["observation"], np.float64)
        self._t += 1
        info = self._info()
        return self._obs.copy(), float(info["success"]), False, self._t >= self.max_episode_steps, info

    def physics_state(self) -> np.ndarray:
        """The simulator's full physics state, ``(S,) float64``
        (:func:`fkpd.envs._mujoco.physics_state`)."""
        return physics_state(self._env.point_env.model, self._env.point_env.data)

    def restore_physics_state(self, state: np.ndarray) -> None:
        """Put the ball in a state from :meth:`physics_state` of an env of the same maze
        reset with the same seed (the reset places the goal disc in the model); the
        observation follows the state.

        Raises:
            ValueError: a state of another model.
        """
        env = self._env.point_env
        restore_physics_state(env.model, env.data, state)
        self._obs = np.concatenate([env.data.qpos[:2], env.data.qvel[:2]]).astype(np.float64)

    def render(self) -> np.ndarray:
        """An upright ``(H, W, 3) uint8`` frame of the current state; top-down over the whole
        maze by default (:func:`fkpd.envs._mujoco.refresh_kinematics` first)."""
        if not self._render_ready:
            renderer = self._env.point_env.mujoco_renderer
            plain_scene(renderer, self._shadows)
            if self._camera != "free":
                viewer = renderer._get_viewer("rgb_array")
                rows, cols = len(self.grid), len(self.grid[0])
                fovy = float(self._env.point_env.model.vis.global_.fovy)
                h, w = renderer.height, renderer.width
                half = max(rows / 2.0, cols / 2.0 * h / w) * 1.02
                viewer.cam.lookat[:] = [0.0, 0.0, 0.0]
                viewer.cam.elevation = -90.0
                viewer.cam.azimuth = 90.0
                viewer.cam.distance = half / math.tan(math.radians(fovy) / 2.0)
            self._render_ready = True
        refresh_kinematics(self._env.point_env.model, self._env.point_env.data)
        return np.ascontiguousarray(self._env.render())

    def close(self) -> None:
        """Release the simulator and its renderer."""
        self._env.close()


#: The id prefix of a maze2d task's name: ``d4rl/maze2d-<size>``.
_NAME_PREFIX = "maze2d-"


def maze_of(spec: TaskSpec) -> MazeSpec:
    """The :class:`MazeSpec` of a maze2d task's spec (``d4rl/maze2d-umaze`` -> ``MAZES["umaze"]``).

    Raises:
        KeyError: ``spec`` is not a maze2d task.
    """
    return MAZES[spec.name[len(_NAME_PREFIX):]]


class Maze2dFamily(TaskFamily):
    """The ``d4rl/maze2d-<size>`` tasks: Do = 4, Da = 2, D4RL's horizon, whole-episode
    segments (sparse reward), top-down camera, the waypoint planner as scripted policy."""

    name = "maze2d"
    prefix = "d4rl"
    is_maze = True

    def task_names(self) -> list[str]:
        """``maze2d-umaze``, ``maze2d-medium``, ``maze2d-large``."""
        return [f"{_NAME_PREFIX}{m}" for m in MAZES]

    def spec(self, name: str) -> TaskSpec | None:
        """The spec of ``d4rl/<name>``, or None when ``name`` is no maze2d task; ``d4rl_name``
        is D4RL's ``maze2d-<size>-v1``, whose reference returns normalise scores."""
        if not name.startswith(_NAME_PREFIX) or name[len(_NAME_PREFIX):] not in MAZES:
            return None
        m = MAZES[name[len(_NAME_PREFIX):]]
        return TaskSpec(task_id=f"d4rl/{name}", obs_dim=4, action_dim=2, max_episode_steps=m.horizon,
                        d4rl_name=m.d4rl_name, segment_length=m.horizon, name=name, family=self)

    def make_env(self, spec: TaskSpec, max_episode_steps: int, render_size: tuple[int, int],
                 camera: str | None, shadows: bool) -> MazeEnv:
        """A :class:`MazeEnv` of the task's maze."""
        return MazeEnv(maze_of(spec).size, max_episode_steps=max_episode_steps, render_size=render_size,
                       camera=camera, shadows=shadows)

    def scripted_policy(self, spec: TaskSpec) -> Callable[[np.ndarray], np.ndarray]:
        """The waypoint planner with PD control toward the task's goal (:class:`MazeOracle`)."""
        return MazeOracle.for_maze(maze_of(spec).size)

    def miscalibrated_policy(self, spec: TaskSpec, oracle: Callable, env: Any, rng: np.random.Generator,
                             radius: tuple[float, float]) -> Callable[[np.ndarray], np.ndarray]:
        """:func:`wrong_goal` (``radius`` is unused)."""
        return wrong_goal(oracle, env, rng)

    def instructions(self, spec: TaskSpec) -> str:
        """The ball heading for the red goal disc, seen from above."""
        return ("Watch both clips of the ball rolling through the maze, seen from above. Choose the clip whose "
                "behaviour you prefer: the one that heads for the red goal disc more directly, moving the way "
                f"you would want it to. {TIE_SKIP}")


#: The maze2d family, registered by :mod:`fkpd.envs.registry`.
MAZE2D = Maze2dFamily()
