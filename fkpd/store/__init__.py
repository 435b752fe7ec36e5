"""Preference store and job queue: the database layer of FKPD Studio.

* :class:`Store` — projects, annotators, policy versions, clips, pairs, leased
  assignment (:meth:`Store.next_pair`), idempotent answers (:meth:`Store.answer`),
  reports and training data; SQLite by default, PostgreSQL by URL (:mod:`fkpd.store.store`
  lists the module of each concern).
* :mod:`fkpd.store.queue` — the job queue (``store.jobs``) and the handler registry
  (:func:`register_handler`); :mod:`fkpd.store.worker` — :class:`Worker` and
  :func:`run_worker`, the body of ``fkpd worker``.
* :mod:`fkpd.store.export` — export to Parquet/HDF5 (import of Preference Transformer /
  Uni-RLHF label files is :mod:`fkpd.prefs.importers`).
* :func:`outcome_to_p_left` — the one mapping from an answer to the label ``p_left``.
* :mod:`fkpd.store.invites` — invite links (tokens stored hashed) for projects in
  ``invite`` identity mode; :mod:`fkpd.store.sweep` — removing stale temporary files and
  unregistered clip files from the artifact directory.

Quick start::

    from fkpd.store import Store

    store = Store()                                 # labels/fkpd.sqlite, migrated
    store.create_project("door", "metaworld/door-open-v3", exist_ok=True)
    me = store.get_or_create_annotator("ada")
    pair = store.next_pair("door", me)              # PairView or None, leased to ada
    if pair is not None:
        store.answer(pair.id, me, "left", shown_at=shown, project="door")
"""

from fkpd.store.artifact_stores import default_artifact_location, open_artifacts
from fkpd.store.artifacts import ArtifactDir, ArtifactStore, sha256_file
from fkpd.store.db import (
    default_artifact_dir,
    default_database_url,
    head_revision,
    init_db,
    make_engine,
)
from fkpd.store.errors import (
    AlreadyExistsError,
    ArtifactIntegrityError,
    ArtifactPathError,
    ArtifactUnavailableError,
    ImportFormatError,
    InvalidTokenError,
    JobCancelled,
    JobLostError,
    JobStateError,
    NotFoundError,
    NotLeasedError,
    PairUnavailableError,
    StoreError,
    StoreInputError,
    StoreUnavailableError,
    TooEarlyError,
    WorkerStopping,
)
from fkpd.store.outcomes import Outcome, outcome_to_p_left
from fkpd.store.queue import HANDLERS, JobQueue, JobView, register_handler
from fkpd.store.store import DEFAULT_SETTINGS, Store
from fkpd.store.views import (
    AnnotatorInfo,
    ClipRecord,
    ClipView,
    ComparisonRecord,
    ExclusionInfo,
    InviteInfo,
    PairView,
    PolicyVersionInfo,
    ProjectInfo,
    PairSupply,
    SeedGroup,
    TrainingPair,
)
from fkpd.store.sweep import SweepReport, sweep_artifacts
from fkpd.store.worker import JobContext, Worker, current_job, register_idle_hook, run_worker

__all__ = [
    "AlreadyExistsError",
    "AnnotatorInfo",
    "ArtifactDir",
    "ArtifactIntegrityError",
    "ArtifactPathError",
    "ArtifactStore",
    "ArtifactUnavailableError",
    "ClipRecord",
    "ClipView",
    "ComparisonRecord",
    "DEFAULT_SETTINGS",
    "ExclusionInfo",
    "HANDLERS",
    "ImportFormatError",
    "InvalidTokenError",
    "InviteInfo",
    "JobCancelled",
    "JobContext",
    "JobLostError",
    "JobQueue",
    "JobStateError",
    "JobView",
    "WorkerStopping",
    "current_job",
    "NotFoundError",
    "NotLeasedError",
    "Outcome",
    "PairUnavailableError",
    "PairView",
    "PolicyVersionInfo",
    "ProjectInfo",
    "Store",
    "StoreError",
    "StoreInputError",
    "StoreUnavailableError",
    "SweepReport",
    "TooEarlyError",
    "PairSupply",
    "SeedGroup",
    "TrainingPair",
    "Worker",
    "default_artifact_dir",
    "default_artifact_location",
    "default_database_url",
    "head_revision",
    "init_db",
    "make_engine",
    "open_artifacts",
    "outcome_to_p_left",
    "register_handler",
    "register_idle_hook",
    "run_worker",
    "sha256_file",
    "sweep_artifacts",
]
