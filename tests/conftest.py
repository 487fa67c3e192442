"""Shared fixtures: a sandbox on free loopback ports, a temporary DuckDB file, a Dagster instance for tests."""

from __future__ import annotations

import datetime as dt
import os

# Daily partitions are defined when mixsync is imported; start them early enough for every test's days.
os.environ.setdefault("MIXPANEL_START_DATE", "2024-01-01")

import dagster as dg
import pytest

from mixsync.sandbox import Sandbox
from mixsync.sandbox.data import Dataset
from mixsync.settings import WarehouseSettings
from mixsync.warehouse import Warehouse

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


@pytest.fixture
def env(sandbox, tmp_path, monkeypatch) -> dict[str, str]:
    """Point mixsync at the sandbox and a fresh DuckDB file, with retries fast enough for tests."""
    values = {
        **sandbox.env(),
        **FAST_RETRIES,
        "MIXSYNC_DUCKDB_PATH": str(tmp_path / "warehouse.duckdb"),
        "MIXSYNC_LANDING_DIR": str(tmp_path / "landing"),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def warehouse(env) -> Warehouse:
    s = WarehouseSettings.from_env()
    return Warehouse(s.duckdb_path, lock_timeout_seconds=60)


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def impressions_env(env, tmp_path, monkeypatch) -> dict[str, str]:
    """`env` plus the impressions flow's folder in tmp_path; no settle wait (the tests write files atomically)."""
    values = {"MIXSYNC_IMPRESSIONS_DIR": str(tmp_path / "impressions"), "MIXSYNC_IMPRESSIONS_SETTLE_SECONDS": "0"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return {**env, **values}
