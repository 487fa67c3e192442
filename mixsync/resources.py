"""Dagster resources shared by every flow: the warehouse and the HTTP retry policy, and how resources are configured.

Every setting is a typed field of its resource, named after its environment variable (`env_setting`). The
definitions bind each field whose variable is set to `dg.EnvVar(...)`, so Dagster resolves it when a run starts,
the UI shows which variable feeds which field, and a deployment can override any field in run config. A field
left unset reads its variable when the asset runs, and else takes the documented default: the code location
loads with no service's settings, and a missing or invalid one fails only the assets that need it, with a
message naming the variable. Secrets are only ever bound as `dg.EnvVar`, never resolved into the definitions.
"""

from __future__ import annotations

import os
from collections import ChainMap
from collections.abc import Mapping
from typing import Any, Self

import dagster as dg
from pydantic import Field

from mixsync.http import RetryPolicy
from mixsync.settings import WarehouseSettings
from mixsync.warehouse import AnyWarehouse, open_warehouse

# Dagster exports EnvVar but not the class of EnvVar.int(...): take it from an instance.
_INT_ENV_VAR = type(dg.EnvVar.int("MIXSYNC_UNUSED"))


def env_setting(variable: str, description: str) -> Any:
    """A resource field holding the setting of environment variable `variable` (None: read the variable)."""
    return Field(default=None, description=f"{variable}: {description}", json_schema_extra={"env": variable})


def _variable(field: Any) -> str | None:
    extra = field.json_schema_extra
    return extra.get("env") if isinstance(extra, dict) else None


def _is_int(annotation: Any) -> bool:
    return annotation is int or int in getattr(annotation, "__args__", ())


class EnvConfiguredResource(dg.ConfigurableResource):
    """A resource whose fields are settings, each named after its environment variable."""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Self:
        """The resource with each field whose variable is set (now) bound to `dg.EnvVar`, resolved at run start."""
        environ = os.environ if environ is None else environ
        bound: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            variable = _variable(field)
            if variable and (environ.get(variable) or "").strip():
                bound[name] = dg.EnvVar.int(variable) if _is_int(field.annotation) else dg.EnvVar(variable)
        return cls(**bound)

    def environ(self) -> Mapping[str, str]:
        """The settings as environment variables: the fields that are set, over the process environment."""
        values: dict[str, str] = {}
        for name, field in type(self).model_fields.items():
            variable = _variable(field)
            value = getattr(self, name)
            if variable is None or value is None:
                continue
            if isinstance(value, (dg.EnvVar, _INT_ENV_VAR)):  # not resolved by a run (a direct call): read it now
                value = os.environ.get(variable)
                if value is None:
                    continue
            values[variable] = str(value)
        return ChainMap(values, os.environ)


class HttpResource(EnvConfiguredResource):
    """A service resource: its retry policy's fields, shared by every service that calls an HTTP API."""

    http_attempts: int | None = env_setting("MIXSYNC_HTTP_ATTEMPTS", "attempts per request (default 8)")
    http_backoff_ms: int | None = env_setting("MIXSYNC_HTTP_BACKOFF_MS", "first backoff in ms (default 2000)")
    http_backoff_max_ms: int | None = env_setting("MIXSYNC_HTTP_BACKOFF_MAX_MS", "longest backoff in ms (default 60000)")
    http_max_retry_after_seconds: int | None = env_setting(
        "MIXSYNC_HTTP_MAX_RETRY_AFTER_SECONDS", "longest Retry-After honoured before failing (default 900)")

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy.from_env(self.environ())


class WarehouseResource(EnvConfiguredResource):
    """The warehouse (MIXSYNC_WAREHOUSE: the DuckDB file at MIXSYNC_DUCKDB_PATH or a DuckLake) and where
    downloads land (MIXSYNC_LANDING_DIR)."""

    duckdb_path: str | None = env_setting("MIXSYNC_DUCKDB_PATH", "the DuckDB file (default data/mixsync.duckdb)")
    landing_dir: str | None = env_setting("MIXSYNC_LANDING_DIR", "where downloads land (default data/landing)")
    duckdb_memory_limit: str | None = env_setting("MIXSYNC_DUCKDB_MEMORY_LIMIT", "DuckDB's memory limit (default 256MB)")
    duckdb_threads: int | None = env_setting("MIXSYNC_DUCKDB_THREADS", "DuckDB's threads (default 2)")
    lock_timeout_seconds: int | None = env_setting(
        "MIXSYNC_LOCK_TIMEOUT_SECONDS", "how long a writer waits for the warehouse (default 900)")
    backend: str | None = env_setting("MIXSYNC_WAREHOUSE", "duckdb or ducklake (default duckdb)")
    ducklake_catalog: str | None = env_setting("MIXSYNC_DUCKLAKE_CATALOG", "libpq connection string of the catalog")
    ducklake_data_path: str | None = env_setting("MIXSYNC_DUCKLAKE_DATA_PATH", "the lake's data folder or s3:// prefix")
    ducklake_snapshot_retention_days: int | None = env_setting("MIXSYNC_DUCKLAKE_SNAPSHOT_RETENTION_DAYS",
                                                               "days of snapshots kept by warehouse_maintenance")

    def settings(self) -> WarehouseSettings:
        return WarehouseSettings.from_env(self.environ())

    def warehouse(self) -> AnyWarehouse:
        """The backend MIXSYNC_WAREHOUSE names: the DuckDB file (default) or a DuckLake on Postgres."""
        return open_warehouse(self.settings())
