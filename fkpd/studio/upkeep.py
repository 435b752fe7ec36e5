"""What idle workers check, so projects move on without anyone clicking: :func:`upkeep`.

Registered as an idle hook of :class:`fkpd.store.Worker` (:func:`fkpd.store.register_idle_hook`)
when :mod:`fkpd.studio` is imported, which ``fkpd worker`` does; every idle worker runs it
every couple of seconds. For every project with a policy version it

1. queues an automatic alignment round when one is due
   (:func:`fkpd.studio.autoround.maybe_start_round`), then
2. queues a ``top_up`` job when the open pairs run low
   (:func:`fkpd.studio.topup.maybe_top_up`).

Both only queue jobs, each through a one-transaction check
(:meth:`fkpd.store.JobQueue.enqueue_unless`), so any number of workers may run it at once.
Projects without a policy version (being bootstrapped, or holding imported labels only)
are passed over. A failure in one project is logged and does not stop the others.
"""

from __future__ import annotations

import logging

from fkpd.store import JobView, Store, register_idle_hook
from fkpd.studio.autoround import maybe_start_round
from fkpd.studio.topup import maybe_top_up

log = logging.getLogger(__name__)


def upkeep(store: Store) -> list[JobView]:
    """Queue the automatic rounds and top-ups that are due, in every project.

    Returns:
        The jobs queued (often none).
    """
    queued: list[JobView] = []
    for project in store.list_projects():
        try:
            if not any(v.checkpoint_path is not None for v in store.list_policy_versions(project.id)):
                continue
            for check in (maybe_start_round, maybe_top_up):
                job = check(store, project)
                if job is not None:
                    queued.append(job)
        except Exception:  # noqa: BLE001 - one broken project must not stop the others
            log.warning("upkeep of project %s failed", project.name, exc_info=True)
    return queued


register_idle_hook(upkeep)

__all__ = ["upkeep"]
