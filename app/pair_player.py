"""The side-by-side clip player of the Label page (a Streamlit components-v2 element).

It runs in the page itself (no iframe), so keyboard shortcuts work wherever the focus
is, except in text fields: ← Left, → Right, ↓ Equal, ``s`` Skip, ``r`` Replay.

Data in (from Python): ``{"pairs": [current pair, next pairs ...], "min_view_ms": ...}``, each pair
``{"id", "round", "version", "left": {"clip", "b64"}, "right": {...}}`` with the MP4s as
base64 (the files are read server-side by clip id; the browser never names a path).
State out: ``answers``, the list of every answer given in this page session,
``{"pair", "outcome", "shown_ms", "viewed_ms"}``; Python stores each one once (the store
is idempotent per pair and annotator, so a repeat after a rerun is harmless).

Minimum viewing time (issue #13): a left/right/equal answer counts only once both clips
have *played* for ``min_view_ms`` or one full loop of the longer clip, whichever is
shorter (``viewed_ms``: the shorter of the two clips' playing times, paused or stalled
time not counted). An earlier press or click shows a short "Watch both clips first" hint
and is not sent. Skip is always taken (a clip that cannot play can only be skipped). The
server checks the time again on its own clock (``Store.answer``'s ``min_view_seconds``).

The next pair is prefetched: its videos are decoded into blob URLs and loaded into a
hidden video element on each side while the current pair plays; an answer swaps the
hidden and visible elements (no reload: the next clips are on screen, decoded, at once),
before the server has even stored the answer. The page passes up to three pairs (the
current one and two ahead), so a slow server rerun does not leave the player empty. Both
clips start together (each waits for the other to be ready), loop, are muted, and have
the same size.
"""

from __future__ import annotations

from typing import Any, Callable

import streamlit as st

CSS = """
.fkpd-player { font-family: var(--st-font, sans-serif); }
.fkpd-videos { display: grid; grid-template-columns: 1fr 1fr; gap: 16px;
                max-width: calc(2 * min(46vh, 480px) + 16px); margin: 0 auto; }
.fkpd-side { display: flex; flex-direction: column; align-items: stretch; }
.fkpd-side .fkpd-label { font-weight: 600; margin: 0 0 4px 2px; }
.fkpd-box { position: relative; width: 100%; aspect-ratio: 1 / 1; background: #111; border-radius: 8px;
            overflow: hidden; }
.fkpd-box video { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: contain; display: block; }
.fkpd-box video.fkpd-pre-left, .fkpd-box video.fkpd-pre-right { visibility: hidden; }
.fkpd-box .fkpd-missing { position: absolute; inset: 0; display: none; align-items: center; justify-content: center;
                          color: #eee; text-align: center; padding: 16px; font-size: 15px; }
.fkpd-box.missing .fkpd-missing { display: flex; }
.fkpd-buttons { max-width: calc(2 * min(46vh, 480px) + 16px); margin: 12px auto 0; display: grid; grid-template-columns: repeat(5, 1fr); gap: 8px; }
.fkpd-buttons button { font-size: 16px; padding: 10px 6px; border-radius: 8px; border: 1px solid #bbb;
                       background: #fff; cursor: pointer; }
.fkpd-buttons button:hover { border-color: var(--st-primary-color, #ff4b4b); }
.fkpd-buttons button.primary { background: var(--st-primary-color, #ff4b4b); color: #fff; border-color: transparent; }
.fkpd-hint { text-align: center; margin-top: 8px; color: #8a4b00; font-weight: 600; font-size: 15px; min-height: 1.4em;
             visibility: hidden; }
.fkpd-hint.visible { visibility: visible; }
.fkpd-status { text-align: center; margin-top: 8px; color: #555; font-size: 14px; min-height: 1.4em; }
.fkpd-player.empty .fkpd-videos, .fkpd-player.empty .fkpd-buttons { visibility: hidden; }
"""

HTML = """
<div class="fkpd-player" data-pair-id="">
  <div class="fkpd-videos">
    <div class="fkpd-side"><div class="fkpd-label">Left</div>
      <div class="fkpd-box"><video class="fkpd-left" muted playsinline loop preload="auto"></video>
        <video class="fkpd-pre-left" muted playsinline loop preload="auto"></video>
        <div class="fkpd-missing">This video could not be played.<br>Answer Skip; the pair will be looked at.</div>
      </div></div>
    <div class="fkpd-side"><div class="fkpd-label">Right</div>
      <div class="fkpd-box"><video class="fkpd-right" muted playsinline loop preload="auto"></video>
        <video class="fkpd-pre-right" muted playsinline loop preload="auto"></video>
        <div class="fkpd-missing">This video could not be played.<br>Answer Skip; the pair will be looked at.</div>
      </div></div>
  </div>
  <div class="fkpd-buttons">
    <button class="primary" data-outcome="left" title="Left arrow">← Left</button>
    <button data-outcome="equal" title="Down arrow">↓ Equal</button>
    <button data-outcome="skip" title="S">Skip (S)</button>
    <button class="primary" data-outcome="right" title="Right arrow">Right →</button>
    <button data-action="replay" title="R">⟲ Replay (R)</button>
  </div>
  <div class="fkpd-hint" role="status" aria-live="polite"></div>
  <div class="fkpd-status"></div>
</div>
"""

JS = """
const KEYS = {ArrowLeft: "left", ArrowRight: "right", ArrowDown: "equal", s: "skip", S: "skip"};

function blobUrl(st, clip) {
  let url = st.blobs.get(clip.clip);
  if (!url) {
    const bin = atob(clip.b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    url = URL.createObjectURL(new Blob([bytes], {type: "video/mp4"}));
    st.blobs.set(clip.clip, url);
  }
  return url;
}

function ready(v) {
  return new Promise((resolve) => {
    if (v.readyState >= 3) return resolve();
    const done = () => { v.removeEventListener("canplay", done); v.removeEventListener("error", done); resolve(); };
    v.addEventListener("canplay", done);
    v.addEventListener("error", done);
  });
}

async function startTogether(st) {
  const token = ++st.startToken;
  const [l, r] = [st.el.left, st.el.right];
  l.pause(); r.pause();
  await Promise.all([ready(l), ready(r)]);
  if (token !== st.startToken) return;
  for (const v of [l, r]) if (v.currentTime) v.currentTime = 0;  // a prefetched clip is at 0: no seek
  await Promise.allSettled([l.play(), r.play()]);
  if (!st.shownMs) st.shownMs = Date.now();
}

function playedMs(v) {  // time this video has been playing since its pair was shown
  return v.__playedMs + (v.__since ? Date.now() - v.__since : 0);
}

function trackPlaying(v) {
  v.__playedMs = 0; v.__since = 0;
  v.addEventListener("playing", () => { if (!v.__since) v.__since = Date.now(); });
  for (const ev of ["pause", "waiting", "stalled", "ended", "error", "emptied"]) {
    v.addEventListener(ev, () => { v.__playedMs = playedMs(v); v.__since = 0; });
  }
}

function viewedMs(st) { return Math.min(playedMs(st.el.left), playedMs(st.el.right)); }

function requiredMs(st) {  // min_view_ms, or one full loop of the longer clip if shorter
  const d = Math.max(st.el.left.duration, st.el.right.duration);
  return Number.isFinite(d) && d > 0 ? Math.min(st.minViewMs, 1000 * d) : st.minViewMs;
}

function hint(st, text) {
  const h = st.el.hint;
  h.textContent = text;
  h.classList.add("visible");
  clearTimeout(st.hintTimer);
  st.hintTimer = setTimeout(() => h.classList.remove("visible"), 2000);
}

function setSrc(video, url) {
  if (video.getAttribute("src") !== url) { video.setAttribute("src", url); video.load(); }
}

const PRE = {left: "preLeft", right: "preRight"};

// Show `url` on one side. When the hidden video of that side already holds it (the
// prefetched next pair), the two videos trade places instead of reloading: the clip is
// on screen at once, already decoded, and the video just hidden takes the next prefetch.
function place(st, side, url) {
  let v = st.el[side];
  const pre = st.el[PRE[side]];
  if (v.getAttribute("src") !== url && pre.getAttribute("src") === url) {
    v.pause();
    v.classList.replace("fkpd-" + side, "fkpd-pre-" + side);
    pre.classList.replace("fkpd-pre-" + side, "fkpd-" + side);
    st.el[side] = pre; st.el[PRE[side]] = v;
    v = pre;
  }
  setSrc(v, url);
  v.parentElement.classList.toggle("missing", Boolean(v.error && v.getAttribute("src")));
}

function nextPending(st) {
  return (st.pairs || []).filter((p) => !st.answered.has(p.id));
}

function show(st) {
  const todo = nextPending(st);
  const cur = todo[0];
  const root = st.el.root;
  root.classList.toggle("empty", !cur);
  if (!cur) {
    root.dataset.pairId = "";
    for (const v of [st.el.left, st.el.right]) { v.pause(); v.removeAttribute("src"); v.parentElement.classList.remove("missing"); }
    st.el.status.textContent = "Loading the next pair…";
    return;
  }
  if (root.dataset.pairId !== String(cur.id)) {
    root.dataset.pairId = String(cur.id);
    root.dataset.version = String(cur.version);
    st.shownMs = 0;
    st.el.hint.classList.remove("visible");
    place(st, "left", blobUrl(st, cur.left));
    place(st, "right", blobUrl(st, cur.right));
    for (const v of [st.el.left, st.el.right]) { v.__playedMs = 0; v.__since = 0; }
    startTogether(st);
  }
  st.el.status.textContent = `Pair ${cur.id} · clips of v${cur.version}` +  // versions named as on the Rounds page
    (todo[1] ? " · next pair loaded" : "");
  const nxt = todo[1];
  if (nxt) {  // prefetch: decode into blob URLs and let the hidden videos buffer them
    st.el.preLeft.pause(); st.el.preRight.pause();
    setSrc(st.el.preLeft, blobUrl(st, nxt.left));
    setSrc(st.el.preRight, blobUrl(st, nxt.right));
  }
}

function answer(st, outcome) {
  const cur = nextPending(st)[0];
  if (!cur) return;
  const viewed = viewedMs(st), need = requiredMs(st);
  if (outcome !== "skip" && viewed < need) {  // too early: not sent, not stored
    hint(st, `Watch both clips first (${((need - viewed) / 1000).toFixed(1)} s more)`);
    return;
  }
  st.answered.add(cur.id);
  st.el.hint.classList.remove("visible");
  st.answers.push({pair: cur.id, outcome: outcome, shown_ms: st.shownMs || Date.now(), viewed_ms: Math.round(viewed)});
  st.setStateValue("answers", st.answers.slice());
  st.el.root.dataset.answers = String(st.answers.length);  // answers sent by this player
  window.__fkpdAnswersSent = (window.__fkpdAnswersSent || 0) + 1;  // ... and by every player of this page
                                                                    // (bench/bench_session.py)
  show(st);
}

export default function (component) {
  const { data, setStateValue, parentElement } = component;
  const host = parentElement;
  let st = host.__fkpd;
  if (!st) {
    const root = host.querySelector(".fkpd-player");
    st = host.__fkpd = {
      answers: [], answered: new Set(), blobs: new Map(), shownMs: 0, startToken: 0, pairs: [],
      el: {
        root, status: root.querySelector(".fkpd-status"), hint: root.querySelector(".fkpd-hint"),
        left: root.querySelector("video.fkpd-left"), right: root.querySelector("video.fkpd-right"),
        preLeft: root.querySelector("video.fkpd-pre-left"), preRight: root.querySelector("video.fkpd-pre-right"),
      },
    };
    for (const v of [st.el.left, st.el.right, st.el.preLeft, st.el.preRight]) {
      trackPlaying(v);
      v.addEventListener("error", () => {  // only the video on screen marks its side as missing
        if (v.getAttribute("src") && (v === st.el.left || v === st.el.right)) v.parentElement.classList.add("missing");
      });
    }
    root.querySelectorAll("button[data-outcome]").forEach((b) => {
      b.addEventListener("click", () => answer(st, b.dataset.outcome));
    });
    root.querySelector("button[data-action=replay]").addEventListener("click", () => startTogether(st));
  }
  st.setStateValue = setStateValue;
  st.pairs = (data && data.pairs) || [];
  st.minViewMs = Math.max(0, Number(data && data.min_view_ms) || 0);
  show(st);

  const onKey = (e) => {
    // A player Streamlit has replaced (its element left the page) must not take the key:
    // it would call preventDefault and the player on screen would never see the press.
    if (!st.el.root.isConnected) { document.removeEventListener("keydown", onKey); return; }
    if (e.defaultPrevented || e.altKey || e.ctrlKey || e.metaKey || e.repeat) return;
    const t = e.composedPath ? e.composedPath()[0] : e.target;
    if (t && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName))) return;
    if (e.key === "r" || e.key === "R") { e.preventDefault(); startTogether(st); return; }
    const outcome = KEYS[e.key];
    if (!outcome) return;
    e.preventDefault();
    answer(st, outcome);
  };
  // Streamlit calls this function again on the same element at every rerun without
  // calling the previous cleanup: keep one listener per element, not one per rerun.
  if (st.onKey) document.removeEventListener("keydown", st.onKey);
  st.onKey = onKey;
  document.addEventListener("keydown", onKey);
  return () => { document.removeEventListener("keydown", onKey); if (st.onKey === onKey) st.onKey = null; };
}
"""

_player = st.components.v2.component("fkpd_pair_player", html=HTML, css=CSS, js=JS)


def pair_player(pairs: list[dict[str, Any]], on_answers: Callable[[], None], key: str = "pair_player",
                min_view_seconds: float = 0.0) -> Any:
    """Mount the player with the pairs leased to this annotator (current first, then the
    next ones: the first of those is prefetched); ``on_answers`` runs
    (before the page script, as a Streamlit callback) whenever the browser adds an
    answer. The answers are in ``st.session_state[key]["answers"]``. A left/right/equal
    press counts once both clips played ``min_view_seconds`` (or one loop, if shorter)."""
    return _player(key=key, data={"pairs": pairs, "min_view_ms": int(round(1000 * float(min_view_seconds)))},
                   default={"answers": []}, on_answers_change=on_answers)
