"""Who is labelling: the annotator of a browser session, in the project's identity mode.

A project is in one of two modes (:attr:`fkpd.store.ProjectInfo.identity`):

* ``open`` — annotators type their name (kept in the URL as ``?annotator=NAME``); anyone
  who knows a name answers as that person. For demos.
* ``invite`` — the default for new projects: the admin creates an invite link per
  annotator (the Rounds page, or ``fkpd annotators invite NAME --project P``), which
  carries a random token (``?token=...``); the store keeps only the token's sha256. The
  app maps the token to its annotator on every rerun, so a revoked link stops working at
  once. A name in the URL is ignored and creates nothing.

Either way the store takes an answer only for a pair leased to that annotator in that
project (:meth:`fkpd.store.Store.answer`). Streamlit's ``st.login`` (OIDC) can be a third
mode where an identity provider exists; see the README.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fkpd.store import AnnotatorInfo, InvalidTokenError, InviteInfo, ProjectInfo, Store
from fkpd.studio.auth import clean_annotator_name
from fkpd.studio.errors import StudioError

OPEN, INVITE = "open", "invite"


def invite_link(base_url: str, token: str) -> str:
    """The link an invited annotator opens: ``<base_url>/?token=<token>``.

    Args:
        base_url: the app's address as annotators reach it, e.g. ``http://host:8501``.
    """
    return f"{base_url.rstrip('/')}/?{urlencode({'token': token})}"


def create_invite(store: Store, project: ProjectInfo, name: str) -> InviteInfo:
    """A new invite link's token for the annotator called ``name`` (registered if new).

    Returns:
        The invite with its ``token`` (shown once; the store keeps only its hash).

    Raises:
        StudioError: an empty or over-long name, or one with control characters.
    """
    return store.create_invite(project.id, clean_annotator_name(name))


def annotator_from_token(store: Store, project: ProjectInfo, token: str | None) -> AnnotatorInfo:
    """The annotator an invite link speaks for, in ``project``.

    Raises:
        StudioError: no token, or a token that is unknown, of another project, or revoked.
    """
    if not token:
        raise StudioError("This project takes answers by invitation: open the invite link the project's admin "
                          "gave you.")
    try:
        return store.annotator_for_token(project.id, token)
    except InvalidTokenError as exc:
        raise StudioError(f"This invite link does not work: {exc}.") from None


def annotator_from_name(store: Store, project: ProjectInfo, name: str | None) -> AnnotatorInfo:
    """The annotator called ``name`` in an ``open`` project, registered if new.

    Raises:
        StudioError: the project is in ``invite`` mode (a name is not an identity there),
            or the name is empty, too long, or has control characters.
    """
    if project.identity != OPEN:
        raise StudioError("This project takes answers by invitation only; a name in the link is not enough. Ask "
                          "the project's admin for your invite link.")
    return store.get_or_create_annotator(clean_annotator_name(name))


__all__ = ["INVITE", "OPEN", "annotator_from_name", "annotator_from_token", "create_invite", "invite_link"]
