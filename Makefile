# The two README commands: `make demo` (main job on the embedded model) and `make test`.
# Both create .venv on first use (scripts/setup_env.sh picks the CPU or GPU stack).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlx-installed

.PHONY: install demo test test-fast test-all lint bench-rollout

$(STAMP): pyproject.toml scripts/setup_env.sh constraints/cpu.txt
	VENV=$(VENV) scripts/setup_env.sh

install: $(STAMP)

demo: $(STAMP)
	$(PY) recipes/pg.py --config recipes/grpo.yaml overwrite_output_dir=true

test: $(STAMP)
	$(PY) -m pytest

# The fast tier (docs/testing.md): pure math, config, rewards and data tests, chosen by path; the
# markers keep out the few tests there that launch processes or need SmolLM2. Nothing in it builds
# a vLLM engine or starts a training process. Not a substitute for `make test`.
FAST_TESTS := tests/algos tests/config tests/rewards tests/data tests/test_distributed.py \
	tests/test_weighting.py tests/recipes/test_run_clock.py
FAST_MARKERS := not slow and not gpu and not multiprocess and not smollm2

test-fast: $(STAMP)
	$(PY) -m pytest -m "$(FAST_MARKERS)" $(FAST_TESTS)

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench-rollout: $(STAMP)
	$(PY) bench/rollout.py
