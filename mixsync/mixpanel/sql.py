"""Mixpanel tables: raw export events by day, their rejects, and the per-day load ledger."""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from mixsync.warehouse.ducklake import is_lake
from mixsync.warehouse.schema import register_ddl
from mixsync.warehouse.sql import literal
from mixsync.warehouse.sql import path as sql_path
from mixsync.warehouse.transactions import run_transaction

DDL = """
-- Every row of every load, tagged with its load. A load writes its rows here in one streaming insert straight
-- from the export file, then in one short transaction drops its duplicates and rejects, deletes the rows it
-- replaces and becomes current in mixpanel.event_loads. mixpanel.events shows only current loads, so a load
-- that failed half-way is invisible and the next load deletes its rows.
CREATE TABLE IF NOT EXISTS mixpanel.event_rows (
    event VARCHAR,                 -- never NULL in mixpanel.events; bad rows move to events_rejected
    distinct_id VARCHAR,           -- may be '' or NULL in Mixpanel's own data
    time TIMESTAMPTZ,              -- the true UTC instant (legacy local times converted)
    insert_id VARCHAR,             -- properties."$insert_id"; missing on old or third-party data
    mp_processing_time_ms BIGINT,
    -- the export's properties object, value for value. zstd rather than DuckDB's default FSST for this column:
    -- 43% less disk and a 20% faster load, measured on a million exported events (bench/RESULTS.md). A DuckLake
    -- drops the clause (it compresses its Parquet files itself, snappy by default): DuckLakeWarehouse.adapt_ddl.
    properties JSON USING COMPRESSION zstd,
    day DATE,                      -- the partition: the project's export day
    loaded_at TIMESTAMPTZ,
    load_id BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS mixpanel.events_rejected (
    -- the event's day, when its time falls in the export window; NULL for a line with no day in the window (not
    -- JSON, no readable time, a time outside the window): it belongs to the window, and no day's figures count it
    day DATE,
    reason VARCHAR NOT NULL,
    raw VARCHAR,
    loaded_at TIMESTAMPTZ NOT NULL,
    window_start DATE,             -- the export window the line came in (NULL on rows from before these columns)
    window_end DATE
);
-- Idempotent on both backends (a lake runs no migrations: its DDL runs again whenever it changes).
ALTER TABLE mixpanel.events_rejected ADD COLUMN IF NOT EXISTS window_start DATE;
ALTER TABLE mixpanel.events_rejected ADD COLUMN IF NOT EXISTS window_end DATE;
-- No keys or sequences anywhere (DuckLake has neither): one row per day and unique load ids hold by
-- construction, since every change here happens under the writer lock in one transaction.
CREATE TABLE IF NOT EXISTS mixpanel.event_loads (
    day DATE NOT NULL,
    events BIGINT NOT NULL,
    rejected BIGINT NOT NULL,
    duplicates_dropped BIGINT NOT NULL,
    window_start DATE NOT NULL,
    window_end DATE NOT NULL,
    loaded_at TIMESTAMPTZ NOT NULL,
    load_id BIGINT NOT NULL        -- the load whose rows are this day's in mixpanel.events
);
-- Loads whose rows are written but not yet current; a crash leaves its load here for the next load to clear.
CREATE TABLE IF NOT EXISTS mixpanel.event_loads_unfinished (
    load_id BIGINT NOT NULL,
    window_start DATE NOT NULL,
    window_end DATE NOT NULL,
    started_at TIMESTAMPTZ NOT NULL
);
CREATE OR REPLACE VIEW mixpanel.events AS
    SELECT r.event, r.distinct_id, r.time, r.insert_id, r.mp_processing_time_ms, r.properties, r.day, r.loaded_at
    FROM mixpanel.event_rows r SEMI JOIN mixpanel.event_loads l ON r.day = l.day AND r.load_id = l.load_id;
-- Legacy projects store local wall-clock time as if it were UTC epoch time. Convert with the tz database:
-- the candidates are the local time minus the offset in force a day before and a day after; a candidate
-- is valid when it reads back as the same wall-clock time. In a DST fold both are valid and the earlier
-- instant wins; in a gap neither is, and the offset before the change applies (Python's zoneinfo, fold=0).
CREATE OR REPLACE MACRO mixpanel.offset_around(local_ts, tz, shift) AS
    timezone(tz, (local_ts + shift)::TIMESTAMPTZ) - (local_ts + shift);
CREATE OR REPLACE MACRO mixpanel.reads_as(candidate, tz, local_ts) AS
    timezone(tz, candidate::TIMESTAMPTZ) = local_ts;
CREATE OR REPLACE MACRO mixpanel.local_to_utc(local_ts, tz) AS (
    CASE
        WHEN mixpanel.reads_as(local_ts - mixpanel.offset_around(local_ts, tz, -INTERVAL 1 DAY), tz, local_ts)
         AND mixpanel.reads_as(local_ts - mixpanel.offset_around(local_ts, tz, INTERVAL 1 DAY), tz, local_ts)
            THEN least(local_ts - mixpanel.offset_around(local_ts, tz, -INTERVAL 1 DAY),
                       local_ts - mixpanel.offset_around(local_ts, tz, INTERVAL 1 DAY))
        WHEN mixpanel.reads_as(local_ts - mixpanel.offset_around(local_ts, tz, INTERVAL 1 DAY), tz, local_ts)
            THEN local_ts - mixpanel.offset_around(local_ts, tz, INTERVAL 1 DAY)
        ELSE local_ts - mixpanel.offset_around(local_ts, tz, -INTERVAL 1 DAY)
    END::TIMESTAMPTZ
);
"""

# `time` arrives in milliseconds (we ask for time_in_ms) as an int or a float; epoch_ms wants an integer.
_RAW_MS = "TRY_CAST(round(TRY_CAST(fields[3] AS DOUBLE)) AS BIGINT)"
# The fields are pulled in one parse of `properties`: one `->>` each would parse it four times (0.3 s per million).
# json_extract_string gives each field as text directly (the same values as `json_extract(...)[i]->>'$'`, NULL for
# a missing field or a JSON null): json_extract would write each field out as JSON only for `->>` to parse it again.
_FIELDS = """json_extract_string(properties, ['$.distinct_id', '$."$insert_id"', '$.time', '$.mp_processing_time_ms'])"""


class TruncatedExport(RuntimeError):
    """The export body ended with Mixpanel's `terminated early` line: the data is incomplete."""


@dataclass
class ExportLoad:
    events: int = 0
    rejected: int = 0
    rejected_without_day: int = 0  # of `rejected`: lines with no day of the window, counted on no day
    duplicates_dropped: int = 0
    lines: int = 0
    conflict_retries: int = 0      # times the switch lost a DuckLake write conflict and ran again
    per_day: dict[dt.date, int] = field(default_factory=dict)
    rejects_by_reason: dict[str, int] = field(default_factory=dict)


def _select_events(source_sql: str, legacy_timezone: str | None, loaded_at_param: str) -> str:
    if legacy_timezone:
        local = f"epoch_ms({_RAW_MS})::TIMESTAMP"
        instant = f"mixpanel.local_to_utc({local}, {literal(legacy_timezone)})"
        day = f"CAST({local} AS DATE)"
    else:
        instant = f"epoch_ms({_RAW_MS})"
        day = f"CAST(epoch_ms({_RAW_MS}) AS DATE)"
    return f"""
        SELECT event,
               fields[1] AS distinct_id,
               {instant} AS time,
               fields[2] AS insert_id,
               TRY_CAST(fields[4] AS BIGINT) AS mp_processing_time_ms,
               properties,
               {day} AS day,
               {loaded_at_param} AS loaded_at
        FROM (SELECT event, properties, {_FIELDS} AS fields FROM ({source_sql}))
    """


def _fast_source(path: Path) -> str:
    # DuckDB's JSON reader parses in C++ across threads; it fails on the first malformed line.
    return (f"SELECT event, properties FROM read_json({sql_path(path)}, format='newline_delimited', "
            "columns={event: 'VARCHAR', properties: 'JSON'}, maximum_object_size=16777216)")


def _line_source(path: Path) -> str:
    # One VARCHAR per line, no quoting: the careful path that can name every bad line.
    return (f"SELECT line FROM read_csv({sql_path(path)}, columns={{'line': 'VARCHAR'}}, delim='\\x1f', "
            "quote='', escape='', header=false, auto_detect=false, strict_mode=false, null_padding=true)")


def _table_type(con: duckdb.DuckDBPyConnection, name: str) -> str | None:
    row = con.execute("SELECT table_type FROM information_schema.tables WHERE table_schema = 'mixpanel' AND table_name = ?",
                      [name]).fetchone()
    return row[0] if row else None


def migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Files from before event_rows kept mixpanel.events as a table: its rows become load 0, all current."""
    if _table_type(con, "events") == "BASE TABLE":
        con.execute("BEGIN TRANSACTION")
        con.execute("ALTER TABLE mixpanel.events RENAME TO event_rows")
        con.execute("ALTER TABLE mixpanel.event_rows ADD COLUMN load_id BIGINT DEFAULT 0")
        if _table_type(con, "event_loads"):
            con.execute("ALTER TABLE mixpanel.event_loads ADD COLUMN IF NOT EXISTS load_id BIGINT DEFAULT 0")
        con.execute("COMMIT")


def load_export_file(con: duckdb.DuckDBPyConnection, path: Path, window_start: dt.date, window_end: dt.date,
                     legacy_timezone: str | None = None) -> ExportLoad:
    """Replace the days window_start..window_end with the export in `path`.

    The file's rows are written in one streaming insert, then become mixpanel.events in the switch, which drops
    duplicates and rejects and deletes the rows they replace: in one short transaction after the insert's on a
    DuckDB file, in the insert's own transaction on a lake. Until then, and forever if anything fails, the
    previous copy of each day is what mixpanel.events shows.
    Raises TruncatedExport (and changes nothing) when the body ends in `terminated early`.
    """
    loaded_at = dt.datetime.now(dt.UTC)
    # A DuckDB file commits a bulk insert by reference, unless rows of it are deleted in the same transaction (then
    # it rewrites all of them: +2.6 s per million rows), so there the switch is a transaction of its own, and the
    # load is recorded as unfinished in between. A lake writes the inserted rows' Parquet files either way, and
    # deletes some of them with delete files (measured at 1M rows: the same DELETE, no rewrite): its load is one
    # transaction, which saves a commit and the unfinished entry's insert and delete (each a round of catalog
    # queries in Postgres), and a load killed at any point leaves nothing for the next one to clear.
    one_transaction = is_lake(con)

    def begin(con) -> tuple[int, _WindowBefore]:
        # One query for what it needs to know: on a lake each table a statement reads is a round of catalog
        # queries (~15-100 ms). The new id is above every load's, unfinished or not, and comes from the two small
        # ledgers alone: every row of event_rows belongs to a load listed in one of them (or to load 0, the
        # migrated rows), since a load's rows commit with its unfinished entry (on a lake, with its ledger
        # entries), and rows leave with their entries (cleared, or replaced by a later load in the same transaction
        # as its ledger entries).
        # Reading max(load_id) of event_rows instead read that column's statistics of every data file on a lake.
        # The same query counts what the window already holds (ledger entries, rejects, rows per load), which the
        # switch must delete: nothing else writes meanwhile (the writer lock is held from here to the switch), and
        # counted before the insert the rows' scan does not read this load's new rows (on a lake, read back from
        # the Parquet just written: ~0.1 s at 1M).
        load_id, unfinished, ledger_days, old_rejects, rows_per_load = con.execute("""
            SELECT greatest(coalesce(ledger.max_id, 0), coalesce(unfinished.max_id, 0)) + 1, unfinished.ids,
                   ledger.window_days, rejects.n, window_rows.per_load
            FROM (SELECT max(load_id) AS max_id, list(load_id) AS ids FROM mixpanel.event_loads_unfinished) unfinished,
                 (SELECT max(load_id) AS max_id, count(*) FILTER (WHERE day BETWEEN $start AND $end) AS window_days
                  FROM mixpanel.event_loads) ledger,
                 (SELECT count(*) AS n FROM mixpanel.events_rejected WHERE day BETWEEN $start AND $end
                         OR (day IS NULL AND window_start <= $end AND window_end >= $start)) rejects,
                 (SELECT histogram(load_id) AS per_load FROM mixpanel.event_rows WHERE day BETWEEN $start AND $end) window_rows
            """, {"start": window_start, "end": window_end}).fetchone()
        unfinished = unfinished or []
        _clear_loads(con, unfinished)
        if not one_transaction:
            con.execute("INSERT INTO mixpanel.event_loads_unfinished VALUES (?, ?, ?, ?)",
                        [load_id, window_start, window_end, loaded_at])
        # The unfinished loads' rows were just deleted: the switch replaces only the others'.
        replaced_rows = sum(n for other, n in (rows_per_load or {}).items() if other not in unfinished)
        return load_id, _WindowBefore(old_rejects=old_rejects, replaced_rows=replaced_rows, ledger_days=ledger_days)

    def load(source_sql: str, invalid_lines_sql: str | None):
        # The load's id, its row in event_loads_unfinished and its rows in one transaction, not two (each commit
        # costs). Rows and the unfinished entry commit together or not at all, so a load killed mid-insert leaves
        # nothing behind, and one killed after it leaves its entry for the next load to clear. Only rows committed
        # before this transaction are deleted in it (unfinished loads'), so DuckDB still commits the inserted rows
        # by reference. On a lake the switch follows in the same transaction, and there is no unfinished entry.
        def body(con) -> tuple[int, _WindowBefore] | ExportLoad:
            load_id, before = begin(con)
            try:
                _insert_rows(con, source_sql, load_id, legacy_timezone, loaded_at)
            except duckdb.InvalidInputException as exc:
                if "json" not in str(exc).lower():
                    raise
                raise _UnparsableExport() from exc
            if one_transaction:
                return _switch(con, load_id, before, invalid_lines_sql, window_start, window_end, loaded_at,
                               unfinished_entry=False)
            return load_id, before
        return body

    try:
        invalid_lines_sql = None
        try:
            outcome, retries = run_transaction(con, load(_fast_source(path), None))
        except _UnparsableExport as unparsable:
            lines = f"SELECT line FROM ({_line_source(path)}) WHERE line IS NOT NULL AND trim(line) <> ''"
            truncated = con.execute(f"SELECT count(*) FROM ({lines}) WHERE trim(line) = 'terminated early'").fetchone()[0]
            if truncated:
                raise TruncatedExport(f"the export for {window_start}..{window_end} ended with 'terminated early'"
                                      ) from unparsable.__cause__
            parsed = ("SELECT json_extract_string(line, '$.event') AS event, json_extract(line, '$.properties') AS properties "
                      f"FROM ({lines}) WHERE json_valid(line)")
            invalid_lines_sql = f"SELECT line FROM ({lines}) WHERE NOT json_valid(line)"
            try:
                outcome, retries = run_transaction(con, load(parsed, invalid_lines_sql))
            except _UnparsableExport as again:
                raise again.__cause__ from None
        if isinstance(outcome, ExportLoad):
            outcome.conflict_retries = retries
            return outcome
        load_id, before = outcome
        return _make_current(con, load_id, before, invalid_lines_sql, window_start, window_end, loaded_at)
    except BaseException:
        # Best effort: the next load clears whatever this one could not.
        with contextlib.suppress(duckdb.Error):
            con.execute("DROP TABLE IF EXISTS temp.export_dropped; DROP TABLE IF EXISTS temp.export_rejects")
        with contextlib.suppress(duckdb.Error):
            clear_unfinished_loads(con)
        raise


@dataclass(frozen=True)
class _WindowBefore:
    """What the export window held before this load (counted under the writer lock): what its switch replaces."""

    old_rejects: int
    replaced_rows: int
    ledger_days: int


class _UnparsableExport(Exception):
    """DuckDB's JSON reader stopped on a malformed line: the load is run again on the careful path."""


def clear_unfinished_loads(con: duckdb.DuckDBPyConnection) -> None:
    """Delete the rows of loads that never became current (a crash between their insert and their switch)."""
    run_transaction(con, _clear_unfinished)


def _clear_unfinished(con: duckdb.DuckDBPyConnection) -> None:
    """clear_unfinished_loads inside the caller's transaction."""
    _clear_loads(con, [load_id for (load_id,) in con.execute("SELECT load_id FROM mixpanel.event_loads_unfinished").fetchall()])


def _clear_loads(con: duckdb.DuckDBPyConnection, load_ids: list[int]) -> None:
    """Delete these unfinished loads' rows and their ledger entries (nothing to run when there are none)."""
    if load_ids:
        con.execute("DELETE FROM mixpanel.event_rows WHERE list_contains($ids, load_id)", {"ids": load_ids})
        con.execute("DELETE FROM mixpanel.event_loads_unfinished WHERE list_contains($ids, load_id)", {"ids": load_ids})


def _insert_rows(con, source_sql: str, load_id: int, legacy_timezone: str | None, loaded_at: dt.datetime) -> None:
    # Straight from the file into the table, committed before the switch (with the load's unfinished entry):
    # DuckDB writes a bulk insert to disk as it goes and commits it by reference. Dropping some of these rows in the same transaction would make the
    # commit rewrite all of them (measured: +2.6 s per million rows); dropping them once committed costs ~0.
    con.execute(f"INSERT INTO mixpanel.event_rows SELECT *, $load_id FROM ({_select_events(source_sql, legacy_timezone, '$loaded_at')})",
                {"load_id": load_id, "loaded_at": loaded_at})


def _make_current(con, load_id: int, before: _WindowBefore, invalid_lines_sql: str | None, window_start: dt.date,
                  window_end: dt.date, loaded_at: dt.datetime) -> ExportLoad:
    """The switch in a transaction of its own, after the insert's (a DuckDB file), retried whole on a conflict.
    (Its temp table is dropped by `load_export_file` if it fails.)"""
    result, retries = run_transaction(con, lambda con: _switch(con, load_id, before, invalid_lines_sql,
                                                               window_start, window_end, loaded_at,
                                                               unfinished_entry=True))
    result.conflict_retries = retries
    return result


def _switch(con, load_id: int, before: _WindowBefore, invalid_lines_sql: str | None, window_start: dt.date,
            window_end: dt.date, loaded_at: dt.datetime, unfinished_entry: bool) -> ExportLoad:
    """Make the load's rows current, inside the caller's transaction: drop its rejects and duplicates, delete the
    rows and ledger entries it replaces, write its ledger entries (and remove its unfinished entry, if it has one)."""
    window = [window_start, window_end]
    this_load = {"load_id": load_id, "start": window_start, "end": window_end}
    params = {**this_load, "loaded_at": loaded_at}
    bad = "(event IS NULL OR event = '' OR time IS NULL OR day NOT BETWEEN $start AND $end)"
    # A `properties` that is not an object has no `time`, so it lands here as 'missing properties.time'.
    reason = """CASE WHEN event IS NULL OR event = '' THEN 'missing event'
                     WHEN (properties->'time') IS NULL THEN 'missing properties.time'
                     WHEN time IS NULL THEN 'properties.time is not a number'
                     ELSE 'outside the requested window' END"""
    days = [window_start + dt.timedelta(days=i) for i in range((window_end - window_start).days + 1)]
    # What this switch has to do: on a lake every statement is 20-100 ms of catalog queries, and on an ordinary day
    # most of them would change nothing (a new day has no old rows, ledger entries or rejects; a clean export has
    # no bad rows). What the window held before this load was counted when the load began (`before`); this load's
    # bad rows and its good rows' days are counted here, in one scan of the small columns.
    bad_rows, good_per_day = con.execute(f"""
        SELECT count(*) FILTER (WHERE {bad}), histogram(day) FILTER (WHERE NOT {bad})
        FROM mixpanel.event_rows WHERE load_id = $load_id""", this_load).fetchone()
    old_rejects, replaced_rows, ledger_days = before.old_rejects, before.replaced_rows, before.ledger_days
    # This load's rejects, first in a temp table (a few rows): the old ones they replace are found with them.
    # A line with no day of the window (not JSON, no readable time, a time outside it) gets no day: it belongs to
    # the export window, and no day's figures count it, so a day shows the same figures whether it was loaded
    # alone or in a multi-day window (which of a window's days such a line came with is unknown; they were all put
    # on its first day, and a reload of another of its days then counted the same line a second time).
    # Copying bad rows reads `properties` too, and DuckDB cannot push this OR down to the scan: every row's
    # properties would be read (0.3-0.4 s per million) to find none on most days, so it runs only when counted.
    rejects = [f"""SELECT CASE WHEN day BETWEEN $start AND $end THEN day END AS day, {reason} AS reason,
                         json_object('event', event, 'properties', properties)::VARCHAR AS raw
                  FROM mixpanel.event_rows WHERE load_id = $load_id AND {bad}"""] if bad_rows else []
    if invalid_lines_sql:
        rejects.append(f"SELECT NULL::DATE AS day, 'not valid JSON' AS reason, left(line, 10000) AS raw "
                       f"FROM ({invalid_lines_sql})")
    if rejects:
        con.execute(f"CREATE OR REPLACE TEMP TABLE export_rejects AS {' UNION ALL '.join(rejects)}",
                    this_load if bad_rows else {})
    if old_rejects:
        window_params = {"start": window_start, "end": window_end}
        # The window's days' rejects, and day-less ones of a window inside this one (its days are all reloaded).
        con.execute("""DELETE FROM mixpanel.events_rejected
                       WHERE day BETWEEN $start AND $end
                          OR (day IS NULL AND window_start >= $start AND window_end <= $end)""", window_params)
        if rejects:
            # Day-less ones of a window that only overlaps this one: a line this load rejected again is the same
            # line (one of that window's days is reloaded here), the others stay. As many copies as this load
            # has: identical lines are common (a broken event sent on several days).
            con.execute("""DELETE FROM mixpanel.events_rejected WHERE rowid IN (
                               SELECT o.rowid FROM (
                                   SELECT rowid, raw, row_number() OVER (PARTITION BY raw ORDER BY rowid) AS copy
                                   FROM mixpanel.events_rejected
                                   WHERE day IS NULL AND window_start <= $end AND window_end >= $start) o
                               JOIN (SELECT raw, count(*) AS copies FROM temp.export_rejects GROUP BY raw) n
                                 ON n.raw = o.raw
                               WHERE o.copy <= n.copies)""", window_params)
    if bad_rows:
        con.execute(f"DELETE FROM mixpanel.event_rows WHERE load_id = $load_id AND {bad}", this_load)
    # Mixpanel's dedupe key is (event, distinct_id, time, $insert_id); the copy processed last wins. Rows can
    # only share a key if they share its $insert_id and time, so the candidates are the rows whose pair
    # (hashed) is seen more than once: two columns read, not four, and no strings but the id (0.86 s instead
    # of 1.07 s at 1M on a lake, 0.48 s instead of 0.65 s on a file, best of 5 under load). The time keeps
    # events without an $insert_id (old or imported data) from all becoming candidates. Only the candidates
    # go through the exact per-key window, so a hash collision only costs time: different keys are never
    # merged. Two scans, not one CTE used twice: DuckDB materializes such a CTE (every row's key strings),
    # which spilled at 4M events a day. The bad rows are gone by now, so the duplicates are all good rows.
    # The repeated hashes are found by sorting each day's hashes and comparing neighbours, not by grouping
    # them in a hash table of a million groups: the whole statement 0.44-0.50 CPU-s instead of 0.52-0.79 at 1M
    # on a file, 0.54 s instead of 0.80 s on a lake (under load). Copies share `time`, so they share the day
    # the window is partitioned by.
    # A temp table is local to this process, even on a lake.
    con.execute("""CREATE OR REPLACE TEMP TABLE export_dropped AS
        WITH repeated AS (SELECT key_hash FROM (
                              SELECT key_hash, lag(key_hash) OVER (PARTITION BY day ORDER BY key_hash) AS previous
                              FROM (SELECT hash(insert_id, time) AS key_hash, day FROM mixpanel.event_rows
                                    WHERE load_id = $load_id))
                          WHERE key_hash = previous)
        SELECT rowid AS row_id, day FROM mixpanel.event_rows
        WHERE load_id = $load_id AND hash(insert_id, time) IN (SELECT key_hash FROM repeated)
        QUALIFY row_number() OVER (PARTITION BY event, distinct_id, time, insert_id
                                   ORDER BY mp_processing_time_ms DESC NULLS LAST) > 1""", {"load_id": load_id})
    dropped_per_day = dict(con.execute("SELECT day, count(*) FROM temp.export_dropped GROUP BY day").fetchall())
    if dropped_per_day:
        con.execute("DELETE FROM mixpanel.event_rows WHERE rowid IN (SELECT row_id FROM temp.export_dropped)")
    # Dropped inside the transaction: on a lake every statement outside one is a transaction of its own.
    con.execute("DROP TABLE temp.export_dropped")
    if replaced_rows:
        con.execute("DELETE FROM mixpanel.event_rows WHERE day BETWEEN $start AND $end AND load_id <> $load_id",
                    this_load)
    if ledger_days:
        con.execute("DELETE FROM mixpanel.event_loads WHERE day BETWEEN ? AND ?", window)
    rejected_per_day: dict[dt.date, int] = {}
    result = ExportLoad()
    if rejects:
        con.execute("""INSERT INTO mixpanel.events_rejected (day, reason, raw, loaded_at, window_start, window_end)
                       SELECT day, reason, raw, $loaded_at, $start, $end FROM temp.export_rejects""",
                    {"loaded_at": loaded_at, "start": window_start, "end": window_end})
        for day, reason, n in con.execute("SELECT day, reason, count(*) FROM temp.export_rejects GROUP BY ALL").fetchall():
            result.rejects_by_reason[reason] = result.rejects_by_reason.get(reason, 0) + n
            if day is None:
                result.rejected_without_day += n
            else:
                rejected_per_day[day] = rejected_per_day.get(day, 0) + n
        con.execute("DROP TABLE temp.export_rejects")
    # The ledger from what is already known: a day's events are its good rows less its dropped duplicates
    # (a row of this load is either bad, dropped or current), one insert of every day of the window.
    good_per_day = good_per_day or {}
    result.per_day = {day: good_per_day.get(day, 0) - dropped_per_day.get(day, 0) for day in days}
    result.duplicates_dropped = sum(dropped_per_day.values())
    con.execute("""INSERT INTO mixpanel.event_loads
        SELECT unnest($days), unnest($events), unnest($rejected), unnest($dropped), $start, $end, $loaded_at, $load_id""",
                {**params, "days": days, "events": [result.per_day[day] for day in days],
                 "rejected": [rejected_per_day.get(day, 0) for day in days],
                 "dropped": [dropped_per_day.get(day, 0) for day in days]})
    if unfinished_entry:
        con.execute("DELETE FROM mixpanel.event_loads_unfinished WHERE load_id = ?", [load_id])
    result.events = sum(result.per_day.values())
    result.rejected = sum(result.rejects_by_reason.values())
    result.lines = result.events + result.rejected + result.duplicates_dropped
    return result


def recent_daily_counts(con: duckdb.DuckDBPyConnection, day: dt.date, lookback_days: int) -> tuple[int | None, float | None]:
    """The loaded row count of `day` and the mean of the days before it, from the load ledger."""
    row = con.execute("SELECT events FROM mixpanel.event_loads WHERE day = ?", [day]).fetchone()
    mean = con.execute("""SELECT avg(events) FROM mixpanel.event_loads
                          WHERE day < ? AND day >= ? - ?::INTEGER""", [day, day, lookback_days]).fetchone()[0]
    return (row[0] if row else None), mean


def day_figures(con: duckdb.DuckDBPyConnection, first_day: dt.date, last_day: dt.date) -> dict[dt.date, dict]:
    """Each loaded day's own figures from the load ledger: what the UI shows for that day's partition."""
    window = {"first": first_day, "last": last_day}
    reasons: dict[dt.date, dict[str, int]] = {}
    for day, reason, n in con.execute("""SELECT day, reason, count(*) FROM mixpanel.events_rejected
                                         WHERE day BETWEEN $first AND $last GROUP BY ALL ORDER BY ALL""", window).fetchall():
        reasons.setdefault(day, {})[reason] = n
    return {day: {"events": events, "rejected": rejected, "duplicates_dropped": duplicates,
                  "rejects_by_reason": reasons.get(day, {}), "export_window": f"{start}..{end}"}
            for day, events, rejected, duplicates, start, end in con.execute(
                """SELECT day, events, rejected, duplicates_dropped, window_start, window_end FROM mixpanel.event_loads
                   WHERE day BETWEEN $first AND $last ORDER BY day""", window).fetchall()}


register_ddl("mixpanel.events", DDL, migrate)

# For people (`analytics`): what is asked first of the export, without knowing how loads work.
ANALYTICS_DDL = """
CREATE OR REPLACE VIEW analytics.events_per_day AS
    SELECT day, event, count(*) AS events, count(DISTINCT distinct_id) AS people
    FROM mixpanel.events GROUP BY day, event;
"""
register_ddl("analytics.events_per_day", ANALYTICS_DDL)
