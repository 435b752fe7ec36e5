"""Compare page: the same reset seeds rolled out by two policy versions, side by side.

One comparison per project at a time, and none ahead of a round (fkpd.studio.compare):
the button is refused with a message while one is queued or running.
"""

import streamlit as st

from fkpd.studio import COMPARE, StudioError, compare_videos, enqueue_compare, error_headline, job_summary, \
    served_versions, version_label
from fkpd.studio.compare import active_compare_job
from studio_ui import studio

s = studio()
st.title("Compare policy versions")
versions = served_versions(s.store, s.project)
if not versions:
    st.info("No policy version yet: the bootstrap is still running (see the Label page).")
    st.stop()

labels = {v.id: version_label(v) for v in versions}
ids = list(labels)
c1, c2, c3 = st.columns([2, 2, 1])
a = c1.selectbox("Left: version", ids, index=0, format_func=labels.get)
b = c2.selectbox("Right: version", ids, index=len(ids) - 1, format_func=labels.get)
episodes = c3.number_input("Episodes", min_value=1, max_value=8, value=4)
busy = active_compare_job(s.store, s.project)
if busy is not None:
    st.caption(f"{job_summary(busy)}. One comparison runs at a time; rounds go first.")
if st.button("Roll out both on the same seeds", type="primary", disabled=busy is not None):
    try:
        job = enqueue_compare(s.store, s.project, a, b, int(episodes))
        st.session_state["compare_job"] = job.id
    except StudioError as exc:
        st.error(str(exc))


@st.fragment(run_every=2)
def results() -> None:
    jobs = [j for j in s.store.jobs.list(s.project.id, limit=50) if j.kind == COMPARE]
    if not jobs:
        st.caption("Pick two versions and roll them out. Full episodes are rendered in the background "
                   "(about a minute per 4 episodes on a CPU).")
        return
    job = jobs[0]
    if job.status in ("queued", "running"):
        st.progress(job.progress, text=job_summary(job))
        st.session_state["compare_shown"] = None
        return
    if busy is not None:
        st.rerun(scope="app")  # the comparison ended: enable the button again
    if job.status == "failed":
        st.error(f"{job_summary(job)}: {error_headline(job)}")
        return
    if job.status == "cancelled":
        st.info(f"{job_summary(job)}. A comparison gives way to a bootstrap or alignment round queued while it "
                "waits or runs; roll out again when the round is done.")
        return
    if st.session_state.get("compare_shown") != job.id:
        st.session_state["compare_shown"] = job.id
        st.rerun(scope="app")  # draw the videos outside the fragment, once


results()
done = [j for j in s.store.jobs.list(s.project.id, status="succeeded", limit=50) if j.kind == COMPARE]
if done:
    job = done[0]
    va, vb = job.result["version_a"], job.result["version_b"]
    st.subheader(f"{labels.get(va, va)}  vs  {labels.get(vb, vb)}")
    for row in compare_videos(s.store, job):
        cols = st.columns(2)
        for col, side in zip(cols, ("a", "b")):
            info = row[side]
            with col:
                if info.get("path") is None:
                    st.warning(f"Seed {row['seed']}: the video is missing.")
                    continue
                st.video(str(info["path"]), autoplay=True, loop=True, muted=True)
                st.caption(f"seed {row['seed']} · return {info['return']:.1f} · "
                           f"{'success' if info['success'] else 'no success'}")
