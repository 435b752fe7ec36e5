"""D4RL locomotion tasks: ``d4rl/<env>-<dataset>-v2`` in Gymnasium's MuJoCo v5 environments.

Every D4RL v2 locomotion dataset of ``hopper``, ``walker2d`` and ``halfcheetah`` is a task
(e.g. ``d4rl/hopper-medium-v2``; names from ``d4rl.infos.DATASET_URLS``), evaluated in
Gymnasium's MuJoCo v5 environments (:class:`LocomotionEnv`), whose observations have the
layout of the v2 datasets (:func:`observation_from_state`). The family has no scripted
policy and so no data generator: a task trains on its own D4RL dataset
(:attr:`fkpd.envs.TaskSpec.own_dataset`), or a Minari dataset. It has no success event
either; it is judged by return and the D4RL normalised score.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

from fkpd.envs._mujoco import physics_state, plain_scene, refresh_kinematics, restore_physics_state

import gymnasium as gym  # noqa: E402  (after _mujoco, which chooses the MuJoCo backend)
import numpy as np  # noqa: E402

from fkpd.envs.d4rl import D4RL_VERSION_SUFFIX, dataset_urls  # noqa: E402
from fkpd.envs.spec import DEFAULT_RENDER_SIZE, TIE_SKIP, TaskFamily, TaskSpec  # noqa: E402
from fkpd.errors import ConfigError  # noqa: E402

#: D4RL locomotion environment -> (Gymnasium v5 id, Do, Da). The sizes are those of the
#: D4RL v2 datasets (and of the v5 envs; ``tests/test_d4rl.py`` checks both).
LOCOMOTION_ENVS: dict[str, tuple[str, int, int]] = {
    "hopper": ("Hopper-v5", 11, 3),
    "walker2d": ("Walker2d-v5", 17, 6),
    "halfcheetah": ("HalfCheetah-v5", 17, 6),
}
#: D4RL evaluates locomotion over 1000-step episodes (its gym registrations).
LOCOMOTION_HORIZON = 1000
#: What the annotator instructions call each robot.
LOCOMOTION_BODIES = {"hopper": "one-legged hopper", "walker2d": "two-legged walker",
                     "halfcheetah": "half-cheetah"}


@lru_cache(maxsize=1)
def locomotion_names() -> tuple[str, ...]:
    """D4RL v2 locomotion dataset names of :data:`LOCOMOTION_ENVS`, sorted.

    Raises:
        ConfigError: ``d4rl`` is not installed.
    """
    return tuple(sorted(n for n in dataset_urls()
                        if n.split("-", 1)[0] in LOCOMOTION_ENVS and n.endswith(D4RL_VERSION_SUFFIX)))


def observation_from_state(env: str, qpos: np.ndarray, qvel: np.ndarray) -> np.ndarray:
    """The observation of a D4RL v2 locomotion dataset for simulator state(s).

    D4RL v2 data was recorded in gym's v3 MuJoCo envs: ``qpos[1:]`` (the x position of
    the torso left out) followed by ``qvel``, clipped to ``[-10, 10]`` for hopper and
    walker2d and unclipped for halfcheetah. Gymnasium's v5 envs keep that layout by
    default; ``tests/test_d4rl.py`` checks this against the v5 envs.

    Args:
        env: ``hopper``, ``walker2d`` or ``halfcheetah``.
        qpos: (..., nq) joint positions; nq = 6, 9, 9.
        qvel: (..., nv) joint velocities; nv = nq.

    Returns:
        (..., Do) float64 with Do = 11, 17, 17.
    """
    qpos, qvel = np.asarray(qpos, np.float64), np.asarray(qvel, np.float64)
    vel = qvel if env == "halfcheetah" else np.clip(qvel, -10.0, 10.0)
    return np.concatenate([qpos[..., 1:], vel], axis=-1)


class LocomotionEnv(gym.Env):
    """A Gymnasium MuJoCo v5 locomotion env with FKPD Studio's guarantees.

    Observations ``(Do,) float64`` in the D4RL v2 layout (:func:`observation_from_state`);
    actions ``(Da,) float32`` in ``[-1, 1]`` (joint torques); reward is Gymnasium's v5
    reward (forward velocity + healthy bonus − control cost, as gym v3's that D4RL's
    reference returns were measured with). ``terminated`` when the robot becomes
    unhealthy (hopper, walker2d), ``truncated`` at ``max_episode_steps``.

    * ``reset(seed=s)`` reproduces the same initial state for the same ``s``;
    * ``info["success"]`` is always ``False``: locomotion has no success event; judge
      it by return and the D4RL normalised score (:meth:`fkpd.envs.TaskSpec.score_summary`);
    * ``render()`` returns an upright ``(H, W, 3) uint8`` frame from the tracking camera.

    Args:
        env: ``hopper``, ``walker2d`` or ``halfcheetah``.
        max_episode_steps: truncation horizon in steps (D4RL: 1000).
        render_size: ``(height, width)`` of frames in pixels.
        camera: MuJoCo camera name (default: the env's tracking camera).
        shadows: render shadows, reflections and multisampling (slow in software
            rendering; :func:`fkpd.envs._mujoco.plain_scene`).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, env: str, max_episode_steps: int = LOCOMOTION_HORIZON,
                 render_size: tuple[int, int] = DEFAULT_RENDER_SIZE, camera: str | None = None,
                 shadows: bool = False) -> None:
        gym_id = LOCOMOTION_ENVS[env][0]
        kwargs: dict[str, Any] = dict(render_mode="rgb_array", height=int(render_size[0]), width=int(render_size[1]))
        if camera:
            kwargs["camera_name"] = camera
        self._env = gym.make(gym_id, disable_env_checker=True, **kwargs).unwrapped
        self.env_name = env
        self.max_episode_steps = int(max_episode_steps)
        self.observation_space = self._env.observation_space
        self.action_space = self._env.action_space
        self.render_mode = "rgb_array"
        self._shadows = bool(shadows)
        self._render_ready = False
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset; the same ``seed`` gives the same initial state. Returns ``(obs, info)``."""
        super().reset(seed=seed)
        obs, info = self._env.reset(seed=None if seed is None else int(seed))
        self._t = 0
        return np.asarray(obs, np.float64), {**info, "success": False}

    def step(self, action):
        """Step once; ``info["success"]`` is False, ``truncated`` at the horizon."""
        action = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        obs, reward, terminated, truncated, info = self._env.step(action)
        self._t += 1
        truncated = bool(truncated) or self._t >= self.max_episode_steps
        return np.asarray(obs, np.float64), float(reward), bool(terminated), truncated, {**info, "success": False}

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """The simulator state ``(qpos (nq,), qvel (nv,))``."""
        return self._env.data.qpos.copy(), self._env.data.qvel.copy()

    def physics_state(self) -> np.ndarray:
        """The simulator's full physics state, ``(S,) float64``
        (:func:`fkpd.envs._mujoco.physics_state`)."""
        return physics_state(self._env.model, self._env.data)

    def restore_physics_state(self, state: np.ndarray) -> None:
        """Put the simulator in a state from :meth:`physics_state` of an env of the same robot.

        Raises:
            ValueError: a state of another model.
        """
        restore_physics_state(self._env.model, self._env.data, state)

    def render(self) -> np.ndarray:
        """An upright frame of the current state, ``(H, W, 3) uint8``
        (:func:`fkpd.envs._mujoco.refresh_kinematics` first)."""
        if not self._render_ready:
            plain_scene(self._env.mujoco_renderer, self._shadows)
            self._render_ready = True
        refresh_kinematics(self._env.model, self._env.data)
        return np.ascontiguousarray(self._env.render())

    def close(self) -> None:
        """Release the simulator and its renderer."""
        self._env.close()


def _env_of(spec: TaskSpec) -> str:
    """``hopper``, ``walker2d`` or ``halfcheetah``: the robot of a locomotion spec."""
    return spec.name.split("-", 1)[0]


class LocomotionFamily(TaskFamily):
    """The ``d4rl/<env>-<dataset>-v2`` tasks: horizon 1000, tracking camera, no scripted
    policy (data: the task's own D4RL dataset), no success event."""

    name = "locomotion"
    prefix = "d4rl"
    has_scripted_policy = False
    has_success = False

    def task_names(self) -> list[str]:
        """:func:`locomotion_names`.

        Raises:
            ConfigError: ``d4rl`` is not installed.
        """
        return list(locomotion_names())

    def spec(self, name: str) -> TaskSpec | None:
        """The spec of ``d4rl/<name>`` for a D4RL v2 locomotion dataset name, else None;
        ``d4rl_name`` is the dataset itself.

        Raises:
            ConfigError: ``name`` starts with a locomotion env but ``d4rl`` is not installed.
        """
        env = name.split("-", 1)[0]
        if env not in LOCOMOTION_ENVS or name not in locomotion_names():
            return None
        _, do, da = LOCOMOTION_ENVS[env]
        return TaskSpec(task_id=f"d4rl/{name}", obs_dim=do, action_dim=da, max_episode_steps=LOCOMOTION_HORIZON,
                        d4rl_name=name, name=name, family=self)

    def make_env(self, spec: TaskSpec, max_episode_steps: int, render_size: tuple[int, int],
                 camera: str | None, shadows: bool) -> LocomotionEnv:
        """A :class:`LocomotionEnv` of the task's robot."""
        return LocomotionEnv(_env_of(spec), max_episode_steps=max_episode_steps, render_size=render_size,
                             camera=camera, shadows=shadows)

    def scripted_policy(self, spec: TaskSpec) -> Callable[[np.ndarray], np.ndarray]:
        """None exists.

        Raises:
            ConfigError: always; the message names the task's D4RL dataset.
        """
        raise ConfigError(f"task {spec.task_id} has no scripted policy; its data is the D4RL dataset "
                          f"{spec.d4rl_name!r}")

    def miscalibrated_policy(self, spec: TaskSpec, oracle: Callable, env: Any, rng: np.random.Generator,
                             radius: tuple[float, float]) -> Callable[[np.ndarray], np.ndarray]:
        """None exists (no scripted policy).

        Raises:
            ConfigError: always.
        """
        return self.scripted_policy(spec)

    def instructions(self, spec: TaskSpec) -> str:
        """The gait moving the robot forward, naming the robot and the task."""
        body = LOCOMOTION_BODIES.get(_env_of(spec), "robot")
        return (f"Watch both clips of the {body} robot ({spec.name}). Choose the clip whose movement you prefer: the "
                "one that moves forward better (faster, steadier, without falling) in a way you would want a "
                f"robot to move. {TIE_SKIP}")

    def own_dataset(self, spec: TaskSpec) -> str:
        """The task's own D4RL dataset (``d4rl/hopper-medium-v2`` -> ``hopper-medium-v2``)."""
        return str(spec.d4rl_name)


#: The D4RL locomotion family, registered by :mod:`fkpd.envs.registry`.
LOCOMOTION = LocomotionFamily()
