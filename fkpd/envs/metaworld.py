"""MetaWorld tasks: every MetaWorld v3 MT1 task as ``metaworld/<name>``, with its scripted policy.

Each task comes with MetaWorld's own scripted (oracle) policy, which
:func:`fkpd.data.generate_dataset` perturbs to generate offline datasets. The env
(:class:`MetaWorldEnv`) keeps the goal observable and makes ``reset(seed=s)``
reproducible.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

from fkpd.envs._mujoco import physics_state, plain_scene, refresh_kinematics, restore_physics_state

import gymnasium as gym  # noqa: E402  (after _mujoco, which chooses the MuJoCo backend)
import numpy as np  # noqa: E402

from fkpd.envs.spec import (DEFAULT_MAX_EPISODE_STEPS, DEFAULT_RENDER_SIZE, TIE_SKIP, TaskFamily,  # noqa: E402
                            TaskSpec)

DEFAULT_CAMERA = "corner"
#: The annotator instructions of a MetaWorld task; ``{task}`` is its name.
INSTRUCTIONS = (
    "Watch both clips of the robot arm. Choose the clip whose behaviour you prefer: the one "
    "that makes more progress on the task ({task}) in a way you would want a robot to act. " + TIE_SKIP
)


@lru_cache(maxsize=1)
def metaworld_names() -> tuple[str, ...]:
    """MetaWorld v3 env names (``door-open-v3``, ...), sorted."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return tuple(sorted(ALL_V3_ENVIRONMENTS))


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
        shadows: render shadows, reflections and multisampling. Off by default: with
            software OpenGL (Mesa llvmpipe) they cost most of the frame time (shadows and
            reflections 118 vs 41 ms per 224x224 frame here, multisampling 27 vs 12 ms)
            and add nothing an annotator needs (:func:`fkpd.envs._mujoco.plain_scene`).
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

    def physics_state(self) -> np.ndarray:
        """The simulator's full physics state, ``(S,) float64``
        (:func:`fkpd.envs._mujoco.physics_state`)."""
        return physics_state(self._env.model, self._env.data)

    def restore_physics_state(self, state: np.ndarray) -> None:
        """Put the simulator in a state from :meth:`physics_state` of an env of the same task
        reset with the same seed (the reset places the objects and goal in the model).

        Raises:
            ValueError: a state of another model.
        """
        restore_physics_state(self._env.model, self._env.data, state)

    def render(self) -> np.ndarray:
        """An upright frame of the current state, ``(H, W, 3) uint8`` (MuJoCo's offscreen
        image is flipped; :func:`fkpd.envs._mujoco.refresh_kinematics` first)."""
        if not self._render_ready:
            plain_scene(self._env.mujoco_renderer, self._shadows)
            self._render_ready = True
        refresh_kinematics(self._env.model, self._env.data)
        frame = self._env.render()
        return np.ascontiguousarray(frame[::-1])

    def close(self) -> None:
        """Release the simulator and its renderer."""
        self._env.close()


def displace_object(oracle: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator,
                    radius: tuple[float, float]) -> Callable[[np.ndarray], np.ndarray]:
    """MetaWorld's miscalibration: ``oracle`` sees the object displaced by a fixed horizontal
    offset of ``radius`` (min, max) metres in a direction drawn from ``rng`` (angle first,
    then length), in both the current and the previous frame of the observation."""
    offset = np.zeros(3)
    ang = rng.uniform(0, 2 * np.pi)
    offset[:2] = rng.uniform(*radius) * np.array([np.cos(ang), np.sin(ang)])

    def act(obs: np.ndarray) -> np.ndarray:
        seen = obs.copy()
        seen[4:7] += offset  # object position, current and previous frame
        seen[22:25] += offset
        return oracle(seen)

    return act


class MetaWorldFamily(TaskFamily):
    """The ``metaworld/`` tasks: Do = 39, Da = 4, horizon 200, camera ``corner``."""

    name = "metaworld"
    prefix = "metaworld"
    default_camera = DEFAULT_CAMERA
    intent_teachers = ("smooth", "high-gripper")

    def task_names(self) -> list[str]:
        """MetaWorld's v3 env names, sorted."""
        return list(metaworld_names())

    def spec(self, name: str) -> TaskSpec | None:
        """The spec of ``metaworld/<name>``, or None for an unknown name."""
        if name not in metaworld_names():
            return None
        return TaskSpec(task_id=f"metaworld/{name}", obs_dim=39, action_dim=4, name=name, family=self)

    def make_env(self, spec: TaskSpec, max_episode_steps: int, render_size: tuple[int, int],
                 camera: str | None, shadows: bool) -> MetaWorldEnv:
        """A :class:`MetaWorldEnv`."""
        return MetaWorldEnv(spec.name, max_episode_steps=max_episode_steps, render_size=render_size,
                            camera=camera or DEFAULT_CAMERA, shadows=shadows)

    def scripted_policy(self, spec: TaskSpec) -> Callable[[np.ndarray], np.ndarray]:
        """MetaWorld's own scripted policy of the task (``metaworld.policies.ENV_POLICY_MAP``)."""
        from metaworld.policies import ENV_POLICY_MAP

        policy = ENV_POLICY_MAP[spec.name]()
        return lambda obs: np.asarray(policy.get_action(obs), dtype=np.float32)

    def miscalibrated_policy(self, spec: TaskSpec, oracle: Callable, env: Any, rng: np.random.Generator,
                             radius: tuple[float, float]) -> Callable[[np.ndarray], np.ndarray]:
        """:func:`displace_object`."""
        return displace_object(oracle, rng, radius)

    def instructions(self, spec: TaskSpec) -> str:
        """:data:`INSTRUCTIONS` for the task's name."""
        return INSTRUCTIONS.format(task=spec.name)


#: The MetaWorld family, registered by :mod:`fkpd.envs.registry`.
METAWORLD = MetaWorldFamily()
