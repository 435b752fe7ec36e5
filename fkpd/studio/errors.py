"""Errors of the studio layer: one type per kind of problem.

* :class:`StudioError`: bad input from the app (an empty annotator name, a round asked
  for in the wrong state, ...).
* :class:`RoundError`: a bootstrap or alignment-round job cannot run (no comparisons
  yet, another training job running, a missing dataset, ...).
* :class:`ParamError`: a bad job parameter value (an unknown key, a wrong type, a value
  out of range, NaN), wherever the parameters enter: ``FKPD_BOOTSTRAP``, the Rounds page,
  or a job row. It is both a :class:`StudioError` and a :class:`RoundError`, so the
  page and the job report it the same way.
"""

from __future__ import annotations

from fkpd.errors import FKPDError


class StudioError(FKPDError, ValueError):
    """Bad input from the app (an empty annotator name, a bad round parameter, ...)."""


class RoundError(FKPDError, ValueError):
    """A bootstrap or alignment-round job cannot run: bad parameters, no comparisons to
    train on, or a project in a state the job does not apply to."""


class ParamError(RoundError, StudioError):
    """A bad bootstrap, round or compare parameter: the message names the parameter,
    the value and what is allowed."""
