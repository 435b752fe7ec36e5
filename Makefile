# FKPD Studio. `make run` and `make test` each create or refresh .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TASK   ?= metaworld/door-open-v3
export MUJOCO_GL ?= egl

PORT   ?= 8501

.PHONY: venv run pipeline test bench bench-ui bench-maze clean-runs

# torch is installed first and pinned, so nothing later pulls a CUDA build.
# d4rl (D4RL's dataset names and reference scores, fkpd/d4rl.py) is installed last with
# --no-deps: its metadata requires mujoco-py, pybullet and dm-control, which FKPD never
# uses and which do not install here; requirements.txt has the gym<0.25 it imports.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps d4rl==1.1
	touch $(STAMP)

venv: $(STAMP)

# The app on http://localhost:$(PORT). Before the server answers, fkpd.studio.serve creates
# the project for $(TASK) (SQLite under labels/) with its bootstrap queued and starts the
# local workers, so the bootstrap runs with no browser open; Ctrl-C stops them all.
run: venv
	FKPD_TASK=$(TASK) $(PY) -m fkpd.studio.serve app/streamlit_app.py --server.port $(PORT)

# The headless behaviour-cloning pipeline (data, BC, evaluation, clips), no app.
pipeline: venv
	$(VENV)/bin/fkpd pipeline --task $(TASK)

# The layer contracts of pyproject.toml [tool.importlinter] (no import circles), then the tests.
test: venv
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

bench: venv
	$(PY) bench/bench_policy.py

bench-ui: venv
	$(PY) bench/bench_ui.py

# D4RL normalised score of BC vs FKPD vs DPO + reverse KL on maze2d-umaze, 3 seeds (~45 min on 2 cores).
bench-maze: venv
	$(PY) bench/bench_alignment.py --tasks d4rl/maze2d-umaze --teachers return --methods forward reverse \
		--segment-length 300 --eval-episodes 50 --jobs 2 --out runs/bench_maze2d --json bench/results/bench_maze2d.json

clean-runs:
	rm -rf runs
