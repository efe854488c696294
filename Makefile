# Every target creates/uses the local virtual environment in .venv and installs what it needs:
# `make demo` jaxgen and its runtime dependencies only (no torch, transformers or CTranslate2),
# `make test` adds the `test` extra, `make bench` the `bench` extra. One stamp per extra, so a
# target installs only what it lacks (and again after pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_RUN := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test
STAMP_BENCH := $(VENV)/.installed-bench

.PHONY: install test test-slow test-all test-fast demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_RUN): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(STAMP_BENCH): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

install: $(STAMP_RUN) $(STAMP_TEST) $(STAMP_BENCH)

# The test suite runs in parallel processes, one per core (pytest-xdist; a test file stays in one
# process, so its module fixtures are built once). `make test` (what CI runs) is everything not marked
# `slow`; `make test-slow` the slow part (the 270M default model, the case-by-case reference
# comparisons, device workers, benchmark compiles); `make test-all` both. PYTEST_ARGS passes options
# (e.g. PYTEST_ARGS="--durations=20", or "-n 0" for one process).
TEST_WORKERS ?= auto
# tests/run_suite.py runs pytest, kills whatever the run left behind, and gives the failed tests of a
# crashed worker (XLA:CPU's SIGSEGV/SIGABRT in its compiler, see README "Known issues") one more try.
PYTEST := $(PY) tests/run_suite.py -q -ra -n $(TEST_WORKERS) --dist loadfile --max-worker-restart 0
test: $(STAMP_TEST)
	$(PYTEST) -m "not slow" tests $(PYTEST_ARGS)

test-slow: $(STAMP_TEST)
	$(PYTEST) -m slow tests $(PYTEST_ARGS)

test-all: $(STAMP_TEST)
	$(PYTEST) tests $(PYTEST_ARGS)

# The small-shape tests (tests/conftest.py FAST_MODULES: jaxgen's own functions on tiny models, no
# subprocesses or case-by-case reference comparisons), under five minutes on 2 cores.
test-fast: $(STAMP_TEST)
	$(PYTEST) -m "fast and not slow" tests $(PYTEST_ARGS)

demo: $(STAMP_RUN)
	$(VENV)/bin/jaxgen generate --max-length 48 "The three most important inventions in history are"

# The README's benchmark tables (benchmarks/run.py): `make bench` prints the main one (jaxgen vs
# CTranslate2 vs llama.cpp on the default model, CPU, under 15 min), `make bench WORKLOAD=name` any
# other (`python benchmarks/run.py --list`); BENCH_ARGS passes options (`--tiny`: a smoke test).
WORKLOAD ?= main
BENCH_ARGS ?=
bench: $(STAMP_BENCH)
	$(PY) benchmarks/run.py $(WORKLOAD) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
