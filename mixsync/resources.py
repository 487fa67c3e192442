"""Dagster resources shared by every flow: the warehouse and the HTTP retry policy, configured from the environment."""

from __future__ import annotations

import dagster as dg

from mixsync.http import RetryPolicy
from mixsync.settings import WarehouseSettings
from mixsync.warehouse import AnyWarehouse, open_warehouse


class WarehouseResource(dg.ConfigurableResource):
    """The warehouse (MIXSYNC_WAREHOUSE: the DuckDB file at MIXSYNC_DUCKDB_PATH or a DuckLake) and where
    downloads land (MIXSYNC_LANDING_DIR)."""

    def settings(self) -> WarehouseSettings:
        return WarehouseSettings.from_env()

    def warehouse(self) -> AnyWarehouse:
        """The backend MIXSYNC_WAREHOUSE names: the DuckDB file (default) or a DuckLake on Postgres."""
        return open_warehouse(self.settings())


def retry_policy() -> RetryPolicy:
    return RetryPolicy.from_env()
