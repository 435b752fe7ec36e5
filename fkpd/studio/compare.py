"""The ``compare`` job: the same reset seeds rolled out by two policy versions, with videos.

:func:`enqueue_compare` queues it from the Compare page (checked by
:class:`CompareParams`), the :func:`compare` handler (registered for the worker with
:func:`fkpd.store.register_handler` when this module is imported) renders the episodes,
and :func:`compare_videos` reads the finished job back with checked video paths.

**Limits.** Anyone may ask for a comparison, but a project has at most one compare job
queued or running at a time (a second click is refused with the first job's number), and
a comparison never holds up a round: the handler gives way (the job ends ``cancelled``,
its message says why) when it finds a bootstrap or alignment round of its project
waiting in the queue, before it starts and between batches of episodes. A compare job
queued after a round waits behind it (the queue is first come, first served).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from fkpd.store import (ArtifactIntegrityError, ArtifactPathError, JobCancelled, JobContext, JobView, ProjectInfo,
                        Store, register_handler)
from fkpd.studio.config import ACTIVE, TRAINING_KINDS, StudioError
from fkpd.studio.batches import checkpoint_dir, served_versions
from fkpd.studio.params import RoundParams

COMPARE = "compare"
#: The message a compare job ends with when it gave way to a round.
GAVE_WAY = "gave way to"
_ENQUEUE_LOCK = threading.Lock()  # one check-then-queue at a time in this process (sessions of one app)



@dataclass
class CompareParams:
    """Parameters of a ``compare`` job: the same reset seeds rolled out by two versions.

    Attributes:
        version_a, version_b: policy version ids of the project.
        episodes: number of reset seeds (1..16).
        seed: first reset seed (the evaluation seeds of :mod:`fkpd.policy.rollout` by default).
        render_size: video height and width in pixels.
    """

    version_a: int
    version_b: int
    episodes: int = 4
    seed: int = 10_000
    render_size: int = 224

    def __post_init__(self) -> None:
        for name in ("version_a", "version_b", "episodes", "seed", "render_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise StudioError(f"compare parameter {name!r} must be an integer, got {value!r}")
        if not 1 <= self.episodes <= 16:
            raise StudioError(f"compare 'episodes' must be between 1 and 16, got {self.episodes}")
        if not 32 <= self.render_size <= 640:
            raise StudioError(f"compare 'render_size' must be between 32 and 640 pixels, got {self.render_size}")


def active_compare_job(store: Store, project: ProjectInfo) -> JobView | None:
    """The project's queued or running compare job (the oldest, if several), or None."""
    jobs = [j for j in store.jobs.list(project.id, status=ACTIVE, limit=50) if j.kind == COMPARE]
    return jobs[-1] if jobs else None


def enqueue_compare(store: Store, project: ProjectInfo, version_a: int, version_b: int, episodes: int = 4,
                    render_size: int = 224) -> JobView:
    """Queue a comparison of two policy versions of the project; at most one at a time.

    The check and the insert run under a lock of this process, and a job that finds
    another active compare job of the project right after it was queued (a second app
    process queueing at the same moment) is cancelled again, so concurrent requests
    never leave two queued.

    Raises:
        StudioError: bad parameters, a version of another project, one without a
            checkpoint (imported labels, which cannot be rolled out), or a compare job
            of the project already queued or running.
    """
    try:
        params = CompareParams(int(version_a), int(version_b), int(episodes), render_size=int(render_size))
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, StudioError):
            raise
        raise StudioError(f"compare parameters must be whole numbers ({exc})") from None
    versions = {v.id: v for v in store.list_policy_versions(project.id)}
    for vid in (params.version_a, params.version_b):
        if vid not in versions:
            raise StudioError(f"policy version {vid} is not a version of project {project.name!r}")
        if versions[vid].checkpoint_path is None:
            raise StudioError(f"policy version {vid} holds imported labels, not a policy, so it cannot be rolled "
                              "out; pick a version with a checkpoint")
    with _ENQUEUE_LOCK:
        _refuse_if_active(active_compare_job(store, project))
        job = store.jobs.enqueue(project.id, COMPARE, dict(params.__dict__))
        others = [j for j in store.jobs.list(project.id, status=ACTIVE, limit=50)
                  if j.kind == COMPARE and j.id != job.id]
        if others:  # queued by another process at the same moment: keep at most one
            store.jobs.cancel(job.id)
            _refuse_if_active(others[-1])
    return job


def _refuse_if_active(job: JobView | None) -> None:
    if job is not None:
        state = "running" if job.status == "running" else "waiting for the worker"
        raise StudioError(f"a comparison (job {job.id}) is already {state}; one comparison at a time per project: "
                          "wait for it to finish, then roll out again")


def _give_way_to_rounds(ctx: JobContext) -> None:
    """Stop this compare job (as cancelled) if a bootstrap or alignment round of its
    project waits in the queue: comparisons never hold up a round."""
    waiting = [j for j in ctx.store.jobs.list(ctx.job.project_id, status="queued", limit=50)
               if j.kind in TRAINING_KINDS]
    if waiting:
        job = waiting[-1]
        ctx.progress(0.0, f"{GAVE_WAY} {job.kind.replace('_', ' ')} job {job.id}, queued meanwhile")
        raise JobCancelled(f"compare job {ctx.job_id} {GAVE_WAY} {job.kind} job {job.id}; roll out again after it")


@register_handler(COMPARE)
def compare(ctx: JobContext) -> dict[str, Any]:
    """Job handler: roll out the same reset seeds with two policy versions and save videos.

    Each version plays full episodes (the horizon the project was bootstrapped with) from reset seeds
    ``seed .. seed + episodes - 1`` with its own sampling noise; videos are written
    atomically to ``projects/<id>/compare/job<j>/``.

    Returns:
        ``{"version_a", "version_b", "episodes": [{"seed", "a": {"video", "return",
        "success"}, "b": {...}}]}`` with video paths relative to the artifact directory.

    Raises:
        StudioError: bad parameters.
        JobCancelled: a bootstrap or alignment round of the project is queued (the job
            gives way to it, before it starts or between batches of episodes).
        ArtifactIntegrityError / CheckpointError: a version's checkpoint is missing or corrupt.
    """
    from fkpd.envs import get_task, make_env
    from fkpd.policy import DiffusionPolicy
    from fkpd.policy.rollout import write_video
    from fkpd.policy.rollout import ClipRequest, rollout_clips

    store = ctx.store
    params = CompareParams(**ctx.params)
    _give_way_to_rounds(ctx)
    project = store.get_project(ctx.job.project_id)
    spec = get_task(project.task_id)
    horizon = _project_horizon(store, project)
    seeds = list(range(params.seed, params.seed + params.episodes))
    out: dict[str, Any] = {"version_a": params.version_a, "version_b": params.version_b,
                           "episodes": [{"seed": s} for s in seeds]}
    envs = [make_env(project.task_id, max_episode_steps=horizon, render_size=(params.render_size, params.render_size))
            for _ in range(min(8, params.episodes))]
    try:
        for side_i, (side, vid) in enumerate((("a", params.version_a), ("b", params.version_b))):
            version = store.get_policy_version(vid)
            policy = DiffusionPolicy.load(checkpoint_dir(store, version), task_id=project.task_id)
            requests = [ClipRequest(s, 1000 + s, max_steps=horizon, render_from=0) for s in seeds]
            for b0 in range(0, len(requests), len(envs)):
                episodes = rollout_clips(policy, envs, requests[b0:b0 + len(envs)])
                for k, ep in enumerate(episodes, start=b0):
                    rel = f"projects/{project.id}/compare/job{ctx.job_id}/seed{seeds[k]}_v{vid}.mp4"
                    video, video_sha = store.write_artifact_atomic(
                        rel, lambda path, frames=ep.frames: write_video(frames, path, fps=spec.fps), to_path=True)
                    out["episodes"][k][side] = {"video": video, "video_sha256": video_sha,
                                                "return": float(ep.ret),
                                                "success": bool(ep.succeeded)}
                    done = side_i * len(seeds) + k + 1
                    ctx.progress(done / (2 * len(seeds)), f"rendering: episode {done}/{2 * len(seeds)}")
                ctx.check_cancelled()
                _give_way_to_rounds(ctx)
    finally:
        for env in envs:
            env.close()
    return out


def _project_horizon(store: Store, project: ProjectInfo) -> int:
    """The episode length the project was bootstrapped with: the batch settings recorded
    with its first version that has a checkpoint, as alignment rounds read them."""

    versions = served_versions(store, project)
    recorded = (versions[0].metrics.get("bootstrap") or {}).get("settings") if versions else None
    return RoundParams().settings(recorded).horizon(project.task_id)


def compare_videos(store: Store, job: JobView) -> list[dict[str, Any]]:
    """The finished compare job's episodes with local video paths (None when missing or
    changed): the artifact directory's own file, or, with a remote store, the copy in its
    local cache (sha256-checked when the job recorded it)."""
    rows = []
    for ep in (job.result or {}).get("episodes", []):
        row = {"seed": ep.get("seed")}
        for side in ("a", "b"):
            info = dict(ep.get(side) or {})
            path = None
            if info.get("video"):
                try:
                    path = store.artifacts.local_file(info["video"], info.get("video_sha256"))
                except (ArtifactPathError, ArtifactIntegrityError):  # a bad stored path shows as a missing video
                    path = None
            info["path"] = path
            row[side] = info
        rows.append(row)
    return rows


__all__ = ["COMPARE", "CompareParams", "active_compare_job", "compare", "compare_videos", "enqueue_compare"]
