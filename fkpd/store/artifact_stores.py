"""Opening the artifact store a path or URL names: :func:`open_artifacts`.

A folder gives :class:`fkpd.store.artifacts.ArtifactDir`, a URL
(``s3://bucket/prefix``, any fsspec protocol)
:class:`fkpd.store.remote_artifacts.RemoteArtifacts`. Without one,
``$FKPD_ARTIFACT_URL`` wins over ``$FKPD_ARTIFACT_DIR`` (:func:`default_artifact_location`).
"""

from __future__ import annotations

import os
from pathlib import Path

from fkpd.store.artifacts import ArtifactDir, ArtifactStore, is_url
from fkpd.store.db import default_artifact_dir

#: Environment variable naming a remote artifact store (``s3://bucket/prefix``); it wins
#: over ``FKPD_ARTIFACT_DIR``.
ARTIFACT_URL_ENV = "FKPD_ARTIFACT_URL"


def default_artifact_location() -> str:
    """``$FKPD_ARTIFACT_URL`` if set, else ``$FKPD_ARTIFACT_DIR``, else ``labels/artifacts``."""
    return os.environ.get(ARTIFACT_URL_ENV, "").strip() or str(default_artifact_dir())


def open_artifacts(location: str | os.PathLike[str] | None = None, **options: object) -> ArtifactStore:
    """The artifact store at ``location``: a URL (``s3://bucket/prefix``, any ``fsspec``
    protocol) opens a :class:`fkpd.store.remote_artifacts.RemoteArtifacts`, a path an
    :class:`ArtifactDir`; None: :func:`default_artifact_location`.

    Args:
        **options: passed to :class:`~fkpd.store.remote_artifacts.RemoteArtifacts` for a
            URL (``cache_dir``, ``storage_options``); not allowed for a path.

    Raises:
        ArtifactPathError: an unknown protocol, or a URL with no bucket.
    """
    if isinstance(location, ArtifactStore):
        return location
    if location is None or not os.fspath(location).strip():
        location = default_artifact_location()
    if is_url(location):
        from fkpd.store.remote_artifacts import RemoteArtifacts

        return RemoteArtifacts(os.fspath(location), **options)  # type: ignore[arg-type]
    if options:
        raise TypeError(f"options {sorted(options)} only apply to a URL, not the directory {location!r}")
    return ArtifactDir(Path(location))
