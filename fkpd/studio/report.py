"""A project's shareable report (one self-contained HTML file) and its demo video.

* :func:`build_report` — one HTML file with nothing outside it (no URL at all: inline
  CSS, plots as base64 PNG made with matplotlib, videos as base64 ``data:`` URIs of H.264
  MP4): the rounds table of :func:`fkpd.studio.history.rounds_history` (success rate with
  its Wilson 95% interval, return, intent scores, implicit accuracy, the paired
  comparison with the parent of :func:`fkpd.train.evaluate.compare_with_parent`), the
  success / intent / implicit-accuracy plots over versions, the label statistics of
  :meth:`fkpd.store.Store.annotator_stats`, and before/after videos of two versions on
  the same reset seeds. ``fkpd report`` and the Rounds page's download write it.
* :func:`write_demo` — those before/after episodes alone as one MP4: version A left,
  version B right, each half captioned with its version and the episode's outcome,
  episodes one after another (``fkpd demo``).

**Clips.** Both use :func:`episode_clips`: the episodes of the newest finished
``compare`` job of the two versions (:mod:`fkpd.studio.compare`, the Compare page) when
it has enough of them and its videos are there, else the same episodes rendered now as
that job renders them (reset seeds ``EVAL_SEED_BASE + i``, the evaluation's reset
seeds; sampling noise seeded ``1000 + seed``; full episodes at the project's horizon).
Rendering happens in the calling process (a few seconds per episode on a CPU) and is not
stored.

Templates: Jinja2 (``templates/report.html.j2``, autoescaped).
"""

from __future__ import annotations

import base64
import io
import math
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fkpd.store import PolicyVersionInfo, ProjectInfo, Store
from fkpd.studio.batches import checkpoint_dir, served_versions
from fkpd.studio.compare import COMPARE, CompareParams, _project_horizon, compare_videos
from fkpd.studio.config import StudioError
from fkpd.studio.history import current_version, rounds_history, version_label

#: Defaults: episodes and video size (pixels, square) of the report and of the demo.
REPORT_EPISODES = 2
REPORT_RENDER_SIZE = 128
DEMO_EPISODES = 4
DEMO_RENDER_SIZE = 224
#: At most this many before/after episodes (as a compare job).
MAX_EPISODES = 16

#: ``progress(done, total, what)``: called as clips are rendered or encoded.
Progress = Callable[[int, int, str], None]


class ReportError(StudioError):
    """A report or demo cannot be made: no policy version yet, an unknown version, bad
    sizes. The message says what to do; ``about`` names the argument at fault, if one
    (``"versions"``), for callers that name it their own way (the CLI's flags)."""

    def __init__(self, message: str, about: str | None = None) -> None:
        super().__init__(message)
        self.about = about


# ------------------------------------------------------------------ versions


def default_versions(store: Store, project: ProjectInfo) -> tuple[PolicyVersionInfo, PolicyVersionInfo]:
    """The versions a report compares by default: the first served version (the BC
    policy) and the one served now (the latest that was not rolled back).

    Raises:
        ReportError: the project has no evaluated policy version yet.
    """
    served = served_versions(store, project)
    if not served:
        raise ReportError(f"project {project.name!r} has no evaluated policy version yet: wait for its bootstrap to "
                          f"finish (fkpd projects show {project.name})")
    return served[0], served[-1]


def resolve_versions(store: Store, project: ProjectInfo,
                     ids: Sequence[int] | None) -> tuple[PolicyVersionInfo, PolicyVersionInfo]:
    """Versions ``ids = (a, b)`` of the project (None: :func:`default_versions`).

    Raises:
        ReportError: not two ids, an id that is no version of the project, a version
            without a checkpoint (imported labels), or no version at all yet.
    """
    if ids is None:
        return default_versions(store, project)
    ids = list(ids)
    if len(ids) != 2:
        raise ReportError(f"give two policy versions (A B), got {len(ids)}: {ids}", about="versions")
    versions = {v.id: v for v in store.list_policy_versions(project.id)}
    if not versions:
        default_versions(store, project)  # raises: nothing evaluated yet
    out = []
    for vid in ids:
        if vid not in versions:
            raise ReportError(f"policy version {vid} is not a version of project {project.name!r}; its versions are "
                              + ", ".join(str(v) for v in versions), about="versions")
        if versions[vid].checkpoint_path is None:
            raise ReportError(f"policy version {vid} holds imported labels, not a policy, so it cannot be rolled "
                              "out; pick a version with a checkpoint", about="versions")
        out.append(versions[vid])
    return out[0], out[1]


def short_label(v: PolicyVersionInfo) -> str:
    """``v3 · round 2`` / ``v1 · BC``: a version in a caption."""
    return f"v{v.id} · " + ("BC" if v.round == 0 else f"round {v.round}")


# ------------------------------------------------------------------ clips


@dataclass
class Clip:
    """One rendered episode of one version.

    Attributes:
        frames: (T+1, H, W, 3) uint8, the initial frame included.
        success: whether the task was solved at some step; ret: the episode's return.
    """

    frames: np.ndarray
    success: bool
    ret: float


@dataclass
class EpisodeClips:
    """The same reset seed rolled out by version A and version B."""

    seed: int
    a: Clip
    b: Clip


@dataclass
class ClipSet:
    """Before/after episodes of two versions.

    Attributes:
        source: where the clips came from, e.g. ``clips of compare job 7`` or
            ``rendered now``.
        fps: playback rate of the task's clips.
    """

    version_a: PolicyVersionInfo
    version_b: PolicyVersionInfo
    episodes: list[EpisodeClips]
    source: str
    fps: int


def _check_counts(episodes: int, render_size: int, *, least: int = 1) -> None:
    for name, value in (("episodes", episodes), ("render_size", render_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ReportError(f"'{name}' must be a whole number, got {value!r}")
    if not least <= episodes <= MAX_EPISODES:
        raise ReportError(f"'episodes' must be between {least} and {MAX_EPISODES}, got {episodes}")
    if not 32 <= render_size <= 640:  # the Compare page's limits (CompareParams)
        raise ReportError(f"'render_size' must be between 32 and 640 pixels, got {render_size}")


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Frames (T, H, W, 3) scaled to (T, size, size, 3) (Pillow, Lanczos); as they are
    when already that size."""
    if frames.shape[1:3] == (size, size):
        return frames
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.LANCZOS)) for f in frames])


def _read_video(path: Path) -> np.ndarray:
    """All frames of a clip, (T, H, W, 3) uint8 (imageio-ffmpeg)."""
    import imageio.v2 as imageio

    with imageio.get_reader(str(path), format="FFMPEG") as reader:  # iterated: its len() may be sys.maxsize
        return np.stack([np.asarray(f, np.uint8)[..., :3] for f in reader])


def _from_compare_job(store: Store, project: ProjectInfo, a: PolicyVersionInfo, b: PolicyVersionInfo,
                      episodes: int, render_size: int) -> ClipSet | None:
    """The first ``episodes`` episodes of the newest finished compare job of ``a`` and
    ``b`` (either side), when it has that many with both videos present; else None."""
    from fkpd.envs import get_task

    for job in store.jobs.list(project.id, status="succeeded", limit=50):
        if job.kind != COMPARE or not job.result:
            continue
        pair = (job.result.get("version_a"), job.result.get("version_b"))
        if pair not in ((a.id, b.id), (b.id, a.id)):
            continue
        rows = compare_videos(store, job)[:episodes]
        if len(rows) < episodes or any(r[s].get("path") is None for r in rows for s in ("a", "b")):
            continue
        swap = pair != (a.id, b.id)
        out = []
        for r in rows:
            ca, cb = (r["b"], r["a"]) if swap else (r["a"], r["b"])
            out.append(EpisodeClips(int(r["seed"]), *(
                Clip(_resize(_read_video(c["path"]), render_size), bool(c["success"]), float(c["return"]))
                for c in (ca, cb))))
        return ClipSet(a, b, out, f"clips of compare job {job.id}", get_task(project.task_id).fps)
    return None


def _render(store: Store, project: ProjectInfo, a: PolicyVersionInfo, b: PolicyVersionInfo, episodes: int,
            render_size: int, progress: Progress | None) -> ClipSet:
    """Roll out reset seeds ``EVAL_SEED_BASE ..`` with both versions, as the compare job
    does (noise seed ``1000 + seed``, full episodes at the project's horizon)."""
    from fkpd.envs import get_task, make_env
    from fkpd.policy import DiffusionPolicy
    from fkpd.policy.rollout import ClipRequest, rollout_clips

    spec = get_task(project.task_id)
    horizon = _project_horizon(store, project)
    first = CompareParams(a.id, b.id).seed
    seeds = list(range(first, first + episodes))
    requests = [ClipRequest(s, 1000 + s, max_steps=horizon, render_from=0) for s in seeds]
    envs = [make_env(project.task_id, max_episode_steps=horizon, render_size=(render_size, render_size))
            for _ in range(min(4, episodes))]
    clips: dict[str, list[Clip]] = {}
    try:
        for side_i, (side, version) in enumerate((("a", a), ("b", b))):
            policy = DiffusionPolicy.load(checkpoint_dir(store, version), task_id=project.task_id)

            def tick(done: int, side_i: int = side_i) -> None:
                if progress is not None:
                    progress(side_i * episodes + done, 2 * episodes, f"rendering v{version.id}")

            eps = rollout_clips(policy, envs, requests, progress=tick)
            clips[side] = [Clip(ep.frames, ep.succeeded, ep.ret) for ep in eps]
    finally:
        for env in envs:
            env.close()
    return ClipSet(a, b, [EpisodeClips(s, ca, cb) for s, ca, cb in zip(seeds, clips["a"], clips["b"])],
                   "rendered now", spec.fps)


def episode_clips(store: Store, project: ProjectInfo, a: PolicyVersionInfo, b: PolicyVersionInfo, episodes: int,
                  render_size: int, progress: Progress | None = None) -> ClipSet:
    """``episodes`` before/after episodes of versions ``a`` and ``b`` on the same reset
    seeds, frames ``render_size`` × ``render_size``: a finished compare job's clips when
    there are enough, else rendered now (see the module docstring).

    Raises:
        ReportError: bad counts or sizes.
        ArtifactIntegrityError / CheckpointError: a version's checkpoint is missing or corrupt.
    """
    _check_counts(episodes, render_size)
    found = _from_compare_job(store, project, a, b, episodes, render_size)
    return found if found is not None else _render(store, project, a, b, episodes, render_size, progress)


# ------------------------------------------------------------------ side by side


_GREEN, _RED, _INK, _PAPER = (22, 128, 60), (190, 40, 40), (25, 25, 25), (246, 246, 244)


def _caption(width: int, height: int, title: str, outcome: str, ok: bool) -> np.ndarray:
    """A (height, width, 3) caption band: ``title`` on the first line, ``outcome`` on the
    second (green: success, red: none), in the largest of Pillow's default font's sizes
    that fits the width (Pillow ImageDraw)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), _PAPER)
    draw = ImageDraw.Draw(img)
    pad = max(2, height // 12)
    size = max(6, int(height * 0.36))
    font = ImageFont.load_default(size=size)
    while size > 6 and max(draw.textlength(t, font=font) for t in (title, outcome)) > width - 2 * pad:
        size -= 1
        font = ImageFont.load_default(size=size)
    draw.text((pad, pad), title, fill=_INK, font=font)
    draw.text((pad, height // 2 + pad // 2), outcome, fill=_GREEN if ok else _RED, font=font)
    return np.asarray(img)


def _outcome(clip: Clip) -> str:
    return f"{'success' if clip.success else 'no success'} · return {clip.ret:.0f}"


#: Pixels between the two halves of a side-by-side frame.
_GAP = 4


def side_by_side(clips: ClipSet, ep: EpisodeClips) -> np.ndarray:
    """One episode as frames ``(T, Hc + H, 2W + gap, 3)`` uint8: version A left, version B
    right, each under a caption band of height ``Hc`` (version and seed; success and
    return). T is the longer clip's length; the shorter clip holds its last frame. Height
    and width are padded to multiples of 16 (H.264 macroblocks), so the encoder never
    rescales."""
    fa, fb = ep.a.frames, ep.b.frames
    if fb.shape[1:] != fa.shape[1:]:
        fb = _resize(fb, fa.shape[1])
    h, w = fa.shape[1:3]
    band = max(24, int(round(0.22 * h)))
    band += (-(h + band)) % 16
    width = 2 * w + _GAP + (-(2 * w + _GAP)) % 16
    t = max(len(fa), len(fb))
    out = np.full((t, h + band, width, 3), _PAPER, np.uint8)
    for x0, frames, clip, version in ((0, fa, ep.a, clips.version_a), (w + _GAP, fb, ep.b, clips.version_b)):
        title = f"{short_label(version)} · seed {ep.seed}"
        out[:, :band, x0:x0 + w] = _caption(w, band, title, _outcome(clip), clip.success)
        out[:len(frames), band:, x0:x0 + w] = frames
        out[len(frames):, band:, x0:x0 + w] = frames[-1]
    return out


# ------------------------------------------------------------------ demo video


@dataclass
class DemoInfo:
    """What :func:`write_demo` wrote: ``frames`` frames of ``width`` × ``height`` pixels at
    ``fps``, ``n_bytes`` bytes, from ``clips.source``."""

    path: Path
    frames: int
    width: int
    height: int
    fps: int
    n_bytes: int
    clips: ClipSet = field(repr=False)


def write_demo(store: Store, project: ProjectInfo, out: Path | str, versions: Sequence[int] | None = None,
               episodes: int = DEMO_EPISODES, render_size: int = DEMO_RENDER_SIZE,
               progress: Progress | None = None) -> DemoInfo:
    """Write the before/after episodes as one H.264 MP4 (:func:`side_by_side` episodes
    one after another; :func:`fkpd.policy.rollout.write_video`, atomically).

    Args:
        versions: ``(a, b)`` version ids, A on the left (default: :func:`default_versions`).
        episodes: reset seeds, 1..16; render_size: each half's frame size in pixels.

    Raises:
        ReportError: no version yet, only one and no ``versions``, an unknown version,
            bad counts or sizes.
    """
    from fkpd.policy.rollout import write_video

    _check_counts(episodes, render_size)
    a, b = resolve_versions(store, project, versions)
    if versions is None and a.id == b.id:
        raise ReportError(f"project {project.name!r} has one policy version so far ({short_label(a)}): nothing to "
                          f"compare it with until its first alignment round; give 'versions' {a.id} {a.id} to see "
                          "it on both sides")
    clips = episode_clips(store, project, a, b, episodes, render_size, progress)
    shape = side_by_side(clips, clips.episodes[0]).shape[1:3]
    count = sum(max(len(ep.a.frames), len(ep.b.frames)) for ep in clips.episodes)

    def frames() -> Iterator[np.ndarray]:
        for ep in clips.episodes:
            yield from side_by_side(clips, ep)

    path = write_video(frames(), out, fps=clips.fps)
    return DemoInfo(Path(path), count, shape[1], shape[0], clips.fps, Path(path).stat().st_size, clips)


# ------------------------------------------------------------------ report


def _png(fig) -> str:
    """A matplotlib figure as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _mp4(frames: np.ndarray, fps: int) -> tuple[str, int]:
    """Frames as a ``data:video/mp4;base64,...`` URI (H.264, yuv420p) and its byte size."""
    from fkpd.policy.rollout import write_video

    with tempfile.TemporaryDirectory() as tmp:
        blob = write_video(frames, Path(tmp) / "clip.mp4", fps=fps).read_bytes()
    return "data:video/mp4;base64," + base64.b64encode(blob).decode("ascii"), len(blob)


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _pct(x: Any) -> str:
    x = _num(x)
    return "—" if math.isnan(x) else f"{100 * x:.0f}%"


def _text(x: Any) -> str:
    """A text cell of the history frame ("" for None / NaN)."""
    return x if isinstance(x, str) else ""


def _fmt(x: Any, spec: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _figure(title: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 2.9), dpi=96, layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _plots(versions: list[PolicyVersionInfo], hist) -> list[dict[str, str]]:
    """Success rate (with its 95% Wilson interval), intent scores and implicit accuracy
    over the versions, oldest first, as PNG data URIs."""
    x = np.arange(len(versions))
    ticks = [f"v{v.id}\n{'BC' if v.round == 0 else f'r{v.round}'}" for v in versions]
    plots = []

    fig, ax = _figure("Success rate over versions (95% Wilson interval)", "success rate")
    sr = np.array([_num(v.metrics.get("success_rate")) for v in versions])
    ci = [v.metrics.get("success_ci95") or (None, None) for v in versions]
    lo = np.array([_num(c[0]) for c in ci])
    hi = np.array([_num(c[1]) for c in ci])
    err = np.vstack([np.where(np.isnan(lo), 0, sr - lo), np.where(np.isnan(hi), 0, hi - sr)])
    ax.errorbar(x, sr, yerr=np.nan_to_num(err), marker="o", capsize=4, color="#1f6fb2")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(x, ticks)
    plots.append({"id": "plot-success", "title": "Success rate", "src": _png(fig),
                  "caption": "Evaluation success rate of each version, with its 95% Wilson interval."})

    intents = [c for c in hist.columns if c.startswith("intent_")]
    fig, ax = _figure("Intent scores of the evaluation episodes", "intent score (higher: closer)")
    for name in intents:
        ax.plot(x, hist[name].astype(float).to_numpy(), marker="o", label=name.removeprefix("intent_"))
    if intents:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no intent scores recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks(x, ticks)
    plots.append({"id": "plot-intent", "title": "Intent scores", "src": _png(fig),
                  "caption": "Intent teachers' scores of the evaluation episodes (fkpd.prefs.teachers.intent_scores)."})

    fig, ax = _figure("Implicit accuracy on the training comparisons", "implicit accuracy")
    ax.plot(x, hist["implicit_acc"].astype(float).to_numpy(), marker="o", label="after the round")
    ax.plot(x, hist["implicit_acc_before"].astype(float).to_numpy(), marker="s", ls="--", alpha=0.7,
            label="before the round")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_xticks(x, ticks)
    plots.append({"id": "plot-implicit", "title": "Implicit accuracy", "src": _png(fig),
                  "caption": "Share of a round's training comparisons whose preferred clip the policy's implicit "
                             "reward ranks higher, before and after the round (BC: none)."})
    return plots


def _rounds_table(versions: list[PolicyVersionInfo], hist) -> dict[str, Any]:
    """The rounds table: header and rows of ``{text, title, cls}`` cells."""
    from fkpd.train.evaluate import describe_comparison

    intents = [c for c in hist.columns if c.startswith("intent_")]
    d4rl = "d4rl_score" in hist.columns
    text_columns = {"status", "vs parent (paired)", "objective", "regulariser"}
    header = [{"text": h, "cls": "left" if h in text_columns else ""} for h in (
        "round", "version", "status", "labels used", "success rate (95% CI)", "vs parent (paired)", "mean return",
        *(["D4RL score"] if d4rl else []), *(n.removeprefix("intent_") for n in intents),
        "implicit acc. (before → after)", "objective", "regulariser", "β", "λ", "steps", "eval episodes")]
    rows = []
    by_id = {v.id: v for v in versions}
    for r in hist.to_dict("records"):
        v = by_id[r["version"]]
        cmp = v.metrics.get("vs_parent")
        vs = _text(r["vs_parent"]) or "—"
        cells = [
            {"text": str(r["round"])}, {"text": f"v{v.id}", "title": version_label(v)},
            {"text": _text(r["status"]), "cls": "left"},
            {"text": _fmt(r["labels_used"], "d")},
            {"text": _pct(r["success_rate"]) + (f" ({_text(r['success_ci95'])})" if _text(r["success_ci95"]) else "")},
            {"text": vs, "cls": "left worse" if vs.endswith("WORSE") else "left",
             "title": describe_comparison(cmp, f"v{v.parent_id}") if cmp else ""},
            {"text": _fmt(r["mean_return"])}, *([{"text": _fmt(r["d4rl_score"])}] if d4rl else []),
            *({"text": _fmt(r[n], ".3f")} for n in intents),
            {"text": ("" if math.isnan(_num(r["implicit_acc_before"])) else f"{_pct(r['implicit_acc_before'])} → ")
             + _pct(r["implicit_acc"])},
            {"text": _fmt(r["objective"]), "cls": "left"}, {"text": _fmt(r["regularizer"]), "cls": "left"}, {"text": _fmt(r["beta"], "g")},
            {"text": _fmt(r["lam"], "g")}, {"text": _fmt(r["steps"], "g")}, {"text": _fmt(r["eval_episodes"], "g")},
        ]
        rows.append({"cells": cells, "cls": _text(r["status"]).replace(" ", "-")})
    return {"header": header, "rows": rows}


def _label_stats(store: Store, project: ProjectInfo) -> dict[str, Any]:
    """Comparisons per annotator and per round (left / right / equal / skip) and a
    stacked bar chart per annotator."""
    frame = store.comparisons_frame(project.id)
    stats = store.annotator_stats(project.id)
    outcomes = ("left", "right", "equal", "skip")
    totals = {k: int((frame["outcome"] == k).sum()) if len(frame) else 0 for k in outcomes}
    annotators = [{"name": name, "n": int(s["n_answers"]), **{k: int(s[f"n_{k}"]) for k in outcomes},
                   "tie_rate": _pct(s["tie_rate"]), "left_rate": _pct(s["left_rate"]),
                   "median_seconds": _fmt(s["median_seconds"])} for name, s in stats.iterrows()]
    per_round = []
    if len(frame):
        for rnd, group in frame.groupby("round", sort=True):
            counts = group["outcome"].value_counts()
            per_round.append({"round": int(rnd), "n": len(group), **{k: int(counts.get(k, 0)) for k in outcomes}})
    chart = None
    if annotators:
        from matplotlib.ticker import MaxNLocator

        fig, ax = _figure("Answers per annotator", "")
        names = [a["name"] for a in annotators]
        y = np.arange(len(names))
        left = np.zeros(len(names))
        for k, colour in zip(outcomes, ("#1f6fb2", "#e08a1e", "#7a7a7a", "#c9c9c9")):
            vals = np.array([a[k] for a in annotators], float)
            ax.barh(y, vals, left=left, color=colour, label=k)
            left += vals
        ax.set_yticks(y, names)
        ax.set_xlabel("answers")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, ncols=4, loc="lower right")
        fig.set_figheight(1.4 + 0.35 * len(names))
        chart = _png(fig)
    return {"total": int(len(frame)), "totals": totals, "annotators": annotators, "per_round": per_round,
            "n_annotators": len(annotators), "chart": chart}


@dataclass
class Report:
    """A rendered report: ``html`` (the whole file), its size in bytes, and what it holds."""

    html: str
    n_bytes: int
    versions: int
    comparisons: int
    annotators: int
    clips: ClipSet | None

    def summary(self) -> str:
        """One line: what the file holds and its size."""
        line = (f"{self.n_bytes / 1e6:.2f} MB: {self.versions} version(s), {self.comparisons} comparison(s) by "
                f"{self.annotators} annotator(s)")
        if self.clips is not None:
            c = self.clips
            line += (f", {len(c.episodes)} episode(s) of v{c.version_a.id} vs v{c.version_b.id} ({c.source})")
        return line


def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("fkpd.studio", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def build_report(store: Store, project: ProjectInfo, versions: Sequence[int] | None = None,
                 episodes: int = REPORT_EPISODES, render_size: int = REPORT_RENDER_SIZE,
                 progress: Progress | None = None) -> Report:
    """The project's report as one self-contained HTML page (see the module docstring).

    Args:
        versions: ``(a, b)`` version ids of the before/after videos (default:
            :func:`default_versions`; with a single served version there are no videos).
        episodes: before/after episodes (0: no videos), at most 16.
        render_size: the videos' frame size in pixels (each half).

    Raises:
        ReportError: no policy version yet, an unknown version, bad counts or sizes.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        fkpd_version = version("fkpd-studio")
    except PackageNotFoundError:  # run from a source tree that was never installed
        fkpd_version = "source tree"
    _check_counts(episodes, render_size, least=0)
    served = current_version(store, project)
    if served is None:
        default_versions(store, project)  # raises: nothing evaluated yet
    all_versions = store.list_policy_versions(project.id)
    hist = rounds_history(store, project)
    clips = videos = None
    note = ""
    if episodes:
        a, b = resolve_versions(store, project, versions)
        if a.id == b.id and versions is None:
            note = (f"Only one policy version ({short_label(a)}) so far: before/after videos come with the first "
                    "alignment round.")
        else:
            clips = episode_clips(store, project, a, b, episodes, render_size, progress)
            videos = []
            for i, ep in enumerate(clips.episodes):
                src, size = _mp4(side_by_side(clips, ep), clips.fps)
                videos.append({"src": src, "n_bytes": size, "seed": ep.seed, "index": i + 1,
                               "a": _outcome(ep.a), "b": _outcome(ep.b)})
                if progress is not None:
                    progress(i + 1, len(clips.episodes), "encoding videos")
    labels = _label_stats(store, project)
    context = {
        "project": project, "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "fkpd_version": fkpd_version, "served": version_label(served),
        "table": _rounds_table(all_versions, hist), "plots": _plots(all_versions, hist), "labels": labels,
        "videos": videos, "video_note": note,
        "clips": None if clips is None else {
            "a": version_label(clips.version_a), "b": version_label(clips.version_b), "source": clips.source,
            "a_short": short_label(clips.version_a), "b_short": short_label(clips.version_b)},
    }
    html = _environment().get_template("report.html.j2").render(**context)
    return Report(html, len(html.encode("utf-8")), len(all_versions), labels["total"], labels["n_annotators"], clips)


def write_report(store: Store, project: ProjectInfo, out: Path | str, **kwargs: Any) -> Report:
    """:func:`build_report` written to ``out`` atomically (UTF-8); ``kwargs`` as there."""
    from fkpd.io import atomic_path

    report = build_report(store, project, **kwargs)
    with atomic_path(out) as tmp:
        tmp.write_text(report.html, encoding="utf-8")
    return report


def report_bytes(store: Store, project: ProjectInfo, **kwargs: Any) -> bytes:
    """:func:`build_report`'s page as UTF-8 bytes (the Rounds page's download).

    Raises:
        ReportError: as :func:`build_report`, and for a checkpoint or video that is
            missing or corrupt (the message says which).
    """
    from fkpd.errors import FKPDError

    try:
        return build_report(store, project, **kwargs).html.encode("utf-8")
    except ReportError:
        raise
    except FKPDError as exc:  # a checkpoint missing or changed on disk, ...
        raise ReportError(f"{exc}; the report needs both versions' checkpoints") from None


__all__ = ["DEMO_EPISODES", "DEMO_RENDER_SIZE", "MAX_EPISODES", "REPORT_EPISODES", "REPORT_RENDER_SIZE", "Clip",
           "ClipSet", "DemoInfo", "EpisodeClips", "Report", "ReportError", "build_report", "default_versions",
           "episode_clips", "report_bytes", "resolve_versions", "short_label", "side_by_side", "write_demo",
           "write_report"]
