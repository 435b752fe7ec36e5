"""Data page: the comparisons, per-annotator statistics, agreement, export."""

import streamlit as st

from fkpd.studio import StudioError, export_bytes
from studio_ui import studio

s = studio()
st.title("Preference data")

frame = s.store.comparisons_frame(s.project.id)
if frame.empty:
    st.info("No comparisons yet. Answers appear here as soon as they are given on the Label page.")
    st.stop()

c1, c2 = st.columns(2)
rounds = c1.multiselect("Rounds", sorted(frame["round"].unique().tolist()), placeholder="all rounds")
people = c2.multiselect("Annotators", sorted(frame["annotator"].unique().tolist()), placeholder="all annotators")
view = frame
if rounds:
    view = view[view["round"].isin(rounds)]
if people:
    view = view[view["annotator"].isin(people)]
st.caption(f"{len(view)} of {len(frame)} comparisons")
st.dataframe(view[["comparison_id", "round", "pair_id", "policy_version_id", "annotator", "outcome", "p_left",
                   "shown_at", "answered_at"]], hide_index=True, width="stretch")

st.subheader("Annotators")
if rounds or people:
    st.caption("Statistics and export follow the filters above.")
stats = s.store.annotator_stats(s.project.id, rounds=rounds, annotators=people)
st.dataframe(stats, width="stretch", column_config={
    "tie_rate": st.column_config.NumberColumn("tie rate", format="percent"),
    "skip_rate": st.column_config.NumberColumn("skip rate", format="percent"),
    "left_rate": st.column_config.NumberColumn("left rate (bias; 50% = none)", format="percent"),
    "median_seconds": st.column_config.NumberColumn("median seconds per answer", format="%.1f"),
})
st.bar_chart(stats[["n_left", "n_right", "n_equal", "n_skip"]], horizontal=True, stack=True,
             x_label="annotator", y_label="answers")

st.subheader("Agreement")
agreement = s.store.pairwise_agreement(s.project.id)
if agreement.empty:
    st.caption("No pair has answers from two annotators yet (a project with labels_per_pair > 1 collects them).")
else:
    st.dataframe(agreement, hide_index=True, width="stretch", column_config={
        "agreement": st.column_config.NumberColumn("agreement", format="percent")})

st.subheader("Export")
fmt = st.radio("Format", ["parquet", "hdf5"], horizontal=True,
               help="The comparisons shown above (the filters apply) with their two segments (observations, "
                    "actions, rewards).")
st.caption(f"The export holds the {len(view)} comparisons selected above." if rounds or people else
           "The export holds every comparison.")
if st.button("Prepare export"):
    st.session_state.pop("export", None)
    try:
        with st.spinner("Writing the export…"):
            st.session_state["export"] = (fmt, export_bytes(s.store, s.project, fmt, rounds=rounds,
                                                            annotators=people))
    except StudioError as exc:  # e.g. a segment file changed on disk: say which, no traceback
        st.error(f"Export failed: {exc}", icon=":material/error:")
if st.session_state.get("export"):
    efmt, blob = st.session_state["export"]
    st.download_button(f"Download {efmt} ({len(blob) / 1e6:.2f} MB)", blob,
                       file_name=f"{s.project.name}-comparisons.{'h5' if efmt == 'hdf5' else 'parquet'}",
                       mime="application/octet-stream")
