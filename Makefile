# sipguard — set-up, run and test. `make run` and `make test` work on a fresh Debian 12.
# The interpreter the venv is made from: the distribution's own /usr/bin/python3 when it is
# 3.11 or newer, else the first python3 on PATH (`make PYTHON=... install` picks another).
# Debian builds its python3 with profile-guided and link-time optimisation and links the
# interpreter statically; a Python built from source with the defaults (pyenv: neither, and a
# shared libpython) measured ~30 % more CPU per call in sipguard's hot path
# (loadtest/README.md, "Which Python runs it").
SYSTEM_PYTHON_OK := $(shell /usr/bin/python3 -c 'import sys; print(sys.version_info >= (3, 11))' 2>/dev/null)
PYTHON ?= $(if $(filter True,$(SYSTEM_PYTHON_OK)),/usr/bin/python3,python3)
VENV   := .venv
PY     := $(VENV)/bin/python
# the venv is made again when PYTHON names another interpreter
STAMP  := $(VENV)/.installed-$(subst /,_,$(PYTHON))
CONFIG ?= config/sipguard.yaml

.PHONY: install native run test lint typecheck loadtest clean tools sipp docs demo

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv --clear $(VENV) || { \
	  echo "installing python3-venv (Debian)"; SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv --clear $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The hot-path modules (parser, proxy core, policy rules) compiled to C with mypyc; see
# sipguard/native.py.
# Needs a C compiler, the Python headers and OpenSSL's (installed here when missing, Debian
# gcc, python3-dev and libssl-dev); if the build still fails, sipguard runs the same modules
# as Python.
native: install
	@command -v cc >/dev/null 2>&1 && test -f /usr/include/openssl/evp.h && \
	  $(PY) -c 'import os, sysconfig, sys; \
	  sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || { \
	  echo "installing a C compiler, the Python and OpenSSL headers (Debian gcc python3-dev libssl-dev)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq gcc python3-dev libssl-dev >/dev/null || true; }
	@$(PY) -m sipguard.native ensure || true

# Test tools (Debian packages): SIPp (sip-tester) for the end-to-end tests and the load kit;
# sipvicious (svmap, svwar) and sipsak, real attack tools for the flood/scanner e2e test;
# socat, the TLS layer under SIPp (Debian's SIPp has no TLS) in the TLS e2e test;
# redis-server, the shared state backend the Redis tests start on a free loopback port (the
# package's own service is stopped and disabled: the tests run their own servers);
# kamailio, the proxy the load kit's comparison mode (loadtest/run.py --compare) measures
# sipguard against (its service too is stopped and disabled: the kit starts its own), and
# kamailio-secsipid-modules, its STIR/SHAKEN check (the kit's kamailio-identity system);
# nftables, the packet loss of the load kit's lossy-link run (loadtest/lossy.py).
TOOL_PACKAGES := sip-tester sipvicious sipsak socat redis-server kamailio kamailio-secsipid-modules nftables
tools:
	@command -v sipp >/dev/null 2>&1 && command -v svmap >/dev/null 2>&1 && \
	  command -v svwar >/dev/null 2>&1 && command -v sipsak >/dev/null 2>&1 && \
	  command -v socat >/dev/null 2>&1 && \
	  { command -v kamailio >/dev/null 2>&1 || test -x /usr/sbin/kamailio; } && \
	  ls /usr/lib/*/kamailio/modules/secsipid.so >/dev/null 2>&1 && \
	  { command -v nft >/dev/null 2>&1 || test -x /usr/sbin/nft; } && \
	  { command -v redis-server >/dev/null 2>&1 || command -v valkey-server >/dev/null 2>&1; } || { \
	  echo "installing test tools (Debian packages $(TOOL_PACKAGES))"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TOOL_PACKAGES) >/dev/null; \
	  { $$SUDO systemctl disable --now redis-server >/dev/null 2>&1 || $$SUDO service redis-server stop >/dev/null 2>&1 || true; }; \
	  { $$SUDO systemctl disable --now kamailio >/dev/null 2>&1 || $$SUDO service kamailio stop >/dev/null 2>&1 || true; }; }

sipp: tools  # the old name

run: install native
	$(VENV)/bin/sipguard run --config $(CONFIG)

test: install native tools
	$(VENV)/bin/ruff check sipguard tests loadtest
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests/e2e
	$(PY) -m pytest -q -n 2 tests/unit

lint: install
	$(VENV)/bin/ruff check sipguard tests loadtest

typecheck: install
	$(VENV)/bin/mypy

# The parameter tables in docs/rules.md and the commented defaults in config/sipguard.yaml,
# written from the config schema (each Field's default and description=); CI-style check:
# $(PY) -m sipguard.ops.docgen --check
docs: install
	$(PY) -m sipguard.ops.docgen

loadtest: install native tools
	$(PY) loadtest/run.py

# sipguard in front of a SIPp UAS on 127.0.0.1, and a labelled mix of calls through it:
# legitimate, spoofed, over the concurrency limit, a dialer and a rate burst, a number
# suspended live (loadtest/demo.py). Stops what it started.
demo: install native tools
	$(PY) loadtest/demo.py

clean:
	-$(PY) -m sipguard.native clean
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
