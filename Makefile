# sipguard — set-up, run and test. `make run` and `make test` work on a fresh Debian 12.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= config/sipguard.yaml

.PHONY: install run test lint typecheck loadtest clean sipp

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# SIPp (Debian package sip-tester) for the end-to-end tests and the load kit.
sipp:
	@command -v sipp >/dev/null 2>&1 || { \
	  echo "installing SIPp (Debian package sip-tester)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sip-tester >/dev/null; }

run: install
	$(VENV)/bin/sipguard run --config $(CONFIG)

test: install sipp
	$(VENV)/bin/ruff check sipguard tests loadtest
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check sipguard tests loadtest

typecheck: install
	$(VENV)/bin/mypy

loadtest: install sipp
	$(PY) loadtest/run.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
