"""Reports and training data read from the store: progress, comparisons, agreement.

:class:`ReportsMixin` is part of :class:`fkpd.store.Store`. Everything here only reads.
Frames are pandas DataFrames (pandas is imported when first needed); ground truth
(returns, success) appears only where asked for (``include_ground_truth``) and in
:class:`~fkpd.store.views.TrainingPair` clip records, never on annotator pages. Skips
count toward progress but are never training data, and neither are the comparisons of
annotators excluded from training (:meth:`fkpd.store.Store.exclude_annotator`) unless
asked for (``include_excluded``).
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Iterable

from sqlalchemy import exists, func, select
from sqlalchemy.orm import aliased

from fkpd.store import models as m
from fkpd.store.core import StoreCore, validate_settings
from fkpd.store.errors import StoreInputError
from fkpd.store.outcomes import Outcome, outcome_to_p_left
from fkpd.store.views import ClipRecord, PairSupply, TrainingPair

if TYPE_CHECKING:
    import pandas as pd


class ReportsMixin(StoreCore):
    """Labelling progress, comparison frames, training pairs and annotator statistics
    (part of :class:`fkpd.store.Store`)."""

    def batch_progress(self, project: Any, round: int | None = None) -> tuple[int, int]:
        """Labelling progress of one round as ``(answered, total)`` answers.

        ``total`` is ``labels_per_pair`` × the round's pairs that are not retired;
        ``answered`` counts their answers (skips included, at most ``labels_per_pair``
        per pair). ``round`` defaults to the project's latest round; ``(0, 0)`` when
        the round has no pairs.
        """
        with self.session() as s:
            proj = self.project_row(s, project)
            k = validate_settings(proj.settings)["labels_per_pair"]
            if round is None:
                round = self._latest_round(s, proj.id)
                if round is None:
                    return (0, 0)
            counts = (
                select(m.Pair.id, func.count(m.Comparison.id).label("n"))
                .outerjoin(m.Comparison, m.Comparison.pair_id == m.Pair.id)
                .where(
                    m.Pair.project_id == proj.id,
                    m.Pair.round == round,
                    m.Pair.status != "retired",
                )
                .group_by(m.Pair.id)
            )
            per_pair = [n for _, n in s.execute(counts)]
            return (sum(min(n, k) for n in per_pair), k * len(per_pair))

    def pair_supply(self, project: Any, *, min_round: int = 0, active_within_s: float = 300.0) -> PairSupply:
        """What the labelling queue holds now, for keeping annotators busy (top-up pairs).

        Args:
            min_round: count open pairs of rounds >= this only (the rounds the served
                policy's pairs belong to; older rounds are handed out only after them).
            active_within_s: an annotator is active while they hold a live lease on a
                pair of the project or answered one within this many seconds.

        Returns:
            :class:`~fkpd.store.views.PairSupply`: open pairs of rounds >= ``min_round``
            (``open_pairs``), the pairs ever added to round ``min_round`` whatever their
            status (``round_pairs``: the next free pair index of that round), and the
            active annotators.

        Raises:
            NotFoundError: unknown project.
            StoreInputError: ``min_round`` is not an int or ``active_within_s`` is not a
                number >= 0.
        """
        if isinstance(min_round, bool) or not isinstance(min_round, int):
            raise StoreInputError(f"min_round must be an int, got {min_round!r}")
        if isinstance(active_within_s, bool) or not isinstance(active_within_s, (int, float)) \
                or not active_within_s >= 0:
            raise StoreInputError(f"active_within_s must be a number >= 0, got {active_within_s!r}")
        now = self.now()
        since = now - timedelta(seconds=float(active_within_s))
        with self.session() as s:
            proj = self.project_row(s, project)
            open_pairs = s.scalar(select(func.count(m.Pair.id)).where(
                m.Pair.project_id == proj.id, m.Pair.status == "open", m.Pair.round >= min_round))
            round_pairs = s.scalar(select(func.count(m.Pair.id)).where(
                m.Pair.project_id == proj.id, m.Pair.round == min_round))
            leasing = (select(m.Lease.annotator_id)
                       .join(m.Pair, m.Pair.id == m.Lease.pair_id)
                       .where(m.Pair.project_id == proj.id, m.Lease.expires_at > now))
            answering = (select(m.Comparison.annotator_id)
                         .join(m.Pair, m.Pair.id == m.Comparison.pair_id)
                         .where(m.Pair.project_id == proj.id, m.Comparison.answered_at >= since))
            active = set(s.scalars(leasing)) | set(s.scalars(answering))
            return PairSupply(open_pairs=int(open_pairs or 0), round_pairs=int(round_pairs or 0),
                              active_annotators=len(active))

    def comparisons_frame(
        self,
        project: Any,
        round: int | None = None,
        annotator: Any = None,
        *,
        include_ground_truth: bool = False,
    ) -> "pd.DataFrame":
        """Every comparison of a project as a DataFrame, one row per answer, by id.

        Columns: ``comparison_id, pair_id, round, policy_version_id, annotator_id,
        annotator, outcome, p_left`` (NaN for skips), ``shown_at, answered_at`` (UTC),
        ``left_clip_id, right_clip_id, left_seed, right_seed``; with
        ``include_ground_truth`` also ``left_return, right_return, left_success,
        right_success`` (for analysis; never show these to annotators).

        Args:
            round / annotator: optional filters.

        Raises:
            NotFoundError: unknown project or annotator.
        """
        import pandas as pd

        left, right = aliased(m.Clip), aliased(m.Clip)
        columns = [
            m.Comparison.id.label("comparison_id"),
            m.Comparison.pair_id,
            m.Pair.round,
            left.policy_version_id,
            m.Comparison.annotator_id,
            m.Annotator.name.label("annotator"),
            m.Comparison.outcome,
            m.Comparison.shown_at,
            m.Comparison.answered_at,
            m.Pair.left_clip_id,
            m.Pair.right_clip_id,
            left.reset_seed.label("left_seed"),
            right.reset_seed.label("right_seed"),
        ]
        if include_ground_truth:
            columns += [
                left.gt_return.label("left_return"),
                right.gt_return.label("right_return"),
                left.gt_success.label("left_success"),
                right.gt_success.label("right_success"),
            ]
        with self.session() as s:
            proj = self.project_row(s, project)
            query = (
                select(*columns)
                .join(m.Pair, m.Pair.id == m.Comparison.pair_id)
                .join(left, left.id == m.Pair.left_clip_id)
                .join(right, right.id == m.Pair.right_clip_id)
                .join(m.Annotator, m.Annotator.id == m.Comparison.annotator_id)
                .where(m.Pair.project_id == proj.id)
                .order_by(m.Comparison.id)
            )
            if round is not None:
                query = query.where(m.Pair.round == round)
            if annotator is not None:
                query = query.where(m.Comparison.annotator_id == self.annotator_row(s, annotator).id)
            rows = s.execute(query).all()
        names = [c.key for c in columns]
        frame = pd.DataFrame.from_records([tuple(r) for r in rows], columns=names)
        p_left = [outcome_to_p_left(o) for o in frame["outcome"]]
        frame.insert(names.index("outcome") + 1, "p_left", pd.Series(p_left, dtype="float64"))
        for col in ("shown_at", "answered_at"):
            frame[col] = pd.to_datetime(frame[col], utc=True)
        for col in ("left_seed", "right_seed"):
            frame[col] = frame[col].astype("Int64")
        return frame

    @staticmethod
    def _not_excluded(project_id: int):
        """SQL condition: the comparison's annotator is not excluded from training in the project."""
        return ~exists().where(m.AnnotatorExclusion.project_id == project_id,
                               m.AnnotatorExclusion.annotator_id == m.Comparison.annotator_id)

    def training_pairs(self, project: Any, *, max_round: int | None = None,
                       include_excluded: bool = False) -> list[TrainingPair]:
        """Non-skip comparisons as ``(left clip, right clip, p_left)``, oldest first: the
        training set of the next round.

        A pair answered by several annotators appears once per answer; gold pairs count
        like any other.

        Args:
            max_round: only pairs of rounds ≤ this.
            include_excluded: also the comparisons of annotators excluded from training
                (:meth:`~fkpd.store.Store.exclude_annotator`); left out by default.
        """
        left, right = aliased(m.Clip), aliased(m.Clip)
        with self.session() as s:
            proj = self.project_row(s, project)
            query = (
                select(m.Comparison.outcome, left, right)
                .join(m.Pair, m.Pair.id == m.Comparison.pair_id)
                .join(left, left.id == m.Pair.left_clip_id)
                .join(right, right.id == m.Pair.right_clip_id)
                .where(m.Pair.project_id == proj.id, m.Comparison.outcome != Outcome.SKIP.value)
                .order_by(m.Comparison.id)
            )
            if max_round is not None:
                query = query.where(m.Pair.round <= max_round)
            if not include_excluded:
                query = query.where(self._not_excluded(proj.id))
            out = []
            for outcome, lclip, rclip in s.execute(query):
                p = outcome_to_p_left(outcome)
                assert p is not None
                out.append(TrainingPair(ClipRecord.of(lclip), ClipRecord.of(rclip), p))
            return out

    def count_training_pairs(self, project: Any, *, max_round: int | None = None,
                             include_excluded: bool = False) -> int:
        """``len(training_pairs(project, max_round=..., include_excluded=...))`` as one COUNT
        query (no clip records loaded)."""
        with self.session() as s:
            proj = self.project_row(s, project)
            query = (
                select(func.count(m.Comparison.id))
                .join(m.Pair, m.Pair.id == m.Comparison.pair_id)
                .where(m.Pair.project_id == proj.id, m.Comparison.outcome != Outcome.SKIP.value)
            )
            if max_round is not None:
                query = query.where(m.Pair.round <= max_round)
            if not include_excluded:
                query = query.where(self._not_excluded(proj.id))
            return int(s.execute(query).scalar_one())

    def select_comparisons(self, project: Any, *, rounds: Iterable[int] | None = None,
                           annotators: Iterable[str] | None = None) -> "pd.DataFrame":
        """:meth:`comparisons_frame` of the comparisons in ``rounds`` given by
        ``annotators`` (names); None or empty means no filter (the Data page's filters).

        Raises:
            NotFoundError: unknown project.
        """
        frame = self.comparisons_frame(project)
        if rounds:
            frame = frame[frame["round"].isin([int(r) for r in rounds])]
        if annotators:
            frame = frame[frame["annotator"].isin([str(a) for a in annotators])]
        return frame.reset_index(drop=True)

    def annotator_stats(self, project: Any, *, rounds: Iterable[int] | None = None,
                        annotators: Iterable[str] | None = None) -> "pd.DataFrame":
        """Per-annotator answer counts, rates and label quality for a project, over the
        comparisons of ``rounds`` by ``annotators`` (names) when given
        (:meth:`select_comparisons`); the Data page's table.

        Returns:
            One row per annotator (index: annotator name) with ``annotator_id,
            n_answers, n_left, n_right, n_equal, n_skip``, ``tie_rate`` (equal / all),
            ``skip_rate`` (skip / all), ``left_rate`` (left / (left + right); 0.5 means
            no side bias, NaN without decisive answers), ``median_seconds`` (speed:
            median time from shown to answered, NaN when unknown), and label quality:

            * ``gold_n`` / ``gold_correct`` / ``gold_accuracy``: their non-skip answers
              to gold pairs (:meth:`~fkpd.store.Store.mark_gold_pairs`), how many named
              the side ground truth favours (an ``equal`` is wrong), and the ratio (NaN
              when ``gold_n`` is 0);
            * ``agree_n`` / ``agreement``: pairs where they and at least one other
              annotator gave a non-skip answer, and the mean over those pairs of the
              share of the others' answers equal to theirs (with two annotators per
              pair: how often they agree; NaN when ``agree_n`` is 0). Computed over
              every annotator's answers in ``rounds``, whatever ``annotators`` selects;
            * ``excluded``: their comparisons are left out of training
              (:meth:`~fkpd.store.Store.exclude_annotator`).

        Raises:
            NotFoundError: unknown project.
        """
        import pandas as pd

        everyone = self.select_comparisons(project, rounds=rounds)
        frame = everyone[everyone["annotator"].isin([str(a) for a in annotators])] if annotators else everyone
        with self.session() as s:
            proj = self.project_row(s, project)
            gold = dict(s.execute(select(m.Pair.id, m.Pair.gold)
                                  .where(m.Pair.project_id == proj.id, m.Pair.gold.is_not(None))).all())
            excluded = set(s.scalars(select(m.AnnotatorExclusion.annotator_id)
                                     .where(m.AnnotatorExclusion.project_id == proj.id)))
        agree: dict[str, list[float]] = {}
        decisive = everyone[everyone["outcome"] != Outcome.SKIP.value]
        for _, group in decisive.groupby("pair_id"):
            answers = list(zip(group["annotator"], group["outcome"]))
            for name, outcome in answers:
                others = [o for a, o in answers if a != name]
                if others:
                    agree.setdefault(name, []).append(sum(o == outcome for o in others) / len(others))
        columns = [
            "annotator_id", "n_answers", "n_left", "n_right", "n_equal", "n_skip",
            "tie_rate", "skip_rate", "left_rate", "median_seconds",
            "gold_n", "gold_correct", "gold_accuracy", "agree_n", "agreement", "excluded",
        ]  # fmt: skip
        rows = {}
        for name, group in frame.groupby("annotator", sort=True):
            counts = group["outcome"].value_counts()
            n = len(group)
            n_left, n_right = int(counts.get("left", 0)), int(counts.get("right", 0))
            seconds = (group["answered_at"] - group["shown_at"]).dt.total_seconds()
            on_gold = [(int(p), o) for p, o in zip(group["pair_id"], group["outcome"])
                       if int(p) in gold and o != Outcome.SKIP.value]
            gold_correct = sum(o == gold[p] for p, o in on_gold)
            shares = agree.get(name, [])
            annotator_id = int(group["annotator_id"].iloc[0])
            rows[name] = [
                annotator_id,
                n,
                n_left,
                n_right,
                int(counts.get("equal", 0)),
                int(counts.get("skip", 0)),
                counts.get("equal", 0) / n,
                counts.get("skip", 0) / n,
                n_left / (n_left + n_right) if n_left + n_right else float("nan"),
                float(seconds.median()) if seconds.notna().any() else float("nan"),
                len(on_gold),
                gold_correct,
                gold_correct / len(on_gold) if on_gold else float("nan"),
                len(shares),
                sum(shares) / len(shares) if shares else float("nan"),
                annotator_id in excluded,
            ]
        stats = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
        stats.index.name = "annotator"
        return stats.astype({"excluded": bool, "gold_n": int, "gold_correct": int, "agree_n": int})

    def pairwise_agreement(self, project: Any) -> "pd.DataFrame":
        """How often two annotators gave the same non-skip answer on the same pair.

        Returns:
            One row per annotator pair that shares at least one pair where both gave a
            non-skip answer: ``annotator_a, annotator_b`` (alphabetical), ``n_shared``,
            ``n_agree`` and ``agreement = n_agree / n_shared``. Empty when no pair has
            overlapping labels.
        """
        import pandas as pd

        frame = self.comparisons_frame(project)
        frame = frame[frame["outcome"] != Outcome.SKIP.value]
        tally: dict[tuple[str, str], list[int]] = {}
        for _, group in frame.groupby("pair_id"):
            answers = sorted(zip(group["annotator"], group["outcome"]))
            for (a, oa), (b, ob) in itertools.combinations(answers, 2):
                shared = tally.setdefault((a, b), [0, 0])
                shared[0] += 1
                shared[1] += int(oa == ob)
        records = [
            (a, b, n, agree, agree / n) for (a, b), (n, agree) in sorted(tally.items())
        ]
        return pd.DataFrame.from_records(
            records, columns=["annotator_a", "annotator_b", "n_shared", "n_agree", "agreement"]
        )
