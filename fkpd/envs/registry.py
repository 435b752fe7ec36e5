"""Task registry: task ids -> :class:`~fkpd.envs.spec.TaskSpec`, and the envs and policies of tasks.

Task ids look like ``<prefix>/<name>``. This module is the one place that parses them:
the prefix picks the registered task families (:data:`FAMILIES`), and the first family
that knows the name makes the spec.

* ``metaworld/<name>``: every MetaWorld v3 MT1 task (:mod:`fkpd.envs.metaworld`), each
  with MetaWorld's own scripted (oracle) policy, which :mod:`fkpd.data` perturbs to
  generate offline datasets;
* ``d4rl/maze2d-umaze|medium|large`` on Gymnasium-Robotics' PointMaze, with a
  waypoint-planner oracle (:mod:`fkpd.envs.maze`);
* ``d4rl/<env>-<dataset>-v2`` for the D4RL v2 locomotion datasets of hopper, walker2d and
  halfcheetah, in Gymnasium's MuJoCo v5 environments (:mod:`fkpd.envs.locomotion`; no
  oracle: their data is the D4RL dataset).

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

from typing import Callable

import numpy as np

from fkpd.envs.locomotion import LOCOMOTION
from fkpd.envs.maze import MAZE2D
from fkpd.envs.metaworld import METAWORLD
from fkpd.envs.spec import DEFAULT_RENDER_SIZE, TaskFamily, TaskSpec
from fkpd.errors import ConfigError, UnknownTaskError

DEFAULT_TASK = "metaworld/door-open-v3"

#: Task-id prefix -> the families asked for a name, in listing order.
FAMILIES: dict[str, tuple[TaskFamily, ...]] = {
    "metaworld": (METAWORLD,),
    "d4rl": (MAZE2D, LOCOMOTION),
}


def list_tasks(family: str | None = None) -> list[str]:
    """Registered task ids: MetaWorld's sorted, then D4RL's (maze2d, then locomotion; the
    locomotion ids are left out when ``d4rl`` is not installed).

    Args:
        family: only this id prefix (``metaworld`` or ``d4rl``); None for all.
    """
    tasks = []
    for prefix, families in FAMILIES.items():
        if family not in (None, prefix):
            continue
        for fam in families:
            try:
                tasks += [f"{prefix}/{n}" for n in fam.task_names()]
            except ConfigError:
                pass
    return tasks


def find_task(task_id: str | TaskSpec) -> TaskSpec | None:
    """The spec of ``task_id``, or None when no family knows it (cheap: builds no message).

    Raises:
        ConfigError: a ``d4rl/`` locomotion name while ``d4rl`` is not installed.
    """
    if isinstance(task_id, TaskSpec):
        return task_id
    prefix, _, name = str(task_id).partition("/")
    for fam in FAMILIES.get(prefix, ()):
        spec = fam.spec(name)
        if spec is not None:
            return spec
    return None


def get_task(task_id: str | TaskSpec) -> TaskSpec:
    """Look a task up by id (a :class:`TaskSpec` is returned as it is).

    Raises:
        UnknownTaskError: if ``task_id`` is not registered; the message lists the
            known ids.
        ConfigError: a ``d4rl/`` locomotion name while ``d4rl`` is not installed.
    """
    spec = find_task(task_id)
    if spec is not None:
        return spec
    known = ", ".join(list_tasks())
    raise UnknownTaskError(
        f"unknown task id {task_id!r}. Known task ids: {known}. "
        f"Pass one of them, e.g. --task {DEFAULT_TASK}."
    )


def make_env(
    task_id: str | TaskSpec,
    max_episode_steps: int | None = None,
    render_size: tuple[int, int] = DEFAULT_RENDER_SIZE,
    camera: str | None = None,
    shadows: bool = False,
):
    """Build the environment for ``task_id`` (:meth:`TaskSpec.make_env`).

    Args:
        task_id: registry id (see :func:`list_tasks`) or its spec.
        max_episode_steps: horizon; defaults to the task's ``max_episode_steps``.
        render_size: ``(height, width)`` of frames from ``render()``.
        camera: camera name; defaults to ``corner`` on MetaWorld, the top-down view on
            maze2d and the tracking camera on locomotion.
        shadows: render shadows, reflections and multisampling (slow in software
            rendering; :func:`fkpd.envs._mujoco.plain_scene`).

    Returns:
        A ``gymnasium.Env`` with the guarantees of the module docstring.

    Raises:
        UnknownTaskError: for an unregistered id.
    """
    return get_task(task_id).make_env(max_episode_steps=max_episode_steps, render_size=render_size,
                                      camera=camera, shadows=shadows)


def scripted_policy(task_id: str | TaskSpec) -> Callable[[np.ndarray], np.ndarray]:
    """The task's scripted (oracle) policy: ``obs (Do,) -> action (Da,)``. MetaWorld's own
    policies; on maze2d the waypoint planner with PD control of :mod:`fkpd.envs.maze`.

    Raises:
        UnknownTaskError: for an unregistered id.
        ConfigError: a D4RL locomotion task (it has no scripted policy).
    """
    return get_task(task_id).scripted_policy()
