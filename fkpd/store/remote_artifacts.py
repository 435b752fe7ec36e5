"""Artifacts on object storage: :class:`RemoteArtifacts`, an :class:`ArtifactStore` at a URL.

With ``FKPD_ARTIFACT_URL=s3://bucket/prefix`` (or ``--artifact-dir s3://...``) the
store, the workers and the app keep checkpoints, segments, clips and datasets in an
object store through `fsspec <https://filesystem-spec.readthedocs.io>`_ (``s3fs`` for
``s3://``), so workers on other machines need no shared file system.

* **Atomic writes.** A writer first writes the whole file locally (the same writers as
  the local store: bytes, a file object, or a path for video encoders), hashes it, then
  uploads it. On object stores (``s3``, ``gs``, ``az``...) the upload is one
  ``put`` of the whole object: S3 makes an object visible only once its (single or
  multipart) upload completes, so no reader ever sees part of it under its final key.
  Elsewhere (e.g. ``file://``, ``sftp://``) the file is put under a temporary key
  ``.<name>.<random>.part<suffix>`` beside the destination and then moved onto it.
* **sha256 on read.** :meth:`RemoteArtifacts.read_bytes` and
  :meth:`RemoteArtifacts.local_file` check the bytes against the sha256 the database
  recorded; a mismatch raises :class:`~fkpd.store.errors.ArtifactIntegrityError`.
* **Local read-through cache**, keyed by sha256: ``<cache>/sha256/<ab>/<sha256>/<name>``
  (``$FKPD_ARTIFACT_CACHE``, default ``$XDG_CACHE_HOME/fkpd/artifacts`` or
  ``~/.cache/fkpd/artifacts``). Torch checkpoints and HDF5 datasets, which their readers
  open by file name, and the app's videos come from there; a cached copy is verified
  each time it is handed out, so a damaged cache is refetched, never served. What a
  worker writes is put into the cache as it is uploaded. The cache can be deleted at any
  time.
* **Staging.** Jobs that write folders (behaviour cloning, alignment) write under
  ``<cache>/work/<hash of the URL>/<relpath>`` (:meth:`RemoteArtifacts.workdir`) and
  upload the checkpoint with :meth:`RemoteArtifacts.publish_dir` before registering it.

**Endpoint and credentials** follow the libraries' own standards: credentials from
boto's usual sources (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an
instance role); an S3-compatible server (MinIO, Ceph, moto) with fsspec's configuration
variables, read each time a store is opened: ``FSSPEC_S3_ENDPOINT_URL=http://host:9000``
(any ``FSSPEC_<PROTOCOL>_<OPTION>``), or ``FSSPEC_S3='{"endpoint_url": ...}'`` (JSON),
or fsspec's config files (``$FSSPEC_CONFIG_DIR``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Mapping

from fkpd.store.artifacts import (
    ArtifactData,
    ArtifactStore,
    _files_under,
    _mismatch,
    _write_data,
    is_part_name,
    normalize_relpath,
    sha256_file,
)
from fkpd.store.errors import ArtifactIntegrityError, ArtifactPathError, ArtifactUnavailableError

log = logging.getLogger(__name__)

#: Environment variable naming the local cache directory of remote artifacts.
ARTIFACT_CACHE_ENV = "FKPD_ARTIFACT_CACHE"
#: Protocols whose ``put`` makes an object visible only once it is complete.
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$FKPD_ARTIFACT_CACHE``, else ``$XDG_CACHE_HOME/fkpd/artifacts``, else
    ``~/.cache/fkpd/artifacts``."""
    env = os.environ.get(ARTIFACT_CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fkpd" / "artifacts"


def storage_options_from_env(protocol: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """fsspec's configured options for ``protocol``: its config files and import-time
    environment (``fsspec.config.conf``), updated with the ``FSSPEC_<PROTOCOL>`` /
    ``FSSPEC_<PROTOCOL>_<OPTION>`` variables of ``env`` (default ``os.environ``) as they
    are now (fsspec reads them only once, at import)."""
    import fsspec.config

    fresh: dict[str, dict[str, Any]] = {}
    fsspec.config.set_conf_env(fresh, envdict=dict(os.environ if env is None else env))
    return {**fsspec.config.conf.get(protocol, {}), **fresh.get(protocol, {})}


class RemoteArtifacts(ArtifactStore):
    """An artifact store at an fsspec URL; see the module docstring.

    Args:
        url: ``protocol://bucket/prefix`` (e.g. ``s3://fkpd/labels``); the prefix may be
            empty.
        cache_dir: local cache directory (default :func:`default_cache_dir`).
        storage_options: options for the file system, over fsspec's configured ones
            (:func:`storage_options_from_env`), e.g. ``{"endpoint_url": ...}``.

    Raises:
        ArtifactPathError: the protocol is not known to fsspec (for ``s3://``, install
            ``s3fs``), or the URL names no bucket.
    """

    def __init__(self, url: str, *, cache_dir: str | os.PathLike[str] | None = None,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        import fsspec
        from fsspec.core import split_protocol

        protocol, path = split_protocol(url.strip())
        if not protocol:
            raise ArtifactPathError(f"{url!r} is not a URL; give e.g. s3://bucket/prefix")
        protocol = protocol.lower()
        base = (path or "").strip("/")
        if base and protocol in ("file", "local"):
            base = "/" + base  # a local path stays absolute
        if not base:
            raise ArtifactPathError(f"artifact URL {url!r} names no bucket; give e.g. {protocol}://bucket/prefix")
        if ".." in PurePosixPath(base).parts:
            raise ArtifactPathError(f"artifact URL {url!r} contains '..'")
        options = {**storage_options_from_env(protocol), **dict(storage_options or {})}
        try:
            self.fs = fsspec.filesystem(protocol, **options)
        except (ImportError, ValueError) as exc:
            raise ArtifactPathError(
                f"cannot open artifact URL {url!r}: {exc}. For s3:// install s3fs (it is in requirements.txt)"
            ) from None
        self.protocol = protocol
        self.base = base
        self.url = f"{protocol}://{base}"
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.root = self.cache_dir / "work" / hashlib.sha256(self.url.encode()).hexdigest()[:16]
        self._atomic_put = protocol in OBJECT_STORES
        self._endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")

    def __repr__(self) -> str:
        return f"RemoteArtifacts({self.url!r}, cache_dir={str(self.cache_dir)!r})"

    # ------------------------------------------------------------------ plumbing

    @property
    def location(self) -> str:
        return self.url

    def _key(self, relpath: str | os.PathLike[str]) -> str:
        return f"{self.base}/{normalize_relpath(relpath)}"

    def _rel(self, key: str) -> str:
        key, base = key.strip("/"), self.base.strip("/")
        return key[len(base) + 1:] if key.startswith(base + "/") else ""

    @contextmanager
    def _remote(self, what: str, relpath: str | os.PathLike[str] | None = None,
                missing_is_error: bool = True) -> Iterator[None]:
        """Turn the file system's errors into the store's: a missing object into
        :class:`ArtifactIntegrityError`, anything else (connection, bucket, credentials)
        into :class:`ArtifactUnavailableError`."""
        try:
            yield
        except (ArtifactIntegrityError, ArtifactPathError):
            raise
        except FileNotFoundError as exc:
            if relpath is not None and missing_is_error:
                raise ArtifactIntegrityError(
                    f"artifact {os.fspath(relpath)!r} not found at {self.url}/{normalize_relpath(relpath)}") from None
            raise self._unavailable(what, exc) from None
        except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors have no common base
            raise self._unavailable(what, exc) from None

    def _unavailable(self, what: str, exc: BaseException) -> ArtifactUnavailableError:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = f" at {self._endpoint}" if self._endpoint else ""
        return ArtifactUnavailableError(
            f"cannot {what} the artifact store {self.url}{where}: {type(exc).__name__}: {first}. Check "
            "FKPD_ARTIFACT_URL (the bucket must exist), the endpoint (FSSPEC_S3_ENDPOINT_URL for an "
            "S3-compatible server) and the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).")

    def _cache_path(self, sha256: str, name: str) -> Path:
        return self.cache_dir / "sha256" / sha256[:2] / sha256 / name

    def _tmp_dir(self) -> Path:
        path = self.cache_dir / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _keep_in_cache(self, tmp: Path, sha256: str, name: str) -> Path:
        """Move the verified local file ``tmp`` into the cache (atomically); returns its path."""
        dest = self._cache_path(sha256, name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
        return dest

    def _download(self, relpath: str | os.PathLike[str]) -> tuple[Path, str]:
        """Fetch an object into a temporary local file; returns ``(path, sha256)``."""
        fd, name = tempfile.mkstemp(dir=self._tmp_dir(), prefix=".dl.", suffix=".part")
        os.close(fd)
        tmp = Path(name)
        try:
            with self._remote("read", relpath):
                self.fs.get_file(self._key(relpath), str(tmp))
            return tmp, sha256_file(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _cached(self, sha256: str, name: str) -> Path | None:
        """The cached copy of a file with this sha256, after checking it; None if absent
        (a damaged copy is removed)."""
        path = self._cache_path(sha256, name)
        if not path.is_file():
            return None
        if sha256_file(path) == sha256:
            return path
        log.warning("artifact cache: %s does not match its sha256; fetching it again", path)
        path.unlink(missing_ok=True)
        return None

    # ------------------------------------------------------------------ writing

    def write_atomic(self, relpath: str | os.PathLike[str], data: ArtifactData, *,
                     to_path: bool = False) -> tuple[str, str]:
        rel = normalize_relpath(relpath)
        name = PurePosixPath(rel).name
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp_dir(), prefix=f".{name}.",
                                        suffix=f".part{PurePosixPath(rel).suffix}")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            _write_data(tmp, data, to_path)
            digest = sha256_file(tmp)
            self._upload(tmp, rel)
            self._keep_in_cache(tmp, digest, name)
        finally:
            tmp.unlink(missing_ok=True)
        return rel, digest

    def _upload(self, local: Path, rel: str) -> None:
        """Put a whole local file at ``rel``, never visible there half-written."""
        key = self._key(rel)
        with self._remote("write", rel, missing_is_error=False):
            if self._atomic_put:
                self.fs.put_file(str(local), key)
                return
            parent, _, name = key.rpartition("/")
            tmp_key = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.part{PurePosixPath(name).suffix}"
            self.fs.makedirs(parent, exist_ok=True)
            try:
                self.fs.put_file(str(local), tmp_key)
                self.fs.mv(tmp_key, key)
            except BaseException:
                try:
                    self.fs.rm_file(tmp_key)
                except Exception:  # noqa: BLE001 - best effort; the sweeper removes what is left
                    pass
                raise

    def publish_file(self, local_file: str | os.PathLike[str], relpath: str | os.PathLike[str]) -> tuple[str, str]:
        src = Path(local_file)
        return self.write_atomic(relpath, lambda tmp: shutil.copyfile(src, tmp), to_path=True)

    def publish_dir(self, local_dir: str | os.PathLike[str], relpath: str | os.PathLike[str]) -> dict[str, str]:
        rel = normalize_relpath(relpath)
        out: dict[str, str] = {}
        for path in _files_under(Path(local_dir)):
            out.update([self.publish_file(path, f"{rel}/{path.relative_to(local_dir).as_posix()}")])
        return out

    # ------------------------------------------------------------------ reading

    def read_bytes(self, relpath: str | os.PathLike[str], sha256: str | None = None) -> bytes:
        rel = normalize_relpath(relpath)
        if sha256 is not None:
            cached = self._cached(sha256, PurePosixPath(rel).name)
            if cached is not None:
                return cached.read_bytes()
        with self._remote("read", rel):
            data = self.fs.cat_file(self._key(rel))
        if sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise _mismatch(rel, actual, sha256, f"{self.url}/{rel}")
            fd, tmp = tempfile.mkstemp(dir=self._tmp_dir(), prefix=".rd.", suffix=".part")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._keep_in_cache(Path(tmp), sha256, PurePosixPath(rel).name)
        return data

    def exists(self, relpath: str | os.PathLike[str]) -> bool:
        key = self._key(relpath)
        with self._remote("read", None):
            self.fs.invalidate_cache()
            return bool(self.fs.isfile(key))

    def sha256(self, relpath: str | os.PathLike[str]) -> str:
        digest = hashlib.sha256()
        with self._remote("read", relpath):
            with self.fs.open(self._key(relpath), "rb") as f:
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    def local_file(self, relpath: str | os.PathLike[str], sha256: str | None = None, *,
                   siblings: bool = False) -> Path:
        rel = normalize_relpath(relpath)
        name = PurePosixPath(rel).name
        path = self._cached(sha256, name) if sha256 is not None else None
        if path is None:
            tmp, actual = self._download(rel)
            try:
                if sha256 is not None and actual != sha256:
                    raise _mismatch(rel, actual, sha256, f"{self.url}/{rel}")
                path = self._keep_in_cache(tmp, actual, name)
            finally:
                tmp.unlink(missing_ok=True)
        if siblings:
            self._fetch_siblings(rel, path.parent)
        return path

    def _fetch_siblings(self, rel: str, folder: Path) -> None:
        """Download the other files of ``rel``'s folder into ``folder`` (each atomically)."""
        parent = str(PurePosixPath(rel).parent)
        prefix = "" if parent == "." else parent
        for other in self.list(prefix):
            sub = other[len(prefix) + 1:] if prefix else other
            if "/" in sub or other == rel or is_part_name(sub) or (folder / sub).is_file():
                continue
            tmp, _ = self._download(other)
            os.replace(tmp, folder / sub)

    # ------------------------------------------------------------------ folders

    def workdir(self, relpath: str | os.PathLike[str]) -> Path:
        path = self.root / normalize_relpath(relpath)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def list(self, prefix: str = "") -> list[str]:
        key = self._key(prefix) if prefix else self.base
        with self._remote("list", None):
            self.fs.invalidate_cache()
            try:
                found = self.fs.find(key, detail=False)
            except FileNotFoundError:
                return []
        out = [self._rel(k) for k in found]
        return sorted(r for r in out if r and (not prefix or r.startswith(normalize_relpath(prefix) + "/")))

    def remove(self, relpath: str | os.PathLike[str]) -> None:
        key = self._key(relpath)
        with self._remote("delete from", None):
            try:
                self.fs.rm_file(key)
            except FileNotFoundError:
                pass

    def remove_tree(self, prefix: str | os.PathLike[str]) -> None:
        try:
            for rel in self.list(normalize_relpath(prefix)):
                self.remove(rel)
        except Exception:  # noqa: BLE001 - documented: cleanup after a failure is best effort
            log.warning("could not remove %s/%s", self.url, prefix, exc_info=True)

    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        normalize_relpath(relpath)
        raise ArtifactPathError(
            f"artifact {os.fspath(relpath)!r} is in the remote store {self.url}, which has no local path; "
            "read it with read_bytes or local_file, write folders under workdir and publish_dir")
