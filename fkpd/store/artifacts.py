"""Files next to the database: videos, segment arrays (.npz), checkpoints, datasets.

The database stores each file as a POSIX path *relative to the artifact store* plus the
file's hex sha256, so a project can be moved or mounted elsewhere. Two stores implement
:class:`ArtifactStore`:

* :class:`ArtifactDir` (the default): a local directory, ``labels/artifacts`` or
  ``$FKPD_ARTIFACT_DIR``. Files are written atomically (temporary file in the same
  directory, ``fsync``, ``os.replace``, ``fsync`` of the directory): a reader, or a row
  registered after a crash, never sees a half-written file.
* :class:`fkpd.store.remote_artifacts.RemoteArtifacts`: an object store or any other
  ``fsspec`` file system named by a URL (``$FKPD_ARTIFACT_URL``, e.g.
  ``s3://bucket/prefix``), so workers on other machines need no shared disk. Objects are
  put whole (S3 makes an object visible only once its upload completes) or, on file
  systems without that guarantee, written to a temporary key and moved; every read
  given a sha256 is verified, and local copies (checkpoints, HDF5 datasets, videos) come
  from a read-through cache keyed by sha256.

:func:`fkpd.store.artifact_stores.open_artifacts` picks one from a path or URL.

Segment files (``.npz``, written by :meth:`ArtifactDir.save_segment`) hold at least
``observations (L, Do) float32``, ``actions (L, Da) float32`` and ``rewards (L,) float32``;
callers may add more arrays (e.g. ``terminals``).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, Callable, Iterator, Union

import numpy as np

from fkpd.io import atomic_path
from fkpd.store.errors import ArtifactIntegrityError, ArtifactPathError

#: What :meth:`ArtifactDir.write_atomic` accepts: the bytes, or a callable that writes
#: into the binary file object it is given (or, with ``to_path=True``, into a path).
ArtifactData = Union[bytes, bytearray, memoryview, Callable[[BinaryIO], object], Callable[[Path], object]]

SEGMENT_KEYS = ("observations", "actions", "rewards")
_CHUNK = 1 << 20
_FILE_MODE = 0o644


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def normalize_relpath(relpath: str | os.PathLike[str]) -> str:
    """Validate an artifact path and return it in canonical POSIX form.

    Raises:
        ArtifactPathError: the path is empty, absolute (POSIX or Windows style), has a
            drive, or contains a ``..`` component.
    """
    raw = os.fspath(relpath)
    if not raw or not raw.strip():
        raise ArtifactPathError("artifact path is empty; give a path like 'clips/r0/0001.mp4'")
    text = raw.replace("\\", "/")
    if PurePosixPath(text).is_absolute() or PureWindowsPath(raw).anchor:
        raise ArtifactPathError(
            f"artifact path {raw!r} is absolute; give it relative to the artifact directory"
        )
    parts = [p for p in PurePosixPath(text).parts if p not in ("", ".")]
    if ".." in parts:
        raise ArtifactPathError(
            f"artifact path {raw!r} contains '..'; paths must stay inside the artifact "
            "directory"
        )
    if not parts:
        raise ArtifactPathError(f"artifact path {raw!r} names no file")
    return "/".join(parts)


def is_part_name(name: str) -> bool:
    """Whether a file name is an interrupted writer's temporary name,
    ``.<name>.<random>.part<suffix>`` (:func:`fkpd.io.atomic_path`, and the temporary
    keys of :class:`fkpd.store.remote_artifacts.RemoteArtifacts`)."""
    return name.startswith(".") and ".part" in name


def _write_data(tmp: Path, data: ArtifactData, to_path: bool) -> None:
    """Write ``data`` (see :meth:`ArtifactStore.write_atomic`) into the file ``tmp``."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        tmp.write_bytes(data)
    elif to_path:
        data(tmp)  # type: ignore[call-arg, arg-type]
    else:
        with open(tmp, "r+b") as f:
            data(f)  # type: ignore[arg-type]


class ArtifactStore(ABC):
    """Where artifacts live: a local directory (:class:`ArtifactDir`) or a URL
    (:class:`fkpd.store.remote_artifacts.RemoteArtifacts`). Every path is relative to the
    store (:func:`normalize_relpath`: no absolute paths, no ``..``).

    Attributes:
        root: a local directory: the artifact directory itself (:class:`ArtifactDir`),
            or, for a remote store, the local staging directory where jobs write
            outputs before :meth:`publish_dir` uploads them.
    """

    root: Path

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the artifacts are, for messages: a directory or a URL."""

    @property
    def is_local(self) -> bool:
        """True for a local directory (:meth:`resolve` gives the artifacts' own paths)."""
        return False

    @abstractmethod
    def write_atomic(self, relpath: str | os.PathLike[str], data: ArtifactData, *,
                     to_path: bool = False) -> tuple[str, str]:
        """Write an artifact atomically; return ``(normalized relpath, sha256)``.

        Args:
            relpath: destination relative to the store; an existing artifact is
                replaced atomically.
            data: the bytes; or a callable that writes the content into the binary file
                object it receives (it may seek, e.g. ``np.savez``); or, with
                ``to_path=True``, a callable that writes a file at the :class:`Path` it
                receives (for encoders that need a file name, e.g. video writers; the
                temporary path keeps the destination's suffix).
            to_path: see ``data``.

        Raises:
            ArtifactPathError: ``relpath`` escapes the store.
            ArtifactUnavailableError: a remote store cannot be written.
            Exception: whatever the writer raised; nothing is left under ``relpath``.
        """

    @abstractmethod
    def read_bytes(self, relpath: str | os.PathLike[str], sha256: str | None = None) -> bytes:
        """An artifact's bytes, checked against ``sha256`` when it is given.

        Raises:
            ArtifactPathError: ``relpath`` escapes the store.
            ArtifactIntegrityError: the artifact is missing, or its sha256 differs.
            ArtifactUnavailableError: a remote store cannot be reached.
        """

    @abstractmethod
    def exists(self, relpath: str | os.PathLike[str]) -> bool:
        """Whether the artifact exists (a file, not a folder)."""

    @abstractmethod
    def sha256(self, relpath: str | os.PathLike[str]) -> str:
        """Hex sha256 of an existing artifact.

        Raises:
            ArtifactIntegrityError: the artifact does not exist.
        """

    @abstractmethod
    def local_file(self, relpath: str | os.PathLike[str], sha256: str | None = None, *,
                   siblings: bool = False) -> Path:
        """A local path holding the artifact, for readers that need a file name (torch
        checkpoints, HDF5 datasets). Local store: the file itself; remote store: a copy
        in the local cache directory keyed by sha256, downloaded once and verified.

        Args:
            sha256: when given, the file's sha256 is checked (for a remote store, the
                cached copy is checked each time it is handed out).
            siblings: also make the other files of the artifact's folder available
                beside the returned path (a checkpoint's ``config.json`` beside
                ``model.safetensors``); they are not hash-checked.

        Raises:
            ArtifactIntegrityError: the artifact is missing, or its sha256 differs.
        """

    def verify(self, relpath: str | os.PathLike[str], expected_sha256: str) -> Path:
        """A local path of the artifact after checking its sha256 (:meth:`local_file`).

        Raises:
            ArtifactIntegrityError: missing file or sha256 mismatch.
        """
        return self.local_file(relpath, expected_sha256)

    @abstractmethod
    def workdir(self, relpath: str | os.PathLike[str]) -> Path:
        """A local directory for a job's output that will live at ``relpath`` (a BC or
        alignment run, a generated dataset's folder), created with its parents. Local
        store: the artifact directory's own folder; remote store: a folder under the
        staging directory :attr:`root`, uploaded with :meth:`publish_dir`.

        Raises:
            ArtifactPathError: ``relpath`` escapes the store.
        """

    @abstractmethod
    def publish_dir(self, local_dir: str | os.PathLike[str], relpath: str | os.PathLike[str]) -> dict[str, str]:
        """Make every file under ``local_dir`` (recursively; temporary ``.*.part*`` files
        left out) an artifact under ``relpath``, each written atomically.

        Returns:
            ``{relpath of each file: sha256}``.
        """

    @abstractmethod
    def publish_file(self, local_file: str | os.PathLike[str], relpath: str | os.PathLike[str]) -> tuple[str, str]:
        """Make the local file an artifact at ``relpath`` (atomically); returns
        ``(relpath, sha256)``. A no-op but for the hash when it already is that artifact."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Relative paths of every artifact under ``prefix`` (a folder; "" for all),
        sorted; temporary ``.*.part*`` files included (the sweeper looks for them).

        Raises:
            ArtifactPathError: ``prefix`` escapes the store.
        """

    @abstractmethod
    def remove(self, relpath: str | os.PathLike[str]) -> None:
        """Delete one artifact (nothing happens when it is missing)."""

    @abstractmethod
    def remove_tree(self, prefix: str | os.PathLike[str]) -> None:
        """Delete every artifact under the folder ``prefix`` (errors are ignored: used to
        clean up after a failed import)."""

    @abstractmethod
    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """Absolute local path of an artifact (local store only; the file need not exist).

        Raises:
            ArtifactPathError: ``relpath`` escapes the store, or the store is remote
                (use :meth:`local_file`, :meth:`read_bytes` or :meth:`workdir`).
        """

    def save_segment(
        self,
        relpath: str | os.PathLike[str],
        observations: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        **extra: np.ndarray,
    ) -> tuple[str, str]:
        """Write a segment ``.npz`` atomically; return ``(relpath, sha256)``.

        Args:
            observations: (L, Do), stored as float32.
            actions: (L, Da), stored as float32.
            rewards: (L,), stored as float32.
            **extra: further arrays stored under their keyword names.

        Raises:
            ValueError: the arrays disagree on L or have the wrong number of dimensions.
        """
        obs = np.asarray(observations, dtype=np.float32)
        act = np.asarray(actions, dtype=np.float32)
        rew = np.asarray(rewards, dtype=np.float32)
        if obs.ndim != 2 or act.ndim != 2 or rew.ndim != 1:
            raise ValueError(
                "a segment needs observations (L, Do), actions (L, Da), rewards (L,); got "
                f"shapes {obs.shape}, {act.shape}, {rew.shape}"
            )
        if not (len(obs) == len(act) == len(rew)) or len(obs) == 0:
            raise ValueError(
                "observations, actions and rewards must have the same length L > 0; got "
                f"{len(obs)}, {len(act)}, {len(rew)}"
            )
        buffer = io.BytesIO()
        np.savez(buffer, observations=obs, actions=act, rewards=rew, **extra)
        return self.write_atomic(relpath, buffer.getvalue())

    def load_segment(
        self, relpath: str | os.PathLike[str], sha256: str | None = None
    ) -> dict[str, np.ndarray]:
        """Load every array of a segment ``.npz`` (pickled objects are refused).

        Args:
            sha256: if given, the file's hash is checked first.

        Raises:
            ArtifactIntegrityError: missing file, hash mismatch, or a required key
                (:data:`SEGMENT_KEYS`) is absent.
        """
        data = self.read_bytes(relpath, sha256)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        missing = [k for k in SEGMENT_KEYS if k not in arrays]
        if missing:
            raise ArtifactIntegrityError(
                f"segment file {os.fspath(relpath)!r} lacks {missing}; a segment .npz must "
                f"hold {list(SEGMENT_KEYS)}"
            )
        return arrays


def _mismatch(relpath: str | os.PathLike[str], actual: str, expected: str, where: str) -> ArtifactIntegrityError:
    return ArtifactIntegrityError(
        f"artifact {os.fspath(relpath)!r} ({where}) has sha256 {actual}, but the database recorded "
        f"{expected}; the file was changed or replaced after it was registered")


@dataclass(frozen=True)
class ArtifactDir(ArtifactStore):
    """The local artifact directory: path validation, atomic writes, hashing, segment I/O.

    Attributes:
        root: absolute directory all artifact paths are relative to (created on demand).
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def location(self) -> str:
        return str(self.root)

    @property
    def is_local(self) -> bool:
        return True

    def resolve(self, relpath: str | os.PathLike[str]) -> Path:
        """Absolute path of an artifact; the file need not exist.

        Raises:
            ArtifactPathError: ``relpath`` is absolute, contains ``..``, or leads outside
                the artifact directory through a symbolic link.
        """
        rel = normalize_relpath(relpath)
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise ArtifactPathError(
                f"artifact path {os.fspath(relpath)!r} resolves to {path}, outside the "
                f"artifact directory {self.root} (through a symbolic link?)"
            )
        return path

    def write_atomic(
        self, relpath: str | os.PathLike[str], data: ArtifactData, *, to_path: bool = False
    ) -> tuple[str, str]:
        """See :meth:`ArtifactStore.write_atomic`; parent folders are created, and the
        file is fsynced before and its folder after the rename."""
        dest = self.resolve(relpath)
        with atomic_path(dest) as tmp:
            _write_data(tmp, data, to_path)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            digest = sha256_file(tmp)
            os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; artifacts are shared files
        _fsync_dir(dest.parent)
        return normalize_relpath(relpath), digest

    def read_bytes(self, relpath: str | os.PathLike[str], sha256: str | None = None) -> bytes:
        path = self.resolve(relpath)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ArtifactIntegrityError(f"artifact {os.fspath(relpath)!r} not found at {path}") from None
        if sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256:
                raise _mismatch(relpath, actual, sha256, str(path))
        return data

    def exists(self, relpath: str | os.PathLike[str]) -> bool:
        return self.resolve(relpath).is_file()

    def sha256(self, relpath: str | os.PathLike[str]) -> str:
        path = self.resolve(relpath)
        if not path.is_file():
            raise ArtifactIntegrityError(
                f"artifact {os.fspath(relpath)!r} not found at {path}; write it with "
                "write_artifact_atomic before registering it"
            )
        return sha256_file(path)

    def local_file(self, relpath: str | os.PathLike[str], sha256: str | None = None, *,
                   siblings: bool = False) -> Path:
        path = self.resolve(relpath)
        if sha256 is None:
            if not path.is_file():
                raise ArtifactIntegrityError(f"artifact {os.fspath(relpath)!r} not found at {path}")
            return path
        actual = self.sha256(relpath)
        if actual != sha256:
            raise _mismatch(relpath, actual, sha256, str(path))
        return path

    def workdir(self, relpath: str | os.PathLike[str]) -> Path:
        path = self.resolve(relpath)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def publish_dir(self, local_dir: str | os.PathLike[str], relpath: str | os.PathLike[str]) -> dict[str, str]:
        rel = normalize_relpath(relpath)
        out: dict[str, str] = {}
        for path in _files_under(Path(local_dir)):
            sub = path.relative_to(local_dir).as_posix()
            out.update([self.publish_file(path, f"{rel}/{sub}")])
        return out

    def publish_file(self, local_file: str | os.PathLike[str], relpath: str | os.PathLike[str]) -> tuple[str, str]:
        src = Path(local_file).resolve()
        if src == self.resolve(relpath):
            return normalize_relpath(relpath), sha256_file(src)
        return self.write_atomic(relpath, lambda tmp: shutil.copyfile(src, tmp), to_path=True)

    def list(self, prefix: str = "") -> list[str]:
        top = self.resolve(prefix) if prefix else self.root
        if not top.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            out.extend(Path(dirpath, n).relative_to(self.root).as_posix() for n in filenames)
        return sorted(out)

    def remove(self, relpath: str | os.PathLike[str]) -> None:
        self.resolve(relpath).unlink(missing_ok=True)

    def remove_tree(self, prefix: str | os.PathLike[str]) -> None:
        shutil.rmtree(self.resolve(prefix), ignore_errors=True)


def _files_under(folder: Path) -> Iterator[Path]:
    """Every regular file under ``folder`` (recursively), temporary ``.*.part*`` files left out."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not is_part_name(path.name):
            yield path


def is_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URL (``scheme://...``) rather than a local path."""
    text = os.fspath(location)
    head, sep, _ = text.partition("://")
    return bool(sep) and head.replace("+", "").replace("-", "").isalnum() and len(head) > 1


def _fsync_dir(directory: Path) -> None:
    """Persist a rename in ``directory`` (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
