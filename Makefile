# nextword: make serve (a default model on port 50051), make test (the whole suite).
PYTHON ?= python3
VENV ?= .venv
PORT ?= 50051
HTTP_PORT ?= 8080
MODEL ?= models/default.pt
ZH_MODEL ?= models/zh.pt
export PYTHON VENV

.PHONY: serve test test-fast install install-dev proto lint smoke default-model zh-model clean

install:                ## the service's dependencies and the gRPC stubs
	scripts/install.sh serve

install-dev:            ## everything: service, training, tests, linters
	scripts/install.sh dev

proto:                  ## regenerate service/pb/ from proto/
	scripts/gen_proto.sh

serve: install          ## serve the default model (or MODEL=path), and models/zh.pt as "zh" once built: gRPC on PORT, HTTP and the page on HTTP_PORT
	$(VENV)/bin/python -m service --model $(MODEL) $(if $(wildcard $(ZH_MODEL)),--model zh=$(ZH_MODEL)) --port $(PORT) --http-port $(HTTP_PORT)

test: install-dev       ## the whole test suite (offline, CPU)
	$(VENV)/bin/python -m pytest -q

test-fast: install-dev  ## the suite without the tests marked slow (servers, training, the browser: the edit-test loop)
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: install-dev       ## ruff (lint, size and complexity, format check), mypy and hadolint (the same as .pre-commit-config.yaml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/hadolint Dockerfile

smoke: install          ## start the server on the default model, call Suggest, stop it
	scripts/smoke.sh

default-model: install-dev  ## rebuild models/default.pt from the committed corpus
	scripts/build_default_model.sh

zh-model: install-dev      ## a Chinese model of CORPUS (UTF-8, a text per line) with the Chinese recipe -> models/zh.pt
	@test -n "$(CORPUS)" || { echo "make zh-model: give CORPUS=path/to/chinese.txt" >&2; exit 2; }
	scripts/recipes.sh --build zh $(CORPUS) models/zh.pt

clean:
	rm -rf $(VENV) service/pb .pytest_cache
