"""The preference store: projects, policy versions, clips, pairs, leases and answers.

:class:`Store` is the one object the labelling app, the worker and the trainers share.
It is thread-safe (one engine with a connection pool; every method runs its own short
transaction) and may be created in many processes against the same database. A forked
child (e.g. a DataLoader worker) drops the inherited connections and opens its own.

It is assembled from one module per concern:

* :mod:`fkpd.store.core` — engine, sessions, clock, artifacts and row lookups
  (:class:`~fkpd.store.core.StoreCore`);
* :mod:`fkpd.store.catalogue` — projects, annotators, policy versions, clips;
* :mod:`fkpd.store.pairs` — pairs, retiring them, imported labelled pairs;
* :mod:`fkpd.store.assignment` — leased assignment (:meth:`Store.next_pair`) and
  idempotent answers (:meth:`Store.answer`, only for pairs leased to the annotator), with
  the rules and the concurrency scheme;
* :mod:`fkpd.store.invites` — invite links of projects in ``invite`` identity mode;
* :mod:`fkpd.store.reports` — progress, comparison frames, training pairs, statistics;
* :mod:`fkpd.store.quality` — gold pairs and annotators excluded from training;
* :mod:`fkpd.store.queue` — the job queue, ``store.jobs``.
"""

from __future__ import annotations

from fkpd.store.assignment import AssignmentMixin
from fkpd.store.catalogue import CatalogueMixin
from fkpd.store.core import DEFAULT_SETTINGS, StoreCore, validate_settings
from fkpd.store.invites import InvitesMixin
from fkpd.store.pairs import PairsMixin
from fkpd.store.quality import QualityMixin
from fkpd.store.reports import ReportsMixin

__all__ = ["DEFAULT_SETTINGS", "Store", "validate_settings"]


class Store(PairsMixin, CatalogueMixin, AssignmentMixin, InvitesMixin, ReportsMixin, QualityMixin, StoreCore):
    """Preference store on SQLite or PostgreSQL, plus the artifact directory beside it.

    Args:
        url: SQLAlchemy database URL; default ``$FKPD_DATABASE_URL`` or the SQLite file
            ``labels/fkpd.sqlite`` under the repository root. ``postgresql://`` URLs use
            psycopg 3.
        artifact_dir: where videos, segments, datasets and checkpoints live: a folder,
            a URL of an object store (``s3://bucket/prefix``, see
            :mod:`fkpd.store.remote_artifacts`) or an :class:`ArtifactStore`; default
            ``$FKPD_ARTIFACT_URL``, else ``$FKPD_ARTIFACT_DIR``, else ``labels/artifacts``.
        clock: returns the current time (aware, or naive UTC); tests inject a fake one.
            Lease expiry and job heartbeats are judged by this clock, so all processes
            sharing a database should have synchronised clocks.
        migrate: run :func:`fkpd.store.db.init_db` (``alembic upgrade head``) on open.
        engine_kwargs: extra arguments for :func:`sqlalchemy.create_engine`.

    Raises:
        StoreUnavailableError: the database refuses connections or is not a database.
        StoreError: the database was created by a newer version (unknown migration).
    """
