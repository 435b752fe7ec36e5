"""Label quality in the store (issue #13, point 5): gold pairs, excluding an annotator
from training and taking them back, the minimum viewing time of answers, and migration
0003 on a store that holds data. Runs on SQLite and, with ``FKPD_TEST_DATABASE_URL`` set,
on PostgreSQL (the store fixtures of conftest_store)."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone

import pytest
from sqlalchemy import text

from conftest_store import artifact_dir, clock, clocked_store, db_url, make_project, store  # noqa: F401
from fkpd.store import NotFoundError, Store, StoreInputError, TooEarlyError
from fkpd.store.db import WRITE, alembic_config, current_revision, head_revision, make_engine
from fkpd.store.quality import clear_winner

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _answer(store: Store, name: str, outcomes: dict[int, str], other: str = "left") -> None:
    """``name`` answers the pairs handed out (oldest first) until every pair of ``outcomes``
    (pair id -> outcome) is answered; pairs not named get ``other``."""
    me = store.get_or_create_annotator(name)
    outcomes = dict(outcomes)
    while outcomes:
        pair = store.next_pair("proj", me)
        assert pair is not None, outcomes
        store.answer(pair.id, me, outcomes.pop(pair.id, other), NOW)


def test_gold_pairs_are_marked_hidden_and_scored(store):
    _, pair_ids = make_project(store, 6)  # clip k of a pair succeeds iff k is odd: the right clip wins
    assert store.mark_gold_pairs("proj", pair_ids, share=0.0) == {}
    gold = store.mark_gold_pairs("proj", pair_ids, share=0.5, seed=1)
    assert len(gold) == 3 and set(gold.values()) == {"right"}
    assert store.gold_pairs("proj") == gold
    assert store.mark_gold_pairs("proj", list(gold), share=1.0) == {}, "a gold pair is not marked twice"
    view = store.next_pair("proj", store.get_or_create_annotator("ann"))
    assert "gold" not in {f.name for f in dataclasses.fields(view)} | {f.name for f in dataclasses.fields(view.left)}
    store.release(view.id, "ann")

    g1, g2, g3 = sorted(gold)
    _answer(store, "ann", {p: "left" for p in pair_ids} | {g1: "left", g2: "right", g3: "skip"})
    stats = store.annotator_stats("proj")
    assert stats.loc["ann", ["gold_n", "gold_correct"]].tolist() == [2, 1]  # the skip does not count
    assert stats.loc["ann", "gold_accuracy"] == 0.5
    assert len(store.training_pairs("proj")) == 5, "answers to gold pairs train like any other"

    with pytest.raises(StoreInputError, match="gold share must be a number from 0 to 1"):
        store.mark_gold_pairs("proj", pair_ids, share=1.5)
    with pytest.raises(NotFoundError, match="not found"):
        store.mark_gold_pairs("proj", [10_000], share=1.0)
    store.create_project("other", "metaworld/door-open-v3")
    with pytest.raises(StoreInputError, match="belong to another project"):
        store.mark_gold_pairs("other", pair_ids, share=1.0)


def test_clear_winner_from_success_or_return_margin():
    class Clip:
        def __init__(self, ret, success=None):
            self.gt_return, self.gt_success = ret, success

    assert clear_winner(Clip(1.0, True), Clip(9.0, False), 0.5) == "left"  # success decides first
    assert clear_winner(Clip(10.0), Clip(4.0), 0.5) == "left"
    assert clear_winner(Clip(10.0), Clip(6.0), 0.5) is None  # a 40 % margin is not clear at 0.5
    assert clear_winner(Clip(0.0), Clip(2.0), 0.5) == "right"
    assert clear_winner(Clip(3.0), Clip(3.0), 0.0) is None
    assert clear_winner(Clip(None), Clip(3.0), 0.0) is None


def test_excluding_an_annotator_and_taking_them_back(store):
    _, pair_ids = make_project(store, 3, labels_per_pair=2)
    _answer(store, "ann", dict(zip(pair_ids, ["left", "right", "equal"])))
    _answer(store, "bob", dict(zip(pair_ids, ["left", "left", "skip"])))
    assert store.count_training_pairs("proj") == 5

    excluded = store.exclude_annotator("proj", "bob", by="admin", reason="answers at random")
    assert (excluded.annotator, excluded.excluded_by, excluded.reason) == ("bob", "admin", "answers at random")
    assert store.exclude_annotator("proj", "bob", by="someone else") == excluded, "idempotent"
    assert [e.annotator for e in store.excluded_annotators("proj")] == ["bob"]
    training = store.training_pairs("proj")
    assert len(training) == 3 == store.count_training_pairs("proj")
    assert [p for _, _, p in training] == [1.0, 0.0, 0.5], "only ann's answers train"
    assert store.count_training_pairs("proj", include_excluded=True) == 5
    assert len(store.training_pairs("proj", include_excluded=True)) == 5
    assert len(store.comparisons_frame("proj")) == 6, "the comparisons stay in the store"
    stats = store.annotator_stats("proj")
    assert stats["excluded"].to_dict() == {"ann": False, "bob": True}
    assert stats.loc["ann", "agree_n"] == 2 and stats.loc["ann", "agreement"] == 0.5
    assert stats.loc["bob", "agreement"] == 0.5
    only_bob = store.annotator_stats("proj", annotators=["bob"])
    assert list(only_bob.index) == ["bob"] and only_bob.loc["bob", "agree_n"] == 2

    assert store.include_annotator("proj", "bob") is True
    assert store.include_annotator("proj", "bob") is False
    assert store.excluded_annotators("proj") == [] and store.count_training_pairs("proj") == 5
    with pytest.raises(NotFoundError):
        store.exclude_annotator("proj", "nobody")
    with pytest.raises(StoreInputError, match="reason"):
        store.exclude_annotator("proj", "ann", reason="x" * 1001)


def test_answers_before_the_minimum_viewing_time_are_refused(clocked_store, clock):
    store = clocked_store
    make_project(store, 3)  # clips of 6 steps at 30 fps: one loop lasts 0.2 s
    me = store.get_or_create_annotator("ann")
    first, second = store.lease_pairs("proj", me, 2)
    with pytest.raises(TooEarlyError, match="watch both clips for at least 0.2 s"):
        store.answer(first.id, me, "left", project="proj", min_view_seconds=1.5)  # capped at one loop
    assert store.comparisons_frame("proj").empty
    clock.advance(0.1)
    with pytest.raises(TooEarlyError):
        store.answer(first.id, me, "left", project="proj", min_view_seconds=1.5)
    clock.advance(0.15)
    assert store.answer(first.id, me, "left", project="proj", min_view_seconds=1.5).created
    # the prefetched pair was leased with the first, but is on screen only since that answer
    with pytest.raises(TooEarlyError):
        store.answer(second.id, me, "right", project="proj", min_view_seconds=0.15)
    clock.advance(0.2)
    assert store.answer(second.id, me, "right", project="proj", min_view_seconds=0.15).created
    third = store.next_pair("proj", me)
    assert store.answer(third.id, me, "skip", project="proj", min_view_seconds=1.5).created, "skips are not timed"
    assert store.comparisons_frame("proj")["outcome"].tolist() == ["left", "right", "skip"]


def test_without_a_minimum_answers_are_taken_at_once(store):
    make_project(store, 1)
    pair = store.next_pair("proj", store.get_or_create_annotator("ann"))
    assert store.answer(pair.id, "ann", "left", project="proj").created


def test_migration_0003_keeps_the_data_of_a_0002_store(db_url, artifact_dir):
    from alembic import command

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            conn.execution_options(**{WRITE: True})
            with conn.begin():
                cfg = alembic_config()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "0002")
                for sql in (
                    "INSERT INTO projects (name, task_id, instructions, settings, created_at, identity) VALUES "
                    "('proj', 'metaworld/door-open-v3', '', '{\"labels_per_pair\": 1, \"lease_seconds\": 120.0}', "
                    "'2026-01-01 00:00:00', 'open')",
                    "INSERT INTO annotators (name, is_admin, created_at) VALUES ('ann', false, '2026-01-01 00:00:00')",
                    "INSERT INTO policy_versions (project_id, round, metrics, created_at) VALUES "
                    "(1, 0, '{}', '2026-01-01 00:00:00')",
                    "INSERT INTO clips (policy_version_id, segment_path, segment_sha256, fps, length, gt_return, "
                    "gt_success, meta, created_at) VALUES (1, 'a.npz', '" + "0" * 64 + "', 30, 6, 1.0, true, '{}', "
                    "'2026-01-01 00:00:00'), (1, 'b.npz', '" + "1" * 64 + "', 30, 6, 2.0, false, '{}', "
                    "'2026-01-01 00:00:00')",
                    "INSERT INTO pairs (project_id, round, left_clip_id, right_clip_id, status, created_at, "
                    "completed_at) VALUES (1, 0, 1, 2, 'done', '2026-01-01 00:00:00', '2026-01-01 00:00:01')",
                    "INSERT INTO comparisons (pair_id, annotator_id, outcome, answered_at) VALUES "
                    "(1, 1, 'left', '2026-01-01 00:00:01')",
                ):
                    conn.execute(text(sql))
        with Store(db_url, artifact_dir) as store:
            assert current_revision(store.engine) == head_revision() == "0003"
            assert store.gold_pairs("proj") == {} and store.excluded_annotators("proj") == []
            assert store.comparisons_frame("proj")[["pair_id", "annotator", "outcome"]].values.tolist() == \
                [[1, "ann", "left"]]
            assert store.count_training_pairs("proj") == 1
            assert store.mark_gold_pairs("proj", [1], share=1.0) == {1: "left"}
            store.exclude_annotator("proj", "ann")
            assert store.count_training_pairs("proj") == 0
        with engine.connect() as conn:  # and back down: the pair and its answer stay
            conn.execution_options(**{WRITE: True})
            with conn.begin():
                cfg = alembic_config()
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, "0002")
            assert conn.execute(text("SELECT count(*) FROM comparisons")).scalar() == 1
            assert conn.execute(text("SELECT count(*) FROM pairs")).scalar() == 1
    finally:
        engine.dispose()


def test_prefs_export_excluded_and_worker_kinds_flags(tmp_path, capsys):
    from fkpd.cli import main
    from fkpd.store.export import load_export

    url, art = f"sqlite:///{tmp_path / 'fkpd.sqlite'}", str(tmp_path / "artifacts")
    common = ["--database-url", url, "--artifact-dir", art]
    with Store(url, art) as store:
        _, pair_ids = make_project(store, 2, labels_per_pair=2)
        _answer(store, "ann", dict(zip(pair_ids, ["left", "right"])))
        _answer(store, "bob", dict(zip(pair_ids, ["left", "left"])))
        store.exclude_annotator("proj", "bob")
        job = store.jobs.enqueue(store.get_project("proj").id, "bootstrap", {})
    for how, who in (("include", ["ann", "ann", "bob", "bob"]), ("omit", ["ann", "ann"])):
        out = tmp_path / f"{how}.parquet"
        assert main(["prefs", "export", "--project", "proj", "--out", str(out), "--excluded", how, *common]) == 0
        assert sorted(load_export(out).frame["annotator"]) == who
    assert "without excluded annotators (bob)" in capsys.readouterr().out

    assert main(["worker", "--once", "--poll-s", "0.05", "--kinds", "compare,top_up", *common]) == 0
    with Store(url, art) as store:
        assert store.jobs.get(job.id).status == "queued", "a --kinds compare,top_up worker leaves the bootstrap"
    capsys.readouterr()
    assert main(["worker", "--once", "--kinds", "bootstrapp", *common]) == 2
    err = capsys.readouterr().err
    assert "--kinds bootstrapp: no such job kind; known: alignment_round, bootstrap" in err
