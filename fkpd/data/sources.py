"""Where a dataset comes from: what a ``--dataset`` value names, and reading it.

A ``--dataset`` value is one of

* an existing D4RL-layout HDF5 file (:func:`fkpd.data.hdf5.read_hdf5`);
* ``minari:DATASET_ID``, a locally present Minari dataset (:func:`fkpd.data.minari.load_minari`);
* a D4RL dataset name (``hopper-medium-v2``), or a task id whose own dataset is one,
  looked up in D4RL's cache directory (:func:`fkpd.data.d4rl.resolve_dataset`).

For a maze2d task, a file FKPD Studio did not write is an original D4RL maze2d file and is
mapped to PointMaze's frame (:func:`fkpd.data.d4rl.convert_d4rl_dataset`).
"""

from __future__ import annotations

from pathlib import Path

from fkpd.data.d4rl import convert_d4rl_dataset, resolve_dataset
from fkpd.data.hdf5 import OfflineDataset, read_hdf5
from fkpd.data.minari import load_minari
from fkpd.envs import find_task, get_task
from fkpd.envs.d4rl import is_d4rl_name
from fkpd.envs.maze import maze_of
from fkpd.errors import ConfigError, DatasetError

#: The prefix of a Minari dataset id on the command line.
MINARI_PREFIX = "minari:"


def names_a_dataset(source: Path | str) -> bool:
    """Whether :func:`load_dataset` has something to look up for ``source``: an existing
    file, ``minari:DATASET_ID``, or a D4RL dataset name (whose file it then looks for in
    D4RL's cache directory)."""
    text = str(source)
    return Path(source).exists() or text.startswith(MINARI_PREFIX) or is_d4rl_name(text)


def _written_here(attrs: dict[str, object]) -> bool:
    """Whether a maze2d file was written by FKPD Studio (its ``task_id`` attribute names a
    maze2d task) or converted from Minari, and so is in PointMaze's frame already."""
    if attrs.get("source") == "minari":
        return True
    try:
        spec = find_task(str(attrs.get("task_id", "")))
    except ConfigError:
        return False
    return spec is not None and spec.is_maze


def load_dataset(path: Path | str, task_id: str | None = None) -> OfflineDataset:
    """Read and validate a D4RL-layout dataset (the layout ``d4rl``'s ``get_dataset`` returns).

    Args:
        path: the ``.hdf5`` file; or, when no such file exists, a D4RL dataset name
            (``hopper-medium-v2``) looked up in D4RL's cache directory
            (:func:`fkpd.data.d4rl.resolve_dataset`); or ``minari:DATASET_ID``, a locally
            present Minari dataset (:func:`fkpd.data.minari.load_minari`).
        task_id: when given, observation and action sizes must match this task. For a
            ``d4rl/maze2d-*`` task, a file that FKPD Studio did not write (no maze2d
            ``task_id`` attribute, not from Minari) is an original D4RL maze2d file and
            is mapped to PointMaze's frame (:func:`fkpd.data.d4rl.convert_d4rl_dataset`).

    Returns:
        The :class:`~fkpd.data.OfflineDataset`.

    Raises:
        DatasetError: missing or unreadable file (a truncated file says so, with its
            byte counts), a missing key, a key that cannot be read, mismatched lengths,
            wrong observation/action size for the task, NaN/inf values, or no steps.
            Every message names the key or dimension at fault and the fix.
        UnknownTaskError: ``task_id`` is not registered.
    """
    source = str(path)
    if source.startswith(MINARI_PREFIX):
        return load_minari(source[len(MINARI_PREFIX):], task_id=task_id)
    path = Path(path)
    if not path.exists():
        resolved = resolve_dataset(source)
        if resolved is None:
            raise DatasetError(
                f"dataset file {str(path)!r} does not exist. Generate one with "
                f"`fkpd data generate --task TASK --episodes N --out {path}` or pass the right path."
            )
        path = resolved
    ds = read_hdf5(path, task_id=task_id)
    if task_id is not None:
        spec = get_task(task_id)
        if spec.is_maze and not _written_here(ds.attrs):
            # An original D4RL maze2d file: D4RL's frame, not PointMaze's (see fkpd.data.d4rl).
            ds = convert_d4rl_dataset(ds, maze_of(spec).size)
    return ds
