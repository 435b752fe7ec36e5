"""Label page: two clips side by side; Left / Right / Equal / Skip (← → ↓ S)."""

import streamlit as st

from fkpd.studio import LabelQuality, StudioError, auto_round_state, batch_caption, error_headline, job_summary, \
    latest_training_job, lease_for_display, record_answers, top_up_state
from fkpd.studio.config import TOP_UP
from fkpd.studio.identity import annotator_from_token
from pair_player import pair_player
from studio_ui import annotator_gate, studio

s = studio()
annotator = annotator_gate(s)
KEY = "pair_player"


def _store_answers() -> None:
    """Runs before the page script whenever the browser adds an answer."""
    answers = (st.session_state.get(KEY) or {}).get("answers") or []
    who = annotator
    if st.session_state.get("invited"):  # the invite may have been revoked since the page ran
        try:
            who = annotator_from_token(s.store, s.project, st.session_state.get("invite_token"))
        except StudioError as exc:
            st.session_state.setdefault("answer_problems", []).append(f"Your answers were not stored: {exc}")
            return
    recorded = st.session_state.setdefault("recorded_pairs", set())
    problems = record_answers(s.store, who, answers, recorded, project=s.project)
    st.session_state.setdefault("answer_problems", []).extend(problems)


# Everything an annotator needs fits 1280×800 without scrolling: a compact header, the
# instructions, one line with the progress and the keys, then the clips and the buttons.
st.markdown("<style>.stMainBlockContainer, .block-container {padding-top: 2.2rem;}</style>", unsafe_allow_html=True)
st.subheader("Which clip do you prefer?")
st.info(s.project.instructions or "Choose the clip whose behaviour you prefer.", icon=":material/assignment:")
for msg in st.session_state.pop("answer_problems", []):
    st.warning(msg)

# The pair on screen and two ahead: the player swaps to the next at once, and a slow
# rerun of this page (a round training on the same machine) does not leave it empty.
pairs, notices = lease_for_display(s.store, s.project, annotator, count=3)
for msg in notices:
    st.warning(msg, icon=":material/videocam_off:")
if pairs:
    st.caption(f"{batch_caption(s.store, s.project, pairs[0])} · Keys: ← left · → right · ↓ equal · S skip · "
               "R replay · the next pair is already loaded.")
    try:  # the current setting (an admin may change it on the Data page while the app runs)
        min_view = LabelQuality.of(s.store.get_project(s.project.id)).min_view_seconds
    except StudioError:
        min_view = LabelQuality().min_view_seconds
    pair_player([p.as_json() for p in pairs], on_answers=_store_answers, key=KEY, min_view_seconds=min_view)
else:
    # No player while nothing is open: its answers were stored by the callback already.

    # Every 2 s: each run leases and reads the job queue; with two pages waiting at 1 s the
    # app's process averaged ~60 % of a core during a bootstrap on 2 cores (issue #13).
    @st.fragment(run_every=2)
    def waiting() -> None:
        if s.store.lease_pairs(s.project.id, annotator.id, 1):
            st.rerun(scope="app")
        job = latest_training_job(s.store, s.project)
        top_up = next((j for j in s.store.jobs.list(s.project.id, status=("queued", "running"), limit=20)
                       if j.kind == TOP_UP), None)
        if job is not None and job.kind == "bootstrap" and job.status in ("queued", "running"):
            st.subheader("Nothing to label yet: the first batch is being prepared")
            st.progress(job.progress, text=job_summary(job))
        elif top_up is not None:
            st.subheader("More pairs are on the way")
            st.progress(top_up.progress, text=top_up.message or "waiting for the worker")
        elif job is not None and job.status in ("queued", "running"):
            st.subheader("Nothing to label right now: the next batch is being prepared")
            st.progress(job.progress, text=job_summary(job))
        elif job is not None and job.status == "failed" and top_up_state(s.store, s.project) is None:
            st.error(f"The last {job.kind.replace('_', ' ')} (job {job.id}) failed: {error_headline(job)}")
            st.caption("An admin can see the details on the Rounds page and start it again.")
        else:
            st.subheader("All pairs of this batch are labelled. Thank you!")
            auto = auto_round_state(s.store, s.project)
            if auto.enabled or top_up_state(s.store, s.project) is not None:
                st.write("More pairs appear here in a moment: the worker renders them from the current policy.")
            else:
                st.write("The next batch appears here when an admin runs an alignment round (Rounds page).")
        done, of = s.store.batch_progress(s.project.id)
        if of:
            st.caption(f"Latest batch: {done} of {of} answers.")

    waiting()
