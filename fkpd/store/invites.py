"""Invite links: who an annotator is, in projects whose identity mode is ``invite``.

:class:`InvitesMixin` is part of :class:`fkpd.store.Store`.

An invite is a random token (:func:`secrets.token_urlsafe`, 32 bytes) handed out once,
inside a link (``…/?token=<token>``); the store keeps only its sha256, so a copy of the
database does not hand out working links. :meth:`~InvitesMixin.annotator_for_token` maps a
token back to its annotator, for one project, unless the invite was revoked. Creating an
invite registers the annotator (by name) if new; nothing else does in invite mode, so
opening a link with a made-up name or token creates nothing.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fkpd.store import models as m
from fkpd.store.core import StoreCore, clean_name
from fkpd.store.errors import InvalidTokenError, NotFoundError, StoreInputError
from fkpd.store.views import AnnotatorInfo, InviteInfo

#: Bytes of randomness in a token (its URL-safe text is 43 characters).
TOKEN_BYTES = 32
#: Longest text accepted as a token before hashing (anything longer is not one of ours).
MAX_TOKEN_LEN = 256


def token_sha256(token: str) -> str:
    """Hex sha256 of a token's UTF-8 text: what the ``invites`` table stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class InvitesMixin(StoreCore):
    """Invite links of projects (part of :class:`fkpd.store.Store`; see the module docstring)."""

    def create_invite(self, project: Any, annotator: str) -> InviteInfo:
        """Create an invite link's token for ``annotator`` (a name; the annotator is
        registered if new) in ``project``.

        Returns:
            The invite, with ``token`` set: show it once (the store keeps only its hash).
            Earlier invites of the same annotator stay valid until revoked.

        Raises:
            NotFoundError: unknown project.
            StoreInputError: empty or over-long annotator name.
        """
        name = clean_name(annotator, "annotator")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = self.now()
        with self.session(write=True) as s:
            proj = self.project_row(s, project)
            table = m.Annotator.__table__
            s.execute(
                self.insert(table)
                .values(name=name, is_admin=False, created_at=now)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            ann = self.annotator_row(s, name)
            row = m.Invite(project_id=proj.id, annotator_id=ann.id, token_sha256=token_sha256(token),
                           created_at=now, revoked_at=None)
            s.add(row)
            s.flush()
            return self._invite_info(row, ann.name, token)

    def annotator_for_token(self, project: Any, token: str) -> AnnotatorInfo:
        """The annotator an invite token speaks for in ``project``.

        Raises:
            InvalidTokenError: not a token of this project, or revoked (the message says
                to ask the project's admin for a new link).
            NotFoundError: unknown project.
        """
        refused = InvalidTokenError(
            "this invite link is not valid for this project (mistyped, or revoked); ask the project's admin "
            "for a new link"
        )
        if not isinstance(token, str) or not token.strip() or len(token) > MAX_TOKEN_LEN:
            raise refused
        digest = token_sha256(token.strip())
        with self.session() as s:
            proj = self.project_row(s, project)
            row = s.scalars(select(m.Invite).where(m.Invite.token_sha256 == digest)).first()
            if row is None or row.project_id != proj.id or row.revoked_at is not None:
                raise refused
            return AnnotatorInfo.of(self.get_row(s, m.Annotator, row.annotator_id, "annotator"))

    def list_invites(self, project: Any, *, include_revoked: bool = True) -> list[InviteInfo]:
        """The project's invites, oldest first (tokens are never returned).

        Raises:
            NotFoundError: unknown project.
        """
        with self.session() as s:
            proj = self.project_row(s, project)
            query = (
                select(m.Invite, m.Annotator.name)
                .join(m.Annotator, m.Annotator.id == m.Invite.annotator_id)
                .where(m.Invite.project_id == proj.id)
                .order_by(m.Invite.id)
            )
            if not include_revoked:
                query = query.where(m.Invite.revoked_at.is_(None))
            return [self._invite_info(row, name) for row, name in s.execute(query)]

    def revoke_invites(self, project: Any, annotator: Any = None, *, invite_id: int | None = None) -> int:
        """Revoke invites of ``project``: every valid invite of ``annotator`` (a name, id
        or :class:`AnnotatorInfo`), or the one invite ``invite_id``. A revoked link stops
        working at the page's next rerun; answers already stored are kept.

        Returns:
            How many invites were revoked now (0 if they already were).

        Raises:
            StoreInputError: neither or both of ``annotator`` and ``invite_id`` given.
            NotFoundError: unknown project, annotator or invite (of this project).
        """
        if (annotator is None) == (invite_id is None):
            raise StoreInputError("give either annotator or invite_id to revoke_invites")
        now = self.now()
        with self.session(write=True) as s:
            proj = self.project_row(s, project)
            where = [m.Invite.project_id == proj.id, m.Invite.revoked_at.is_(None)]
            if invite_id is not None:
                self._project_invite(s, proj, invite_id)
                where.append(m.Invite.id == invite_id)
            else:
                where.append(m.Invite.annotator_id == self.annotator_row(s, annotator).id)
            return s.execute(update(m.Invite).where(*where).values(revoked_at=now)).rowcount or 0

    @staticmethod
    def _project_invite(s: Session, proj: m.Project, invite_id: int) -> m.Invite:
        row = s.get(m.Invite, invite_id) if isinstance(invite_id, int) and not isinstance(invite_id, bool) else None
        if row is None or row.project_id != proj.id:
            raise NotFoundError(f"invite {invite_id!r} not found in project {proj.name!r}")
        return row

    @staticmethod
    def _invite_info(row: m.Invite, annotator: str, token: str | None = None) -> InviteInfo:
        return InviteInfo(row.id, row.project_id, row.annotator_id, annotator, row.created_at, row.revoked_at,
                          token)
