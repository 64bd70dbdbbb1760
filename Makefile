# runops — two commands on a fresh machine:
#   make run    start the embedded local stores (.runops/) and show the demo
#   make test   every test: lint, types, pytest on two throwaway clusters, pgTAP, plpgsql_check
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench revision clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# Server binaries, pgTAP, pg_prove and plpgsql_check come from the system's packages.
system-deps:
	bash .ci/install-system-deps.sh

run: $(STAMP) system-deps
	$(BIN)/runops dev up
	$(BIN)/runops demo

lint: $(STAMP)
	$(BIN)/ruff check py_client tests bench migrations

typecheck: $(STAMP)
	$(BIN)/mypy --strict

pytest: $(STAMP) system-deps
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(STAMP) system-deps
	$(BIN)/runops bench

# Re-render the shared revision that carries sql/ (only while it is unreleased).
revision: $(STAMP)
	$(BIN)/python -m runops.revision $(NAME)

clean:
	-$(BIN)/runops dev down
	rm -rf .runops $(VENV)
