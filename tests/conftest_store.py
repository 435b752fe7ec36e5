"""Shared fixtures and helpers of the store tests (``tests/test_store*.py``).

Every store test runs on SQLite (a file under ``tmp_path``) and, when
``FKPD_TEST_DATABASE_URL`` points at a PostgreSQL database, on PostgreSQL as well. Each
PostgreSQL test gets a fresh schema (``search_path`` set through the URL, so processes
started by the test see it too) that is dropped afterwards.

The module-level functions at the bottom are targets for ``multiprocessing`` (spawn):
they build their own :class:`Store` from a URL, as a real second process would.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from fkpd.store import ProjectInfo, Store
from fkpd.store.queue import register_handler
from fkpd.store.worker import run_worker

PG_ENV = "FKPD_TEST_DATABASE_URL"
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL for an empty database: SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fkpd.sqlite'}"
        return
    base = os.environ.get(PG_ENV, "").strip()
    if not base:
        pytest.skip(f"set {PG_ENV} (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test) for PostgreSQL")
    schema = f"fkpd_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(make_url(base).set(drivername="postgresql+psycopg"))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).set(drivername="postgresql+psycopg")
    url = url.update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture
def store(db_url: str, artifact_dir: Path) -> Iterator[Store]:
    with Store(db_url, artifact_dir) as s:
        yield s


class FakeClock:
    """A settable clock for lease and heartbeat expiry tests."""

    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def clocked_store(db_url: str, artifact_dir: Path, clock: FakeClock) -> Iterator[Store]:
    with Store(db_url, artifact_dir, clock=clock) as s:
        yield s


def segment_arrays(seed: int, length: int = 6, obs_dim: int = 4, act_dim: int = 2):
    """Deterministic (observations (L, Do), actions (L, Da), rewards (L,)) for a seed."""
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(length, obs_dim)).astype(np.float32),
        rng.uniform(-1, 1, size=(length, act_dim)).astype(np.float32),
        rng.normal(size=length).astype(np.float32),
    )


def make_clips(store: Store, version_id: int, seed: int, n: int = 2, with_video: bool = False) -> list[int]:
    """Write ``n`` segments rolled out from ``seed`` and register them as clips."""
    ids = []
    for k in range(n):
        obs, act, rew = segment_arrays(version_id * 100_003 + seed * 101 + k)
        rel, sha = store.artifacts.save_segment(f"seg/v{version_id}/s{seed}_{k}.npz", obs, act, rew)
        video = None
        if with_video:
            video, _ = store.write_artifact_atomic(f"video/v{version_id}/s{seed}_{k}.mp4", b"fake mp4 bytes")
        clip = store.add_clip(
            version_id,
            segment_path=rel,
            segment_sha256=sha,
            video_path=video,
            length=len(rew),
            fps=30,
            reset_seed=seed,
            gt_return=float(rew.sum()),
            gt_success=bool(k % 2),
        )
        ids.append(clip.id)
    return ids


def make_project(
    store: Store,
    n_pairs: int,
    *,
    name: str = "proj",
    labels_per_pair: int = 1,
    lease_seconds: float = 120.0,
    round: int = 0,
    with_video: bool = False,
    second_opinions: int = 0,
) -> tuple[ProjectInfo, list[int]]:
    """A project (created if new) with one policy version of ``round`` and ``n_pairs``
    open pairs, each of two clips from its own reset seed. Second opinions are off unless
    asked for (the store's default is 1), so a pair takes exactly ``labels_per_pair``."""
    project = store.create_project(
        name,
        "metaworld/door-open-v3",
        "Which arm opens the door more smoothly?",
        {"labels_per_pair": labels_per_pair, "lease_seconds": lease_seconds, "second_opinions": second_opinions},
        exist_ok=True,
    )
    version = store.add_policy_version(project.id, round=round)
    pairs = []
    for seed in range(n_pairs):
        left, right = make_clips(store, version.id, seed, with_video=with_video)
        pairs.append((left, right))
    return project, store.add_pairs(project.id, pairs)


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


# --------------------------------------------------------------------------- process targets


def annotate_until_empty(url: str, artifact_dir: str, project: str, annotators: list[str]):
    """Label with each annotator in turn until no pair is left; returns
    ``[(pair_id, annotator, comparison_id)]`` for every answer reported as stored."""
    answered = []
    with Store(url, artifact_dir) as store:
        ids = [store.get_or_create_annotator(a).id for a in annotators]
        active = list(zip(annotators, ids))
        outcomes = ["left", "right", "equal", "skip"]
        while active:
            for entry in list(active):
                name, annotator_id = entry
                pair = store.next_pair(project, annotator_id)
                if pair is None:
                    active.remove(entry)
                    continue
                outcome = outcomes[(pair.id + annotator_id) % 4]
                record = store.answer(pair.id, annotator_id, outcome, datetime.now(timezone.utc))
                answered.append((pair.id, name, record.id))
    return answered


def lease_once(url: str, artifact_dir: str, project: str, annotators: list[str]):
    """Each annotator asks for one pair and keeps it; returns ``[(annotator, pair_id|None)]``."""
    with Store(url, artifact_dir) as store:
        out = []
        for name in annotators:
            pair = store.next_pair(project, store.get_or_create_annotator(name))
            out.append((name, None if pair is None else pair.id))
        return out


def claim_until_empty(url: str, artifact_dir: str, worker_id: str) -> list[int]:
    """Claim jobs until the queue is empty; returns the claimed job ids."""
    claimed = []
    with Store(url, artifact_dir) as store:
        while (job := store.jobs.claim(worker_id)) is not None:
            claimed.append(job.id)
    return claimed


def migrate(url: str, artifact_dir: str) -> str:
    """Open a store (which runs the migrations) and return the revision reached."""
    from fkpd.store.db import current_revision

    with Store(url, artifact_dir) as store:
        return current_revision(store.engine) or ""


def spin_handler(ctx) -> None:
    """A job that reports progress forever (until its process is killed)."""
    step = 0
    while True:
        step += 1
        ctx.progress(min(step / 10_000, 0.99), f"step {step}")
        time.sleep(0.01)


def spinning_worker(url: str, artifact_dir: str, worker_id: str) -> None:
    """A worker process whose only handler, ``test_spin``, never returns."""
    register_handler("test_spin", spin_handler, replace=True)
    with Store(url, artifact_dir) as store:
        run_worker(store, poll_s=0.05, worker_id=worker_id, heartbeat_s=0.1, stale_after_s=None)
