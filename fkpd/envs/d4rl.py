"""D4RL's own metadata: dataset names, download addresses, reference returns, normalised scores.

D4RL (Fu, Kumar, Nachum, Tucker & Levine, "D4RL: Datasets for Deep Data-Driven
Reinforcement Learning", arXiv 2004.07219) ships its datasets as HDF5 files in the layout
:func:`fkpd.data.load_dataset` reads. This module takes everything that is D4RL's own from
the installed ``d4rl`` package (1.1) rather than copying it: the dataset names and download
addresses (``d4rl.infos.DATASET_URLS``), the reference returns of the normalised score
(``d4rl.infos.REF_MIN_SCORE`` / ``REF_MAX_SCORE``) and the score itself
(``d4rl.get_normalized_score``). ``d4rl`` is installed with ``--no-deps`` next to the old
``gym<0.25`` it imports; its own environments need ``mujoco-py`` and are never used.
Nothing here downloads anything.

The D4RL task families live in :mod:`fkpd.envs.maze` (``d4rl/maze2d-<size>`` on
Gymnasium-Robotics' PointMaze, scored against ``maze2d-<size>-v1``) and
:mod:`fkpd.envs.locomotion` (``d4rl/<env>-<dataset>-v2``); the files of D4RL's cache
directory are found by :mod:`fkpd.data.d4rl`. A task's score is
:meth:`fkpd.envs.TaskSpec.score_summary`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from fkpd.envs._mujoco import quiet
from fkpd.errors import ConfigError, UnknownTaskError

#: The version suffix of the D4RL locomotion datasets FKPD Studio registers as tasks.
D4RL_VERSION_SUFFIX = "-v2"


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
    """D4RL dataset name -> download address (``d4rl.infos.DATASET_URLS``).

    Raises:
        ConfigError: ``d4rl`` is not installed.
    """
    return dict(_d4rl().infos.DATASET_URLS)


def is_d4rl_name(name: str) -> bool:
    """Whether ``name`` is a D4RL dataset name such as ``hopper-medium-v2`` (False when
    ``d4rl`` is not installed)."""
    try:
        return str(name) in _d4rl().infos.DATASET_URLS
    except ConfigError:
        return False


def normalized_score(name: str, returns: float | Sequence[float] | np.ndarray) -> np.ndarray | float:
    """D4RL normalised score on the 0-100 scale of the D4RL paper's tables.

    ``100 * d4rl.get_normalized_score(name, R)`` = ``100 (R - R_random) / (R_expert -
    R_random)`` with D4RL's reference returns of dataset ``name``. For a task, use
    :meth:`fkpd.envs.TaskSpec.normalized_score`.

    Args:
        name: D4RL dataset name (``hopper-medium-v2``, ``maze2d-umaze-v1``).
        returns: undiscounted episode return(s), raw environment reward units.

    Returns:
        A float for a scalar, else an array of the same shape.

    Raises:
        UnknownTaskError: no D4RL reference scores for ``name``.
        ConfigError: ``d4rl`` is not installed.
    """
    d4rl = _d4rl()
    if name not in d4rl.infos.REF_MIN_SCORE or name not in d4rl.infos.REF_MAX_SCORE:
        raise UnknownTaskError(f"D4RL has no reference scores for {name!r}")
    r = np.asarray(returns, np.float64)
    out = 100.0 * np.vectorize(lambda x: d4rl.get_normalized_score(name, float(x)), otypes=[float])(r)
    return float(out) if out.ndim == 0 else out
