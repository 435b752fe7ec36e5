"""Projects page: every project of the app (open one), and a new project (admin).

A new project is created with its bootstrap job queued at once (fkpd.studio.projects,
as `fkpd projects create`); the local workers pick it up.
"""

import pandas as pd
import streamlit as st

from fkpd.studio import BatchSettings, BootstrapParams, StudioError
from fkpd.studio.config import MAX_AUTO_ROUND_EVERY
from fkpd.studio.projects import BOOTSTRAP_FIELDS, DATASET_KINDS, bootstrap_settings, create_project, \
    dataset_param, project_summary, task_choices
from studio_ui import admin_sign_in, studio

s = studio()
st.title("Projects")

rows = []
for p in s.projects:
    info = project_summary(s.store, p)
    job = info["training_job"]
    rows.append({"project": p.name, "open": f"./?project={p.name}", "task": p.task_id, "identity": p.identity,
                 "served version": info["served_version"] or "not bootstrapped", "versions": info["versions"],
                 "comparisons": info["comparisons"], "annotators": info["annotators"],
                 "training job": "" if job is None else job["summary"]})
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", column_config={
    "open": st.column_config.LinkColumn("open", display_text="open", help="this project's Label page"),
})
st.caption(f"This tab works on **{s.project.name}**. Pick another in the sidebar, or share a link with "
           "`?project=NAME`: it opens that project on any page.")

st.subheader("New project")
if not admin_sign_in(s):
    st.info("Only an admin can create a project.", icon=":material/lock:")
    st.stop()

created = st.session_state.get("created_project")
if created:
    name, job_id = created
    st.success(f"Created project {name!r}; its bootstrap (data, behaviour cloning, first batch) is queued as job "
               f"{job_id}, and the workers pick it up. Its Label page shows the progress.",
               icon=":material/check_circle:")
    if st.button(f"Open {name}", key="open_created"):
        st.session_state.pop("created_project", None)
        st.query_params["project"] = name
        st.rerun()

tasks = task_choices()
kinds = {"generated": "Generated (the task's scripted policy)", "d4rl": "D4RL dataset name", "file": "File path",
         "minari": "Minari dataset id"}
with st.form("new_project_form"):
    c1, c2 = st.columns(2)
    name = c1.text_input("Project name", key="np_name", placeholder="e.g. maze-demo", max_chars=200)
    task = c2.selectbox("Task", tasks, key="np_task",
                        index=tasks.index(s.project.task_id) if s.project.task_id in tasks else 0)
    c1, c2 = st.columns(2)
    kind = c1.radio("Offline data", list(kinds), format_func=kinds.get, key="np_dataset_kind", horizontal=True,
                    help=" · ".join(f"{k}: {v}" for k, v in DATASET_KINDS.items()))
    source = c2.text_input("Dataset name, file path or Minari id", key="np_dataset",
                           placeholder="e.g. maze2d-umaze-v1, /data/door.hdf5, D4RL/door/human-v2",
                           help="Leave empty for generated data. A file is read where it is, on the workers' machine; "
                                "nothing is downloaded.")
    st.markdown("**Batch and bootstrap**")
    c = st.columns(6)
    defaults = {"pairs_per_batch": BatchSettings.pairs_per_batch, "segment_length": BatchSettings.segment_length,
                "dataset_episodes": BootstrapParams.dataset_episodes, "bc_steps": BootstrapParams.bc_steps,
                "eval_episodes": BatchSettings.eval_episodes, "seed": BatchSettings.seed}
    titles = {"pairs_per_batch": "Pairs per batch", "segment_length": "Clip length L (0: the task's)",
              "dataset_episodes": "Generated episodes", "bc_steps": "BC steps", "eval_episodes": "Evaluation episodes",
              "seed": "Seed"}
    minimum = {"segment_length": 0, "seed": 0}
    values = {f: c[i].number_input(titles[f], min_value=minimum.get(f, 1), value=int(defaults[f]), step=1,
                                   key=f"np_{f}", help=BOOTSTRAP_FIELDS[f][1])
              for i, f in enumerate(defaults)}
    c1, c2 = st.columns(2)
    identity = c1.radio("Who may label", ["invite", "open"], key="np_identity", horizontal=True,
                        format_func={"invite": "Invite links", "open": "Open (a typed name; demos)"}.get)
    auto = c2.number_input("Automatic round after N new comparisons (0: by hand)", min_value=0,
                           max_value=MAX_AUTO_ROUND_EVERY, value=None, step=1, key="np_auto",
                           placeholder="the batch size")
    instructions = st.text_area("Instructions for annotators", key="np_instructions",
                                placeholder="Leave empty for the task's own instructions.")
    extra = st.text_area("Other bootstrap settings (JSON object)", key="np_extra", height=80,
                         placeholder='e.g. {"bc": {"lr": 0.0005}, "policy": {"hidden_dim": 128}, "render_size": 160}',
                         help="Any bootstrap or batch setting (as FKPD_BOOTSTRAP); the fields above win where "
                              "changed from their defaults.")
    submitted = st.form_submit_button("Create project", type="primary")

if submitted:
    try:
        fields = {f: int(v) for f, v in values.items() if int(v) != defaults[f]}
        fields["dataset"] = dataset_param(kind, source, task, check_files=s.local_workers) or None
        params = bootstrap_settings(fields, extra, extra_name="Other bootstrap settings")
        project, job = create_project(s.store, name, task, params, instructions=instructions, identity=identity,
                                      auto_rounds=None if auto is None else int(auto))
    except StudioError as exc:
        st.error(f"The project was not created: {exc}", icon=":material/error:")
    else:
        st.session_state["created_project"] = (project.name, job.id if job is not None else "(queued elsewhere)")
        st.rerun()
