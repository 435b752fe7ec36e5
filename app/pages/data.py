"""Data page: the comparisons, per-annotator statistics and label quality (gold accuracy,
agreement, speed), excluding annotators from training (admin), label-quality and
assignment settings (admin: labels per pair, second opinions, lease time), export."""

import streamlit as st

from fkpd.studio import LabelQuality, StudioError, export_bytes, set_assignment, set_label_quality
from studio_ui import admin_sign_in, studio

s = studio()
st.title("Preference data")

frame = s.store.comparisons_frame(s.project.id)
rounds: list = []
people: list = []
if frame.empty:
    st.info("No comparisons yet. Answers appear here as soon as they are given on the Label page.")
else:
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
        "gold_n": st.column_config.NumberColumn("gold answers (n)"),
        "gold_correct": st.column_config.NumberColumn("gold correct"),
        "gold_accuracy": st.column_config.NumberColumn("gold accuracy", format="percent"),
        "agree_n": st.column_config.NumberColumn("pairs shared with others (n)"),
        "agreement": st.column_config.NumberColumn("agreement with others", format="percent"),
        "excluded": st.column_config.CheckboxColumn("excluded from training"),
    })
    st.caption("Gold accuracy: answers to gold pairs (a small share of each batch whose better clip is clear from "
               "ground truth; annotators cannot tell them apart) that named that clip, out of n. Agreement: how "
               "often the others who answered the same pair gave the same answer, over n shared pairs. Speed: the "
               "median seconds from a pair on screen to its answer.")
    st.bar_chart(stats[["n_left", "n_right", "n_equal", "n_skip"]], horizontal=True, stack=True,
                 x_label="annotator", y_label="answers")

    st.subheader("Agreement")
    agreement = s.store.pairwise_agreement(s.project.id)
    if agreement.empty:
        st.caption("No pair has answers from two annotators yet (a project with labels_per_pair > 1 collects them).")
    else:
        st.dataframe(agreement, hide_index=True, width="stretch", column_config={
            "agreement": st.column_config.NumberColumn("agreement", format="percent")})

st.subheader("Training set")
excluded = s.store.excluded_annotators(s.project.id)
n_train = s.store.count_training_pairs(s.project.id)
n_all = s.store.count_training_pairs(s.project.id, include_excluded=True)
if excluded:
    st.markdown(f"**Excluded from training:** {', '.join(e.annotator for e in excluded)} — the next round trains on "
                f"{n_train} of {n_all} comparisons; the others stay in the store.")
    for e in excluded:
        st.caption(f"{e.annotator}: excluded {e.excluded_at:%Y-%m-%d %H:%M} UTC"
                   + (f" by {e.excluded_by}" if e.excluded_by else "") + (f" ({e.reason})" if e.reason else ""))
else:
    st.caption(f"No annotator is excluded: the next round trains on all {n_train} comparisons (skips never train).")
if admin_sign_in(s):
    names = sorted(frame["annotator"].unique().tolist()) if not frame.empty else []
    gone = {e.annotator for e in excluded}
    candidates = [n for n in names if n not in gone]
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    who = c1.selectbox("Annotator to exclude from training", candidates, index=None,
                       placeholder="choose an annotator" if candidates else "nobody left to exclude")
    reason = c1.text_input("Reason (optional)", max_chars=200, key="exclude_reason")
    if c2.button("Exclude from training", disabled=who is None, key="exclude"):
        s.store.exclude_annotator(s.project.id, who, by="admin", reason=reason)
        st.rerun()
    for e in excluded:
        if st.button(f"Include {e.annotator} again", key=f"include_{e.annotator_id}",
                     help="Their comparisons train the next round again."):
            s.store.include_annotator(s.project.id, e.annotator_id)
            st.rerun()

    with st.form("quality_form"):
        st.markdown("**Label-quality settings**")
        try:
            quality = LabelQuality.of(s.store.get_project(s.project.id))
        except StudioError as exc:
            st.warning(f"The stored settings are invalid ({exc}); showing the defaults.")
            quality = LabelQuality()
        q1, q2, q3 = st.columns(3)
        min_view = q1.number_input("Minimum viewing time (s)", 0.0, 60.0, quality.min_view_seconds, 0.5,
                                   help="An answer counts once both clips played this long (or one full loop, if "
                                        "shorter); 0: no minimum.")
        share = q2.number_input("Gold pairs (share of each batch)", 0.0, 1.0, quality.gold_share, 0.01,
                                help="Pairs whose better clip is clear from ground truth, for gold accuracy.")
        margin = q3.number_input("Gold return margin", 0.0, 1e9, quality.gold_return_margin, 0.1,
                                 help="Without a success difference, a pair is clear when |R_left − R_right| ≥ "
                                      "margin × the larger |return|.")
        if st.form_submit_button("Save label-quality settings"):
            try:
                set_label_quality(s.store, s.project, min_view_seconds=min_view, gold_share=share,
                                  gold_return_margin=margin)
                st.success("Saved: new batches and answers follow them.")
            except StudioError as exc:
                st.error(str(exc))

    with st.form("assignment_form"):
        st.markdown("**Who answers what**")
        current = s.store.get_project(s.project.id).settings
        a1, a2, a3 = st.columns(3)
        per_pair = a1.number_input("Labels per pair", 1, 20, int(current["labels_per_pair"]), 1,
                                   key="labels_per_pair",
                                   help="Answers from different annotators that complete a pair.")
        second = a2.number_input("Second opinions per pair", 0, 20, int(current["second_opinions"]), 1,
                                 key="second_opinions",
                                 help="Answers a completed pair may still take from others, handed out only when "
                                      "no open pair is free for them (0: never). They measure agreement and train "
                                      "like any comparison.")
        lease = a3.number_input("Lease (s)", 10.0, 3600.0, float(current["lease_seconds"]), 10.0,
                                key="lease_seconds", help="How long a pair handed to someone stays theirs.")
        if st.form_submit_button("Save assignment settings"):
            try:
                set_assignment(s.store, s.project, labels_per_pair=per_pair, second_opinions=second,
                               lease_seconds=lease)
                st.success("Saved: the next pairs handed out follow them.")
            except StudioError as exc:
                st.error(str(exc))

st.subheader("Export")
if frame.empty:
    st.caption("Nothing to export yet.")
    st.stop()
fmt = st.radio("Format", ["parquet", "hdf5"], horizontal=True,
               help="The comparisons shown above (the filters apply) with their two segments (observations, "
                    "actions, rewards).")
with_excluded = st.checkbox("Include the comparisons of annotators excluded from training", value=True,
                            disabled=not excluded)
st.caption("The export holds the comparisons selected above." if rounds or people else
           "The export holds every comparison.")
if st.button("Prepare export"):
    st.session_state.pop("export", None)
    try:
        with st.spinner("Writing the export…"):
            st.session_state["export"] = (fmt, export_bytes(s.store, s.project, fmt, rounds=rounds,
                                                            annotators=people, include_excluded=with_excluded))
    except StudioError as exc:  # e.g. a segment file changed on disk: say which, no traceback
        st.error(f"Export failed: {exc}", icon=":material/error:")
if st.session_state.get("export"):
    efmt, blob = st.session_state["export"]
    st.download_button(f"Download {efmt} ({len(blob) / 1e6:.2f} MB)", blob,
                       file_name=f"{s.project.name}-comparisons.{'h5' if efmt == 'hdf5' else 'parquet'}",
                       mime="application/octet-stream")
