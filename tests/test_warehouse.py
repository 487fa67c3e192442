"""The warehouse: legacy time conversion, the writer lock, `mixsync query`, the schedule's range."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
from click.testing import CliRunner

from mixsync.cli import main
from mixsync.mixpanel.schedules import mixpanel_events_schedule
from mixsync.split.defs import split_events_schedule
from mixsync.warehouse import Warehouse, WarehouseLockTimeout


@pytest.mark.parametrize("zone,day", [
    ("America/New_York", dt.date(2026, 3, 8)), ("America/New_York", dt.date(2026, 11, 1)),
    ("Europe/Berlin", dt.date(2026, 3, 29)), ("Europe/Berlin", dt.date(2026, 10, 25)),
    ("Australia/Lord_Howe", dt.date(2026, 4, 5)),  # a 30-minute DST shift
    ("Asia/Kolkata", dt.date(2026, 6, 1)),  # no DST at all
])
def test_local_to_utc_matches_zoneinfo_minute_by_minute(zone, day, tmp_path):
    store = Warehouse(tmp_path / "w.duckdb")
    with store.write() as con:
        rows = con.execute("""
            SELECT ts, mixpanel.local_to_utc(ts, ?) FROM (
                SELECT unnest(range(?::TIMESTAMP, ?::TIMESTAMP + INTERVAL 1 DAY, INTERVAL 1 MINUTE)) AS ts)""",
                           [zone, day, day]).fetchall()
    assert len(rows) == 1440
    tz = ZoneInfo(zone)
    for local, instant in rows:
        assert instant == local.replace(tzinfo=tz, fold=0).astimezone(dt.UTC), local


def test_a_writer_waits_for_a_reader_and_readers_share(tmp_path):
    store = Warehouse(tmp_path / "w.duckdb", lock_timeout_seconds=30)
    with store.write() as con:
        con.execute("CREATE TABLE sync.probe AS SELECT 1 AS n")
    wrote = threading.Event()

    def writer():
        with store.write() as con:
            con.execute("INSERT INTO sync.probe VALUES (2)")
        wrote.set()

    with store.read() as first, store.read() as second:
        thread = threading.Thread(target=writer)
        thread.start()
        assert not wrote.wait(0.3)  # held back while the readers are open
        assert first.execute("SELECT count(*) FROM sync.probe").fetchone()[0] == 1
        assert second.execute("SELECT count(*) FROM sync.probe").fetchone()[0] == 1
    thread.join(timeout=30)
    assert wrote.is_set()
    with store.read() as con:
        assert con.execute("SELECT count(*) FROM sync.probe").fetchone()[0] == 2


def test_connections_hold_the_file_only_while_open_and_leave_it_checkpointed(tmp_path):
    """Connections are cursors on this process's DuckDB instance, which attaches the file while one is open: when
    the last closes, the write is in the file itself (no WAL left) and another process can open and change it."""
    path = tmp_path / "w.duckdb"
    store = Warehouse(path, lock_timeout_seconds=30)
    open_and_write = ("import duckdb, sys; con = duckdb.connect(sys.argv[1]); "
                      "con.execute('INSERT INTO sync.probe VALUES (1000)'); con.close()")
    with store.write() as con:
        con.execute("CREATE TABLE sync.probe AS SELECT range AS n FROM range(1000)")
    assert not path.with_name("w.duckdb.wal").exists()
    done = subprocess.run([sys.executable, "-c", open_and_write, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with store.read() as con:
        assert con.execute("SELECT count(*) FROM sync.probe").fetchone()[0] == 1001
        held = subprocess.run([sys.executable, "-c", open_and_write, str(path)], capture_output=True, text=True,
                              timeout=60)
        assert held.returncode != 0 and "lock" in held.stderr.lower(), held.stderr
    with store.write() as con:
        assert con.execute("SELECT count(*) FROM sync.probe").fetchone()[0] == 1001


def test_threads_on_more_warehouse_files_than_instances_kept_each_see_their_own_writes(tmp_path):
    """Four files used at once from four threads: more instances than the process keeps idle, so instances are
    closed while others are in use; none in use is closed, and each file holds exactly its own writes."""
    stores = [Warehouse(tmp_path / f"w{i}.duckdb", lock_timeout_seconds=60) for i in range(4)]
    errors: list[BaseException] = []

    def work(store: Warehouse) -> None:
        try:
            for i in range(15):
                with store.write() as con:
                    con.execute("CREATE TABLE IF NOT EXISTS sync.probe (n INTEGER)")
                    con.execute("INSERT INTO sync.probe VALUES (?)", [i])
                with store.read() as con:
                    assert con.execute("SELECT count(*), sum(n) FROM sync.probe").fetchone() == (i + 1, i * (i + 1) // 2)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)


def test_a_lock_held_too_long_fails_with_the_setting_to_raise(tmp_path):
    store = Warehouse(tmp_path / "w.duckdb", lock_timeout_seconds=1)
    impatient = Warehouse(tmp_path / "w.duckdb", lock_timeout_seconds=1)
    with store.write(), pytest.raises(WarehouseLockTimeout, match="MIXSYNC_LOCK_TIMEOUT_SECONDS"), impatient.write():
        pass


def test_mixsync_query_prints_a_table_and_cannot_write(tmp_path, monkeypatch):
    path = tmp_path / "w.duckdb"
    with Warehouse(path).write() as con:
        con.execute("CREATE TABLE analytics.t AS SELECT 'São Paulo' AS city, 3 AS n")
    monkeypatch.setenv("MIXSYNC_DUCKDB_PATH", str(path))
    runner = CliRunner()
    shown = runner.invoke(main, ["query", "SELECT city, n FROM analytics.t"])
    assert shown.exit_code == 0, shown.output
    assert "São Paulo" in shown.output and "(1 rows)" in shown.output
    refused = runner.invoke(main, ["query", "DROP TABLE analytics.t"])
    assert refused.exit_code != 0 and "read-only" in refused.output.lower()
    missing = runner.invoke(main, ["query", "SELECT 1"], env={"MIXSYNC_DUCKDB_PATH": str(tmp_path / "none.duckdb")})
    assert missing.exit_code != 0 and "no warehouse" in missing.output


@pytest.mark.parametrize("schedule", [mixpanel_events_schedule, split_events_schedule])
def test_the_nightly_schedules_ask_for_yesterday_and_the_lookback_in_one_run(schedule, monkeypatch):
    monkeypatch.setenv("MIXPANEL_LOOKBACK_DAYS", "3")
    when = dt.datetime(2026, 5, 10, 2, 15, tzinfo=dt.UTC)
    request = schedule(dg.build_schedule_context(scheduled_execution_time=when))
    assert request.tags["dagster/asset_partition_range_start"] == "2026-05-06"
    assert request.tags["dagster/asset_partition_range_end"] == "2026-05-09"
    assert request.run_key.endswith("2026-05-09")


REGISTRY_PROBE = """
import sys
from mixsync.warehouse import Warehouse
flows = ("mixpanel", "split", "flagsmith", "impressions", "experiments")
store = Warehouse(sys.argv[1])
with store.write() as con:
    before = {r[0] for r in con.execute("SELECT schema_name || '.' || table_name FROM duckdb_tables()").fetchall()}
imported = sorted(m for m in sys.modules if m.startswith("mixsync.") and m.split(".")[1] in flows)
import mixsync.split.sql  # registers split's tables, and mixpanel's, which its staging reads
with store.write() as con:
    after = {r[0] for r in con.execute("SELECT schema_name || '.' || table_name FROM duckdb_tables()").fetchall()}
print(imported, sorted(before), "split.events_rejected" in after, "mixpanel.event_rows" in after,
      "sync.flagsmith_traits" in after)
"""


def test_the_warehouse_imports_no_flow_and_creates_the_tables_flows_register(tmp_path):
    out = subprocess.run([sys.executable, "-c", REGISTRY_PROBE, str(tmp_path / "w.duckdb")], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["[]", "[]", "True", "True", "False"]


SCHEMA_PROBE = """
import sys
from mixsync.warehouse import Warehouse
import mixsync.mixpanel.sql  # registers mixpanel's tables
store = Warehouse(sys.argv[1])
with store.write() as con:
    pass
with store.write() as con:
    con.execute("DROP VIEW analytics.events_per_day")  # skipped DDL would not bring it back
with store.write() as con:
    second = con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'events_per_day'").fetchone()[0]
mixsync.mixpanel.sql.register_ddl("analytics.events_per_day", mixsync.mixpanel.sql.ANALYTICS_DDL + "-- changed\\n")
with store.write() as con:
    third = con.execute("SELECT count(*) FROM duckdb_views() WHERE view_name = 'events_per_day'").fetchone()[0]
    stamps = con.execute("SELECT count(*) FROM sync.warehouse_schema").fetchone()[0]
print(second, third, stamps)
"""


def test_a_file_runs_its_ddl_again_only_when_it_changed(tmp_path):
    # Proven by what it leaves: a view dropped behind mixsync's back stays dropped while the DDL is unchanged
    # (the write connection checked the digest and ran nothing), and comes back once the DDL changes.
    out = subprocess.run([sys.executable, "-c", SCHEMA_PROBE, str(tmp_path / "w.duckdb")], capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["0", "1", "2"]


def test_bound_parameters_do_not_search_for_pandas_again(tmp_path, monkeypatch):
    """DuckDB looks for pandas on every bound parameter; once mixsync knows it is absent, no look searches sys.path."""
    import importlib.util

    if importlib.util.find_spec("pandas") is not None and sys.modules.get("pandas") is not None:
        pytest.skip("pandas is installed here: DuckDB finds it in sys.modules at once")
    searched: list[str] = []

    class Recorder:
        def find_spec(self, name, path=None, target=None):
            searched.append(name)
            return None

    monkeypatch.setattr(sys, "meta_path", [Recorder(), *sys.meta_path])
    with Warehouse(tmp_path / "w.duckdb").write() as con:
        assert con.execute("SELECT len($ids), $name", {"ids": [1, 2, 3], "name": "x"}).fetchone() == (3, "x")
    assert "pandas" not in searched
