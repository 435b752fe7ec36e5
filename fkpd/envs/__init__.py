"""Tasks and simulator environments (the bottom layer): the task registry, MetaWorld, maze2d and D4RL locomotion."""

from fkpd.envs.registry import (  # noqa: F401
    DEFAULT_TASK,
    DEFAULT_MAX_EPISODE_STEPS,
    DEFAULT_SEGMENT_LENGTH,
    DEFAULT_CAMERA,
    DEFAULT_RENDER_SIZE,
    TaskSpec,
    list_tasks,
    get_task,
    MetaWorldEnv,
    make_env,
    scripted_policy,
)

__all__ = ['DEFAULT_TASK', 'DEFAULT_MAX_EPISODE_STEPS', 'DEFAULT_SEGMENT_LENGTH', 'DEFAULT_CAMERA', 'DEFAULT_RENDER_SIZE', 'TaskSpec', 'list_tasks', 'get_task', 'MetaWorldEnv', 'make_env', 'scripted_policy']
