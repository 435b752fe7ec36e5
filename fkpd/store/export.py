"""Export comparisons with their segment arrays, and read an export back.

Export layouts (``export_comparisons``; read either back with :func:`load_export`)
-------------------------------------------------------------------------------

Both hold every comparison of the project (skips included; those of annotators excluded
from training too, unless ``include_excluded=False``), one record per answer, with
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

Labels made elsewhere (Preference Transformer, Uni-RLHF) are imported by
:mod:`fkpd.prefs.importers`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal

import numpy as np

from fkpd.store.artifacts import SEGMENT_KEYS, ArtifactDir
from fkpd.store.errors import ImportFormatError, StoreInputError
from fkpd.store.views import ClipRecord

if TYPE_CHECKING:
    import pandas as pd

    from fkpd.store.store import Store

FORMAT_NAME = "comparisons"
FORMAT_VERSION = 1
_SIDES = ("left", "right")
_MISSING_SEED = -1


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
    rounds: Iterable[int] | None = None,
    annotators: Iterable[str] | None = None,
    include_excluded: bool = True,
) -> Path:
    """Write every comparison of ``project`` (optionally of one round, or of ``rounds``
    by ``annotators``, names, as the Data page filters them) with its segments.

    ``include_excluded=False`` leaves out the comparisons of annotators excluded from
    training (:meth:`fkpd.store.Store.exclude_annotator`), as the next round does.

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
    if rounds or annotators:
        keep = store.select_comparisons(info.id, rounds=rounds, annotators=annotators)["comparison_id"]
        frame = frame[frame["comparison_id"].isin(keep)].reset_index(drop=True)
    if not include_excluded:
        excluded = [e.annotator_id for e in store.excluded_annotators(info.id)]
        frame = frame[~frame["annotator_id"].isin(excluded)].reset_index(drop=True)
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
