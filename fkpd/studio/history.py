"""A project's policy versions and training jobs, for the Label, Rounds and Data pages.

* :func:`current_version` — the served policy; :func:`version_label` names a version.
* :func:`active_training_job`, :func:`latest_training_job`, :func:`job_summary`,
  :func:`error_headline` — the bootstrap / alignment round in progress or last run.
* :func:`retry_bootstrap`, :func:`enqueue_round` — queue a training job, once the checks
  pass; :func:`rounds_history` — one row per version.
* :func:`export_bytes` — the comparisons as a file, written to a temporary directory and
  returned as bytes (no path from the browser).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from fkpd.store import JobView, ProjectInfo, Store
from fkpd.studio.compare import COMPARE
from fkpd.studio.config import ACTIVE, ROUND_FIELDS, TRAINING_KINDS, StudioError
from fkpd.studio.batches import ROLLED_BACK, served_versions
from fkpd.studio.params import RoundParams


def current_version(store: Store, project: ProjectInfo):
    """The served policy: the newest version with a checkpoint, or None before bootstrap."""
    versions = served_versions(store, project)
    return versions[-1] if versions else None


def version_label(v) -> str:
    """``v3 · round 2 · 40% success`` for a PolicyVersionInfo; on D4RL tasks the D4RL
    normalised score follows (``v3 · round 2 · 0% success · D4RL score 41.5``), and a
    version of imported labels reads ``v4 · imported labels``."""
    if v.metrics.get("source") == "import":
        return f"v{v.id} · imported labels"
    sr = v.metrics.get("success_rate")
    tail = f" · {100 * sr:.0f}% success" if isinstance(sr, (int, float)) else ""
    score = v.metrics.get("d4rl_normalized_score")
    tail += f" · D4RL score {score:.1f}" if isinstance(score, (int, float)) else ""
    name = "BC" if v.round == 0 else f"round {v.round}"
    return f"v{v.id} · {name}{tail}"


def active_training_job(store: Store, project: ProjectInfo) -> JobView | None:
    """The queued or running bootstrap / alignment round of the project, if any."""
    jobs = [j for j in store.jobs.list(project.id, status=ACTIVE, limit=20) if j.kind in TRAINING_KINDS]
    return jobs[-1] if jobs else None


def latest_training_job(store: Store, project: ProjectInfo) -> JobView | None:
    """The newest bootstrap / alignment round of the project, whatever its status."""
    return next((j for j in store.jobs.list(project.id, limit=50) if j.kind in TRAINING_KINDS), None)


def job_summary(job: JobView) -> str:
    """One line for a job: kind, id, status, progress and message."""
    what = {"bootstrap": "Bootstrap", "alignment_round": "Alignment round", COMPARE: "Comparison"}.get(
        job.kind, job.kind)
    line = f"{what} (job {job.id}): {job.status}"
    if job.status == "running":
        line += f", {100 * job.progress:.0f}%"
        if job.message:
            line += f" — {job.message}"
    elif job.status == "queued":
        line += ", waiting for the worker"
    return line


def error_headline(job: JobView) -> str:
    """The last line of a failed job's traceback: the message a person needs."""
    lines = [ln for ln in (job.error or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "failed without an error message"


# ------------------------------------------------------------------ training jobs


def retry_bootstrap(store: Store, project: ProjectInfo, params: Mapping[str, Any]) -> JobView:
    """Queue the bootstrap again (after a failure).

    Raises:
        StudioError: the project already has a policy version, or a training job is
            queued or running.
    """
    if current_version(store, project) is not None:
        raise StudioError(f"project {project.name!r} is already bootstrapped")
    if active_training_job(store, project) is not None:
        raise StudioError("a training job is already queued or running")
    return store.jobs.enqueue(project.id, "bootstrap", dict(params))


def rounds_history(store: Store, project: ProjectInfo):
    """One row per policy version: round, labels used, success rate, implicit accuracy, ...

    Returns:
        A pandas DataFrame (empty with the columns when there is no version yet);
        ``success_rate`` and ``implicit_acc`` are fractions in [0, 1]. When a version
        has a D4RL normalised score (``d4rl/`` tasks, 0-100 scale) the frame has a
        ``d4rl_score`` column after ``mean_return``; the intent teachers' scores recorded
        by the evaluation (``intent_smooth``, ``intent_high_gripper``; higher is closer
        to the intent, :func:`fkpd.prefs.teachers.intent_scores`) come before
        ``implicit_acc``. A version that holds imported labels
        (no checkpoint) shows ``— (imported labels)`` as its regulariser.
        ``success_ci95`` is the 95% Wilson interval of the success rate as text;
        ``vs_parent`` the paired change in success against the parent on the same
        evaluation seeds with its 95% bootstrap interval, ending in ``WORSE`` when the
        version is worse beyond it (:func:`fkpd.train.evaluate.compare_with_parent`);
        ``status`` is ``served`` (the current policy), ``rolled back`` or empty.
    """
    import pandas as pd

    rolled = set(store.get_project(project.id).settings.get(ROLLED_BACK) or ())
    served = served_versions(store, project)
    served_id = served[-1].id if served else None
    cols = ["round", "version", "status", "created", "labels_used", "success_rate", "success_ci95", "vs_parent",
            "mean_return", "implicit_acc",
            "implicit_acc_before", "reward_margin", "objective", "regularizer", "beta", "lam", "c_bc", "steps",
            "eval_episodes"]
    rows = []
    for v in store.list_policy_versions(project.id):
        m = v.metrics
        kind = "— (imported labels)" if m.get("source") == "import" else "— (BC)" if v.round == 0 else None
        ci = m.get("success_ci95")
        rows.append({"round": v.round, "version": v.id, "created": v.created_at,
                     "status": "served" if v.id == served_id else "rolled back" if v.id in rolled else "",
                     "success_ci95": f"{100 * ci[0]:.0f}–{100 * ci[1]:.0f}%" if ci and None not in ci else None,
                     "vs_parent": _vs_parent(m.get("vs_parent")),
                     "labels_used": m.get("labels_used", 0), "success_rate": m.get("success_rate"),
                     "mean_return": m.get("mean_return"), "d4rl_score": m.get("d4rl_normalized_score"),
                     "implicit_acc": m.get("implicit_acc"),
                     "implicit_acc_before": m.get("implicit_acc_before"), "reward_margin": m.get("reward_margin"),
                     "objective": m.get("objective", "additive" if kind is None else kind),
                     "regularizer": m.get("regularizer", kind), "c_bc": m.get("c_bc"),
                     "beta": m.get("beta"), "lam": m.get("lam"), "steps": m.get("steps", m.get("bc_steps")),
                     "eval_episodes": m.get("episodes"),
                     **{k: m[k] for k in m if k.startswith("intent_")}})
    if any(r["d4rl_score"] is not None for r in rows):
        cols.insert(cols.index("mean_return") + 1, "d4rl_score")
    intents = sorted({k for r in rows for k in r if k.startswith("intent_")})
    at = cols.index("implicit_acc")
    cols[at:at] = intents
    return pd.DataFrame(rows, columns=cols)


def _vs_parent(cmp: Mapping[str, Any] | None) -> str | None:
    """``−20 pts [−35, −5] WORSE`` for a stored paired comparison (None without one)."""
    if not cmp:
        return None
    lo, hi = cmp["delta_success_ci95"]
    text = f"{100 * cmp['delta_success']:+.0f} pts [{100 * lo:+.0f}, {100 * hi:+.0f}]"
    return text + (" WORSE" if cmp.get("worse") else "")


#: Project setting: the parameters of the latest round an admin started by hand, which
#: automatic rounds use (:mod:`fkpd.studio.autoround`).
ROUND_PARAMS = "round_params"


def remembered_round_params(store: Store, project: ProjectInfo) -> dict[str, Any]:
    """The parameters of the latest round an admin started (:data:`ROUND_PARAMS`), ``{}``
    when none was started (or the setting is not a JSON object).

    Raises:
        NotFoundError: unknown project.
    """
    remembered = store.get_project(project.id).settings.get(ROUND_PARAMS)
    return dict(remembered) if isinstance(remembered, dict) else {}


def enqueue_round(store: Store, project: ProjectInfo, params: Mapping[str, Any], *,
                  remember: bool = True) -> JobView:
    """Queue an alignment round with the admin's parameters.

    The last check and the insert are one transaction
    (:meth:`fkpd.store.JobQueue.enqueue_unless`), so two callers at once (two admins, an
    admin and the automatic rounds) queue one round.

    Args:
        params: a subset of :data:`ROUND_FIELDS`; the others keep their defaults.
        remember: keep ``params`` as the project's :data:`ROUND_PARAMS` (automatic rounds
            use them); the automatic rounds themselves pass False.

    Raises:
        StudioError: an unknown or invalid parameter, no policy version yet, no comparison
            to train on, or a training job already queued or running.
    """

    unknown = sorted(set(params) - set(ROUND_FIELDS))
    if unknown:
        raise StudioError(f"unknown round parameter(s) {unknown}; allowed: {list(ROUND_FIELDS)}")
    job_params = RoundParams.from_params(params).to_params()  # ParamError (a StudioError) on a bad value
    if current_version(store, project) is None:
        raise StudioError("the project has no policy yet: wait for the bootstrap to finish")
    job = active_training_job(store, project)
    if job is not None:
        raise StudioError(f"{job_summary(job)}; wait for it to finish before starting another round")
    if not store.count_training_pairs(project.id):
        raise StudioError("no comparison to train on yet: label some pairs Left, Right or Equal first "
                          "(skips are not trained on)")
    job = store.jobs.enqueue_unless(project.id, "alignment_round", job_params, statuses=ACTIVE)
    if job is None:
        raise StudioError("an alignment round was queued a moment ago; wait for it to finish before starting another "
                          "round")
    if remember:
        store.update_project(project.id, settings={ROUND_PARAMS: job_params})
    return job


# ------------------------------------------------------------------ data


def export_bytes(store: Store, project: ProjectInfo, fmt: str, *, rounds: Iterable[int] | None = None,
                 annotators: Iterable[str] | None = None, include_excluded: bool = True) -> bytes:
    """The project's comparisons with their segments as a Parquet or HDF5 file, in memory;
    only those of ``rounds`` by ``annotators`` (names) when given (the Data page's filters),
    without those of annotators excluded from training when ``include_excluded`` is False.

    Raises:
        StudioError: unknown format; a segment file that is missing, changed since it
            was stored (its sha256 differs) or unreadable (the message names the clip's
            file and says what to do; nothing is exported); or the temporary file
            cannot be written.
    """
    from fkpd.errors import FKPDError
    from fkpd.store import ArtifactIntegrityError
    from fkpd.store.export import export_comparisons

    if fmt not in ("parquet", "hdf5"):
        raise StudioError(f"unknown export format {fmt!r}; choose parquet or hdf5")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"comparisons.{'h5' if fmt == 'hdf5' else 'parquet'}"
            export_comparisons(store, project.id, fmt, out, rounds=rounds, annotators=annotators,
                               include_excluded=include_excluded)
            return out.read_bytes()
    except ArtifactIntegrityError as exc:
        raise StudioError(f"the export stopped: {exc}. A segment file was removed or changed after it was stored; "
                          "restore it from a backup (or retire its pair), then export again") from None
    except FKPDError as exc:
        raise StudioError(f"the export stopped: {exc}") from None
    except (OSError, ValueError) as exc:  # an unreadable segment file, a full temporary disk
        raise StudioError(f"the export stopped: {type(exc).__name__}: {exc}") from None


__all__ = ["ROUND_PARAMS", "active_training_job", "current_version", "enqueue_round", "error_headline", "export_bytes",
           "job_summary", "latest_training_job", "remembered_round_params", "retry_bootstrap", "rounds_history",
           "version_label"]
