"""Export comparisons with their segment arrays; import Preference-Transformer labels.

Export layouts (``export_comparisons``; read either back with :func:`load_export`)
-------------------------------------------------------------------------------

Both hold every comparison of the project (skips included), one record per answer, with
the columns of :meth:`fkpd.store.Store.comparisons_frame`: ``comparison_id, pair_id,
round, policy_version_id, annotator_id, annotator, outcome, p_left`` (1.0 left preferred,
0.0 right, 0.5 equal, missing for skip), ``shown_at, answered_at, left_clip_id,
right_clip_id, left_seed, right_seed``. Ground truth is not exported. Segment arrays come
from the clips' ``.npz`` files (their sha256 is checked): ``observations (L, Do)``,
``actions (L, Da)``, ``rewards (L,)``, float32.

**Parquet** (``fmt="parquet"``): one table, one row per comparison. Timestamps are
``timestamp[us, UTC]``; seeds are nullable int64. The segments are embedded per row as
``left_observations``/``right_observations`` and ``left_actions``/``right_actions``
(``list<list<float32>>``, L rows of Do / Da values) and ``left_rewards``/``right_rewards``
(``list<float32>``). Schema metadata: ``fkpd_format=comparisons``, ``fkpd_version=1``,
``project``, ``task_id``, ``exported_at``.

**HDF5** (``fmt="hdf5"``)::

    /                       attrs: fkpd_format="comparisons", fkpd_version=1, project,
                                   task_id, exported_at (ISO 8601 UTC)
    /comparisons/<column>   (N,) one dataset per column above. Integers int64;
                            p_left float64 (NaN = skip); annotator, outcome UTF-8 strings;
                            shown_at, answered_at float64 POSIX seconds UTC (NaN = unknown);
                            group attr ``columns`` keeps the column order;
                            left_seed, right_seed int64 (-1 = no seed).
    /segments/<clip_id>/    observations (L, Do), actions (L, Da), rewards (L,) float32;
                            attrs: policy_version_id, length, segment_sha256, reset_seed
                            (-1 = none). Each clip is stored once, however many
                            comparisons use it.

Import of Preference Transformer / Uni-RLHF labels (``import_pt_labels``)
-----------------------------------------------------------------------

Those projects label pairs of fixed-length segments cut from a D4RL dataset. A query
``i`` compares the segments starting at ``start_indices[i]`` and ``start_indices_2[i]``,
both of length L; its human label is ``0`` (first segment preferred → ``left``), ``1``
(second → ``right``) or ``-1`` (equally preferable → ``equal``), as in Preference
Transformer's ``load_queries_with_indices``. One-hot label rows ``[1, 0]``, ``[0, 1]``,
``[0.5, 0.5]`` are accepted too.

**What the indices count.** Both projects cut segments from ``d4rl.qlearning_dataset(env)``
(PT's ``JaxPref/replay_buffer.get_d4rl_dataset``, Uni-RLHF's
``rlhf/train_reward_model.get_d4rl_dataset``), which leaves out the last row and every
row whose ``timeouts`` flag is set. So index ``j`` is row ``d4rl_qlearning_rows(timeouts)[j]``
of the file, not row ``j``: on ``hopper-medium-expert-v2`` the two drift apart by one row
per timed-out episode. That is the default (``index_space="qlearning"``);
``index_space="rows"`` takes indices as rows of the file.

**The dataset** is the user's own copy of the D4RL file the labels were made on, given as a
file, as a D4RL dataset name looked up in D4RL's cache directory
(``$D4RL_DATASET_DIR``, else ``~/.d4rl/datasets``; :func:`fkpd.envs.d4rl.resolve_dataset`), or
as ``minari:ID``; it is read with :func:`fkpd.data.load_dataset`, so a project whose task
is registered (``d4rl/hopper-medium-v2``) gets its Do/Da checked and, on ``d4rl/maze2d-*``,
segments in PointMaze's frame. Nothing is downloaded.

**Accepted label files:**

* Preference Transformer's folder ``human_label/<D4RL dataset>/``: ``label_human``
  (a pickled list or array of labels), ``indices_num<N>[_q<L>]`` and
  ``indices_2_num<N>[_q<L>]`` (pickled int arrays). Pass the folder, or ``label_human``
  with ``indices_file``/``indices_2_file``. The D4RL locomotion folders carry no
  ``_q<L>``: PT's README trains on them with ``--query_len 100`` and its video scripts
  render 100-step queries, so pass ``segment_length=100``.
* Uni-RLHF's folder ``<D4RL dataset>_human_labels/`` (crowd-sourced labels of
  Clean-Offline-RLHF): ``human_label_<suffix>.pkl``, ``indices_1_<suffix>.pkl``,
  ``indices_2_<suffix>.pkl`` with ``<suffix>`` =
  ``domain_<d>_env_<dataset>_num_<N>_len_<L>_<id>`` (L read from ``_len_<L>``).
* one ``.npz`` / ``.h5`` / pickled dict holding ``start_indices`` (or ``indices`` /
  ``indices_1``), ``start_indices_2`` (or ``indices_2``) and ``human_label`` (or
  ``labels`` / ``label``).

Those projects store their files with :mod:`pickle`; pickles are read with an unpickler
that only rebuilds numpy arrays, lists, tuples, dicts and numbers, so a malicious file
cannot run code.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fkpd.store import models as m
from fkpd.store.artifacts import SEGMENT_KEYS, ArtifactDir
from fkpd.store.errors import AlreadyExistsError, ImportFormatError, StoreInputError
from fkpd.store.outcomes import Outcome
from fkpd.store.views import ClipRecord

if TYPE_CHECKING:
    import pandas as pd

    from fkpd.store.store import Store

FORMAT_NAME = "comparisons"
FORMAT_VERSION = 1
_SIDES = ("left", "right")
_MISSING_SEED = -1

# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportedComparisons:
    """An export read back by :func:`load_export`.

    Attributes:
        frame: one row per comparison (columns as in the module docstring).
        segments: ``{clip_id: {"observations": (L, Do), "actions": (L, Da),
            "rewards": (L,)}}`` for every clip used by a comparison.
        meta: file-level metadata (project, task_id, exported_at, format version).
    """

    frame: "pd.DataFrame"
    segments: dict[int, dict[str, np.ndarray]]
    meta: dict[str, Any]


def export_comparisons(
    store: "Store",
    project: Any,
    fmt: Literal["parquet", "hdf5"],
    out_path: str | os.PathLike[str],
    *,
    round: int | None = None,
) -> Path:
    """Write every comparison of ``project`` (optionally of one round) with its segments.

    The file is written atomically (temporary file, then rename).

    Args:
        fmt: ``"parquet"`` (needs pyarrow) or ``"hdf5"``; layouts in the module docstring.
        out_path: destination file; parent folders are created.

    Returns:
        The absolute path written.

    Raises:
        StoreInputError: unknown ``fmt``.
        NotFoundError: unknown project.
        ArtifactIntegrityError: a segment file is missing or its sha256 changed.
    """
    if fmt not in ("parquet", "hdf5"):
        raise StoreInputError(f"unknown export format {fmt!r}; use 'parquet' or 'hdf5'")
    info = store.get_project(project)
    frame = store.comparisons_frame(info.id, round=round)
    clip_ids = sorted(set(frame["left_clip_id"]).union(frame["right_clip_id"]))
    clips = {int(c): store.get_clip(int(c)) for c in clip_ids}
    segments = {clip_id: _segment_arrays(store, clip) for clip_id, clip in clips.items()}
    meta = {
        "fkpd_format": FORMAT_NAME,
        "fkpd_version": FORMAT_VERSION,
        "project": info.name,
        "task_id": info.task_id,
        "exported_at": store.now().isoformat(),
    }
    out = Path(out_path).expanduser().resolve()
    writer = _write_parquet if fmt == "parquet" else _write_hdf5
    ArtifactDir(out.parent).write_atomic(
        out.name, lambda tmp: writer(tmp, frame, segments, clips, meta), to_path=True
    )
    return out


def _segment_arrays(store: "Store", clip: ClipRecord) -> dict[str, np.ndarray]:
    arrays = store.artifacts.load_segment(clip.segment_path, clip.segment_sha256)
    return {key: np.asarray(arrays[key], dtype=np.float32) for key in SEGMENT_KEYS}


def _write_parquet(
    path: Path,
    frame: "pd.DataFrame",
    segments: dict[int, dict[str, np.ndarray]],
    clips: dict[int, ClipRecord],
    meta: dict[str, Any],
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    for side in _SIDES:
        clips = [segments[int(c)] for c in frame[f"{side}_clip_id"]]
        for key in SEGMENT_KEYS:
            column = _list_array([c[key] for c in clips], ndim=1 if key == "rewards" else 2)
            table = table.append_column(f"{side}_{key}", column)
    schema_meta = dict(table.schema.metadata or {})
    schema_meta.update({k.encode(): str(v).encode() for k, v in meta.items()})
    pq.write_table(table.replace_schema_metadata(schema_meta), path)


def _list_array(arrays: list[np.ndarray], ndim: int) -> Any:
    """Arrow ``list<float32>`` (``ndim=1``) or ``list<list<float32>>`` (``ndim=2``)."""
    import pyarrow as pa

    outer = np.zeros(len(arrays) + 1, dtype=np.int32)
    outer[1:] = np.cumsum([len(a) for a in arrays])
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
    values = pa.array(flat.astype(np.float32), type=pa.float32())
    if ndim == 1:
        return pa.ListArray.from_arrays(pa.array(outer), values)
    row_sizes = [np.full(len(a), a.shape[1], dtype=np.int64) for a in arrays]
    inner_offsets = np.zeros(sum(len(r) for r in row_sizes) + 1, dtype=np.int32)
    if row_sizes:
        inner_offsets[1:] = np.cumsum(np.concatenate(row_sizes))
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets), values)
    return pa.ListArray.from_arrays(pa.array(outer), inner)


def _write_hdf5(
    path: Path,
    frame: "pd.DataFrame",
    segments: dict[int, dict[str, np.ndarray]],
    clips: dict[int, ClipRecord],
    meta: dict[str, Any],
) -> None:
    import h5py

    strings = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs.update(meta)
        group = f.create_group("comparisons")
        group.attrs["columns"] = list(frame.columns)
        for column in frame.columns:
            values = frame[column]
            if column in ("shown_at", "answered_at"):
                data = _posix_seconds(values)
            elif column in ("annotator", "outcome"):
                data = np.array([str(v) for v in values], dtype=object)
                group.create_dataset(column, data=data, dtype=strings)
                continue
            elif column == "p_left":
                data = values.to_numpy(dtype=np.float64, na_value=np.nan)
            elif column in ("left_seed", "right_seed"):
                data = values.to_numpy(dtype=np.int64, na_value=_MISSING_SEED)
            else:
                data = values.to_numpy(dtype=np.int64)
            group.create_dataset(column, data=data)
        seg_group = f.create_group("segments")
        for clip_id, arrays in segments.items():
            g = seg_group.create_group(str(clip_id))
            for key in SEGMENT_KEYS:
                g.create_dataset(key, data=arrays[key])
            clip = clips[clip_id]
            g.attrs["policy_version_id"] = clip.policy_version_id
            g.attrs["reset_seed"] = _MISSING_SEED if clip.reset_seed is None else clip.reset_seed
            g.attrs["length"] = clip.length
            g.attrs["segment_sha256"] = clip.segment_sha256


def _posix_seconds(values: "pd.Series") -> np.ndarray:
    import pandas as pd

    stamps = pd.to_datetime(values, utc=True)
    seconds = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return seconds.to_numpy(dtype=np.float64, na_value=np.nan)


def load_export(path: str | os.PathLike[str]) -> ExportedComparisons:
    """Read a file written by :func:`export_comparisons` (format from the extension:
    ``.parquet``/``.pq`` or ``.h5``/``.hdf5``).

    Raises:
        ImportFormatError: unknown extension or not an FKPD comparisons export.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _read_parquet(path)
    if suffix in (".h5", ".hdf5"):
        return _read_hdf5(path)
    raise ImportFormatError(f"cannot tell the format of {path}; name it *.parquet or *.h5")


def _read_parquet(path: Path) -> ExportedComparisons:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    raw_meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if raw_meta.get("fkpd_format") != FORMAT_NAME:
        raise ImportFormatError(f"{path} is not an FKPD comparisons export (no fkpd_format metadata)")
    meta = {k: v for k, v in raw_meta.items() if not k.startswith("pandas")}
    meta["fkpd_version"] = int(meta["fkpd_version"])
    array_columns = [f"{side}_{key}" for side in _SIDES for key in SEGMENT_KEYS]
    frame = table.drop_columns(array_columns).to_pandas()
    segments: dict[int, dict[str, np.ndarray]] = {}
    for side in _SIDES:
        rows = {key: _rows_from_list_array(table.column(f"{side}_{key}")) for key in SEGMENT_KEYS}
        for i, clip_id in enumerate(frame[f"{side}_clip_id"]):
            segments.setdefault(int(clip_id), {key: rows[key][i] for key in SEGMENT_KEYS})
    return ExportedComparisons(frame, segments, meta)


def _rows_from_list_array(column: Any) -> list[np.ndarray]:
    """Inverse of :func:`_list_array` for a (chunked) Arrow list column."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    outer = array.offsets.to_numpy()
    outer = outer - outer[0]
    child = array.flatten()
    if pa.types.is_list(child.type):
        inner = child.offsets.to_numpy()
        inner = inner - inner[0]
        values = child.flatten().to_numpy(zero_copy_only=False)
        return [
            values[inner[a] : inner[b]].reshape(b - a, -1) if b > a else np.zeros((0, 0), np.float32)
            for a, b in zip(outer[:-1], outer[1:])
        ]
    values = child.to_numpy(zero_copy_only=False)
    return [values[a:b] for a, b in zip(outer[:-1], outer[1:])]


def _read_hdf5(path: Path) -> ExportedComparisons:
    import h5py
    import pandas as pd

    with h5py.File(path, "r") as f:
        meta = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        if meta.get("fkpd_format") != FORMAT_NAME:
            raise ImportFormatError(f"{path} is not an FKPD comparisons export (no fkpd_format attribute)")
        meta["fkpd_version"] = int(meta["fkpd_version"])
        columns = {}
        for name, dataset in f["comparisons"].items():
            data = dataset[()]
            if name in ("annotator", "outcome"):
                data = dataset.asstr()[()]
            columns[name] = data
        segments = {
            int(clip_id): {key: g[key][()] for key in SEGMENT_KEYS} for clip_id, g in f["segments"].items()
        }
        order = [str(c) for c in f["comparisons"].attrs.get("columns", sorted(columns))]
    frame = pd.DataFrame({name: columns[name] for name in order})
    for name in ("shown_at", "answered_at"):
        if name in frame:  # float seconds carry ~0.1 µs noise; stored values are whole µs
            micros = np.round(frame[name].to_numpy(dtype=np.float64) * 1e6)
            frame[name] = pd.to_datetime(micros, unit="us", utc=True)
    for name in ("left_seed", "right_seed"):
        if name in frame:
            frame[name] = frame[name].astype("Int64").mask(frame[name] == _MISSING_SEED)
    return ExportedComparisons(frame, segments, meta)


# --------------------------------------------------------------------------- import


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_pt_labels` stored.

    Attributes:
        annotator: who the comparisons are stored under.
        policy_version_id: the version created to own the imported clips
            (no checkpoint; ``metrics`` records the source files).
        segment_length: L, steps per segment.
        n_clips: distinct segments stored (one per distinct start index).
        n_pairs / n_comparisons: one pair, answered once, per kept query.
        n_skipped_identical: queries whose two segments start at the same index (no
            pair can compare a clip with itself).
        dataset: the dataset file the segments were cut from (or ``minari:ID``).
        index_space: what the start indices count, ``"qlearning"`` or ``"rows"``.
    """

    annotator: str
    policy_version_id: int
    segment_length: int
    n_clips: int
    n_pairs: int
    n_comparisons: int
    n_skipped_identical: int
    dataset: str = ""
    index_space: str = "qlearning"


_START_KEYS = ("start_indices", "start_indices_1", "indices", "indices_1")
_START2_KEYS = ("start_indices_2", "indices_2")
_LABEL_KEYS = ("human_label", "human_labels", "labels", "label", "label_human")
_LENGTH_PATTERNS = (re.compile(r"_q(\d+)(?:\D|$)"), re.compile(r"_len_(\d+)(?:\D|$)"))
#: Label-file stems that say nothing about the dataset (Preference Transformer names every
#: labels file ``label_human``): the default annotator then also names the folder.
_GENERIC_STEMS = {"label_human", "human_label"}
INDEX_SPACES = ("qlearning", "rows")


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and plain containers, and nothing else."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "list"),
        ("builtins", "dict"),
        ("builtins", "tuple"),
        ("builtins", "int"),
        ("builtins", "float"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise ImportFormatError(
            f"refusing to unpickle {module}.{name}: label files may only contain numpy "
            "arrays, lists and dicts"
        )


def _load_any(path: Path) -> Any:
    """Load an array or a dict of arrays from .npz, .npy, .h5/.hdf5 or a pickle."""
    if not path.is_file():
        raise ImportFormatError(f"label file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            return {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        if isinstance(exc, ImportFormatError):
            raise
        raise ImportFormatError(
            f"cannot read {path}: not .npz/.npy/.h5 and not a pickle of arrays ({exc})"
        ) from None


def _pick(data: dict[str, Any], keys: tuple[str, ...], path: Path, what: str) -> np.ndarray:
    for key in keys:
        if key in data:
            return np.asarray(data[key])
    raise ImportFormatError(f"{path} has no {what} (looked for {', '.join(keys)}); keys are {sorted(data)}")


def find_label_files(folder: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """The published label files in ``folder``: ``(labels, first indices, second indices)``.

    Recognises the folders the projects publish:

    * Preference Transformer (``human_label/<D4RL dataset>/``): ``label_human``,
      ``indices_num<N>[_q<L>]`` and ``indices_2_num<N>[_q<L>]`` (other files, such as
      ``label_dummy``, are ignored);
    * Uni-RLHF (``<D4RL dataset>_human_labels/`` or its ``comparative/`` folder):
      ``human_label_<suffix>.pkl``, ``indices_1_<suffix>.pkl`` and
      ``indices_2_<suffix>.pkl`` with the same ``<suffix>``
      (``domain_<d>_env_<dataset>_num_<N>_len_<L>_<id>``).

    Raises:
        ImportFormatError: not a folder, no such set, or several (the message lists
            them; pass the files themselves then).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImportFormatError(f"{folder} is not a folder of label files")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    sets: list[tuple[Path, Path, Path]] = []
    labels = [p for p in files if p.name.startswith("label_human")]
    first = [p for p in files if p.name.startswith("indices_num")]
    second = [p for p in files if p.name.startswith("indices_2_num")]
    if len(labels) == len(first) == len(second) == 1:
        sets.append((labels[0], first[0], second[0]))
    elif labels or first or second:
        sets += [(a, b, c) for a in labels for b in first for c in second]
    by_name = {p.name: p for p in files}
    for p in files:
        if p.name.startswith("human_label_"):
            suffix = p.name[len("human_label_"):]
            a, b = by_name.get(f"indices_1_{suffix}"), by_name.get(f"indices_2_{suffix}")
            if a is not None and b is not None:
                sets.append((p, a, b))
    if len(sets) == 1:
        return sets[0]
    if not sets:
        raise ImportFormatError(
            f"{folder} holds no published label files: expected Preference Transformer's label_human, "
            "indices_num… and indices_2_num…, or Uni-RLHF's human_label_<suffix>, indices_1_<suffix> and "
            f"indices_2_<suffix>; it holds {[p.name for p in files][:20]}")
    raise ImportFormatError(
        f"{folder} holds several sets of label files {[[p.name for p in s] for s in sets][:6]}; pass the labels "
        "file itself with indices_file= and indices_2_file=")


def _read_label_files(
    labels_file: Path, indices_file: Path | None, indices_2_file: Path | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = _load_any(labels_file)
    if isinstance(data, dict):
        labels = _pick(data, _LABEL_KEYS, labels_file, "labels")
        starts = _pick(data, _START_KEYS, labels_file, "first-segment start indices")
        starts_2 = _pick(data, _START2_KEYS, labels_file, "second-segment start indices")
    else:
        if indices_file is None or indices_2_file is None:
            raise ImportFormatError(
                f"{labels_file} holds only labels; pass indices_file and indices_2_file "
                "(Preference Transformer's indices_num… and indices_2_num… files), or the folder that holds all three"
            )
        labels = np.asarray(data)
        starts = np.asarray(_load_any(indices_file))
        starts_2 = np.asarray(_load_any(indices_2_file))
    starts = starts.reshape(-1)
    starts_2 = starts_2.reshape(-1)
    if not np.all(np.equal(np.mod(starts, 1), 0)) or not np.all(np.equal(np.mod(starts_2, 1), 0)):
        raise ImportFormatError("start indices must be whole numbers")
    if not (len(starts) == len(starts_2) == len(labels)):
        raise ImportFormatError(
            f"label file lengths disagree: {len(starts)} start_indices, {len(starts_2)} "
            f"start_indices_2, {len(labels)} labels"
        )
    return starts.astype(np.int64), starts_2.astype(np.int64), labels


def pt_labels_to_outcomes(labels: np.ndarray) -> list[Outcome]:
    """Map Preference-Transformer labels to outcomes.

    Args:
        labels: (N,) with 0 (first/left preferred), 1 (second/right), -1 or 0.5
            (equal); or (N, 2) one-hot rows ``[1, 0]``, ``[0, 1]``, ``[0.5, 0.5]``.

    Raises:
        ImportFormatError: other values or shapes.
    """
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim == 2 and labels.shape[1] == 2:
        table = {(1.0, 0.0): Outcome.LEFT, (0.0, 1.0): Outcome.RIGHT, (0.5, 0.5): Outcome.EQUAL}
        keys = [tuple(float(x) for x in row) for row in labels]
    elif labels.ndim == 1:
        table = {(0.0,): Outcome.LEFT, (1.0,): Outcome.RIGHT, (-1.0,): Outcome.EQUAL, (0.5,): Outcome.EQUAL}
        keys = [(float(x),) for x in labels]
    else:
        raise ImportFormatError(f"labels must have shape (N,) or (N, 2), got {labels.shape}")
    bad = sorted({k for k in keys if k not in table})
    if bad:
        raise ImportFormatError(
            f"unknown label values {bad[:5]}; expected 0 (first preferred), 1 (second), -1 (equal)"
            " or one-hot rows"
        )
    return [table[k] for k in keys]


def _segment_length(segment_length: int | None, files: list[Path]) -> int:
    if segment_length is not None:
        if isinstance(segment_length, bool) or not isinstance(segment_length, (int, np.integer)) \
                or segment_length < 1:
            raise StoreInputError(f"segment_length must be an integer >= 1, got {segment_length!r}")
        return int(segment_length)
    for path in files:
        for pattern in _LENGTH_PATTERNS:
            match = pattern.search(path.name)
            if match:
                return int(match.group(1))
    raise ImportFormatError(
        f"cannot tell the segment length from the file names {[p.name for p in files]}; pass segment_length= "
        "(Preference Transformer's D4RL labels, whose names have no _q<L>, are used with 100-step segments: "
        "segment_length=100)"
    )


def d4rl_qlearning_rows(timeouts: np.ndarray) -> np.ndarray:
    """The row of a D4RL file behind each row of ``d4rl.qlearning_dataset`` over it.

    D4RL's ``qlearning_dataset`` (``terminate_on_end=False``, the default) keeps every
    row but the last row and the rows whose ``timeouts`` flag is set; Preference
    Transformer and Uni-RLHF cut their labelled segments from that array, so their start
    indices count its rows.

    Args:
        timeouts: (N,) the file's ``timeouts`` flags.

    Returns:
        (M,) int64 file rows, increasing; M = N − 1 − (timeouts set among rows 0..N−2).
    """
    keep = ~np.asarray(timeouts, dtype=bool).reshape(-1)
    keep[-1:] = False
    return np.flatnonzero(keep).astype(np.int64)


def _registered_task(task_id: str) -> str | None:
    """``task_id`` when the task registry knows it (its Do/Da are then checked), else None."""
    from fkpd.envs import get_task
    from fkpd.errors import UnknownTaskError

    try:
        get_task(task_id)
    except UnknownTaskError:
        return None
    return task_id


def _load_labelled_dataset(dataset: str | os.PathLike[str], task_id: str | None) -> Any:
    """The dataset the labels index, through :func:`fkpd.data.load_dataset` (a file, a
    D4RL dataset name in D4RL's cache directory, or ``minari:ID``)."""
    from fkpd.data import load_dataset
    from fkpd.errors import DatasetError

    try:
        return load_dataset(dataset, task_id=task_id)
    except DatasetError as exc:
        raise ImportFormatError(f"the dataset the labels index cannot be read: {exc}") from exc


def import_pt_labels(
    store: "Store",
    project: Any,
    dataset: str | os.PathLike[str],
    labels_file: str | os.PathLike[str],
    *,
    indices_file: str | os.PathLike[str] | None = None,
    indices_2_file: str | os.PathLike[str] | None = None,
    segment_length: int | None = None,
    annotator: str | None = None,
    round: int = 0,
    fps: float = 30.0,
    check_episode_bounds: bool = True,
    index_space: Literal["qlearning", "rows"] = "qlearning",
) -> ImportSummary:
    """Import Preference Transformer / Uni-RLHF labels over a user-provided D4RL dataset.

    Writes one segment ``.npz`` per distinct start index (under
    ``imported/<project id>/<name>/``), then in one transaction creates a policy
    version without checkpoint (``metrics`` records the sources), the clips (no reset
    seed; ``gt_return`` = segment reward sum; ``meta.start_index`` and ``meta.row``, the
    first file row), one pair per query with status ``done`` (imported pairs are never
    offered to annotators: they have no videos) and one comparison each by the
    annotator. The comparisons are then training data of the project's alignment rounds
    (:meth:`Store.training_pairs`), next to its own labels.

    Args:
        dataset: the dataset the indices refer to: a D4RL-layout HDF5 file, a D4RL
            dataset name looked up in D4RL's cache directory (``hopper-medium-replay-v2``
            finds ``$D4RL_DATASET_DIR/hopper_medium_replay-v2.hdf5``), or
            ``minari:DATASET_ID``; read with :func:`fkpd.data.load_dataset`. When the
            project's task is a registered task (``d4rl/hopper-medium-v2``,
            ``metaworld/…``), the dataset's Do/Da must be the task's, and on a
            ``d4rl/maze2d-*`` task an original D4RL maze2d file is mapped to
            PointMaze's frame, so segments match the project's policies.
        labels_file: the labels file, or a folder holding a published set
            (:func:`find_label_files`). See the module docstring for the formats.
        indices_file / indices_2_file: the start indices of the first / second
            segments when ``labels_file`` holds only labels.
        segment_length: L; inferred from the file names (``_q<L>``, ``_len_<L>``) when
            omitted. Preference Transformer's D4RL locomotion files carry no length:
            they are used with 100-step segments (``segment_length=100``).
        annotator: annotator name (default ``imported:<labels file stem>``, or
            ``imported:<folder>/<stem>`` for a generic stem such as PT's
            ``label_human``).
        round: round of the created pairs and policy version (keep 0: a bootstrap
            renders round 1).
        fps: stored on the clips (there is no video; any positive value works).
        check_episode_bounds: refuse segments that run across an episode end
            (a sign that the labels belong to another dataset or index space).
        index_space: what the start indices count. ``"qlearning"`` (default): rows of
            ``d4rl.qlearning_dataset`` over the file, which leaves out every
            ``timeouts`` row and the last row (:func:`d4rl_qlearning_rows`); Preference
            Transformer and Uni-RLHF both index that array. ``"rows"``: the file's
            rows as stored.

    Raises:
        ImportFormatError: unreadable files, a dataset that is missing (the message
            says where it was looked for) or does not fit the project's task,
            mismatched lengths, unknown labels, indices out of range or across episode
            ends.
        AlreadyExistsError: this annotator already has comparisons in the project
            (the file was imported before).
        StoreInputError: a bad ``segment_length`` or ``index_space``.
        NotFoundError: unknown project.
    """
    if index_space not in INDEX_SPACES:
        raise StoreInputError(f"index_space must be one of {INDEX_SPACES}, got {index_space!r}")
    labels_file = Path(labels_file)
    if labels_file.is_dir():
        labels_file, first, second = find_label_files(labels_file)
        indices_file = first if indices_file is None else indices_file
        indices_2_file = second if indices_2_file is None else indices_2_file
    extra = [Path(p) for p in (indices_file, indices_2_file) if p is not None]
    starts, starts_2, raw_labels = _read_label_files(
        labels_file,
        Path(indices_file) if indices_file is not None else None,
        Path(indices_2_file) if indices_2_file is not None else None,
    )
    outcomes = pt_labels_to_outcomes(raw_labels)
    length = _segment_length(segment_length, [labels_file, *extra])

    info = store.get_project(project)
    ds = _load_labelled_dataset(dataset, _registered_task(info.task_id))
    where = str(ds.path) if ds.path is not None else str(dataset)
    rows = _segment_rows(np.concatenate([starts, starts_2]), length, ds, index_space, check_episode_bounds,
                         labels_file, where)

    stem = labels_file.stem
    label_name = f"{labels_file.parent.name}/{stem}" if stem in _GENERIC_STEMS and labels_file.parent.name else stem
    name = annotator or f"imported:{label_name}"
    who = store.get_or_create_annotator(name)
    if not store.comparisons_frame(info.id, annotator=who.id).empty:
        raise AlreadyExistsError(
            f"annotator {name!r} already has comparisons in project {info.name!r}; this file "
            "was imported before (pass another annotator= to import it again)"
        )

    folder = f"imported/{info.id}/{label_name}"
    source_name = Path(where).name
    clips = []
    for start, idx in rows.items():
        rel, sha = store.artifacts.save_segment(
            f"{folder}/seg_{start:09d}.npz",
            ds.observations[idx],
            ds.actions[idx],
            ds.rewards[idx],
        )
        clips.append(
            dict(
                segment_path=rel,
                segment_sha256=sha,
                length=length,
                fps=fps,
                reset_seed=None,
                gt_return=float(np.sum(ds.rewards[idx], dtype=np.float64)),
                gt_success=None,
                meta={"source": source_name, "labels": labels_file.name, "start_index": start,
                      "row": int(idx[0]), "index_space": index_space},
            )
        )
    keep = [i for i in range(len(starts)) if starts[i] != starts_2[i]]
    sources = {"source": "import", "dataset": str(dataset), "dataset_file": where, "labels": str(labels_file),
               "indices": [str(p) for p in extra], "index_space": index_space, "segment_length": length}
    with store.session(write=True) as s:
        proj = store._project(s, info.id)
        version = store._insert_policy_version(s, proj, None, None, None, round, sources)
        clip_rows = store._insert_clips(
            s, [store._prepare_clip({**c, "policy_version_id": version.id}) for c in clips]
        )
        clip_of = {row.meta["start_index"]: row.id for row in clip_rows}
        pairs = store._insert_pairs(
            s, proj, [(clip_of[int(starts[i])], clip_of[int(starts_2[i])]) for i in keep], round, status="done"
        )
        now = store.now()
        s.add_all(
            m.Comparison(
                pair_id=pair.id, annotator_id=who.id, outcome=outcomes[i].value, shown_at=None, answered_at=now
            )
            for pair, i in zip(pairs, keep)
        )
        s.flush()
        version_id = version.id
    return ImportSummary(
        annotator=name,
        policy_version_id=version_id,
        segment_length=length,
        n_clips=len(clips),
        n_pairs=len(keep),
        n_comparisons=len(keep),
        n_skipped_identical=len(starts) - len(keep),
        dataset=where,
        index_space=index_space,
    )


def _segment_rows(
    starts: np.ndarray, length: int, ds: Any, index_space: str, check_bounds: bool, source: Path, where: str
) -> dict[int, np.ndarray]:
    """``{start index: (L,) file rows}`` for every distinct start, after the range and
    episode-end checks."""
    n = len(ds.rewards)
    if index_space == "qlearning":
        if ds.timeouts is None:
            raise ImportFormatError(f"dataset {where} has no timeouts flags; pass index_space='rows'")
        rows_of = d4rl_qlearning_rows(ds.timeouts)
        space = (f"{len(rows_of)} rows as d4rl.qlearning_dataset counts them (its {n} file rows less the last "
                 "row and the timeouts rows)")
    else:
        rows_of = np.arange(n, dtype=np.int64)
        space = f"{n} rows"
    unique = np.unique(starts)
    bad = unique[(unique < 0) | (unique + length > len(rows_of))]
    if bad.size:
        other = "'rows'" if index_space == "qlearning" else "'qlearning'"
        raise ImportFormatError(
            f"{source}: start indices {bad[:5].tolist()} with segment length {length} fall outside dataset "
            f"{where}, which has {space}; is this the right dataset, length and index_space (or {other})?"
        )
    rows = {int(s): rows_of[int(s) : int(s) + length] for s in unique}
    if check_bounds:
        ends = np.zeros(n, dtype=bool)
        ends[np.asarray(ds.episode_ends, dtype=np.int64) - 1] = True
        cumulative = np.concatenate([[0], np.cumsum(ends)])
        crossing = [s for s, idx in rows.items() if cumulative[idx[-1]] - cumulative[idx[0]] > 0]
        if crossing:
            raise ImportFormatError(
                f"{source}: segments starting at {crossing[:5]} run across an episode end "
                f"(terminals/timeouts of {where}) within {length} steps; is this the right dataset, length and "
                "index_space? Pass check_episode_bounds=False to import anyway"
            )
    return rows
