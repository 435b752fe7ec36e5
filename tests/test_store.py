"""Preference store: schema and migrations, artifacts, assignment, answers, reports.

Runs on SQLite and, with ``FKPD_TEST_DATABASE_URL`` set, on PostgreSQL (see
``tests/conftest_store.py``). Concurrency is tested with real threads and real
``multiprocessing`` (spawn) processes against a real database; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing as mp
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from conftest_store import (  # noqa: F401  (fixtures are used by name)
    annotate_until_empty,
    artifact_dir,
    clock,
    clocked_store,
    db_url,
    lease_once,
    make_clips,
    make_project,
    migrate,
    store,
)
from fkpd.errors import FKPDError
from fkpd.store import (
    AlreadyExistsError,
    ArtifactIntegrityError,
    ArtifactPathError,
    ClipView,
    NotFoundError,
    Outcome,
    PairUnavailableError,
    PairView,
    Store,
    StoreError,
    StoreInputError,
    head_revision,
    outcome_to_p_left,
)
from fkpd.store.db import (
    ARTIFACT_DIR_ENV,
    DATABASE_URL_ENV,
    alembic_config,
    current_revision,
    default_artifact_dir,
    default_database_url,
    make_engine,
)
from fkpd.store.models import Base

TABLES = {
    "projects", "annotators", "policy_versions", "clips", "pairs", "leases", "comparisons", "jobs",
}  # fmt: skip
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
SPAWN = mp.get_context("spawn")


# --------------------------------------------------------------------------- labels


def test_outcome_to_p_left_is_the_design_convention():
    assert outcome_to_p_left("left") == 1.0
    assert outcome_to_p_left("right") == 0.0
    assert outcome_to_p_left("equal") == 0.5
    assert outcome_to_p_left("skip") is None
    assert outcome_to_p_left(Outcome.LEFT) == 1.0
    assert outcome_to_p_left(" Right ") == 0.0
    with pytest.raises(StoreInputError, match="unknown outcome 'better'.*left, right, equal, skip"):
        outcome_to_p_left("better")


# --------------------------------------------------------------------------- schema


def test_migrations_from_empty_to_head(db_url):
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None
        assert not TABLES & set(inspect(engine).get_table_names())
        with Store(db_url, "unused-artifacts") as store:
            assert current_revision(store.engine) == head_revision()
        assert TABLES <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        # downgrade to nothing and back up again
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert not TABLES & set(inspect(engine).get_table_names())
        with Store(db_url, "unused-artifacts") as store:
            assert current_revision(store.engine) == head_revision()
    finally:
        engine.dispose()


def test_database_from_a_newer_version_is_refused_clearly(db_url):
    with Store(db_url, "unused-artifacts") as store:
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    with pytest.raises(StoreError, match="newer version of FKPD Studio"):
        Store(db_url, "unused-artifacts")


def test_concurrent_first_open_migrates_once(db_url, artifact_dir):
    with SPAWN.Pool(3) as pool:
        revisions = pool.starmap(migrate, [(db_url, str(artifact_dir))] * 3)
    assert revisions == [head_revision()] * 3
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        engine.dispose()


def test_sqlite_connections_use_wal_busy_timeout_and_foreign_keys(tmp_path):
    with Store(f"sqlite:///{tmp_path / 'x' / 'db.sqlite'}", tmp_path / "a") as store:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_default_locations_and_env_overrides(tmp_path, monkeypatch):
    import fkpd

    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    monkeypatch.delenv(ARTIFACT_DIR_ENV, raising=False)
    labels = Path(fkpd.__file__).resolve().parents[1] / "labels"
    assert default_database_url() == f"sqlite:///{labels / 'fkpd.sqlite'}"
    assert default_artifact_dir() == labels / "artifacts"
    monkeypatch.setenv(DATABASE_URL_ENV, f"sqlite:///{tmp_path / 'env.sqlite'}")
    monkeypatch.setenv(ARTIFACT_DIR_ENV, str(tmp_path / "env-artifacts"))
    with Store() as store:
        assert store.url.database == str(tmp_path / "env.sqlite")
        assert store.artifact_dir == (tmp_path / "env-artifacts").resolve()
    assert (tmp_path / "env.sqlite").is_file()


def test_unsupported_url_is_refused():
    with pytest.raises(StoreInputError, match="unsupported database URL"):
        make_engine("mysql://u@h/db")


# --------------------------------------------------------------------------- artifacts


def test_write_artifact_atomic_bytes_callback_and_path(store):
    rel, sha = store.write_artifact_atomic("a/b/one.bin", b"hello")
    assert rel == "a/b/one.bin" and sha == hashlib.sha256(b"hello").hexdigest()
    assert store.resolve(rel).read_bytes() == b"hello"

    rel, sha = store.write_artifact_atomic("two.npy", lambda f: np.save(f, np.arange(5)))
    assert np.array_equal(np.load(store.resolve(rel)), np.arange(5))
    assert sha == hashlib.sha256(store.resolve(rel).read_bytes()).hexdigest()

    rel, sha = store.write_artifact_atomic("v/three.txt", lambda p: p.write_text("by path"), to_path=True)
    assert store.resolve(rel).read_text() == "by path"
    assert sha == hashlib.sha256(b"by path").hexdigest()
    leftovers = [p for p in store.artifact_dir.rglob("*") if ".part" in p.name]
    assert leftovers == []
    assert store.resolve(rel).stat().st_mode & 0o777 == 0o644


def test_failed_write_leaves_no_file_and_keeps_the_old_one(store):
    def broken_writer(f):
        f.write(b"half of a fi")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        store.write_artifact_atomic("new.bin", broken_writer)
    assert not store.resolve("new.bin").exists()

    store.write_artifact_atomic("old.bin", b"complete")
    with pytest.raises(RuntimeError):
        store.write_artifact_atomic("old.bin", broken_writer)
    assert store.resolve("old.bin").read_bytes() == b"complete"
    assert [p.name for p in store.artifact_dir.iterdir()] == ["old.bin"]


@pytest.mark.parametrize(
    "bad", ["../escape.bin", "a/../../escape.bin", "/etc/passwd", "C:\\evil.bin", "", "  ", "./.."]
)
def test_paths_escaping_the_artifact_dir_are_refused(store, bad):
    with pytest.raises(ArtifactPathError):
        store.resolve(bad)
    with pytest.raises(ArtifactPathError):
        store.write_artifact_atomic(bad, b"x")


def test_symlink_escape_is_refused(store, tmp_path):
    store.artifact_dir.mkdir(parents=True, exist_ok=True)
    (store.artifact_dir / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(ArtifactPathError, match="outside the artifact directory"):
        store.resolve("link/file.bin")


def test_clip_files_must_exist_and_match_their_hash(store):
    project = store.create_project("p", "metaworld/door-open-v3")
    version = store.add_policy_version(project.name)
    with pytest.raises(ArtifactIntegrityError, match="not found"):
        store.add_clip(version.id, segment_path="missing.npz", length=3, fps=30)
    rel, sha = store.artifacts.save_segment("s.npz", np.zeros((3, 2)), np.zeros((3, 1)), np.zeros(3))
    clip = store.add_clip(version.id, segment_path=rel, length=3, fps=30)
    assert clip.segment_sha256 == sha
    store.write_artifact_atomic(rel, b"tampered")
    with pytest.raises(ArtifactIntegrityError, match="sha256"):
        store.artifacts.load_segment(rel, sha)


# --------------------------------------------------------------------------- projects, annotators


def test_projects_and_annotators(store):
    project = store.create_project(" door ", "metaworld/door-open-v3", "Pick the smoother one.")
    assert project.name == "door" and project.labels_per_pair == 1 and project.lease_seconds == 120
    assert store.get_project("door") == project == store.get_project(project.id)
    with pytest.raises(AlreadyExistsError, match="already exists"):
        store.create_project("door", "metaworld/door-open-v3")
    assert store.create_project("door", "other", exist_ok=True) == project
    with pytest.raises(StoreInputError, match="labels_per_pair"):
        store.create_project("bad", "t", settings={"labels_per_pair": 0})
    with pytest.raises(StoreInputError, match="lease_seconds"):
        store.create_project("bad", "t", settings={"lease_seconds": -1})
    updated = store.update_project("door", settings={"labels_per_pair": 3, "note": "x"})
    assert updated.labels_per_pair == 3 and updated.settings["note"] == "x"
    with pytest.raises(NotFoundError, match="project 'nope' not found.*door"):
        store.get_project("nope")

    ada = store.get_or_create_annotator("  ada ")
    assert ada.name == "ada" and not ada.is_admin
    assert store.get_or_create_annotator("ada", is_admin=True) == ada
    assert store.set_admin("ada", True).is_admin
    for bad in ("", "   ", "\t\n"):
        with pytest.raises(ValueError, match="annotator name must be a non-empty string"):
            store.get_or_create_annotator(bad)
    with pytest.raises(FKPDError):
        store.get_or_create_annotator("")
    with pytest.raises(NotFoundError, match="get_or_create_annotator"):
        store.get_annotator("bob")


def test_get_or_create_annotator_concurrently_creates_one(store):
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: store.get_or_create_annotator("same").id, range(16)))
    assert len(ids) == 1
    assert [a.name for a in store.list_annotators()] == ["same"]


def test_policy_versions_and_latest(store):
    project = store.create_project("p", "metaworld/door-open-v3")
    assert store.latest_policy_version("p") is None
    rel, sha = store.write_artifact_atomic("ckpt/v0.safetensors", b"weights")
    v0 = store.add_policy_version("p", rel, metrics={"success": 0.5})
    assert v0.checkpoint_sha256 == sha and v0.metrics == {"success": 0.5}
    v1 = store.add_policy_version("p", rel, parent_id=v0.id, round=1)
    assert store.latest_policy_version("p") == v1
    assert [v.id for v in store.list_policy_versions(project.id)] == [v0.id, v1.id]
    other = store.create_project("q", "t")
    with pytest.raises(StoreInputError, match="belongs to project"):
        store.add_policy_version(other.id, parent_id=v0.id)


def test_pair_rules(store):
    project = store.create_project("p", "metaworld/door-open-v3")
    v0 = store.add_policy_version("p", round=2)
    v1 = store.add_policy_version("p", round=2)
    a, b = make_clips(store, v0.id, seed=1)
    (c,) = make_clips(store, v0.id, seed=2, n=1)
    (d,) = make_clips(store, v1.id, seed=1, n=1)
    pair_id = store.add_pair("p", a, b)
    assert store.next_pair("p", store.get_or_create_annotator("x")).round == 2
    with pytest.raises(StoreInputError, match="two different clips"):
        store.add_pair("p", a, a)
    with pytest.raises(StoreInputError, match="same initial state"):
        store.add_pair("p", a, c)
    with pytest.raises(StoreInputError, match="same policy version"):
        store.add_pair("p", a, d)
    with pytest.raises(NotFoundError, match="clip"):
        store.add_pair("p", a, 10_000)
    other = store.create_project("q", "t")
    with pytest.raises(StoreInputError, match="belong to project"):
        store.add_pair(other.id, a, b)
    assert isinstance(pair_id, int) and project.id == store.get_project("p").id


# --------------------------------------------------------------------------- assignment


def test_pair_view_hides_ground_truth_and_seed(store):
    make_project(store, 1, with_video=True)
    pair = store.next_pair("proj", store.get_or_create_annotator("a"))
    assert isinstance(pair, PairView) and isinstance(pair.left, ClipView)
    names = {f.name for f in dataclasses.fields(ClipView)} | {f.name for f in dataclasses.fields(PairView)}
    assert not names & {"gt_return", "gt_success", "reset_seed", "return", "success", "meta"}
    assert pair.left.video_file is not None and pair.left.video_file.read_bytes() == b"fake mp4 bytes"
    assert pair.left.video_file.is_relative_to(store.artifact_dir)


def test_lease_exclusivity_and_expiry(clocked_store, clock):
    store = clocked_store
    _, pairs = make_project(store, 2, lease_seconds=60)
    a, b, c = (store.get_or_create_annotator(n) for n in "abc")
    pa, pb = store.next_pair("proj", a), store.next_pair("proj", b)
    assert (pa.id, pb.id) == (pairs[0], pairs[1])
    assert store.next_pair("proj", c) is None, "both pairs are leased"
    assert pa.lease_expires_at == NOW + timedelta(seconds=60)

    clock.advance(30)
    again = store.next_pair("proj", a)
    assert again.id == pa.id and again.lease_expires_at == NOW + timedelta(seconds=90), "renewed"

    clock.advance(31)  # t=61 s: b's lease (until 60 s) expired, a's (until 90 s) has not
    assert store.next_pair("proj", c).id == pb.id
    clock.advance(30)  # t=91 s: a's lease expired too
    assert store.next_pair("proj", b).id == pa.id, "b gets the pair a abandoned"
    assert store.next_pair("proj", a) is None, "a lost its pair and nothing else is free"


def test_lease_pairs_prefetches_the_next_pair_in_a_stable_order(store):
    _, pairs = make_project(store, 3)
    a, b = store.get_or_create_annotator("a"), store.get_or_create_annotator("b")
    first = store.lease_pairs("proj", a, 2)
    assert [p.id for p in first] == pairs[:2], "the current pair, then the prefetched one"
    assert [p.id for p in store.lease_pairs("proj", a, 2)] == pairs[:2], "a rerun returns the same two"
    assert store.next_pair("proj", a).id == pairs[0], "next_pair is the first of the held pairs"
    assert [p.id for p in store.lease_pairs("proj", b, 2)] == [pairs[2]], "a holds the first two"
    store.answer(pairs[0], a, "left", NOW)
    assert [p.id for p in store.lease_pairs("proj", a, 2)] == [pairs[1]], "the prefetched pair is now first"
    store.answer(pairs[1], a, "right", NOW)
    assert store.lease_pairs("proj", a, 2) == []
    with pytest.raises(StoreInputError, match="count"):
        store.lease_pairs("proj", a, 0)


def test_a_new_batch_takes_over_from_held_pairs_of_the_previous_round(store):
    _, old = make_project(store, 3, round=1)
    a = store.get_or_create_annotator("a")
    assert [p.id for p in store.lease_pairs("proj", a, 2)] == old[:2]
    _, new = make_project(store, 2, round=2)
    assert [p.id for p in store.lease_pairs("proj", a, 2)] == new, "the new batch comes first, at once"


def test_older_rounds_fill_in_while_a_new_batch_has_too_few_pairs(store):
    """A new batch registered pair by pair must not leave annotators waiting while the
    previous round still has open pairs (issue #13): newest round first, then older."""
    _, old = make_project(store, 3, round=1)
    a, b = store.get_or_create_annotator("a"), store.get_or_create_annotator("b")
    assert [p.id for p in store.lease_pairs("proj", a, 2)] == old[:2]
    _, new = make_project(store, 1, round=2)  # the new batch's first pair
    assert [p.id for p in store.lease_pairs("proj", a, 3)] == [new[0], old[0], old[1]], \
        "the new pair first, then the held pairs of the previous round"
    assert [p.id for p in store.lease_pairs("proj", b, 3)] == [old[2]], "a holds the rest: b gets what is free"
    store.answer(new[0], a, "left", NOW)
    assert [p.id for p in store.lease_pairs("proj", a, 3)] == old[:2], "nothing new: the previous round's pairs"
    _, newer = make_project(store, 2, round=3)
    assert [p.id for p in store.lease_pairs("proj", a, 2)] == newer, "a newer batch takes over again"
    assert store.next_pair("proj", b).id == old[2], "b's held pair of round 1: round 3 is fully leased to a"


def test_retire_pair_sets_an_unshowable_pair_aside(store):
    _, pairs = make_project(store, 2)
    a = store.get_or_create_annotator("a")
    assert store.next_pair("proj", a).id == pairs[0]
    assert store.retire_pair(pairs[0]) is True
    assert store.retire_pair(pairs[0]) is False, "already retired"
    assert store.next_pair("proj", a).id == pairs[1], "the lease on the retired pair was dropped"
    assert store.batch_progress("proj") == (0, 1), "retired pairs leave the batch total"
    with pytest.raises(NotFoundError):
        store.retire_pair(10_000)


def test_release_returns_pair_to_pool(store):
    _, pairs = make_project(store, 1)
    a, b = store.get_or_create_annotator("a"), store.get_or_create_annotator("b")
    assert store.next_pair("proj", a).id == pairs[0]
    assert store.next_pair("proj", b) is None
    assert store.release(pairs[0], a) is True
    assert store.next_pair("proj", b).id == pairs[0]


def test_real_time_lease_expiry(store):
    import time

    _, pairs = make_project(store, 1, lease_seconds=0.4)
    a, b = store.get_or_create_annotator("a"), store.get_or_create_annotator("b")
    assert store.next_pair("proj", a).id == pairs[0]
    assert store.next_pair("proj", b) is None
    time.sleep(0.5)
    assert store.next_pair("proj", b).id == pairs[0]


def test_labels_per_pair_shares_a_pair_between_annotators(store):
    _, pairs = make_project(store, 2, labels_per_pair=2)
    a, b, c = (store.get_or_create_annotator(n) for n in "abc")
    assert [store.next_pair("proj", x).id for x in (a, b, c)] == [pairs[0], pairs[0], pairs[1]]
    first = store.answer(pairs[0], a, "left", NOW)
    assert first.created and not first.pair_done
    assert store.next_pair("proj", a).id == pairs[1], "a answered pair 0; pair 1 has room"
    second = store.answer(pairs[0], b, "right", NOW)
    assert second.pair_done
    assert store.batch_progress("proj") == (2, 4)


def test_latest_round_with_open_pairs_first(store):
    _, old = make_project(store, 2, round=0)
    _, new = make_project(store, 1, round=1)
    a = store.get_or_create_annotator("a")
    assert store.next_pair("proj", a).id == new[0]
    store.answer(new[0], a, "equal", NOW)
    assert store.next_pair("proj", a).id == old[0], "round 1 is done, round 0 still has open pairs"
    store.release(old[0], a)
    assert store.retire_open_pairs("proj", before_round=1) == 2
    assert store.next_pair("proj", a) is None
    with pytest.raises(PairUnavailableError, match="retired"):
        store.answer(old[0], a, "left", NOW)
    assert store.batch_progress("proj", round=0) == (0, 0)
    assert store.batch_progress("proj", round=1) == (1, 1)


def test_answer_is_idempotent(store):
    _, pairs = make_project(store, 2)
    a = store.get_or_create_annotator("a")
    pair = store.next_pair("proj", a)
    first = store.answer(pair.id, a, "left", NOW)
    again = store.answer(pair.id, "a", "right", NOW + timedelta(seconds=5))
    assert first.created and not again.created
    assert again.id == first.id and again.outcome is Outcome.LEFT and again.p_left == 1.0
    frame = store.comparisons_frame("proj")
    assert len(frame) == 1 and frame.loc[0, "outcome"] == "left"
    assert store.next_pair("proj", a).id == pairs[1]


def test_answer_errors(clocked_store, clock):
    store = clocked_store
    _, pairs = make_project(store, 1, lease_seconds=10)
    a, b = store.get_or_create_annotator("a"), store.get_or_create_annotator("b")
    with pytest.raises(StoreInputError, match="unknown outcome"):
        store.answer(pairs[0], a, "maybe", NOW)
    with pytest.raises(NotFoundError, match="pair 999"):
        store.answer(999, a, "left", NOW)
    with pytest.raises(NotFoundError, match="annotator"):
        store.answer(pairs[0], "nobody", "left", NOW)
    store.next_pair("proj", a)
    clock.advance(11)  # a's lease lapses; b takes the pair and answers it
    assert store.next_pair("proj", b).id == pairs[0]
    store.answer(pairs[0], b, "right", NOW)
    with pytest.raises(PairUnavailableError, match="takes no more answers"):
        store.answer(pairs[0], a, "left", NOW)
    assert len(store.comparisons_frame("proj")) == 1


def test_late_answer_is_kept_while_the_pair_has_room(clocked_store, clock):
    store = clocked_store
    _, pairs = make_project(store, 1, lease_seconds=10)
    a = store.get_or_create_annotator("a")
    store.next_pair("proj", a)
    clock.advance(100)
    record = store.answer(pairs[0], a, "skip", NOW)
    assert record.created and record.pair_done and record.p_left is None


def test_same_answer_from_many_threads_is_stored_once(store):
    _, pairs = make_project(store, 1)
    a = store.get_or_create_annotator("a")
    assert store.next_pair("proj", a).id == pairs[0], "answers are taken only for leased pairs"
    barrier = threading.Barrier(8)

    def click(_):
        barrier.wait()
        return store.answer(pairs[0], a, "left", NOW)

    with ThreadPoolExecutor(8) as pool:
        records = list(pool.map(click, range(8)))
    assert sum(r.created for r in records) == 1
    assert len({r.id for r in records}) == 1
    assert len(store.comparisons_frame("proj")) == 1


def _check_exactly_once(store: Store, pairs: list[int], answered: list[tuple[int, str, int]], k: int):
    frame = store.comparisons_frame("proj")
    stored = {(int(p), a): int(c) for p, a, c in zip(frame["pair_id"], frame["annotator"], frame["comparison_id"])}
    believed = {(p, a): c for p, a, c in answered}
    assert len(believed) == len(answered), "a client got two answers for one (pair, annotator)"
    assert believed == stored, "lost or phantom comparisons"
    per_pair = Counter(int(p) for p in frame["pair_id"])
    assert set(per_pair) == set(pairs) and set(per_pair.values()) == {k}
    assert store.batch_progress("proj") == (k * len(pairs), k * len(pairs))


def test_many_threads_answering_at_once(store):
    _, pairs = make_project(store, 40)
    url, artifacts = store.url.render_as_string(hide_password=False), str(store.artifact_dir)
    with ThreadPoolExecutor(8) as pool:
        results = pool.map(
            lambda i: annotate_until_empty(url, artifacts, "proj", [f"t{i}"]), range(8)
        )
        answered = [x for r in results for x in r]
    _check_exactly_once(store, pairs, answered, k=1)


def test_second_opinions_only_when_no_open_pair_is_free(store):
    """Issue #13: an annotator with nothing open to label gets completed pairs others
    answered (newest first), up to labels_per_pair + second_opinions answers each; open
    pairs always come first; the pair stays done; it trains like any comparison."""
    project, pairs = make_project(store, 2, second_opinions=1, with_video=True)
    a, b, c = (store.get_or_create_annotator(n) for n in "abc")
    for pair in store.lease_pairs("proj", a, 2):
        store.answer(pair.id, a, "left", NOW)
    assert store.lease_pairs("proj", a, 3) == [], "never a second opinion on one's own answer"
    assert [p.id for p in store.lease_pairs("proj", b, 3)] == [pairs[1], pairs[0]], "newest first"
    assert [p.id for p in store.lease_pairs("proj", b, 3)] == [pairs[1], pairs[0]], "a rerun: the same, in order"
    assert store.lease_pairs("proj", c, 3) == [], "b holds both: the cap counts live leases"
    record = store.answer(pairs[1], b, "right", NOW)
    assert record.created and record.pair_done
    assert [p.id for p in store.lease_pairs("proj", b, 3)] == [pairs[0]]
    store.release(pairs[0], b)
    assert [p.id for p in store.lease_pairs("proj", c, 3)] == [pairs[0]], "pair 2 is full (1 + 1 answers)"
    with pytest.raises(PairUnavailableError, match="takes no more answers"):
        store.answer(pairs[1], c, "left", NOW)  # never leased to c, and full
    _, new = make_project(store, 1, round=1, second_opinions=1, with_video=True)
    assert [p.id for p in store.lease_pairs("proj", c, 3)] == [new[0], pairs[0]], "an open pair comes first"
    frame = store.comparisons_frame("proj")
    assert sorted(Counter(frame["pair_id"]).values()) == [1, 2]
    assert sorted(store.training_pairs(project.id), key=str) and len(store.training_pairs(project.id)) == 3
    assert store.batch_progress("proj", 0) == (2, 2), "progress counts labels_per_pair per pair"


def test_lease_pairs_leaves_out_excluded_pairs(store):
    """``exclude``: pairs the Label page could not show are neither renewed, nor leased
    anew, nor handed out as second opinions; the rest fill the request."""
    _, pairs = make_project(store, 4, second_opinions=1, with_video=True)
    a, b = store.get_or_create_annotator("a"), store.get_or_create_annotator("b")
    assert [p.id for p in store.lease_pairs("proj", a, 2)] == pairs[:2]
    assert [p.id for p in store.lease_pairs("proj", a, 2, exclude=[pairs[0]])] == [pairs[1], pairs[2]], \
        "a held pair in exclude is not renewed; the next free pair takes its place"
    assert [p.id for p in store.lease_pairs("proj", a, 4, exclude=(pairs[0], pairs[0]))] == pairs[1:]
    for pair in pairs:
        store.answer(pair, a, "left", NOW)
    assert [p.id for p in store.lease_pairs("proj", b, 4, exclude={pairs[3], pairs[1]})] == [pairs[2], pairs[0]], \
        "second opinions leave out the excluded completed pairs too (newest first)"
    assert [p.id for p in store.lease_pairs("proj", b, 4)] == [pairs[2], pairs[0], pairs[3], pairs[1]], \
        "without exclude: b's held second opinions (renewed), then the others, newest first"


@pytest.mark.parametrize("second_opinions", [1, 2])
def test_many_threads_with_second_opinions_fill_each_pair_exactly(store, second_opinions):
    _, pairs = make_project(store, 20, second_opinions=second_opinions, with_video=True)
    url, artifacts = store.url.render_as_string(hide_password=False), str(store.artifact_dir)
    with ThreadPoolExecutor(6) as pool:
        answered = [x for r in pool.map(lambda i: annotate_until_empty(url, artifacts, "proj", [f"t{i}"]), range(6))
                    for x in r]
    frame = store.comparisons_frame("proj")
    assert max(Counter(int(p) for p in frame["pair_id"]).values()) <= 1 + second_opinions, "over the cap"
    # a thread stops at its first "nothing for you", which can come while another holds the
    # last pairs: fresh annotators, one after the other, fill what is left
    answered += annotate_until_empty(url, artifacts, "proj", ["late1", "late2", "late3"])
    frame = store.comparisons_frame("proj")
    stored = {(int(p), a): int(c) for p, a, c in zip(frame["pair_id"], frame["annotator"], frame["comparison_id"])}
    assert {(p, a): c for p, a, c in answered} == stored and len(answered) == len(stored), "lost or phantom answers"
    assert set(Counter(int(p) for p in frame["pair_id"]).values()) == {1 + second_opinions}
    assert store.batch_progress("proj") == (len(pairs), len(pairs))


def test_threads_sharing_one_store_with_labels_per_pair(store):
    _, pairs = make_project(store, 15, labels_per_pair=3)

    def annotate(name):
        # None means "nothing for you right now": on PostgreSQL a pair that another
        # transaction holds locked at that instant is skipped (SKIP LOCKED), so an
        # annotator stops only when None is the answer three times in a row.
        out = []
        me = store.get_or_create_annotator(name)
        misses = 0
        while misses < 3:
            pair = store.next_pair("proj", me)
            if pair is None:
                misses += 1
                time.sleep(0.05)
                continue
            misses = 0
            out.append((pair.id, name, store.answer(pair.id, me, "left", NOW).id))
        return out

    with ThreadPoolExecutor(6) as pool:
        answered = [x for r in pool.map(annotate, [f"a{i}" for i in range(6)]) for x in r]
    _check_exactly_once(store, pairs, answered, k=3)


def test_many_processes_answering_at_once(store):
    _, pairs = make_project(store, 60)
    url, artifacts = store.url.render_as_string(hide_password=False), str(store.artifact_dir)
    jobs = [(url, artifacts, "proj", [f"p{i}a", f"p{i}b"]) for i in range(4)]
    with SPAWN.Pool(4) as pool:
        answered = [x for r in pool.starmap(annotate_until_empty, jobs) for x in r]
    _check_exactly_once(store, pairs, answered, k=1)
    assert len({a for _, a, _ in answered}) > 1, "work was shared between annotators"


def test_no_pair_leased_twice_across_processes(store):
    _, pairs = make_project(store, 6)
    url, artifacts = store.url.render_as_string(hide_password=False), str(store.artifact_dir)
    jobs = [(url, artifacts, "proj", [f"w{i}-{j}" for j in range(2)]) for i in range(4)]
    with SPAWN.Pool(4) as pool:
        leases = [x for r in pool.starmap(lease_once, jobs) for x in r]
    got = [p for _, p in leases if p is not None]
    assert len(got) == 6 and sorted(got) == sorted(pairs), "each pair leased exactly once"
    assert sum(p is None for _, p in leases) == 2


# --------------------------------------------------------------------------- reports


def _answer_script(store: Store, script: dict[str, list[str]]) -> list[int]:
    """Answer pair i with script[annotator][i] (labels_per_pair must allow it)."""
    pairs = []
    for name, outcomes in script.items():
        me = store.get_or_create_annotator(name)
        for outcome in outcomes:
            pair = store.next_pair("proj", me)
            store.answer(pair.id, me, outcome, NOW)
            pairs.append(pair.id)
    return pairs


def test_frame_stats_agreement_and_training_pairs(store):
    make_project(store, 4, labels_per_pair=2)
    _answer_script(
        store,
        {"ann": ["left", "right", "equal", "skip"], "bob": ["left", "left", "equal", "right"]},
    )
    frame = store.comparisons_frame("proj")
    assert len(frame) == 8
    assert list(frame.columns) == [
        "comparison_id", "pair_id", "round", "policy_version_id", "annotator_id", "annotator",
        "outcome", "p_left", "shown_at", "answered_at", "left_clip_id", "right_clip_id",
        "left_seed", "right_seed",
    ]  # fmt: skip
    assert frame["p_left"].isna().sum() == 1
    assert not {"left_return", "left_success"} & set(frame.columns)
    assert str(frame["answered_at"].dt.tz) == "UTC"
    assert (frame["left_seed"] == frame["right_seed"]).all()
    gt = store.comparisons_frame("proj", annotator="bob", include_ground_truth=True)
    assert len(gt) == 4 and set(gt["annotator"]) == {"bob"}
    assert {"left_return", "right_return", "left_success", "right_success"} <= set(gt.columns)
    assert len(store.comparisons_frame("proj", round=5)) == 0

    stats = store.annotator_stats("proj")
    assert stats.loc["ann", ["n_answers", "n_left", "n_right", "n_equal", "n_skip"]].tolist() == [4, 1, 1, 1, 1]
    assert stats.loc["ann", "tie_rate"] == 0.25 and stats.loc["ann", "skip_rate"] == 0.25
    assert stats.loc["ann", "left_rate"] == 0.5
    assert stats.loc["bob", "left_rate"] == pytest.approx(2 / 3)
    assert stats.loc["bob", "median_seconds"] > 0

    agreement = store.pairwise_agreement("proj")
    assert agreement.to_dict("records") == [
        {"annotator_a": "ann", "annotator_b": "bob", "n_shared": 3, "n_agree": 2, "agreement": 2 / 3}
    ]

    training = store.training_pairs("proj")
    assert len(training) == 7 == store.count_training_pairs("proj")
    assert store.count_training_pairs("proj", max_round=0) == 7  # every pair here is of round 0
    assert store.count_training_pairs("proj", max_round=-1) == 0 == len(store.training_pairs("proj", max_round=-1))
    assert Counter(p for _, _, p in training) == {1.0: 3, 0.0: 2, 0.5: 2}
    left, right, _ = training[0]
    assert left.reset_seed == right.reset_seed and left.gt_return is not None
    arrays = store.artifacts.load_segment(left.segment_path, left.segment_sha256)
    assert arrays["observations"].shape == (left.length, 4)


def test_empty_reports(store):
    store.create_project("proj", "t")
    assert store.batch_progress("proj") == (0, 0)
    assert store.comparisons_frame("proj").empty
    assert store.annotator_stats("proj").empty
    assert store.pairwise_agreement("proj").empty
    assert store.training_pairs("proj") == [] and store.count_training_pairs("proj") == 0
    assert isinstance(store.comparisons_frame("proj"), pd.DataFrame)


def test_forked_child_does_not_touch_the_parents_connections(store):
    """A forked child (e.g. a DataLoader worker) must open its own connections: closing
    inherited ones would shut down the parent's database sessions."""
    store.create_project("proj", "t")

    def session_id() -> int:
        with store.engine.connect() as conn:
            if store.backend == "postgresql":
                return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            return id(conn.connection.dbapi_connection)

    before = session_id()
    pid = os.fork()
    if pid == 0:  # child: use the store, then close everything it holds
        code = 1
        try:
            store.get_or_create_annotator("child")
            store.engine.dispose()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert session_id() == before, "the parent's pooled connection survived the child"
    assert store.get_annotator("child").name == "child"
