"""The DuckLake backend: tables in a DuckLake (catalog in Postgres, data as Parquet in a folder or object store).

Every connection is an in-memory DuckDB that attaches the lake as its default catalog, so each flow's SQL
(schemas mixpanel, split, flagsmith, sync, analytics) runs unchanged. Writers serialize through a Postgres
advisory lock on the catalog database, which holds across hosts; readers need no lock (snapshot isolation).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from mixsync.warehouse.sql import literal

if TYPE_CHECKING:
    from mixsync.warehouse import ReadSettings

# Parquet row groups of 20,000 rows: DuckDB's default (122,880) ran out of memory at a 256 MB limit while
# loading a 500,000-event day; 20,000 loads fine and faster (docs: notes/ducklake-and-postgres.md).
PARQUET_ROW_GROUP_SIZE = 20000
# pg_advisory_lock takes one 64-bit key; this one is "mixsync warehouse writer" hashed, fixed forever.
WRITER_LOCK_KEY = int.from_bytes(hashlib.sha256(b"mixsync warehouse writer").digest()[:8], "big", signed=True)
# Column compression clauses are a native-file feature; DuckLake refuses them (it compresses Parquet itself).
_COMPRESSION_CLAUSE = re.compile(r"\s+USING\s+COMPRESSION\s+\w+", re.IGNORECASE)


class LakeNotCreated(ConnectionError):
    """The catalog holds no DuckLake yet (and the caller may not create one)."""


@dataclass
class _LakeInstance:
    """A DuckDB instance with the extensions loaded and (at most) one lake attached, and its open connections."""

    database: duckdb.DuckDBPyConnection
    lake: tuple[str, str] | None = None
    attached: set[str] = field(default_factory=set)
    users: int = 0


_databases: dict[tuple, _LakeInstance] = {}
_databases_lock = threading.Lock()
# The lake attached read-write is `lake` (maintenance calls `lake.…` functions); read connections use `lake_ro`,
# attached READ_ONLY in the same instance, so a read connection cannot write even by mistake.
_READ_WRITE_ALIAS = "lake"
_READ_ONLY_ALIAS = "lake_ro"
# Digests of the DDL this process has already seen applied, per catalog: skips even the check.
_applied_ddl: dict[str, set[str]] = {}


def is_lake(con: duckdb.DuckDBPyConnection) -> bool:
    """Whether `con` writes to a DuckLake (a write connection's default catalog is the lake attached read-write)."""
    return con.execute("SELECT current_database()").fetchone()[0] == _READ_WRITE_ALIAS


class WarehouseLockTimeout(RuntimeError):
    """Another process kept the warehouse longer than the configured lock timeout."""


def _extension_files() -> dict[str, Path]:
    """The DuckDB extensions DuckLake needs, from the PyPI wheels (DuckDB's extension server is not needed)."""
    import duckdb_extension_ducklake
    import duckdb_extension_postgres

    files = {}
    for name, module in (("ducklake", duckdb_extension_ducklake), ("postgres", duckdb_extension_postgres)):
        found = sorted(Path(module.__file__).parent.glob(f"extensions/v{duckdb.__version__}/*.duckdb_extension"))
        if not found:
            raise RuntimeError(f"the duckdb-extension-{name} wheel has no build for DuckDB {duckdb.__version__}: "
                               "install the versions in requirements.lock")
        files[name] = found[0]
    return files


def extension_directory() -> Path:
    """Where mixsync installs DuckDB's extensions: a per-version cache folder on local disk, rebuilt when gone."""
    return Path(tempfile.gettempdir()) / f"mixsync-duckdb-{duckdb.__version__}-extensions"


def load_extensions(con: duckdb.DuckDBPyConnection) -> None:
    """INSTALL the wheels' files into our extension directory (once per host; a file lock orders processes), LOAD."""
    directory = extension_directory()
    directory.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET extension_directory = {literal(str(directory))}")
    # Never reach for DuckDB's extension server: offline machines would hang or fail on it.
    con.execute("SET autoinstall_known_extensions = false")
    with open(directory / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for file in _extension_files().values():
            con.execute(f"INSTALL {literal(str(file))}")
    for name in ("ducklake", "postgres"):
        con.execute(f"LOAD {name}")


# Idle Postgres sessions for the writer lock, per process, for the catalog it wrote to last. A session of its own
# per write cost a new Postgres backend each time (~10 ms of the server's CPU and ~20 ms of waiting, measured); a
# kept one holds no lock between writes (each write unlocks before giving it back) and dies with the process.
_lock_sessions: dict[tuple[int, str], list] = {}
_lock_sessions_lock = threading.Lock()
_IDLE_LOCK_SESSIONS = 2


def _lock_session(catalog: str):
    """A Postgres session for the writer lock: a kept idle one that still answers, else a new one."""
    import psycopg2

    key = (os.getpid(), catalog)
    while True:
        with _lock_sessions_lock:
            idle = _lock_sessions.get(key)
            pg = idle.pop() if idle else None
        if pg is None:
            pg = psycopg2.connect(catalog, application_name="mixsync writer lock")
            pg.autocommit = True
            return pg
        try:
            with pg.cursor() as cur:
                cur.execute("SELECT 1")
            return pg
        except psycopg2.Error:  # the server restarted or dropped the session while it was idle
            pg.close()


def _keep_lock_session(catalog: str, pg) -> None:
    """Keep `pg` idle for the next write to `catalog`; a process that moved on to another catalog (a test, one lake
    after the other) closes the sessions it kept for the others, so idle sessions never pile up on a server."""
    stale = []
    with _lock_sessions_lock:
        key = (os.getpid(), catalog)
        # Only this process's own: a forked child closing its parent's sessions would end them for the parent.
        for other in [k for k in _lock_sessions if k[0] == key[0] and k != key]:
            stale += _lock_sessions.pop(other)
        idle = _lock_sessions.setdefault(key, [])
        if not pg.closed and len(idle) < _IDLE_LOCK_SESSIONS:
            idle.append(pg)
        else:
            stale.append(pg)
    for session in stale:
        session.close()


@contextlib.contextmanager
def advisory_lock(catalog: str, timeout_seconds: float) -> Iterator[None]:
    """Hold the Postgres advisory writer lock on the catalog database; it holds across hosts and is released
    by Postgres itself if this process dies (the session ends)."""
    pg = _lock_session(catalog)
    unlocked = False
    try:
        deadline = time.monotonic() + timeout_seconds
        delay = 0.01
        with pg.cursor() as cur:
            while True:
                cur.execute("SELECT pg_try_advisory_lock(%s)", [WRITER_LOCK_KEY])
                if cur.fetchone()[0]:
                    break
                if time.monotonic() >= deadline:
                    unlocked = True  # never taken
                    raise WarehouseLockTimeout(
                        f"waited {timeout_seconds:.0f}s for the warehouse writer lock (a Postgres advisory lock on "
                        "the DuckLake catalog): another mixsync process kept it; raise MIXSYNC_LOCK_TIMEOUT_SECONDS "
                        "or look for a stuck run")
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        try:
            yield
        finally:
            with pg.cursor() as cur:
                cur.execute("SELECT pg_advisory_unlock(%s)", [WRITER_LOCK_KEY])
                unlocked = cur.fetchone()[0]
    finally:
        # Kept only when it surely holds no lock; otherwise closing it ends the session and with it the lock.
        if unlocked:
            _keep_lock_session(catalog, pg)
        else:
            pg.close()


class DuckLakeWarehouse:
    """A DuckLake whose catalog is the Postgres database `catalog` (libpq key=value string; the password comes
    from PGPASSWORD) and whose Parquet files live under `data_path` (a folder or s3://bucket/prefix)."""

    kind = "ducklake"

    def __init__(self, catalog: str, data_path: str, memory_limit: str | None = "256MB", threads: int | None = 2,
                 lock_timeout_seconds: float = 900):
        self.catalog = catalog
        self.data_path = data_path
        self.memory_limit = memory_limit
        self.threads = threads
        self.lock_timeout_seconds = lock_timeout_seconds

    def __repr__(self) -> str:
        # The catalog string names host and database only (the password is in PGPASSWORD, never here).
        return f"DuckLakeWarehouse(catalog={self.catalog!r}, data_path={self.data_path!r})"

    @property
    def description(self) -> str:
        return f"DuckLake (catalog {self.catalog}, data {self.data_path})"

    def _database(self, read_only: bool, settings: ReadSettings | None = None, create: bool = False) -> _LakeInstance:
        """This process's DuckDB instance with the extensions loaded once, this lake attached the way asked:
        read-write as `lake`, read-only as `lake_ro` (both, in a process that writes and reads). The caller holds
        one of the instance's `users` until it calls `_release`.

        Loading the two extensions takes about half a CPU-second and attaching a round trip to Postgres; each
        connection is a cursor on this instance instead. A cursor starts a transaction on the latest snapshot, so
        sharing the instance never hides another host's commits (nor this process's writes from its reads). A
        process that moves to another lake (a test, one lake after the other) detaches the last one when no
        connection uses it and keeps the instance; one that uses two lakes at once gets an instance per lake.
        Reads with `settings` of their own (instance-wide ones) get an instance kept for exactly those. Only
        `create=True` (a caller holding the writer lock) may create the lake in an empty catalog.
        """
        lake = (self.catalog, self.data_path)
        alias = _READ_ONLY_ALIAS if read_only else _READ_WRITE_ALIAS
        with _databases_lock:
            key: tuple = (os.getpid(), self.memory_limit, self.threads, tuple(sorted((settings or {}).items())))
            instance = _databases.get(key)
            if instance is not None and instance.lake not in (None, lake) and instance.users:
                key = (*key, lake)
                instance = _databases.get(key)
            if instance is None:
                instance = _databases[key] = _LakeInstance(self._instance(settings))
            if instance.lake != lake:
                for attached in sorted(instance.attached):
                    instance.database.execute(f"DETACH {attached}")
                instance.lake, instance.attached = lake, set()
            if alias not in instance.attached:
                self._attach_lake(instance.database, alias, read_only, create)
                instance.attached.add(alias)
            instance.users += 1
            return instance

    @staticmethod
    def _release(instance: _LakeInstance) -> None:
        with _databases_lock:
            instance.users -= 1

    def _instance(self, settings: ReadSettings | None = None) -> duckdb.DuckDBPyConnection:
        from mixsync.warehouse import apply_settings, configure

        con = duckdb.connect()
        try:
            configure(con, self.memory_limit, self.threads)
            # An in-memory database spills to this folder beyond the memory limit.
            con.execute(f"SET temp_directory = {literal(str(Path(tempfile.gettempdir()) / 'mixsync-duckdb-spill'))}")
            load_extensions(con)
            apply_settings(con, settings or {})
            return con
        except BaseException:
            con.close()
            raise

    def _attach_lake(self, con: duckdb.DuckDBPyConnection, alias: str, read_only: bool, create: bool = False) -> None:
        options = [f"DATA_PATH {literal(self.data_path)}"]
        if read_only:
            options.append("READ_ONLY")
        if not create:
            # Creating a lake is a transaction of CREATE TABLEs in the catalog: two hosts attaching an empty
            # catalog at once both try it and all but one fail. Only a holder of the writer lock creates it.
            options.append("CREATE_IF_NOT_EXISTS false")
        try:
            con.execute(f"ATTACH {literal('ducklake:postgres:' + self.catalog)} AS {alias} ({', '.join(options)})")
        except duckdb.Error as exc:
            if not create and "creating a new DuckLake is explicitly disabled" in str(exc):
                raise LakeNotCreated(f"no DuckLake in MIXSYNC_DUCKLAKE_CATALOG ({self.catalog}) yet: the first write "
                                     "creates it") from exc
            raise ConnectionError(f"could not attach the DuckLake at MIXSYNC_DUCKLAKE_CATALOG ({self.catalog}): "
                                  f"{exc}") from exc

    def _attach(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """A DuckDB instance of its own with the lake attached as `lake` (for `read(private=True)`)."""
        con = self._instance()
        try:
            self._attach_lake(con, _READ_WRITE_ALIAS, read_only)
            return con
        except BaseException:
            con.close()
            raise

    @contextlib.contextmanager
    def _connect(self, read_only: bool, settings: ReadSettings | None = None,
                 create: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        from mixsync.warehouse import configure, configure_session

        instance = self._database(read_only, settings, create)
        try:
            con = instance.database.cursor()
            try:
                if settings:
                    # The instance has its settings since its creation; setting the shared defaults again here
                    # would change them under another cursor's running read.
                    configure_session(con)
                else:
                    configure(con, self.memory_limit, self.threads)
                # The lake is the default catalog: every flow's `schema.table` names resolve in it.
                con.execute(f"USE {_READ_ONLY_ALIAS if read_only else _READ_WRITE_ALIAS}")
                yield con
            finally:
                con.close()
        finally:
            self._release(instance)

    def prepare(self) -> None:
        """What opening a write connection costs before its lock: this process's instance with the extensions
        loaded and the lake attached read-write (about a second in a new process). Takes no lock, so it can run
        while a download streams in; the next `write()` finds it ready. On an empty catalog it only loads the
        extensions: the first write creates the lake, under the lock."""
        with contextlib.suppress(LakeNotCreated):
            self._release(self._database(read_only=False))

    @contextlib.contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection with the schema in place, under the cross-host writer lock."""
        from mixsync.warehouse import ensure_schema

        with advisory_lock(self.catalog, self.lock_timeout_seconds), self._connect(read_only=False, create=True) as con:
            if self.catalog not in _applied_ddl:
                # This process's first write to the catalog. The option is stored in the catalog (an UPDATE of its
                # metadata, kept for every later attach), so it is set under the lock: set while attaching, outside
                # it, it lost serialization conflicts to other hosts' commits.
                con.execute(f"CALL lake.set_option('parquet_row_group_size', {PARQUET_ROW_GROUP_SIZE})")
            ensure_schema(con, adapt=self.adapt_ddl, applied=_applied_ddl.setdefault(self.catalog, set()))
            yield con

    @contextlib.contextmanager
    def read(self, private: bool = False, settings: ReadSettings | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection on the latest snapshot; it never waits for writers nor sees half a write.

        `private=True` gives a DuckDB instance of its own, closed afterwards, whose settings the caller may lock
        (`mixsync query` does) without touching this process's shared instance. `settings` (instance-wide DuckDB
        settings, such as the outbox snapshot's single thread) gives a cursor on an instance kept for reads with
        exactly these: a new instance costs half a CPU-second of loading the extensions (checking their signatures).
        """
        if private:
            from mixsync.warehouse import apply_settings, configure

            database = self._attach(read_only=True)
            try:
                configure(database, self.memory_limit, self.threads)
                apply_settings(database, settings or {})
                database.execute("USE lake")
                yield database
            finally:
                database.close()
            return
        with self._connect(read_only=True, settings=settings) as con:
            yield con

    @staticmethod
    def adapt_ddl(ddl: str) -> str:
        return _COMPRESSION_CLAUSE.sub("", ddl)

    def maintain(self, con: duckdb.DuckDBPyConnection, keep_days: int) -> dict:
        """Compact, expire snapshots older than `keep_days` and delete the files no snapshot needs any more.

        A day's reload deletes the old load's rows with delete files; the data file stays current until it is
        rewritten without them, so rewriting comes first. The files it replaces are deleted once the snapshots
        that still read them expire (after `keep_days`: time travel reaches back that far).
        """
        before = con.execute("SELECT count(*) FROM lake.snapshots()").fetchone()[0]
        rewritten = con.execute("CALL ducklake_rewrite_data_files('lake')").fetchall()
        merged = con.execute("CALL ducklake_merge_adjacent_files('lake')").fetchall()
        con.execute(f"CALL ducklake_expire_snapshots('lake', older_than => now() - INTERVAL {int(keep_days)} DAY)")
        cleaned = con.execute("CALL ducklake_cleanup_old_files('lake', cleanup_all => true)").fetchall()
        after = con.execute("SELECT count(*) FROM lake.snapshots()").fetchone()[0]
        return {"tables_rewritten": len(rewritten), "tables_merged": len(merged), "snapshots_expired": max(before - after, 0),
                "snapshots_kept": after, "files_deleted": len(cleaned)}
