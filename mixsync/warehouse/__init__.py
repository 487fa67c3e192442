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
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import duckdb

from mixsync.warehouse.ducklake import DuckLakeWarehouse, WarehouseLockTimeout
from mixsync.warehouse.schema import SCHEMAS, registered
from mixsync.warehouse.sql import literal as sql_literal
from mixsync.warehouse.sql import memory_limit as memory_limit_sql
from mixsync.warehouse.sql import path as sql_path

if TYPE_CHECKING:
    from mixsync.settings import WarehouseSettings

T = TypeVar("T")

__all__ = ["SCHEMAS", "AnyWarehouse", "DuckLakeWarehouse", "Warehouse", "WarehouseLockTimeout", "ensure_schema",
           "markdown_table", "open_warehouse"]

# DuckDB's Python binding checks every bound parameter for a pandas type by importing pandas, about ten times a
# statement; without pandas installed (mixsync does not need it) each check is a failed import that searches
# sys.path again (~65 µs): 0.7 ms of a statement's 1.1 ms, measured. Recording the absence once makes each check
# instant, and `import pandas` still fails as before (ModuleNotFoundError).
if importlib.util.find_spec("pandas") is None:
    sys.modules.setdefault("pandas", None)  # type: ignore[arg-type]


def configure_session(con: duckdb.DuckDBPyConnection) -> None:
    """The settings each connection (cursor) needs of its own; the rest of `configure`'s belong to the instance."""
    # Instants are stored as TIMESTAMPTZ; rendering them in UTC keeps every query and test unambiguous.
    con.execute("SET TimeZone = 'UTC'")


def configure(con: duckdb.DuckDBPyConnection, memory_limit: str | None, threads: int | None) -> None:
    configure_session(con)
    if memory_limit:
        con.execute(f"SET memory_limit = {memory_limit_sql(memory_limit)}")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    # Bulk loads need no ordering guarantees; dropping them lets DuckDB stream within the memory limit.
    con.execute("SET preserve_insertion_order = false")
    # DuckDB draws a progress bar on the terminal for queries over 2 s; in a Dagster step it is log noise.
    con.execute("SET enable_progress_bar = false")


ReadSettings = Mapping[str, "str | int | bool"]


def apply_settings(con: duckdb.DuckDBPyConnection, settings: ReadSettings) -> None:
    """DuckDB's instance-wide settings by name (mixsync's own constants), a memory limit validated as one."""
    for name, value in settings.items():
        if not name.isidentifier():
            raise ValueError(f"{name!r} is not a DuckDB setting name")
        rendered = memory_limit_sql(str(value), "memory_limit") if name == "memory_limit" else sql_literal(value)
        con.execute(f"SET {name} = {rendered}")


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
    return _retry_while_locked(path, deadline, lambda: duckdb.connect(str(path), read_only=read_only))


def _retry_while_locked(path: Path, deadline: float, open_file: Callable[[], T]) -> T:
    delay = 0.05
    while True:
        try:
            return open_file()
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() >= deadline:
                raise WarehouseLockTimeout(
                    f"could not open {path}: {exc}. Close other sessions on this file (use `mixsync query` for ad-hoc SQL)"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


# Read-write and read-only attachments of a warehouse file in this process's DuckDB instance for it.
_FILE_ALIASES = {False: "warehouse", True: "warehouse_ro"}
# Instances kept for files no connection uses right now: a process works on one warehouse (a test worker on many,
# one after the other), so a few are plenty; the rest are closed.
_IDLE_FILE_INSTANCES = 2


@dataclass
class _FileInstance:
    database: duckdb.DuckDBPyConnection
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Connections using each attachment (read-only or not); `claimed` counts them from before they attach, so an
    # instance another thread is about to use is never closed as idle.
    users: dict[bool, int] = field(default_factory=lambda: {False: 0, True: 0})
    claimed: int = 0


_file_instances: OrderedDict[tuple, _FileInstance] = OrderedDict()
_file_instances_lock = threading.Lock()


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

    def _instance(self) -> _FileInstance:
        """This process's DuckDB instance for this file. Creating one costs ~20 ms of CPU (DuckDB registers its
        functions), half of what opening the file took on each connection; attaching the file to a kept instance
        costs the other half. Keyed by process too: an instance is never shared across a fork."""
        key = (os.getpid(), str(self.path.resolve()), self.memory_limit, self.threads)
        with _file_instances_lock:
            instance = _file_instances.get(key)
            if instance is None:
                for other_key, other in list(_file_instances.items()):
                    if sum(1 for kept in _file_instances.values() if not kept.claimed) < _IDLE_FILE_INSTANCES:
                        break
                    if not other.claimed:
                        del _file_instances[other_key]
                        with contextlib.suppress(duckdb.Error):
                            other.database.close()
                database = duckdb.connect()
                try:
                    configure(database, self.memory_limit, self.threads)
                    # Spill where a connection to the file itself would: beside it, not into memory-backed /tmp.
                    database.execute(f"SET temp_directory = {sql_path(str(self.path) + '.tmp')}")
                except BaseException:
                    database.close()
                    raise
                instance = _file_instances[key] = _FileInstance(database)
            _file_instances.move_to_end(key)
            instance.claimed += 1
            return instance

    @contextlib.contextmanager
    def _connection(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor whose default database is the file, attached while any cursor in this process uses it and
        detached (checkpointed and closed, so other processes can open it) when the last one is done."""
        instance = self._instance()
        alias = _FILE_ALIASES[read_only]
        try:
            with instance.lock:
                if not instance.users[read_only]:
                    options = " (READ_ONLY)" if read_only else ""
                    _retry_while_locked(
                        self.path, time.monotonic() + self.lock_timeout_seconds,
                        lambda: instance.database.execute(f"ATTACH {sql_path(self.path)} AS {alias}{options}"))
                instance.users[read_only] += 1
            try:
                con = instance.database.cursor()
                try:
                    configure(con, None, None)
                    con.execute(f"USE {alias}")
                    yield con
                finally:
                    con.close()
            finally:
                with instance.lock:
                    instance.users[read_only] -= 1
                    if not instance.users[read_only]:
                        instance.database.execute(f"DETACH {alias}")
        finally:
            with _file_instances_lock:
                instance.claimed -= 1

    def prepare(self) -> None:
        """What opening a write connection costs before its lock: this process's DuckDB instance for the file
        (attaching the file itself needs the writer lock). The next `write()` finds it ready."""
        instance = self._instance()
        with _file_instances_lock:
            instance.claimed -= 1

    @contextlib.contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection with the schema in place; close it as soon as the write is done."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(self.lock_path, exclusive=True, timeout_seconds=self.lock_timeout_seconds), \
                self._connection(read_only=False) as con:
            ensure_schema(con)
            yield con

    @contextlib.contextmanager
    def read(self, private: bool = False, settings: ReadSettings | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection that waits for running writes instead of breaking them.

        `private=True` gives a DuckDB instance of its own, closed afterwards, whose settings the caller may change
        or lock (`mixsync query` does) without touching this process's shared instance. `settings` (instance-wide
        DuckDB settings, such as the outbox snapshot's single thread) gives an instance that only reads with
        exactly these; on a file, a private one (opening it costs ~35 ms).
        """
        if not self.path.exists():
            raise FileNotFoundError(f"no warehouse at {self.path}: materialize an asset first (MIXSYNC_DUCKDB_PATH)")
        with _file_lock(self.lock_path, exclusive=False, timeout_seconds=self.lock_timeout_seconds):
            if not private and not settings:
                with self._connection(read_only=True) as con:
                    yield con
                return
            con = _open_with_retry(self.path, True, time.monotonic() + self.lock_timeout_seconds)
            try:
                configure(con, self.memory_limit, self.threads)
                apply_settings(con, settings or {})
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
