"""Files next to the database: videos, segment arrays (.npz), checkpoints.

The database stores each file as a POSIX path *relative to the artifact directory* plus
the file's hex sha256, so a project can be moved or mounted elsewhere. Files are written
atomically (temporary file in the same directory, ``fsync``, ``os.replace``, ``fsync`` of
the directory): a reader, or a row registered after a crash, never sees a half-written
file.

Segment files (``.npz``, written by :meth:`ArtifactDir.save_segment`) hold at least
``observations (L, Do) float32``, ``actions (L, Da) float32`` and ``rewards (L,) float32``;
callers may add more arrays (e.g. ``terminals``).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, Callable, Union

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


@dataclass(frozen=True)
class ArtifactDir:
    """The artifact directory: path validation, atomic writes, hashing, segment I/O.

    Attributes:
        root: absolute directory all artifact paths are relative to (created on demand).
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

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
        """Write an artifact atomically; return ``(normalized relpath, sha256)``.

        Args:
            relpath: destination relative to the artifact directory; parent folders are
                created. An existing file is replaced atomically.
            data: the bytes; or a callable that writes the content into the binary file
                object it receives (it may seek, e.g. ``np.savez``); or, with
                ``to_path=True``, a callable that writes a file at the :class:`Path` it
                receives (for encoders that need a file name, e.g. video writers; the
                temporary path keeps the destination's suffix).
            to_path: see ``data``.

        Raises:
            ArtifactPathError: ``relpath`` escapes the artifact directory.
            Exception: whatever the writer raised; the temporary file is removed and the
                destination is left as it was.
        """
        dest = self.resolve(relpath)
        with atomic_path(dest) as tmp:
            if isinstance(data, (bytes, bytearray, memoryview)):
                tmp.write_bytes(data)
            elif to_path:
                data(tmp)  # type: ignore[call-arg, arg-type]
            else:
                with open(tmp, "r+b") as f:
                    data(f)  # type: ignore[arg-type]
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            digest = sha256_file(tmp)
            os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; artifacts are shared files
        _fsync_dir(dest.parent)
        return normalize_relpath(relpath), digest

    def sha256(self, relpath: str | os.PathLike[str]) -> str:
        """Hex sha256 of an existing artifact.

        Raises:
            ArtifactIntegrityError: the file does not exist.
        """
        path = self.resolve(relpath)
        if not path.is_file():
            raise ArtifactIntegrityError(
                f"artifact {os.fspath(relpath)!r} not found at {path}; write it with "
                "write_artifact_atomic before registering it"
            )
        return sha256_file(path)

    def verify(self, relpath: str | os.PathLike[str], expected_sha256: str) -> Path:
        """Return the artifact's absolute path after checking its sha256.

        Raises:
            ArtifactIntegrityError: missing file or sha256 mismatch.
        """
        actual = self.sha256(relpath)
        if actual != expected_sha256:
            raise ArtifactIntegrityError(
                f"artifact {os.fspath(relpath)!r} has sha256 {actual}, but the database "
                f"recorded {expected_sha256}; the file was changed or replaced after it "
                "was registered"
            )
        return self.resolve(relpath)

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
        path = self.verify(relpath, sha256) if sha256 else self.resolve(relpath)
        if not path.is_file():
            raise ArtifactIntegrityError(f"segment file {os.fspath(relpath)!r} not found at {path}")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        missing = [k for k in SEGMENT_KEYS if k not in arrays]
        if missing:
            raise ArtifactIntegrityError(
                f"segment file {os.fspath(relpath)!r} lacks {missing}; a segment .npz must "
                f"hold {list(SEGMENT_KEYS)}"
            )
        return arrays


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
