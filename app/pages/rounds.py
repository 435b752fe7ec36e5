"""Rounds page: the current policy, alignment rounds (admin), live progress, history."""

import streamlit as st

from fkpd.studio import (
    StudioError,
    active_training_job,
    auto_round_state,
    current_version,
    enqueue_round,
    error_headline,
    job_summary,
    describe_comparison,
    latest_training_job,
    remembered_round_params,
    roll_back,
    round_defaults,
    rounds_history,
    served_versions,
    set_auto_rounds,
    top_up_state,
)
from fkpd.studio.params import MAX_CANDIDATE_FACTOR, QUERY_SELECTIONS
from fkpd.studio.topup import batch_settings
from studio_ui import admin_sign_in, is_admin, studio

s = studio()
defaults = round_defaults()
st.title("Alignment rounds")

latest = current_version(s.store, s.project)
n_labels = s.store.count_training_pairs(s.project.id)
answered, total = s.store.batch_progress(s.project.id)
c1, c2, c3, c4 = st.columns(4)
c1.metric("Current policy", "none yet" if latest is None else f"v{latest.id} (round {latest.round})")
sr = None if latest is None else latest.metrics.get("success_rate")
c2.metric("Success rate", "—" if sr is None else f"{100 * sr:.0f}%")
c3.metric("Comparisons to train on", n_labels)
c4.metric("Latest batch", f"{answered}/{total}")
vs_parent = None if latest is None else latest.metrics.get("vs_parent")
if vs_parent and vs_parent.get("worse"):
    st.warning(f"The current policy v{latest.id} evaluated worse than its parent v{latest.parent_id}: "
               f"{describe_comparison(vs_parent, 'its parent')}. Labelling continues on it until an admin rolls "
               "it back.", icon=":material/trending_down:")
    if is_admin() and st.button(f"Roll back: serve v{latest.parent_id} again", key="roll_back",
                                help="v{} stays in the store and the history (marked rolled back); its comparisons "
                                     "keep training later rounds, which start from the parent.".format(latest.id)):
        try:
            served = roll_back(s.store, s.project)
            st.success(f"v{served.id} is served again.")
            st.rerun()
        except StudioError as exc:
            st.error(str(exc))

st.subheader("Run an alignment round")
if not admin_sign_in(s):
    st.info("Only an admin can start a round.", icon=":material/lock:")
else:
    with st.form("round_form"):
        st.write("FKPD trains the current policy on every comparison so far, evaluates it, and renders the "
                 "next labelling batch from it.")
        with st.expander("Parameters", expanded=False):
            objectives = ["additive", "in_sigmoid", "filtered_bc"]
            objective = st.selectbox(
                "Objective", objectives, index=objectives.index(defaults["objective"]), key="objective",
                help="additive: L_DPO + λ·regulariser (the FKPD paper's equation); in_sigmoid: the BC term inside "
                     "the sigmoid, weighted by c_bc (the form of the paper's released code); filtered_bc: "
                     "behaviour cloning on the preferred clips only (a baseline)")
            regularizer = st.selectbox("Regulariser (additive)", ["forward", "reverse", "none"],
                                       help="forward: FKPD (BC loss on the offline data); reverse: DPOK-style "
                                            "KL on the policy's own samples; none: Diffusion-DPO only")
            beta = st.number_input("β (DPO temperature)", min_value=0.001, value=float(defaults["beta"]))
            lam = st.number_input("λ (regulariser weight, additive)", min_value=0.0, value=float(defaults["lam"]))
            c_bc = st.number_input("c_bc (BC weight inside the sigmoid, in_sigmoid)", min_value=0.0,
                                   value=float(defaults["c_bc"]))
            steps = st.number_input("Steps", min_value=1, max_value=100_000, value=int(defaults["steps"]), step=50)
        with st.expander("Advanced: label source and query selection", expanded=False):
            current, _ = batch_settings(s.store, s.project)
            dataset_share = st.number_input(
                "Dataset share", min_value=0.0, max_value=1.0, step=0.1, format="%.2f", key="dataset_share",
                value=float(remembered_round_params(s.store, s.project).get("dataset_share", current.dataset_share)),
                help="fraction of the next batch's pairs that are two segments of the offline dataset (different "
                     "episodes, replayed from their reset seeds to show them) instead of two rollouts of the current "
                     "policy; 0: current-policy pairs only. Needs a dataset with reset seeds that replays exactly "
                     "(generated data does; D4RL files do not): otherwise the round stops before training and says "
                     "so. Top-ups are always current-policy pairs.")
            query_selection = st.selectbox(
                "Query selection", list(QUERY_SELECTIONS), index=list(QUERY_SELECTIONS).index(current.query_selection),
                key="query_selection",
                help="which pairs the next batches and top-ups show: uniform (every pair rolled out); disagreement "
                     "(the pairs the current policy is least sure of, by its implicit reward; Christiano et al. "
                     "2017, PEBBLE 2021); diversity (the pairs whose two clips visit the most different states). "
                     "Kept for later rounds and top-ups.")
            candidate_factor = st.number_input(
                "Candidate factor", min_value=1, max_value=MAX_CANDIDATE_FACTOR, value=int(current.candidate_factor),
                step=1, key="candidate_factor",
                help="with disagreement or diversity: candidate pairs rolled out per pair shown (only the shown pairs "
                     "are rendered)")
        if st.form_submit_button("Run alignment round", type="primary"):
            try:
                job = enqueue_round(s.store, s.project, {"objective": objective, "regularizer": regularizer,
                                                         "beta": float(beta), "lam": float(lam),
                                                         "c_bc": float(c_bc), "steps": int(steps),
                                                         "dataset_share": float(dataset_share),
                                                         "query_selection": query_selection,
                                                         "candidate_factor": int(candidate_factor)})
                st.success(f"Queued alignment round (job {job.id}).")
            except StudioError as exc:
                st.error(str(exc))
    auto = auto_round_state(s.store, s.project)
    with st.form("auto_round_form"):
        st.write("**Automatic rounds**: start a round by itself once enough new comparisons (left, right or equal) "
                 "arrived since the latest version, with the objective, β, λ and steps of the last round started "
                 "here.")
        on = st.checkbox("Start rounds automatically", value=auto.enabled, key="auto_on")
        batch = next((v.metrics.get("bootstrap", {}).get("settings", {}).get("pairs_per_batch")
                      for v in served_versions(s.store, s.project) if v.round == 0), None)
        default_n = auto.every or int(batch or defaults["pairs_per_batch"])
        every = st.number_input("after this many new comparisons", min_value=1, max_value=100_000,
                                value=default_n, step=1, key="auto_every")
        if st.form_submit_button("Save automatic rounds"):
            try:
                set_auto_rounds(s.store, s.project, int(every) if on else 0)
                st.success(f"Automatic rounds on: a round after {int(every)} new comparisons." if on
                           else "Automatic rounds off: rounds start by hand.")
            except StudioError as exc:
                st.error(str(exc))


@st.fragment(run_every=1.5)
def live() -> None:
    auto = auto_round_state(s.store, s.project)
    supply = top_up_state(s.store, s.project)
    st.info(auto.describe(), icon=":material/autorenew:" if auto.enabled else ":material/pan_tool:")
    if supply is not None:
        st.caption(f"Pairs waiting for annotators: {supply.open_pairs} from v{supply.version.id} (kept at "
                   f"{supply.target} or more for {supply.active_annotators} active annotator(s) by top-up pairs).")
    job = active_training_job(s.store, s.project)
    if job is not None:
        st.progress(job.progress, text=job_summary(job))
        return
    last = latest_training_job(s.store, s.project)
    if last is None:
        st.caption("No round has run yet.")
    elif last.status == "failed":
        st.error(f"{job_summary(last)}: {error_headline(last)}", icon=":material/error:")
        with st.expander("Error details"):
            st.code(last.error or "", language="text")
        st.caption("Labelling continues on the current policy. Fix the cause and run the round again.")
    else:
        st.caption(job_summary(last))
    seen, now = st.session_state.get("_last_seen_job"), (last.id if last else None)
    st.session_state["_last_seen_job"] = now
    if seen is not None and seen != now:
        st.rerun(scope="app")  # a round finished: refresh the table and plots


st.subheader("Progress")
live()

st.subheader("History")
hist = rounds_history(s.store, s.project)
if hist.empty:
    st.caption("No policy version yet: the bootstrap (data, behaviour cloning, first batch) is still running.")
else:
    st.dataframe(hist, hide_index=True, width="stretch", column_config={
        "success_rate": st.column_config.NumberColumn("success rate", format="percent"),
        "implicit_acc": st.column_config.NumberColumn("implicit acc.", format="percent"),
        "implicit_acc_before": st.column_config.NumberColumn("implicit acc. before", format="percent"),
        "labels_used": st.column_config.NumberColumn("labels used"),
        "mean_return": st.column_config.NumberColumn("mean return", format="%.1f"),
        "reward_margin": st.column_config.NumberColumn("reward margin", format="%.3f"),
    })
    intents = [c for c in hist.columns if c.startswith("intent_")]
    plot = hist.set_index("round")[["success_rate", "implicit_acc", *intents]].astype(float)
    left, mid, right = st.columns(3)
    with left:
        st.caption("Success rate over rounds")
        st.line_chart(plot[["success_rate"]], y_label="success rate", x_label="round")
    with mid:
        st.caption("Implicit accuracy of each round's policy on its training comparisons")
        st.line_chart(plot[["implicit_acc"]], y_label="implicit accuracy", x_label="round")
    with right:
        st.caption("Intent scores of the evaluation episodes (higher: closer to the intent)")
        if intents:
            st.line_chart(plot[intents], y_label="intent score", x_label="round")


# ---- Report: one self-contained HTML file, the same as `fkpd report` -------------------------
from fkpd.studio.report import REPORT_EPISODES, report_bytes  # noqa: E402

st.subheader("Report")
st.caption("One HTML file to share, with nothing outside it: the history table and plots, label statistics, and "
           f"{REPORT_EPISODES} before/after episodes of the first version and the one served now (the Compare "
           "page's clips of those two when there are some, else rendered now: about a minute on a CPU). The same "
           "file as `fkpd report`.")
_report_key = f"report_html_{s.project.id}"
if st.button("Prepare report", key="prepare_report", disabled=latest is None):
    st.session_state.pop(_report_key, None)
    try:
        with st.spinner("Writing the report…"):
            st.session_state[_report_key] = report_bytes(s.store, s.project)
    except StudioError as exc:
        st.error(f"The report failed: {exc}", icon=":material/error:")
if st.session_state.get(_report_key):
    _blob = st.session_state[_report_key]
    st.download_button(f"Download report ({len(_blob) / 1e6:.2f} MB)", _blob, file_name=f"{s.project.name}-report.html",
                       mime="text/html", key="download_report")

# ---- Annotators: identity mode and invite links (admin) --------------------------------------
from urllib.parse import urlsplit  # noqa: E402

from fkpd.studio import StudioError as _StudioError  # noqa: E402
from fkpd.studio.identity import INVITE, OPEN, create_invite, invite_link  # noqa: E402
from studio_ui import is_admin  # noqa: E402

st.subheader("Annotators")
if not is_admin():
    st.info("Only an admin can manage who labels (sign in above).", icon=":material/lock:")
else:
    mode = s.store.get_project(s.project.id).identity
    modes = {INVITE: "Invite links only (each annotator gets a private link)",
             OPEN: "Open (anyone types a name; for demos)"}

    def _set_mode() -> None:
        s.store.update_project(s.project.id, identity=st.session_state["identity_mode"])

    st.radio("Who may label", list(modes), index=list(modes).index(mode), format_func=modes.get,
             key="identity_mode", on_change=_set_mode, horizontal=True)
    with st.form("invite_form", clear_on_submit=True):
        invitee = st.text_input("Annotator's name", key="invite_name", placeholder="e.g. ada")
        if st.form_submit_button("Create invite link"):
            try:
                invite = create_invite(s.store, s.project, invitee)
            except _StudioError as exc:
                st.error(str(exc))
            else:
                parts = urlsplit(st.context.url or "")
                base = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else "http://localhost:8501"
                st.session_state["new_invite"] = (invite.annotator, invite_link(base, invite.token))
    if "new_invite" in st.session_state:
        who, link = st.session_state["new_invite"]
        st.success("Invite link created. Send it to the annotator now: it is shown only once (the store keeps a "
                   "hash of it).", icon=":material/key:")
        st.text(f"for {who}:")
        st.code(link, language=None)
    invites = s.store.list_invites(s.project.id, include_revoked=False)
    if not invites:
        st.caption("No valid invite links.")
    for invite in invites:
        c1, c2, c3 = st.columns([3, 3, 1])
        c1.text(invite.annotator)
        c2.caption(f"created {invite.created_at:%Y-%m-%d %H:%M} UTC")
        if c3.button("Revoke", key=f"revoke_invite_{invite.id}"):
            s.store.revoke_invites(s.project.id, invite_id=invite.id)
            st.session_state.pop("new_invite", None)
            st.rerun()
