"""D4RL tasks: dataset names, the D4RL cache directory, normalised scores, locomotion envs.

D4RL (Fu, Kumar, Nachum, Tucker & Levine, "D4RL: Datasets for Deep Data-Driven
Reinforcement Learning", arXiv 2004.07219) ships its datasets as HDF5 files in the layout
:func:`fkpd.data.load_dataset` reads (``observations``, ``actions``, ``rewards``,
``terminals``, ``timeouts``, optional ``next_observations`` and ``infos/*``). This module
takes everything that is D4RL's own from the installed ``d4rl`` package (1.1) rather than
copying it: the dataset names and download addresses (``d4rl.infos.DATASET_URLS``), the
reference returns of the normalised score (``d4rl.infos.REF_MIN_SCORE`` /
``REF_MAX_SCORE``) and the score itself (``d4rl.get_normalized_score``). ``d4rl`` is
installed with ``--no-deps`` next to the old ``gym<0.25`` it imports; its own
environments need ``mujoco-py`` and are never used. Nothing here downloads anything.

Task ids:

* ``d4rl/<env>-<dataset>-v2`` for every D4RL v2 locomotion dataset of ``hopper``,
  ``walker2d`` and ``halfcheetah`` (e.g. ``d4rl/hopper-medium-v2``), evaluated in
  Gymnasium's MuJoCo v5 environments (:class:`LocomotionEnv`), whose observations have
  the layout of the v2 datasets (:func:`observation_from_state`);
* ``d4rl/maze2d-umaze``, ``d4rl/maze2d-medium``, ``d4rl/maze2d-large`` on
  Gymnasium-Robotics' PointMaze (:mod:`fkpd.envs.maze`), scored against D4RL's
  ``maze2d-<size>-v1`` references.

A dataset is found by file (``--dataset FILE``) or by D4RL dataset name
(``--dataset hopper-medium-v2``), which :func:`resolve_dataset` looks up in D4RL's cache
directory: ``$D4RL_DATASET_DIR``, else ``~/.d4rl/datasets``, under the file name of its
download address (D4RL's ``filepath_from_url``).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

import gymnasium as gym
import numpy as np

from fkpd.errors import ConfigError, DatasetError, UnknownTaskError

#: D4RL locomotion environment -> (Gymnasium v5 id, Do, Da). The sizes are those of the
#: D4RL v2 datasets (and of the v5 envs; ``tests/test_d4rl.py`` checks both).
LOCOMOTION_ENVS: dict[str, tuple[str, int, int]] = {
    "hopper": ("Hopper-v5", 11, 3),
    "walker2d": ("Walker2d-v5", 17, 6),
    "halfcheetah": ("HalfCheetah-v5", 17, 6),
}
#: D4RL evaluates locomotion over 1000-step episodes (its gym registrations).
LOCOMOTION_HORIZON = 1000
#: Clips play at 30 fps, as MetaWorld's: slow motion (hopper and walker2d step at
#: 125 Hz, halfcheetah at 20 Hz), so the gait is easy to follow.
CLIP_FPS = 30
D4RL_VERSION_SUFFIX = "-v2"


# -- the d4rl package ----------------------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what old packages print to stderr on import (gym's and Gymnasium-Robotics'
    deprecation notices, d4rl's "failed to import" lines) and their warnings."""
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@lru_cache(maxsize=1)
def _d4rl() -> Any:
    """Import ``d4rl`` quietly. Only its tables and score function are used; its own
    environments (which need ``mujoco-py``) fail to import, which d4rl tolerates.

    Raises:
        ConfigError: ``d4rl`` (or the ``gym<0.25`` it imports) is not installed.
    """
    os.environ.setdefault("D4RL_SUPPRESS_IMPORT_ERROR", "1")
    try:
        with quiet():
            import d4rl
            import d4rl.infos  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"the d4rl package is needed for D4RL tasks but cannot be imported ({exc}). Run `make venv`, which "
            "installs d4rl==1.1 with --no-deps and gym==0.23.1."
        ) from exc
    return d4rl


def dataset_urls() -> dict[str, str]:
    """D4RL dataset name -> download address (``d4rl.infos.DATASET_URLS``)."""
    return dict(_d4rl().infos.DATASET_URLS)


def is_d4rl_name(name: str) -> bool:
    """Whether ``name`` is a D4RL dataset name such as ``hopper-medium-v2``."""
    try:
        return str(name) in _d4rl().infos.DATASET_URLS
    except ConfigError:
        return False


# -- tasks ---------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def locomotion_names() -> tuple[str, ...]:
    """D4RL v2 locomotion dataset names of :data:`LOCOMOTION_ENVS`, sorted."""
    return tuple(sorted(n for n in dataset_urls()
                        if n.split("-", 1)[0] in LOCOMOTION_ENVS and n.endswith(D4RL_VERSION_SUFFIX)))


def list_task_ids() -> list[str]:
    """All ``d4rl/...`` task ids: maze2d first, then locomotion (empty locomotion list
    when ``d4rl`` is not installed)."""
    from fkpd.envs.maze import MAZES

    ids = [f"d4rl/maze2d-{m}" for m in MAZES]
    try:
        ids += [f"d4rl/{n}" for n in locomotion_names()]
    except ConfigError:
        pass
    return ids


def task_spec(name: str):
    """The :class:`fkpd.envs.TaskSpec` of ``d4rl/<name>``, or None when unknown.

    Locomotion specs record the D4RL dataset name (``d4rl_name``) whose reference
    returns normalise scores; maze specs record ``maze2d-<size>-v1``.
    """
    from fkpd.envs import TaskSpec
    from fkpd.envs.maze import MAZES

    if name.startswith("maze2d-") and name[len("maze2d-"):] in MAZES:
        m = MAZES[name[len("maze2d-"):]]
        return TaskSpec(task_id=f"d4rl/{name}", obs_dim=4, action_dim=2, max_episode_steps=m.horizon,
                        fps=CLIP_FPS, d4rl_name=m.d4rl_name, segment_length=m.horizon)
    env = name.split("-", 1)[0]
    if env in LOCOMOTION_ENVS and name in locomotion_names():
        _, do, da = LOCOMOTION_ENVS[env]
        return TaskSpec(task_id=f"d4rl/{name}", obs_dim=do, action_dim=da, max_episode_steps=LOCOMOTION_HORIZON,
                        fps=CLIP_FPS, d4rl_name=name)
    return None


def is_locomotion(task_id: str) -> bool:
    """Whether ``task_id`` is a ``d4rl/`` locomotion task (no data generator: its data
    is a D4RL or Minari dataset)."""
    family, _, name = str(task_id).partition("/")
    return family == "d4rl" and name.split("-", 1)[0] in LOCOMOTION_ENVS


def own_dataset(task_id: str) -> str:
    """The D4RL dataset a task trains on when no dataset is given: a locomotion task's own
    (``d4rl/hopper-medium-v2`` -> ``hopper-medium-v2``, looked up in D4RL's cache
    directory), since locomotion has no data generator; ``""`` for every other task,
    whose data is generated."""
    if not is_locomotion(task_id):
        return ""
    from fkpd.envs import get_task

    return str(get_task(task_id).d4rl_name)


# -- datasets ------------------------------------------------------------------------------
def cache_dir() -> Path:
    """D4RL's dataset directory: ``$D4RL_DATASET_DIR``, else ``~/.d4rl/datasets`` (read at
    call time, as D4RL's ``set_dataset_path`` default)."""
    return Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()


def dataset_file(name: str) -> Path:
    """Where D4RL keeps dataset ``name``: the cache directory joined with the file name
    of its download address (D4RL's ``offline_env.filepath_from_url``).

    Raises:
        DatasetError: ``name`` is not a D4RL dataset name.
    """
    urls = dataset_urls()
    if name not in urls:
        raise DatasetError(f"{name!r} is not a D4RL dataset name; e.g. hopper-medium-v2, maze2d-umaze-v1 "
                           "(d4rl.infos.DATASET_URLS lists them all)")
    return cache_dir() / os.path.basename(urls[name])


def resolve_dataset(source: str | os.PathLike[str]) -> Path | None:
    """The file behind a ``--dataset`` value that is not an existing path.

    Args:
        source: a D4RL dataset name (``hopper-medium-v2``) or a locomotion task id
            (``d4rl/hopper-medium-v2``).

    Returns:
        The file in D4RL's cache directory, or None when ``source`` is neither.

    Raises:
        DatasetError: it is a D4RL name but the file is not in the cache directory; the
            message gives the expected path and the address to fetch it from (nothing is
            downloaded).
    """
    name = str(source)
    if name.startswith("d4rl/") and is_locomotion(name):
        name = name[len("d4rl/"):]
    if "/" in name or os.sep in name or not is_d4rl_name(name):
        return None
    path = dataset_file(name)
    if not path.is_file():
        raise DatasetError(
            f"D4RL dataset {name!r} is not in D4RL's cache directory: expected {str(path)!r} (set "
            f"$D4RL_DATASET_DIR to look elsewhere). FKPD Studio never downloads; fetch "
            f"{dataset_urls()[name]} into that directory, or pass --dataset FILE."
        )
    return path


# -- scores --------------------------------------------------------------------------------
def normalized_score(name: str, returns: float | Sequence[float] | np.ndarray) -> np.ndarray | float:
    """D4RL normalised score on the 0-100 scale of the D4RL paper's tables.

    ``100 * d4rl.get_normalized_score(name, R)`` = ``100 (R - R_random) / (R_expert -
    R_random)`` with D4RL's reference returns of dataset ``name``.

    Args:
        name: D4RL dataset name (``hopper-medium-v2``, ``maze2d-umaze-v1``) or a
            ``d4rl/`` task id.
        returns: undiscounted episode return(s), raw environment reward units.

    Returns:
        A float for a scalar, else an array of the same shape.

    Raises:
        UnknownTaskError: no D4RL reference scores for ``name``.
    """
    d4rl = _d4rl()
    if str(name).startswith("d4rl/"):
        from fkpd.envs import get_task

        name = get_task(name).d4rl_name
    if name not in d4rl.infos.REF_MIN_SCORE or name not in d4rl.infos.REF_MAX_SCORE:
        raise UnknownTaskError(f"D4RL has no reference scores for {name!r}")
    r = np.asarray(returns, np.float64)
    out = 100.0 * np.vectorize(lambda x: d4rl.get_normalized_score(name, float(x)), otypes=[float])(r)
    return float(out) if out.ndim == 0 else out


def score_summary(task_id: str, returns: Sequence[float]) -> dict[str, Any]:
    """``{"d4rl_dataset", "d4rl_normalized_score", "d4rl_normalized_score_std"}`` (mean and
    standard deviation over episodes, 0-100 scale) for a ``d4rl/`` task; ``{}`` for any
    other task or no episodes."""
    if not str(task_id).startswith("d4rl/") or len(returns) == 0:
        return {}
    from fkpd.envs import get_task

    name = get_task(task_id).d4rl_name
    scores = np.atleast_1d(normalized_score(name, np.asarray(returns, np.float64)))
    return {"d4rl_dataset": name, "d4rl_normalized_score": float(scores.mean()),
            "d4rl_normalized_score_std": float(scores.std())}


# -- locomotion environments ---------------------------------------------------------------
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


def _plain_scene(mujoco_renderer, shadows: bool) -> None:
    if shadows:
        return
    import mujoco

    viewer = mujoco_renderer._get_viewer("rgb_array")
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


class LocomotionEnv(gym.Env):
    """A Gymnasium MuJoCo v5 locomotion env with FKPD Studio's guarantees.

    Observations ``(Do,) float64`` in the D4RL v2 layout (:func:`observation_from_state`);
    actions ``(Da,) float32`` in ``[-1, 1]`` (joint torques); reward is Gymnasium's v5
    reward (forward velocity + healthy bonus − control cost, as gym v3's that D4RL's
    reference returns were measured with). ``terminated`` when the robot becomes
    unhealthy (hopper, walker2d), ``truncated`` at ``max_episode_steps``.

    * ``reset(seed=s)`` reproduces the same initial state for the same ``s``;
    * ``info["success"]`` is always ``False``: locomotion has no success event; judge
      it by return and the D4RL normalised score (:func:`score_summary`);
    * ``render()`` returns an upright ``(H, W, 3) uint8`` frame from the tracking camera.

    Args:
        env: ``hopper``, ``walker2d`` or ``halfcheetah``.
        max_episode_steps: truncation horizon in steps (D4RL: 1000).
        render_size: ``(height, width)`` of frames in pixels.
        camera: MuJoCo camera name (default: the env's tracking camera).
        shadows: render shadows and reflections (slow in software rendering).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self, env: str, max_episode_steps: int = LOCOMOTION_HORIZON,
                 render_size: tuple[int, int] = (224, 224), camera: str | None = None,
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

    def render(self) -> np.ndarray:
        """An upright frame, ``(H, W, 3) uint8``."""
        if not self._render_ready:
            _plain_scene(self._env.mujoco_renderer, self._shadows)
            self._render_ready = True
        return np.ascontiguousarray(self._env.render())

    def close(self) -> None:
        self._env.close()
