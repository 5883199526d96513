# Every target creates or reuses .venv and installs the pinned dependencies once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup lint format test demo bench-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-lock.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required"'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements-lock.txt -e '.[dev]'
	@touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m megatron_ibxl.demo

# open_clip (the `bench` extra) needs torchvision, whose PyPI wheels do not load beside the
# CPU torch 2.13.0 of .venv ("operator torchvision::nms does not exist"), so the throughput
# comparison runs open_clip in a venv of its own, on torch 2.14.1 + torchvision 0.29.1. It
# also gets megatron-core, so the engine can be timed on the same torch there.
BENCH_VENV := .venv-bench
BENCH_PINS := torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 megatron-core==0.16.1 \
	pyyaml==6.0.4 numpy==2.4.6

bench-deps: $(STAMP) $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed: Makefile
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q $(BENCH_PINS)
	@touch $@

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs
