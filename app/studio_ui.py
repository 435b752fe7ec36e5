"""What every page shares: the store, the project, the local worker, the sidebar.

Resources live in ``st.cache_resource`` (one per server process); the annotator and the
admin sign-in live in ``st.session_state`` (one per browser tab). Who the annotator is
depends on the project's identity mode (:mod:`fkpd.studio.identity`): in ``invite`` mode
the invite link's token (``?token=...``), checked against the store on every rerun; in
``open`` mode the typed name, also kept in the URL (``?annotator=...``) so a reload
remembers it.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass, field

import streamlit as st

from fkpd.store import AnnotatorInfo, ProjectInfo, Store
from fkpd.studio import AdminAuth, StudioConfig, StudioError, clean_annotator_name, open_project, start_local_workers
from fkpd.studio.identity import OPEN, annotator_from_name, annotator_from_token

log = logging.getLogger("fkpd.app")


@dataclass
class Studio:
    cfg: StudioConfig
    store: Store
    project: ProjectInfo
    auth: AdminAuth
    workers: list = field(default_factory=list)  # subprocess.Popen of the local workers this app started
    worker_pids: tuple[int, ...] = ()  # local workers started before the app (make run: fkpd.studio.serve)

    def exited_worker(self) -> str | None:
        """``"pid P (code C)"`` of a local worker that exited, or None while all run."""
        for w in self.workers:
            if w.poll() is not None:
                return f"pid {w.pid}, code {w.returncode}"
        for pid in self.worker_pids:
            try:
                with open(f"/proc/{pid}/stat") as fh:  # a dead child of `make run` is a zombie until reaped
                    gone = fh.read().rsplit(")", 1)[-1].split()[0] in ("Z", "X")
            except OSError:
                gone = not _pid_exists(pid)
            if gone:
                return f"pid {pid}"
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_to_terminal() -> None:
    """Show the ``fkpd`` loggers' messages (refused answers, pairs set aside) in the app's
    terminal, with time and source, unless something configured them already."""
    logger = logging.getLogger("fkpd")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


@st.cache_resource(show_spinner="Opening the preference store…")
def _studio() -> Studio:
    _log_to_terminal()
    cfg = StudioConfig.from_env()
    store = cfg.open_store()
    project, job = open_project(store, cfg)
    try:
        secret = st.secrets.get("admin_password")
    except Exception:  # noqa: BLE001 - no secrets.toml is the normal case
        secret = None
    auth = AdminAuth(secret)
    print(f"FKPD Studio: project {project.name!r} ({project.task_id}) on {store.backend}, "
          f"artifacts in {store.artifact_location}", flush=True)
    if job is not None:
        print(f"FKPD Studio: queued the bootstrap job {job.id} (data, behaviour cloning, first batch)", flush=True)
    if project.identity != "open":
        print(f"FKPD Studio: annotators come through invite links; create one with: fkpd annotators invite NAME "
              f"--project {project.name} (or on the Rounds page, as admin)", flush=True)
    where = "Streamlit secrets" if secret else auth.source
    print(f"FKPD Studio: admin password from {where}"
          + ("" if secret or auth.source == "FKPD_ADMIN_PASSWORD" else f" (read it with: cat {auth.source})"),
          flush=True)
    workers = []
    if cfg.start_worker:  # `streamlit run` alone; `make run` started them already (fkpd.studio.serve)
        workers = start_local_workers(cfg)
        for w in workers:
            atexit.register(w.terminate)
        print(f"FKPD Studio: local workers started (pids {', '.join(str(w.pid) for w in workers)}, log "
              f"{cfg.worker_log})", flush=True)
    pids = tuple(int(p) for p in os.environ.get("FKPD_LOCAL_WORKERS", "").split(",") if p.strip().isdigit())
    return Studio(cfg, store, project, auth, workers, pids)


def studio() -> Studio:
    """The shared resources; a configuration error stops the page with its message."""
    try:
        return _studio()
    except StudioError as exc:
        st.error(f"FKPD Studio cannot start: {exc}")
        st.stop()
    except Exception as exc:  # noqa: BLE001 - show it instead of a blank page
        st.error(f"FKPD Studio cannot start: {type(exc).__name__}: {exc}")
        st.stop()


def _show_annotator(name: str) -> None:
    st.markdown("**Annotator**")
    st.text(name)  # plain text: a name is never rendered as Markdown (links, images)


def _name_in_sidebar(name: str) -> None:
    """Show the annotator in the sidebar now if the sidebar (drawn before the page) did
    not know it yet: the first run of a page that learnt who is labelling."""
    if st.session_state.get("_sidebar_annotator") != name:
        st.session_state["_sidebar_annotator"] = name
        with st.sidebar:
            _show_annotator(name)


def is_admin() -> bool:
    return bool(st.session_state.get("is_admin"))


def sidebar(s: Studio) -> None:
    """Project, annotator, worker status and admin state."""
    with st.sidebar:
        st.markdown(f"**Project** `{s.project.name}`  \n**Task** `{s.project.task_id}`")
        name = st.session_state.get("annotator")
        st.session_state["_sidebar_annotator"] = name
        if name:
            _show_annotator(name)
            if not st.session_state.get("invited") and st.button("Change name", key="change_name"):
                st.session_state.pop("annotator", None)
                st.query_params.pop("annotator", None)
                st.rerun()
        exited = s.exited_worker()
        if exited:
            st.warning(f"A local worker exited ({exited}); rounds and new pairs will not come. "
                       f"See {s.cfg.worker_log} and restart `make run`.")
        if is_admin():
            st.markdown("**Admin** signed in")
            if st.button("Sign out", key="admin_out"):
                st.session_state["is_admin"] = False
                st.rerun()


def admin_sign_in(s: Studio) -> bool:
    """A sign-in form for pages with admin actions; True when this tab is signed in."""
    if is_admin():
        return True
    with st.form("admin_form", clear_on_submit=True):
        st.markdown("**Admin sign-in** — needed to start rounds or change settings.")
        pw = st.text_input("Admin password", type="password", key="admin_pw")
        if st.form_submit_button("Sign in"):
            attempt = s.auth.attempt(pw)  # limited: too many wrong guesses pause sign-in, with a growing delay
            if attempt.ok:
                st.session_state["is_admin"] = True
                st.rerun()
            st.error(f"{attempt.message} The admin password is set by FKPD_ADMIN_PASSWORD, by admin_password in "
                     ".streamlit/secrets.toml, or else is the token in labels/admin_token.")
    return False


def project_identity(s: Studio) -> str:
    """The project's identity mode now (an admin may switch it while the app runs)."""
    return s.store.get_project(s.project.id).identity


def annotator_gate(s: Studio) -> AnnotatorInfo:
    """The annotator of this tab, in the project's identity mode; stops the page until known."""
    if project_identity(s) != OPEN:
        return _invited(s)
    st.session_state.pop("invited", None)
    name = st.session_state.get("annotator") or st.query_params.get("annotator")
    if name:
        try:
            name = clean_annotator_name(name)
        except StudioError:
            name = None
    if not name:
        st.subheader("Who is labelling?")
        with st.form("annotator_form", border=False):
            typed = st.text_input("Your name", key="annotator_input", placeholder="e.g. ada",
                                  help="Every answer is stored under this name.")
            if st.form_submit_button("Start labelling", type="primary"):
                try:
                    name = clean_annotator_name(typed)
                except StudioError as exc:
                    st.error(str(exc))
                    st.stop()
                st.session_state["annotator"] = name
                st.query_params["annotator"] = name
                st.rerun()
        st.stop()
    st.session_state["annotator"] = name
    if st.query_params.get("annotator") != name:
        st.query_params["annotator"] = name
    annotator = annotator_from_name(s.store, s.store.get_project(s.project.id), name)
    _name_in_sidebar(annotator.name)
    return annotator


def _invited(s: Studio) -> AnnotatorInfo:
    """Invite mode: the annotator of the link's token (kept in the session and the URL),
    checked on every rerun so a revoked link stops at once. Creates nothing."""
    token = st.query_params.get("token") or st.session_state.get("invite_token")
    try:
        annotator = annotator_from_token(s.store, s.project, token)
    except StudioError as exc:
        for key in ("annotator", "invite_token", "invited"):
            st.session_state.pop(key, None)
        st.subheader("Invitation needed")
        st.warning(str(exc), icon=":material/key:")
        st.stop()
    st.session_state.update(invite_token=token, invited=True, annotator=annotator.name)
    if st.query_params.get("token") != token:
        st.query_params["token"] = token
    st.query_params.pop("annotator", None)
    _name_in_sidebar(annotator.name)
    return annotator
