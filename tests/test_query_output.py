"""`mixsync query --format table|csv|json`: whole cells when asked, every row for programs."""

from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner

from mixsync.cli import main
from mixsync.warehouse import Warehouse

LONG = "x" * 150 + "-end"


@pytest.fixture
def database(tmp_path, monkeypatch):
    path = tmp_path / "w.duckdb"
    with Warehouse(path).write() as con:
        con.execute(f"""CREATE TABLE analytics.q AS
                        SELECT i AS n, CASE WHEN i = 1 THEN '{LONG}' WHEN i = 2 THEN NULL ELSE 'line one
line two' END AS text, TIMESTAMPTZ '2026-01-05 10:00:00+00' + i * INTERVAL 1 HOUR AS seen_at,
                               (i / 4)::DECIMAL(10, 2) AS share
                        FROM range(1, 121) t(i)""")
    monkeypatch.setenv("MIXSYNC_DUCKDB_PATH", str(path))
    return path


def run(*args: str) -> str:
    result = CliRunner().invoke(main, ["query", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_table_cuts_cells_at_60_unless_full(database):
    cut = run("SELECT n, text FROM analytics.q WHERE n = 1")
    assert LONG not in cut and LONG[:60] in cut
    whole = run("--full", "SELECT n, text FROM analytics.q WHERE n = 1")
    assert LONG in whole and "(1 rows)" in whole


def test_table_shows_50_rows_by_default_and_all_with_zero(database):
    assert "(50 rows, more not shown)" in run("SELECT n FROM analytics.q ORDER BY n")
    assert "(120 rows)" in run("--max-rows", "0", "SELECT n FROM analytics.q ORDER BY n")


def test_csv_has_every_row_and_whole_cells(database):
    rows = list(csv.reader(io.StringIO(run("--format", "csv", "SELECT n, text, share FROM analytics.q ORDER BY n"))))
    assert rows[0] == ["n", "text", "share"] and len(rows) == 121
    assert rows[1] == ["1", LONG, "0.25"] and rows[2] == ["2", "", "0.50"] and rows[3][1] == "line one\nline two"


def test_json_is_one_array_of_objects_with_every_row(database):
    data = json.loads(run("--format", "json", "SELECT n, text, seen_at, share FROM analytics.q ORDER BY n"))
    assert len(data) == 120
    assert data[0] == {"n": 1, "text": LONG, "seen_at": "2026-01-05T11:00:00+00:00", "share": "0.25"}
    assert data[1]["text"] is None
    assert json.loads(run("--format", "json", "--max-rows", "2", "SELECT n FROM analytics.q ORDER BY n")) == [
        {"n": 1}, {"n": 2}]
    assert json.loads(run("--format", "json", "SELECT n FROM analytics.q WHERE n < 0")) == []


def test_an_unknown_format_is_refused_naming_the_choices(database):
    result = CliRunner().invoke(main, ["query", "--format", "xml", "SELECT 1"])
    assert result.exit_code != 0 and "table" in result.output and "csv" in result.output and "json" in result.output


@pytest.mark.parametrize("sql", ["", "   ", "/* only a comment */"])
def test_a_query_with_nothing_to_print_says_so_without_a_traceback(database, sql):
    result = CliRunner().invoke(main, ["query", sql])
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert "no SQL given" in result.output or "no result to print" in result.output
