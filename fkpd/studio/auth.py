"""Who may do what in the app: the admin password or token (:class:`AdminAuth`: Streamlit
secrets, the environment, or a random token written to ``labels/admin_token`` on first
start; sign-in attempts limited by :class:`SignInLimiter`) and the annotator's name
(:func:`clean_annotator_name`)."""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fkpd.store.db import labels_dir
from fkpd.studio.config import StudioError


@dataclass(frozen=True)
class SignInAttempt:
    """The answer to one admin sign-in attempt (:meth:`AdminAuth.attempt`).

    Attributes:
        ok: the password was right and the attempt was allowed.
        retry_after_s: seconds until the next attempt will be looked at (0: at once).
        message: what to show the person ('' when ``ok``).
    """

    ok: bool
    retry_after_s: float = 0.0
    message: str = ""


class SignInLimiter:
    """Limits password guesses: at most ``per_minute`` wrong ones in any 60 s, and a
    delay that doubles with every wrong guess after the first ``free`` ones in a row.

    After the k-th wrong guess in a row (k > ``free``) the next attempt is not looked at
    before ``base_delay_s · 2**(k − free − 1)`` seconds (at most ``max_delay_s``) have
    passed; after ``per_minute`` wrong guesses within 60 s, not before the oldest of them
    is a minute old. An attempt made too early is refused without comparing the
    password, and does not count. A right password resets the count; so do
    ``forget_after_s`` seconds without a wrong guess.

    One limiter counts for every caller that shares it: the app keeps one
    :class:`AdminAuth` per server process (``st.cache_resource``), so guesses from all
    browser sessions of that process count together (opening new tabs does not reset
    it). Several app processes each count their own. The price is that someone guessing
    also delays the admin; restarting the app clears the count. Thread-safe.
    """

    WINDOW_S = 60.0

    def __init__(self, per_minute: int = 5, free: int = 3, base_delay_s: float = 1.0, max_delay_s: float = 300.0,
                 forget_after_s: float = 900.0, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute < 1 or free < 0 or base_delay_s <= 0 or max_delay_s < base_delay_s:
            raise ValueError("per_minute >= 1, free >= 0 and 0 < base_delay_s <= max_delay_s are required")
        self.per_minute, self.free = per_minute, free
        self.base_delay_s, self.max_delay_s, self.forget_after_s = base_delay_s, max_delay_s, forget_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: deque[float] = deque()  # times of the wrong guesses of the last minute
        self._in_a_row = 0
        self._last_failure = -float("inf")

    def _wait_s(self, now: float) -> float:
        if now - self._last_failure > self.forget_after_s:
            self._in_a_row = 0
        while self._failures and now - self._failures[0] >= self.WINDOW_S:
            self._failures.popleft()
        wait = 0.0
        if self._in_a_row > self.free:
            delay = min(self.max_delay_s, self.base_delay_s * 2.0 ** min(self._in_a_row - self.free - 1, 60))
            wait = self._last_failure + delay - now
        if len(self._failures) >= self.per_minute:
            wait = max(wait, self._failures[0] + self.WINDOW_S - now)
        return max(0.0, wait)

    def retry_after_s(self) -> float:
        """Seconds until the next attempt will be looked at (0: now)."""
        with self._lock:
            return self._wait_s(self._clock())

    def attempt(self, check: Callable[[], bool]) -> SignInAttempt:
        """Run ``check`` (the password comparison) if an attempt is allowed now, and count it."""
        with self._lock:
            now = self._clock()
            wait = self._wait_s(now)
            if wait > 0:
                return SignInAttempt(False, wait, f"Too many wrong passwords: sign-in is paused for {wait:.0f} s "
                                                  "more. Wait, then try again.")
            if check():
                self._in_a_row = 0
                self._failures.clear()
                return SignInAttempt(True)
            self._in_a_row += 1
            self._last_failure = now
            self._failures.append(now)
            wait = self._wait_s(now)
            return SignInAttempt(False, wait, "Wrong password." + (f" The next attempt is possible in {wait:.0f} s."
                                                                   if wait > 0 else ""))


class AdminAuth:
    """Checks the admin password, with a limit on guesses (:class:`SignInLimiter`).

    The secret comes from, in order: Streamlit secrets ``admin_password``
    (``.streamlit/secrets.toml``), the environment variable ``FKPD_ADMIN_PASSWORD``, or a
    random token created on first use and kept in ``labels/admin_token`` (readable only by
    its owner), whose path is printed in the app's terminal. Comparison is constant-time.
    Wrong guesses are counted per :class:`AdminAuth` instance (the app holds one per
    server process, shared by all its sessions): see :class:`SignInLimiter`.
    """

    TOKEN_FILE = "admin_token"

    def __init__(self, secret: str | None = None, token_dir: Path | None = None,
                 limiter: SignInLimiter | None = None) -> None:
        self.limiter = limiter or SignInLimiter()
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

    def attempt(self, password: str | None) -> SignInAttempt:
        """One sign-in attempt: is ``password`` the admin secret, and may it be tried now?

        An attempt while sign-in is paused (too many wrong guesses: :class:`SignInLimiter`)
        is refused, right password or not, and its message says how long to wait. An
        empty password is refused without counting.
        """
        if not password or not password.strip():
            return SignInAttempt(False, self.limiter.retry_after_s(), "Enter the admin password.")
        return self.limiter.attempt(
            lambda: hmac.compare_digest(password.strip().encode(), self._secret.encode()))

    def check(self, password: str | None) -> bool:
        """True if ``password`` is the admin secret and sign-in is not paused by too many
        wrong guesses (:meth:`attempt` says why not)."""
        return self.attempt(password).ok

    def retry_after_s(self) -> float:
        """Seconds until a sign-in attempt will be looked at again (0: now)."""
        return self.limiter.retry_after_s()


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


__all__ = ["AdminAuth", "SignInAttempt", "SignInLimiter", "clean_annotator_name"]
