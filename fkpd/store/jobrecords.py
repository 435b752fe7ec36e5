"""What a job row holds besides its state: strict-JSON parameters and results, and the
history of its attempts.

* :func:`json_mapping` checks a mapping is strict JSON (no NaN or Infinity, which
  PostgreSQL's JSON refuses while SQLite's accepts; string keys; only JSON value types)
  and returns a deep copy, naming the first bad value's place (``job params.bc.lr``).
* :func:`record_event` appends one event to ``Job.history``; :mod:`fkpd.store.queue` calls
  it on every transition.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any, Mapping

from fkpd.store import models as m
from fkpd.store.errors import StoreInputError

__all__ = ["json_mapping", "record_event"]

#: Events kept per job: the first and the latest ``HISTORY_MAX - 1`` (a job released at
#: every app restart must not grow its row without bound).
HISTORY_MAX = 200
_REASON_MAX = 500


def json_mapping(value: Mapping[str, Any] | None, what: str) -> dict[str, Any] | None:
    """``value`` as a plain JSON object (a deep copy), or None.

    Raises:
        StoreInputError: not a mapping, a key that is not a string, a value JSON cannot
            hold (a set, an object), or a float that is NaN or ±Infinity; the message
            names where (``params.bc.lr``).
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise StoreInputError(f"{what} must be a mapping (dict) or None, got {type(value).__name__}")
    try:
        _check_json(value, "")
    except _NotJson as exc:
        raise StoreInputError(f"{what} must be JSON-serialisable: {exc}") from None
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False))
    except (TypeError, ValueError, RecursionError) as exc:  # pragma: no cover - _check_json catches these
        raise StoreInputError(f"{what} must be JSON-serialisable: {exc}") from None


class _NotJson(Exception):
    """Internal: where a value is not strict JSON, and why."""


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    """Raise :class:`_NotJson` at the first value under ``where`` (a dotted path) that is
    not strict JSON."""
    at = where or "the top level"
    if depth > 64:
        raise _NotJson(f"{at} is nested more than 64 levels deep; flatten the values")
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NotJson(f"{at} is {value!r}, and JSON has no NaN or Infinity (PostgreSQL refuses them); give a "
                           "finite number")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _NotJson(f"{at} has the key {key!r} ({type(key).__name__}); JSON keys are strings")
            _check_json(item, f"{where}.{key}" if where else key, depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]", depth + 1)
        return
    raise _NotJson(f"{at} is a {type(value).__name__} ({value!r:.60}), which JSON cannot hold; give numbers, "
                   "strings, booleans, null, lists or objects")


def record_event(job: m.Job, event: str, now: datetime, reason: str = "", *, worker: str | None = None) -> None:
    """Append ``{"at", "event", "attempt", "worker", "reason"}`` to ``job.history``
    (assigning a new list, so the ORM writes it); ``worker`` defaults to the job's."""
    entry = {
        "at": now.isoformat(timespec="seconds"),
        "event": event,
        "attempt": int(job.attempts or 0),
        "worker": worker if worker is not None else job.worker_id,
        "reason": (reason or "")[:_REASON_MAX],
    }
    history = [*(job.history or []), entry]
    if len(history) > HISTORY_MAX:
        history = history[:1] + history[-(HISTORY_MAX - 1):]
    job.history = history
