"""Errors raised by the preference store and job queue.

All of them derive from :class:`fkpd.errors.FKPDError`, so the CLI and the app can show
the message without a traceback; each message says what was wrong and what to do.
"""

from __future__ import annotations

from fkpd.errors import FKPDError


class StoreError(FKPDError):
    """Base class of the errors raised by :mod:`fkpd.store`."""


class StoreInputError(StoreError, ValueError):
    """An argument is malformed: an empty name, an unknown outcome, a bad setting."""


class NotFoundError(StoreError, LookupError):
    """A project, annotator, clip, pair, policy version or job does not exist."""

    def __str__(self) -> str:  # LookupError subclasses would quote the message
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(StoreError, ValueError):
    """A row with the same unique key (e.g. a project name) already exists."""


class StoreUnavailableError(StoreError):
    """The database cannot be opened: the server refuses connections, the URL names no
    reachable database, or the file is not an SQLite database. The message names the
    database (password hidden) and what to check."""


class PairUnavailableError(StoreError):
    """A pair cannot take this answer: it is retired, or already has enough labels."""


class NotLeasedError(PairUnavailableError):
    """An answer for a pair that is not leased to this annotator (never leased, or the
    lease lapsed and someone else took the pair), or that belongs to another project:
    refused, so nobody can answer in another annotator's place."""


class TooEarlyError(PairUnavailableError):
    """An answer given before the pair had been on screen for the minimum viewing time
    (:meth:`fkpd.store.Store.answer`'s ``min_view_seconds``): refused, not stored; the
    pair stays leased to the annotator."""


class InvalidTokenError(StoreError):
    """An invite token that is unknown, of another project, or revoked."""


class ArtifactPathError(StoreError, ValueError):
    """An artifact path is absolute, contains ``..`` or otherwise escapes the artifact dir."""


class ArtifactIntegrityError(StoreError):
    """An artifact file is missing or its sha256 differs from the one in the database."""


class ArtifactUnavailableError(StoreError):
    """A remote artifact store (``FKPD_ARTIFACT_URL``) cannot be reached or written: no
    server at the endpoint, no such bucket, refused credentials. The message names the
    URL and what to check."""


class JobStateError(StoreError):
    """A job is not in a state that allows the requested transition."""


class JobLostError(JobStateError):
    """The job is no longer running under this worker (recovered as stale, or cancelled).

    A worker that sees this must stop working on the job and must not report a result.
    """


class JobCancelled(StoreError):
    """Raised inside a job handler (by ``ctx.check_cancelled()``) after ``cancel(job_id)``."""


class WorkerStopping(StoreError):
    """Raised inside a job handler (by ``ctx.check_cancelled()``) when its worker was asked
    to stop (Ctrl-C, SIGTERM, the app that started it exited): the worker puts the job
    back in the queue, and the next worker re-runs it from what it saved."""


class ImportFormatError(StoreError, ValueError):
    """A label file or dataset given to an importer has the wrong layout."""
