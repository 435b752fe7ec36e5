"""Label quality in the store: gold pairs, and annotators excluded from training (issue #13).

:class:`QualityMixin` is part of :class:`fkpd.store.Store`.

* **Gold pairs** (:meth:`QualityMixin.mark_gold_pairs`): a share of a new batch's pairs
  whose answer is clear from the clips' ground truth gets ``pairs.gold`` = the side that
  should win (``"left"`` or ``"right"``). A pair is *clear* when exactly one clip
  succeeded (``gt_success``), or else when the returns differ by at least a relative
  margin, ``|R_left − R_right| ≥ return_margin · max(|R_left|, |R_right|)`` (and > 0).
  Gold pairs are handed out, answered and trained on like any other pair; the mark is
  never copied into an annotator-facing view (:class:`~fkpd.store.views.PairView`), so
  nobody can tell them apart while labelling. Their answers give each annotator's gold
  accuracy (:meth:`fkpd.store.Store.annotator_stats`).
* **Exclusions** (:meth:`QualityMixin.exclude_annotator`): an admin leaves an
  annotator's comparisons out of training; they stay in the store and in every report,
  :meth:`fkpd.store.Store.training_pairs` leaves them out, and
  :meth:`QualityMixin.include_annotator` takes them back.

The minimum viewing time is enforced by :meth:`fkpd.store.Store.answer`
(``min_view_seconds``, :mod:`fkpd.store.assignment`).
"""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta
from typing import Any, Iterable

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from fkpd.store import models as m
from fkpd.store.core import StoreCore
from fkpd.store.errors import NotFoundError, StoreInputError
from fkpd.store.views import ExclusionInfo

#: The two answers a gold pair can expect.
GOLD_OUTCOMES = ("left", "right")
#: Longest reason an exclusion keeps (characters).
MAX_REASON_LEN = 1000


def check_fraction(value: Any, what: str) -> float:
    """``value`` as a float in [0, 1].

    Raises:
        StoreInputError: not a finite number in [0, 1] (a bool is not a number).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise StoreInputError(f"{what} must be a number from 0 to 1, got {value!r:.40}")
    return float(value)


def check_nonnegative(value: Any, what: str) -> float:
    """``value`` as a finite float ≥ 0.

    Raises:
        StoreInputError: not a finite number ≥ 0 (a bool is not a number).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise StoreInputError(f"{what} must be a finite number >= 0, got {value!r:.40}")
    return float(value)


def clear_winner(left: m.Clip, right: m.Clip, return_margin: float) -> str | None:
    """The side ground truth says should win, or None when it is not clear.

    Exactly one clip succeeded: that one. Otherwise, with both returns known, the one
    with the higher return when ``|R_l − R_r| ≥ return_margin · max(|R_l|, |R_r|)`` and
    the returns differ.
    """
    ls, rs = left.gt_success, right.gt_success
    if ls is not None and rs is not None and bool(ls) != bool(rs):
        return "left" if ls else "right"
    lr, rr = left.gt_return, right.gt_return
    if lr is None or rr is None or not (math.isfinite(lr) and math.isfinite(rr)) or lr == rr:
        return None
    if abs(lr - rr) >= return_margin * max(abs(lr), abs(rr)):
        return "left" if lr > rr else "right"
    return None


class QualityMixin(StoreCore):
    """Gold pairs and exclusions from training (part of :class:`fkpd.store.Store`;
    rules in the module docstring)."""

    def mark_gold_pairs(self, project: Any, pair_ids: Iterable[int], *, share: float = 0.05,
                        return_margin: float = 0.5, seed: int | None = None) -> dict[int, str]:
        """Mark about ``share`` of ``pair_ids`` as gold pairs, chosen among the clear ones.

        ``floor(share · n + u)`` pairs are marked (``u`` uniform in [0, 1) from ``seed``,
        so the share holds on average over small batches too; 1 of 20 at the default), or
        every clear pair when fewer are clear. The choice is random but reproducible:
        ``seed`` defaults to the smallest pair id.

        Args:
            project: name, id or :class:`~fkpd.store.views.ProjectInfo`.
            pair_ids: pairs of that project (a new batch's).
            share: fraction of the pairs to mark, 0..1 (0 marks none).
            return_margin: relative return margin that makes a pair clear when success
                does not (see the module docstring), ≥ 0.
            seed: seeds the choice.

        Returns:
            ``{pair_id: "left" | "right"}`` of the pairs marked now.

        Raises:
            StoreInputError: ``share`` not in [0, 1], ``return_margin`` not a finite
                number ≥ 0, or a pair of another project.
            NotFoundError: unknown project or pair.
        """
        share = check_fraction(share, "gold share")
        return_margin = check_nonnegative(return_margin, "gold return margin")
        ids = sorted({int(p) for p in pair_ids})
        if not ids or share == 0.0:
            return {}
        with self.session(write=True) as s:
            proj = self.project_row(s, project)
            pairs = {p.id: p for p in s.scalars(select(m.Pair).where(m.Pair.id.in_(ids)))}
            missing = [p for p in ids if p not in pairs]
            if missing:
                raise NotFoundError(f"pair(s) {missing[:10]} not found")
            foreign = [p.id for p in pairs.values() if p.project_id != proj.id]
            if foreign:
                raise StoreInputError(f"pair(s) {foreign[:10]} belong to another project than {proj.name!r}")
            clip_ids = {c for p in pairs.values() for c in (p.left_clip_id, p.right_clip_id)}
            clips = {c.id: c for c in s.scalars(select(m.Clip).where(m.Clip.id.in_(clip_ids)))}
            clear = {}
            for pid in ids:
                pair = pairs[pid]
                winner = clear_winner(clips[pair.left_clip_id], clips[pair.right_clip_id], return_margin)
                if winner is not None and pair.gold is None:
                    clear[pid] = winner
            rng = random.Random(ids[0] if seed is None else seed)
            count = math.floor(share * len(ids) + rng.random())
            chosen = sorted(rng.sample(sorted(clear), min(count, len(clear))))
            for pid in chosen:
                pairs[pid].gold = clear[pid]
            return {pid: clear[pid] for pid in chosen}

    def gold_pairs(self, project: Any) -> dict[int, str]:
        """``{pair_id: expected outcome}`` of the project's gold pairs (for analysis and
        tests; never show it to annotators).

        Raises:
            NotFoundError: unknown project.
        """
        with self.session() as s:
            proj = self.project_row(s, project)
            return self._gold_of_project(s, proj.id)

    @staticmethod
    def _gold_of_project(s: Session, project_id: int) -> dict[int, str]:
        rows = s.execute(select(m.Pair.id, m.Pair.gold).where(m.Pair.project_id == project_id,
                                                               m.Pair.gold.is_not(None)))
        return {int(pid): str(gold) for pid, gold in rows}

    # ------------------------------------------------------------------ exclusions

    def exclude_annotator(self, project: Any, annotator: Any, *, by: str | None = None,
                          reason: str = "") -> ExclusionInfo:
        """Leave ``annotator``'s comparisons in ``project`` out of training, from now on
        (:meth:`~fkpd.store.Store.training_pairs`); they stay in the store. Idempotent:
        excluding an excluded annotator returns the existing exclusion unchanged.

        Args:
            by: who excluded them (shown on the Data page), e.g. ``"admin"``.
            reason: why (at most 1000 characters).

        Raises:
            NotFoundError: unknown project or annotator.
            StoreInputError: ``reason`` is not a string or too long; ``by`` not a string.
        """
        if not isinstance(reason, str) or len(reason) > MAX_REASON_LEN:
            raise StoreInputError(f"reason must be a string of at most {MAX_REASON_LEN} characters")
        if by is not None and (not isinstance(by, str) or len(by) > m.NAME_LEN):
            raise StoreInputError(f"by must be a name of at most {m.NAME_LEN} characters, got {by!r:.40}")
        table = m.AnnotatorExclusion.__table__
        with self.session(write=True) as s:
            proj = self.project_row(s, project)
            ann = self.annotator_row(s, annotator)
            s.execute(self.insert(table)
                      .values(project_id=proj.id, annotator_id=ann.id, excluded_at=self.now(), excluded_by=by,
                              reason=reason.strip())
                      .on_conflict_do_nothing(index_elements=["project_id", "annotator_id"]))
            return self._exclusions(s, proj.id, ann.id)[0]

    def include_annotator(self, project: Any, annotator: Any) -> bool:
        """Take an excluded annotator's comparisons back into training (reverses
        :meth:`exclude_annotator`). Returns True if they were excluded.

        Raises:
            NotFoundError: unknown project or annotator.
        """
        table = m.AnnotatorExclusion.__table__
        with self.session(write=True) as s:
            proj = self.project_row(s, project)
            ann = self.annotator_row(s, annotator)
            result = s.execute(delete(table).where(table.c.project_id == proj.id, table.c.annotator_id == ann.id))
            return bool(result.rowcount)

    def excluded_annotators(self, project: Any) -> list[ExclusionInfo]:
        """The annotators excluded from training in ``project``, by name.

        Raises:
            NotFoundError: unknown project.
        """
        with self.session() as s:
            proj = self.project_row(s, project)
            return self._exclusions(s, proj.id)

    @staticmethod
    def _exclusions(s: Session, project_id: int, annotator_id: int | None = None) -> list[ExclusionInfo]:
        query = (select(m.AnnotatorExclusion, m.Annotator.name)
                 .join(m.Annotator, m.Annotator.id == m.AnnotatorExclusion.annotator_id)
                 .where(m.AnnotatorExclusion.project_id == project_id)
                 .order_by(m.Annotator.name))
        if annotator_id is not None:
            query = query.where(m.AnnotatorExclusion.annotator_id == annotator_id)
        return [ExclusionInfo(row.project_id, row.annotator_id, name, row.excluded_at, row.excluded_by,
                              row.reason or "") for row, name in s.execute(query)]


# ------------------------------------------------------------------ minimum viewing time (Store.answer)


def loop_seconds(s: Session, pair: m.Pair) -> float:
    """Seconds one loop of the pair's longer clip lasts (``length / fps``; 0 if unknown)."""
    rows = s.execute(select(m.Clip.length, m.Clip.fps).where(m.Clip.id.in_((pair.left_clip_id, pair.right_clip_id))))
    return max((float(length) / float(fps) for length, fps in rows if fps and fps > 0), default=0.0)


def required_view_seconds(s: Session, pair: m.Pair, min_view_seconds: float) -> float:
    """The viewing time an answer to ``pair`` needs: ``min_view_seconds`` or one loop of
    the longer clip, whichever is shorter."""
    return min(float(min_view_seconds), loop_seconds(s, pair))


def push_prefetched_leases(s: Session, pair: m.Pair, annotator_id: int, shown_from: datetime,
                           needed: float, now: datetime) -> None:
    """After an answer to ``pair``, move the annotator's other leases of the project to
    the earliest moment the page can have shown them: the page shows a prefetched pair
    only once the pair before it is answered, which was no sooner than ``shown_from +
    needed``. The bound is also at least ``now − needed`` (so a client cannot bank
    viewing time by idling on one pair and then answer many at once) and never after
    ``now``. It stays below the real moment for every honest page whose answers reach
    the server less than ``needed`` seconds late, so those are never refused.
    """
    bound = min(now, max(shown_from + timedelta(seconds=needed), now - timedelta(seconds=needed)))
    leases = m.Lease.__table__
    s.execute(leases.update()
              .where(leases.c.annotator_id == annotator_id, leases.c.pair_id != pair.id,
                     leases.c.leased_at < bound,
                     leases.c.pair_id.in_(select(m.Pair.id).where(m.Pair.project_id == pair.project_id)))
              .values(leased_at=bound))
