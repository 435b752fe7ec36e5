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
cannot run code. Reading and checking the files is :mod:`fkpd.prefs.label_files`: every
file, index and label is checked, and the segments' rows against the dataset, before
anything is written, so a bad file leaves no annotator, segment file or version behind.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fkpd.prefs.label_files import (
    find_label_files,
    pt_labels_to_outcomes,
    read_label_set,
    segment_length_of,
)
from fkpd.store.errors import AlreadyExistsError, ImportFormatError, NotFoundError, StoreInputError

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


#: Label-file stems that say nothing about the dataset (Preference Transformer names every
#: labels file ``label_human``): the default annotator then also names the folder.
_GENERIC_STEMS = {"label_human", "human_label"}
INDEX_SPACES = ("qlearning", "rows")


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
    ``imported/<project id>/<name>/<import id>/``, a folder of this import alone), then
    in one transaction creates a policy version without checkpoint (``metrics`` records
    the sources), the clips (no reset seed; ``gt_return`` = segment reward sum;
    ``meta.start_index`` and ``meta.row``, the first file row), one pair per query with
    status ``done`` (imported pairs are never offered to annotators: they have no videos)
    and one comparison each by the annotator. The comparisons are then training data of the project's alignment rounds
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

    Nothing is written until every check has passed: the files, the indices (whole
    numbers in ``0 .. 2**63-1``, compared with the dataset without overflow), the labels,
    the dataset and the episode ends. The segment files go to a folder of this import
    alone, which is removed again if registering them fails.

    Raises:
        ImportFormatError: unreadable or corrupt files (random bytes, a broken HDF5
            file, pickled objects, a pickle that fails to rebuild), start indices that
            are not whole non-negative numbers, unknown labels, mismatched lengths, an
            empty label set (or one whose every query compares a segment with itself),
            a dataset that is missing (the message says where it was looked for) or
            does not fit the project's task, indices out of range or across episode
            ends.
        AlreadyExistsError: this annotator already has comparisons in the project
            (the file was imported before).
        StoreInputError: a bad ``segment_length``, ``index_space``, ``round`` or ``fps``.
        NotFoundError: unknown project.
    """
    if index_space not in INDEX_SPACES:
        raise StoreInputError(f"index_space={index_space!r} is not allowed; use one of {INDEX_SPACES}")
    if isinstance(round, bool) or not isinstance(round, (int, np.integer)) or round < 0:
        raise StoreInputError(f"round={round!r} is not allowed; the round must be an integer >= 0")
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.number)) or not 0 < float(fps) < 1e6:
        raise StoreInputError(f"fps must be a positive number, got {fps!r}")
    # 1. Read and check everything; nothing is written before the last check passed.
    labels_file = Path(labels_file)
    if labels_file.is_dir():
        labels_file, first, second = find_label_files(labels_file)
        indices_file = first if indices_file is None else indices_file
        indices_2_file = second if indices_2_file is None else indices_2_file
    extra = [Path(p) for p in (indices_file, indices_2_file) if p is not None]
    label_set = read_label_set(
        labels_file,
        Path(indices_file) if indices_file is not None else None,
        Path(indices_2_file) if indices_2_file is not None else None,
    )
    length = segment_length_of(segment_length, [labels_file, *extra])
    keep = [i for i in range(len(label_set)) if label_set.starts[i] != label_set.starts_2[i]]
    if not keep:
        raise ImportFormatError(f"{labels_file}: every one of its {len(label_set)} queries compares a segment with "
                                "itself (the same start index twice): nothing to import; is this the right file?")

    info = store.get_project(project)
    ds = _load_labelled_dataset(dataset, _registered_task(info.task_id))
    where = str(ds.path) if ds.path is not None else str(dataset)
    rows = _segment_rows(np.concatenate([label_set.starts, label_set.starts_2]), length, ds, index_space,
                         check_episode_bounds, labels_file, where)

    stem = labels_file.stem
    label_name = f"{labels_file.parent.name}/{stem}" if stem in _GENERIC_STEMS and labels_file.parent.name else stem
    name = annotator or f"imported:{label_name}"
    _refuse_a_second_import(store, info, name)
    segments = {start: (ds.observations[idx], ds.actions[idx], ds.rewards[idx]) for start, idx in rows.items()}

    # 2. Write the segment files into a folder of this import only, then register everything in one
    #    transaction; if that fails, the folder goes again (no other import's files are touched).
    folder = f"imported/{info.id}/{_slug(label_name)}/{uuid.uuid4().hex[:12]}"
    try:
        clips = []
        for start, (obs, act, rew) in segments.items():
            rel, sha = store.artifacts.save_segment(f"{folder}/seg_{start:09d}.npz", obs, act, rew)
            clips.append(dict(
                segment_path=rel, segment_sha256=sha, length=length, fps=float(fps), reset_seed=None,
                gt_return=float(np.sum(rew, dtype=np.float64)), gt_success=None,
                meta={"source": Path(where).name, "labels": labels_file.name, "start_index": start,
                      "row": int(rows[start][0]), "index_space": index_space},
            ))
        sources = {"source": "import", "dataset": str(dataset), "dataset_file": where, "labels": str(labels_file),
                   "indices": [str(p) for p in extra], "index_space": index_space, "segment_length": length}
        position = {start: i for i, start in enumerate(rows)}  # clips are in the order of ``rows``
        who = store.get_or_create_annotator(name)
        version = store.add_imported_labels(
            info.id,
            who.id,
            clips,
            [(position[int(label_set.starts[i])], position[int(label_set.starts_2[i])]) for i in keep],
            [label_set.outcomes[i] for i in keep],
            round=int(round),
            metrics=sources,
        )
    except BaseException:
        store.artifacts.remove_tree(folder)
        raise
    return ImportSummary(
        annotator=name,
        policy_version_id=version.id,
        segment_length=length,
        n_clips=len(clips),
        n_pairs=len(keep),
        n_comparisons=len(keep),
        n_skipped_identical=len(label_set) - len(keep),
        dataset=where,
        index_space=index_space,
    )


def _refuse_a_second_import(store: "Store", project: Any, name: str) -> None:
    """Raise AlreadyExistsError when annotator ``name`` already has comparisons in the
    project (without creating the annotator); StoreInputError for a name the store
    would refuse (empty, too long)."""
    from fkpd.store.core import clean_name

    try:
        name = clean_name(name, "annotator")
    except StoreInputError as exc:
        raise StoreInputError(f"{exc}; pass annotator= with another name") from None
    try:
        who = store.get_annotator(name)
    except NotFoundError:
        return
    if not store.comparisons_frame(project.id, annotator=who.id).empty:
        raise AlreadyExistsError(
            f"annotator {name!r} already has comparisons in project {project.name!r}; this file "
            "was imported before (pass another annotator= to import it again)"
        )


def _slug(name: str) -> str:
    """``name`` as a relative folder path: each part reduced to letters, digits, ``._-``."""
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip(".") or "_" for p in name.split("/") if p]
    return "/".join(parts) or "labels"


def _segment_rows(
    starts: np.ndarray, length: int, ds: Any, index_space: str, check_bounds: bool, source: Path, where: str
) -> dict[int, np.ndarray]:
    """``{start index: (L,) file rows}`` for every distinct start, after the range and
    episode-end checks (``starts`` are int64 in ``0 .. 2**63-1``: compared without
    adding, so nothing overflows)."""
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
    last_start = len(rows_of) - length  # may be negative: then every start is out of range
    bad = unique[(unique < 0) | (unique > last_start)] if last_start >= 0 else unique
    if bad.size:
        other = "'rows'" if index_space == "qlearning" else "'qlearning'"
        raise ImportFormatError(
            f"{source}: start indices {bad[:5].tolist()} with segment length {length} fall outside dataset "
            f"{where}, which has {space}; is this the right dataset, segment_length= and index_space= (or "
            f"index_space={other})?"
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
                f"(terminals/timeouts of {where}) within {length} steps; is this the right dataset, segment_length= "
                "and index_space=? Pass check_episode_bounds=False to import anyway"
            )
    return rows


#: How :func:`cli_message` names :func:`import_pt_labels`'s keyword arguments on the command line.
_FLAGS = {"segment_length": ("--segment-length", "L"), "indices_file": ("--indices-file", "FILE"),
          "indices_2_file": ("--indices-2-file", "FILE"), "index_space": ("--index-space", "SPACE"),
          "annotator": ("--annotator", "NAME"), "round": ("--round", "N")}


def cli_message(message: str) -> str:
    """An error message of :func:`import_pt_labels` with its keyword arguments named as
    ``fkpd labels import`` flags: ``segment_length=100`` → ``--segment-length 100``,
    ``check_episode_bounds=False`` → ``--no-check-episode-bounds``."""
    message = message.replace("check_episode_bounds=False", "--no-check-episode-bounds")

    def flag(match: re.Match) -> str:
        option, meta = _FLAGS[match.group(1)]
        return f"{option} {match.group(2).strip(chr(39)) or meta}"

    # "annotator" and "round" are also plain words: only their "name=" forms are options
    bare = "|".join(k for k in sorted(_FLAGS, key=len, reverse=True) if k not in ("annotator", "round"))
    keys = "|".join(sorted(_FLAGS, key=len, reverse=True))
    message = re.sub(rf"(?<![\w-])({keys})=('[^']*'|[\w.-]*)", flag, message)
    return re.sub(rf"(?<![\w-])({bare})\b", lambda m: _FLAGS[m.group(1)][0], message)


__all__ = ["INDEX_SPACES", "ImportSummary", "cli_message", "d4rl_qlearning_rows", "find_label_files",
           "import_pt_labels", "pt_labels_to_outcomes"]
