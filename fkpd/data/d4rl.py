"""D4RL's files: the cache directory, a dataset name's file, and D4RL's maze2d frame.

A dataset is found by file (``--dataset FILE``) or by D4RL dataset name (``--dataset
hopper-medium-v2``), which :func:`resolve_dataset` looks up in D4RL's cache directory:
``$D4RL_DATASET_DIR``, else ``~/.d4rl/datasets``, under the file name of its download
address (D4RL's ``filepath_from_url``; names and addresses from
:mod:`fkpd.envs.d4rl`). Nothing here downloads anything.

Original D4RL maze2d files are in D4RL's frame, where ``qpos = (x, y)`` is in cell units
with ``x`` along rows and ``y`` along columns and, a quirk of D4RL's model (the ball's
body sits at (1.2, 1.2), the walls at (i + 1, j + 1)), the ball is physically 0.2 m past
``qpos`` along both. :func:`from_d4rl_frame` maps their states and actions to
Gymnasium-Robotics' PointMaze frame of :mod:`fkpd.envs.maze` with the same physics
(checked against D4RL's own model in ``tests/test_maze.py``), and
:func:`fkpd.data.load_dataset` applies it (:func:`convert_d4rl_dataset`) to a maze2d file
that FKPD Studio did not write.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from fkpd.data.hdf5 import OfflineDataset
from fkpd.envs import find_task
from fkpd.envs.d4rl import dataset_urls, is_d4rl_name
from fkpd.envs.maze import D4RL_BALL_OFFSET, maze_map
from fkpd.errors import DatasetError


def cache_dir() -> Path:
    """D4RL's dataset directory: ``$D4RL_DATASET_DIR``, else ``~/.d4rl/datasets`` (read at
    call time, as D4RL's ``set_dataset_path`` default)."""
    return Path(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets")).expanduser()


def dataset_file(name: str) -> Path:
    """Where D4RL keeps dataset ``name``: the cache directory joined with the file name
    of its download address (D4RL's ``offline_env.filepath_from_url``).

    Raises:
        DatasetError: ``name`` is not a D4RL dataset name.
        ConfigError: ``d4rl`` is not installed.
    """
    urls = dataset_urls()
    if name not in urls:
        raise DatasetError(f"{name!r} is not a D4RL dataset name; e.g. hopper-medium-v2, maze2d-umaze-v1 "
                           "(d4rl.infos.DATASET_URLS lists them all)")
    return cache_dir() / os.path.basename(urls[name])


def resolve_dataset(source: str | os.PathLike[str]) -> Path | None:
    """The file behind a ``--dataset`` value that is not an existing path.

    Args:
        source: a D4RL dataset name (``hopper-medium-v2``) or a task id whose own dataset
            is one (a locomotion task, ``d4rl/hopper-medium-v2``:
            :attr:`fkpd.envs.TaskSpec.own_dataset`).

    Returns:
        The file in D4RL's cache directory, or None when ``source`` is neither.

    Raises:
        DatasetError: it is a D4RL name but the file is not in the cache directory; the
            message gives the expected path and the address to fetch it from (nothing is
            downloaded).
    """
    name = str(source)
    spec = find_task(name) if "/" in name else None
    if spec is not None and spec.own_dataset:
        name = spec.own_dataset
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


def from_d4rl_frame(size: str, observations: np.ndarray | None = None, actions: np.ndarray | None = None,
                    positions: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Map D4RL maze2d arrays to PointMaze's centred frame (same physical states).

    Args:
        size: ``umaze``, ``medium`` or ``large`` (sets the maze's rows L and columns W).
        observations: (N, 4) D4RL ``(qpos_x, qpos_y, qvel_x, qvel_y)``.
        actions: (N, 2) D4RL forces along its ``x`` (rows) and ``y`` (columns).
        positions: (N, 2) D4RL positions alone (``infos/goal``, ``infos/qpos``).

    Returns:
        The given arrays, converted, under the same names: positions
        ``x' = y + 0.2 + 0.5 − W/2``, ``y' = L/2 − 0.5 − (x + 0.2)``, velocities and
        forces ``(v_y, −v_x)``.
    """
    grid = maze_map(size)
    rows, cols = len(grid), len(grid[0])

    def pos(p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, np.float64)
        return np.stack([p[..., 1] + D4RL_BALL_OFFSET + 0.5 - cols / 2.0,
                         rows / 2.0 - 0.5 - (p[..., 0] + D4RL_BALL_OFFSET)], axis=-1)

    def vec(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, np.float64)
        return np.stack([v[..., 1], -v[..., 0]], axis=-1)

    out: dict[str, np.ndarray] = {}
    if observations is not None:
        o = np.asarray(observations)
        out["observations"] = np.concatenate([pos(o[..., :2]), vec(o[..., 2:4])], axis=-1).astype(o.dtype)
    if actions is not None:
        out["actions"] = vec(actions).astype(np.asarray(actions).dtype)
    if positions is not None:
        out["positions"] = pos(positions).astype(np.asarray(positions).dtype)
    return out


def convert_d4rl_dataset(ds: OfflineDataset, size: str) -> OfflineDataset:
    """An :class:`~fkpd.data.OfflineDataset` read from an original D4RL maze2d file, in
    PointMaze's centred frame (:func:`from_d4rl_frame`); ``infos/goal`` and
    ``infos/qpos``/``infos/qvel`` are converted too, and attr ``frame`` records it.

    Args:
        ds: the dataset as stored.
        size: ``umaze``, ``medium`` or ``large``.
    """
    conv = from_d4rl_frame(size, ds.observations, ds.actions)
    infos = dict(ds.infos)
    for k in ("goal", "qpos"):
        if k in infos and np.shape(infos[k])[-1:] == (2,):
            infos[k] = from_d4rl_frame(size, positions=infos[k])["positions"]
    if "qvel" in infos and np.shape(infos["qvel"])[-1:] == (2,):
        infos["qvel"] = from_d4rl_frame(size, actions=infos["qvel"])["actions"]
    attrs = {**ds.attrs, "frame": "converted from D4RL maze2d to PointMaze (fkpd.data.d4rl.from_d4rl_frame)"}
    return dataclasses.replace(ds, observations=conv["observations"], actions=conv["actions"], infos=infos,
                               attrs=attrs)
