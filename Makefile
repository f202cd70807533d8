# The README's two commands: `make demo` (set up, run the whole pipeline on the built-in corpus)
# and `make test` (set up, run the whole test suite).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo demo-bert lint test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh

demo: setup
	$(BIN)/pretrain run configs/gpt-tiny.yaml

demo-bert: setup
	$(BIN)/pretrain run configs/bert-tiny.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	bash scripts/system-deps.sh
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not slurm and not browser"

clean:
	rm -rf work test-artifacts .pytest_cache
