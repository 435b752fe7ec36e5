"""FKPD Studio: `streamlit run app/streamlit_app.py` (what `make run` does).

Pages: Label (annotators), Rounds (alignment rounds; admin), Data (comparisons, stats,
export), Compare (two policy versions on the same reset seeds), Projects (every project;
an admin creates one). Every page works on the project picked in the sidebar or named by
the link (``?project=NAME``; default: the one the app was started with). All logic is in
:mod:`fkpd.studio` and :mod:`fkpd.store`; the pages only lay it out.
"""

import streamlit as st

st.set_page_config(page_title="FKPD Studio", page_icon=":material/smart_toy:", layout="wide")

from studio_ui import project_picker, sidebar, studio  # noqa: E402  (after set_page_config)

pages = st.navigation([
    st.Page("pages/label.py", title="Label", icon=":material/thumbs_up_down:", default=True),
    st.Page("pages/rounds.py", title="Rounds", icon=":material/model_training:"),
    st.Page("pages/data.py", title="Data", icon=":material/table_chart:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare:"),
    st.Page("pages/projects.py", title="Projects", icon=":material/folder_open:"),
])
s = studio()
project_picker(s)
sidebar(s)
pages.run()
