"""Click-to-next-pair latency of the Label page, in headless Chromium (Playwright).

Bootstraps a project whose first batch has ``--pairs`` pairs of real clips (L=64 steps
at 224×224, the app's defaults; the policy is a tiny BC because only the clips matter
here), starts ``streamlit run`` on it, signs in an annotator and answers ``--answers``
pairs with the arrow keys, ``--gap-s`` seconds apart (people watch a pair for a few
seconds; the gap lets the page prefetch the next pair as it would for them).

Latency of one answer, measured inside the page with ``performance.now()``: from the
``keydown`` event to the animation frame where the next pair is on screen with both
videos showing a frame (``readyState >= 2``). Also reported: how long until the answer
is in the database (polled; resolution ~20 ms).

With ``--during-round`` (issue #15: the figure that matters is the one while the
machine trains), the bootstrap uses the app's default network, ``--round-labels`` pairs
are answered through the store first, an alignment round at the app's default parameters
is queued and the app's local workers start it (:func:`fkpd.studio.start_local_workers`:
one torch thread, niceness 10, as ``make run`` starts them); the answers begin once the round is
training, and every latency is tagged with whether the round was still running (the
summary is over those). Answers are ``--gap-s`` apart and each pair stays on screen at
least the project's minimum viewing time (1.5 s by default), as for people.

Prints p50/p95/max and writes ``bench/results/bench_ui.json`` (``bench_ui_round.json``
with ``--during-round``)::

    python bench/bench_ui.py                # 30 answers
    python bench/bench_ui.py --during-round # 30 answers while a round trains
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from app_harness import CHROMIUM_ARGS, FIND_PLAYER_JS, launch_app, stop_app  # noqa: E402  (tests/app_harness.py)

# Installed once per page: stamps every keydown, then waits (one check per animation
# frame) until the player shows another pair with both videos showing a frame.
PROBE = """
() => {
  window.__lat = [];
  document.addEventListener("keydown", () => {
    const t0 = performance.now();
    const root = FIND_PLAYER;
    const before = root.dataset.pairId;
    const tick = () => {
      const l = root.querySelector("video.fkpd-left"), r = root.querySelector("video.fkpd-right");
      if (root.dataset.pairId && root.dataset.pairId !== before && l.readyState >= 2 && r.readyState >= 2) {
        window.__lat.push({ms: performance.now() - t0, from: before, to: root.dataset.pairId});
      } else if (performance.now() - t0 < 30000) {
        requestAnimationFrame(tick);
      }
    };
    requestAnimationFrame(tick);
  }, true);
}
""".replace("FIND_PLAYER", FIND_PLAYER_JS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=30)
    ap.add_argument("--pairs", type=int, default=32, help="pairs in the batch (at least --answers + 2)")
    ap.add_argument("--gap-s", type=float, default=2.5, help="seconds between answers (>= the minimum viewing time)")
    ap.add_argument("--during-round", action="store_true", help="answer while an alignment round trains")
    ap.add_argument("--round-labels", type=int, default=10, help="pairs answered through the store for the round")
    ap.add_argument("--json", default="")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project")
    args = ap.parse_args()
    if args.during_round:
        args.pairs = max(args.pairs, args.answers + 2 + args.round_labels)
    if args.pairs < args.answers + 2:
        ap.error("--pairs must be at least --answers + 2")
    args.json = args.json or ("bench/results/bench_ui_round.json" if args.during_round else "bench/results/bench_ui.json")
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium is not on PATH: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    from fkpd.store import run_worker
    from fkpd.studio import StudioConfig, open_project, start_local_workers
    from fkpd.studio.history import enqueue_round

    root = Path(tempfile.mkdtemp(prefix="bench_ui_"))
    bootstrap = {"dataset_episodes": 4, "max_episode_steps": 100, "bc_steps": 30,
                 "bc": {"batch_size": 32, "warmup_steps": 5}, "policy": {"hidden_dim": 64, "n_blocks": 1},
                 "pairs_per_batch": args.pairs, "segment_length": 64, "render_size": 224, "n_envs": 8,
                 "eval_episodes": 2, "threads": 1}
    if args.during_round:
        del bootstrap["policy"]  # the app's default network: the round trains what people would train
    env = {**os.environ, "FKPD_DATABASE_URL": f"sqlite:///{root / 'fkpd.sqlite'}",
           "FKPD_ARTIFACT_DIR": str(root / "artifacts"), "FKPD_PROJECT": "bench-ui",
           "FKPD_BOOTSTRAP": json.dumps(bootstrap), "FKPD_START_WORKER": "0", "FKPD_ADMIN_PASSWORD": "bench",
           "FKPD_IDENTITY": "open"}  # the benchmark names its annotator in the URL (open mode)
    cfg = StudioConfig.from_env(env)
    t0 = time.time()
    with cfg.open_store() as store:
        project, job = open_project(store, cfg)
        print(f"bootstrapping {args.pairs} pairs of 64-step 224x224 clips ...", flush=True)
        run_worker(store, once=True, handler_modules=["fkpd.studio"], stale_after_s=None)
        assert store.jobs.get(job.id).status == "succeeded", store.jobs.get(job.id).error
    print(f"bootstrap took {time.time() - t0:.0f} s", flush=True)
    sizes = [p.stat().st_size for p in (root / "artifacts").rglob("*.mp4")]
    if args.during_round:  # labels for the round, answered by a scripted annotator through the store
        with cfg.open_store() as store:
            store.get_or_create_annotator("teacher")
            for i in range(args.round_labels):
                pair = store.next_pair(project.id, "teacher")
                store.answer(pair.id, "teacher", "left" if i % 2 else "right", project=project.id)
    proc, url = launch_app(env, root / "streamlit.log")
    workers: list[subprocess.Popen] = []
    round_job = None
    during: list[bool] = []
    db_ms: list[float] = []
    try:
        with sync_playwright() as pw, cfg.open_store() as store:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{url}/?annotator=bench")
            player = page.locator(".fkpd-player")
            player.wait_for(timeout=60_000)
            page.locator("video.fkpd-left").wait_for(timeout=60_000)
            page.evaluate(PROBE)
            if args.during_round:
                round_job = enqueue_round(store, project, {})  # the app's default round parameters
                workers = start_local_workers(cfg)  # as the app starts them: niced, one torch thread
                t_wait = time.time()
                while "aligning" not in (store.jobs.get(round_job.id).message or ""):
                    if time.time() - t_wait > 300 or store.jobs.get(round_job.id).done:
                        raise RuntimeError(f"the round did not start training: {store.jobs.get(round_job.id)}")
                    time.sleep(0.5)
                print(f"round {round_job.id} is training: {store.jobs.get(round_job.id).message}", flush=True)
            time.sleep(args.gap_s)
            for i in range(args.answers):
                n_before = len(store.comparisons_frame(project.id))
                t_key = time.perf_counter()
                page.keyboard.press("ArrowLeft" if i % 2 else "ArrowRight")
                while len(store.comparisons_frame(project.id)) == n_before:
                    if time.perf_counter() - t_key > 30:
                        raise RuntimeError(f"answer {i} was not stored within 30 s")
                    time.sleep(0.02)
                db_ms.append(1000 * (time.perf_counter() - t_key))
                during.append(round_job is not None and not store.jobs.get(round_job.id).done)
                time.sleep(max(0.0, args.gap_s - (time.perf_counter() - t_key)))
            page.wait_for_function(f"() => window.__lat.length >= {args.answers}", timeout=30_000)
            lat = page.evaluate("() => window.__lat")
            stored = store.comparisons_frame(project.id)
            stored = stored[stored["annotator"] == "bench"]
            round_state = store.jobs.get(round_job.id) if round_job is not None else None
            browser.close()
    finally:
        stop_app(proc)
        for worker in workers:  # they stop at the job's next step; the round's result does not matter any more
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    ms_all = np.array([x["ms"] for x in lat])
    assert len(stored) == args.answers and stored["pair_id"].is_unique, "every answer stored exactly once"
    ms = ms_all[np.array(during[:len(ms_all)])] if args.during_round else ms_all
    if args.during_round:
        print(f"{len(ms)} of {len(ms_all)} answers while round {round_job.id} was running "
              f"(it ended {round_state.status if round_state.done else 'later'}: {round_state.message})")
        if not len(ms):
            sys.exit("no answer fell inside the round; raise --answers")
    q = lambda a, p: float(np.percentile(a, p))  # noqa: E731
    print(f"click-to-next-pair latency over {len(ms)} answers: p50 {q(ms, 50):.1f} ms, p95 {q(ms, 95):.1f} ms, "
          f"max {ms.max():.1f} ms")
    print(f"answer stored in the database after: p50 {q(db_ms, 50):.0f} ms, p95 {q(db_ms, 95):.0f} ms "
          f"(polled every 20 ms)")
    print(f"clips: {len(sizes)} MP4s, median {np.median(sizes) / 1024:.0f} KiB")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "bench_ui", "args": vars(args),
        "latency_ms": {"p50": q(ms, 50), "p95": q(ms, 95), "max": float(ms.max()), "all": ms.tolist()},
        "during_round": ({"answers_in_round": int(len(ms)), "answers": int(len(ms_all)),
                          "all_ms": ms_all.tolist(), "in_round": during,
                          "round_status": round_state.status, "round_message": round_state.message}
                         if args.during_round else None),
        "stored_ms": {"p50": q(db_ms, 50), "p95": q(db_ms, 95), "all": db_ms},
        "clip_kib_median": float(np.median(sizes) / 1024),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
