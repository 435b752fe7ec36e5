"""Export to Parquet/HDF5 and reading an export back (``fkpd.store.export``).

The import of Preference-Transformer style label files is tested in ``test_importers.py``.

Runs on SQLite and, with ``FKPD_TEST_DATABASE_URL`` set, on PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from conftest_store import artifact_dir, db_url, make_project, store  # noqa: F401
from fkpd.store import StoreInputError
from fkpd.store.export import export_comparisons, load_export

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _answer_all(store, outcomes):
    me = store.get_or_create_annotator("ann")
    for i, outcome in enumerate(outcomes):
        pair = store.next_pair("proj", me)
        store.answer(pair.id, me, outcome, NOW + timedelta(seconds=i))


def _same_frame(exported: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(exported.columns) == list(expected.columns)
    for column in expected.columns:
        got, want = exported[column], expected[column]
        if column in ("shown_at", "answered_at"):
            assert (got.dt.tz is not None) and list(got) == list(want), column
        elif column == "p_left":
            np.testing.assert_array_equal(got.to_numpy(float), want.to_numpy(float))
        else:
            assert got.astype(object).where(got.notna(), None).tolist() == \
                want.astype(object).where(want.notna(), None).tolist(), column


@pytest.mark.parametrize("fmt,suffix", [("parquet", ".parquet"), ("hdf5", ".h5")])
def test_export_round_trip(store, tmp_path, fmt, suffix):
    make_project(store, 4)
    _answer_all(store, ["left", "skip", "equal", "right"])
    expected = store.comparisons_frame("proj")
    out = export_comparisons(store, "proj", fmt, tmp_path / "exports" / f"labels{suffix}")
    assert out.is_file() and not [p for p in out.parent.iterdir() if ".part" in p.name]

    back = load_export(out)
    _same_frame(back.frame, expected)
    assert back.meta["project"] == "proj" and back.meta["task_id"] == "metaworld/door-open-v3"
    assert back.meta["fkpd_version"] == 1
    clip_ids = set(expected["left_clip_id"]) | set(expected["right_clip_id"])
    assert set(back.segments) == clip_ids
    for clip_id in clip_ids:
        clip = store.get_clip(int(clip_id))
        original = store.artifacts.load_segment(clip.segment_path, clip.segment_sha256)
        for key in ("observations", "actions", "rewards"):
            np.testing.assert_array_equal(back.segments[clip_id][key], original[key])
            assert back.segments[clip_id][key].dtype == np.float32
        assert back.segments[clip_id]["observations"].shape == (clip.length, 4)


@pytest.mark.parametrize("fmt,suffix", [("parquet", ".parquet"), ("hdf5", ".h5")])
def test_export_of_an_empty_project(store, tmp_path, fmt, suffix):
    make_project(store, 1)
    back = load_export(export_comparisons(store, "proj", fmt, tmp_path / f"empty{suffix}"))
    assert back.frame.empty and back.segments == {}


def test_export_rejects_unknown_format(store, tmp_path):
    make_project(store, 1)
    with pytest.raises(StoreInputError, match="unknown export format 'csv'"):
        export_comparisons(store, "proj", "csv", tmp_path / "x.csv")
