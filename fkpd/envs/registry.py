"""Task registry and simulator environments.

Task ids look like ``metaworld/door-open-v3``. Every MetaWorld v3 MT1 task is
registered; each comes with MetaWorld's own scripted (oracle) policy, which
:mod:`fkpd.data` perturbs to generate offline datasets. D4RL tasks are registered too
(:mod:`fkpd.envs.d4rl`): ``d4rl/maze2d-umaze|medium|large`` on Gymnasium-Robotics' PointMaze,
with a waypoint-planner oracle (:mod:`fkpd.envs.maze`), and ``d4rl/<env>-<dataset>-v2`` for the
D4RL v2 locomotion datasets of hopper, walker2d and halfcheetah, in Gymnasium's MuJoCo v5
environments (no oracle: their data is the D4RL dataset).

Environments follow the Gymnasium API (``reset(seed=...)`` and ``step``) with three
guarantees the rest of FKPD Studio relies on:

* ``reset(seed=s)`` always reproduces the same initial state (object and goal
  positions) for the same ``s``, so a pair of clips rolled out from one reset seed
  starts from one state (DESIGN.md §3, "Pairs");
* ``info["success"]`` is the task's success flag as a ``bool`` (MetaWorld's; on maze2d,
  being within D4RL's 0.5 m of the goal; always False on locomotion);
* ``render()`` returns an upright ``(H, W, 3) uint8`` frame rendered headless through
  MuJoCo (``MUJOCO_GL=egl`` is set when no backend was chosen).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from fkpd.errors import ConfigError, UnknownTaskError  # noqa: E402

DEFAULT_TASK = "metaworld/door-open-v3"
#: Default episode length in environment steps (MetaWorld's own limit is 500).
#: MetaWorld's scripted policies solve the tested tasks in 60 to 150 steps, so 200
#: leaves room for recovery while keeping evaluation and clips short.
DEFAULT_MAX_EPISODE_STEPS = 200
#: Default segment length L in environment steps (DESIGN.md §2 reference points).
DEFAULT_SEGMENT_LENGTH = 64
DEFAULT_CAMERA = "corner"
DEFAULT_RENDER_SIZE = (224, 224)  # (height, width) in pixels


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one task.

    Attributes:
        task_id: registry id, e.g. ``metaworld/door-open-v3``.
        obs_dim: Do, observation size.
        action_dim: Da, action size; actions live in ``[-1, 1]^Da``.
        max_episode_steps: default evaluation horizon in env steps.
        fps: playback rate for clips (MetaWorld steps at 80 Hz of control with
            frame skip 5; clips play at 30 fps so motion is easy to follow).
        d4rl_name: for ``d4rl/`` tasks, the D4RL dataset name whose reference returns
            normalise scores (e.g. ``hopper-medium-v2``, ``maze2d-umaze-v1``); else ''.
        segment_length: default L, steps per labelled segment (clip), when ``fkpd loop``
            or a project's batch settings do not set one. 64 except on maze2d, where it
            is the whole episode: the reward is sparse (1 per step at the goal), so
            shorter clips from the start rarely differ in return.
    """

    task_id: str
    obs_dim: int
    action_dim: int
    max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS
    fps: int = 30
    d4rl_name: str = ""
    segment_length: int = DEFAULT_SEGMENT_LENGTH

    @property
    def family(self) -> str:
        return self.task_id.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.task_id.split("/", 1)[1]


@lru_cache(maxsize=1)
def _metaworld_names() -> tuple[str, ...]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return tuple(sorted(ALL_V3_ENVIRONMENTS))


def list_tasks(family: str | None = None) -> list[str]:
    """Registered task ids: MetaWorld's sorted, then D4RL's (:func:`fkpd.envs.d4rl.list_task_ids`).

    Args:
        family: only this family (``metaworld`` or ``d4rl``); None for all.
    """
    tasks = []
    if family in (None, "metaworld"):
        tasks += [f"metaworld/{n}" for n in _metaworld_names()]
    if family in (None, "d4rl"):
        from fkpd.envs.d4rl import list_task_ids

        tasks += list_task_ids()
    return tasks


def get_task(task_id: str) -> TaskSpec:
    """Look a task up by id.

    Raises:
        UnknownTaskError: if ``task_id`` is not registered; the message lists the
            known ids.
    """
    family, _, name = str(task_id).partition("/")
    if family == "metaworld" and name in _metaworld_names():
        return TaskSpec(task_id=task_id, obs_dim=39, action_dim=4)
    if family == "d4rl":
        from fkpd.envs.d4rl import task_spec

        spec = task_spec(name)
        if spec is not None:
            return spec
    known = ", ".join(list_tasks())
    raise UnknownTaskError(
        f"unknown task id {task_id!r}. Known task ids: {known}. "
        f"Pass one of them, e.g. --task {DEFAULT_TASK}."
    )


class MetaWorldEnv(gym.Env):
    """One MetaWorld v3 task with the goal observable and seeded resets.

    Observations are ``(39,) float64``: hand position, gripper opening, object
    poses, the previous frame of those, and the goal position (MetaWorld's
    goal-observable layout). Actions are ``(4,) float32`` in ``[-1, 1]``: end-effector
    xyz deltas and gripper effort. Reward is MetaWorld's v2 shaped reward in ``[0, 10]``
    per step. Episodes are truncated after ``max_episode_steps``; success does not
    terminate them.

    Args:
        name: MetaWorld env name, e.g. ``door-open-v3``.
        max_episode_steps: truncation horizon in steps.
        render_size: ``(height, width)`` of rendered frames in pixels.
        camera: MetaWorld camera name (``corner``, ``corner2``, ``corner3``,
            ``corner4``, ``topview``, ``behindGripper``, ``gripperPOV``).
        shadows: render shadows and reflections. Off by default: with software
            OpenGL (Mesa llvmpipe) they cost ~3x the frame time (118 vs 41 ms per
            224x224 frame here) and add nothing an annotator needs.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(
        self,
        name: str,
        max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS,
        render_size: tuple[int, int] = DEFAULT_RENDER_SIZE,
        camera: str = DEFAULT_CAMERA,
        shadows: bool = False,
    ) -> None:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        h, w = int(render_size[0]), int(render_size[1])
        env = ALL_V3_ENVIRONMENTS[name](
            render_mode="rgb_array", camera_name=camera, height=h, width=w
        )
        # Same steps as MetaWorld's goal-observable constructor, but with a
        # seeded goal/object sampler so reset(seed) is reproducible.
        env._partially_observable = False
        env._freeze_rand_vec = False
        env.seeded_rand_vec = True
        env._set_task_called = True
        env.__dict__.pop("sawyer_observation_space", None)
        env.max_path_length = max(int(max_episode_steps), 1)
        self._env = env
        self.name = name
        self.max_episode_steps = int(max_episode_steps)
        self.observation_space = env.observation_space
        self.action_space = env.action_space
        self.render_mode = "rgb_array"
        self._t = 0
        self._shadows = bool(shadows)
        self._render_ready = False
        env.seed(0)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset; the same ``seed`` always gives the same initial state.

        Returns:
            ``(obs (Do,) float64, info dict)``.
        """
        super().reset(seed=seed)
        if seed is not None:
            self._env.seed(int(seed))
        self._t = 0
        obs, info = self._env.reset()
        return obs.astype(np.float64), dict(info)

    def step(self, action):
        """Step once. ``info["success"]`` is a bool; ``truncated`` at the horizon."""
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        obs, reward, terminated, truncated, info = self._env.step(action)
        self._t += 1
        info = dict(info)
        info["success"] = bool(info.get("success", 0.0))
        truncated = bool(truncated) or self._t >= self.max_episode_steps
        return obs.astype(np.float64), float(reward), bool(terminated), truncated, info

    def render(self) -> np.ndarray:
        """An upright frame, ``(H, W, 3) uint8`` (MuJoCo's offscreen image is flipped)."""
        if not self._render_ready:
            import mujoco

            viewer = self._env.mujoco_renderer._get_viewer("rgb_array")
            if not self._shadows:
                viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
                viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            self._render_ready = True
        frame = self._env.render()
        return np.ascontiguousarray(frame[::-1])

    def close(self) -> None:
        self._env.close()


def make_env(
    task_id: str,
    max_episode_steps: int | None = None,
    render_size: tuple[int, int] = DEFAULT_RENDER_SIZE,
    camera: str | None = None,
    shadows: bool = False,
) -> gym.Env:
    """Build the environment for ``task_id``.

    Args:
        task_id: registry id (see :func:`list_tasks`).
        max_episode_steps: horizon; defaults to the task's ``max_episode_steps``.
        render_size: ``(height, width)`` of frames from ``render()``.
        camera: camera name; defaults to ``corner`` on MetaWorld, the top-down view on
            maze2d and the tracking camera on locomotion.
        shadows: render shadows and reflections (slow in software rendering).

    Raises:
        UnknownTaskError: for an unregistered id.
    """
    spec = get_task(task_id)
    horizon = spec.max_episode_steps if max_episode_steps is None else max_episode_steps
    if spec.family == "d4rl":
        if spec.name.startswith("maze2d-"):
            from fkpd.envs.maze import MazeEnv

            return MazeEnv(spec.name[len("maze2d-"):], max_episode_steps=horizon, render_size=render_size,
                           camera=camera, shadows=shadows)
        from fkpd.envs.d4rl import LocomotionEnv

        return LocomotionEnv(spec.name.split("-", 1)[0], max_episode_steps=horizon, render_size=render_size,
                             camera=camera, shadows=shadows)
    return MetaWorldEnv(
        spec.name, max_episode_steps=horizon, render_size=render_size,
        camera=camera or DEFAULT_CAMERA, shadows=shadows,
    )


def scripted_policy(task_id: str) -> Callable[[np.ndarray], np.ndarray]:
    """The task's scripted (oracle) policy: ``obs (Do,) -> action (Da,)``. MetaWorld's own
    policies; on maze2d the waypoint planner with PD control of :mod:`fkpd.envs.maze`.

    Raises:
        UnknownTaskError: for an unregistered id.
        ConfigError: a D4RL locomotion task (it has no scripted policy).
    """
    spec = get_task(task_id)
    if spec.family == "d4rl":
        if spec.name.startswith("maze2d-"):
            from fkpd.envs.maze import MazeOracle

            return MazeOracle.for_maze(spec.name[len("maze2d-"):])
        raise ConfigError(f"task {task_id} has no scripted policy; its data is the D4RL dataset {spec.d4rl_name!r}")
    from metaworld.policies import ENV_POLICY_MAP

    policy = ENV_POLICY_MAP[spec.name]()
    return lambda obs: np.asarray(policy.get_action(obs), dtype=np.float32)
