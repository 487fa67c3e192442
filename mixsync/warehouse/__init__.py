"""The warehouse engine: two backends behind one interface, the writer locks, and every schema mixsync owns.

`Warehouse` is a native DuckDB file (writers queue on a file lock beside it: one host). `DuckLakeWarehouse`
(mixsync/warehouse/ducklake.py) is a DuckLake on a Postgres catalog (writers queue on a Postgres advisory lock:
any number of hosts). Both give `write()` and `read()` connections on which every flow's SQL runs unchanged.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from mixsync.warehouse.ducklake import DuckLakeWarehouse, WarehouseLockTimeout
from mixsync.warehouse.schema import SCHEMAS, registered
from mixsync.warehouse.sql import memory_limit as memory_limit_sql

if TYPE_CHECKING:
    from mixsync.settings import WarehouseSettings

__all__ = ["SCHEMAS", "AnyWarehouse", "DuckLakeWarehouse", "Warehouse", "WarehouseLockTimeout", "ensure_schema",
           "markdown_table", "open_warehouse"]

# DuckDB's Python binding checks every bound parameter for a pandas type by importing pandas, about ten times a
# statement; without pandas installed (mixsync does not need it) each check is a failed import that searches
# sys.path again (~65 µs): 0.7 ms of a statement's 1.1 ms, measured. Recording the absence once makes each check
# instant, and `import pandas` still fails as before (ModuleNotFoundError).
if importlib.util.find_spec("pandas") is None:
    sys.modules.setdefault("pandas", None)  # type: ignore[arg-type]


def configure(con: duckdb.DuckDBPyConnection, memory_limit: str | None, threads: int | None) -> None:
    # Instants are stored as TIMESTAMPTZ; rendering them in UTC keeps every query and test unambiguous.
    con.execute("SET TimeZone = 'UTC'")
    if memory_limit:
        con.execute(f"SET memory_limit = {memory_limit_sql(memory_limit)}")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    # Bulk loads need no ordering guarantees; dropping them lets DuckDB stream within the memory limit.
    con.execute("SET preserve_insertion_order = false")
    # DuckDB draws a progress bar on the terminal for queries over 2 s; in a Dagster step it is log noise.
    con.execute("SET enable_progress_bar = false")


@contextlib.contextmanager
def _file_lock(lock_path: Path, exclusive: bool, timeout_seconds: float) -> Iterator[None]:
    """Queue writers (and readers) of one DuckDB file across processes instead of failing on DuckDB's lock."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout_seconds
        delay = 0.01
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WarehouseLockTimeout(
                        f"waited {timeout_seconds:.0f}s for {lock_path.name}: another mixsync process kept the warehouse; "
                        "raise MIXSYNC_LOCK_TIMEOUT_SECONDS or look for a stuck run"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        yield
    finally:
        os.close(fd)


def _open_with_retry(path: Path, read_only: bool, deadline: float) -> duckdb.DuckDBPyConnection:
    """Open the file, waiting out a non-mixsync holder (an ad-hoc `duckdb` session) until the deadline."""
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                raise WarehouseLockTimeout(
                    f"could not open {path}: {exc}. Close other sessions on this file (use `mixsync query` for ad-hoc SQL)"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


class Warehouse:
    """One DuckDB file. Writers hold an exclusive file lock only for the short write; readers share it."""

    kind = "duckdb"

    def __init__(self, path: Path | str, memory_limit: str | None = "256MB", threads: int | None = 2,
                 lock_timeout_seconds: float = 900):
        self.path = Path(path)
        self.memory_limit = memory_limit
        self.threads = threads
        self.lock_timeout_seconds = lock_timeout_seconds

    def __repr__(self) -> str:
        return f"Warehouse({str(self.path)!r})"

    @property
    def description(self) -> str:
        return f"DuckDB file {self.path}"

    @staticmethod
    def adapt_ddl(ddl: str) -> str:
        return ddl

    def maintain(self, con: duckdb.DuckDBPyConnection, keep_days: int) -> dict:
        """Write the WAL into the file and reclaim the space of deleted rows (a file keeps no old versions)."""
        con.execute("CHECKPOINT")
        return {"checkpointed": True}

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".writer.lock")

    @contextlib.contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection with the schema in place; close it as soon as the write is done."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.lock_path, exclusive=True, timeout_seconds=self.lock_timeout_seconds):
            con = _open_with_retry(self.path, False, time.monotonic() + self.lock_timeout_seconds)
            try:
                configure(con, self.memory_limit, self.threads)
                ensure_schema(con)
                yield con
            finally:
                con.close()

    @contextlib.contextmanager
    def read(self, private: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection that waits for running writes instead of breaking them (always its own
        connection, so `private` changes nothing here)."""
        if not self.path.exists():
            raise FileNotFoundError(f"no warehouse at {self.path}: materialize an asset first (MIXSYNC_DUCKDB_PATH)")
        with _file_lock(self.lock_path, exclusive=False, timeout_seconds=self.lock_timeout_seconds):
            con = _open_with_retry(self.path, True, time.monotonic() + self.lock_timeout_seconds)
            try:
                configure(con, self.memory_limit, self.threads)
                yield con
            finally:
                con.close()


AnyWarehouse = Warehouse | DuckLakeWarehouse


def open_warehouse(settings: WarehouseSettings) -> AnyWarehouse:
    """The backend MIXSYNC_WAREHOUSE names, configured from the settings."""
    if settings.backend == "ducklake":
        assert settings.ducklake_catalog and settings.ducklake_data_path  # from_env requires both
        return DuckLakeWarehouse(settings.ducklake_catalog, settings.ducklake_data_path,
                                 memory_limit=settings.memory_limit, threads=settings.threads,
                                 lock_timeout_seconds=settings.lock_timeout_seconds)
    return Warehouse(settings.duckdb_path, memory_limit=settings.memory_limit, threads=settings.threads,
                     lock_timeout_seconds=settings.lock_timeout_seconds)


def ensure_schema(con: duckdb.DuckDBPyConnection, adapt: Callable[[str], str] | None = None,
                  applied: set | None = None) -> None:
    """Create every schema and the tables of every registered flow; idempotent, run on each write connection,
    and a no-op (one query) when this DDL was already applied to this warehouse.

    With `adapt` (a DuckLake), the DDL is first made portable, and it runs only when it changed since it was
    last applied: each DDL statement on a lake is a catalog commit, which every write connection would repeat.
    """
    flows = registered()
    if adapt is not None:
        ddl = "\n".join(adapt(flow.ddl) for flow in flows)
        digest = hashlib.sha256(ddl.encode()).hexdigest()
        if applied is not None and digest in applied:
            return
        con.execute("CREATE SCHEMA IF NOT EXISTS sync")
        con.execute("CREATE TABLE IF NOT EXISTS sync.warehouse_schema (ddl_sha256 VARCHAR, applied_at TIMESTAMPTZ)")
        if not con.execute("SELECT count(*) FROM sync.warehouse_schema WHERE ddl_sha256 = ?", [digest]).fetchone()[0]:
            # One transaction: one catalog commit instead of one per statement.
            con.execute("BEGIN TRANSACTION")
            for schema in SCHEMAS:
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            con.execute(ddl)
            con.execute("INSERT INTO sync.warehouse_schema VALUES (?, ?)", [digest, dt.datetime.now(dt.UTC)])
            con.execute("COMMIT")
        if applied is not None:
            applied.add(digest)
        return
    # A file: the DDL (and the migrations, by their code) since it was last applied to this file, checked in one
    # query instead of re-running every flow's ~60 statements on each write connection (~0.06 s a connection).
    # A process that registers more flows than the last one has another digest and creates their tables.
    digest = _file_schema_digest(flows)
    try:
        if con.execute("SELECT count(*) FROM sync.warehouse_schema WHERE ddl_sha256 = ?", [digest]).fetchone()[0]:
            return
    except duckdb.CatalogException:
        pass  # a new file, or one from before the digest: create everything
    for schema in SCHEMAS:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    for flow in flows:
        if flow.migrate is not None:
            flow.migrate(con)
        if flow.ddl.strip():
            con.execute(flow.ddl)
    if flows:  # nothing registered: nothing to remember (the file keeps no table of mixsync's of its own)
        con.execute("CREATE TABLE IF NOT EXISTS sync.warehouse_schema (ddl_sha256 VARCHAR, applied_at TIMESTAMPTZ)")
        con.execute("INSERT INTO sync.warehouse_schema VALUES (?, ?)", [digest, dt.datetime.now(dt.UTC)])


def _file_schema_digest(flows: list) -> str:
    """The registered flows' DDL and migrations (their compiled code), as one sha256."""
    digest = hashlib.sha256()
    for flow in flows:
        digest.update(flow.name.encode() + b"\0" + flow.ddl.encode() + b"\0")
        if flow.migrate is not None:
            code = flow.migrate.__code__
            digest.update(code.co_code + repr(code.co_consts).encode() + repr(code.co_names).encode())
    return digest.hexdigest()


def markdown_table(con: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> str:
    """A small markdown preview of a query, for Dagster metadata."""
    cursor = con.execute(sql, params or [])
    columns = [d[0] for d in cursor.description]
    rows = cursor.fetchall()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(v).replace("|", "\\|").replace("\n", " ")[:80] for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
