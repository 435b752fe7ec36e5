"""AppTests of issue #13's pages: the automatic-round setting and status on the Rounds page,
version names on the Label page that match the Rounds page, and what the Label page says
while no pair is open."""

from __future__ import annotations

from conftest_app import ADMIN_PASSWORD, PAIRS, PROJECT, bootstrapped_project, project_dir, project_store, \
    studio_env  # noqa: F401  (fixtures are used by name)
from test_app import app, texts  # noqa: F401

from fkpd.studio import auto_round_state


def _sign_in(at) -> None:
    at.text_input(key="admin_pw").input(ADMIN_PASSWORD)
    next(b for b in at.button if b.label == "Sign in").click().run()


def test_rounds_page_shows_when_the_next_round_starts_and_an_admin_sets_it(app, project_store):
    ada = project_store.get_or_create_annotator("ada")
    project_store.answer(project_store.next_pair(PROJECT, ada).id, ada, "left")
    at = app()
    at.switch_page("pages/rounds.py").run()
    assert not at.exception
    assert f"1 of {PAIRS} new comparisons: the next round starts automatically after {PAIRS - 1} more" in texts(at)
    assert "Pairs waiting for annotators" in texts(at)
    assert not [f for f in at.checkbox if f.key == "auto_on"], "only an admin changes the setting"
    _sign_in(at)
    at.checkbox(key="auto_on").uncheck()
    next(b for b in at.button if b.label == "Save automatic rounds").click().run()
    assert any("Automatic rounds off" in s.value for s in at.success)
    assert not auto_round_state(project_store, project_store.get_project(PROJECT)).enabled
    at.run()
    assert "Automatic rounds are off" in texts(at)
    at.checkbox(key="auto_on").check()
    at.number_input(key="auto_every").set_value(2)
    next(b for b in at.button if b.label == "Save automatic rounds").click().run()
    assert auto_round_state(project_store, project_store.get_project(PROJECT)).every == 2
    at.run()
    assert "1 of 2 new comparisons" in texts(at)
    assert at.metric[0].value == "v1 (round 0)"


def test_label_page_names_the_version_as_the_rounds_page_does(app, project_store):
    at = app()
    at.query_params["annotator"] = "ada"
    at.run()
    assert not at.exception
    assert f"Clips of v1 (round 0): 0 of {PAIRS} answers" in texts(at)
    assert "Batch of round" not in texts(at)
    at.switch_page("pages/rounds.py").run()
    assert at.metric[0].value == "v1 (round 0)"


def test_label_page_says_more_pairs_are_coming_once_the_batch_is_done(app, project_store):
    ada = project_store.get_or_create_annotator("ada")
    while (pair := project_store.next_pair(PROJECT, ada)) is not None:
        project_store.answer(pair.id, ada, "left")
    project_store.jobs.enqueue(PROJECT, "top_up", {})
    at = app()
    at.query_params["annotator"] = "ada"
    at.run()
    assert not at.exception
    assert "More pairs are on the way" in texts(at)
