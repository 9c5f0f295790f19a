# make run   set up (when needed) and reproduce the default DAG
# make test  set up (when needed), lint (ruff check + format check), build the docs strictly and run the test suite, as CI does
# make docs  README.md's generated blocks, then the docs site into site/ (`.venv/bin/mkdocs serve` for a live preview)
# make baseline  back to the committed params and dvc.lock, their outputs from the cache, the remote, or rebuilt
# make dvc-deps  regenerate dvc.yaml's code deps from the stages' imports (stages/code_deps.py; a test checks they are in sync)
SHELL := /bin/bash
VENV := .venv
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONHASHSEED := 0
export NO_MKDOCS_2_WARNING := 1

.PHONY: dvc-deps setup run test lint docs bench baseline lock clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(VENV)/bin/python || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	@echo "installing $$(grep -c '==' requirements.lock) pinned packages into $(VENV) (a few minutes the first time)"
	set -o pipefail; $(VENV)/bin/python -m pip install --disable-pip-version-check -r requirements.lock \
	  | { grep --line-buffered -E '^(Collecting|Installing|Successfully)' || true; }
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

run: setup
	dvc repro

test: setup lint
	mkdocs build --strict --quiet
	python -m pytest

# the site's reference and results pages are generated at build time (docs/gen/); a broken link or page fails
docs: setup
	python -m docs.gen.readme
	mkdocs build --strict

dvc-deps: setup
	python -m stages.code_deps

lint: setup
	ruff check .
	ruff format --check .

bench: setup  # each script prints one JSON object on stdout (progress on stderr); the first that fails stops it
	@for script in benchmarks/*.py; do echo "# $$script" >&2; PYTHONPATH=. python $$script || { echo "$$script failed" >&2; exit 1; }; done

# HEAD's outputs come from the DVC cache, else the default remote, else `dvc repro` rebuilds them (portable
# numerics: the same bytes as the committed dvc.lock; the last line says whether they are)
baseline: setup
	git checkout HEAD -- params.yaml dvc.lock
	@if dvc checkout --quiet 2>/dev/null; then echo "baseline: HEAD's outputs checked out from the DVC cache"; \
	elif dvc pull --quiet 2>/dev/null; then echo "baseline: HEAD's outputs pulled from the DVC remote"; \
	else echo "baseline: HEAD's outputs are in no cache or remote here: rebuilding them with dvc repro"; \
	  dvc repro && if git diff --quiet dvc.lock; then echo "baseline: rebuilt, byte for byte as dvc.lock pins"; \
	  else echo "baseline: rebuilt, but dvc.lock differs from HEAD's (git diff dvc.lock)"; fi; fi

lock: setup
	{ sed -n '1,3p' requirements.lock; echo "torch==2.13.0"; \
	  $(VENV)/bin/python -m pip freeze --all --exclude-editable | grep -vE "^(torch==|latentlab|pip==)"; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean-venv:
	rm -rf $(VENV)
