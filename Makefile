# The two commands of the README: `make demo` (main job, offline, the shipped micro SD) and `make test`.
# Both create .venv and install the pinned stack (constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup demo test lint browser bench

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Debian's Chromium for the browser tests (never a downloaded browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

demo: setup
	OMP_NUM_THREADS=1 $(PY) train_dreambooth.py --demo --output_dir demo_out --overwrite_output_dir

# One torch thread per test process, one process per core (pytest-xdist; a test file stays in one process,
# so its module fixtures are built once): the tests use tiny models, where threads only contend.
TEST_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
test: setup browser
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -rs --durations=15 -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) benchmarks/cayley_bench.py
	$(PY) benchmarks/inference_bench.py
	$(PY) benchmarks/train_step_bench.py
	$(PY) benchmarks/metrics_bench.py
