"""Streamlit AppTests of every page, on a real bootstrapped project (no browser).

The pair player is a components-v2 element that runs only in a browser; its answers are
covered by tests/test_app_browser.py. Here: what Python renders and stores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from fkpd.studio import round_defaults

from conftest_app import ADMIN_PASSWORD, PAIRS, PROJECT, bootstrapped_project, project_dir, project_store, \
    studio_env  # noqa: F401  (fixtures are used by name)

APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")


@pytest.fixture
def app(project_dir, monkeypatch):
    for k, v in studio_env(project_dir).items():
        monkeypatch.setenv(k, v)
    # Streamlit's script runner installs the app script as sys.modules["__main__"]; left
    # there, every later multiprocessing "spawn" child of this pytest process would run
    # the app script on start-up (and the evaluation pools of other tests would hang).
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    st.cache_resource.clear()  # the store is cached per server process; each test has its own
    yield lambda: AppTest.from_file(APP, default_timeout=60)
    st.cache_resource.clear()


def texts(at) -> str:
    parts = [e.value for kind in ("markdown", "info", "warning", "error", "success", "caption", "subheader",
                                  "header", "title") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def test_label_page_asks_a_name_once_and_shows_instructions_and_progress(app, project_store):
    at = app()
    at.run()
    assert not at.exception
    assert "Who is labelling?" in texts(at)
    submit = next(b for b in at.button if b.label == "Start labelling")
    submit.click().run()
    assert any("Please enter your name" in e.value for e in at.error), "an empty name is refused"
    assert project_store.list_annotators() == []
    at.text_input(key="annotator_input").input("ada")
    next(b for b in at.button if b.label == "Start labelling").click().run()
    assert not at.exception
    assert at.session_state["annotator"] == "ada" and at.query_params["annotator"] == "ada"
    page = texts(at)
    assert "Watch both clips" in page, "the project's instructions are shown"
    assert "Keys: ← left" in page
    assert [a.name for a in project_store.list_annotators()] == ["ada"]
    bob = project_store.get_or_create_annotator("bob")
    assert project_store.next_pair(PROJECT, bob).id == 4, \
        "the page leased the current pair and the two ahead (pairs 1 to 3) to ada"
    at.run()  # a rerun keeps the name (asked once)
    assert "Who is labelling?" not in texts(at)


def test_label_page_waits_with_a_clear_state_when_the_batch_is_done(app, project_store):
    ada = project_store.get_or_create_annotator("ada")
    while (pair := project_store.next_pair(PROJECT, ada)) is not None:
        project_store.answer(pair.id, ada, "left")
    at = app()
    at.query_params["annotator"] = "ada"
    at.run()
    assert not at.exception
    assert "All pairs of this batch are labelled" in texts(at)
    assert f"{PAIRS} of {PAIRS} answers" in texts(at)


def test_label_page_shows_a_placeholder_for_a_missing_video_and_skips_the_pair(app, project_store):
    ada = project_store.get_or_create_annotator("ada")
    first = project_store.next_pair(PROJECT, ada)
    project_store.release(first.id, ada)
    first.right.video_file.unlink()
    at = app()
    at.query_params["annotator"] = "ada"
    at.run()
    assert not at.exception
    assert any(f"Pair {first.id} was set aside" in w.value for w in at.warning)
    assert [p.id for p in project_store.lease_pairs(PROJECT, ada, 5)][0] != first.id
    assert project_store.batch_progress(PROJECT) == (0, PAIRS - 1)


def test_rounds_page_admin_only_trigger_and_failed_round(app, project_store):
    at = app()
    at.switch_page("pages/rounds.py").run()
    assert not at.exception
    assert "Only an admin can start a round" in texts(at)
    assert not [b for b in at.button if b.label == "Run alignment round"]
    assert at.metric[0].value == "v1 (round 0)"
    # A wrong password, then the right one.
    at.text_input(key="admin_pw").input("nope")
    next(b for b in at.button if b.label == "Sign in").click().run()
    assert any("Wrong password" in e.value for e in at.error)
    assert not at.session_state["is_admin"] if "is_admin" in at.session_state else True
    at.text_input(key="admin_pw").input(ADMIN_PASSWORD)
    next(b for b in at.button if b.label == "Sign in").click().run()
    assert at.session_state["is_admin"] is True
    run = lambda: next(b for b in at.button if b.label == "Run alignment round").click().run()  # noqa: E731
    run()
    assert any("no comparison to train on" in e.value for e in at.error), "nothing labelled yet"
    ada = project_store.get_or_create_annotator("ada")
    project_store.answer(project_store.next_pair(PROJECT, ada).id, ada, "left")
    run()
    assert any("Queued alignment round" in s.value for s in at.success)
    job = project_store.jobs.list(PROJECT, status="queued")[0]
    assert job.kind == "alignment_round" and job.params["regularizer"] == "forward"
    # The job fails (as a crashed round would): the page shows the error.
    claimed = project_store.jobs.claim("w1")
    project_store.jobs.fail(claimed.id, "Traceback (most recent call last):\nRoundError: the GPU caught fire",
                            worker_id="w1")
    at.run()
    assert any("the GPU caught fire" in e.value for e in at.error)
    assert "Labelling continues" in texts(at)
    hist = at.dataframe[0].value
    assert hist["round"].tolist() == [0]


def _admin_on_rounds_page(app):
    at = app()
    at.switch_page("pages/rounds.py").run()
    at.text_input(key="admin_pw").input(ADMIN_PASSWORD)
    next(b for b in at.button if b.label == "Sign in").click().run()
    assert at.session_state["is_admin"] is True
    return at


def test_rounds_page_objective_and_dataset_share_reach_the_round(app, project_store):
    """The Rounds page's objective starts at the default objective, and its dataset share
    (issue #12: mix dataset pairs into a batch) reaches the round's job and is remembered."""
    ada = project_store.get_or_create_annotator("ada")
    project_store.answer(project_store.next_pair(PROJECT, ada).id, ada, "left")
    at = _admin_on_rounds_page(app)
    assert at.selectbox(key="objective").value == round_defaults()["objective"]
    assert at.number_input(key="dataset_share").value == 0.0, "version 0's batch settings"
    at.selectbox(key="objective").set_value("additive")
    at.number_input(key="dataset_share").set_value(0.25)
    next(b for b in at.button if b.label == "Run alignment round").click().run()
    assert not at.exception and any("Queued alignment round" in s.value for s in at.success)
    job = project_store.jobs.list(PROJECT, status="queued")[0]
    assert job.params["objective"] == "additive" and job.params["dataset_share"] == 0.25
    again = _admin_on_rounds_page(app)  # a new session: the form starts from the remembered round
    assert again.number_input(key="dataset_share").value == 0.25


def test_data_page_tables_filters_and_export(app, project_store):
    at = app()
    at.switch_page("pages/data.py").run()
    assert "No comparisons yet" in texts(at)
    for name, outcome in (("ada", "left"), ("bob", "right"), ("bob", "equal")):
        who = project_store.get_or_create_annotator(name)
        project_store.answer(project_store.next_pair(PROJECT, who).id, who, outcome)
    at.run()
    assert not at.exception
    assert len(at.dataframe[0].value) == 3
    stats = at.dataframe[1].value
    assert stats.loc["ada", "left_rate"] == 1.0 and sorted(stats.index) == ["ada", "bob"]
    at.multiselect[1].select("bob").run()
    assert at.dataframe[0].value["annotator"].tolist() == ["bob", "bob"]
    stats = at.dataframe[1].value
    assert stats.loc["bob", "tie_rate"] == pytest.approx(0.5)
    assert stats.index.tolist() == ["bob"], "the statistics follow the filters (issue #13)"
    next(b for b in at.button if b.label == "Prepare export").click().run()
    assert not at.exception
    fmt, blob = at.session_state["export"]
    assert fmt == "parquet" and blob[:4] == b"PAR1"
    import io

    import pyarrow.parquet as pq

    exported = pq.read_table(io.BytesIO(blob)).to_pandas()
    assert exported["annotator"].tolist() == ["bob", "bob"], "the export follows the filters (issue #13)"


def test_data_page_admin_changes_who_answers_what(app, project_store):
    """Labels per pair, second opinions and the lease time are set on the Data page by an
    admin and reach the store's leasing: with second opinions at 0 a completed pair is no
    longer handed to a second annotator."""
    from fkpd.studio import StudioError, set_assignment

    at = app()
    at.switch_page("pages/data.py").run()
    assert not any(b.label == "Save assignment settings" for b in at.button), "for admins only"
    at.text_input(key="admin_pw").input(ADMIN_PASSWORD)
    next(b for b in at.button if b.label == "Sign in").click().run()
    assert not at.exception
    assert at.number_input(key="second_opinions").value == 1, "the store's default"
    at.number_input(key="second_opinions").set_value(0)
    at.number_input(key="lease_seconds").set_value(300.0)
    next(b for b in at.button if b.label == "Save assignment settings").click().run()
    assert not at.exception and any("Saved" in e.value for e in at.success)
    settings = project_store.get_project(PROJECT).settings
    assert (settings["labels_per_pair"], settings["second_opinions"], settings["lease_seconds"]) == (1, 0, 300.0)

    ada, bob = project_store.get_or_create_annotator("ada"), project_store.get_or_create_annotator("bob")
    pairs = project_store.lease_pairs(PROJECT, ada, count=10_000)
    for pair in pairs:
        project_store.answer(pair.id, ada, "left")
    assert pairs and project_store.lease_pairs(PROJECT, bob, count=5) == [], \
        "every pair is done and second opinions are off: nothing for bob"
    set_assignment(project_store, project_store.get_project(PROJECT), second_opinions=1)
    assert len(project_store.lease_pairs(PROJECT, bob, count=5)) > 0, "second opinions on again: bob gets some"

    with pytest.raises(StudioError, match="labels_per_pair"):
        set_assignment(project_store, project_store.get_project(PROJECT), labels_per_pair=0, second_opinions=3)
    with pytest.raises(StudioError, match="unknown"):
        set_assignment(project_store, project_store.get_project(PROJECT), min_view_seconds=2)
    assert project_store.get_project(PROJECT).settings["second_opinions"] == 1, "a refused change changes nothing"


def test_compare_page_queues_a_comparison_of_two_versions(app, project_store):
    at = app()
    at.switch_page("pages/compare.py").run()
    assert not at.exception
    v0 = project_store.latest_policy_version(PROJECT)
    assert at.selectbox[0].value == v0.id
    next(b for b in at.button if b.label == "Roll out both on the same seeds").click().run()
    jobs = project_store.jobs.list(PROJECT, status="queued")
    assert [j.kind for j in jobs] == ["compare"] and jobs[0].params["version_a"] == v0.id


def test_rounds_page_flags_a_worse_version_and_rolls_it_back(app, project_store):
    from fkpd.studio import current_version
    from fkpd.train.evaluate import compare_with_parent

    v0 = project_store.latest_policy_version(PROJECT)
    n = v0.metrics["episodes"]
    cmp = compare_with_parent({"episode_successes": [0] * n, "episode_returns": [0.0] * n},
                              {"episode_successes": [1] * n, "episode_returns": [5.0] * n})
    v1 = project_store.add_policy_version(PROJECT, v0.checkpoint_path, parent_id=v0.id, round=1,
                                          metrics={"kind": "alignment_round", "success_rate": 0.0, "vs_parent": cmp})
    at = app()
    at.switch_page("pages/rounds.py").run()
    assert not at.exception
    assert any(f"v{v1.id} evaluated worse than its parent v{v0.id}" in w.value for w in at.warning)
    label = f"Roll back: serve v{v0.id} again"
    assert not [b for b in at.button if b.label == label], "only an admin can roll back"
    at.text_input(key="admin_pw").input(ADMIN_PASSWORD)
    next(b for b in at.button if b.label == "Sign in").click().run()
    next(b for b in at.button if b.label == label).click().run()
    assert not at.exception
    project = project_store.get_project(PROJECT)
    assert current_version(project_store, project).id == v0.id
    assert not at.warning, "the served version is no longer flagged"
    assert at.metric[0].value == f"v{v0.id} (round 0)"


def test_admin_sign_in_on_the_page_is_rate_limited(app):
    at = app()
    at.switch_page("pages/rounds.py").run()
    for _ in range(4):
        at.text_input(key="admin_pw").input("nope")
        next(b for b in at.button if b.label == "Sign in").click().run()
    # the 4th wrong guess starts a pause (3 are free), and the page says how long it is
    assert any("Wrong password. The next attempt is possible in" in e.value for e in at.error), \
        [e.value for e in at.error]
    assert at.session_state["is_admin"] is not True if "is_admin" in at.session_state else True
