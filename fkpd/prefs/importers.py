"""Import of Preference Transformer / Uni-RLHF human labels into the preference store.

:func:`import_pt_labels` reads a published label set, cuts the labelled segments from
the user's copy of the D4RL dataset and stores them as clips, ``done`` pairs and one
answer each (:meth:`fkpd.store.Store.add_imported_labels`), next to the project's own
labels. It is the ``fkpd labels import`` command.

Preference Transformer and Uni-RLHF label pairs of fixed-length segments cut from a D4RL dataset. A query
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
(``$D4RL_DATASET_DIR``, else ``~/.d4rl/datasets``; :func:`fkpd.data.d4rl.resolve_dataset`), or
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

from fkpd.store.errors import AlreadyExistsError, ImportFormatError, StoreInputError
from fkpd.store.outcomes import Outcome

if TYPE_CHECKING:
    from fkpd.store import Store

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
    position = {start: i for i, start in enumerate(rows)}  # clips are in the order of ``rows``
    version = store.add_imported_labels(
        info.id,
        who.id,
        clips,
        [(position[int(starts[i])], position[int(starts_2[i])]) for i in keep],
        [outcomes[i] for i in keep],
        round=round,
        metrics=sources,
    )
    return ImportSummary(
        annotator=name,
        policy_version_id=version.id,
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
