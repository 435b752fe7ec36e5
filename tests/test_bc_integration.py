"""End to end: generated data -> BC training (with resume) -> evaluation in the simulator -> clips."""

import json
import subprocess

import numpy as np
import pytest

from fkpd.cli import main
from fkpd.policy import read_checkpoint_meta

TASK = "metaworld/door-open-v3"


def _probe(path):
    import imageio_ffmpeg

    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                         capture_output=True, text=True)
    return out.stderr


def test_train_bc_on_step_stops_and_resumes(tiny_dataset, tmp_path):
    """An exception from on_step stops BC; the last saved state stays and the next call resumes from it."""
    from fkpd.policy import PolicyConfig
    from fkpd.train.bc import BCConfig, train_bc

    cfg = BCConfig(task=TASK, dataset=str(tiny_dataset), out_dir=str(tmp_path / "bc"), steps=30, batch_size=32,
                   eval_every=0, save_every=10, log_every=5, warmup_steps=5)
    seen = []

    def stop_at_25(i, n):
        seen.append((i, n))
        if i == 25:
            raise InterruptedError("stop")

    with pytest.raises(InterruptedError):
        train_bc(cfg, PolicyConfig(hidden_dim=32, n_blocks=1), progress=False, on_step=stop_at_25)
    assert seen == [(i, 30) for i in range(1, 26)]
    assert read_checkpoint_meta(tmp_path / "bc" / "checkpoint")["step"] == 20
    seen.clear()
    ckpt = train_bc(cfg, PolicyConfig(hidden_dim=32, n_blocks=1), progress=False,
                    on_step=lambda i, n: seen.append(i))
    assert seen == list(range(21, 31)) and read_checkpoint_meta(ckpt)["step"] == 30


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, capsys):
    data = tmp_path / "d.hdf5"
    assert main(["data", "generate", "--task", TASK, "--episodes", "4", "--out", str(data),
                 "--max-episode-steps", "50"]) == 0
    assert main(["data", "info", str(data)]) == 0
    out = capsys.readouterr().out
    assert "episodes        4" in out and "steps           200" in out
    run = tmp_path / "bc"
    base = ["train-bc", "--task", TASK, "--dataset", str(data), "--out-dir", str(run), "--batch-size", "32",
            "--hidden-dim", "64", "--n-blocks", "1", "--save-every", "20", "--warmup-steps", "2",
            "--log-every", "10"]
    assert main([*base, "--steps", "40", "--eval-every", "20", "--eval-episodes", "2"]) == 0
    meta = read_checkpoint_meta(run / "checkpoint")
    assert meta["step"] == 40 and meta["task_id"] == TASK and meta["policy"]["hidden_dim"] == 64
    assert meta["normalizer"]["action"]["low"] and meta["train"]["batch_size"] == 32
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [10, 20, 30, 40]
    assert any("eval/success_rate" in x for x in lines)  # periodic evaluation ran
    saved_cfg = json.loads((run / "config.json").read_text())
    assert saved_cfg["train"]["steps"] == 40

    # resume: asking for 60 steps continues from 40 instead of starting over
    assert main([*base, "--steps", "60", "--eval-every", "0"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [10, 20, 30, 40, 50, 60]
    assert read_checkpoint_meta(run / "checkpoint")["step"] == 60

    clips = tmp_path / "clips"
    res_json = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval", str(run / "checkpoint"), "--episodes", "3", "--videos", str(clips), "--n-videos", "1",
                 "--workers", "2", "--json", str(res_json)]) == 0
    out = capsys.readouterr().out
    assert "success rate" in out and "95% CI" in out
    res = json.loads(res_json.read_text())
    assert res["episodes"] == 3 and 0.0 <= res["success_rate"] <= 1.0
    lo, hi = res["success_ci95"]
    assert 0.0 <= lo <= res["success_rate"] <= hi <= 1.0
    assert np.isfinite(res["mean_return"]) and res["mean_return"] > 0
    videos = sorted(clips.glob("*.mp4"))
    assert len(videos) == 1 and not list(clips.glob("*.part*"))
    probe = _probe(videos[0])
    assert "Video: h264" in probe and "yuv420p" in probe

    import imageio.v2 as imageio

    reader = imageio.get_reader(str(videos[0]))
    n = sum(1 for _ in reader)
    assert n == 201  # initial frame + one per step of the 200-step default horizon


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "missing.hdf5")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset file") and err.count("\n") == 1
    assert main(["data", "generate", "--task", "metaworld/nope-v3", "--episodes", "1",
                 "--out", str(tmp_path / "x.hdf5")]) == 2
    assert "Known task ids" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nockpt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_what_make_run_runs(tmp_path, capsys):
    """`fkpd pipeline` (the body of `make run`), with every flag left at its default
    except the sizes, generates data, trains, evaluates, writes clips; a second run
    reuses the data and resumes the finished training."""
    args = ["pipeline", "--out", str(tmp_path), "--episodes", "2", "--steps", "8", "--batch-size", "16",
            "--hidden-dim", "32", "--n-blocks", "1", "--eval-every", "0", "--warmup-steps", "1",
            "--eval-episodes-final", "2", "--n-videos", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    root = tmp_path / "metaworld_door-open-v3"
    assert "[1/3] generating 2 episodes" in out and "success rate" in out
    res = json.loads((root / "eval.json").read_text())
    assert res["episodes"] == 2 and len(res["videos"]) == 1
    assert (root / "data.hdf5").exists() and (root / "bc" / "checkpoint" / "model.safetensors").exists()
    assert main(args) == 0
    assert "[1/3] using existing dataset" in capsys.readouterr().out
    assert read_checkpoint_meta(root / "bc" / "checkpoint")["step"] == 8
