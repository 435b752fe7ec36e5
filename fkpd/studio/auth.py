"""Who may do what in the app: the admin password or token (:class:`AdminAuth`: Streamlit
secrets, the environment, or a random token written to ``labels/admin_token`` on first
start) and the annotator's name (:func:`clean_annotator_name`)."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from fkpd.store.db import labels_dir
from fkpd.studio.config import StudioError


class AdminAuth:
    """Checks the admin password.

    The secret comes from, in order: Streamlit secrets ``admin_password``
    (``.streamlit/secrets.toml``), the environment variable ``FKPD_ADMIN_PASSWORD``, or a
    random token created on first use and kept in ``labels/admin_token`` (readable only by
    its owner), whose path is printed in the app's terminal. Comparison is constant-time.
    """

    TOKEN_FILE = "admin_token"

    def __init__(self, secret: str | None = None, token_dir: Path | None = None) -> None:
        self.source = "argument" if secret else ""
        if not secret:
            secret = os.environ.get("FKPD_ADMIN_PASSWORD", "").strip() or None
            self.source = "FKPD_ADMIN_PASSWORD" if secret else ""
        if not secret:
            path = (token_dir or labels_dir()) / self.TOKEN_FILE
            secret = self._token(path)
            self.source = str(path)
        self._secret = secret

    @staticmethod
    def _token(path: Path) -> str:
        """The token in ``path``, created first if absent.

        The token is written to a private temporary file and hard-linked into place, so
        the file appears complete or not at all: two app processes starting at once on a
        fresh checkout both end up with the one token that won the link.

        Raises:
            StudioError: the file exists but holds no token.
        """
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            token = secrets.token_urlsafe(18) + "\n"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(token)
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first: use theirs
            except OSError:  # a filesystem without hard links: exclusive create, then write
                try:
                    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
                        fh.write(token)
                except FileExistsError:
                    pass
            finally:
                tmp.unlink(missing_ok=True)
        token = path.read_text().strip()
        if not token:
            raise StudioError(f"the admin token file {path} is empty; delete it and restart the app to get a new "
                              "token, or set FKPD_ADMIN_PASSWORD")
        return token

    def check(self, password: str | None) -> bool:
        """True if ``password`` is the admin secret."""
        if not password:
            return False
        return hmac.compare_digest(password.strip().encode(), self._secret.encode())


def clean_annotator_name(name: str | None) -> str:
    """The annotator's name, stripped.

    Raises:
        StudioError: empty, longer than 64 characters, or containing control characters.
    """
    name = (name or "").strip()
    if not name:
        raise StudioError("Please enter your name: every answer is stored under it.")
    if len(name) > 64:
        raise StudioError("That name is longer than 64 characters; please use a shorter one.")
    if any(ord(c) < 32 for c in name):
        raise StudioError("The name contains control characters; please type it again.")
    return name


__all__ = ["AdminAuth", "clean_annotator_name"]
