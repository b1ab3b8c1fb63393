# deep3m developer targets. `make demo` runs the main job, `make test` the tests;
# both install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/deep3m/v1/*.proto)

.PHONY: install test test-fast demo bench protos lint typecheck up clean images

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip -c constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

protos: $(STAMP)
	$(BIN)/python -m deep3m.protos_build

test: lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not s3"

lint: $(STAMP)
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/deep3m demo

up: $(STAMP)
	$(BIN)/deep3m up

# Both images with docker, podman or buildah (whichever works here); digests
# recorded in build/images.json and build/images-values.yaml (helm -f).
#   make images REGISTRY=111122223333.dkr.ecr.us-east-1.amazonaws.com PUSH=1
images:
	$(PYTHON) docker/images.py

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) deep3m-data .pytest_cache .mypy_cache .ruff_cache
