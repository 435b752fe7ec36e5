"""Import of Preference-Transformer / Uni-RLHF style label files (``fkpd.prefs.importers``).

Runs on SQLite and, with ``FKPD_TEST_DATABASE_URL`` set, on PostgreSQL.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest_store import artifact_dir, db_url, store  # noqa: F401
from fkpd.prefs.importers import import_pt_labels, pt_labels_to_outcomes
from fkpd.store import AlreadyExistsError, ImportFormatError
from fkpd.store.export import export_comparisons, load_export

EPISODE = 30
L = 8


def _d4rl(path: Path, episodes: int = 2, do: int = 11, da: int = 3) -> dict[str, np.ndarray]:
    """A D4RL-layout file of ``episodes`` x 30 steps (hopper's Do/Da by default): the
    first episode ends in a terminal, the last in a timeout."""
    n = episodes * EPISODE
    rng = np.random.default_rng(7)
    data = {
        "observations": rng.normal(size=(n, do)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, da)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": np.zeros(n, dtype=bool),
        "timeouts": np.zeros(n, dtype=bool),
    }
    data["terminals"][EPISODE - 1] = True
    data["timeouts"][n - 1] = True
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f.create_dataset(key, data=value)
    return data


def test_pt_label_mapping():
    assert [o.value for o in pt_labels_to_outcomes(np.array([0, 1, -1, 0.5]))] == [
        "left", "right", "equal", "equal",
    ]  # fmt: skip
    one_hot = np.array([[1, 0], [0, 1], [0.5, 0.5]])
    assert [o.value for o in pt_labels_to_outcomes(one_hot)] == ["left", "right", "equal"]
    with pytest.raises(ImportFormatError, match="unknown label values"):
        pt_labels_to_outcomes(np.array([0, 2]))


def test_import_npz_labels(store, tmp_path):
    store.create_project("proj", "d4rl/hopper-medium-replay-v2")
    data = _d4rl(tmp_path / "hopper.hdf5")
    starts = np.array([0, 5, 30, 12, 40])
    starts_2 = np.array([12, 40, 44, 12, 0])
    labels = np.array([0, 1, -1, 0, 1])
    np.savez(tmp_path / "labels.npz", start_indices=starts, start_indices_2=starts_2, human_label=labels)

    summary = import_pt_labels(store, "proj", tmp_path / "hopper.hdf5", tmp_path / "labels.npz", segment_length=L)
    assert summary.annotator == "imported:labels"
    assert (summary.n_pairs, summary.n_comparisons, summary.n_skipped_identical) == (4, 4, 1)
    assert summary.n_clips == len({0, 5, 30, 12, 40, 44})

    frame = store.comparisons_frame("proj", include_ground_truth=True)
    assert frame["outcome"].tolist() == ["left", "right", "equal", "right"]
    assert frame["p_left"].tolist() == [1.0, 0.0, 0.5, 0.0]
    assert frame["annotator"].unique().tolist() == ["imported:labels"]
    assert frame["left_seed"].isna().all()
    kept = [0, 1, 2, 4]
    for row, i in zip(frame.itertuples(), kept):
        for side, start in (("left", starts[i]), ("right", starts_2[i])):
            clip = store.get_clip(getattr(row, f"{side}_clip_id"))
            assert clip.meta["start_index"] == start and clip.length == L and clip.reset_seed is None
            seg = store.artifacts.load_segment(clip.segment_path, clip.segment_sha256)
            np.testing.assert_array_equal(seg["observations"], data["observations"][start : start + L])
            np.testing.assert_array_equal(seg["actions"], data["actions"][start : start + L])
            assert clip.gt_return == pytest.approx(float(data["rewards"][start : start + L].sum()), rel=1e-5)

    assert store.next_pair("proj", store.get_or_create_annotator("human")) is None, "imported pairs are done"
    assert store.batch_progress("proj") == (4, 4)
    assert [p for _, _, p in store.training_pairs("proj")] == [1.0, 0.0, 0.5, 0.0]
    version = store.get_policy_version(summary.policy_version_id)
    assert version.checkpoint_path is None and version.metrics["source"] == "import"

    with pytest.raises(AlreadyExistsError, match="imported before"):
        import_pt_labels(store, "proj", tmp_path / "hopper.hdf5", tmp_path / "labels.npz", segment_length=L)

    # round trip through an export keeps the missing seeds missing
    back = load_export(export_comparisons(store, "proj", "hdf5", tmp_path / "imported.h5"))
    assert back.frame["left_seed"].isna().all() and len(back.frame) == 4


def test_import_preference_transformer_pickles(store, tmp_path):
    store.create_project("proj", "d4rl/walker2d-medium-replay-v2")
    _d4rl(tmp_path / "walker.hdf5", do=17, da=6)
    folder = tmp_path / "human_label" / "walker2d-medium-replay-v2"
    folder.mkdir(parents=True)
    files = {
        f"indices_num3_q{L}": np.array([0, 10, 31]),
        f"indices_2_num3_q{L}": np.array([20, 3, 50]),
        "label_human": np.array([1, -1, 0]),
    }
    for name, value in files.items():
        with open(folder / name, "wb") as f:
            pickle.dump(value, f)
    with pytest.raises(ImportFormatError, match="pass indices_file and indices_2_file"):
        import_pt_labels(store, "proj", tmp_path / "walker.hdf5", folder / "label_human")

    summary = import_pt_labels(
        store,
        "proj",
        tmp_path / "walker.hdf5",
        folder / "label_human",
        indices_file=folder / f"indices_num3_q{L}",
        indices_2_file=folder / f"indices_2_num3_q{L}",
    )
    assert summary.segment_length == L, "length read from the _q8 file names"
    assert summary.annotator == "imported:walker2d-medium-replay-v2/label_human", "PT's generic stem + its folder"
    assert summary.n_comparisons == 3
    assert store.comparisons_frame("proj")["outcome"].tolist() == ["right", "equal", "left"]


def test_import_rejects_bad_files(store, tmp_path):
    store.create_project("proj", "t")
    _d4rl(tmp_path / "d.hdf5")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "evil_q8", "wb") as f:
        pickle.dump({"start_indices": Evil()}, f)
    with pytest.raises(ImportFormatError, match="refusing to unpickle"):
        import_pt_labels(store, "proj", tmp_path / "d.hdf5", tmp_path / "evil_q8")

    def labels(name, starts, starts_2, human):
        path = tmp_path / name
        np.savez(path, start_indices=starts, start_indices_2=starts_2, human_label=human)
        return path

    with pytest.raises(ImportFormatError, match="run across an episode end"):
        import_pt_labels(store, "proj", tmp_path / "d.hdf5", labels("cross.npz", [25], [0], [0]), segment_length=L)
    with pytest.raises(ImportFormatError, match="fall outside dataset"):
        import_pt_labels(store, "proj", tmp_path / "d.hdf5", labels("range.npz", [55], [0], [0]), segment_length=L)
    with pytest.raises(ImportFormatError, match="lengths disagree"):
        import_pt_labels(store, "proj", tmp_path / "d.hdf5", labels("len.npz", [0, 1], [2], [0]), segment_length=L)
    with pytest.raises(ImportFormatError, match="cannot tell the segment length"):
        import_pt_labels(store, "proj", tmp_path / "d.hdf5", labels("nolen.npz", [0], [2], [0]))
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f.create_dataset("observations", data=np.zeros((10, 2)))
    with pytest.raises(ImportFormatError, match=r"missing key\(s\)"):
        import_pt_labels(store, "proj", tmp_path / "bad.hdf5", labels("ok.npz", [0], [2], [0]), segment_length=L)
    assert store.comparisons_frame("proj").empty, "failed imports store nothing"


def _pickle(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(value, f)


def test_import_indices_count_d4rl_qlearning_rows(store, tmp_path):
    """Preference Transformer and Uni-RLHF index ``d4rl.qlearning_dataset``, which drops
    every timeouts row and the last row; the imported segments are D4RL's own rows."""
    from fkpd.envs.d4rl import _d4rl as d4rl_package

    store.create_project("proj", "d4rl/hopper-medium-v2")
    raw = _d4rl(tmp_path / "hopper.hdf5", episodes=3)  # ends: timeout 29, terminal 59, timeout 89
    raw["timeouts"][29] = True
    raw["terminals"][EPISODE - 1] = False
    raw["terminals"][2 * EPISODE - 1] = True
    with h5py.File(tmp_path / "hopper.hdf5", "a") as f:
        f["timeouts"][...] = raw["timeouts"]
        f["terminals"][...] = raw["terminals"]
    q = d4rl_package().qlearning_dataset(None, dataset=raw)
    assert len(q["rewards"]) == 3 * EPISODE - 2
    starts, starts_2 = np.array([0, 21, 29, 60]), np.array([29, 40, 50, 0])
    np.savez(tmp_path / "q.npz", start_indices=starts, start_indices_2=starts_2, human_label=np.array([0, 1, -1, 1]))
    summary = import_pt_labels(store, "proj", tmp_path / "hopper.hdf5", tmp_path / "q.npz", segment_length=L)
    assert summary.index_space == "qlearning" and summary.n_comparisons == 4
    frame = store.comparisons_frame("proj")
    for row, a, b in zip(frame.itertuples(), starts, starts_2):
        for clip_id, start in ((row.left_clip_id, a), (row.right_clip_id, b)):
            clip = store.get_clip(int(clip_id))
            seg = store.artifacts.load_segment(clip.segment_path, clip.segment_sha256)
            for key in ("observations", "actions", "rewards"):
                np.testing.assert_array_equal(seg[key], q[key][start : start + L])
            assert clip.meta["row"] == start + (start >= 29), "q-row 29 is file row 30: the timeout row 29 is dropped"

    # a segment over the dropped timeout row joins two episodes
    np.savez(tmp_path / "cross.npz", start_indices=[25], start_indices_2=[0], human_label=[0])
    with pytest.raises(ImportFormatError, match=r"segments starting at \[25\] run across an episode end"):
        import_pt_labels(store, "proj", tmp_path / "hopper.hdf5", tmp_path / "cross.npz", segment_length=L)
    np.savez(tmp_path / "end.npz", start_indices=[3 * EPISODE - 2 - L + 1], start_indices_2=[0], human_label=[0])
    with pytest.raises(ImportFormatError, match=r"outside dataset .*, which has 88 rows as d4rl.qlearning_dataset"):
        import_pt_labels(store, "proj", tmp_path / "hopper.hdf5", tmp_path / "end.npz", segment_length=L)
    # index_space="rows": indices are rows of the file as stored
    np.savez(tmp_path / "rows.npz", start_indices=[40], start_indices_2=[0], human_label=[0])
    rows = import_pt_labels(store, "proj", tmp_path / "hopper.hdf5", tmp_path / "rows.npz", segment_length=L,
                            index_space="rows")
    clip = store.get_clip(int(store.comparisons_frame("proj", annotator=rows.annotator).loc[0, "left_clip_id"]))
    seg = store.artifacts.load_segment(clip.segment_path, clip.segment_sha256)
    np.testing.assert_array_equal(seg["observations"], raw["observations"][40 : 40 + L])
    assert clip.meta["row"] == 40 and not np.array_equal(seg["observations"], q["observations"][40 : 40 + L])


def test_import_by_d4rl_name_from_the_cache_dir(store, tmp_path, monkeypatch):
    from fkpd.data.d4rl import dataset_file

    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    store.create_project("proj", "d4rl/hopper-medium-v2")
    np.savez(tmp_path / "labels.npz", start_indices=[0, 31], start_indices_2=[12, 40], human_label=[1, 0])
    expected = dataset_file("hopper-medium-replay-v2")
    with pytest.raises(ImportFormatError, match=rf"not in D4RL's cache directory: expected '{expected}'"):
        import_pt_labels(store, "proj", "hopper-medium-replay-v2", tmp_path / "labels.npz", segment_length=L)
    expected.parent.mkdir()
    data = _d4rl(expected)
    summary = import_pt_labels(store, "proj", "hopper-medium-replay-v2", tmp_path / "labels.npz", segment_length=L)
    assert summary.dataset == str(expected) and summary.n_comparisons == 2
    clip = store.get_clip(int(store.comparisons_frame("proj").loc[1, "left_clip_id"]))
    assert clip.meta["source"] == expected.name and clip.meta["start_index"] == 31
    seg = store.artifacts.load_segment(clip.segment_path, clip.segment_sha256)
    np.testing.assert_array_equal(seg["actions"], data["actions"][31 : 31 + L])
    version = store.get_policy_version(summary.policy_version_id)
    assert version.metrics["dataset"] == "hopper-medium-replay-v2" and version.metrics["dataset_file"] == str(expected)

    # the dataset must fit the project's task
    store.create_project("walker", "d4rl/walker2d-medium-v2")
    with pytest.raises(ImportFormatError, match="observation dimension is 11 but task d4rl/walker2d-medium-v2 has Do="):
        import_pt_labels(store, "walker", "hopper-medium-replay-v2", tmp_path / "labels.npz", segment_length=L)
    assert store.comparisons_frame("walker").empty


def test_import_published_label_folders(store, tmp_path):
    """Preference Transformer's ``human_label/<dataset>/`` and Uni-RLHF's
    ``<dataset>_human_labels/`` folders, passed as they are published."""
    store.create_project("proj", "d4rl/hopper-medium-replay-v2")
    _d4rl(tmp_path / "hopper.hdf5")
    pt = tmp_path / "human_label" / "hopper-medium-replay-v2"
    _pickle(pt / "indices_num3", np.array([0, 10, 31], dtype=np.int32))
    _pickle(pt / "indices_2_num3", np.array([20, 3, 50], dtype=np.int32))
    _pickle(pt / "label_human", [1, -1, 0])  # PT's save_label.py pickles a list
    _pickle(pt / "label_dummy", np.ones((3, 2)))
    with pytest.raises(ImportFormatError, match="cannot tell the segment length.*segment_length=100"):
        import_pt_labels(store, "proj", tmp_path / "hopper.hdf5", pt)
    summary = import_pt_labels(store, "proj", tmp_path / "hopper.hdf5", pt, segment_length=L)
    assert summary.annotator == "imported:hopper-medium-replay-v2/label_human" and summary.n_comparisons == 3

    suffix = f"domain_mujoco_env_hopper-medium-replay-v2_num_3_len_{L}_0f3a"
    uni = tmp_path / "hopper-medium-replay-v2_human_labels"
    _pickle(uni / f"human_label_{suffix}.pkl", np.array([0, 1, -1]))
    _pickle(uni / f"indices_1_{suffix}.pkl", np.array([5, 31, 40]))
    _pickle(uni / f"indices_2_{suffix}.pkl", np.array([12, 0, 44]))
    summary = import_pt_labels(store, "proj", tmp_path / "hopper.hdf5", uni)
    assert summary.segment_length == L, "L from _len_8"
    assert summary.annotator == f"imported:human_label_{suffix}"
    frame = store.comparisons_frame("proj", annotator=summary.annotator)
    assert frame["outcome"].tolist() == ["left", "right", "equal"]

    _pickle(uni / f"human_label_{suffix}x.pkl", np.array([0]))
    _pickle(uni / f"indices_1_{suffix}x.pkl", np.array([5]))
    _pickle(uni / f"indices_2_{suffix}x.pkl", np.array([12]))
    with pytest.raises(ImportFormatError, match="several sets of label files"):
        import_pt_labels(store, "proj", tmp_path / "hopper.hdf5", uni)
    with pytest.raises(ImportFormatError, match="holds no published label files"):
        import_pt_labels(store, "proj", tmp_path / "hopper.hdf5", tmp_path / "human_label")


def test_labels_import_command(store, tmp_path, capsys):
    from fkpd.cli import main

    store.create_project("proj", "d4rl/hopper-medium-replay-v2")
    _d4rl(tmp_path / "hopper.hdf5")
    pt = tmp_path / "human_label" / "hopper-medium-replay-v2"
    _pickle(pt / "indices_num2", np.array([0, 31]))
    _pickle(pt / "indices_2_num2", np.array([12, 40]))
    _pickle(pt / "label_human", [1, 0])
    argv = ["labels", "import", str(pt), "--dataset", str(tmp_path / "hopper.hdf5"), "--project", "proj",
            "--segment-length", str(L), "--database-url", store.url.render_as_string(hide_password=False),
            "--artifact-dir", str(store.artifact_dir)]
    assert main(argv) == 0
    assert "imported 2 comparisons (4 segments of 8 steps" in capsys.readouterr().out
    assert store.comparisons_frame("proj")["outcome"].tolist() == ["right", "left"]
    assert main(argv) == 2 and "imported before" in capsys.readouterr().err
