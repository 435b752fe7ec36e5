"""Label page: two clips side by side; Left / Right / Equal / Skip (← → ↓ S)."""

import streamlit as st

from fkpd.studio import StudioError, error_headline, job_summary, latest_training_job, lease_for_display, \
    record_answers
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


st.header("Which clip do you prefer?")
st.info(s.project.instructions or "Choose the clip whose behaviour you prefer.", icon=":material/assignment:")
for msg in st.session_state.pop("answer_problems", []):
    st.warning(msg)

pairs, notices = lease_for_display(s.store, s.project, annotator)
for msg in notices:
    st.warning(msg, icon=":material/videocam_off:")
answered, total = s.store.batch_progress(s.project.id)
if pairs:
    st.progress(answered / total if total else 0.0,
                text=f"Batch of round {pairs[0].round}: {answered} of {total} answers")
    pair_player([p.as_json() for p in pairs], on_answers=_store_answers, key=KEY)
    st.caption("Keys: ← left · → right · ↓ equal · S skip · R replay. The next pair is already loaded.")
else:
    # No player while nothing is open: its answers were stored by the callback already.

    @st.fragment(run_every=2)
    def waiting() -> None:
        job = latest_training_job(s.store, s.project)
        if s.store.lease_pairs(s.project.id, annotator.id, 1):
            st.rerun(scope="app")
        if job is not None and job.status in ("queued", "running"):
            st.subheader("Nothing to label right now: the next batch is being prepared")
            st.progress(job.progress, text=job_summary(job))
        elif job is not None and job.status == "failed":
            st.error(f"The last {job.kind.replace('_', ' ')} (job {job.id}) failed: {error_headline(job)}")
            st.caption("An admin can see the details on the Rounds page and start it again.")
        else:
            st.subheader("All pairs of this batch are labelled. Thank you!")
            st.write("The next batch appears here when an admin runs an alignment round (Rounds page).")
        done, of = s.store.batch_progress(s.project.id)
        if of:
            st.caption(f"Latest batch: {done} of {of} answers.")

    waiting()
