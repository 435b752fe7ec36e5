"""The task as a value: :class:`TaskSpec` and the :class:`TaskFamily` interface.

A task id (``metaworld/door-open-v3``, ``d4rl/maze2d-umaze``, ``d4rl/hopper-medium-v2``)
becomes a :class:`TaskSpec` once, in :func:`fkpd.envs.get_task`, and travels as that.
Everything that differs between task families (the environment, the scripted policy,
the default camera, the annotator instructions, the dataset source, the score, the
intent teachers that apply, whether success exists) is asked of the spec, which asks its
family. Each family module (:mod:`fkpd.envs.metaworld`, :mod:`fkpd.envs.maze`,
:mod:`fkpd.envs.locomotion`) defines one :class:`TaskFamily`; :mod:`fkpd.envs.registry`
registers them under their id prefix and is the one place that parses task ids.

This module imports no family module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from fkpd.envs.d4rl import normalized_score

#: Default episode length in environment steps (MetaWorld's own limit is 500).
#: MetaWorld's scripted policies solve the tested tasks in 60 to 150 steps, so 200
#: leaves room for recovery while keeping evaluation and clips short.
DEFAULT_MAX_EPISODE_STEPS = 200
#: Default segment length L in environment steps (DESIGN.md §2 reference points).
DEFAULT_SEGMENT_LENGTH = 64
#: Default ``(height, width)`` of rendered frames in pixels.
DEFAULT_RENDER_SIZE = (224, 224)
#: Clips play at 30 fps on every family: slow motion for MetaWorld (80 Hz of control),
#: hopper and walker2d (125 Hz), real time or faster for maze2d and halfcheetah.
DEFAULT_FPS = 30
#: The last sentence of every family's annotator instructions.
TIE_SKIP = "Equal if you cannot tell them apart or like them equally; Skip if neither clip can be judged."


class TaskFamily:
    """What one family of tasks does differently; the interface a family module implements.

    Class attributes (the base class's values are the defaults):
        name: the family's name (``metaworld``, ``maze2d``, ``locomotion``).
        prefix: the task-id prefix before ``/`` that the registry routes on
            (``metaworld`` or ``d4rl``).
        default_camera: the camera :meth:`TaskSpec.make_env` uses when none is given;
            None leaves the choice to the env (maze2d: top-down, locomotion: tracking).
        has_scripted_policy: whether :meth:`scripted_policy` exists, and with it a data
            generator (:func:`fkpd.data.generate_dataset`).
        has_success: whether ``info["success"]`` can ever be True (locomotion: never).
        is_maze: the maze2d family (sparse reward, D4RL's maze frame on original files).
        intent_teachers: names of the intent teachers of :mod:`fkpd.prefs.teachers`
            that mean something on the family, in the order their scores are reported.
    """

    name: str = ""
    prefix: str = ""
    default_camera: str | None = None
    has_scripted_policy: bool = True
    has_success: bool = True
    is_maze: bool = False
    intent_teachers: tuple[str, ...] = ("smooth",)

    def task_names(self) -> list[str]:
        """Names (after ``<prefix>/``) of the family's tasks, in listing order.

        Raises:
            ConfigError: a package the family's task list comes from is missing.
        """
        raise NotImplementedError

    def spec(self, name: str) -> "TaskSpec | None":
        """The :class:`TaskSpec` of task ``<prefix>/<name>``, or None when the family has no
        such task."""
        raise NotImplementedError

    def make_env(self, spec: "TaskSpec", max_episode_steps: int, render_size: tuple[int, int],
                 camera: str | None, shadows: bool) -> Any:
        """A fresh Gymnasium env of ``spec`` (see :meth:`TaskSpec.make_env`)."""
        raise NotImplementedError

    def scripted_policy(self, spec: "TaskSpec") -> Callable[[np.ndarray], np.ndarray]:
        """The oracle ``obs (Do,) -> action (Da,) float32`` (see :meth:`TaskSpec.scripted_policy`)."""
        raise NotImplementedError

    def miscalibrated_policy(self, spec: "TaskSpec", oracle: Callable, env: Any, rng: np.random.Generator,
                             radius: tuple[float, float]) -> Callable[[np.ndarray], np.ndarray]:
        """A confidently wrong variant of ``oracle`` for one episode (see
        :meth:`TaskSpec.miscalibrated_policy`)."""
        raise NotImplementedError

    def instructions(self, spec: "TaskSpec") -> str:
        """The annotator instructions a new project of ``spec`` starts with."""
        raise NotImplementedError

    def own_dataset(self, spec: "TaskSpec") -> str:
        """The D4RL dataset name the task trains on when none is given; '' when its data is
        generated."""
        return ""


@dataclass(frozen=True)
class TaskSpec:
    """Static description of one task, and the door to its family's behaviour.

    Attributes:
        task_id: registry id, e.g. ``metaworld/door-open-v3``.
        obs_dim: Do, observation size.
        action_dim: Da, action size; actions live in ``[-1, 1]^Da``.
        max_episode_steps: default evaluation horizon in env steps.
        fps: playback rate of clips in frames per second (:data:`DEFAULT_FPS`).
        d4rl_name: for ``d4rl/`` tasks, the D4RL dataset name whose reference returns
            normalise scores (e.g. ``hopper-medium-v2``, ``maze2d-umaze-v1``); else ''.
        segment_length: default L, steps per labelled segment (clip), when ``fkpd loop``
            or a project's batch settings do not set one. 64 except on maze2d, where it
            is the whole episode: the reward is sparse (1 per step at the goal), so
            shorter clips from the start rarely differ in return.
        name: the task's name within its family, the id after ``<prefix>/``
            (``door-open-v3``, ``maze2d-umaze``, ``hopper-medium-v2``).
        family: the :class:`TaskFamily` that builds its env and policies (keyword only;
            not compared, so two specs with the same values are equal).
    """

    task_id: str
    obs_dim: int
    action_dim: int
    max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS
    fps: int = DEFAULT_FPS
    d4rl_name: str = ""
    segment_length: int = DEFAULT_SEGMENT_LENGTH
    name: str = field(default="", kw_only=True)
    family: TaskFamily = field(kw_only=True, compare=False, repr=False)

    # -- what the family decides ------------------------------------------------------------
    @property
    def default_camera(self) -> str | None:
        """Camera used when none is given: ``corner`` on MetaWorld; None (the env's own:
        top-down on maze2d, tracking on locomotion) elsewhere."""
        return self.family.default_camera

    @property
    def has_scripted_policy(self) -> bool:
        """Whether the task has a scripted policy and so a data generator (not D4RL
        locomotion, whose data is its D4RL dataset)."""
        return self.family.has_scripted_policy

    @property
    def has_success(self) -> bool:
        """Whether the task has a success event (``info["success"]``); locomotion has none
        and is judged by return and D4RL normalised score."""
        return self.family.has_success

    @property
    def is_maze(self) -> bool:
        """Whether this is a ``d4rl/maze2d-*`` task."""
        return self.family.is_maze

    @property
    def intent_teachers(self) -> tuple[str, ...]:
        """Intent teachers (:data:`fkpd.prefs.teachers.TEACHERS` names) whose scores mean
        something on the task: ``smooth`` everywhere, ``high-gripper`` (the hand height,
        MetaWorld's ``obs[2]``) on MetaWorld only."""
        return tuple(self.family.intent_teachers)

    @property
    def instructions(self) -> str:
        """The labelling instructions a new project of this task starts with: what the clips
        show and what to prefer (MetaWorld: the arm's progress on the task; maze2d: the
        ball heading for the red goal disc; locomotion: the gait moving the robot forward)."""
        return self.family.instructions(self)

    @property
    def own_dataset(self) -> str:
        """The D4RL dataset the task trains on when no dataset is given: a locomotion task's
        own (``d4rl/hopper-medium-v2`` -> ``hopper-medium-v2``, looked up in D4RL's cache
        directory), since locomotion has no data generator; ``""`` for every other task,
        whose data is generated."""
        return self.family.own_dataset(self)

    def make_env(self, max_episode_steps: int | None = None,
                 render_size: tuple[int, int] = DEFAULT_RENDER_SIZE, camera: str | None = None,
                 shadows: bool = False) -> Any:
        """Build a fresh Gymnasium environment of the task.

        Args:
            max_episode_steps: horizon in steps; default :attr:`max_episode_steps`.
            render_size: ``(height, width)`` of frames from ``render()`` in pixels.
            camera: camera name; default :attr:`default_camera`.
            shadows: render shadows, reflections and multisampling (slow in software
                rendering; :func:`fkpd.envs._mujoco.plain_scene`).
        """
        horizon = self.max_episode_steps if max_episode_steps is None else max_episode_steps
        return self.family.make_env(self, max_episode_steps=horizon, render_size=render_size,
                                    camera=camera or self.default_camera, shadows=shadows)

    def scripted_policy(self) -> Callable[[np.ndarray], np.ndarray]:
        """The scripted (oracle) policy, ``obs (Do,) -> action (Da,) float32``.

        Raises:
            ConfigError: the task has none (D4RL locomotion).
        """
        return self.family.scripted_policy(self)

    def miscalibrated_policy(self, oracle: Callable[[np.ndarray], np.ndarray], env: Any,
                             rng: np.random.Generator,
                             radius: tuple[float, float]) -> Callable[[np.ndarray], np.ndarray]:
        """The miscalibrated policy of one generated episode (:class:`fkpd.data.DataRecipe`):
        ``oracle`` acting on a wrong belief drawn from ``rng``. MetaWorld: the object seen
        displaced horizontally by ``radius`` (min, max) metres in a random direction;
        maze2d: the goal believed in another free cell (``radius`` unused).

        Args:
            oracle: the task's scripted policy.
            env: the env of the episode, just reset.
            rng: draws the belief.
            radius: (min, max) displacement in metres.
        """
        return self.family.miscalibrated_policy(self, oracle, env, rng, radius)

    # -- scores -----------------------------------------------------------------------------
    def normalized_score(self, returns: float | Sequence[float] | np.ndarray) -> np.ndarray | float:
        """D4RL normalised score (0-100) of episode return(s) against :attr:`d4rl_name`'s
        reference returns (:func:`fkpd.envs.d4rl.normalized_score`).

        Raises:
            UnknownTaskError: the task has no D4RL reference scores (not a ``d4rl/`` task).
        """
        return normalized_score(self.d4rl_name or self.task_id, returns)

    def score_summary(self, returns: Sequence[float]) -> dict[str, Any]:
        """``{"d4rl_dataset", "d4rl_normalized_score", "d4rl_normalized_score_std"}`` (mean and
        standard deviation over episodes, 0-100 scale) for a ``d4rl/`` task; ``{}`` for any
        other task or no episodes.

        Args:
            returns: undiscounted episode returns, raw environment reward units.
        """
        if not self.d4rl_name or len(returns) == 0:
            return {}
        scores = np.atleast_1d(normalized_score(self.d4rl_name, np.asarray(returns, np.float64)))
        return {"d4rl_dataset": self.d4rl_name, "d4rl_normalized_score": float(scores.mean()),
                "d4rl_normalized_score_std": float(scores.std())}
