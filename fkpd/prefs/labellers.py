"""Labellers: who answers the comparisons a round asks for (DESIGN.md §5).

One small interface in the spirit of ``imitation``'s preference gatherer, so a
scripted teacher and people are interchangeable behind the round engine
(:class:`fkpd.train.engine.RoundEngine`):

* :meth:`Labeller.request` hands over the pairs of a round;
* :meth:`Labeller.labels` returns every label so far, as ``(left, right, p_left)``
  with ``p_left`` in {1.0, 0.0, 0.5} or None for a skip (DESIGN.md §3).

:class:`ScriptedLabeller` answers at once with a scripted teacher
(:mod:`fkpd.prefs.teachers`); the app's labeller (:class:`fkpd.studio.batches.StoreLabeller`)
registers the pairs for annotators and reads their answers from the preference store
as they arrive.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

from fkpd.prefs.segments import Segment
from fkpd.prefs.teachers import ScriptedTeacher, outcome_to_p_left

#: ``(left, right, p_left)``: one comparison, ``p_left`` None for a skip.
Label = tuple[Segment, Segment, "float | None"]


class Labeller(ABC):
    """Gets labels for pairs of segments."""

    @abstractmethod
    def request(self, round_: int, pairs: Sequence[tuple[Segment, Segment]]) -> None:
        """Hand over the pairs of round ``round_`` for labelling."""

    @abstractmethod
    def labels(self) -> list[Label]:
        """Every label so far (all rounds), oldest first."""


class ScriptedLabeller(Labeller):
    """A scripted teacher that labels every requested pair at once.

    Args:
        teacher: the teacher (:func:`fkpd.prefs.teachers.make_teacher`).

    Attributes:
        rounds: per round, ``(pairs, outcomes)``: the requested pairs and the teacher's
            outcomes (``left``/``right``/``equal``/``skip``), in order.
    """

    def __init__(self, teacher: ScriptedTeacher) -> None:
        self.teacher = teacher
        self.rounds: dict[int, tuple[list[tuple[Segment, Segment]], list[str]]] = {}
        self._labels: list[Label] = []

    def request(self, round_: int, pairs: Sequence[tuple[Segment, Segment]]) -> None:
        outcomes = [self.teacher.label(a, b) for a, b in pairs]
        self.rounds[round_] = (list(pairs), outcomes)
        self._labels += [(a, b, outcome_to_p_left(o)) for (a, b), o in zip(pairs, outcomes)]

    def new_labels(self, round_: int) -> list[Label]:
        """The labels of round ``round_`` only."""
        pairs, outcomes = self.rounds[round_]
        return [(a, b, outcome_to_p_left(o)) for (a, b), o in zip(pairs, outcomes)]

    def labels(self) -> list[Label]:
        return list(self._labels)
