# The two commands: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv at the repo root if missing and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py constraints-dev.txt dataflow/decode/_roijpeg.c | cksum | cut -d' ' -f1)

.PHONY: demo test lint typecheck pytest venv clean bench-convert bench-peers bench-train

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml setup.py constraints-dev.txt dataflow/decode/_roijpeg.c
	@# libjpeg-turbo's headers for the optional ROI-decode extension (skipped if unavailable)
	@[ -f /usr/include/jpeglib.h ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
		|| apt-get install -y -qq libjpeg62-turbo-dev >/dev/null 2>&1 || true
	$(PIP) install --quiet -c constraints-dev.txt torch==2.13.0
	$(PIP) install --quiet -c constraints-dev.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Two pytest workers, a test file each at a time (its module fixtures are built once): on
# 2 cores the suite took 17:32 this way against 25:57 in one process, which left a quarter
# of the cores idle (145 % CPU over the trainer tests). TEST_JOBS=0: one process.
TEST_JOBS ?= 2
pytest: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=15

test: lint typecheck pytest

bench-convert: $(STAMP)
	$(PY) tools/bench_convert.py

bench-peers: $(STAMP)
	$(PY) tools/bench_peers.py

bench-train: $(STAMP)
	$(PY) tools/bench_train.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
