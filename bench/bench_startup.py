"""First pair after ``make run`` on a fresh store, and one alignment round, at the app's defaults.

**Startup.** Starts ``python -m fkpd.studio.serve app/streamlit_app.py`` (what ``make
run`` runs, with a built venv) on a fresh, temporary labels directory and the app's
defaults (task ``metaworld/door-open-v3``, bootstrap: 100 generated episodes, BC 4000
steps, a 10-episode evaluation, a batch of 20 pairs of L = 64 at 224×224), then polls
the store every 0.25 s until the bootstrap's first pair is labelable: a pair of round 1
whose two videos are on disk with their recorded sha256 (what the Label page
needs to show it). Also recorded: when the server answered HTTP, when each stage of the
bootstrap began (from the job's progress messages: ``generating dataset``, ``training
BC``, ``evaluating``, ``rendering batch``), when the last pair of the batch was added,
and when the job ended.

**Round.** Then, on the same project, a scripted annotator answers ``--answers`` pairs
(the clip with the higher ground-truth return wins) and one alignment round is queued
with the app's default parameters (what **Run alignment round** does; the project runs
with ``FKPD_AUTO_ROUNDS=0`` so that the benchmark queues it). Recorded: time from
queued to started, alignment and evaluation seconds (the version's metrics), the
version's registration, the next batch's first labelable pair and the job's end (the
next batch complete). The app's second worker renders top-up pairs meanwhile, as in the
app (they compete for the CPU; counted in the JSON).

Prints the figures and writes ``bench/results/bench_startup.json``::

    python bench/bench_startup.py               # startup, then one round (~6-10 min on 2 cores)
    python bench/bench_startup.py --no-round    # startup only

The figures depend on the machine's load: the JSON records the load average before and
after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers_http(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def stage_of(message: str) -> str:
    """The stage a job's progress message names: the text before ``:`` (``training BC:
    step 10/4000`` -> ``training BC``)."""
    return (message or "").split(":", 1)[0].strip()


_WHOLE: set[int] = set()  # pairs whose videos were found whole (checked once each)
_OTHERS: set[int] = set()  # pairs of the round another job (a top-up) added


def labelable_pairs(store, project_id: int, round_: int, job_id: int) -> int:
    """Pairs of ``round_`` rendered by job ``job_id`` (both clips; not the top-ups' pairs,
    extension pairs included, which the top-up worker adds to the round meanwhile) whose
    two videos exist with their recorded sha256."""
    from sqlalchemy import select

    from fkpd.store import models as m

    with store.session() as s:
        rows = s.execute(select(m.Pair.id, m.Pair.left_clip_id, m.Pair.right_clip_id)
                         .where(m.Pair.project_id == project_id, m.Pair.round == round_)).all()
    for pid, left, right in rows:
        if pid in _WHOLE or pid in _OTHERS:
            continue
        try:
            clips = [store.get_clip(cid) for cid in (left, right)]
            if any(c.meta.get("job_id") != job_id for c in clips):
                _OTHERS.add(pid)
                continue
            for clip in clips:
                store.artifacts.verify(clip.video_path, clip.video_sha256)
        except Exception:  # noqa: BLE001 (missing or half-written: not labelable)
            continue
        _WHOLE.add(pid)
    return sum(pid in _WHOLE for pid, _, _ in rows)


class Timeline:
    """Seconds since ``t0`` of named events, each recorded once (the first time)."""

    def __init__(self, t0: float) -> None:
        self.t0, self.events = t0, {}

    def mark(self, name: str) -> None:
        if name not in self.events:
            self.events[name] = round(time.monotonic() - self.t0, 2)
            print(f"  {self.events[name]:7.1f} s  {name}", flush=True)


def watch_job(store, job_id: int, line: Timeline, project_id: int, round_: int, batch: int,
              timeout: float) -> dict:
    """Poll until job ``job_id`` ends; marks its stages, its first labelable pair of
    ``round_`` and the batch's last pair in ``line``."""
    deadline = time.monotonic() + timeout
    while True:
        job = store.jobs.get(job_id)
        if job.status == "running":
            line.mark("job running")
            if job.message:
                line.mark(f"stage: {stage_of(job.message)}")
        n = labelable_pairs(store, project_id, round_, job_id)
        if n >= 1:
            line.mark("first pair labelable")
        if n >= batch:
            line.mark("batch complete")
        if job.status in ("succeeded", "failed", "cancelled"):
            line.mark(f"job {job.status}")
            return {"status": job.status, "error": job.error, "result": job.result}
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.status} ({job.message}) after {timeout:.0f} s")
        time.sleep(0.25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="metaworld/door-open-v3")
    ap.add_argument("--no-round", action="store_true", help="measure the startup only")
    ap.add_argument("--answers", type=int, default=20, help="pairs answered before the round")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds allowed per phase")
    ap.add_argument("--bootstrap", default="", help="FKPD_BOOTSTRAP JSON (default: the app's defaults)")
    ap.add_argument("--json", default="bench/results/bench_startup.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary labels directory")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    port = free_port()
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
           "FKPD_DATABASE_URL": f"sqlite:///{root / 'fkpd.sqlite'}", "FKPD_ARTIFACT_DIR": str(root / "artifacts"),
           "FKPD_TASK": args.task, "FKPD_AUTO_ROUNDS": "0", "FKPD_IDENTITY": "open"}
    if args.bootstrap:
        env["FKPD_BOOTSTRAP"] = args.bootstrap
    from fkpd.studio import StudioConfig
    from fkpd.studio.params import BootstrapParams

    cfg = StudioConfig.from_env(env)
    batch = BootstrapParams.from_params(cfg.bootstrap).batch.pairs_per_batch
    out: dict = {"benchmark": "bench_startup", "args": vars(args), "load_avg_before": os.getloadavg()}
    cmd = [sys.executable, "-m", "fkpd.studio.serve", str(ROOT / "app" / "streamlit_app.py"),
           "--server.port", str(port), "--server.headless", "true"]
    print(f"starting {' '.join(cmd[1:3])} on a fresh store in {root} (task {args.task}) ...", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(root / "serve.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    line = Timeline(t0)
    try:
        while not (root / "fkpd.sqlite").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}: {(root / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.1)
        time.sleep(0.5)
        with cfg.open_store() as store:
            job = None
            while job is None:
                projects = [p for p in store.list_projects() if p.name == cfg.project]
                jobs = store.jobs.list(projects[0].id) if projects else []
                job = next((j for j in jobs if j.kind == "bootstrap"), None)
                time.sleep(0.1)
            project = projects[0]
            line.mark("bootstrap queued")
            deadline = time.monotonic() + args.timeout
            while not answers_http(port) and time.monotonic() < deadline and store.jobs.get(job.id).status != "running":
                time.sleep(0.25)
            boot = watch_job(store, job.id, line, project.id, 1, batch, args.timeout)
            if not answers_http(port):
                print("  (the server did not answer HTTP)", flush=True)
            out["startup"] = {"events_s": dict(line.events), "job": boot}
            if boot["status"] != "succeeded":
                raise RuntimeError(f"bootstrap {boot['status']}: {boot['error']}")
            if not args.no_round:
                out["round"] = run_round(store, project, args.answers, batch, args.timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    out["load_avg_after"] = os.getloadavg()
    out["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    except OSError:
        pass
    summary = {"first_pair_s": out["startup"]["events_s"].get("first pair labelable"),
               "batch_complete_s": out["startup"]["events_s"].get("batch complete")}
    if "round" in out:
        ev = out["round"]["events_s"]
        summary.update(round_first_pair_s=ev.get("first pair labelable"), round_batch_s=ev.get("batch complete"),
                       round_job_s=ev.get("job succeeded"))
    out["summary"] = summary
    print(json.dumps(summary, indent=2))
    dest = Path(args.json)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2, default=str))
    print(f"results: {dest}")


def run_round(store, project, answers: int, batch: int, timeout: float) -> dict:
    """Answer ``answers`` pairs as a scripted annotator, queue one round at the app's
    default parameters, and time it (see the module docstring)."""
    from fkpd.studio.history import enqueue_round

    ann = store.get_or_create_annotator("bench")
    done = 0
    while done < answers:
        pairs = store.lease_pairs(project.id, ann, 1)
        if not pairs:
            break
        pair = pairs[0]
        left, right = store.get_clip(pair.left.id), store.get_clip(pair.right.id)
        store.answer(pair.id, ann, "left" if left.gt_return >= right.gt_return else "right", project=project.id)
        done += 1
    print(f"answered {done} pairs; queueing one alignment round at the default parameters ...", flush=True)
    t0 = time.monotonic()
    line = Timeline(t0)
    job = enqueue_round(store, project, {}, remember=False)
    line.mark("round queued")
    res = watch_job(store, job.id, line, project.id, 2, batch, timeout)
    versions = store.list_policy_versions(project.id)
    metrics = versions[-1].metrics if versions else {}
    top_ups = [j for j in store.jobs.list(project.id, limit=50) if j.kind == "top_up"]
    return {"answers": done, "events_s": dict(line.events), "job": {k: v for k, v in res.items() if k != "result"},
            "align_s": metrics.get("align_s"), "eval_s": metrics.get("eval_s"),
            "success_rate": metrics.get("success_rate"),
            "top_up_jobs": [{"id": j.id, "status": j.status, "started_at": j.started_at, "finished_at": j.finished_at}
                            for j in top_ups]}


if __name__ == "__main__":
    main()
