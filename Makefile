# Developer and CI entry points. Everything runs from a local .venv that these targets create;
# stamp files keep a repeated `make test` from reinstalling unless pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint bench ensure-mosquitto ensure-chromium ensure-systemd

demo: $(VENV)/.installed
	$(BIN)/gateway demo $(ARGS)

test: $(VENV)/.installed-dev ensure-mosquitto ensure-chromium ensure-systemd
	$(BIN)/pytest -q -n auto --dist worksteal $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(VENV)/.installed-bench
	@set -e; for f in benchmarks/*.py; do \
		[ -e "$$f" ] || continue; \
		echo "== $$f"; \
		$(BIN)/python "$$f"; \
	done

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@ $(VENV)/.installed-dev $(VENV)/.installed

# The tests start their own Mosquitto from the binary (Debian puts it in /usr/sbin).
# Installing the Debian package also starts a system broker on 1883; the tests don't use it.
ensure-mosquitto:
	$(call ensure_package,mosquitto,command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto,the tests)

# The dashboard's browser tests drive Debian's Chromium through Playwright (never `playwright install`:
# no browser download at test time).
ensure-chromium:
	$(call ensure_package,chromium,test -x /usr/bin/chromium,the dashboard's browser tests)

# The service tests check the unit `gateway service install` writes with `systemd-analyze verify` (offline:
# no systemd needs to run, so a container will do).
ensure-systemd:
	$(call ensure_package,systemd,command -v systemd-analyze >/dev/null 2>&1,the service tests)

# $(call ensure_package,PACKAGE,CHECK,NEEDED BY): install a Debian package the tests need when CHECK fails
# (as root; otherwise say how).
define ensure_package
	@if $(2); then \
		:; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing $(1) (needed by $(3))"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
	else \
		echo "$(1) is needed by $(3): sudo apt-get install $(1)" >&2; \
		exit 1; \
	fi
endef
