"""A labelling session as people run it: do annotators ever wait? (issue #13)

What ``make run`` does, on a fresh store: ``python -m fkpd.studio.serve`` creates the
project for the default task with its bootstrap queued and starts the local workers and
the server. Then ``--annotators`` headless-Chromium annotators (one browser each,
``?annotator=NAME``, open identity) each answer the pair on screen every ``--gap-s``
seconds (arrow keys, left or right at random; a pair is answered only after it has been
on screen ``--min-view-s`` seconds, so the player's minimum viewing time never drops a
press) for ``--minutes`` minutes after their first pair appeared, with automatic rounds
on (the project default: a round after a batch's worth of new comparisons).

Measured, per annotator, from their first pair on: the fraction of time with no pair on
screen (the player holds no pair, or one of its two videos shows no frame yet: sampled
every ``--sample-s`` seconds), the longest such gap; in all: rounds completed (alignment
rounds that succeeded), comparisons stored against answers sent (the player's count of
the answers its page sent; the two counts must be equal), and
the time to the first pair. Target (issue #13): idle fraction ≤ 2 %.

Prints a summary and writes ``bench/results/bench_session.json``::

    python bench/bench_session.py                          # 20 minutes, 2 annotators
    python bench/bench_session.py --minutes 2 --bootstrap '{"bc_steps": 200}'  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Each annotator gets a browser of their own, as people do; Chromium must not pause or
# throttle a page it thinks is in the background (videos that do not play never reach the
# minimum viewing time, and every press would be refused).
sys.path.insert(0, str(REPO / "tests"))
from app_harness import CHROMIUM_ARGS as _BASE_ARGS, FIND_PLAYER_JS, launch_app, stop_app  # noqa: E402  (tests/app_harness.py)

CHROMIUM_ARGS = [*_BASE_ARGS, "--disable-background-media-suspend",
                 "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows",
                 "--disable-background-timer-throttling", "--autoplay-policy=no-user-gesture-required"]

# The pair on screen (its id when the player holds one and both videos show a frame, else
# "") and the number of answers this page has sent (every player it held: Streamlit may
# replace the player element, whose own count, data-answers, then starts again at 0).
ON_SCREEN = """
() => {
  const root = FIND_PLAYER;
  const answers = Number(window.__fkpdAnswersSent || 0);
  if (!root) return {pair: "", answers: answers, why: "no player"};
  if (!root.dataset.pairId) return {pair: "", answers: answers, why: "no pair in the player"};
  const l = root.querySelector("video.fkpd-left"), r = root.querySelector("video.fkpd-right");
  const ready = l && r && l.readyState >= 2 && r.readyState >= 2;
  return {pair: ready ? root.dataset.pairId : "", answers: answers, why: ready ? "" : "videos loading"};
}
""".replace("FIND_PLAYER", FIND_PLAYER_JS)


# What the player shows when a press was not taken (kept in the JSON to say why).
DIAGNOSE = """
() => {
  const root = FIND_PLAYER;
  if (!root) return {player: false, text: document.body.innerText.slice(0, 300)};
  const v = (c) => { const e = root.querySelector("video." + c);
    return e ? {paused: e.paused, t: e.currentTime, ready: e.readyState, err: e.error && e.error.code} : null; };
  return {player: true, pair: root.dataset.pairId, answers: root.dataset.answers,
          hint: (root.querySelector(".fkpd-hint") || {}).textContent, status: (root.querySelector(".fkpd-status") || {}).textContent,
          left: v("fkpd-left"), right: v("fkpd-right"), focus: document.hasFocus(), visibility: document.visibilityState};
}
""".replace("FIND_PLAYER", FIND_PLAYER_JS)


class Annotator:
    """One browser context answering pairs; keeps its own timeline."""

    def __init__(self, name: str, page, gap_s: float, min_view_s: float, rng: random.Random) -> None:
        self.name, self.page, self.gap_s, self.min_view_s, self.rng = name, page, gap_s, min_view_s, rng
        self.first_pair_at: float | None = None
        self.pair = ""              # the pair on screen ("" while none)
        self.pair_since = 0.0       # when it appeared
        self.last_answer_at = 0.0
        self.pressed: tuple[str, float] | None = None  # (pair, time) of a press not yet seen to move on
        self.sent = 0               # answers the page sent (window.__fkpdAnswersSent, counted by the players)
        self._count = 0
        self.dropped = 0            # presses the player did not count as an answer within 10 s
        self.empty_s = 0.0          # time with no pair on screen, after the first pair
        self.empty_by_why: dict[str, float] = {}  # the same, by what the page showed (ON_SCREEN's why)
        self.gaps: list[float] = []  # lengths of the stretches without a pair
        self.gap_log: list[dict] = []  # each stretch: start (s after the first pair), length, what the page showed
        self._gap_why: dict[str, float] = {}
        self.diagnoses: list[dict] = []  # what the page showed after the first presses that were not taken
        self._empty_since: float | None = None
        self._last_sample: float | None = None

    def sample(self, now: float) -> None:
        try:
            seen = self.page.evaluate(ON_SCREEN)
        except Exception:  # noqa: BLE001 - the page is rerunning; count as no pair
            seen = {"pair": "", "answers": self._count, "why": "page not answering"}
        pair = seen["pair"]
        count = seen["answers"]  # answers sent by this page so far, whatever players it held
        if count > self._count:
            self.sent += count - self._count
            self.pressed = None
            self._count = count
        if self.first_pair_at is None and pair:
            self.first_pair_at = now
        if self.first_pair_at is not None and self._last_sample is not None and not self.pair and not pair:
            self.empty_s += now - self._last_sample
            why = seen.get("why") or "?"
            self.empty_by_why[why] = self.empty_by_why.get(why, 0.0) + now - self._last_sample
            self._gap_why[why] = self._gap_why.get(why, 0.0) + now - self._last_sample
        if self.first_pair_at is not None:
            if not pair and self._empty_since is None:
                self._empty_since = now
            elif pair and self._empty_since is not None:
                self._close_gap(now)
        if pair != self.pair:
            self.pair, self.pair_since = pair, now
        if self.pressed is not None and now - self.pressed[1] > 10:
            self.dropped += 1  # a press the player did not take as an answer
            self.pressed = None
            if len(self.diagnoses) < 5:
                try:
                    self.diagnoses.append({"t": now, **self.page.evaluate(DIAGNOSE)})
                except Exception as exc:  # noqa: BLE001
                    self.diagnoses.append({"t": now, "error": repr(exc)})
                print(f"  {self.name}: a press was not taken: {self.diagnoses[-1]}", flush=True)
        self._last_sample = now

    def maybe_answer(self, now: float) -> None:
        if (self.pair and self.pressed is None and now - self.pair_since >= self.min_view_s
                and now - self.last_answer_at >= self.gap_s):
            self.page.keyboard.press(self.rng.choice(["ArrowLeft", "ArrowRight"]))
            self.pressed = (self.pair, now)
            self.last_answer_at = now

    def _close_gap(self, now: float) -> None:
        self.gaps.append(now - self._empty_since)
        self.gap_log.append({"at_s": round(self._empty_since - self.first_pair_at, 2),
                             "length_s": round(now - self._empty_since, 2),
                             "why_s": {k: round(v, 2) for k, v in self._gap_why.items()}})
        self._empty_since, self._gap_why = None, {}

    def finish(self, now: float) -> None:
        if self._empty_since is not None:
            self._close_gap(now)


def _supply(store, t: float) -> dict:
    """Open pairs of the served version and the jobs running, ``t`` s after the first pair."""
    from fkpd.studio import top_up_state

    try:
        project = store.list_projects()[0]
        state = top_up_state(store, project)
        running = [j.kind for j in store.jobs.list(project.id, status=("running",), limit=10)]
    except Exception as exc:  # noqa: BLE001 - a busy store: note it, keep measuring
        return {"t_s": round(t, 1), "error": repr(exc)}
    return {"t_s": round(t, 1), "open_pairs": None if state is None else state.open_pairs,
            "target": None if state is None else state.target, "running": running}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="labelling time after the first pair")
    ap.add_argument("--annotators", type=int, default=2)
    ap.add_argument("--gap-s", type=float, default=3.0, help="seconds between one annotator's answers")
    ap.add_argument("--min-view-s", type=float, default=2.0, help="a pair is answered after this long on screen")
    ap.add_argument("--sample-s", type=float, default=0.25)
    ap.add_argument("--task", default="metaworld/door-open-v3")
    ap.add_argument("--bootstrap", default="", help="FKPD_BOOTSTRAP JSON (default: the app's defaults)")
    ap.add_argument("--bootstrap-timeout-min", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="bench/results/bench_session.json")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium is not on PATH: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    from fkpd.store import Store

    root = Path(tempfile.mkdtemp(prefix="bench_session_"))
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "FKPD_TASK": args.task,
           "FKPD_DATABASE_URL": f"sqlite:///{root / 'fkpd.sqlite'}", "FKPD_ARTIFACT_DIR": str(root / "artifacts"),
           "FKPD_IDENTITY": "open", "FKPD_ADMIN_PASSWORD": "bench"}
    if args.bootstrap:
        env["FKPD_BOOTSTRAP"] = args.bootstrap
    log = root / "serve.log"
    for sig in (signal.SIGTERM, signal.SIGHUP):  # so that `finally` stops the app's process group
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    t_start = time.time()
    proc, url = launch_app(env, log, timeout_s=120, serve=True)  # what `make run` starts
    rng = random.Random(args.seed)
    result: dict = {}
    try:
        print(f"app up after {time.time() - t_start:.1f} s; bootstrap running ...", flush=True)
        with sync_playwright() as pw, Store(env["FKPD_DATABASE_URL"], root / "artifacts") as store:
            browsers = [pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
                        for _ in range(args.annotators)]
            people = []
            for i, browser in enumerate(browsers):
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto(f"{url}/?annotator=annotator{i + 1}")
                people.append(Annotator(f"annotator{i + 1}", page, args.gap_s, args.min_view_s, rng))
            deadline_first = time.time() + 60 * args.bootstrap_timeout_min
            end: float | None = None
            last_report = last_supply = 0.0
            supply: list[dict] = []  # the pair supply every 5 s: is there something to show?
            while True:
                now = time.time()
                for a in people:
                    a.sample(now)
                    if a.first_pair_at is not None:
                        a.maybe_answer(now)
                if end is None and any(a.first_pair_at for a in people):
                    first = min(a.first_pair_at for a in people if a.first_pair_at)
                    print(f"first pair on screen {first - t_start:.1f} s after start", flush=True)
                    end = first + 60 * args.minutes
                if end is None and now > deadline_first:
                    raise RuntimeError(f"no pair on screen after {args.bootstrap_timeout_min} min; see {log}")
                if end is not None and now >= end:
                    break
                if end is not None and now - last_supply >= 5:
                    last_supply = now
                    supply.append(_supply(store, now - (end - 60 * args.minutes)))
                if end is not None and now - last_report > 60:
                    last_report = now
                    print(f"  {(now - (end - 60 * args.minutes)) / 60:4.1f} min: "
                          + ", ".join(f"{a.name} {a.sent} answers, {a.empty_s:.1f} s without a pair" for a in people),
                          flush=True)
                time.sleep(max(0.0, args.sample_s - (time.time() - now)))
            time.sleep(5)  # let the last answers land
            now = time.time()
            for a in people:
                a.sample(now)
                a.finish(now)
            project = store.list_projects()[0]
            frame = store.comparisons_frame(project.id)
            jobs = store.jobs.list(project.id)
            rounds = [j for j in jobs if j.kind == "alignment_round"]
            versions = store.list_policy_versions(project.id)
            for browser in browsers:
                browser.close()
        people_out = []
        for a in people:
            span = now - a.first_pair_at
            people_out.append({"annotator": a.name, "first_pair_s": a.first_pair_at - t_start,
                               "labelling_s": span, "answers_sent": a.sent, "presses_dropped": a.dropped,
                               "stored": int((frame["annotator"] == a.name).sum()) if "annotator" in frame else None,
                               "idle_s": a.empty_s, "idle_fraction": a.empty_s / span,
                               "longest_gap_s": max(a.gaps, default=0.0), "gaps": len(a.gaps),
                               "gap_s_quantiles": {q: float(np.quantile(a.gaps, q / 100)) if a.gaps else None
                                                   for q in (50, 90, 99)},
                               "idle_s_by_reason": a.empty_by_why,
                               "gap_log": a.gap_log,
                               "dropped_presses_seen": a.diagnoses})
        sent = sum(a.sent for a in people)
        result = {
            "benchmark": "bench_session", "args": vars(args),
            "first_pair_s": min(p["first_pair_s"] for p in people_out),
            "annotators": people_out,
            "idle_fraction": sum(p["idle_s"] for p in people_out) / sum(p["labelling_s"] for p in people_out),
            "answers_sent": sent, "comparisons_stored": int(len(frame)),
            # answers beyond a pair's first: second opinions (Store.lease_pairs) when labels_per_pair is 1
            "answers_beyond_first": int(len(frame) - frame["pair_id"].nunique()) if len(frame) else 0,
            "rounds_succeeded": sum(j.status == "succeeded" for j in rounds),
            "rounds_failed": sum(j.status == "failed" for j in rounds),
            "rounds_started": len(rounds),
            "jobs": [{"kind": j.kind, "status": j.status} for j in jobs],
            "supply": supply,
            "supply_empty_fraction": (sum(x.get("open_pairs") == 0 for x in supply) / len(supply)) if supply else None,
            "policy_versions": len(versions),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform()},
        }
    finally:
        stop_app(proc)  # SIGTERM: the launcher passes it on to the server and workers
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"store kept in {root}")
    print(f"first pair on screen after {result['first_pair_s']:.1f} s")
    for p in result["annotators"]:
        print(f"{p['annotator']}: {p['answers_sent']} answers sent, {p['stored']} stored, "
              f"idle {100 * p['idle_fraction']:.2f} % ({p['idle_s']:.1f} s of {p['labelling_s']:.0f} s, "
              f"longest gap {p['longest_gap_s']:.1f} s), {p['presses_dropped']} presses dropped; idle by what the "
              "page showed: " + ", ".join(f"{k} {v:.1f} s" for k, v in p["idle_s_by_reason"].items()))
    print(f"idle fraction {100 * result['idle_fraction']:.2f} % (target <= 2 %); rounds: "
          f"{result['rounds_succeeded']} succeeded, {result['rounds_failed']} failed, {result['rounds_started']} started; "
          f"comparisons stored {result['comparisons_stored']} vs answers sent {result['answers_sent']}; "
          f"{result['answers_beyond_first']} of them second opinions (answers beyond a pair's first)")
    if result["supply_empty_fraction"] is not None:
        print(f"no open pair in the store in {100 * result['supply_empty_fraction']:.1f} % of the 5-s samples")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
