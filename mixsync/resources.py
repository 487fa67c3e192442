"""Dagster resources shared by every flow: the warehouse and the HTTP retry policy, configured from the environment."""

from __future__ import annotations

import dagster as dg

from mixsync.http import RetryPolicy
from mixsync.settings import WarehouseSettings
from mixsync.warehouse import Warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The DuckDB file (MIXSYNC_DUCKDB_PATH) and where downloads land (MIXSYNC_LANDING_DIR)."""

    def settings(self) -> WarehouseSettings:
        return WarehouseSettings.from_env()

    def warehouse(self) -> Warehouse:
        s = self.settings()
        return Warehouse(s.duckdb_path, memory_limit=s.memory_limit, threads=s.threads,
                         lock_timeout_seconds=s.lock_timeout_seconds)


def retry_policy() -> RetryPolicy:
    return RetryPolicy.from_env()
