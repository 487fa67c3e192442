"""`mixsync query` as a real process: it reads the warehouse and nothing else, and says so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mixsync.warehouse import Warehouse

MIXSYNC = str(Path(sys.executable).parent / "mixsync")


@pytest.fixture
def store(tmp_path) -> Warehouse:
    warehouse = Warehouse(tmp_path / "w.duckdb", lock_timeout_seconds=60)
    with warehouse.write() as con:
        con.execute("CREATE TABLE analytics.numbers AS SELECT range AS n FROM range(100000)")
    return warehouse


def query(store: Warehouse, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([MIXSYNC, "query", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MIXSYNC_DUCKDB_PATH": str(store.path), **env})


def test_a_select_works_and_its_result_is_capped(store):
    done = query(store, "SELECT n FROM analytics.numbers ORDER BY n", "--max-rows", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[2:] == ["0", "1", "2", "3", "4", "(5 rows, more not shown)"]


@pytest.mark.parametrize("name, sql", [
    ("copy", "COPY (SELECT 42) TO '{target}'"),
    ("attach", "ATTACH '{target}' AS other (READ_WRITE)"),
    ("read host file", "SELECT * FROM read_csv('/etc/passwd')"),
    ("read host file as text", "SELECT * FROM read_text('/etc/hostname')"),
    ("install", "INSTALL httpfs"),
    ("turn it back on", "SET enable_external_access = true"),
])
def test_files_other_databases_and_extensions_are_refused(store, tmp_path, name, sql):
    target = tmp_path / "escape.out"
    done = query(store, sql.format(target=target))
    assert done.returncode == 1 and not target.exists()
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert ("read-only" in done.stderr) or ("configuration has been locked" in done.stderr), done.stderr


def test_a_locked_warehouse_is_answered_in_one_line_naming_the_setting(store):
    with store.write():  # a writer holds the warehouse for longer than the query will wait
        done = query(store, "SELECT 1", MIXSYNC_LOCK_TIMEOUT_SECONDS="1")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "MIXSYNC_LOCK_TIMEOUT_SECONDS=1s" in line and "busy" in line
