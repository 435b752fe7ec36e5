"""Several projects in one app (issue #16, point 1), without a browser: the sidebar's
project picker, the ``?project=`` URL parameter (with ``?annotator=`` and invite tokens),
and the Projects page's New-project form and its errors (Streamlit AppTest on a real
store: the bootstrapped ``door-open`` project of conftest_app plus a second one whose
bootstrap stays queued). The browser run is tests/test_projects_browser.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from conftest_app import ADMIN_PASSWORD, PROJECT, bootstrapped_project, project_dir, project_store, \
    studio_env  # noqa: F401  (fixtures are used by name)
from fkpd.studio import StudioError
from fkpd.studio.projects import bootstrap_settings, create_project, dataset_param, resolve_project

APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")
MAZE = "d4rl/maze2d-umaze"
#: A maze project's bootstrap; nothing runs it in these tests (it stays queued).
MAZE_BOOTSTRAP = {"dataset_episodes": 2, "max_episode_steps": 30, "bc_steps": 10, "pairs_per_batch": 2,
                  "segment_length": 8, "eval_episodes": 1, "render_size": 32, "n_envs": 2, "threads": 1}


@pytest.fixture
def app(project_dir, monkeypatch):
    for k, v in studio_env(project_dir).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # see tests/test_app.py
    st.cache_resource.clear()
    yield lambda: AppTest.from_file(APP, default_timeout=60)
    st.cache_resource.clear()


def _tab(app_dir: str, page: str) -> None:
    """The entry script's sidebar and one page, without st.navigation: every AppTest run
    of the entry script after the first runs the page alone, in Streamlit's old multipage
    mode (``app/pages/`` exists), where a second pick in the sidebar is not seen; this
    script keeps one mode."""
    import runpy
    import sys

    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    from studio_ui import project_picker, sidebar, studio

    s = studio()
    project_picker(s)
    sidebar(s)
    runpy.run_path(f"{app_dir}/pages/{page}.py", run_name="__page__")


def texts(at) -> str:
    parts = [e.value for kind in ("markdown", "info", "warning", "error", "success", "caption", "subheader",
                                  "header", "title") for e in getattr(at, kind)]
    return "\n".join(str(p) for p in parts)


def _metric(at, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_the_link_and_the_picker_choose_the_project_and_keep_the_name(app, project_store):
    create_project(project_store, "maze", MAZE, MAZE_BOOTSTRAP, identity="open")
    at = app()
    at.query_params["annotator"] = "ada"
    at.run()
    assert not at.exception
    assert at.query_params["project"] == PROJECT, "the default project (FKPD_TASK) goes into the URL"
    picker = at.sidebar.selectbox(key="project_picker")
    assert picker.value == PROJECT and picker.options == [f"{PROJECT} · metaworld/door-open-v3",
                                                          f"maze · {MAZE}"]
    assert "Keys: ← left" in texts(at) and "pair_player" in at.session_state  # door-open's pairs are shown

    picker.set_value("maze").run()
    assert not at.exception
    assert (at.query_params["project"], at.query_params["annotator"]) == ("maze", "ada")
    assert at.session_state["annotator"] == "ada", "the typed name stays (annotators are shared by projects)"
    assert "pair_player" not in at.session_state, "door-open's page state is gone"
    page = texts(at)
    assert "red goal disc" in page, "maze's instructions"
    assert "the first batch is being prepared" in page, "maze's bootstrap is still queued"
    maze = project_store.get_project("maze")
    assert project_store.jobs.list(maze.id)[0].status == "queued"

    at.switch_page("pages/rounds.py").run()  # a page switch keeps the project
    assert not at.exception and at.query_params["project"] == "maze"
    assert _metric(at, "Current policy") == "none yet"

    link = app()  # a link opens its project on any page
    link.query_params["project"] = PROJECT
    link.switch_page("pages/rounds.py").run()
    assert not link.exception and _metric(link, "Current policy").startswith("v1")

    bad = app()
    bad.query_params["project"] = "no-such-project"
    bad.run()
    assert not bad.exception
    assert "There is no project 'no-such-project'" in "\n".join(w.value for w in bad.sidebar.warning)
    assert bad.query_params["project"] == PROJECT


def test_an_invite_link_is_valid_in_its_own_project_only(app, project_store):
    """Per-project identity: each project's mode and invite tokens; a token is put aside
    when the tab switches project and comes back with its project."""
    from fkpd.studio.identity import create_invite

    project_store.update_project(PROJECT, identity="invite")
    create_project(project_store, "maze", MAZE, MAZE_BOOTSTRAP, identity="invite")
    token = create_invite(project_store, project_store.get_project(PROJECT), "bob").token
    app()  # the environment
    at = AppTest.from_function(_tab, args=(str(Path(APP).parent), "label"), default_timeout=60)
    at.query_params["token"] = token  # an invite link (it names no project): the token's project is found
    at.run()
    assert not at.exception
    assert at.query_params["project"] == PROJECT and at.session_state["annotator"] == "bob"
    at.sidebar.selectbox(key="project_picker").set_value("maze").run()
    assert not at.exception
    assert "Invitation needed" in texts(at) and "token" not in at.query_params
    assert "annotator" not in at.session_state
    at.sidebar.selectbox(key="project_picker").set_value(PROJECT).run()
    assert not at.exception
    assert at.query_params["token"] == token and at.session_state["annotator"] == "bob"
    assert "Invitation needed" not in texts(at)


def test_the_new_project_form_refuses_bad_input_and_queues_the_bootstrap(app, project_store):
    at = app()
    at.switch_page("pages/projects.py").run()
    assert not at.exception
    assert "Only an admin can create a project." in texts(at)
    assert at.dataframe[0].value["project"].tolist() == [PROJECT]
    at.text_input(key="admin_pw").input(ADMIN_PASSWORD)
    next(b for b in at.button if b.label == "Sign in").click().run()

    def submit() -> str:
        next(b for b in at.button if b.label == "Create project").click().run()
        assert not at.exception
        return "\n".join(e.value for e in at.error)

    assert "the project needs a name" in submit()
    at.text_input(key="np_name").input(PROJECT)
    assert f"project '{PROJECT}' exists already" in submit()
    at.text_input(key="np_name").input("maze")
    at.text_area(key="np_extra").input("{")
    assert "Other bootstrap settings is not valid JSON" in submit()
    at.text_area(key="np_extra").input('{"bc_stepz": 3}')
    assert "unknown bootstrap parameter(s) ['bc_stepz']" in submit()
    at.text_area(key="np_extra").input('{"render_size": 8}')
    assert "render_size" in submit()
    at.text_area(key="np_extra").input("")
    at.radio(key="np_dataset_kind").set_value("d4rl")
    at.text_input(key="np_dataset").input("no-such-dataset-v0")
    assert "'no-such-dataset-v0' is not a D4RL dataset name" in submit()
    at.radio(key="np_dataset_kind").set_value("file")
    at.text_input(key="np_dataset").input("  ")
    assert "no file path was given" in submit()
    assert [p.name for p in project_store.list_projects()] == [PROJECT], "nothing was created"

    at.radio(key="np_dataset_kind").set_value("generated")
    at.selectbox(key="np_task").set_value(MAZE)
    at.radio(key="np_identity").set_value("open")
    at.number_input(key="np_bc_steps").set_value(10)
    at.number_input(key="np_pairs_per_batch").set_value(2)
    at.number_input(key="np_auto").set_value(0)
    at.text_area(key="np_instructions").input("Prefer the ball that reaches the disc.")
    at.text_area(key="np_extra").input('{"render_size": 32, "bc_steps": 99}')
    assert submit() == ""
    maze = project_store.get_project("maze")
    assert (maze.task_id, maze.identity, maze.instructions) == (MAZE, "open", "Prefer the ball that reaches the disc.")
    assert maze.settings["auto_round_every"] == 0
    job, = project_store.jobs.list(maze.id)
    assert (job.kind, job.status) == ("bootstrap", "queued")
    assert job.params == {"render_size": 32, "bc_steps": 10, "pairs_per_batch": 2}, "changed fields win over JSON"
    assert "Created project 'maze'" in texts(at)
    next(b for b in at.button if b.label == "Open maze").click().run()
    assert not at.exception and at.query_params["project"] == "maze"


def test_shared_project_helpers(tmp_path):
    """What the form and `fkpd projects create` share: dataset sources, settings, lookup."""
    assert dataset_param("generated", "ignored", MAZE) == ""
    assert dataset_param("minari", "D4RL/door/human-v2", MAZE) == "minari:D4RL/door/human-v2"
    with pytest.raises(StudioError, match="give the Minari dataset id"):
        dataset_param("minari", "minari:", MAZE)
    with pytest.raises(StudioError, match="there is no file"):
        dataset_param("file", str(tmp_path / "missing.hdf5"), MAZE)
    assert dataset_param("file", str(tmp_path / "missing.hdf5"), MAZE, check_files=False).endswith("missing.hdf5")
    with pytest.raises(StudioError, match="dataset source must be one of"):
        dataset_param("url", "http://x", MAZE)
    (tmp_path / "d.hdf5").write_bytes(b"")
    params = bootstrap_settings({"bc_steps": 5, "seed": None, "dataset": str(tmp_path / "d.hdf5")}, '{"bc_steps": 1}')
    assert params == {"bc_steps": 5, "dataset": str((tmp_path / "d.hdf5").resolve())}
    with pytest.raises(StudioError, match="must be a JSON object"):
        bootstrap_settings({}, "[1]", extra_name="--bootstrap")
    with pytest.raises(StudioError, match="holds no project"):
        resolve_project([], "x", "door-open")
