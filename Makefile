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

# jaxgen vs CTranslate2 vs transformers on the default model (median of alternating runs; a full
# run takes a while, `make bench BENCH_ARGS=--quick` is a smoke test). See also
# benchmarks/bench_devices.py and benchmarks/bench_stream_close.py.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) benchmarks/bench_compare.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
