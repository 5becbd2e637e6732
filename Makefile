# The two README commands: `make demo` (main job on the embedded model) and `make test`.
# Both create .venv on first use (scripts/setup_env.sh picks the CPU or GPU stack).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlx-installed

.PHONY: install demo test test-all lint bench-rollout

$(STAMP): pyproject.toml scripts/setup_env.sh constraints/cpu.txt
	VENV=$(VENV) scripts/setup_env.sh

install: $(STAMP)

demo: $(STAMP)
	$(PY) recipes/pg.py --config recipes/grpo.yaml overwrite_output_dir=true

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench-rollout: $(STAMP)
	$(PY) bench/rollout.py
