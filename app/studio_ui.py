"""What every page shares: the store, the project, the local worker, the sidebar.

Resources live in ``st.cache_resource`` (one per server process); the annotator's name
and the admin sign-in live in ``st.session_state`` (one per browser tab), and the name
also in the URL (``?annotator=...``) so a reload remembers it.
"""

from __future__ import annotations

import atexit
import logging
from dataclasses import dataclass

import streamlit as st

from fkpd.store import AnnotatorInfo, ProjectInfo, Store
from fkpd.studio import AdminAuth, StudioConfig, StudioError, clean_annotator_name, open_project, start_local_worker

log = logging.getLogger("fkpd.app")


@dataclass
class Studio:
    cfg: StudioConfig
    store: Store
    project: ProjectInfo
    auth: AdminAuth
    worker: object | None  # subprocess.Popen of the local worker, or None


@st.cache_resource(show_spinner="Opening the preference store…")
def _studio() -> Studio:
    cfg = StudioConfig.from_env()
    store = cfg.open_store()
    project, job = open_project(store, cfg)
    try:
        secret = st.secrets.get("admin_password")
    except Exception:  # noqa: BLE001 - no secrets.toml is the normal case
        secret = None
    auth = AdminAuth(secret)
    print(f"FKPD Studio: project {project.name!r} ({project.task_id}) on {store.backend}, "
          f"artifacts in {store.artifact_dir}", flush=True)
    if job is not None:
        print(f"FKPD Studio: queued the bootstrap job {job.id} (data, behaviour cloning, first batch)", flush=True)
    where = "Streamlit secrets" if secret else auth.source
    print(f"FKPD Studio: admin password from {where}"
          + ("" if secret or auth.source == "FKPD_ADMIN_PASSWORD" else f" (read it with: cat {auth.source})"),
          flush=True)
    worker = None
    if cfg.start_worker:
        worker = start_local_worker(cfg)
        atexit.register(worker.terminate)
        print(f"FKPD Studio: local worker started (pid {worker.pid}, log {cfg.worker_log})", flush=True)
    return Studio(cfg, store, project, auth, worker)


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


def is_admin() -> bool:
    return bool(st.session_state.get("is_admin"))


def sidebar(s: Studio) -> None:
    """Project, annotator, worker status and admin state."""
    with st.sidebar:
        st.markdown(f"**Project** `{s.project.name}`  \n**Task** `{s.project.task_id}`")
        name = st.session_state.get("annotator")
        if name:
            st.markdown(f"**Annotator** {name}")
            if st.button("Change name", key="change_name"):
                st.session_state.pop("annotator", None)
                st.query_params.pop("annotator", None)
                st.rerun()
        if s.worker is not None and s.worker.poll() is not None:
            st.warning(f"The local worker exited (code {s.worker.returncode}); rounds will not run. "
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
            if s.auth.check(pw):
                st.session_state["is_admin"] = True
                st.rerun()
            st.error("Wrong password. The admin password is set by FKPD_ADMIN_PASSWORD, by admin_password in "
                     ".streamlit/secrets.toml, or else is the token in labels/admin_token.")
    return False


def annotator_gate(s: Studio) -> AnnotatorInfo:
    """The annotator of this tab: asked once, then remembered (session and URL)."""
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
    return s.store.get_or_create_annotator(name)
