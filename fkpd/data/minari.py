"""Minari datasets: read a locally present Minari dataset into the D4RL layout.

Minari (Farama Foundation, the maintained successor of D4RL's datasets) stores datasets
under ``$MINARI_DATASETS_PATH`` (default ``~/.minari/datasets``) by id, e.g.
``mujoco/hopper/medium-v0`` or ``D4RL/pointmaze/umaze-v2``. This module reads them through
the ``minari`` package (``minari.load_dataset(id, download=False)``: nothing is downloaded)
and turns their episodes into the arrays of :mod:`fkpd.data.hdf5`:

=====================  ===========================================================
D4RL layout            from each Minari episode of T steps
=====================  ===========================================================
``observations``       ``observations[:-1]`` (Minari keeps T + 1, the last included)
``next_observations``  ``observations[1:]``
``actions``            ``actions`` (T, Da)
``rewards``            ``rewards`` (T,)
``terminals``          ``terminations``
``timeouts``           ``truncations``; also set on the last step of an episode that
                       ends with neither (a collection cut short), so episode bounds
                       survive concatenation
``infos/<k>``          ``infos[k][1:]`` for array-valued infos with T + 1 rows (index 0
                       is the reset's info); ``infos/goal`` from a ``desired_goal``
=====================  ===========================================================

Dict observations (goal-conditioned envs such as Gymnasium-Robotics' PointMaze) use
their ``observation`` entry unless another key is named. On the command line a Minari
dataset is ``--dataset minari:DATASET_ID``; ``fkpd data import minari:DATASET_ID --out
FILE`` writes it as a D4RL-layout file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from fkpd.data.hdf5 import OfflineDataset, validate_arrays, write_dataset
from fkpd.errors import ConfigError, DatasetError

DEFAULT_OBS_KEY = "observation"


def datasets_root() -> Path:
    """Minari's local dataset directory: ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets``."""
    return Path(os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")).expanduser()


def _minari():
    try:
        import minari
    except ImportError as exc:
        raise ConfigError(f"the minari package is needed to read Minari datasets ({exc}); run `make venv`") from exc
    return minari


def _observations(obs: Any, obs_key: str | None, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(T+1, Do) observations and (T+1, 2) desired goals (or None) of one episode."""
    if isinstance(obs, dict):
        key = obs_key or DEFAULT_OBS_KEY
        if key not in obs:
            raise DatasetError(f"{where}: observations are a dict with keys {sorted(obs)}, without {key!r}; "
                               "name the one to use (obs_key)")
        goal = obs.get("desired_goal")
        return np.asarray(obs[key]), None if goal is None else np.asarray(goal)
    if obs_key:
        raise DatasetError(f"{where}: observations are a plain array, but obs_key={obs_key!r} was given")
    return np.asarray(obs), None


def minari_arrays(dataset, obs_key: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The D4RL-layout arrays of a loaded :class:`minari.MinariDataset` (see the module table).

    Returns:
        ``(arrays, infos)``: arrays ``observations`` (N, Do), ``next_observations``
        (N, Do), ``actions`` (N, Da), ``rewards``, ``terminals``, ``timeouts`` (N,);
        infos with N rows each.

    Raises:
        DatasetError: dict observations without the key, or an episode whose arrays
            disagree in length (the message names the episode and key).
    """
    where = f"Minari dataset {dataset.id!r}"
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in ("observations", "next_observations", "actions", "rewards",
                                                           "terminals", "timeouts")}
    info_chunks: dict[str, list[np.ndarray]] = {}
    n_eps = 0
    for ep in dataset.iterate_episodes():
        obs, goal = _observations(ep.observations, obs_key, where)
        t = len(ep.actions)
        for k, v in (("observations", obs), ("rewards", ep.rewards), ("terminations", ep.terminations),
                     ("truncations", ep.truncations)):
            want = t + 1 if k == "observations" else t
            if len(v) != want:
                raise DatasetError(f"{where}, episode {ep.id}: `{k}` has {len(v)} rows for {t} actions "
                                   f"(expected {want})")
        term = np.asarray(ep.terminations, bool)
        trunc = np.asarray(ep.truncations, bool).copy()
        if t and not (term[-1] or trunc[-1]):
            trunc[-1] = True
        chunks["observations"].append(obs[:-1])
        chunks["next_observations"].append(obs[1:])
        chunks["actions"].append(np.asarray(ep.actions).reshape(t, -1))
        chunks["rewards"].append(np.asarray(ep.rewards, np.float32))
        chunks["terminals"].append(term)
        chunks["timeouts"].append(trunc)
        infos = {k: np.asarray(v)[1:] for k, v in (ep.infos or {}).items()
                 if not isinstance(v, dict) and np.ndim(v) >= 1 and len(v) == t + 1}
        if goal is not None and len(goal) == t + 1:
            infos["goal"] = goal[:-1]
        if n_eps and set(infos) != set(info_chunks):  # keep only infos every episode has
            infos = {k: v for k, v in infos.items() if k in info_chunks}
            info_chunks = {k: v for k, v in info_chunks.items() if k in infos}
        for k, v in infos.items():
            info_chunks.setdefault(k, []).append(v)
        n_eps += 1
    if n_eps == 0:
        raise DatasetError(f"{where} has no episodes")
    arrays = {k: np.concatenate(v) for k, v in chunks.items()}
    return arrays, {k: np.concatenate(v) for k, v in info_chunks.items()}


def open_minari(dataset_id: str):
    """``minari.load_dataset(dataset_id)`` of a locally present dataset (never downloads).

    Raises:
        DatasetError: the dataset is not present locally; the message lists those that are.
    """
    minari = _minari()
    try:
        return minari.load_dataset(dataset_id, download=False)
    except Exception as exc:  # noqa: BLE001 - minari raises several types for a missing or bad dataset
        try:
            local = sorted(minari.list_local_datasets())
        except Exception:  # noqa: BLE001
            local = []
        raise DatasetError(
            f"Minari dataset {dataset_id!r} cannot be read from {str(datasets_root())!r} ({type(exc).__name__}: "
            f"{exc}). Locally present: {local or 'none'}. FKPD Studio never downloads; put the dataset there "
            "(`minari download ID` on a machine with access) or set $MINARI_DATASETS_PATH."
        ) from exc


def _read(dataset_id: str, task_id: str | None, obs_key: str | None):
    """``(arrays, infos, attrs, validated OfflineDataset)`` of a local Minari dataset."""
    ds = open_minari(dataset_id)
    arrays, infos = minari_arrays(ds, obs_key)
    attrs: dict[str, object] = {"source": "minari", "dataset_id": dataset_id,
                                "minari_version": str(getattr(ds, "minari_version", ""))}
    env_spec = getattr(ds.spec, "env_spec", None)
    if env_spec is not None:
        attrs["env_id"] = env_spec.id
    if task_id:
        attrs["task_id"] = task_id
    offline = validate_arrays(arrays, infos, attrs, where=f"Minari dataset {dataset_id!r}", task_id=task_id)
    return arrays, infos, attrs, offline


def load_minari(dataset_id: str, task_id: str | None = None, obs_key: str | None = None) -> OfflineDataset:
    """Read a locally present Minari dataset as a validated :class:`fkpd.data.OfflineDataset`.

    Args:
        dataset_id: Minari id, e.g. ``mujoco/hopper/medium-v0``.
        task_id: when given, Do and Da must be the task's.
        obs_key: entry of dict observations to use (default ``observation``).

    Raises:
        DatasetError: not present locally, malformed episodes, or the checks of
            :func:`fkpd.data.validate_arrays` (wrong sizes for the task, NaN/inf, ...).
    """
    return _read(dataset_id, task_id, obs_key)[3]


def import_minari(dataset_id: str, out: Path | str, task_id: str | None = None, obs_key: str | None = None) -> Path:
    """Write a locally present Minari dataset as a D4RL-layout HDF5 file, validated first
    (root attributes ``source``, ``dataset_id``, ``env_id``, ``task_id`` when given).

    Returns:
        ``out``.

    Raises:
        DatasetError: see :func:`load_minari`.
    """
    arrays, infos, attrs, _ = _read(dataset_id, task_id, obs_key)
    return write_dataset(out, arrays, infos, attrs)
