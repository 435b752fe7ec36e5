"""``fkpd report`` and ``fkpd demo`` (fkpd.studio.report, fkpd.cli.report) on a real tiny
project (tests/conftest_report.py): the report is one HTML file with nothing outside it
holding the rounds table, the plots, the label statistics and playable before/after
videos; the demo is one side-by-side MP4; errors name the commands' flags."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from conftest_app import PROJECT, TASK

pytest.register_assert_rewrite("conftest_report")  # loaded as a plugin (below): rewrite it as one
from conftest_report import EPISODES, SIZE, open_store, store_args  # noqa: E402
from fkpd.cli import main  # noqa: E402

pytest_plugins = ["conftest_report"]
HORIZON = 60  # the tiny bootstrap's max_episode_steps: full episodes are 61 frames


class _Page(HTMLParser):
    """Every element's attributes, the tables' cells by table id, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attrs))
        if tag == "table":
            self._table = attrs.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> tuple[str, _Page]:
    html = path.read_text(encoding="utf-8")
    page = _Page()
    page.feed(html)
    return html, page


def _data(uri: str, mime: str) -> bytes:
    head, _, payload = uri.partition(",")
    assert head == f"data:{mime};base64", head
    return base64.b64decode(payload, validate=True)


def _frames(path: Path) -> np.ndarray:
    """Every frame of an MP4 file, (T, H, W, 3) uint8 (imageio-ffmpeg)."""
    with imageio.get_reader(str(path), format="FFMPEG") as r:
        return np.stack([f for f in r])  # not list(r): the reader's len() is "unknown", i.e. sys.maxsize


def _side_by_side_shape(size: int) -> tuple[int, int]:
    """(height, width) of a side-by-side frame of two size × size halves (report.side_by_side)."""
    band = max(24, round(0.22 * size))
    band += (-(size + band)) % 16
    return size + band, 2 * size + 4 + (-(2 * size + 4)) % 16


def test_report_is_one_self_contained_file_with_table_plots_labels_and_videos(report_project, tmp_path, capsys):
    from fkpd.studio import rounds_history

    out = tmp_path / "report.html"
    assert main(["report", "--project", PROJECT, "--out", str(out), "--episodes", "1", "--render-size",
                 str(SIZE), *store_args(report_project)]) == 0
    printed = capsys.readouterr().out
    size_mb = float(re.search(r"\(([\d.]+) MB", printed).group(1))
    assert size_mb == pytest.approx(out.stat().st_size / 1e6, abs=0.006), printed
    assert "2 version(s), 4 comparison(s) by 2 annotator(s), 1 episode(s) of v1 vs v2 (rendered now)" in printed
    html, page = _parse(out)

    # Nothing outside the file: no URL anywhere, every src/href a data: URI or a fragment.
    bare = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "data:", html)  # base64 may hold "//"
    assert not re.search(r"(?i)https?:|ftp:|//[a-z0-9]", bare.replace("</", "")), "a URL in the report"
    assert not [t for t, _ in page.elements if t in ("link", "script", "iframe", "object", "embed")]
    refs = [a[k] for _, a in page.elements for k in ("src", "href", "poster") if k in a]
    assert refs and all(r.startswith(("data:", "#")) for r in refs), [r[:40] for r in refs]
    assert "url(" not in html

    # The rounds table: one row per version, the values of rounds_history.
    with open_store(report_project) as store:
        project = store.get_project(PROJECT)
        hist = rounds_history(store, project)
        stats = store.annotator_stats(project.id)
    header, *rows = page.tables["rounds-table"]
    assert header[:6] == ["round", "version", "status", "labels used", "success rate (95% CI)",
                          "vs parent (paired)"]
    assert [r[1] for r in rows] == [f"v{v}" for v in hist["version"]] == ["v1", "v2"]
    assert rows[1][2] == "served" and rows[1][3] == str(hist.loc[1, "labels_used"]) == "3"
    for row, (_, h) in zip(rows, hist.iterrows()):
        assert row[4] == f"{100 * h['success_rate']:.0f}% ({h['success_ci95']})"
        assert row[header.index("mean return")] == f"{h['mean_return']:.1f}"
    assert rows[0][5] == "—" and rows[1][5] == hist.loc[1, "vs_parent"], "the paired comparison with v1"
    assert rows[1][header.index("implicit acc. (before → after)")].endswith(f"{100 * hist.loc[1, 'implicit_acc']:.0f}%")

    # The plots: PNG images over the versions, and the answers per annotator.
    images = {a.get("id"): a for t, a in page.elements if t == "figure"}
    for fig_id in ("plot-success", "plot-intent", "plot-implicit", "plot-annotators"):
        assert fig_id in images, fig_id
    pngs = [a["src"] for t, a in page.elements if t == "img"]
    assert len(pngs) == 4
    from PIL import Image

    for src in pngs:
        img = Image.open(io.BytesIO(_data(src, "image/png")))
        assert img.format == "PNG" and img.width > 300 and img.height > 100

    # Label statistics: answers per annotator, left / right / equal / skip.
    header, *ann = page.tables["annotators-table"]
    assert [r[:6] for r in ann] == [[name, str(s.n_answers), str(s.n_left), str(s.n_right), str(s.n_equal),
                                     str(s.n_skip)] for name, s in stats.iterrows()]
    assert [r[:6] for r in ann] == [["ada", "2", "1", "0", "1", "0"], ["bob", "2", "0", "1", "0", "1"]]
    assert "4 comparisons: 1 left, 1 right, 1 equal, 1 skipped." in " ".join("".join(page.text).split())

    # Before/after videos: one H.264 MP4 per episode, A and B side by side, full episodes.
    (video,) = [a for t, a in page.elements if t == "video"]
    assert {"muted", "loop", "playsinline"} <= set(video)
    (tmp_path / "episode.mp4").write_bytes(_data(video["src"], "video/mp4"))
    assert _frames(tmp_path / "episode.mp4").shape == (HORIZON + 1, *_side_by_side_shape(SIZE), 3)
    assert "Episode 1, reset seed 10000." in html, "the first evaluation seed, as the Compare page's"


def test_demo_is_the_side_by_side_video_of_a_comparisons_clips(compared_project, tmp_path, capsys):
    from fkpd.studio import compare_videos

    root, job_id = compared_project
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--project", PROJECT, "--versions", "v1", "2", "--episodes", str(EPISODES),
                 "--render-size", str(SIZE), "--out", str(out), *store_args(root)]) == 0
    printed = capsys.readouterr().out
    assert f"(clips of compare job {job_id})" in printed, "the Compare page's clips are reused, not rendered again"
    with open_store(root) as store:
        rows = compare_videos(store, store.jobs.get(job_id))
    clips = [(_frames(r["a"]["path"]), _frames(r["b"]["path"])) for r in rows]
    expected = sum(max(len(a), len(b)) for a, b in clips)
    frames = _frames(out)
    height, width = _side_by_side_shape(SIZE)
    assert frames.shape == (expected, height, width, 3) and expected == EPISODES * (HORIZON + 1)
    assert f"{expected} frames of {width}x{height} at 30 fps" in printed
    # A on the left, B on the right, under the caption band: the compare job's frames.
    band = height - SIZE
    first_a, first_b = clips[0][0][0].astype(float), clips[0][1][0].astype(float)
    assert np.abs(frames[0, band:, :SIZE].astype(float) - first_a).mean() < 12
    assert np.abs(frames[0, band:, SIZE + 4:2 * SIZE + 4].astype(float) - first_b).mean() < 12
    assert np.abs(frames[0, :band].astype(float) - frames[0, band:].mean()).mean() > 1, "a caption band on top"


def test_report_and_demo_errors_name_their_flags(report_project, tmp_path, capsys):
    from fkpd.store import Store

    def error(argv) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    store = store_args(report_project)
    out = str(tmp_path / "r.html")
    assert "--project 'nope'" in error(["report", "--project", "nope", "--out", out, *store])
    assert "--versions: policy version 9 is not a version of project 'door-open'" in error(
        ["report", "--project", PROJECT, "--out", out, "--versions", "1", "9", *store])
    assert "--episodes must be between 0 and 16" in error(
        ["report", "--project", PROJECT, "--out", out, "--episodes", "17", *store])
    assert "--render-size must be between 32 and 640" in error(
        ["demo", "--project", PROJECT, "--out", str(tmp_path / "d.mp4"), "--render-size", "8", *store])
    assert "--episodes must be between 1 and 16" in error(
        ["demo", "--project", PROJECT, "--out", str(tmp_path / "d.mp4"), "--episodes", "0", *store])
    assert "--versions" in error(["demo", "--project", PROJECT, "--out", str(tmp_path / "d.mp4"), "--versions",
                                  "x", "2", *store])
    assert "--out" in error(["report", "--project", PROJECT, "--out", str(tmp_path / "no" / "r.html"), *store])
    assert "--out" in error(["demo", "--project", PROJECT, "--out", str(tmp_path / "d.avi"), *store])
    assert not list(tmp_path.iterdir()), "nothing written on an error"

    empty = tmp_path / "empty"
    with Store(f"sqlite:///{empty}.sqlite", empty) as s:
        s.create_project("fresh", TASK, "")
    fresh = ["--database-url", f"sqlite:///{empty}.sqlite", "--artifact-dir", str(empty)]
    for cmd, name in (("report", "r.html"), ("demo", "d.mp4")):
        msg = error([cmd, "--project", "fresh", "--out", str(tmp_path / name), *fresh])
        assert "has no evaluated policy version yet" in msg and "fkpd projects show fresh" in msg
        assert "--versions" not in msg, "not a problem of the versions asked for"


def test_rounds_page_offers_the_report_as_a_download(compared_project, tmp_path, monkeypatch):
    import shutil
    import sys

    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from conftest_app import studio_env

    root = tmp_path / "studio"
    shutil.copytree(compared_project[0], root)
    for k, v in studio_env(root).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # as tests/test_app.py's fixture
    st.cache_resource.clear()
    try:
        at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"),
                               default_timeout=60)
        at.run()
        at.switch_page("pages/rounds.py").run()
        assert not at.exception
        next(b for b in at.button if b.key == "prepare_report").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        with open_store(root) as store:
            project_id = store.get_project(PROJECT).id
        html = at.session_state[f"report_html_{project_id}"].decode("utf-8")
    finally:
        st.cache_resource.clear()
    assert html.startswith("<!DOCTYPE html>") and 'id="rounds-table"' in html
    assert html.count("<video ") == 2 and f"clips of compare job {compared_project[1]}" in html
    assert any(b.proto.label.startswith("Download report (") for b in at.get("download_button"))
