# Every target creates/uses the local virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/jaxgen generate --max-length 48 "The three most important inventions in history are"

# The README's benchmark tables (benchmarks/run.py): `make bench` prints the main one (jaxgen vs
# CTranslate2 vs llama.cpp on the default model, CPU, under 15 min), `make bench WORKLOAD=name` any
# other (`python benchmarks/run.py --list`); BENCH_ARGS passes options (`--tiny`: a smoke test).
WORKLOAD ?= main
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) benchmarks/run.py $(WORKLOAD) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
