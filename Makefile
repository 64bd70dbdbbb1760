# runops — two commands on a fresh machine:
#   make run    start the embedded local stores (.runops/) and show the demo; installs only what
#               running needs (the package, the PostgreSQL server with contrib)
#   make test   every test: lint, types, pytest on two throwaway clusters, pgTAP, plpgsql_check;
#               adds the test toolchain (the `test` extra, pgTAP, pg_prove, plpgsql_check, pg_cron)
#   make test-package  the wheel in a clean venv outside the checkout: dev up, migrate, demo, alembic
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
STAMP  := $(VENV)/.installed

.PHONY: run test test-package test-faults test-slow lint typecheck pytest bench revision clean system-deps run-deps

# The venv with the package (editable) and what it needs to run...
$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

# ... and with the test toolchain (pytest, hypothesis, ruff, mypy, ...).
$(STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# System packages: the server binaries with contrib to run; pgTAP, pg_prove, plpgsql_check and
# pg_cron too for the tests.
run-deps:
	bash .ci/install-system-deps.sh --run

system-deps:
	bash .ci/install-system-deps.sh

run: $(RUN_STAMP) run-deps
	$(BIN)/runops dev up
	$(BIN)/runops demo

lint: $(STAMP)
	$(BIN)/ruff check py_client tests bench migrations

typecheck: $(STAMP)
	$(BIN)/mypy --strict

pytest: $(STAMP) system-deps
	$(BIN)/pytest

test: lint typecheck pytest

# Builds the wheel, installs it (with the embedded extra) into a clean venv in a temporary
# directory and runs the commands from there (tests/test_packaging.py).
# The fault group: servers and backends stopped and killed for real, the mirror left to go
# stale (about 5 minutes). `make test` leaves it out to stay under 10 minutes; CI runs both.
test-faults: $(STAMP) system-deps
	$(BIN)/pytest -m faults

# Whole tools run for real that take minutes (the benchmark's quick mode); CI runs them too.
test-slow: $(STAMP) system-deps
	$(BIN)/pytest -m slow

test-package: $(STAMP) system-deps
	$(BIN)/pytest -q -p no:cacheprovider -m package tests/test_packaging.py

bench: $(RUN_STAMP) run-deps
	$(BIN)/runops bench

# make revision NAME=r0005_hardening [MESSAGE="Hardening: what it does"]
# A new revision is its DDL delta, sql/upgrades/$(NAME)/*.sql (write it first); this writes both
# histories' version files for it and records every older revision as released
# (sql/upgrades/released.sha256). Function files need no revision: the upgrade re-applies them at
# head when their checksum changes. Re-run it freely while the revision is the newest.
revision: $(STAMP)
	$(BIN)/python -m runops.ops.revision $(NAME) $(if $(MESSAGE),"$(MESSAGE)")

clean:
	-$(BIN)/runops dev down
	rm -rf .runops $(VENV)
