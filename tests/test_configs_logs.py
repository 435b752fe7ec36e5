"""Experiment configs and logs researchers read (issue #16, points 3 and 4): ``--config
FILE.toml`` on ``fkpd loop`` / ``align`` / ``train-bc`` and the benchmark (flags override
the file; the resolved ``OUT/config.toml`` reads back), TensorBoard event files of BC,
alignment and the loop, and Weights & Biases in offline mode when ``wandb`` is installed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from fkpd.cli import _parse, main

TASK = "metaworld/door-open-v3"
ROOT = Path(__file__).resolve().parents[1]

#: test_align.py::test_loop_cli_smoke's tiny loop, as flags and as a TOML file
LOOP_FLAGS = ["--task", TASK, "--teacher", "smooth", "--rounds", "2", "--pairs-per-round", "3", "--segment-length",
              "8", "--max-episode-steps", "20", "--eval-episodes", "2", "--n-envs", "3", "--steps", "4",
              "--batch-pairs", "2", "--bc-batch-size", "16", "--device", "cpu", "--threads", "1"]
LOOP_TOML = """\
# the tiny loop of tests/test_align.py::test_loop_cli_smoke
[loop]
task = "metaworld/door-open-v3"
teacher = "smooth"
rounds = 2
pairs_per_round = 3
segment_length = 8
max_episode_steps = 20
eval_episodes = 2
n_envs = 3

[align]
steps = 4
batch_pairs = 2
bc_batch_size = 16
device = "cpu"
threads = 1
"""
#: what differs between two runs of the same config: wall times and paths
VOLATILE = ("checkpoint", "rollout_s", "align_s", "round_s", "eval_s", "align_steps_per_s")


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _stable(rounds: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rounds]


@pytest.mark.slow
def test_loop_config_file_reproduces_the_flags_run_and_logs_tensorboard(tiny_dataset, tiny_checkpoint, tmp_path,
                                                                        capsys):
    data = ["--bc-checkpoint", str(tiny_checkpoint), "--dataset", str(tiny_dataset)]
    by_flags, by_file = tmp_path / "flags", tmp_path / "file"
    assert main(["loop", *LOOP_FLAGS, *data, "--out-dir", str(by_flags)]) == 0
    config = tmp_path / "tiny_loop.toml"
    config.write_text(LOOP_TOML)
    assert main(["loop", "--config", str(config), *data, "--out-dir", str(by_file)]) == 0
    assert "config: " in capsys.readouterr().out

    a = json.loads((by_flags / "loop.json").read_text())
    b = json.loads((by_file / "loop.json").read_text())
    assert [r["round"] for r in b["rounds"]] == [0, 1, 2]
    assert _stable(a["rounds"]) == _stable(b["rounds"])
    assert {k: v for k, v in a["loop"].items() if k != "out_dir"} == {k: v for k, v in b["loop"].items()
                                                                      if k != "out_dir"}
    assert a["align"] == {**b["align"], "out_dir": a["align"]["out_dir"]}

    # the resolved config beside the outputs reads back as the same options
    resolved = tomllib.loads((by_file / "config.toml").read_text())
    assert resolved["loop"]["pairs_per_round"] == 3 and resolved["align"]["steps"] == 4
    assert resolved["loop"]["out_dir"] == str(by_file) and resolved["tracking"]["wandb"] is False
    rerun = _parse(["loop", "--config", str(by_file / "config.toml")])
    flags = _parse(["loop", *LOOP_FLAGS, *data, "--out-dir", str(by_file)])
    for key, value in vars(flags).items():
        if key not in ("config", "cmd_parser", "fn") and value is not None:
            assert getattr(rerun, key) == value, key

    # TensorBoard: the loop's per-round metrics, x = round; each round's alignment
    for out, summary in ((by_flags, a), (by_file, b)):
        tb = _scalars(out / "tb")
        success = tb["loop/success_rate"]
        assert [step for step, _ in success] == [0, 1, 2]
        assert [v for _, v in success] == pytest.approx([r["success_rate"] for r in summary["rounds"]])
        assert [v for _, v in tb["loop/mean_return"]] == pytest.approx([r["mean_return"] for r in summary["rounds"]],
                                                                         rel=1e-5)
        assert [s for s, _ in tb["loop/ood_action_dist"]] == [0, 1, 2]
        assert [s for s, _ in tb["loop/implicit_acc"]] == [1, 2]
        assert [v for _, v in tb["loop/implicit_acc"]] == pytest.approx(
            [r["implicit_acc"] for r in summary["rounds"][1:]])
        assert "loop/success_ci95_low" in tb and "loop/labels" in tb
        align_tb = _scalars(out / "round2" / "align" / "tb")
        assert [s for s, _ in align_tb["align/loss"]] == [4]
        assert [s for s, _ in align_tb["align/pairs/implicit_acc"]] == [0, 4]


def test_config_file_errors_and_flags_override_the_file(tmp_path, capsys):
    config = tmp_path / "exp.toml"
    config.write_text('beta = 250\nsteps = 40\n[policy]\nhidden_dim = 64\n[tracking]\nwandb_project = "mine"\n')
    args = _parse(["loop", "--config", str(config), "--steps", "7", "--render"])
    assert (args.beta, args.steps, args.hidden_dim, args.wandb_project, args.render) == (250.0, 7, 64, "mine", True)
    assert isinstance(args.beta, float) and args.lam is None  # unset options keep the dataclass default

    def error(text: str, command: str = "loop") -> str:
        config.write_text(text)
        assert main([command, "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(config) in err
        return err

    err = error("betta = 3\n")
    assert "unknown key 'betta'" in err and "did you mean 'beta'" in err
    assert "unknown key 'checkpoint'" in error("checkpoint = 'x'\n")  # set per round by the loop, not an option
    assert "unknown key 'rounds'" in error("[loop]\nrounds = 2\n", command="align")
    assert "steps = 'many' must be an integer (the value of --steps)" in error("steps = 'many'\n")
    assert "must be true or false" in error("render = 1\n")
    assert "is set twice" in error("steps = 3\n[align]\nsteps = 4\n")
    assert "not valid TOML" in error("steps = \n")
    assert "nests a table" in error("[align.inner]\nsteps = 4\n")
    assert main(["loop", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "no such file" in capsys.readouterr().err
    # a value the config dataclass refuses names the flag, not the field
    config.write_text("steps = 0\n")
    assert main(["align", "--config", str(config), "--checkpoint", "x"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be >= 1" in err and "AlignConfig" not in err


@pytest.mark.slow
def test_train_bc_saves_its_config_and_tensorboard_events(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "bc"
    config = tmp_path / "bc.toml"
    config.write_text(f'[bc]\ntask = "{TASK}"\ndataset = "{tiny_dataset}"\nsteps = 20\nbatch_size = 16\n'
                      'log_every = 5\nsave_every = 20\neval_every = 0\nwarmup_steps = 2\n'
                      '[policy]\nhidden_dim = 32\nn_blocks = 1\n')
    assert main(["train-bc", "--config", str(config), "--out-dir", str(out), "--device", "cpu"]) == 0
    resolved = tomllib.loads((out / "config.toml").read_text())
    assert resolved["bc"]["steps"] == 20 and resolved["bc"]["out_dir"] == str(out)
    assert resolved["policy"]["hidden_dim"] == 32 and "obs_dim" not in resolved["policy"]
    assert json.loads((out / "config.json").read_text())["policy"]["hidden_dim"] == 32
    loss = _scalars(out / "tb")["bc/loss"]
    assert [s for s, _ in loss] == [5, 10, 15, 20]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in loss] == pytest.approx([x["loss"] for x in lines])
    # the resolved config reruns the same run (here: resumes a finished one)
    capsys.readouterr()
    assert main(["train-bc", "--config", str(out / "config.toml")]) == 0
    assert f"checkpoint: {out / 'checkpoint'}" in capsys.readouterr().out


def test_benchmark_takes_a_config_file(tmp_path):
    config = tmp_path / "bench.toml"
    config.write_text('tasks = ["metaworld/button-press-v3"]\nseeds = [4]\nsteps = 60\nmethods = ["forward"]\n'
                      'beta = 250\n')
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_alignment.py"), "--config", str(config), "--steps", "70",
           "--report-only", "--out", str(out), "--json", str(tmp_path / "bench.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = json.loads((tmp_path / "bench.json").read_text())["args"]
    assert recorded["tasks"] == ["metaworld/button-press-v3"] and recorded["seeds"] == [4]
    assert recorded["steps"] == 70 and recorded["beta"] == 250.0 and recorded["methods"] == ["forward"]
    resolved = tomllib.loads((out / "config.toml").read_text())["bench_alignment"]
    assert resolved["steps"] == 70 and resolved["tasks"] == ["metaworld/button-press-v3"]
    config.write_text("stepz = 3\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "unknown key 'stepz'" in proc.stderr and str(config) in proc.stderr


def _fake_runs(out: Path, rounds: int, final: dict[tuple[str, int], float], bc_steps: int = 4000,
               chosen: int | None = None) -> None:
    """bench_alignment's --out layout with finished in_sigmoid runs: BC at 0.3, then
    ``rounds`` rounds ending at ``final[(task, seed)]``; with ``chosen``, the runs chose
    that round on validation episodes, and it is the one at ``final`` (the others at 0.1)."""
    out.mkdir(parents=True)
    (out / "bench_args.json").write_text(json.dumps({
        "rounds": rounds, "pairs_per_round": 400 // rounds, "segment_length": 0, "steps": 300, "beta": 500.0,
        "lam": 100.0, "bc_steps": bc_steps, "bc_episodes": 100, "eval_episodes": 50, "max_episode_steps": 0,
        **({} if chosen is None else {"validation_episodes": 50, "continue_from": "best"})}))
    for (task, seed), success in final.items():
        metrics = {"mean_return": 1.0, "intent_score": 0.0, "ood_action_dist": 0.5, "implicit_acc": 0.7,
                   "round_s": 10.0, "align_steps_per_s": 5.0}
        at = lambda r: success if chosen in (None, r) else 0.1  # noqa: E731
        summary = {"rounds": [{"round": 0, "success_rate": 0.3, "mean_return": 1.0}]
                   + [{**metrics, "round": r, "success_rate": at(r)} for r in range(1, rounds + 1)]}
        if chosen is not None:
            summary["best"] = {"round": chosen, "selected_by": "validation"}
        d = out / task.replace("/", "_") / f"seed{seed}" / "return" / "in_sigmoid"
        d.mkdir(parents=True)
        (d / "loop.json").write_text(json.dumps(summary))


def test_benchmark_pairs_two_loop_configurations(tmp_path):
    """--versus-out: the same method in two --out directories (other rounds × pairs, same
    data, BC and evaluation settings), paired per seed and averaged over the tasks."""
    tasks = ["metaworld/door-open-v3", "metaworld/button-press-v3"]
    here = {(t, s): v for t, vals in zip(tasks, ([0.8, 0.6, 0.5], [0.7, 0.7, 0.9])) for s, v in enumerate(vals)}
    there = {(t, s): v for t, vals in zip(tasks, ([0.6, 0.5, 0.5], [0.6, 0.7, 0.8])) for s, v in enumerate(vals)}
    _fake_runs(tmp_path / "r4", 4, here)
    _fake_runs(tmp_path / "r2", 2, there)
    cmd = [sys.executable, str(ROOT / "bench" / "bench_alignment.py"), "--report-only", "--methods", "in_sigmoid",
           "--tasks", *tasks, "--rounds", "4", "--pairs-per-round", "100", "--out", str(tmp_path / "r4"),
           "--json", str(tmp_path / "bench.json"), "--versus-out", str(tmp_path / "r2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [versus] = json.loads((tmp_path / "bench.json").read_text())["versus_out"]
    assert versus["tasks"] == 2 and versus["seeds"] == [0, 1, 2]
    assert versus["diffs"] == pytest.approx([0.15, 0.05, 0.05]), "per seed: here − there, mean over the two tasks"
    assert versus["mean"] == pytest.approx(0.25 / 3) and versus["ci95"][0] <= versus["mean"] <= versus["ci95"][1]
    assert "4 × 100 pairs" in proc.stdout and "2 × 200 pairs" in proc.stdout
    _fake_runs(tmp_path / "other_bc", 2, there, bc_steps=1000)
    proc = subprocess.run(cmd[:-1] + [str(tmp_path / "other_bc")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode != 0 and "do not pair" in proc.stderr and "bc_steps" in proc.stderr


def test_benchmark_reports_the_version_chosen_on_validation_episodes(tmp_path):
    """Runs that chose their best version on validation episodes are reported (and paired
    against other configurations) by that version's evaluation, not the last round's."""
    tasks = ["metaworld/door-open-v3"]
    here = {(tasks[0], s): v for s, v in enumerate([0.8, 0.6, 0.5])}
    _fake_runs(tmp_path / "val", 4, here, chosen=2)
    _fake_runs(tmp_path / "r4", 4, {k: 0.4 for k in here})
    cmd = [sys.executable, str(ROOT / "bench" / "bench_alignment.py"), "--report-only", "--methods", "in_sigmoid",
           "--tasks", *tasks, "--rounds", "4", "--pairs-per-round", "100", "--out", str(tmp_path / "val"),
           "--validation-episodes", "50", "--continue-from", "best", "--json", str(tmp_path / "bench.json"),
           "--versus-out", str(tmp_path / "r4")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    [table] = report["tables"]
    fkpd = table["rows"][1]
    assert [p["round"] for p in fkpd["per_seed"]] == [2, 2, 2]
    assert fkpd["paired_success_vs_bc"]["diffs"] == pytest.approx([0.5, 0.3, 0.2])
    [versus] = report["versus_out"]
    assert versus["diffs"] == pytest.approx([0.4, 0.2, 0.1])
    assert "best of 50 validation episodes, continuing from the best" in proc.stdout


def test_benchmark_out_dir_keeps_one_label_source(tmp_path):
    """An --out directory written before --segment-start/--label-source existed holds runs
    made with their defaults: it reports with the defaults, refuses other values, and
    --versus-out names the other configuration's label source."""
    tasks = ["metaworld/door-open-v3"]
    _fake_runs(tmp_path / "r4", 4, {(tasks[0], s): 0.5 for s in range(3)})
    base = [sys.executable, str(ROOT / "bench" / "bench_alignment.py"), "--report-only", "--methods", "in_sigmoid",
            "--tasks", *tasks, "--rounds", "4", "--pairs-per-round", "100", "--json", str(tmp_path / "bench.json")]
    proc = subprocess.run(base + ["--out", str(tmp_path / "r4")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run(base + ["--out", str(tmp_path / "r4"), "--label-source", "dataset"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "other settings" in proc.stderr and "label_source" in proc.stderr
    proc = subprocess.run(base + ["--out", str(tmp_path / "dataset"), "--label-source", "dataset", "--segment-start",
                                  "-1", "--versus-out", str(tmp_path / "r4")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = json.loads((tmp_path / "dataset" / "bench_args.json").read_text())
    assert written["label_source"] == "dataset" and written["segment_start"] == -1
    assert "random segment starts, dataset pairs) against" in proc.stdout
    assert "(4 × 100 pairs, 300 steps)" in proc.stdout


@pytest.mark.slow
def test_wandb_offline_run(tiny_dataset, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "bc"
    assert main(["train-bc", "--task", TASK, "--dataset", str(tiny_dataset), "--out-dir", str(out), "--steps", "10",
                 "--batch-size", "16", "--log-every", "5", "--save-every", "10", "--eval-every", "0",
                 "--hidden-dim", "32", "--n-blocks", "1", "--device", "cpu", "--wandb", "--wandb-mode", "offline"]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_file = next(runs[0].glob("run-*.wandb"))
    deadline = time.monotonic() + 60  # W&B's service process writes the records file on its own schedule
    while b"bc/loss" not in run_file.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    records = run_file.read_bytes()  # protobuf records: the keys appear as written
    assert b"bc/loss" in records and b"bc/step" in records and b"hidden_dim" in records
    assert _scalars(out / "tb")["bc/loss"]  # TensorBoard as well


def test_wandb_flag_without_the_package_is_one_line(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    assert main(["train-bc", "--task", TASK, "--dataset", str(tmp_path / "none.hdf5"), "--out-dir",
                 str(tmp_path / "bc"), "--wandb"]) == 2
    err = capsys.readouterr().err
    assert "--wandb needs the wandb package" in err and err.count("\n") == 1
