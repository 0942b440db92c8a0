# Two entry points for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run run-nginx test format init repair bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall whenever a requirements file changes.
$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@ $(VENV)/.runtime

run: $(VENV)/.runtime  ## serve on the embedded default (or what .env configures)
	$(BIN)/flask --app image_api init
	$(BIN)/gunicorn --config gunicorn.conf.py wsgi:app

run-nginx: $(VENV)/.runtime  ## gunicorn on PORT and nginx (deploy/nginx.conf) on NGINX_PORT
	bash tools/run-nginx.sh

test: $(VENV)/.dev  ## lint, format check and the whole test suite
	bash tools/test-packages.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n auto --dist loadfile

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

init: $(VENV)/.runtime  ## create the bucket/directory and tables/indexes
	$(BIN)/flask --app image_api init

repair: $(VENV)/.runtime  ## report drift between blobs and records (dry run)
	$(BIN)/flask --app image_api repair

$(VENV)/.bench: requirements-bench.txt requirements-dev.txt requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-bench.txt
	touch $@

bench: $(VENV)/.bench  ## side-by-side benchmarks; writes docs/benchmarks.md
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
