# t5lite — every entry point creates .venv and installs what it needs on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test install bench clean-demo

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11 ...'" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## make test: install everything, then run the whole test suite.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

## make demo: train the bundled demo model (gin/demo.gin) into $(DEMO_DIR), evaluate it and show samples.
demo: $(STAMP)
	$(VENV)/bin/t5lite train --gin_file=gin/demo.gin --model_dir=$(DEMO_DIR)
	$(VENV)/bin/t5lite eval --gin_file=gin/demo.gin --model_dir=$(DEMO_DIR)
	$(VENV)/bin/t5lite infer --model_dir=$(DEMO_DIR) --task_examples=5

## make bench: the benchmark scripts (see README "Performance").
bench: $(STAMP)
	$(PY) benchmarks/data_throughput.py

clean-demo:
	rm -rf $(DEMO_DIR)
