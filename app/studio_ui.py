"""What every page shares: the store, the project, the local worker, the sidebar.

Resources live in ``st.cache_resource`` (one per server process); the project, the
annotator and the admin sign-in live in ``st.session_state`` (one per browser tab).

The project a tab works on is chosen by the sidebar's picker or by the link
(``?project=NAME``, kept in the URL on every page beside ``?annotator=`` or ``?token=``);
without one, the project the app was started with (``FKPD_PROJECT``/``FKPD_TASK``).
Switching project clears the tab's page state (forms, exports, the pair player), keeps
the typed name (annotators are shared by all projects) and the admin sign-in (one admin
password per app), and keeps each project's invite token apart: an invite is valid in
its own project only. Who the annotator is
depends on the project's identity mode (:mod:`fkpd.studio.identity`): in ``invite`` mode
the invite link's token (``?token=...``), checked against the store on every rerun; in
``open`` mode the typed name, also kept in the URL (``?annotator=...``) so a reload
remembers it.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
from dataclasses import dataclass, field

import streamlit as st

from fkpd.store import AnnotatorInfo, ProjectInfo, Store
from fkpd.studio import AdminAuth, StudioConfig, StudioError, clean_annotator_name, open_project, start_local_workers
from fkpd.studio.identity import OPEN, annotator_from_name, annotator_from_token
from fkpd.studio.projects import project_for_token, resolve_project

log = logging.getLogger("fkpd.app")


@dataclass
class Studio:
    cfg: StudioConfig
    store: Store
    project: ProjectInfo  # the project this tab works on (studio()); the app's default in the cached resource
    auth: AdminAuth  # one admin password for the app, every project
    workers: list = field(default_factory=list)  # subprocess.Popen of the local workers this app started
    worker_pids: tuple[int, ...] = ()  # local workers started before the app (make run: fkpd.studio.serve)
    projects: tuple[ProjectInfo, ...] = ()  # every project of the store, as read for this run (studio())

    @property
    def local_workers(self) -> bool:
        """Whether workers on this machine run the jobs (so a dataset path can be checked here)."""
        return bool(self.workers or self.worker_pids)

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


def _page_without_entry_script() -> bool:
    """Whether Streamlit runs a page alone, without ``streamlit_app.py`` (and its sidebar).

    Streamlit starts each server process in its old multipage mode because ``app/pages/``
    exists (``PagesManager.uses_pages_directory``) and keeps it until a run calls
    ``st.navigation``: a first visit to ``/rounds?project=...`` runs the page alone (so
    does every AppTest run after the first). Then :func:`studio` draws the picker and the
    sidebar itself, and the flag is cleared, so the next run goes through the entry script.
    """
    try:
        from streamlit.runtime.pages_manager import PagesManager
    except ImportError:  # a Streamlit without it has no such mode
        return False
    if getattr(PagesManager, "uses_pages_directory", False):
        PagesManager.uses_pages_directory = False
        return True
    return False


def studio() -> Studio:
    """The shared resources, with the project this tab works on (:func:`_this_tab`); a
    configuration error stops the page with its message."""
    alone = _page_without_entry_script()
    try:
        base = _studio()
    except StudioError as exc:
        st.error(f"FKPD Studio cannot start: {exc}")
        st.stop()
    except Exception as exc:  # noqa: BLE001 - show it instead of a blank page
        st.error(f"FKPD Studio cannot start: {type(exc).__name__}: {exc}")
        st.stop()
    s = _this_tab(base)
    if alone:
        project_picker(s)
        sidebar(s)
    return s


PROJECT_KEY = "project"  # session: the project this tab works on
PICKER_KEY = "project_picker"
_TOKENS_KEY = "_invite_tokens"  # session: {project name: invite token} of the links opened in this tab
#: Session keys that survive a project switch; every other (page state) is cleared.
_KEEP_ON_SWITCH = {PROJECT_KEY, PICKER_KEY, _TOKENS_KEY, "is_admin", "_project_problem"}


def _this_tab(base: Studio) -> Studio:
    """``base`` working on the project this tab asks for: ``?project=`` in the URL, else
    the one this tab had, else the project of an invite link's token, else the app's
    default. Keeps ``?project=`` (and the annotator's ``?annotator=`` or ``?token=``) in
    the URL, so links and page switches keep them. Idempotent within a run."""
    projects = tuple(base.store.list_projects())
    requested = st.query_params.get("project") or st.session_state.get(PROJECT_KEY)
    token = st.query_params.get("token")
    if not requested and token:  # an invite link without ?project= (fkpd annotators invite before issue #16)
        found = project_for_token(base.store, projects, token)
        requested = found.name if found is not None else None
    try:
        project, problem = resolve_project(list(projects), requested, base.cfg.project)
    except StudioError as exc:
        st.error(str(exc))
        st.stop()
    if problem:
        st.session_state["_project_problem"] = problem
    previous = st.session_state.get(PROJECT_KEY)
    if previous is not None and previous != project.name:
        _switch_project(previous, project.name)
    st.session_state[PROJECT_KEY] = project.name
    if st.query_params.get("project") != project.name:
        st.query_params["project"] = project.name
    if st.session_state.get("invited") and st.session_state.get("invite_token") and not st.query_params.get("token"):
        st.query_params["token"] = st.session_state["invite_token"]
    elif (not st.session_state.get("invited") and st.session_state.get("annotator")
          and not st.query_params.get("annotator")):
        st.query_params["annotator"] = st.session_state["annotator"]
    return dataclasses.replace(base, project=project, projects=projects)


def _switch_project(previous: str, new: str) -> None:
    """This tab moves from project ``previous`` to ``new``: its page state goes, a typed
    name stays, and the invite token of ``previous`` is put aside (and ``new``'s own
    brought back, if this tab opened one)."""
    tokens = st.session_state.setdefault(_TOKENS_KEY, {})
    invited = bool(st.session_state.get("invited"))
    if invited and st.session_state.get("invite_token"):
        tokens[previous] = st.session_state["invite_token"]
    keep = _KEEP_ON_SWITCH | (set() if invited else {"annotator"})
    for key in list(st.session_state.keys()):
        if key not in keep:
            del st.session_state[key]
    st.query_params.pop("token", None)
    if tokens.get(new):
        st.query_params["token"] = tokens[new]
    if invited:
        st.query_params.pop("annotator", None)


def _picked() -> None:
    st.query_params["project"] = st.session_state[PICKER_KEY]


def project_picker(s: Studio) -> None:
    """The sidebar's project picker (every project of the store, for everyone); a pick
    reruns the current page on that project and puts it in the URL."""
    with st.sidebar:
        problem = st.session_state.pop("_project_problem", None)
        if problem:
            st.warning(problem, icon=":material/link_off:")
        tasks = {p.name: p.task_id for p in s.projects} or {s.project.name: s.project.task_id}
        if st.session_state.get(PICKER_KEY) != s.project.name:
            st.session_state[PICKER_KEY] = s.project.name
        st.selectbox("Project", list(tasks), key=PICKER_KEY, on_change=_picked,
                     format_func=lambda name: f"{name} · {tasks.get(name, '')}",
                     help="Every project of this app. The link (?project=NAME) opens the same project.")


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
        st.markdown(f"**Task** `{s.project.task_id}`")
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
