"""Automatic alignment rounds: a round starts once enough new comparisons arrived.

A project setting (:data:`~fkpd.studio.config.AUTO_ROUND_EVERY`, set on the Rounds page by
an admin, :func:`set_auto_rounds`) asks for an ``alignment_round`` job as soon as
``N`` new trainable comparisons (left, right or equal; skips never count) arrived since
the latest policy version; 0 turns it off (rounds start by hand). A new project created
by the app starts with ``N`` = its batch size (:func:`fkpd.studio.open_project`).

* **New comparisons** = trainable comparisons now − the comparisons the latest version
  was trained on (its ``labels_used``; 0 for version 0). The latest version is the newest
  one with a checkpoint, rolled back or not, so a roll-back does not start a round on the
  labels the rolled-back round already had.
* **Never two at once**: the round is queued with the checks of
  :func:`fkpd.studio.enqueue_round` (a policy version exists, no bootstrap or round queued
  or running, something to train on) and through
  :meth:`fkpd.store.JobQueue.enqueue_unless`, one transaction that queues nothing when an
  alignment round is queued or running, so two workers checking at once queue one.
* **A failed round pauses them**: when the project's newest alignment round failed or was
  cancelled, automatic rounds wait (the Rounds page says why) until an admin saves the
  setting again or starts a round by hand; a failing round is never retried in a loop.
* **Parameters**: those of the latest round an admin started by hand (remembered by
  :func:`fkpd.studio.enqueue_round` in the project setting :data:`ROUND_PARAMS`), else
  the defaults.

Who checks: every idle worker of the app, every couple of seconds
(:mod:`fkpd.studio.upkeep`, an idle hook of :class:`fkpd.store.Worker`), so rounds start
without any browser open; the app's second, top-up worker is idle while the first trains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fkpd.store import JobView, PolicyVersionInfo, ProjectInfo, Store
from fkpd.studio.config import AUTO_ROUND_EVERY, MAX_AUTO_ROUND_EVERY, StudioError
from fkpd.studio.history import ROUND_PARAMS, active_training_job, enqueue_round, error_headline, job_summary
from fkpd.studio.params import ALIGNMENT_ROUND

log = logging.getLogger(__name__)

#: Project setting: the id of the alignment round job after which automatic rounds were
#: resumed (a failed or cancelled round up to this id no longer pauses them).
AUTO_ROUND_RESUMED_AFTER = "auto_round_resumed_after_job"


@dataclass(frozen=True)
class AutoRoundState:
    """Where a project stands with automatic rounds.

    Attributes:
        every: N, new comparisons that start a round; 0: off (rounds by hand).
        new: trainable comparisons that arrived since the latest version.
        version: the latest version (None before the bootstrap registered one).
        active: the bootstrap or alignment round queued or running, if any.
        paused: why automatic rounds wait although on (a failed round), or None.
    """

    every: int
    new: int
    version: PolicyVersionInfo | None
    active: JobView | None
    paused: str | None

    @property
    def enabled(self) -> bool:
        return self.every > 0

    @property
    def due(self) -> bool:
        """True when a round should be queued now."""
        return (self.enabled and self.paused is None and self.active is None and self.version is not None
                and self.new >= self.every)

    def describe(self) -> str:
        """One line for the Rounds page: when the next round starts."""
        if not self.enabled:
            return (f"Automatic rounds are off: an admin starts each round. {self.new} new comparison(s) since the "
                    "latest version.")
        if self.paused:
            return f"Automatic rounds are paused: {self.paused}"
        if self.active is not None:
            return f"{job_summary(self.active)}. The next automatic round counts the comparisons after it."
        if self.version is None:
            return f"The first automatic round starts after {self.every} comparisons, once the bootstrap is done."
        if self.due:
            return f"{self.new} of {self.every} new comparisons: the next round starts in a moment."
        return (f"{self.new} of {self.every} new comparisons: the next round starts automatically after "
                f"{self.every - self.new} more.")


def auto_round_every(project: ProjectInfo) -> int:
    """N of the project's setting (0: off; a missing or malformed value is off)."""
    value = project.settings.get(AUTO_ROUND_EVERY)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def latest_version(store: Store, project: ProjectInfo) -> PolicyVersionInfo | None:
    """The newest version with a checkpoint (rolled back or not), or None."""
    versions = [v for v in store.list_policy_versions(project.id) if v.checkpoint_path is not None]
    return versions[-1] if versions else None


def new_comparisons(store: Store, project: ProjectInfo, version: PolicyVersionInfo | None) -> int:
    """Trainable comparisons that arrived since ``version`` was trained (all of them for
    version 0 or None); never negative."""
    used = int((version.metrics.get("labels_used") or 0) if version is not None and version.round > 0 else 0)
    return max(0, store.count_training_pairs(project.id) - used)


def _paused(store: Store, project: ProjectInfo) -> str | None:
    """Why automatic rounds wait: the newest alignment round failed or was cancelled (and
    was not acknowledged by saving the setting since), else None."""
    last = next((j for j in store.jobs.list(project.id, limit=50) if j.kind == ALIGNMENT_ROUND), None)
    if last is None or last.status not in ("failed", "cancelled"):
        return None
    resumed = project.settings.get(AUTO_ROUND_RESUMED_AFTER)
    if isinstance(resumed, int) and not isinstance(resumed, bool) and last.id <= resumed:
        return None
    why = error_headline(last) if last.status == "failed" else "it was cancelled"
    return (f"the last round (job {last.id}) {last.status}: {why}. Fix the cause, then save the setting again "
            "(or start a round by hand) to resume.")


def auto_round_state(store: Store, project: ProjectInfo) -> AutoRoundState:
    """The project's automatic-round state now (see :class:`AutoRoundState`).

    Raises:
        NotFoundError: unknown project.
    """
    project = store.get_project(project.id)
    version = latest_version(store, project)
    every = auto_round_every(project)
    return AutoRoundState(every=every, new=new_comparisons(store, project, version), version=version,
                          active=active_training_job(store, project),
                          paused=_paused(store, project) if every else None)


def set_auto_rounds(store: Store, project: ProjectInfo, every: int) -> ProjectInfo:
    """Turn automatic rounds on (a round after ``every`` new comparisons) or off (0).

    Saving the setting also resumes automatic rounds paused by a failed round.

    Raises:
        StudioError: ``every`` is not an integer between 0 and
            :data:`~fkpd.studio.config.MAX_AUTO_ROUND_EVERY`.
    """
    if isinstance(every, bool) or not isinstance(every, int) or not 0 <= every <= MAX_AUTO_ROUND_EVERY:
        raise StudioError(f"the number of new comparisons that starts a round must be an integer between 1 and "
                          f"{MAX_AUTO_ROUND_EVERY}, or 0 for rounds by hand; got {every!r}")
    last = next((j for j in store.jobs.list(project.id, limit=50) if j.kind == ALIGNMENT_ROUND), None)
    settings = {AUTO_ROUND_EVERY: every}
    if last is not None:
        settings[AUTO_ROUND_RESUMED_AFTER] = last.id
    info = store.update_project(project.id, settings=settings)
    log.info("project %s: automatic rounds %s", project.name, f"after {every} new comparisons" if every else "off")
    return info


def maybe_start_round(store: Store, project: ProjectInfo) -> JobView | None:
    """Queue an automatic alignment round if one is due (:attr:`AutoRoundState.due`).

    Returns:
        The queued job, or None (not due, or another process queued one first).

    Raises:
        NotFoundError: unknown project.
    """
    state = auto_round_state(store, project)
    if not state.due:
        return None
    project = store.get_project(project.id)
    params = project.settings.get(ROUND_PARAMS) or {}
    try:
        job = enqueue_round(store, project, params if isinstance(params, dict) else {}, remember=False)
    except StudioError as exc:  # e.g. remembered parameters that a newer version refuses, or a race
        log.warning("project %s: no automatic round: %s", project.name, exc)
        return None
    if job is not None:
        log.info("project %s: %d new comparisons (threshold %d): queued automatic alignment round (job %s)",
                 project.name, state.new, state.every, job.id)
    return job


__all__ = ["AUTO_ROUND_RESUMED_AFTER", "AutoRoundState", "auto_round_every", "auto_round_state", "latest_version",
           "maybe_start_round", "new_comparisons", "set_auto_rounds"]
