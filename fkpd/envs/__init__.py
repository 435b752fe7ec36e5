"""Tasks and simulator environments (the bottom layer): task specs, the registry, MetaWorld,
maze2d and D4RL locomotion."""

from fkpd.envs.spec import (  # noqa: F401
    DEFAULT_MAX_EPISODE_STEPS,
    DEFAULT_SEGMENT_LENGTH,
    DEFAULT_RENDER_SIZE,
    TaskFamily,
    TaskSpec,
)
from fkpd.envs.metaworld import DEFAULT_CAMERA, MetaWorldEnv  # noqa: F401
from fkpd.envs.registry import (  # noqa: F401
    DEFAULT_TASK,
    list_tasks,
    find_task,
    get_task,
    make_env,
    scripted_policy,
)

__all__ = ['DEFAULT_TASK', 'DEFAULT_MAX_EPISODE_STEPS', 'DEFAULT_SEGMENT_LENGTH', 'DEFAULT_CAMERA', 'DEFAULT_RENDER_SIZE',
           'TaskFamily', 'TaskSpec', 'list_tasks', 'find_task', 'get_task', 'MetaWorldEnv', 'make_env',
           'scripted_policy']
