"""Command-line parity with the app (issue #16, point 2): ``fkpd prefs export``,
``fkpd projects list|create|show``, ``fkpd rounds start`` and ``fkpd labels import
--create-project``, against a real store (SQLite, and PostgreSQL with
``FKPD_TEST_DATABASE_URL``). Every error is one line, exit status 2, and names the
command's flags."""

from __future__ import annotations

import json
import pickle
from datetime import datetime, timedelta, timezone
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest_store import artifact_dir, db_url, make_project, store  # noqa: F401  (fixtures are used by name)
from fkpd.cli import main
from fkpd.store.export import load_export
from fkpd.studio import export_bytes

TASK = "metaworld/door-open-v3"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _common(store) -> list[str]:
    return ["--database-url", store.url.render_as_string(hide_password=False), "--artifact-dir",
            str(store.artifact_dir)]


def _error(capsys, code: int) -> str:
    """The one stderr line of a command that failed with bad input."""
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def _labelled(store) -> None:
    """Project ``proj``: rounds 0 and 1 of 3 pairs each, answered by ada and bob in turn."""
    make_project(store, 3, round=0)
    make_project(store, 3, round=1)
    people = [store.get_or_create_annotator(n) for n in ("ada", "bob")]
    outcomes = ["left", "right", "equal", "skip"]
    i = 0
    while True:
        who = people[i % 2]
        pair = store.next_pair("proj", who)
        if pair is None:
            break
        store.answer(pair.id, who, outcomes[i % 4], NOW + timedelta(seconds=i))
        i += 1
    frame = store.comparisons_frame("proj")
    assert set(frame["round"]) == {0, 1} and set(frame["annotator"]) == {"ada", "bob"}


def _same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


@pytest.mark.parametrize("fmt,suffix", [("parquet", ".parquet"), ("hdf5", ".h5")])
@pytest.mark.parametrize("filters", [{}, {"rounds": [1]}, {"annotators": ["ada"]}, {"rounds": [0], "annotators": ["bob"]}])
def test_prefs_export_matches_the_data_page_download(store, tmp_path, capsys, fmt, suffix, filters):
    _labelled(store)
    project = store.get_project("proj")
    out = tmp_path / "exports" / f"labels{suffix}"
    argv = ["prefs", "export", "--project", "proj", "--format", fmt, "--out", str(out), *_common(store)]
    for key, values in filters.items():
        argv += [f"--{key}", *map(str, values)]
    assert main(argv) == 0
    expected = store.comparisons_frame("proj")
    if "rounds" in filters:
        expected = expected[expected["round"].isin(filters["rounds"])]
    if "annotators" in filters:
        expected = expected[expected["annotator"].isin(filters["annotators"])]
    assert f"wrote {len(expected)} comparisons of project 'proj'" in capsys.readouterr().out
    assert 0 < len(expected) < 12 or not filters

    # the Data page's download for the same filters
    page = tmp_path / f"page{suffix}"
    page.write_bytes(export_bytes(store, project, fmt, **filters))
    if fmt == "parquet":  # read back with pandas
        cli_frame, page_frame = pd.read_parquet(out), pd.read_parquet(page)
        assert len(cli_frame) == len(expected)
        assert cli_frame["comparison_id"].tolist() == expected["comparison_id"].tolist()
        arrays = [c for c in cli_frame.columns if c.endswith(("_observations", "_actions", "_rewards"))]
        _same(cli_frame.drop(columns=arrays), page_frame.drop(columns=arrays))
        for column in arrays:
            for x, y in zip(cli_frame[column], page_frame[column]):
                np.testing.assert_array_equal(np.stack(x) if x.dtype == object else x,
                                              np.stack(y) if y.dtype == object else y)
    else:  # read back with h5py
        with h5py.File(out, "r") as f, h5py.File(page, "r") as g:
            assert f.attrs["project"] == "proj" and list(f["comparisons"].attrs["columns"]) == \
                list(g["comparisons"].attrs["columns"])
            for name in f["comparisons"]:
                np.testing.assert_array_equal(f["comparisons"][name][()], g["comparisons"][name][()])
            assert f["comparisons"]["comparison_id"][()].tolist() == expected["comparison_id"].tolist()
            assert sorted(f["segments"]) == sorted(g["segments"])
            for clip in f["segments"]:
                for key in ("observations", "actions", "rewards"):
                    np.testing.assert_array_equal(f["segments"][clip][key][()], g["segments"][clip][key][()])
    back, page_back = load_export(out), load_export(page)
    _same(back.frame, page_back.frame)
    assert set(back.segments) == set(page_back.segments) == \
        set(expected["left_clip_id"]) | set(expected["right_clip_id"])


def test_prefs_export_errors_name_the_flags(store, tmp_path, capsys):
    _labelled(store)
    common = _common(store)
    out = str(tmp_path / "x.parquet")
    err = _error(capsys, main(["prefs", "export", "--project", "nope", "--out", out, *common]))
    assert "project 'nope' not found" in err and "fkpd projects create" in err and "Store." not in err
    err = _error(capsys, main(["prefs", "export", "--project", "proj", "--out", out, "--annotators", "zed",
                               *common]))
    assert "--annotators zed" in err and "ada, bob" in err
    err = _error(capsys, main(["prefs", "export", "--project", "proj", "--out", out, "--rounds", "7", *common]))
    assert "--rounds 7" in err and "0, 1" in err
    err = _error(capsys, main(["prefs", "export", "--project", "proj", "--out", out, "--format", "hdf5", *common]))
    assert "--format" in err and "hdf5" in err
    err = _error(capsys, main(["prefs", "export", "--project", "proj", "--out", str(tmp_path / "x.csv"), *common]))
    assert "--format parquet" in err
    err = _error(capsys, main(["prefs", "export", "--project", "proj", "--out", str(tmp_path), *common]))
    assert "is a folder" in err
    assert not (tmp_path / "x.parquet").exists()
    # the format from the name alone
    assert main(["prefs", "export", "--project", "proj", "--out", str(tmp_path / "all.h5"), *common]) == 0
    assert len(load_export(tmp_path / "all.h5").frame) == len(store.comparisons_frame("proj"))


def test_projects_create_list_show(store, tmp_path, capsys):
    from fkpd.studio import default_instructions

    common = _common(store)
    assert main(["projects", "list", *common]) == 0
    assert "no project yet" in capsys.readouterr().out
    argv = ["projects", "create", "door", "--task", TASK, "--identity", "open", "--bc-steps", "30",
            "--pairs-per-batch", "4", "--bootstrap", '{"policy": {"hidden_dim": 64}}', *common]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "created project 'door' (task metaworld/door-open-v3, identity open)" in out and "bootstrap" in out
    project = store.get_project("door")
    assert project.identity == "open" and project.instructions == default_instructions(TASK)
    jobs = store.jobs.list(project.id)
    assert [j.kind for j in jobs] == ["bootstrap"] and jobs[0].status == "queued"
    assert jobs[0].params == {"policy": {"hidden_dim": 64}, "bc_steps": 30, "pairs_per_batch": 4}
    err = _error(capsys, main(argv))
    assert "project 'door' exists already" in err and "fkpd projects show door" in err
    assert len(store.jobs.list(project.id)) == 1

    # instructions and invite mode; bad input leaves nothing behind
    (tmp_path / "howto.txt").write_text("Prefer the arm that opens the door.\n")
    assert main(["projects", "create", "door2", "--task", TASK, "--instructions-file", str(tmp_path / "howto.txt"),
                 *common]) == 0
    assert "fkpd annotators invite NAME --project door2" in capsys.readouterr().out
    second = store.get_project("door2")
    assert second.identity == "invite" and second.instructions == "Prefer the arm that opens the door."
    assert project.settings["auto_round_every"] == 4  # automatic rounds after a batch, as the app's projects
    assert main(["projects", "create", "manual", "--task", TASK, "--auto-rounds", "0", *common]) == 0
    assert store.get_project("manual").settings["auto_round_every"] == 0
    assert "--auto-rounds" in _error(capsys, main(["projects", "create", "x", "--task", TASK, "--auto-rounds", "-1",
                                                   *common]))
    assert "Known task ids" in _error(capsys, main(["projects", "create", "x", "--task", "metaworld/nope-v3",
                                                    *common]))
    err = _error(capsys, main(["projects", "create", "x", "--task", TASK, "--bc-steps", "0", *common]))
    assert "--bc-steps" in err and "bc_steps" not in err
    err = _error(capsys, main(["projects", "create", "x", "--task", TASK, "--bootstrap", '{"bc_stepz": 1}', *common]))
    assert "bc_stepz" in err
    assert "not valid JSON" in _error(capsys, main(["projects", "create", "x", "--task", TASK, "--bootstrap", "{",
                                                    *common]))
    assert [p.name for p in store.list_projects()] == ["door", "door2", "manual"]

    assert main(["projects", "list", *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("door ") and "not bootstrapped" in lines[0]
    assert "Bootstrap (job" in lines[0]
    assert main(["projects", "list", "--json", *common]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["door", "door2", "manual"] and rows[0]["training_job"]["status"] == "queued"
    assert main(["projects", "show", "door", *common]) == 0
    out = capsys.readouterr().out
    assert "project door" in out and "metaworld/door-open-v3" in out and "none yet" in out
    assert main(["projects", "show", "door", "--json", *common]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task"] == TASK and info["comparisons"] == 0 and info["rounds"] == []
    assert "project 'nope' not found" in _error(capsys, main(["projects", "show", "nope", *common]))


def _servable_project(store) -> None:
    """``proj`` with a version that has a checkpoint (as after the bootstrap) and pairs."""
    make_project(store, 2)
    rel, sha = store.write_artifact_atomic("ckpt/v0/model.safetensors", b"weights")
    project = store.get_project("proj")
    store.add_policy_version(project.id, rel, checkpoint_sha256=sha, round=0, metrics={"success_rate": 0.5})


def test_rounds_start_has_the_rounds_page_checks(store, capsys):
    common = _common(store)
    err = _error(capsys, main(["rounds", "start", "--project", "nope", *common]))
    assert "fkpd projects create" in err
    assert main(["projects", "create", "fresh", "--task", TASK, *common]) == 0
    capsys.readouterr()
    assert "no policy yet" in _error(capsys, main(["rounds", "start", "--project", "fresh", *common]))

    _servable_project(store)
    assert "no comparison to train on" in _error(capsys, main(["rounds", "start", "--project", "proj", *common]))
    ada = store.get_or_create_annotator("ada")
    store.answer(store.next_pair("proj", ada).id, ada, "left")
    err = _error(capsys, main(["rounds", "start", "--project", "proj", "--beta", "-1", *common]))
    assert "--beta" in err
    err = _error(capsys, main(["rounds", "start", "--project", "proj", "--pairs-per-batch", "0", *common]))
    assert "--pairs-per-batch" in err and "pairs_per_batch" not in err
    err = _error(capsys, main(["rounds", "start", "--project", "proj", "--steps", "x", *common]))
    assert "--steps" in err and "fkpd rounds start --help" in err
    err = _error(capsys, main(["rounds", "start", "--project", "proj", "--regularizer", "reverse", *common]))
    assert "belongs to the additive objective" in err, "the default objective takes no other regulariser"
    assert main(["rounds", "start", "--project", "proj", "--beta", "100", "--steps", "5", "--objective", "additive",
                 "--regularizer", "reverse", *common]) == 0
    assert "queued alignment round" in capsys.readouterr().out
    job = next(j for j in store.jobs.list(store.get_project("proj").id) if j.kind == "alignment_round")
    assert job.status == "queued" and job.params == {"beta": 100.0, "steps": 5, "objective": "additive",
                                                     "regularizer": "reverse"}
    assert "wait for it to finish" in _error(capsys, main(["rounds", "start", "--project", "proj", *common]))


def _d4rl_file(path: Path, n: int = 60) -> None:
    """A hopper-shaped D4RL file (Do 11, Da 3) of two 30-step episodes."""
    rng = np.random.default_rng(3)
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, 11)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
        terminals[29], timeouts[n - 1] = True, True
        f["terminals"], f["timeouts"] = terminals, timeouts


def _pt_labels(folder: Path, first, second, labels) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, value in (("indices_num2", np.array(first)), ("indices_2_num2", np.array(second)),
                        ("label_human", list(labels))):
        with open(folder / name, "wb") as f:
            pickle.dump(value, f)


def test_labels_import_creates_the_project(store, tmp_path, capsys):
    common = _common(store)
    data = tmp_path / "hopper.hdf5"
    _d4rl_file(data)
    pt = tmp_path / "human_label" / "hopper-medium-replay-v2"
    _pt_labels(pt, [0, 31], [12, 40], [1, 0])
    argv = ["labels", "import", str(pt), "--dataset", str(data), "--project", "hopper-mr", "--segment-length", "8",
            *common]
    err = _error(capsys, main(argv))
    assert "project 'hopper-mr' not found" in err and "Store." not in err
    assert "pass --create-project TASK" in err and "fkpd projects create hopper-mr --task TASK" in err
    task = "d4rl/hopper-medium-replay-v2"
    assert main([*argv, "--create-project", task]) == 0
    out = capsys.readouterr().out
    assert "created project 'hopper-mr' (task d4rl/hopper-medium-replay-v2)" in out and "imported 2 comparisons" in out
    project = store.get_project("hopper-mr")
    assert project.task_id == task
    boot = [j for j in store.jobs.list(project.id) if j.kind == "bootstrap"]
    assert len(boot) == 1 and boot[0].params == {"dataset": str(data.resolve())}
    assert store.comparisons_frame("hopper-mr")["outcome"].tolist() == ["right", "left"]
    # a second set into the existing project: no second project, no second bootstrap
    pt2 = tmp_path / "more" / "hopper-medium-replay-v2"
    _pt_labels(pt2, [2], [33], [0.5])
    assert main(["labels", "import", str(pt2), "--dataset", str(data), "--project", "hopper-mr", "--segment-length",
                 "8", "--create-project", task, "--annotator", "second", *common]) == 0
    assert "created project" not in capsys.readouterr().out
    assert len([j for j in store.jobs.list(project.id) if j.kind == "bootstrap"]) == 1
    err = _error(capsys, main([*argv, "--create-project", "d4rl/hopper-medium-v2"]))
    assert "exists already, with task d4rl/hopper-medium-replay-v2" in err
    # the importer's errors name the flags
    err = _error(capsys, main(["labels", "import", str(pt), "--dataset", str(data), "--project", "other",
                               "--segment-length", "100", "--create-project", task, *common]))
    assert "--segment-length" in err and "segment_length" not in err
    assert "was created and stays" in err


def test_python_m_fkpd_cli_runs_the_command():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fkpd.cli", "rounds", "start", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "--regularizer" in proc.stdout
