# One task runner, the same locally and in CI. `make serve` and `make test` set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The code generator's own environment (buf.gen.yaml runs its plugin): its grpcio-tools sets
# the lowest protobuf and grpcio that the generated code accepts (pyproject.toml).
GENERATOR := $(VENV)/protoc
GENERATOR_TOOLS := grpcio-tools==1.72.1 grpcio==1.72.1 protobuf==6.33.6 typing_extensions==4.16.0
GENERATOR_STAMP := $(GENERATOR)/.installed
IMAGE ?= conveyor:latest

.PHONY: setup serve test test-image lint breaking generate check-generated image bench clean

NODE_WORKER := examples/node-worker
NODE_STAMP := $(NODE_WORKER)/node_modules/.installed

setup: $(STAMP) $(GENERATOR_STAMP) $(NODE_STAMP)

# Both distributions, editable: the client with its command line (.[cli]) and the server
# (service/), with the development tools.
$(STAMP): pyproject.toml service/pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[cli,tracing]' -e ./service --group dev
	touch $(STAMP)

$(GENERATOR_STAMP): Makefile
	test -x $(GENERATOR)/bin/python || $(PYTHON) -m venv $(GENERATOR)
	$(GENERATOR)/bin/python -m pip install --quiet $(GENERATOR_TOOLS)
	touch $(GENERATOR_STAMP)

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
	$(MAKE) breaking

# The contract against main: see scripts/breaking.sh for what "main" is on each checkout.
breaking: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/breaking.sh

generate: setup
	$(BIN)/buf generate
	$(BIN)/python scripts/unasync.py

# Regenerate into a scratch folder: any difference with the committed code fails.
# The tests that fail when the committed code is not what regenerating it gives.
check-generated: setup
	$(BIN)/pytest -q tests/test_contract.py::test_generated_code_is_up_to_date tests/test_unasync.py

# The container image (deploy/Containerfile), built with podman: see deploy/build-image.sh.
# Both need root, podman and debootstrap.
image: $(STAMP)
	PYTHON=$(BIN)/python deploy/build-image.sh $(IMAGE)

# Build the image and check it: its settings, and its programs run from its file system.
test-image: $(STAMP)
	$(BIN)/pytest -q deploy/test_image.py

bench: setup
	$(BIN)/python -m bench.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis $(NODE_WORKER)/node_modules
