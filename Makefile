# Each target bootstraps .venv from the project's own files first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: demo test test-slow bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,tensorflow-cpu]'
	touch $(STAMP)

## make demo: start the daemon on the bundled spool/, train the example job, show where things are
demo: $(STAMP)
	$(PY) examples/demo.py

## make test: the default suite (all that runs on a CPU), in minutes
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --durations=15

## make test-slow: the long trials too
test-slow: $(STAMP)
	$(PY) -m pytest -q

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,tensorflow-cpu,bench]'
	touch $(BENCH_STAMP)

## make bench: epochd's engines against the loops people write (hand PyTorch, DataLoader,
## Lightning, Keras fit), side by side in one run, then the daemon's own costs
bench: $(BENCH_STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
