"""Leased assignment of pairs to annotators, and their answers.

:class:`AssignmentMixin` is part of :class:`fkpd.store.Store`.

Assignment rules (:meth:`Store.next_pair` / :meth:`Store.answer`):

* An annotator is offered pairs of the **latest round that still has open pairs**, oldest
  pair first, that they have not answered, and whose answers plus other annotators'
  unexpired leases are fewer than the project's ``labels_per_pair``; when that round has
  none left for them (a new batch still being rendered), pairs of the next older round
  with open pairs, and so on, so nobody waits while any pair is open.
* **Second opinions**: when no open pair is free for an annotator, they are handed
  completed pairs that others answered and they did not (newest first), up to the
  project's ``second_opinions`` answers beyond ``labels_per_pair`` (default 1; 0 turns it
  off). Rendering limits the supply of new pairs on a CPU (issue #13); a second opinion
  costs nothing to make, measures agreement between annotators
  (:meth:`~Store.annotator_stats`), and trains like any other comparison. The pair's
  status stays ``done``.
* The pair is **leased** to the annotator for ``lease_seconds``. While the lease runs,
  calling :meth:`~Store.next_pair` again returns the same pair (and extends the lease), and
  nobody else gets it once it is fully leased (with ``labels_per_pair=1``: nobody else at
  all). Expired leases are ignored, so an abandoned pair returns to the pool.
* :meth:`~Store.answer` takes an answer only from an annotator **the pair is leased to**
  (a live lease, or a lapsed one nobody has taken over since) and, when the caller names
  the project, only for a pair of that project; anything else is refused with
  :class:`~fkpd.store.errors.NotLeasedError` and logged, so nobody can answer in another
  annotator's place, answer a pair nobody leased, or answer into another project. The
  lease holder's own answer is unaffected.
* :meth:`~Store.answer` is idempotent per (pair, annotator): a double click, a page rerun
  or a retry after a lost reply returns the stored answer instead of adding a second one
  (unique constraint, ``ON CONFLICT DO NOTHING``). A new answer is refused once the pair
  already holds ``labels_per_pair`` answers, except a second opinion from a lease on the
  completed pair, so a pair never gets more than ``labels_per_pair + second_opinions``.
* **Every answer counts toward completion, skips included**: a pair is ``done`` after
  ``labels_per_pair`` answers of any outcome. A skip usually means the pair is not worth
  judging (both clips equally broken, nothing happens); handing it to more people wastes
  their time and would keep a round from ever finishing. Skips are stored and reported
  (:meth:`~Store.annotator_stats`) but never trained on (:meth:`~Store.training_pairs`).
* Late answers are accepted while the pair has room: if a lease expired and nobody else
  filled the pair, the answer is stored.
* **Minimum viewing time** (when the caller passes ``min_view_seconds``, as the labelling
  page does): a left/right/equal answer is refused (:class:`~fkpd.store.errors.TooEarlyError`)
  until the pair has been on the annotator's screen that long (or one loop of its longer
  clip), counted on the server's clock from the lease (:class:`fkpd.store.models.Lease`),
  so a crafted request cannot skip it.

Concurrency: on PostgreSQL a candidate pair is locked with ``SELECT … FOR UPDATE SKIP
LOCKED`` and re-checked with a fresh statement after the lock is held (under READ
COMMITTED a fresh statement sees every lease committed before the lock was granted);
answers take the pair's row lock too, so every change to a pair's leases and answers is
serialised per pair. On SQLite every writing transaction starts with ``BEGIN IMMEDIATE``
(see :mod:`fkpd.store.db`), which serialises writers across threads and processes, and
writers queue on a file lock so none of them starves
(:class:`fkpd.store.db.SqliteWriteGate`).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any, Iterable

from sqlalchemy import ColumnElement, and_, delete, exists, func, select
from sqlalchemy.orm import Session, aliased

from fkpd.store import models as m
from fkpd.store.core import StoreCore, validate_settings
from fkpd.store.errors import NotFoundError, NotLeasedError, PairUnavailableError, StoreInputError, TooEarlyError
from fkpd.store.models import as_utc
from fkpd.store.outcomes import Outcome
from fkpd.store.quality import push_prefetched_leases, required_view_seconds
from fkpd.store.views import ClipView, ComparisonRecord, PairView, ProjectInfo

log = logging.getLogger(__name__)

#: Largest row id the store accepts from outside (PostgreSQL ``integer``); a bigger
#: number cannot name a row, and is refused before it reaches the database driver.
MAX_ROW_ID = 2**31 - 1


def check_row_id(value: Any, what: str) -> int:
    """``value`` if it is an int in ``[1, MAX_ROW_ID]``.

    Raises:
        StoreInputError: a bool, a non-int, or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_ROW_ID:
        raise StoreInputError(f"{what} must be an integer id between 1 and {MAX_ROW_ID}, got {value!r:.60}")
    return value


class AssignmentMixin(StoreCore):
    """Leasing pairs to annotators and storing their answers (part of
    :class:`fkpd.store.Store`; rules in the module docstring)."""

    @staticmethod
    def _room_terms(annotator_id: int, now: datetime) -> tuple[ColumnElement[bool], ColumnElement[int]]:
        """SQL terms on ``Pair``: (answered by the annotator, its answers plus other
        annotators' live leases)."""
        answers = (
            select(func.count(m.Comparison.id))
            .where(m.Comparison.pair_id == m.Pair.id)
            .scalar_subquery()
        )
        others_leases = (
            select(func.count(m.Lease.id))
            .where(
                m.Lease.pair_id == m.Pair.id,
                m.Lease.expires_at > now,
                m.Lease.annotator_id != annotator_id,
            )
            .scalar_subquery()
        )
        answered_by_me = exists().where(
            m.Comparison.pair_id == m.Pair.id, m.Comparison.annotator_id == annotator_id
        )
        return answered_by_me, answers + others_leases

    @classmethod
    def _available(cls, annotator_id: int, labels_per_pair: int, now: datetime) -> ColumnElement[bool]:
        """SQL condition: ``Pair`` is open, unanswered by the annotator, and has room."""
        answered_by_me, taken = cls._room_terms(annotator_id, now)
        return and_(m.Pair.status == "open", ~answered_by_me, taken < labels_per_pair)

    def _put_lease(self, s: Session, pair_id: int, annotator_id: int, now: datetime, expires: datetime,
                   restart: bool = True) -> None:
        """Lease ``pair_id`` to the annotator until ``expires``: a new lease, or their
        existing one renewed; ``restart`` moves its start to ``now``, else it keeps its
        start (the minimum viewing time counts from it)."""
        lease = m.Lease.__table__
        s.execute(
            self.insert(lease)
            .values(pair_id=pair_id, annotator_id=annotator_id, leased_at=now, expires_at=expires)
            .on_conflict_do_update(
                index_elements=["pair_id", "annotator_id"],
                set_={"leased_at": now, "expires_at": expires} if restart else {"expires_at": expires},
            )
        )

    def next_pair(self, project: Any, annotator: Any) -> PairView | None:
        """Lease the next pair to label to ``annotator``, or return None if none is free.

        Returns the pair of the latest round with open pairs that the annotator already
        holds (extending its lease) if there is one; otherwise leases the oldest eligible
        pair of that round, or of an older round with open pairs when that one has none for
        them (see the module docstring for the rules), for the project's
        ``lease_seconds``. Same as ``lease_pairs(project, annotator, 1)``.

        Raises:
            NotFoundError: unknown project or annotator.
        """
        pairs = self.lease_pairs(project, annotator, 1)
        return pairs[0] if pairs else None

    def lease_pairs(self, project: Any, annotator: Any, count: int = 2,
                    exclude: Iterable[int] = ()) -> list[PairView]:
        """Lease up to ``count`` pairs to ``annotator``: the one to show now, then the next.

        The labelling page asks for three so that it can load the next pair's videos while
        the annotator judges the current one (prefetching). Pairs come from the latest
        round with open pairs first; only when it has too few for this annotator, from
        the next older rounds with open pairs, newest first (a new batch still being
        rendered, pair by pair, would otherwise leave the annotator with nothing while
        the previous round has open pairs). Within a round, the pairs the annotator
        already holds come first, oldest first, with their leases extended; the rest are
        newly leased under the rules of :meth:`next_pair`. After answering the first
        pair, the next call returns the second one first, so the order is stable.
        Pairs in ``exclude`` (ids) are neither renewed nor leased: the Label page passes
        the completed pairs it could not show, so that they are not handed out again.

        Returns:
            Between 0 and ``count`` pairs; fewer when the batch is running out.

        Raises:
            StoreInputError: ``count`` < 1.
            NotFoundError: unknown project or annotator.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise StoreInputError(f"count must be an int >= 1, got {count!r}")
        skip = list(dict.fromkeys(int(i) for i in exclude))
        now = self.now()
        with self.session(write=True) as s:
            proj = self.project_row(s, project)
            ann = self.annotator_row(s, annotator)
            settings = validate_settings(proj.settings)
            expires = now + timedelta(seconds=settings["lease_seconds"])
            pairs: list[m.Pair] = []
            for round_ in self._open_rounds(s, proj.id):  # newest first; older ones only to fill up
                pairs += self._renew_held_leases(s, proj.id, ann.id, now, expires, count - len(pairs), round_,
                                                 skip)
                while len(pairs) < count:
                    pair = self._lease_new(s, ann.id, proj.id, round_, settings["labels_per_pair"], now, expires,
                                           exclude=skip + [p.id for p in pairs])
                    if pair is None:
                        break
                    pairs.append(pair)
                if len(pairs) >= count:
                    break
            if len(pairs) < count and settings["second_opinions"] > 0:
                pairs += self._lease_second_opinions(s, proj.id, ann.id, settings, now, expires, count - len(pairs),
                                                     exclude=skip + [p.id for p in pairs])
            return [self._pair_view(s, p, expires) for p in pairs]

    def _lease_second_opinions(self, s: Session, project_id: int, annotator_id: int, settings: dict[str, Any],
                               now: datetime, expires: datetime, limit: int, exclude: list[int]) -> list[m.Pair]:
        """Up to ``limit`` completed pairs for a second opinion: the annotator's live leases
        on completed pairs first (renewed), then new leases on completed
        pairs of the newest rounds that they have not answered and whose answers plus
        others' live leases are fewer than ``labels_per_pair + second_opinions``
        (newest pair first: the clips of the latest versions), and whose clips both have
        videos (imported labels have none)."""
        cap = settings["labels_per_pair"] + settings["second_opinions"]
        leases = m.Lease.__table__
        mine, taken = self._room_terms(annotator_id, now)
        held = exists().where(leases.c.pair_id == m.Pair.id, leases.c.annotator_id == annotator_id,
                              leases.c.expires_at > now)
        room = taken < cap
        left, right = aliased(m.Clip), aliased(m.Clip)  # both videos rendered (not imported labels)
        shown = and_(exists().where(left.id == m.Pair.left_clip_id, left.video_path.is_not(None)),
                     exists().where(right.id == m.Pair.right_clip_id, right.video_path.is_not(None)))
        base = (select(m.Pair).where(m.Pair.project_id == project_id, m.Pair.status == "done", ~mine, shown)
                .with_for_update(skip_locked=True, of=m.Pair).execution_options(populate_existing=True))
        out: list[m.Pair] = []
        rejected = list(exclude)
        newest = (m.Pair.round.desc(), m.Pair.id.desc())  # one order for held and new: a rerun keeps it
        for renew, query in ((True, base.where(held).order_by(*newest)),
                             (False, base.where(~held, room).order_by(*newest))):
            while len(out) < limit:
                taken = rejected + [p.id for p in out]
                pair = s.scalars(query.where(m.Pair.id.not_in(taken)) if taken else query).first()
                if pair is None:
                    break
                # as in _lease_new: on PostgreSQL, re-check under the row lock with a fresh statement
                if not renew and self.backend == "postgresql" and s.scalar(
                        select(m.Pair.id).where(m.Pair.id == pair.id, room)) is None:
                    rejected.append(pair.id)
                    continue
                self._put_lease(s, pair.id, annotator_id, now, expires, restart=not renew)
                out.append(pair)
        return out

    @staticmethod
    def _open_rounds(s: Session, project_id: int) -> list[int]:
        """The rounds with open pairs, newest first."""
        return list(s.scalars(select(m.Pair.round).where(m.Pair.project_id == project_id, m.Pair.status == "open")
                              .group_by(m.Pair.round).order_by(m.Pair.round.desc())))

    def _lease_new(self, s: Session, annotator_id: int, project_id: int, round_: int, labels_per_pair: int,
                   now: datetime, expires: datetime, exclude: list[int]) -> m.Pair | None:
        """Lease the oldest available pair of ``round_`` not in ``exclude``; None if none."""
        available = self._available(annotator_id, labels_per_pair, now)
        rejected = list(exclude)
        while True:
            query = (
                select(m.Pair)
                .where(m.Pair.project_id == project_id, m.Pair.round == round_, available)
                .order_by(m.Pair.id)
                .limit(1)
                .with_for_update(skip_locked=True, of=m.Pair)
                .execution_options(populate_existing=True)
            )
            if rejected:
                query = query.where(m.Pair.id.not_in(rejected))
            pair = s.scalars(query).first()
            if pair is None:
                return None
            # We hold the row lock now. On PostgreSQL the statement above ran on a
            # snapshot taken before the lock was granted; a fresh statement sees any
            # lease or answer committed by the transaction that held it before us.
            # (SQLite needs no re-check: the transaction holds the database lock.)
            if self.backend == "postgresql" and s.scalar(
                select(m.Pair.id).where(m.Pair.id == pair.id, available)
            ) is None:
                rejected.append(pair.id)
                continue
            lease = m.Lease.__table__
            s.execute(delete(lease).where(lease.c.pair_id == pair.id, lease.c.expires_at <= now))
            self._put_lease(s, pair.id, annotator_id, now, expires)
            return pair

    def _renew_held_leases(
        self, s: Session, project_id: int, annotator_id: int, now: datetime, expires: datetime, limit: int,
        round_: int, exclude: list[int],
    ) -> list[m.Pair]:
        """Renew (and return, oldest first) up to ``limit`` live leases of the annotator on
        open pairs of ``round_``, leaving out the pair ids in ``exclude``.
        :meth:`lease_pairs` asks the newest round first, so a new batch takes over from
        the previous one at once; leases on older rounds not needed to fill up are left
        to expire."""
        leases = m.Lease.__table__
        held = s.scalars(
            select(leases.c.pair_id)
            .where(leases.c.annotator_id == annotator_id, leases.c.expires_at > now)
            .order_by(leases.c.pair_id)
        ).all()
        renewed_pairs: list[m.Pair] = []
        for pair_id in held:
            if len(renewed_pairs) >= limit:
                break
            if pair_id in exclude:
                continue
            pair = self._lock_pair(s, pair_id)
            if pair is None or pair.project_id != project_id or pair.status != "open" or pair.round != round_:
                continue
            # Under the pair lock, a fresh statement: renew only a lease that is still live.
            renewed = s.execute(
                leases.update()
                .where(
                    leases.c.pair_id == pair_id,
                    leases.c.annotator_id == annotator_id,
                    leases.c.expires_at > now,
                )
                .values(expires_at=expires)
            ).rowcount
            if renewed:
                renewed_pairs.append(pair)
        return renewed_pairs

    def _pair_view(self, s: Session, pair: m.Pair, expires: datetime) -> PairView:
        clips = {
            c.id: c
            for c in s.scalars(
                select(m.Clip).where(m.Clip.id.in_((pair.left_clip_id, pair.right_clip_id)))
            )
        }
        left, right = clips[pair.left_clip_id], clips[pair.right_clip_id]
        return PairView(
            id=pair.id,
            project_id=pair.project_id,
            round=pair.round,
            policy_version_id=left.policy_version_id,
            left=self._clip_view(left),
            right=self._clip_view(right),
            lease_expires_at=expires,
        )

    def _clip_view(self, clip: m.Clip) -> ClipView:
        return ClipView(
            id=clip.id,
            video_file=(None if clip.video_path is None or not self.artifacts.is_local
                        else self.artifacts.resolve(clip.video_path)),
            video_sha256=clip.video_sha256,
            fps=clip.fps,
            length=clip.length,
            video_path=clip.video_path,
        )

    def release(self, pair_id: int, annotator: Any) -> bool:
        """Give a leased pair back without answering; True if a lease was dropped."""
        with self.session(write=True) as s:
            ann = self.annotator_row(s, annotator)
            lease = m.Lease.__table__
            result = s.execute(
                delete(lease).where(lease.c.pair_id == pair_id, lease.c.annotator_id == ann.id)
            )
            return bool(result.rowcount)

    def answer(
        self,
        pair_id: int,
        annotator: Any,
        outcome: Outcome | str,
        shown_at: datetime | None = None,
        *,
        project: Any = None,
        min_view_seconds: float | None = None,
    ) -> ComparisonRecord:
        """Store an annotator's answer for a pair leased to them; idempotent per (pair, annotator).

        Args:
            pair_id: the pair answered.
            annotator: name, id or :class:`AnnotatorInfo`.
            outcome: ``left``, ``right``, ``equal`` or ``skip``.
            shown_at: when the pair was shown (aware, or naive UTC); None if unknown.
            project: if given (name, id or :class:`ProjectInfo`), the pair must belong to
                it: the labelling page passes the project it serves.
            min_view_seconds: if given (the labelling page passes the project's
                setting), a left/right/equal answer is refused unless the pair has been
                leased to the annotator for this long, or for one loop of its longer clip
                (``length / fps``) if that is shorter; the lease's start moves later when
                the annotator answers the pair before it (see
                :func:`fkpd.store.quality.push_prefetched_leases`), so answers cannot come
                faster than one per minimum either. Skips are never refused for time.

        Returns:
            The stored comparison. If this annotator had already answered the pair, the
            earlier answer is returned unchanged with ``created=False`` (the new outcome
            is ignored). The annotator's lease on the pair is released either way.

        Raises:
            StoreInputError: unknown outcome, a pair id that is not an int in
                ``[1, 2**31 - 1]``, or a ``shown_at`` that is not a datetime.
            NotFoundError: unknown pair, annotator or project.
            PairUnavailableError: the pair is retired, or already has
                ``labels_per_pair`` answers from others; fetch the next pair.
            NotLeasedError: (a :class:`PairUnavailableError`) the pair is not leased to
                this annotator (never was, or the lease lapsed and someone else took the
                pair), or belongs to another project than ``project``; logged.
            TooEarlyError: (a :class:`PairUnavailableError`) ``min_view_seconds`` is
                given and the pair has not been on screen that long; nothing is stored
                and the lease stays.
        """
        outcome = Outcome.parse(outcome)
        check_row_id(pair_id, "pair id")
        if shown_at is not None and not isinstance(shown_at, datetime):
            raise StoreInputError(f"shown_at must be a datetime or None, got {type(shown_at).__name__}")
        shown = None if shown_at is None else as_utc(shown_at)
        now = self.now()
        comparisons, leases = m.Comparison.__table__, m.Lease.__table__
        with self.session(write=True) as s:
            pair = self._lock_pair(s, pair_id)
            if pair is None:
                raise NotFoundError(f"pair {pair_id!r} not found")
            ann = self.annotator_row(s, annotator)
            if project is not None:
                proj = self.project_row(s, project.id if isinstance(project, ProjectInfo) else project)
                if pair.project_id != proj.id:
                    log.warning("refused the answer of annotator %r for pair %s: it belongs to project %s, not %r",
                                ann.name, pair.id, pair.project_id, proj.name)
                    raise NotLeasedError(
                        f"pair {pair.id} does not belong to project {proj.name!r}; answer the pairs this page shows"
                    )
            drop_my_lease = delete(leases).where(
                leases.c.pair_id == pair.id, leases.c.annotator_id == ann.id
            )
            answers = s.scalars(select(m.Comparison).where(m.Comparison.pair_id == pair.id)).all()
            existing = next((c for c in answers if c.annotator_id == ann.id), None)
            if existing is not None:
                s.execute(drop_my_lease)
                return self._record(existing, created=False, pair_done=pair.status == "done")
            project_row = self.get_row(s, m.Project, pair.project_id, "project")
            settings = validate_settings(project_row.settings)
            k = settings["labels_per_pair"]
            leased = s.execute(
                select(leases.c.id, leases.c.leased_at)
                .where(leases.c.pair_id == pair.id, leases.c.annotator_id == ann.id)
            ).first()
            # a completed pair takes an answer only from a lease it was handed out on for a
            # second opinion (completing a pair drops every lease on it)
            second_opinion = (pair.status == "done" and leased is not None
                              and len(answers) < k + settings["second_opinions"])
            if pair.status != "open" and not second_opinion:
                raise PairUnavailableError(
                    f"pair {pair.id} is {pair.status} and takes no more answers; "
                    "ask for the next pair"
                )
            if len(answers) >= k and not second_opinion:
                raise PairUnavailableError(
                    f"pair {pair.id} already has {len(answers)} answer(s) (labels_per_pair={k}); "
                    "ask for the next pair"
                )
            if leased is None:
                log.warning("refused the answer of annotator %r for pair %s of project %r: the pair is not leased "
                            "to them", ann.name, pair.id, project_row.name)
                raise NotLeasedError(
                    f"pair {pair.id} is not leased to annotator {ann.name!r} (it was never handed to them, or their "
                    "lease lapsed and someone else took it); answer the pairs the page shows"
                )
            if min_view_seconds is not None:
                shown_from, needed = as_utc(leased.leased_at), required_view_seconds(s, pair, min_view_seconds)
                viewed = (now - shown_from).total_seconds()
                if outcome is not Outcome.SKIP and viewed < needed:
                    log.warning("refused the answer of annotator %r for pair %s: on screen %.2f s of the %.2f s "
                                "minimum", ann.name, pair.id, viewed, needed)
                    raise TooEarlyError(f"pair {pair.id} was answered after {max(viewed, 0.0):.1f} s; watch both "
                                        f"clips for at least {needed:.1f} s first")
                push_prefetched_leases(s, pair, ann.id, shown_from, needed, now)
            new_id = s.execute(
                self.insert(comparisons)
                .values(
                    pair_id=pair.id,
                    annotator_id=ann.id,
                    outcome=outcome.value,
                    shown_at=shown,
                    answered_at=now,
                )
                .on_conflict_do_nothing(index_elements=["pair_id", "annotator_id"])
                .returning(comparisons.c.id)
            ).scalar()
            if new_id is None:  # cannot happen under the pair lock; kept as a safety net
                existing = self._comparison(s, pair.id, ann.id)
                assert existing is not None
                s.execute(drop_my_lease)
                return self._record(existing, created=False, pair_done=pair.status == "done")
            done = len(answers) + 1 >= k
            if second_opinion:  # the pair was complete already
                s.execute(drop_my_lease)
            elif done:
                pair.status = "done"
                pair.completed_at = now
                s.execute(delete(leases).where(leases.c.pair_id == pair.id))
            else:
                s.execute(drop_my_lease)
            return ComparisonRecord(
                id=new_id,
                pair_id=pair.id,
                annotator_id=ann.id,
                outcome=outcome,
                shown_at=shown,
                answered_at=now,
                created=True,
                pair_done=done,
            )

    @staticmethod
    def _comparison(s: Session, pair_id: int, annotator_id: int) -> m.Comparison | None:
        return s.scalars(
            select(m.Comparison).where(
                m.Comparison.pair_id == pair_id, m.Comparison.annotator_id == annotator_id
            )
        ).first()

    @staticmethod
    def _record(row: m.Comparison, *, created: bool, pair_done: bool) -> ComparisonRecord:
        return ComparisonRecord(
            id=row.id,
            pair_id=row.pair_id,
            annotator_id=row.annotator_id,
            outcome=Outcome(row.outcome),
            shown_at=row.shown_at,
            answered_at=row.answered_at,
            created=created,
            pair_done=pair_done,
        )
