# faultwatch developer tasks. `make test` is what CI runs (via .ci/run).
#
#   make venv        .venv with torch (CPU) + faultwatch[train,dev,baselines], editable
#   make mosquitto   make sure the Mosquitto binary is installed (never started as a service)
#   make lint        ruff and mypy
#   make unit        the fast tests: no broker, no torch training (under a minute)
#   make test        lint, then unit/integration tests and the doctests of runtime/
#   make demo        faultwatch demo
#   make clean       caches and build output;  make distclean  also removes .venv
#
# Works on a fresh Debian/Ubuntu with Python 3.11+, as root or with sudo, without stdin.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test
.DELETE_ON_ERROR:

VENV  := .venv
VPY   := $(VENV)/bin/python
# The stamp is rebuilt (torch check + editable reinstall) when pyproject.toml changes.
STAMP := $(VENV)/.faultwatch-installed
# Installed before the project: this machine has the CPU wheel of exactly this version
# on local disk (pip's find-links). An unpinned or newer torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Interpreter for the venv; empty = python3.11, else python3 if it is 3.11+.
VENV_PYTHON ?=
PYTEST_ARGS ?=
DEMO_ARGS ?=

# apt-get as root, or through sudo when there is one; installs $$pkgs. (Recursive `=`:
# the $$ must survive until the recipe is expanded.)
APT = if [ "$$(id -u)" -eq 0 ]; then sudo=; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; \
	else echo "error: need root or sudo to apt-get install $$pkgs" >&2; exit 1; fi; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$pkgs

.PHONY: venv mosquitto lint mypy unit test demo clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@py="$(VENV_PYTHON)"; \
	if [ -z "$$py" ]; then \
	  if command -v python3.11 >/dev/null 2>&1 && python3.11 -c '' 2>/dev/null; then py=python3.11; \
	  elif command -v python3 >/dev/null 2>&1 && \
	       python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then py=python3; \
	  else echo "error: need python3.11 (or a python3 that is 3.11+); set VENV_PYTHON=..." >&2; exit 1; fi; \
	fi; \
	if ! $(VPY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
	  if ! "$$py" -c 'import ensurepip, venv' 2>/dev/null && command -v apt-get >/dev/null 2>&1; then \
	    ver=$$("$$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	    pkgs="python$$ver-venv"; $(APT) || { pkgs=python3-venv; $(APT); }; \
	  fi; \
	  echo "creating $(VENV) with $$("$$py" --version) ($$(command -v "$$py"))"; \
	  rm -rf $(VENV); \
	  "$$py" -m venv $(VENV); \
	fi
	$(VPY) -m pip install -q '$(TORCH_SPEC)'
	$(VPY) -m pip install -q -e '.[train,dev,baselines]'
	@touch $@

# Only the binary is needed: tests start their own brokers on free loopback ports. We never
# start or enable a service; where an init system runs, Debian's package may start its
# own broker on 127.0.0.1:1883, which the tests neither use nor mind. Debian installs the
# binary in /usr/sbin, which is not on a non-root PATH: tests/conftest.py looks there too.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then \
	  exit 0; \
	fi; \
	echo "installing mosquitto (Debian package; tests start their own broker, no service is needed)"; \
	pkgs=mosquitto; $(APT); \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || \
	  { echo "error: mosquitto still not found after apt-get install" >&2; exit 1; }

lint: $(STAMP) mypy
	$(VENV)/bin/ruff check .

# pyproject's [tool.mypy] reads the packages through .mypy-root/faultwatch/* (links to the folders).
mypy: $(STAMP)
	@mkdir -p .mypy-root/faultwatch
	@for d in runtime train export bench; do ln -sfn ../../$$d .mypy-root/faultwatch/$$d; done
	$(VENV)/bin/mypy

# Tests marked neither `broker` nor `torch` (tests/conftest.py marks them from their fixtures).
unit: $(STAMP)
	$(VENV)/bin/pytest -q -m "not broker and not torch" tests $(PYTEST_ARGS)

# Doctests: `--doctest-modules runtime tests` in ONE pytest run (one closing line).
# The folder runtime/ is the package faultwatch.runtime (pyproject package-dir), but
# pytest names collected files after their folder (`runtime.payload`) in every
# --import-mode, which would import a second copy of each module (wrong class
# identities: a doctest expecting faultwatch.runtime.daemon.payload.PayloadError fails).
# tests/conftest.py installs an import hook that maps `runtime.*` to the installed
# `faultwatch.runtime.*`, so `tests` must be on the same command line (pytest loads
# tests/conftest.py before collecting) and the default --import-mode=prepend must stay
# (importlib mode does not put tests/ on sys.path, so `from helpers import ...` fails).
test: $(STAMP) mosquitto lint
	$(VENV)/bin/pytest --doctest-modules runtime tests $(PYTEST_ARGS)

demo: $(STAMP) mosquitto
	$(VENV)/bin/faultwatch demo $(DEMO_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .mypy-root demo-run
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
