# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The instance: dagster_home/dagster.yaml is the configuration; history and storage are written next to it.
export DAGSTER_HOME := $(CURDIR)/dagster_home

.PHONY: help venv lock home demo test check dev sandbox query bench validate clean

help:
	@echo "make demo      run every flow against the sandbox and print what landed"
	@echo "make test      run the test suite"
	@echo "make check     lint (ruff) and type-check (mypy)"
	@echo "make dev       Dagster UI on http://127.0.0.1:3000 (dagster_home/ as the instance)"
	@echo "make sandbox   serve the emulated APIs on loopback"
	@echo "make query SQL='SELECT ...'   read-only SQL on MIXSYNC_DUCKDB_PATH (default data/mixsync.duckdb)"
	@echo "make bench     run the benchmarks (writes bench/out/, see bench/RESULTS.md)"

# The environment is installed from requirements.lock (exact versions); mixsync itself goes in editable, without deps.
$(STAMP): pyproject.toml requirements.lock dagster_cli_notices.pth
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -c 'import shutil, sysconfig; shutil.copy("dagster_cli_notices.pth", sysconfig.get_paths()["purelib"])'
	touch $(STAMP)

venv: $(STAMP)

# Re-resolve pyproject.toml's ranges in a throwaway environment and write the exact versions to requirements.lock.
lock:
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet --upgrade pip
	$(VENV)-lock/bin/python -m pip install --quiet -e '.[dev]'
	( echo "# Exact versions of every package mixsync and its tests use. Regenerate with 'make lock'; 'make venv' installs from it."; \
	  $(VENV)-lock/bin/python -m pip freeze --exclude-editable | grep -v '^-e' ) > requirements.lock
	rm -rf $(VENV)-lock

# Kept for old instructions: the instance folder is part of the repository now.
home:
	@test -f $(DAGSTER_HOME)/dagster.yaml || echo "note: no dagster.yaml in DAGSTER_HOME=$(DAGSTER_HOME): Dagster's defaults apply"

demo: venv home
	$(BIN)/mixsync demo

# The suite's temporary files (DuckDB files, Dagster's SQLite storage, the test Postgres, landing folders) go to a
# private folder on tmpfs where the machine has one: waiting for fsync to reach the disk was half of the suite's wall
# time, and no test needs the disk itself (a SIGKILLed process loses nothing the page cache holds). Set
# TEST_TMP_PARENT to choose another parent folder. The folder is removed afterwards, whatever the outcome.
TEST_TMP_PARENT ?= $(shell test -d /dev/shm -a -w /dev/shm && echo /dev/shm || echo $${TMPDIR:-/tmp})

test: venv
	@tmp=$$(mktemp -d "$(TEST_TMP_PARENT)/mixsync-test-XXXXXX") && chmod 755 "$$tmp" && \
	trap 'rm -rf "$$tmp"' EXIT && echo "test files in $$tmp" && \
	TMPDIR="$$tmp" $(BIN)/python -m pytest -n auto --dist worksteal --durations=15

# Lint and type-check; CI runs this before the tests. `ruff check --fix .` repairs most of what ruff reports.
check: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

validate: venv home
	$(BIN)/dagster definitions validate -m mixsync.definitions

dev: venv home
	$(BIN)/dagster dev -w workspace.yaml

sandbox: venv
	$(BIN)/mixsync sandbox

query: venv
	@$(BIN)/mixsync query "$(SQL)"

bench: venv
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) data bench/out .pytest_cache .mypy_cache .ruff_cache
	find dagster_home -mindepth 1 ! -name dagster.yaml ! -name .gitignore -prune -exec rm -rf {} +
