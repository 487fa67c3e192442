"""The export loader's switch: a load's rows become mixpanel.events all at once, or not at all, even when killed."""

from __future__ import annotations

import datetime as dt
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
