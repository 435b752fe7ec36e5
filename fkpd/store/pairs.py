"""The store's pairs: queueing two clips for comparison, retiring pairs, imported labels.

:class:`PairsMixin` is part of :class:`fkpd.store.Store`. A pair compares two different
clips of the same policy version of its project and, for rollouts, from the same reset
seed (DESIGN.md §3). Pairs are created ``open`` and handed out by the assignment
(:mod:`fkpd.store.assignment`); they become ``done`` once answered ``labels_per_pair``
times, or ``retired`` when set aside. Labels imported from elsewhere
(:meth:`PairsMixin.add_imported_labels`) arrive as ``done`` pairs with one answer each.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from sqlalchemy import delete, select, union_all
from sqlalchemy.orm import Session

from fkpd.store import models as m
from fkpd.store.catalogue import CatalogueMixin
from fkpd.store.errors import NotFoundError, StoreInputError
from fkpd.store.outcomes import Outcome
from fkpd.store.views import PolicyVersionInfo, SeedGroup


class PairsMixin(CatalogueMixin):
    """Pairs of clips, retiring them, and imported labelled pairs (part of
    :class:`fkpd.store.Store`; builds on the catalogue's versions and clips)."""

    def add_pair(
        self, project: Any, left_clip_id: int, right_clip_id: int, round: int | None = None
    ) -> int:
        """Queue two clips for comparison; returns the pair id.

        The clips must differ, come from the same policy version of this project and,
        for rollouts, from the same reset seed (DESIGN.md §3). ``round`` defaults to the
        policy version's round.

        Raises:
            NotFoundError: unknown project or clip.
            StoreInputError: the clips break one of the rules above.
        """
        return self.add_pairs(project, [(left_clip_id, right_clip_id)], round=round)[0]

    def add_pairs(
        self, project: Any, pairs: Iterable[tuple[int, int]], round: int | None = None
    ) -> list[int]:
        """Queue many pairs in one transaction; returns their ids in order.

        Raises as :meth:`add_pair`; nothing is stored if any pair is invalid.
        """
        with self.session(write=True) as s:
            proj = self.project_row(s, project)
            return [r.id for r in self._insert_pairs(s, proj, pairs, round)]

    def _insert_pairs(
        self,
        s: Session,
        proj: m.Project,
        pairs: Iterable[tuple[int, int]],
        round: int | None,
        status: str = "open",
    ) -> list[m.Pair]:
        pairs = [(int(a), int(b)) for a, b in pairs]
        clip_ids = {c for p in pairs for c in p}
        clips = {
            c.id: (c, pv)
            for c, pv in s.execute(
                select(m.Clip, m.PolicyVersion)
                .join(m.PolicyVersion, m.PolicyVersion.id == m.Clip.policy_version_id)
                .where(m.Clip.id.in_(clip_ids))
            )
        }
        now = self.now()
        rows = []
        for left_id, right_id in pairs:
            pair_round = self._check_pair(proj, clips, left_id, right_id)
            rows.append(
                m.Pair(
                    project_id=proj.id,
                    round=pair_round if round is None else int(round),
                    left_clip_id=left_id,
                    right_clip_id=right_id,
                    status=status,
                    created_at=now,
                    completed_at=None if status == "open" else now,
                )
            )
        s.add_all(rows)
        s.flush()
        return rows

    @staticmethod
    def _check_pair(
        proj: m.Project, clips: dict[int, tuple[m.Clip, m.PolicyVersion]], left_id: int, right_id: int
    ) -> int:
        missing = [c for c in (left_id, right_id) if c not in clips]
        if missing:
            raise NotFoundError(f"clip(s) {missing} not found")
        if left_id == right_id:
            raise StoreInputError(f"a pair needs two different clips, got {left_id} twice")
        (left, pv), (right, _) = clips[left_id], clips[right_id]
        if left.policy_version_id != right.policy_version_id:
            raise StoreInputError(
                f"clips {left_id} and {right_id} come from policy versions "
                f"{left.policy_version_id} and {right.policy_version_id}; a pair compares two "
                "rollouts of the same policy version"
            )
        if pv.project_id != proj.id:
            raise StoreInputError(
                f"clips {left_id} and {right_id} belong to project {pv.project_id}, not {proj.name!r}"
            )
        if (
            left.reset_seed is not None
            and right.reset_seed is not None
            and left.reset_seed != right.reset_seed
        ):
            raise StoreInputError(
                f"clips {left_id} and {right_id} start from reset seeds {left.reset_seed} and "
                f"{right.reset_seed}; a pair compares rollouts from the same initial state"
            )
        return pv.round

    def batch_pair_indices(self, project: Any, round: int, job_id: int | None) -> set[int]:
        """Batch indices (the clips' ``meta["pair"]``) of the pairs of ``round`` whose clips
        job ``job_id`` wrote: what a retried job finds of a batch it registered part of
        (batches are registered pair by pair, :mod:`fkpd.studio.progressive`).

        Raises:
            NotFoundError: unknown project.
        """
        with self.session() as s:
            proj = self.project_row(s, project)
            metas = s.scalars(
                select(m.Clip.meta)
                .join(m.Pair, m.Pair.left_clip_id == m.Clip.id)
                .where(m.Pair.project_id == proj.id, m.Pair.round == int(round))
            ).all()
        return {int(meta["pair"]) for meta in metas
                if isinstance(meta, dict) and meta.get("job_id") == job_id and isinstance(meta.get("pair"), int)}

    def seed_groups(self, project: Any, round: int, policy_version_id: int) -> list[SeedGroup]:
        """The start states of a round that hold more than one clip: the current-policy
        clips of version ``policy_version_id`` that belong to pairs of ``round``, grouped by
        reset seed and segment start (the clips' ``meta["start"]``). Clips without a reset
        seed (imported segments) and dataset clips (``meta["source"] == "dataset"``) are
        left out. A top-up extends these groups with one more clip each
        (:mod:`fkpd.prefs.extension`).

        One query, whatever the round's size.

        Returns:
            :class:`~fkpd.store.views.SeedGroup` s ordered by their first pair id (empty
            when the version has no clip in the round, e.g. a version of another project).

        Raises:
            NotFoundError: unknown project.
            StoreInputError: ``round`` or ``policy_version_id`` is not an int.
        """
        for name, value in (("round", round), ("policy_version_id", policy_version_id)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise StoreInputError(f"{name} must be an int, got {value!r:.40}")
        with self.session() as s:
            proj = self.project_row(s, project)
            of_round = (m.Pair.project_id == proj.id, m.Pair.round == int(round))
            sides = union_all(
                select(m.Pair.id.label("pair_id"), m.Pair.status.label("status"),
                       m.Pair.left_clip_id.label("clip_id")).where(*of_round),
                select(m.Pair.id, m.Pair.status, m.Pair.right_clip_id).where(*of_round),
            ).subquery()
            rows = s.execute(
                select(sides.c.pair_id, sides.c.status, m.Clip.id, m.Clip.reset_seed, m.Clip.length, m.Clip.meta)
                .join(m.Clip, m.Clip.id == sides.c.clip_id)
                .where(m.Clip.policy_version_id == int(policy_version_id), m.Clip.reset_seed.is_not(None))
            ).all()
        groups: dict[tuple[int, int | None], dict[str, Any]] = {}
        for pair_id, status, clip_id, reset_seed, length, meta in rows:
            meta = meta if isinstance(meta, dict) else {}
            if meta.get("source") == "dataset":
                continue
            start, noise = (v if isinstance(v, int) and not isinstance(v, bool) else None
                            for v in (meta.get("start"), meta.get("noise_seed")))
            group = groups.setdefault((int(reset_seed), start), {"clips": {}, "pairs": set(), "retired": False})
            group["clips"][int(clip_id)] = (int(length), noise)
            group["pairs"].add(int(pair_id))
            group["retired"] |= status == "retired"
        out = []
        for (reset_seed, start), g in groups.items():
            ids = tuple(sorted(g["clips"]))
            out.append(SeedGroup(
                reset_seed=reset_seed, start=start, length=max(g["clips"][c][0] for c in ids), clip_ids=ids,
                noise_seeds=tuple(g["clips"][c][1] for c in ids if g["clips"][c][1] is not None),
                first_pair=min(g["pairs"]), pairs=len(g["pairs"]), retired=g["retired"]))
        return sorted(out, key=lambda g: g.first_pair)

    def retire_open_pairs(self, project: Any, before_round: int | None = None) -> int:
        """Mark open pairs of rounds older than ``before_round`` as retired.

        ``before_round`` defaults to the project's latest round. Retired pairs are never
        offered again; their answers are kept. Returns the number of pairs retired.
        """
        with self.session(write=True) as s:
            proj = self.project_row(s, project)
            if before_round is None:
                before_round = self._latest_round(s, proj.id)
                if before_round is None:
                    return 0
            result = s.execute(
                m.Pair.__table__.update()
                .where(
                    m.Pair.project_id == proj.id,
                    m.Pair.round < before_round,
                    m.Pair.status == "open",
                )
                .values(status="retired", completed_at=self.now())
            )
            return int(result.rowcount or 0)

    def retire_pair(self, pair_id: int) -> bool:
        """Set one open pair aside (status ``retired``): it is never offered again.

        For a pair that cannot be shown, e.g. because a clip's video file is missing or
        corrupt. Its answers, if any, are kept; retired pairs do not count in
        :meth:`batch_progress`. Returns True if the pair was open and is now retired.

        Raises:
            NotFoundError: unknown pair.
        """
        with self.session(write=True) as s:
            pair = self._lock_pair(s, pair_id)
            if pair is None:
                raise NotFoundError(f"pair {pair_id!r} not found")
            if pair.status != "open":
                return False
            pair.status = "retired"
            pair.completed_at = self.now()
            s.execute(delete(m.Lease.__table__).where(m.Lease.__table__.c.pair_id == pair.id))
            return True

    # ------------------------------------------------------------------ imported labels

    def add_imported_labels(
        self,
        project: Any,
        annotator: Any,
        clips: Sequence[Mapping[str, Any]],
        pairs: Sequence[tuple[int, int]],
        outcomes: Sequence[Outcome | str],
        *,
        round: int = 0,
        metrics: Mapping[str, Any] | None = None,
    ) -> PolicyVersionInfo:
        """Store labelled pairs of segments made elsewhere, all in one transaction.

        Creates a policy version without checkpoint that owns the clips, one pair per
        entry of ``pairs`` with status ``done`` (such pairs are never offered to
        annotators: imported clips have no videos) and one comparison each by
        ``annotator`` (``shown_at`` unknown). The comparisons are then training data of
        the project (:meth:`~fkpd.store.Store.training_pairs`). Used by
        :func:`fkpd.prefs.importers.import_pt_labels`.

        Args:
            project: name, id or :class:`ProjectInfo`.
            annotator: name, id or :class:`AnnotatorInfo` of an existing annotator.
            clips: :meth:`add_clip` keyword arguments without ``policy_version_id``; the
                segment files must already be in the artifact directory.
            pairs: ``(left, right)`` positions in ``clips``, one per comparison.
            outcomes: one per pair (``left``, ``right``, ``equal`` or ``skip``).
            round: round of the policy version and of the pairs.
            metrics: JSON-serialisable description of the source, kept on the version.

        Returns:
            The policy version created.

        Raises:
            StoreInputError: ``pairs`` and ``outcomes`` differ in length, an unknown
                outcome, a clip with length or fps ≤ 0, or a pair that breaks the rules of
                :meth:`add_pair`.
            NotFoundError: unknown project or annotator.
            ArtifactPathError / ArtifactIntegrityError: bad or missing segment file.
        """
        if len(pairs) != len(outcomes):
            raise StoreInputError(f"{len(pairs)} pairs but {len(outcomes)} outcomes; give one outcome per pair")
        parsed = [Outcome.parse(o) for o in outcomes]
        prepared = [self._prepare_clip(c) for c in clips]
        with self.session(write=True) as s:
            proj = self.project_row(s, project)
            ann = self.annotator_row(s, annotator)
            version = self._insert_policy_version(s, proj, None, None, None, round, metrics)
            clip_rows = self._insert_clips(s, [{**c, "policy_version_id": version.id} for c in prepared])
            pair_rows = self._insert_pairs(
                s, proj, [(clip_rows[a].id, clip_rows[b].id) for a, b in pairs], round, status="done"
            )
            now = self.now()
            s.add_all(
                m.Comparison(
                    pair_id=pair.id, annotator_id=ann.id, outcome=outcome.value, shown_at=None, answered_at=now
                )
                for pair, outcome in zip(pair_rows, parsed)
            )
            s.flush()
            return PolicyVersionInfo.of(version)
