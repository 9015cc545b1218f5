# One task runner, the same locally and in CI. `make serve` and `make test` set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve test lint generate check-generated bench clean

NODE_WORKER := examples/node-worker
NODE_STAMP := $(NODE_WORKER)/node_modules/.installed

setup: $(STAMP) $(NODE_STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The JavaScript worker example, which the tests run: its pinned packages (package-lock.json).
$(NODE_STAMP): $(NODE_WORKER)/package.json $(NODE_WORKER)/package-lock.json
	cd $(NODE_WORKER) && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

serve: $(STAMP)
	$(BIN)/conveyord $(ARGS)

test: lint
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench.run $(ARGS)

generate: setup
	$(BIN)/python scripts/generate.py
	$(BIN)/python scripts/unasync.py

check-generated: setup
	$(BIN)/python scripts/generate.py --check
	$(BIN)/python scripts/unasync.py --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis $(NODE_WORKER)/node_modules
