"""Reading and checking published label files (Preference Transformer, Uni-RLHF).

:func:`read_label_set` turns the files a project published into a checked
:class:`LabelSet`: start indices as int64 (whole, non-negative, within int64) and one
:class:`~fkpd.store.outcomes.Outcome` per query. It reads and checks everything before
:func:`fkpd.prefs.importers.import_pt_labels` touches the store, so a bad file ends in
one :class:`~fkpd.store.errors.ImportFormatError` whose message names the file and what
is wrong with it, and nothing is written.

Accepted files (see :mod:`fkpd.prefs.importers` for the layouts the projects publish):
``.npz``, ``.npy`` (no pickled objects), ``.h5``/``.hdf5`` (top-level datasets) and
pickles. Pickles are read with an unpickler that only rebuilds numpy arrays, lists,
tuples, dicts and numbers, so a malicious file cannot run code; a pickle that fails
while being rebuilt (a call such as ``dict(5)``, an unknown dtype, a truncated stream)
is reported as unreadable, like any other corrupt file.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fkpd.store.errors import ImportFormatError, StoreInputError
from fkpd.store.outcomes import Outcome

START_KEYS = ("start_indices", "start_indices_1", "indices", "indices_1")
START2_KEYS = ("start_indices_2", "indices_2")
LABEL_KEYS = ("human_label", "human_labels", "labels", "label", "label_human")
_LENGTH_PATTERNS = (re.compile(r"_q(\d+)(?:\D|$)"), re.compile(r"_len_(\d+)(?:\D|$)"))
#: Start indices must fit in int64 (they count rows of a file; any real dataset is far smaller).
_INDEX_LIMIT = 2**63


@dataclass(frozen=True)
class LabelSet:
    """A checked set of labelled queries.

    Attributes:
        starts / starts_2: (N,) int64 start indices of the first / second segments,
            each in ``0 .. 2**63 - 1`` (not yet checked against a dataset).
        outcomes: N outcomes, one per query (``left``: first segment preferred).
        labels_file: the file that held the labels.
        extra_files: the separate index files, when the labels file held only labels.
    """

    starts: np.ndarray
    starts_2: np.ndarray
    outcomes: list[Outcome]
    labels_file: Path
    extra_files: tuple[Path, ...] = ()

    def __len__(self) -> int:
        return len(self.outcomes)


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


def load_label_file(path: str | os.PathLike[str]) -> Any:
    """An array, or a dict of arrays, from a ``.npz``, ``.npy``, ``.h5``/``.hdf5`` or pickle file.

    Raises:
        ImportFormatError: the file is missing or unreadable (corrupt, truncated, not
            the format its name says, pickled objects in a ``.npy``/``.npz``, a pickle
            that builds anything but arrays, lists, dicts and numbers, or fails while
            being rebuilt).
    """
    path = Path(path)
    if not path.is_file():
        raise ImportFormatError(f"label file {path} does not exist")
    suffix = path.suffix.lower()
    kind = {".npz": ".npz", ".npy": ".npy", ".h5": "HDF5", ".hdf5": "HDF5"}.get(suffix, "a pickle of arrays")
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(path, "r") as f:
                return {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f).load()
    except ImportFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - numpy, h5py and pickle fail in many ways on a corrupt file
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line, whatever the library wrote
        raise ImportFormatError(
            f"cannot read label file {path} as {kind} ({reason[:200]}); the file is corrupt or not a label "
            "file: re-download it, or pass the .npz/.npy/.h5 or pickle the project published"
        ) from None


def _array(value: Any, what: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(value)
    except Exception as exc:  # noqa: BLE001 - ragged lists, unconvertible objects
        raise ImportFormatError(f"{path}: the {what} are not an array ({type(exc).__name__}: {exc})") from None


def _pick(data: dict[Any, Any], keys: tuple[str, ...], path: Path, what: str) -> np.ndarray:
    for key in keys:
        if key in data:
            return _array(data[key], what, path)
    names = sorted(str(k) for k in data)
    raise ImportFormatError(f"{path} has no {what} (looked for {', '.join(keys)}); keys are {names[:20]}")


def _sample(values: Any) -> list[Any]:
    return [v.item() if isinstance(v, np.generic) else v for v in np.asarray(values, dtype=object).reshape(-1)[:3]]


def check_start_indices(value: Any, what: str, path: Path) -> np.ndarray:
    """``value`` as (N,) int64 start indices.

    Accepts integer arrays, whole-valued float arrays and lists of ints (Python ints of
    any size are checked before any conversion, so nothing wraps around).

    Raises:
        ImportFormatError: strings, booleans or other non-numbers, fractional, NaN or
            infinite values, or values outside ``0 .. 2**63 - 1``.
    """
    arr = _array(value, what, path).reshape(-1)
    kind = arr.dtype.kind
    if kind == "O":
        items = arr.tolist()
        odd = [v for v in items if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))]
        if odd:
            raise ImportFormatError(
                f"{path}: {what} must be whole numbers; found {type(odd[0]).__name__} values such as "
                f"{odd[:3]!r}")
        big = [int(v) for v in items if not 0 <= int(v) < _INDEX_LIMIT]
        if big:
            raise ImportFormatError(f"{path}: {what} such as {big[:3]} are outside 0 .. 2**63-1; is this a label file?")
        return np.array([int(v) for v in items], dtype=np.int64)
    if kind in "US":
        raise ImportFormatError(f"{path}: {what} must be whole numbers, got strings such as {_sample(arr)!r}; "
                                "store them as integers")
    if kind not in "iuf":
        raise ImportFormatError(f"{path}: {what} must be whole numbers, got an array of {arr.dtype} "
                                f"such as {_sample(arr)!r}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if kind == "f":
        finite = np.isfinite(arr)
        whole = finite & (np.mod(np.where(finite, arr, 0.0), 1) == 0)
        if not whole.all():
            raise ImportFormatError(f"{path}: {what} must be whole numbers, got {arr[~whole][:3].tolist()}")
    low, high = arr.min().item(), arr.max().item()
    if low < 0 or high >= _INDEX_LIMIT:
        bad = low if low < 0 else high
        raise ImportFormatError(f"{path}: {what} such as {bad!r} are outside 0 .. 2**63-1; indices count rows "
                                "of the dataset")
    return arr.astype(np.int64)


def pt_labels_to_outcomes(labels: Any) -> list[Outcome]:
    """Map Preference-Transformer labels to outcomes.

    Args:
        labels: (N,) with 0 (first/left preferred), 1 (second/right), -1 or 0.5
            (equal); or (N, 2) one-hot rows ``[1, 0]``, ``[0, 1]``, ``[0.5, 0.5]``.

    Raises:
        ImportFormatError: other values, shapes or types (strings, objects).
    """
    arr = np.asarray(labels) if not isinstance(labels, np.ndarray) else labels
    if arr.dtype.kind not in "biuf":
        if arr.dtype.kind == "O" and all(isinstance(v, (int, float, np.integer, np.floating))
                                         for v in arr.reshape(-1).tolist()):
            arr = arr.astype(np.float64)
        else:
            raise ImportFormatError(f"labels must be numbers (0, 1, -1 or one-hot rows), got an array of "
                                    f"{arr.dtype} such as {_sample(arr)!r}")
    arr = arr.astype(np.float64)
    if arr.ndim == 2 and arr.shape[1] == 2:
        table = {(1.0, 0.0): Outcome.LEFT, (0.0, 1.0): Outcome.RIGHT, (0.5, 0.5): Outcome.EQUAL}
        keys = [tuple(float(x) for x in row) for row in arr]
    elif arr.ndim == 1:
        table = {(0.0,): Outcome.LEFT, (1.0,): Outcome.RIGHT, (-1.0,): Outcome.EQUAL, (0.5,): Outcome.EQUAL}
        keys = [(float(x),) for x in arr]
    else:
        raise ImportFormatError(f"labels must have shape (N,) or (N, 2), got {arr.shape}")
    bad = sorted({k for k in keys if k not in table}, key=repr)
    if bad:
        raise ImportFormatError(
            f"unknown label values {bad[:5]}; expected 0 (first preferred), 1 (second), -1 (equal)"
            " or one-hot rows"
        )
    return [table[k] for k in keys]


def read_label_set(labels_file: Path, indices_file: Path | None, indices_2_file: Path | None) -> LabelSet:
    """Read and check a label set: a file holding labels and both index arrays, or a
    labels-only file with the two index files.

    Raises:
        ImportFormatError: unreadable files (:func:`load_label_file`), a missing key,
            index files missing for a labels-only file, bad start indices
            (:func:`check_start_indices`), unknown labels, lengths that disagree, or
            an empty set (no query: nothing to import).
    """
    data = load_label_file(labels_file)
    extra: tuple[Path, ...] = ()
    if isinstance(data, dict):
        labels = _pick(data, LABEL_KEYS, labels_file, "labels")
        starts = _pick(data, START_KEYS, labels_file, "first-segment start indices")
        starts_2 = _pick(data, START2_KEYS, labels_file, "second-segment start indices")
        where, where_2 = labels_file, labels_file
    else:
        if indices_file is None or indices_2_file is None:
            raise ImportFormatError(
                f"{labels_file} holds only labels; pass indices_file and indices_2_file "
                "(Preference Transformer's indices_num… and indices_2_num… files), or the folder that holds all three"
            )
        labels = _array(data, "labels", labels_file)
        starts, starts_2 = load_label_file(indices_file), load_label_file(indices_2_file)
        where, where_2, extra = indices_file, indices_2_file, (indices_file, indices_2_file)
    first = check_start_indices(starts, "first-segment start indices", where)
    second = check_start_indices(starts_2, "second-segment start indices", where_2)
    if labels.ndim == 0:
        raise ImportFormatError(f"{labels_file}: the labels are a single value {_sample(labels)!r}, not one per query")
    if not (len(first) == len(second) == len(labels)):
        raise ImportFormatError(
            f"label file lengths disagree: {len(first)} start_indices, {len(second)} "
            f"start_indices_2, {len(labels)} labels"
        )
    if len(labels) == 0:
        raise ImportFormatError(f"{labels_file} holds no labelled query (an empty label set): nothing to import; "
                                "is this the right file?")
    try:
        outcomes = pt_labels_to_outcomes(labels)
    except ImportFormatError as exc:
        raise ImportFormatError(f"{labels_file}: {exc}") from None
    return LabelSet(first, second, outcomes, labels_file, extra)


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
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError as exc:
        raise ImportFormatError(f"cannot list the folder {folder} ({exc})") from None
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


def segment_length_of(segment_length: Any, files: list[Path]) -> int:
    """L: ``segment_length`` when given, else read from the file names (``_q<L>``, ``_len_<L>``).

    Raises:
        StoreInputError: ``segment_length`` is not an integer >= 1.
        ImportFormatError: not given and not in the file names (or 0 there).
    """
    if segment_length is not None:
        if isinstance(segment_length, bool) or not isinstance(segment_length, (int, np.integer)) \
                or segment_length < 1:
            raise StoreInputError(f"segment_length={segment_length!r} is not allowed; the segment length must be "
                                  "an integer >= 1")
        return int(segment_length)
    for path in files:
        for pattern in _LENGTH_PATTERNS:
            match = pattern.search(path.name)
            if match and int(match.group(1)) >= 1:
                return int(match.group(1))
    raise ImportFormatError(
        f"cannot tell the segment length from the file names {[p.name for p in files]}; pass segment_length= "
        "(Preference Transformer's D4RL labels, whose names have no _q<L>, are used with 100-step segments: "
        "segment_length=100)"
    )


__all__ = ["LabelSet", "check_start_indices", "find_label_files", "load_label_file", "pt_labels_to_outcomes",
           "read_label_set", "segment_length_of"]
