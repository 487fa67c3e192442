"""Mixpanel tables: raw export events by day, their rejects, and the per-day load ledger."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

DDL = """
CREATE TABLE IF NOT EXISTS mixpanel.events (
    event VARCHAR,                 -- never NULL after a load; left unconstrained so bad rows can be moved to rejects
    distinct_id VARCHAR,           -- may be '' or NULL in Mixpanel's own data
    time TIMESTAMPTZ,              -- the true UTC instant (legacy local times converted)
    insert_id VARCHAR,             -- properties."$insert_id"; missing on old or third-party data
    mp_processing_time_ms BIGINT,
    -- the export's properties object, value for value. zstd rather than DuckDB's default FSST for this column:
    -- 43% less disk and a 20% faster load, measured on a million exported events (bench/RESULTS.md).
    properties JSON USING COMPRESSION zstd,
    day DATE,                      -- the partition: the project's export day
    loaded_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS mixpanel.events_rejected (
    day DATE,                      -- the event's day when known, else the first day of the export window
    reason VARCHAR NOT NULL,
    raw VARCHAR,
    loaded_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS mixpanel.event_loads (
    day DATE PRIMARY KEY,
    events BIGINT NOT NULL,
    rejected BIGINT NOT NULL,
    duplicates_dropped BIGINT NOT NULL,
    window_start DATE NOT NULL,
    window_end DATE NOT NULL,
    loaded_at TIMESTAMPTZ NOT NULL
);
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
_RAW_MS = "TRY_CAST(round(TRY_CAST(fields[3]->>'$' AS DOUBLE)) AS BIGINT)"
# The fields are pulled in one parse of `properties`: one `->>` each would parse it four times (0.3 s per million).
_FIELDS = """json_extract(properties, ['$.distinct_id', '$."$insert_id"', '$.time', '$.mp_processing_time_ms'])"""


class TruncatedExport(RuntimeError):
    """The export body ended with Mixpanel's `terminated early` line: the data is incomplete."""


@dataclass
class ExportLoad:
    events: int = 0
    rejected: int = 0
    duplicates_dropped: int = 0
    lines: int = 0
    per_day: dict[dt.date, int] = field(default_factory=dict)
    rejects_by_reason: dict[str, int] = field(default_factory=dict)


def _select_events(source_sql: str, legacy_timezone: str | None, loaded_at_param: str) -> str:
    if legacy_timezone:
        local = f"epoch_ms({_RAW_MS})::TIMESTAMP"
        instant = f"mixpanel.local_to_utc({local}, '{legacy_timezone}')"
        day = f"CAST({local} AS DATE)"
    else:
        instant = f"epoch_ms({_RAW_MS})"
        day = f"CAST(epoch_ms({_RAW_MS}) AS DATE)"
    return f"""
        SELECT event,
               fields[1]->>'$' AS distinct_id,
               {instant} AS time,
               fields[2]->>'$' AS insert_id,
               TRY_CAST(fields[4]->>'$' AS BIGINT) AS mp_processing_time_ms,
               properties,
               {day} AS day,
               {loaded_at_param} AS loaded_at
        FROM (SELECT event, properties, {_FIELDS} AS fields FROM ({source_sql}))
    """


def _fast_source(path: Path) -> str:
    # DuckDB's JSON reader parses in C++ across threads; it fails on the first malformed line.
    return (f"SELECT event, properties FROM read_json('{_sql_path(path)}', format='newline_delimited', "
            "columns={event: 'VARCHAR', properties: 'JSON'}, maximum_object_size=16777216)")


def _sql_path(path: Path) -> str:
    return str(path).replace("'", "''")


def _line_source(path: Path) -> str:
    # One VARCHAR per line, no quoting: the careful path that can name every bad line.
    return (f"SELECT line FROM read_csv('{_sql_path(path)}', columns={{'line': 'VARCHAR'}}, delim='\\x1f', "
            "quote='', escape='', header=false, auto_detect=false, strict_mode=false, null_padding=true)")


def load_export_file(con: duckdb.DuckDBPyConnection, path: Path, window_start: dt.date, window_end: dt.date,
                     legacy_timezone: str | None = None) -> ExportLoad:
    """Replace the days window_start..window_end with the export in `path`, in one transaction.

    Raises TruncatedExport (and changes nothing) when the body ends in `terminated early`.
    """
    loaded_at = dt.datetime.now(dt.timezone.utc)
    try:
        return _replace_window(con, _fast_source(path), None, window_start, window_end, legacy_timezone, loaded_at)
    except duckdb.InvalidInputException as exc:
        if "json" not in str(exc).lower():
            raise
    lines = f"SELECT line FROM ({_line_source(path)}) WHERE line IS NOT NULL AND trim(line) <> ''"
    truncated = con.execute(f"SELECT count(*) FROM ({lines}) WHERE trim(line) = 'terminated early'").fetchone()[0]
    if truncated:
        raise TruncatedExport(f"the export for {window_start}..{window_end} ended with 'terminated early'")
    parsed = f"SELECT json_extract_string(line, '$.event') AS event, json_extract(line, '$.properties') AS properties FROM ({lines}) WHERE json_valid(line)"
    invalid = f"SELECT line FROM ({lines}) WHERE NOT json_valid(line)"
    return _replace_window(con, parsed, invalid, window_start, window_end, legacy_timezone, loaded_at)


def _replace_window(con, source_sql: str, invalid_lines_sql: str | None, window_start: dt.date, window_end: dt.date,
                    legacy_timezone: str | None, loaded_at: dt.datetime) -> ExportLoad:
    result = ExportLoad()
    window = [window_start, window_end]
    params = {"loaded_at": loaded_at, "start": window_start, "end": window_end}
    bounds = {"start": window_start, "end": window_end}
    # Parse once into a temporary stage, then copy only good, deduplicated rows. Deleting rows inserted by
    # the same transaction makes DuckDB's commit rewrite them (measured: +1.1 s per million rows).
    # key_hash is Mixpanel's dedupe key in one number: grouping and joining on it is cheaper than on four
    # columns. A collision only sends two keys through the exact, per-key path below; both are kept.
    con.execute(f"""CREATE OR REPLACE TEMP TABLE export_stage AS
        SELECT *, hash(event, distinct_id, time, insert_id) AS key_hash
        FROM ({_select_events(source_sql, legacy_timezone, '$loaded_at')})""", {"loaded_at": loaded_at})
    # A `properties` that is not an object has no `time`, so it lands here as 'missing properties.time'.
    bad = "(event IS NULL OR event = '' OR time IS NULL OR day NOT BETWEEN $start AND $end)"
    reason = """CASE WHEN event IS NULL OR event = '' THEN 'missing event'
                     WHEN (properties->'time') IS NULL THEN 'missing properties.time'
                     WHEN time IS NULL THEN 'properties.time is not a number'
                     ELSE 'outside the requested window' END"""
    # Mixpanel's dedupe key; the copy processed last wins. Only keys seen more than once are sorted.
    con.execute(f"""CREATE OR REPLACE TEMP TABLE export_duplicate_keys AS
        SELECT key_hash FROM export_stage WHERE NOT {bad} GROUP BY key_hash HAVING count(*) > 1""", bounds)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("DELETE FROM mixpanel.events WHERE day BETWEEN ? AND ?", window)
        con.execute("DELETE FROM mixpanel.events_rejected WHERE day BETWEEN ? AND ?", window)
        con.execute("DELETE FROM mixpanel.event_loads WHERE day BETWEEN ? AND ?", window)
        con.execute(f"""INSERT INTO mixpanel.events
            SELECT s.* EXCLUDE (key_hash) FROM export_stage s ANTI JOIN export_duplicate_keys d USING (key_hash)
            WHERE NOT {bad}
            UNION ALL
            (SELECT s.* EXCLUDE (key_hash) FROM export_stage s SEMI JOIN export_duplicate_keys d USING (key_hash)
             WHERE NOT {bad}
             QUALIFY row_number() OVER (PARTITION BY event, distinct_id, time, insert_id
                                        ORDER BY mp_processing_time_ms DESC NULLS LAST) = 1)""", bounds)
        con.execute(f"""INSERT INTO mixpanel.events_rejected
            SELECT CASE WHEN day BETWEEN $start AND $end THEN day ELSE $start END, {reason},
                   json_object('event', event, 'properties', properties)::VARCHAR, $loaded_at
            FROM export_stage WHERE {bad}""", params)
        if invalid_lines_sql:
            con.execute(f"""INSERT INTO mixpanel.events_rejected
                SELECT $start, 'not valid JSON', left(line, 10000), $loaded_at FROM ({invalid_lines_sql})""",
                        {"start": window_start, "loaded_at": loaded_at})
        con.execute(f"""INSERT INTO mixpanel.event_loads
            WITH days AS (SELECT unnest(range($start::TIMESTAMP, $end::TIMESTAMP + INTERVAL 1 DAY, INTERVAL 1 DAY))::DATE AS day),
                 staged AS (SELECT day, count(*) AS n FROM export_stage WHERE NOT {bad} GROUP BY day),
                 loaded AS (SELECT day, count(*) AS n FROM mixpanel.events WHERE day BETWEEN $start AND $end GROUP BY day),
                 rejected AS (SELECT day, count(*) AS n FROM mixpanel.events_rejected WHERE day BETWEEN $start AND $end GROUP BY day)
            SELECT days.day, coalesce(loaded.n, 0), coalesce(rejected.n, 0),
                   coalesce(staged.n, 0) - coalesce(loaded.n, 0),
                   $start, $end, $loaded_at
            FROM days LEFT JOIN staged USING (day) LEFT JOIN loaded USING (day) LEFT JOIN rejected USING (day)""", params)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.execute("DROP TABLE IF EXISTS export_stage; DROP TABLE IF EXISTS export_duplicate_keys")
    result.per_day = dict(con.execute("SELECT day, events FROM mixpanel.event_loads WHERE day BETWEEN ? AND ?", window).fetchall())
    result.rejects_by_reason = dict(con.execute("""SELECT reason, count(*) FROM mixpanel.events_rejected
                                                   WHERE day BETWEEN ? AND ? GROUP BY reason""", window).fetchall())
    result.duplicates_dropped = con.execute("SELECT sum(duplicates_dropped) FROM mixpanel.event_loads WHERE day BETWEEN ? AND ?",
                                            window).fetchone()[0] or 0
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
