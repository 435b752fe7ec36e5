"""The store's catalogue: projects, annotators, policy versions and clips.

:class:`CatalogueMixin` is part of :class:`fkpd.store.Store`; it registers what the
labelling works on. Project and annotator names are unique and trimmed of surrounding
spaces; a project may be created together with its first job, in one transaction
(:meth:`CatalogueMixin.create_project_with_job`); a clip's or checkpoint's files must be in the artifact directory before it is
registered (their sha256 is computed then, unless given).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from fkpd.store import models as m
from fkpd.store.artifacts import normalize_relpath
from fkpd.store.core import StoreCore, clean_name, validate_settings
from fkpd.store.errors import AlreadyExistsError, NotFoundError, StoreInputError
from fkpd.store.views import AnnotatorInfo, ClipRecord, JobView, PolicyVersionInfo, ProjectInfo


def check_identity(identity: str) -> str:
    """``identity`` if it is one of :data:`fkpd.store.models.IDENTITY_MODES`.

    Raises:
        StoreInputError: anything else.
    """
    if identity not in m.IDENTITY_MODES:
        raise StoreInputError(
            f"identity mode must be one of {', '.join(m.IDENTITY_MODES)}, got {identity!r}"
        )
    return identity


class CatalogueMixin(StoreCore):
    """Projects, annotators, policy versions and clips (part of :class:`fkpd.store.Store`)."""

    # ------------------------------------------------------------------ projects

    def create_project(
        self,
        name: str,
        task_id: str,
        instructions: str = "",
        settings: Mapping[str, Any] | None = None,
        *,
        exist_ok: bool = False,
        identity: str = "invite",
    ) -> ProjectInfo:
        """Create a labelling project.

        Args:
            name: unique, non-empty.
            task_id: task registry id, e.g. ``metaworld/door-open-v3``.
            instructions: text shown to annotators above the videos.
            settings: merged over :data:`DEFAULT_SETTINGS` (``labels_per_pair``,
                ``lease_seconds``); other keys are stored as given.
            exist_ok: return the existing project of that name instead of raising
                (its instructions, settings and identity mode are left unchanged).
            identity: ``"invite"`` (annotators come through invite links,
                :meth:`create_invite`; the default) or ``"open"`` (annotators name
                themselves, for demos).

        Raises:
            StoreInputError: empty name/task id, invalid settings or identity mode.
            AlreadyExistsError: the name is taken and ``exist_ok`` is False.
        """
        values = self._project_values(name, task_id, instructions, settings, identity)
        with self.session(write=True) as s:
            new_id = self._insert_project(s, values)
            if new_id is None and not exist_ok:
                raise AlreadyExistsError(
                    f"project {values['name']!r} already exists; pick another name or pass exist_ok=True"
                )
            return ProjectInfo.of(self.project_row(s, values["name"] if new_id is None else new_id))

    def create_project_with_job(
        self,
        name: str,
        task_id: str,
        kind: str,
        params: Mapping[str, Any] | None = None,
        *,
        instructions: str = "",
        settings: Mapping[str, Any] | None = None,
        identity: str = "invite",
    ) -> tuple[ProjectInfo, JobView]:
        """Create a project and queue its first job (e.g. its bootstrap) in one
        transaction: either both exist afterwards or neither, so a project is never
        left without the job that makes it usable.

        Args:
            name, task_id, instructions, settings, identity: as :meth:`create_project`.
            kind, params: the job, as :meth:`fkpd.store.queue.JobQueue.enqueue`.

        Returns:
            ``(project, job)``.

        Raises:
            StoreInputError: bad project fields, or a bad kind or params (NaN and
                Infinity included); checked before anything is written.
            AlreadyExistsError: the name is taken (nothing is written).
        """
        values = self._project_values(name, task_id, instructions, settings, identity)
        clean = self.jobs.prepare(kind, params)
        with self.session(write=True) as s:
            new_id = self._insert_project(s, values)
            if new_id is None:
                raise AlreadyExistsError(f"project {values['name']!r} already exists; nothing was created")
            row = self.project_row(s, new_id)
            job = self.jobs.insert(s, row, kind, clean)
            return ProjectInfo.of(row), JobView.of(job)

    def _project_values(self, name: str, task_id: str, instructions: str, settings: Mapping[str, Any] | None,
                        identity: str) -> dict[str, Any]:
        """The checked column values of a new project (no database access)."""
        name = clean_name(name, "project")
        if not isinstance(task_id, str) or not task_id.strip():
            raise StoreInputError(f"task_id must be a non-empty string, got {task_id!r}")
        return dict(name=name, task_id=task_id.strip(), instructions=instructions or "",
                    settings=validate_settings(settings or {}), identity=check_identity(identity))

    def _insert_project(self, s: Session, values: Mapping[str, Any]) -> int | None:
        """Insert a project row unless the name is taken; its id, or None."""
        table = m.Project.__table__
        stmt = (
            self.insert(table)
            .values(**values, created_at=self.now())
            .on_conflict_do_nothing(index_elements=["name"])
            .returning(table.c.id)
        )
        return s.execute(stmt).scalar()

    def get_project(self, project: Any) -> ProjectInfo:
        """A project by name or id.

        Raises:
            NotFoundError: no such project.
        """
        with self.session() as s:
            return ProjectInfo.of(self.project_row(s, project))

    def list_projects(self) -> list[ProjectInfo]:
        """All projects, oldest first."""
        with self.session() as s:
            return [ProjectInfo.of(p) for p in s.scalars(select(m.Project).order_by(m.Project.id))]

    def update_project(
        self,
        project: Any,
        *,
        instructions: str | None = None,
        settings: Mapping[str, Any] | None = None,
        identity: str | None = None,
    ) -> ProjectInfo:
        """Change a project's instructions, merge new settings into its settings, and/or
        switch its identity mode (``"open"`` or ``"invite"``).

        Raises:
            NotFoundError: no such project.
            StoreInputError: invalid settings or identity mode.
        """
        if identity is not None:
            identity = check_identity(identity)
        with self.session(write=True) as s:
            row = self.project_row(s, project)
            if instructions is not None:
                row.instructions = instructions
            if settings is not None:
                row.settings = validate_settings({**row.settings, **dict(settings)})
            if identity is not None:
                row.identity = identity
            s.flush()
            return ProjectInfo.of(row)

    # ------------------------------------------------------------------ annotators

    def get_or_create_annotator(self, name: str, *, is_admin: bool = False) -> AnnotatorInfo:
        """The annotator called ``name`` (surrounding spaces ignored), created if new.

        ``is_admin`` applies only when the annotator is created; use :meth:`set_admin`
        to change it later. Safe to call concurrently with the same name.

        Raises:
            StoreInputError: ``name`` is empty or only whitespace.
        """
        name = clean_name(name, "annotator")
        with self.session(write=True) as s:
            table = m.Annotator.__table__
            s.execute(
                self.insert(table)
                .values(name=name, is_admin=bool(is_admin), created_at=self.now())
                .on_conflict_do_nothing(index_elements=["name"])
            )
            return AnnotatorInfo.of(self.annotator_row(s, name))

    def get_annotator(self, annotator: Any) -> AnnotatorInfo:
        """An annotator by name or id.

        Raises:
            NotFoundError: no such annotator.
        """
        with self.session() as s:
            return AnnotatorInfo.of(self.annotator_row(s, annotator))

    def set_admin(self, annotator: Any, is_admin: bool) -> AnnotatorInfo:
        """Grant or revoke admin rights.

        Raises:
            NotFoundError: no such annotator.
        """
        with self.session(write=True) as s:
            row = self.annotator_row(s, annotator)
            row.is_admin = bool(is_admin)
            s.flush()
            return AnnotatorInfo.of(row)

    def list_annotators(self) -> list[AnnotatorInfo]:
        """All annotators, by name."""
        with self.session() as s:
            rows = s.scalars(select(m.Annotator).order_by(m.Annotator.name))
            return [AnnotatorInfo.of(a) for a in rows]

    # ------------------------------------------------------------------ policy versions

    def add_policy_version(
        self,
        project: Any,
        checkpoint_path: str | None = None,
        *,
        checkpoint_sha256: str | None = None,
        parent_id: int | None = None,
        round: int = 0,
        metrics: Mapping[str, Any] | None = None,
    ) -> PolicyVersionInfo:
        """Register a trained policy.

        Args:
            checkpoint_path: path relative to the artifact directory (write the file
                first, e.g. with :meth:`write_artifact_atomic`); None for data sources
                that have no checkpoint (imported datasets).
            checkpoint_sha256: hash of the checkpoint file; computed from the file when
                omitted.
            parent_id: the version this one was trained from, if any.
            round: alignment round (0 for the behaviour-cloned reference).
            metrics: JSON-serialisable evaluation results.

        Raises:
            NotFoundError: unknown project or parent.
            ArtifactPathError / ArtifactIntegrityError: bad or missing checkpoint path.
            StoreInputError: the parent belongs to another project, or round < 0.
        """
        if round < 0:
            raise StoreInputError(f"round must be >= 0, got {round}")
        if checkpoint_path is not None:
            if checkpoint_sha256 is None:
                checkpoint_sha256 = self.artifacts.sha256(checkpoint_path)
            elif self.artifacts.is_local:
                self.artifacts.resolve(checkpoint_path)  # refuses a path that escapes through a symlink
            checkpoint_path = normalize_relpath(checkpoint_path)
        with self.session(write=True) as s:
            proj = self.project_row(s, project)
            row = self._insert_policy_version(
                s, proj, checkpoint_path, checkpoint_sha256, parent_id, round, metrics
            )
            return PolicyVersionInfo.of(row)

    def _insert_policy_version(
        self,
        s: Session,
        proj: m.Project,
        checkpoint_path: str | None,
        checkpoint_sha256: str | None,
        parent_id: int | None,
        round: int,
        metrics: Mapping[str, Any] | None,
    ) -> m.PolicyVersion:
        if parent_id is not None:
            parent = self.get_row(s, m.PolicyVersion, parent_id, "parent policy version")
            if parent.project_id != proj.id:
                raise StoreInputError(
                    f"parent policy version {parent_id} belongs to project "
                    f"{parent.project_id}, not {proj.name!r}"
                )
        row = m.PolicyVersion(
            project_id=proj.id,
            checkpoint_path=checkpoint_path,
            checkpoint_sha256=checkpoint_sha256,
            parent_id=parent_id,
            round=int(round),
            metrics=dict(metrics or {}),
            created_at=self.now(),
        )
        s.add(row)
        s.flush()
        return row

    def get_policy_version(self, version_id: int) -> PolicyVersionInfo:
        """A policy version by id.

        Raises:
            NotFoundError: no such version.
        """
        with self.session() as s:
            return PolicyVersionInfo.of(self.get_row(s, m.PolicyVersion, version_id, "policy version"))

    def latest_policy_version(self, project: Any) -> PolicyVersionInfo | None:
        """The most recently registered policy version of a project, or None."""
        with self.session() as s:
            proj = self.project_row(s, project)
            row = s.scalars(
                select(m.PolicyVersion)
                .where(m.PolicyVersion.project_id == proj.id)
                .order_by(m.PolicyVersion.id.desc())
                .limit(1)
            ).first()
            return None if row is None else PolicyVersionInfo.of(row)

    def list_policy_versions(self, project: Any) -> list[PolicyVersionInfo]:
        """All policy versions of a project, oldest first."""
        with self.session() as s:
            proj = self.project_row(s, project)
            rows = s.scalars(
                select(m.PolicyVersion)
                .where(m.PolicyVersion.project_id == proj.id)
                .order_by(m.PolicyVersion.id)
            )
            return [PolicyVersionInfo.of(r) for r in rows]

    # ------------------------------------------------------------------ clips

    def add_clip(
        self,
        policy_version_id: int,
        *,
        segment_path: str,
        length: int,
        fps: float,
        reset_seed: int | None = None,
        segment_sha256: str | None = None,
        video_path: str | None = None,
        video_sha256: str | None = None,
        gt_return: float | None = None,
        gt_success: bool | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> ClipRecord:
        """Register a clip whose files are already in the artifact directory.

        Args:
            policy_version_id: the policy that produced the segment.
            segment_path: ``.npz`` with observations (L, Do), actions (L, Da),
                rewards (L,), relative to the artifact directory.
            length: L, environment steps.
            fps: video playback rate, > 0.
            reset_seed: seed of ``env.reset`` the rollout started from (None for
                imported segments, which have no reset).
            segment_sha256 / video_sha256: hashes; computed from the files when omitted.
            gt_return / gt_success: ground truth, kept from annotators.
            meta: JSON-serialisable provenance.

        Raises:
            NotFoundError: unknown policy version.
            ArtifactPathError / ArtifactIntegrityError: bad path or missing file.
            StoreInputError: length ≤ 0 or fps ≤ 0.
        """
        return self.add_clips(
            [
                dict(
                    policy_version_id=policy_version_id,
                    segment_path=segment_path,
                    length=length,
                    fps=fps,
                    reset_seed=reset_seed,
                    segment_sha256=segment_sha256,
                    video_path=video_path,
                    video_sha256=video_sha256,
                    gt_return=gt_return,
                    gt_success=gt_success,
                    meta=meta,
                )
            ]
        )[0]

    def add_clips(self, clips: Sequence[Mapping[str, Any]]) -> list[ClipRecord]:
        """Register many clips in one transaction; each mapping takes :meth:`add_clip`'s
        keyword arguments (``policy_version_id`` included). Raises as :meth:`add_clip`."""
        prepared = [self._prepare_clip(c) for c in clips]
        with self.session(write=True) as s:
            return [ClipRecord.of(r) for r in self._insert_clips(s, prepared)]

    def _prepare_clip(self, clip: Mapping[str, Any]) -> dict[str, Any]:
        """Validate one clip's fields and hash its files (outside any transaction)."""
        c = dict(clip)
        if c.get("length", 0) <= 0 or c.get("fps", 0) <= 0:
            raise StoreInputError(
                f"clip length and fps must be > 0, got length={c.get('length')!r}, "
                f"fps={c.get('fps')!r}"
            )
        for key in ("segment", "video"):
            path = c.get(f"{key}_path")
            if path is None:
                continue
            if c.get(f"{key}_sha256") is None:
                c[f"{key}_sha256"] = self.artifacts.sha256(path)
            c[f"{key}_path"] = normalize_relpath(path)
        c["meta"] = dict(c.get("meta") or {})
        return c

    def _insert_clips(self, s: Session, prepared: Sequence[Mapping[str, Any]]) -> list[m.Clip]:
        version_ids = {c["policy_version_id"] for c in prepared}
        found = set(s.scalars(select(m.PolicyVersion.id).where(m.PolicyVersion.id.in_(version_ids))))
        if version_ids - found:
            raise NotFoundError(f"policy version(s) {sorted(version_ids - found)} not found")
        now = self.now()
        rows = [m.Clip(created_at=now, **c) for c in prepared]
        s.add_all(rows)
        s.flush()
        return rows

    def get_clip(self, clip_id: int) -> ClipRecord:
        """Everything about a clip, ground truth included (not for annotator pages).

        Raises:
            NotFoundError: no such clip.
        """
        with self.session() as s:
            return ClipRecord.of(self.get_row(s, m.Clip, clip_id, "clip"))
