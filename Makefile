# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv with
# pip when it is missing or older than pyproject.toml (quick no-op otherwise).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip prints a warning per package for the machine's optional local indexes; hide only those
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: install demo test lint format clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel 2>&1 | $(QUIET_PIP)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | $(QUIET_PIP)
	# DeepSpeed builds against the installed torch; its CUDA ops are JIT-built when used.
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[test]' 2>&1 | $(QUIET_PIP)
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m trainer.launch recipes/flow2d.yaml --fresh
	$(PY) -m trainer.plot runs/flow2d
	@echo "samples: runs/flow2d/samples/   loss curve: runs/flow2d/loss.png   metrics: runs/flow2d/metrics.jsonl"

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf runs .pytest_cache
