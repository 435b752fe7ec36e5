"""Offline datasets in the D4RL HDF5 layout: the layout, writing, reading a file, validation.

Layout on disk (DESIGN.md §3; the layout ``d4rl``'s ``get_dataset`` returns), N steps in
total over all episodes, concatenated:

=========================  =================  ==========================================
key                        shape / dtype      meaning
=========================  =================  ==========================================
``observations``           (N, Do) float32    observation before the action
``actions``                (N, Da) float32    action taken, in ``[-1, 1]``
``rewards``                (N,) float32       reward for that step
``terminals``              (N,) bool          environment termination (MetaWorld: never)
``timeouts``               (N,) bool          True on the last step of each episode
``next_observations``      (N, Do) float32    observation after the action
``infos/success``          (N,) bool          MetaWorld ``info["success"]`` after the step
``infos/reset_seed``       (N,) int64         the episode's reset seed
``infos/behaviour``        (N,) int8          index into attr ``behaviours`` (generated data)
=========================  =================  ==========================================

Root attributes of generated files (:mod:`fkpd.data.generate`): ``task_id``, ``recipe``
(JSON of :class:`fkpd.data.DataRecipe`), ``behaviours`` (JSON list of behaviour names). An
episode ends where ``terminals`` or ``timeouts`` is set.

Real D4RL files read with the same code (:func:`read_hdf5`): ``rewards`` and ``terminals``
of shape (N, 1) are flattened as ``d4rl``'s ``get_dataset`` does, extra ``infos/*`` arrays
(``qpos``, ``qvel``, ``goal``, ...) are kept, and other groups (``metadata/*``) are
ignored. Which file, D4RL name or Minari dataset a ``--dataset`` value means is decided by
:func:`fkpd.data.sources.load_dataset`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from fkpd.envs import get_task
from fkpd.errors import DatasetError
from fkpd.io import atomic_path

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def write_dataset(out: Path | str, arrays: dict[str, np.ndarray], infos: dict[str, np.ndarray] | None = None,
                  attrs: dict[str, object] | None = None) -> Path:
    """Write a D4RL-layout HDF5 file atomically (temporary name, then rename).

    Args:
        out: the ``.hdf5`` path.
        arrays: top-level keys (``observations``, ``actions``, ``rewards``,
            ``terminals``, ``timeouts``, optionally ``next_observations``), each with N
            rows; they are gzip-compressed.
        infos: per-step extras, written as ``infos/<key>`` (N rows each).
        attrs: root attributes (strings or numbers).

    Returns:
        ``out``.
    """
    out = Path(out)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
            if k in arrays:
                f.create_dataset(k, data=arrays[k], compression="gzip", compression_opts=4)
        for k, v in (infos or {}).items():
            f.create_dataset(f"infos/{k}", data=v)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
    return out


@dataclass
class OfflineDataset:
    """A validated dataset in memory.

    Attributes:
        observations: (N, Do) float32.
        actions: (N, Da) float32.
        rewards: (N,) float32.
        episode_ends: (E,) int64, exclusive end index of each episode.
        infos: extra per-step arrays (``success``, ``reset_seed``, ...), each (N, ...).
        attrs: root attributes of the file.
        path: the file it was read from (None for Minari data or data built in memory).
        timeouts: (N,) bool, the ``timeouts`` flags as stored (None for data built in
            memory). They tell which rows ``d4rl.qlearning_dataset`` keeps (all but the
            ``timeouts`` rows and the last row): the rows that Preference Transformer's
            and Uni-RLHF's label indices count (:func:`fkpd.prefs.importers.d4rl_qlearning_rows`).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    episode_ends: np.ndarray
    infos: dict[str, np.ndarray]
    attrs: dict[str, object]
    path: Path | None = None
    timeouts: np.ndarray | None = None

    @property
    def episode_starts(self) -> np.ndarray:
        """(E,) int64, first index of each episode."""
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)

    def episodes(self) -> Iterator[slice]:
        """One ``slice`` of rows per episode, in order."""
        for s, e in zip(self.episode_starts, self.episode_ends):
            yield slice(int(s), int(e))

    @property
    def num_episodes(self) -> int:
        """E, the number of episodes."""
        return len(self.episode_ends)

    def episode_returns(self) -> np.ndarray:
        """(E,) float64, undiscounted return of each episode."""
        return np.array([self.rewards[s].sum() for s in self.episodes()], np.float64)

    def episode_success(self) -> np.ndarray | None:
        """(E,) bool, whether ``infos/success`` is set on any step of each episode; None
        without ``infos/success``."""
        if "success" not in self.infos:
            return None
        return np.array([bool(self.infos["success"][s].any()) for s in self.episodes()])


def _unreadable(path: Path, exc: Exception) -> str:
    """The message for an HDF5 file h5py cannot open; names the byte counts of a
    truncated file (HDF5 reports ``eof = A ... stored_eof = B``)."""
    m = re.search(r"eof = (\d+).*stored_eof = (\d+)", str(exc))
    if m:
        return (f"dataset {str(path)!r} is truncated: the file has {int(m.group(1))} bytes but its HDF5 header "
                f"says {int(m.group(2))}. The copy or download was cut short; regenerate or re-download it.")
    return (f"cannot read {str(path)!r} as HDF5 ({exc}). The file is truncated or not an HDF5 "
            "file; regenerate or re-download it.")


def _read_key(f: h5py.File, key: str, path: Path) -> np.ndarray:
    try:
        return f[key][()]
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise DatasetError(
            f"dataset {str(path)!r}: key `{key}` could not be read ({exc}); the file is probably truncated. "
            "Regenerate or re-download it.") from exc


def read_hdf5(path: Path, task_id: str | None = None) -> OfflineDataset:
    """Read and validate one D4RL-layout HDF5 file, as stored (no frame conversion).

    Args:
        path: an existing ``.hdf5`` file.
        task_id: when given, observation and action sizes must match this task.

    Returns:
        The :class:`OfflineDataset`.

    Raises:
        DatasetError: unreadable file (a truncated file says so, with its byte counts), a
            missing key, a key that cannot be read or is a group, and the checks of
            :func:`validate_arrays`.
    """
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DatasetError(_unreadable(path, exc)) from exc
    with f:
        missing = [k for k in REQUIRED_KEYS if k not in f]
        if missing:
            raise DatasetError(
                f"dataset {str(path)!r} is missing key(s) {missing}; the D4RL layout needs "
                f"{list(REQUIRED_KEYS)}. Re-export the dataset with these keys."
            )
        keys = list(REQUIRED_KEYS) + (["next_observations"] if "next_observations" in f else [])
        for k in keys:
            if not isinstance(f[k], h5py.Dataset):
                raise DatasetError(
                    f"dataset {str(path)!r}: key `{k}` is a group, not an array; the D4RL layout stores one "
                    "array per key (a Minari dataset is read with --dataset minari:DATASET_ID).")
        arrays = {k: _read_key(f, k, path) for k in keys}
        infos = {}
        if "infos" in f and isinstance(f["infos"], h5py.Group):
            for k, v in f["infos"].items():
                if isinstance(v, h5py.Dataset):
                    infos[k] = _read_key(f, f"infos/{k}", path)
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
    return validate_arrays(arrays, infos, attrs, where=f"dataset {str(path)!r}", task_id=task_id, path=path)


def validate_arrays(arrays: dict[str, np.ndarray], infos: dict[str, np.ndarray], attrs: dict[str, object],
                    where: str, task_id: str | None = None, path: Path | None = None) -> OfflineDataset:
    """Check arrays in the D4RL layout and build the :class:`OfflineDataset`.

    Args:
        arrays: ``observations`` (N, Do), ``actions`` (N, Da), ``rewards``,
            ``terminals``, ``timeouts`` (N,) or (N, 1), optional ``next_observations``
            (N, Do).
        infos: per-step extras, N rows each.
        attrs: metadata kept on the dataset.
        where: how messages name the source, e.g. ``dataset 'x.hdf5'``.
        task_id: when given, Do and Da must be the task's.
        path: recorded on the result.

    Raises:
        DatasetError: a wrong shape or mismatched lengths, wrong observation/action size for
            the task, NaN/inf values, or no steps. Every message names the key or dimension
            at fault and the fix.
        UnknownTaskError: ``task_id`` is not registered.
    """
    obs = np.asarray(arrays["observations"], np.float32)
    act = np.asarray(arrays["actions"], np.float32)
    if obs.ndim != 2 or act.ndim != 2:
        raise DatasetError(
            f"{where}: `observations` and `actions` must be 2-D (N, Do) and (N, Da), "
            f"got shapes {obs.shape} and {act.shape}."
        )
    n = len(obs)
    flat = {}
    for k in ("rewards", "terminals", "timeouts"):
        v = np.asarray(arrays[k])
        if v.ndim == 2 and v.shape[1] == 1:  # as d4rl's get_dataset
            v = v[:, 0]
        if v.ndim != 1:
            raise DatasetError(f"{where}: key `{k}` must hold one value per step, shape (N,), got shape {v.shape}.")
        flat[k] = v
    for k in ("actions", "rewards", "terminals", "timeouts"):
        rows = len(act) if k == "actions" else len(flat[k])
        if rows != n:
            raise DatasetError(
                f"{where}: key `{k}` has {rows} rows but `observations` has "
                f"{n}; every key must have one row per step."
            )
    nxt = arrays.get("next_observations")
    if nxt is not None and np.shape(nxt) != obs.shape:
        raise DatasetError(
            f"{where}: key `next_observations` has shape {np.shape(nxt)} but `observations` has {obs.shape}; "
            "they must match row for row.")
    for k, v in infos.items():
        if len(v) != n:
            raise DatasetError(
                f"{where}: key `infos/{k}` has {len(v)} rows but `observations` has {n}."
            )
    if task_id is not None:
        spec = get_task(task_id)
        if obs.shape[1] != spec.obs_dim:
            raise DatasetError(
                f"{where}: observation dimension is {obs.shape[1]} but task "
                f"{task_id} has Do={spec.obs_dim}. Use a dataset recorded on {task_id} or pass "
                "the task it was recorded on."
            )
        if act.shape[1] != spec.action_dim:
            raise DatasetError(
                f"{where}: action dimension is {act.shape[1]} but task {task_id} "
                f"has Da={spec.action_dim}. Use a dataset recorded on {task_id}."
            )
    checks = [("observations", obs), ("actions", act), ("rewards", flat["rewards"])]
    if nxt is not None:
        checks.append(("next_observations", np.asarray(nxt)))
    for k, v in checks:
        bad = ~np.isfinite(v)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise DatasetError(
                f"{where}: key `{k}` holds {int(bad.sum())} NaN/inf value(s), the first "
                f"at row {row}. Drop or repair those steps before training."
            )
    ends_mask = np.asarray(flat["terminals"], bool) | np.asarray(flat["timeouts"], bool)
    if n == 0:
        raise DatasetError(f"{where} has no steps.")
    ends_mask[-1] = True  # a trailing partial episode still counts
    episode_ends = np.flatnonzero(ends_mask).astype(np.int64) + 1
    return OfflineDataset(
        observations=obs, actions=act, rewards=np.asarray(flat["rewards"], np.float32),
        episode_ends=episode_ends, infos=infos, attrs=attrs, path=path,
        timeouts=np.asarray(flat["timeouts"], bool),
    )


def dataset_info(ds: OfflineDataset) -> dict[str, object]:
    """Summary statistics of a dataset (``fkpd data info``).

    Returns:
        ``episodes``, ``steps``, ``obs_dim``, ``action_dim``, ``episode_length``
        (min/mean/max steps), ``return`` (min/p25/median/p75/max of episode returns),
        ``return_mean``, ``task_id`` (attr, or None); ``success_rate`` when the data has
        ``infos/success``; ``behaviours`` (episodes, mean return and success rate of each)
        for generated data.
    """
    rets = ds.episode_returns()
    lengths = np.diff(np.concatenate([[0], ds.episode_ends]))
    info: dict[str, object] = {
        "episodes": ds.num_episodes,
        "steps": int(len(ds.actions)),
        "obs_dim": int(ds.observations.shape[1]),
        "action_dim": int(ds.actions.shape[1]),
        "episode_length": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())},
        "return": {q: float(v) for q, v in zip(
            ("min", "p25", "median", "p75", "max"), np.percentile(rets, [0, 25, 50, 75, 100]))},
        "return_mean": float(rets.mean()),
        "task_id": ds.attrs.get("task_id"),
    }
    succ = ds.episode_success()
    if succ is not None:
        info["success_rate"] = float(succ.mean())
    if "behaviour" in ds.infos and "behaviours" in ds.attrs:
        names = json.loads(str(ds.attrs["behaviours"]))
        per = {}
        starts = ds.episode_starts
        beh = ds.infos["behaviour"][starts]
        for i, name in enumerate(names):
            m = beh == i
            if m.any():
                per[name] = {"episodes": int(m.sum()), "return_mean": float(rets[m].mean())}
                if succ is not None:
                    per[name]["success_rate"] = float(succ[m].mean())
        info["behaviours"] = per
    return info
