"""The export loader's switch: a load's rows become mixpanel.events all at once, or not at all, even when killed."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import orjson
import pytest

from mixsync.mixpanel import sql as warehouse_mixpanel
from mixsync.mixpanel.sql import load_export_file
from mixsync.warehouse import Warehouse

DAY = dt.date(2026, 3, 2)
NOON_MS = int(dt.datetime(2026, 3, 2, 12, tzinfo=dt.UTC).timestamp() * 1000)


def export_file(path: Path, version: str, n: int) -> Path:
    """n events of DAY, tagged with `version`, plus one exact duplicate line the way the export repeats them."""
    lines = [orjson.dumps({"event": "Viewed", "properties": {
        "time": NOON_MS + i, "distinct_id": f"u{i}", "$insert_id": f"{version}-{i}", "mp_processing_time_ms": NOON_MS,
        "version": version}}) for i in range(n)]
    path.write_bytes(b"\n".join(lines + lines[:1]) + b"\n")
    return path


def load(store: Warehouse, path: Path) -> None:
    with store.write() as con:
        load_export_file(con, path, DAY, DAY)


def visible(store: Warehouse) -> dict[str, int]:
    with store.read() as con:
        return dict(con.execute("SELECT properties->>'version', count(*) FROM mixpanel.events GROUP BY 1").fetchall())


def stored_rows(store: Warehouse) -> int:
    with store.read() as con:
        return con.execute("SELECT count(*) FROM mixpanel.event_rows").fetchone()[0]


KILLED_LOAD = """
import datetime as dt, os, signal, sys
from pathlib import Path
from mixsync.warehouse import Warehouse
from mixsync.mixpanel import sql as mixpanel

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # the rows are written and committed; the switch never happens

mixpanel._make_current = die
with Warehouse(sys.argv[1]).write() as con:
    mixpanel.load_export_file(con, Path(sys.argv[2]), dt.date(2026, 3, 2), dt.date(2026, 3, 2))
"""


def test_a_load_killed_before_its_switch_is_invisible_and_the_next_load_clears_it(tmp_path):
    store = Warehouse(tmp_path / "w.duckdb", lock_timeout_seconds=30)
    load(store, export_file(tmp_path / "v1.jsonl", "v1", 50))
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_LOAD), str(store.path),
                             str(export_file(tmp_path / "v2.jsonl", "v2", 70))], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]

    assert visible(store) == {"v1": 50}
    assert stored_rows(store) == 50 + 71  # the killed load's rows are on disk, duplicate and all, but not shown
    with store.read() as con:
        assert con.execute("SELECT count(*) FROM mixpanel.event_loads_unfinished").fetchone()[0] == 1

    load(store, export_file(tmp_path / "v3.jsonl", "v3", 30))
    assert visible(store) == {"v3": 30}
    assert stored_rows(store) == 30
    with store.read() as con:
        assert con.execute("SELECT count(*) FROM mixpanel.event_loads_unfinished").fetchone()[0] == 0
        assert con.execute("SELECT events, duplicates_dropped FROM mixpanel.event_loads").fetchall() == [(30, 1)]


KILLED_MID_INSERT = """
import datetime as dt, os, signal, sys
from pathlib import Path
from mixsync.warehouse import Warehouse
from mixsync.mixpanel import sql as mixpanel

insert_rows = mixpanel._insert_rows

def insert_then_die(*args, **kwargs):
    insert_rows(*args, **kwargs)
    os.kill(os.getpid(), SIGKILL)  # every row is written, the transaction holding them and the load id is not committed

SIGKILL = signal.SIGKILL
mixpanel._insert_rows = insert_then_die
with Warehouse(sys.argv[1]).write() as con:
    mixpanel.load_export_file(con, Path(sys.argv[2]), dt.date(2026, 3, 2), dt.date(2026, 3, 2))
"""


def the_killed_load_left_nothing_and_the_next_one_loads(store, tmp_path) -> None:
    """After v1 (50 events) loaded and a load of v2 was killed: v1 is what is visible and stored, no unfinished
    entry is left, and the next load (v3, 30 events) replaces v1 as usual."""
    assert visible(store) == {"v1": 50}
    assert stored_rows(store) == 50
    with store.read() as con:
        assert con.execute("SELECT count(*) FROM mixpanel.event_loads_unfinished").fetchone()[0] == 0

    load(store, export_file(tmp_path / "v3.jsonl", "v3", 30))
    assert visible(store) == {"v3": 30}
    assert stored_rows(store) == 30


def test_a_load_killed_inside_its_insert_leaves_neither_rows_nor_an_unfinished_entry(tmp_path):
    # The load's id, its unfinished entry and its rows are one transaction: killed before its commit, nothing of it
    # is in the file, and the next load has nothing to clear.
    store = Warehouse(tmp_path / "w.duckdb", lock_timeout_seconds=30)
    load(store, export_file(tmp_path / "v1.jsonl", "v1", 50))
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_MID_INSERT), str(store.path),
                             str(export_file(tmp_path / "v2.jsonl", "v2", 70))], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]

    the_killed_load_left_nothing_and_the_next_one_loads(store, tmp_path)
    with store.read() as con:
        assert con.execute("SELECT load_id FROM mixpanel.event_loads").fetchall() == [(2,)]


def test_a_load_that_fails_in_its_switch_keeps_the_previous_day_and_leaves_no_rows(tmp_path, monkeypatch):
    store = Warehouse(tmp_path / "w.duckdb", lock_timeout_seconds=30)
    load(store, export_file(tmp_path / "v1.jsonl", "v1", 50))

    def fail(*args, **kwargs):
        raise duckdb.IOException("disk full")

    monkeypatch.setattr(warehouse_mixpanel, "_make_current", fail)
    with pytest.raises(duckdb.IOException, match="disk full"):
        load(store, export_file(tmp_path / "v2.jsonl", "v2", 70))
    assert visible(store) == {"v1": 50}
    assert stored_rows(store) == 50


def test_a_warehouse_from_before_event_rows_keeps_its_events_and_loads_on(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("""
        CREATE SCHEMA mixpanel;
        CREATE TABLE mixpanel.events (event VARCHAR, distinct_id VARCHAR, time TIMESTAMPTZ, insert_id VARCHAR,
            mp_processing_time_ms BIGINT, properties JSON, day DATE, loaded_at TIMESTAMPTZ);
        CREATE TABLE mixpanel.event_loads (day DATE PRIMARY KEY, events BIGINT NOT NULL, rejected BIGINT NOT NULL,
            duplicates_dropped BIGINT NOT NULL, window_start DATE NOT NULL, window_end DATE NOT NULL,
            loaded_at TIMESTAMPTZ NOT NULL);
        INSERT INTO mixpanel.events VALUES ('Old', 'u1', '2026-03-01 10:00:00+00', 'old-1', 1, '{"version": "old"}',
                                            '2026-03-01', now());
        INSERT INTO mixpanel.event_loads VALUES ('2026-03-01', 1, 0, 0, '2026-03-01', '2026-03-01', now());""")
    con.close()

    store = Warehouse(path, lock_timeout_seconds=30)
    load(store, export_file(tmp_path / "v1.jsonl", "v1", 5))
    assert visible(store) == {"old": 1, "v1": 5}
    with store.read() as con:
        assert con.execute("SELECT table_type FROM information_schema.tables "
                           "WHERE table_schema = 'mixpanel' AND table_name = 'events'").fetchone() == ("VIEW",)


def test_rejects_from_before_their_window_columns_stay_readable_and_a_reload_replaces_them(tmp_path):
    """A file whose events_rejected predates `window_start`/`window_end` gains them (its rows kept, NULL there);
    reloading the day replaces its old rejects, and a line with no day of its own lands with its window, no day."""
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("""
        CREATE SCHEMA mixpanel;
        CREATE TABLE mixpanel.events_rejected (day DATE, reason VARCHAR NOT NULL, raw VARCHAR,
                                               loaded_at TIMESTAMPTZ NOT NULL);
        INSERT INTO mixpanel.events_rejected VALUES ('2026-03-02', 'not valid JSON', 'old broken line', now()),
                                                    ('2026-03-01', 'missing event', 'another day', now());""")
    con.close()
    store = Warehouse(path, lock_timeout_seconds=30)
    with store.read() as con:  # a reader of the old file before any write
        assert con.execute("SELECT count(*) FROM mixpanel.events_rejected").fetchone()[0] == 2

    source = export_file(tmp_path / "v1.jsonl", "v1", 3)
    source.write_bytes(source.read_bytes() + b"not json at all\n")
    load(store, source)
    with store.read() as con:
        rows = con.execute("""SELECT day, reason, raw, window_start, window_end FROM mixpanel.events_rejected
                              ORDER BY raw""").fetchall()
    assert rows == [(dt.date(2026, 3, 1), "missing event", "another day", None, None),
                    (None, "not valid JSON", "not json at all", DAY, DAY)]


@pytest.fixture(params=["duckdb", "ducklake"])
def any_store(request, tmp_path):
    if request.param == "duckdb":
        return Warehouse(tmp_path / "w.duckdb", lock_timeout_seconds=30)
    from mixsync.settings import WarehouseSettings
    from mixsync.warehouse import open_warehouse

    lake_env = request.getfixturevalue("lake_env")
    return open_warehouse(WarehouseSettings.from_env({**lake_env, "MIXSYNC_LOCK_TIMEOUT_SECONDS": "30"}))


def event_line(event, distinct_id, ms, insert_id=None, processed=NOON_MS, **extra) -> bytes:
    properties = {"time": ms, "distinct_id": distinct_id, "mp_processing_time_ms": processed, **extra}
    if insert_id is not None:
        properties["$insert_id"] = insert_id
    return orjson.dumps({"event": event, "properties": properties})


def test_the_switch_keeps_every_distinct_key_and_the_latest_copy_and_its_figures_match_the_tables(any_store, tmp_path):
    next_day = DAY + dt.timedelta(days=1)
    next_noon = NOON_MS + 86_400_000
    first = [
        event_line("Viewed", "u1", NOON_MS, "a", copy="first"),
        event_line("Viewed", "u1", NOON_MS, "a", processed=NOON_MS + 5, copy="latest"),   # Mixpanel's duplicate
        event_line("Viewed", "u1", NOON_MS, "a", processed=NOON_MS + 1, copy="older"),
        event_line("Bought", "u1", NOON_MS, "a", copy="other event"),                     # same $insert_id,
        event_line("Viewed", "u2", NOON_MS, "a", copy="other person"),                    # different keys: kept
        event_line("Viewed", "u1", NOON_MS + 1, "a", copy="other time"),
        event_line("Viewed", "u3", NOON_MS, copy="no insert id"),                         # no $insert_id: the
        event_line("Viewed", "u3", NOON_MS, processed=NOON_MS + 9, copy="no insert id, latest"),  # key still holds
        event_line("Viewed", "u4", NOON_MS, copy="no insert id, another person"),
        event_line("Viewed", "u3", NOON_MS + 2, copy="no insert id, another time"),
        event_line("Viewed", "u5", next_noon, "b", copy="second day"),
        orjson.dumps({"properties": {"time": NOON_MS, "distinct_id": "u6", "$insert_id": "c"}}),  # no event
    ]
    path = tmp_path / "first.jsonl"
    path.write_bytes(b"\n".join(first) + b"\n")
    with any_store.write() as con:
        result = load_export_file(con, path, DAY, next_day + dt.timedelta(days=1))  # the third day has no events
    with any_store.read() as con:
        copies = sorted(r[0] for r in con.execute("SELECT properties->>'copy' FROM mixpanel.events").fetchall())
        ledger = con.execute("SELECT day, events, rejected, duplicates_dropped FROM mixpanel.event_loads ORDER BY day").fetchall()
        rejects = con.execute("SELECT day, reason FROM mixpanel.events_rejected").fetchall()
    assert copies == sorted(["latest", "other event", "other person", "other time", "no insert id, latest",
                             "no insert id, another person", "no insert id, another time", "second day"])
    assert ledger == [(DAY, 7, 1, 3), (next_day, 1, 0, 0), (next_day + dt.timedelta(days=1), 0, 0, 0)]
    assert rejects == [(DAY, "missing event")]
    assert (result.events, result.rejected, result.duplicates_dropped, result.lines) == (8, 1, 3, 12)
    assert result.per_day == {DAY: 7, next_day: 1, next_day + dt.timedelta(days=1): 0}
    assert result.rejects_by_reason == {"missing event": 1}

    # A clean reload of the first day alone: its old rows, ledger entry and rejects go; the second day stays.
    path = tmp_path / "second.jsonl"
    path.write_bytes(event_line("Viewed", "u7", NOON_MS, "d", copy="reloaded") + b"\n")
    with any_store.write() as con:
        result = load_export_file(con, path, DAY, DAY)
    with any_store.read() as con:
        copies = sorted(r[0] for r in con.execute("SELECT properties->>'copy' FROM mixpanel.events").fetchall())
        ledger = con.execute("SELECT day, events, rejected, duplicates_dropped FROM mixpanel.event_loads ORDER BY day").fetchall()
        rejects = con.execute("SELECT count(*) FROM mixpanel.events_rejected").fetchone()[0]
        stored = con.execute("SELECT count(*) FROM mixpanel.event_rows").fetchone()[0]
        unfinished = con.execute("SELECT count(*) FROM mixpanel.event_loads_unfinished").fetchone()[0]
    assert copies == ["reloaded", "second day"]
    assert ledger == [(DAY, 1, 0, 0), (next_day, 1, 0, 0), (next_day + dt.timedelta(days=1), 0, 0, 0)]
    assert (rejects, stored, unfinished) == (0, 2, 0)
    assert (result.events, result.rejected, result.duplicates_dropped, result.per_day, result.rejects_by_reason) == (
        1, 0, 0, {DAY: 1}, {})


def test_each_load_takes_an_id_above_every_stored_row_from_the_ledgers_alone(tmp_path):
    # The id comes from event_loads and event_loads_unfinished only (not a scan of event_rows): that holds because
    # every stored row belongs to a load in one of them. Here a two-day load is replaced one day at a time and a
    # load is killed before its switch; each new id is still above every row's, and no row outlives its ledger entry.
    store = Warehouse(tmp_path / "w.duckdb", lock_timeout_seconds=30)
    next_day = DAY + dt.timedelta(days=1)
    two_days = tmp_path / "two.jsonl"
    two_days.write_bytes(event_line("Viewed", "u1", NOON_MS, "a") + b"\n"
                         + event_line("Viewed", "u2", NOON_MS + 86_400_000, "b") + b"\n")

    def ids() -> tuple[set[int], set[int]]:
        with store.read() as con:
            rows = {r[0] for r in con.execute("SELECT DISTINCT load_id FROM mixpanel.event_rows").fetchall()}
            ledgers = {r[0] for r in con.execute("SELECT load_id FROM mixpanel.event_loads UNION "
                                                 "SELECT load_id FROM mixpanel.event_loads_unfinished").fetchall()}
        return rows, ledgers

    with store.write() as con:
        load_export_file(con, two_days, DAY, next_day)
    load(store, export_file(tmp_path / "v1.jsonl", "v1", 5))          # replaces the first day only
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_LOAD), str(store.path),
                             str(export_file(tmp_path / "v2.jsonl", "v2", 7))], capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    rows, ledgers = ids()
    assert rows == {1, 2, 3} and rows <= ledgers                      # load 1 keeps the second day; 3 is unfinished

    with store.write() as con:
        load_export_file(con, two_days, next_day, next_day)            # replaces load 1's last day; clears load 3
    rows, ledgers = ids()
    assert rows == {2, 4} and rows <= ledgers
    load(store, export_file(tmp_path / "v3.jsonl", "v3", 3))
    rows, ledgers = ids()
    assert rows == {4, 5} and rows <= ledgers
    assert visible(store) == {"v3": 3, None: 1}


KILLED_LAKE_LOAD = """
import datetime as dt, os, signal, sys
from pathlib import Path
from mixsync.settings import WarehouseSettings
from mixsync.warehouse import open_warehouse
from mixsync.mixpanel import sql as mixpanel

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if sys.argv[2] == "in the switch":
    mixpanel._switch = die             # every row is written, the transaction that holds them is not committed
else:
    insert_rows = mixpanel._insert_rows
    def insert_then_die(*args, **kwargs):
        insert_rows(*args, **kwargs)
        die()
    mixpanel._insert_rows = insert_then_die
with open_warehouse(WarehouseSettings.from_env()).write() as con:
    mixpanel.load_export_file(con, Path(sys.argv[1]), dt.date(2026, 3, 2), dt.date(2026, 3, 2))
"""


@pytest.mark.parametrize("killed", ["in the switch", "after the insert"])
def test_a_lake_load_is_one_transaction_and_leaves_nothing_when_killed(lake_env, tmp_path, killed):
    # On a lake the rows, the switch and the ledger commit together: a load SIGKILLed before its commit leaves no
    # rows and no unfinished entry, and the next load (its id from the ledger) has nothing to clear.
    from mixsync.settings import WarehouseSettings
    from mixsync.warehouse import open_warehouse

    store = open_warehouse(WarehouseSettings.from_env({**lake_env, "MIXSYNC_LOCK_TIMEOUT_SECONDS": "60"}))
    load(store, export_file(tmp_path / "v1.jsonl", "v1", 50))
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_LAKE_LOAD),
                            str(export_file(tmp_path / "v2.jsonl", "v2", 70)), killed],
                           capture_output=True, timeout=180, env={**os.environ, **lake_env})
    assert child.returncode == -9, child.stderr.decode()[-2000:]

    the_killed_load_left_nothing_and_the_next_one_loads(store, tmp_path)
    with store.read() as con:
        assert con.execute("SELECT load_id, events, duplicates_dropped FROM mixpanel.event_loads").fetchall() == [(2, 30, 1)]
        assert con.execute("SELECT count(*) FROM mixpanel.event_loads_unfinished").fetchone()[0] == 0
