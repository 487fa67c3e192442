"""Typed settings read from the environment: one place for names, defaults and validation."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from mixsync.warehouse import sql

DEFAULT_DUCKDB_PATH = "data/mixsync.duckdb"
DEFAULT_LANDING_DIR = "data/landing"
# The first daily partition when MIXPANEL_START_DATE is not set: fixed, so partitions never move.
DEFAULT_START_DATE = "2025-01-01"

MIXPANEL_REGIONS = {
    # region: (raw export host, query API base, ingestion host)
    "us": ("https://data.mixpanel.com", "https://mixpanel.com/api/query", "https://api.mixpanel.com"),
    "eu": ("https://data-eu.mixpanel.com", "https://eu.mixpanel.com/api/query", "https://api-eu.mixpanel.com"),
    "in": ("https://data-in.mixpanel.com", "https://in.mixpanel.com/api/query", "https://api-in.mixpanel.com"),
}


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the environment variable."""


class Secret:
    """A credential that never shows itself in reprs, f-strings, logs or Dagster metadata."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    @property
    def value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def require(environ: Mapping[str, str], name: str, why: str) -> str:
    value = _env(environ, name)
    if value is None:
        raise SettingsError(f"{name} is not set: {why}")
    return value


def parse_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    value = _env(environ, name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={value!r} is not a boolean: use true or false")


def parse_int(environ: Mapping[str, str], name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    value = _env(environ, name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not a whole number") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise SettingsError(f"{name}={number} is out of range: it must be {bound}")
    return number


def parse_date(environ: Mapping[str, str], name: str, default: str | None = None) -> dt.date:
    value = _env(environ, name) or default
    if value is None:
        raise SettingsError(f"{name} is not set: give the first day to load as YYYY-MM-DD")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not a date: use YYYY-MM-DD") from None


@overload
def parse_url(environ: Mapping[str, str], name: str, default: str) -> str: ...
@overload
def parse_url(environ: Mapping[str, str], name: str, default: None = None) -> str | None: ...
def parse_url(environ: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = _env(environ, name) or default
    if value is None:
        return None
    if not value.startswith(("http://", "https://")):
        raise SettingsError(f"{name}={value!r} is not an http(s) URL")
    return value.rstrip("/")


def parse_memory_limit(environ: Mapping[str, str], name: str, default: str) -> str:
    """A DuckDB memory limit (256MB, 2GB, 50%), checked here so a typo fails with the variable's name, not in SQL."""
    value = _env(environ, name) or default
    try:
        sql.memory_limit(value, name)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    return value


def parse_timezone(environ: Mapping[str, str], name: str, default: str) -> str:
    value = _env(environ, name) or default
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError(f"{name}={value!r} is not an IANA time zone such as Europe/Berlin") from None
    return value


WAREHOUSE_BACKENDS = ("duckdb", "ducklake")


def parse_ducklake_catalog(environ: Mapping[str, str]) -> str:
    """MIXSYNC_DUCKLAKE_CATALOG: a libpq key=value string; the password belongs in PGPASSWORD, never here."""
    value = require(environ, "MIXSYNC_DUCKLAKE_CATALOG",
                    "MIXSYNC_WAREHOUSE=ducklake needs the Postgres catalog, e.g. 'dbname=mixsync host=db port=5432 user=mixsync'")
    if "://" in value:
        raise SettingsError("MIXSYNC_DUCKLAKE_CATALOG is a URL: give libpq key=value pairs instead, "
                            "e.g. 'dbname=mixsync host=db port=5432 user=mixsync'")
    if "password" in value.lower():
        # Not echoed: the value holds a password.
        raise SettingsError("MIXSYNC_DUCKLAKE_CATALOG contains a password: remove it and set PGPASSWORD instead "
                            "(the catalog string shows up in run metadata and logs)")
    if "dbname=" not in value:
        raise SettingsError(f"MIXSYNC_DUCKLAKE_CATALOG={value!r} names no database: add dbname=...")
    return value


@dataclass(frozen=True)
class WarehouseSettings:
    duckdb_path: Path
    landing_dir: Path
    memory_limit: str
    threads: int
    lock_timeout_seconds: int
    backend: str = "duckdb"
    ducklake_catalog: str | None = None
    ducklake_data_path: str | None = None
    snapshot_retention_days: int = 7

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WarehouseSettings:
        environ = os.environ if environ is None else environ
        backend = (_env(environ, "MIXSYNC_WAREHOUSE") or "duckdb").lower()
        if backend not in WAREHOUSE_BACKENDS:
            raise SettingsError(f"MIXSYNC_WAREHOUSE={backend!r} is not one of duckdb, ducklake")
        catalog = data_path = None
        if backend == "ducklake":
            catalog = parse_ducklake_catalog(environ)
            data_path = require(environ, "MIXSYNC_DUCKLAKE_DATA_PATH",
                                "MIXSYNC_WAREHOUSE=ducklake needs where the Parquet files go (a folder or s3://bucket/prefix)")
            if "://" not in data_path:
                data_path = str(Path(data_path).expanduser().absolute())
        return cls(
            duckdb_path=Path(_env(environ, "MIXSYNC_DUCKDB_PATH") or DEFAULT_DUCKDB_PATH).expanduser().absolute(),
            landing_dir=Path(_env(environ, "MIXSYNC_LANDING_DIR") or DEFAULT_LANDING_DIR).expanduser().absolute(),
            memory_limit=parse_memory_limit(environ, "MIXSYNC_DUCKDB_MEMORY_LIMIT", "256MB"),
            threads=parse_int(environ, "MIXSYNC_DUCKDB_THREADS", 2, minimum=1, maximum=256),
            lock_timeout_seconds=parse_int(environ, "MIXSYNC_LOCK_TIMEOUT_SECONDS", 900, minimum=1),
            backend=backend,
            ducklake_catalog=catalog,
            ducklake_data_path=data_path,
            snapshot_retention_days=parse_int(environ, "MIXSYNC_DUCKLAKE_SNAPSHOT_RETENTION_DAYS", 7, minimum=0),
        )


@dataclass(frozen=True)
class MixpanelSettings:
    project_id: str
    username: str = field(repr=False)  # the legacy MIXPANEL_API_SECRET goes here: never shown
    secret: Secret = field(repr=False)
    region: str
    export_url: str
    query_url: str
    ingestion_url: str
    start_date: dt.date
    project_timezone: str
    legacy_local_time: bool
    export_window_days: int
    lookback_days: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MixpanelSettings:
        environ = os.environ if environ is None else environ
        project_id = require(environ, "MIXPANEL_PROJECT_ID", "the numeric id of your Mixpanel project")
        if not project_id.isdigit():
            raise SettingsError(f"MIXPANEL_PROJECT_ID={project_id!r} is not a numeric project id")
        username = _env(environ, "MIXPANEL_SERVICE_ACCOUNT_USERNAME")
        secret = _env(environ, "MIXPANEL_SERVICE_ACCOUNT_SECRET")
        legacy_secret = _env(environ, "MIXPANEL_API_SECRET")
        if username and secret:
            pass
        elif username and not secret:
            raise SettingsError("MIXPANEL_SERVICE_ACCOUNT_SECRET is not set: it goes with MIXPANEL_SERVICE_ACCOUNT_USERNAME")
        elif secret and not username:
            raise SettingsError("MIXPANEL_SERVICE_ACCOUNT_USERNAME is not set: it goes with MIXPANEL_SERVICE_ACCOUNT_SECRET")
        elif legacy_secret:
            # Legacy project API secret: Basic auth with the secret as username and an empty password.
            username, secret = legacy_secret, ""
        else:
            raise SettingsError(
                "MIXPANEL_SERVICE_ACCOUNT_USERNAME and MIXPANEL_SERVICE_ACCOUNT_SECRET are not set "
                "(or the legacy MIXPANEL_API_SECRET): Mixpanel needs credentials"
            )
        region = (_env(environ, "MIXPANEL_REGION") or "us").lower()
        if region not in MIXPANEL_REGIONS:
            raise SettingsError(f"MIXPANEL_REGION={region!r} is not one of us, eu, in")
        base_url = parse_url(environ, "MIXPANEL_BASE_URL")
        if base_url:
            export_url, query_url, ingestion_url = base_url, f"{base_url}/api/query", base_url
        else:
            export_url, query_url, ingestion_url = MIXPANEL_REGIONS[region]
        return cls(
            project_id=project_id,
            username=username,
            secret=Secret(secret),
            region=region,
            export_url=export_url,
            query_url=query_url,
            ingestion_url=ingestion_url,
            start_date=partitions_start_date(environ),
            project_timezone=parse_timezone(environ, "MIXPANEL_PROJECT_TIMEZONE", "UTC"),
            legacy_local_time=parse_bool(environ, "MIXPANEL_LEGACY_LOCAL_TIME", False),
            export_window_days=parse_int(environ, "MIXPANEL_EXPORT_WINDOW_DAYS", 31, minimum=1, maximum=366),
            lookback_days=parse_int(environ, "MIXPANEL_LOOKBACK_DAYS", 3, minimum=0, maximum=60),
        )


def partitions_start_date(environ: Mapping[str, str] | None = None) -> dt.date:
    """The first daily partition; read at import time, so an unset value must not break loading.

    The default is a fixed day, not "some days ago": a start that moved every day made the oldest partitions,
    and their materializations, vanish from the UI.
    """
    environ = os.environ if environ is None else environ
    return parse_date(environ, "MIXPANEL_START_DATE", DEFAULT_START_DATE)
