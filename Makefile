# make run   set up (when needed) and reproduce the default DAG
# make test  set up (when needed), lint (ruff check + format check) and run the test suite, as CI does
SHELL := /bin/bash
VENV := .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONHASHSEED := 0

.PHONY: setup run test lint bench lock clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

run: setup
	dvc repro

test: setup lint
	python -m pytest

lint: setup
	ruff check .
	ruff format --check .

bench: setup  # each script prints one JSON object on stdout (progress on stderr); the first that fails stops it
	@for script in benchmarks/*.py; do echo "# $$script" >&2; PYTHONPATH=. python $$script || { echo "$$script failed" >&2; exit 1; }; done

lock: setup
	{ sed -n '1,3p' requirements.lock; echo "torch==2.13.0"; \
	  $(VENV)/bin/python -m pip freeze --all --exclude-editable | grep -vE "^(torch==|latentlab|pip==)"; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean-venv:
	rm -rf $(VENV)
