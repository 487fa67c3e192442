"""Split impressions: the landed table, the file ledger, quarantined files, and the Mixpanel exposures outbox."""

from __future__ import annotations

import codecs
import datetime as dt
import gzip
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import duckdb

from mixsync.impressions.landing import MAX_TIME_MS, MIN_TIME_MS, duckdb_reads_gzip_header
from mixsync.warehouse.outbox import enqueue, outbox_ddl
from mixsync.warehouse.schema import register_ddl
from mixsync.warehouse.sql import glob_literal, literal

EXPOSURES_OUTBOX = "sync.mixpanel_exposures"

DDL = """
CREATE TABLE IF NOT EXISTS split.impressions (
    impression_id VARCHAR NOT NULL,      -- md5 of the dedupe key (environmentId, split, key, treatment, time, splitVersionNumber)
    environment_id VARCHAR NOT NULL,
    environment_name VARCHAR,
    split VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    bucketing_key VARCHAR,
    treatment VARCHAR NOT NULL,
    label VARCHAR,
    time TIMESTAMPTZ NOT NULL,           -- the impression's `time` (epoch ms) as a UTC instant
    split_version_number BIGINT,
    sdk VARCHAR,
    sdk_version VARCHAR,
    machine_name VARCHAR,
    machine_ip VARCHAR,
    properties JSON,                     -- the webhook sends a JSON-encoded string (or null); kept as JSON
    file_name VARCHAR NOT NULL,          -- the landing file the impression first arrived in
    load_id VARCHAR NOT NULL,            -- the Dagster run that loaded it
    loaded_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS split.impression_files (
    file_name VARCHAR NOT NULL,
    content_hash VARCHAR NOT NULL,       -- sha256 of the bytes as landed: a renamed copy is recognised
    bytes BIGINT NOT NULL,
    status VARCHAR NOT NULL,             -- loaded | duplicate (same bytes loaded before) | quarantined
    impressions BIGINT NOT NULL,         -- impressions in the file
    inserted BIGINT NOT NULL,            -- of those, new to split.impressions
    reason VARCHAR,
    load_id VARCHAR NOT NULL,
    loaded_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS split.impression_quarantine (
    file_name VARCHAR NOT NULL,
    content_hash VARCHAR NOT NULL,
    bytes BIGINT NOT NULL,
    reason VARCHAR NOT NULL,             -- a short class: not valid JSON, not a JSON array, corrupt gzip, missing key fields ...
    detail VARCHAR,                      -- what exactly was wrong, from the parser or the checks
    moved_to VARCHAR NOT NULL,
    load_id VARCHAR NOT NULL,
    quarantined_at TIMESTAMPTZ NOT NULL
);
""" + outbox_ddl(EXPOSURES_OUTBOX)

# The webhook's fields, typed as DuckDB's JSON reader should read them; unknown fields are ignored. The two integers
# are read as JSON, so that a 1.5, a "12" or a true is seen and refused as the receiver does, not rounded or cast.
WEBHOOK_COLUMNS = ("{key: 'VARCHAR', bucketingKey: 'VARCHAR', split: 'VARCHAR', treatment: 'VARCHAR', "
                   "label: 'VARCHAR', time: 'JSON', splitVersionNumber: 'JSON', environmentId: 'VARCHAR', "
                   "environmentName: 'VARCHAR', sdk: 'VARCHAR', sdkVersion: 'VARCHAR', machineName: 'VARCHAR', "
                   "machineIp: 'VARCHAR', properties: 'VARCHAR'}")
# The dedupe key's fields, and how a staged row lacks each (splitVersionNumber may be null: Split sends it).
KEY_CHECKS = {
    "environmentId": "environment_id IS NULL OR environment_id = ''",
    "split": "split IS NULL OR split = ''",
    "key": "key IS NULL OR key = ''",
    "treatment": "treatment IS NULL OR treatment = ''",
    "time": "time_type IS NULL",
}
# JSON integers (yyjson says BIGINT when negative, UBIGINT otherwise); a UBIGINT past int64 stages as NULL.
INTEGER_TYPES = "('BIGINT', 'UBIGINT')"
# A field of the wrong JSON type, and how a staged row shows it.
TYPE_CHECKS = {
    "time is not an integer": f"time_type NOT IN {INTEGER_TYPES}",
    "splitVersionNumber is not null or a 64-bit integer": (f"version_type NOT IN {INTEGER_TYPES} "
                                                           "OR (version_type IS NOT NULL AND split_version_number IS NULL)"),
}
# A time DuckDB could not make a timestamp of (or surely wrong): the file is set aside, not the run failed.
TIME_IN_RANGE = f"time_ms BETWEEN {MIN_TIME_MS} AND {MAX_TIME_MS}"
TIME_OUT_OF_RANGE = f"time_type IN {INTEGER_TYPES} AND (time_ms IS NULL OR NOT {TIME_IN_RANGE})"
STAGE_DDL = """CREATE OR REPLACE TEMP TABLE impression_stage (
    path VARCHAR, environment_id VARCHAR, environment_name VARCHAR, split VARCHAR, key VARCHAR, bucketing_key VARCHAR,
    treatment VARCHAR, label VARCHAR, time_ms BIGINT, time_type VARCHAR, split_version_number BIGINT,
    version_type VARCHAR, sdk VARCHAR, sdk_version VARCHAR, machine_name VARCHAR, machine_ip VARCHAR,
    properties_text VARCHAR)"""
# Parser errors that mean "this file is bad"; anything else (out of memory, interrupted) fails the run instead.
DATA_ERRORS = (duckdb.InvalidInputException, duckdb.IOException, duckdb.ConversionException)


class LandedFile(Protocol):
    # Read-only members, so a frozen dataclass (impressions.landing.LandingFile) satisfies it.
    @property
    def name(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def content_hash(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def gzipped(self) -> bool: ...


@dataclass
class FileOutcome:
    name: str
    content_hash: str
    status: str                 # loaded | duplicate | quarantined
    impressions: int = 0
    inserted: int = 0
    reason: str | None = None
    detail: str | None = None


@dataclass
class ImpressionLoad:
    files: list[FileOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def inserted(self) -> int:
        return sum(f.inserted for f in self.files)

    @property
    def impressions(self) -> int:
        return sum(f.impressions for f in self.files if f.status == "loaded")

    def quarantine_reasons(self) -> dict[str, int]:
        reasons: dict[str, int] = {}
        for f in self.files:
            if f.status == "quarantined":
                reason = f.reason or "unknown"
                reasons[reason] = reasons.get(reason, 0) + 1
        return reasons


def _stage_select(compression: str) -> str:
    return f"""
        SELECT filename AS path, environmentId AS environment_id, environmentName AS environment_name, split, key,
               bucketingKey AS bucketing_key, treatment, label,
               CASE WHEN json_type(time) IN {INTEGER_TYPES} THEN TRY_CAST(time AS BIGINT) END AS time_ms,
               json_type(time) AS time_type,
               CASE WHEN json_type(splitVersionNumber) IN {INTEGER_TYPES}
                    THEN TRY_CAST(splitVersionNumber AS BIGINT) END AS split_version_number,
               json_type(splitVersionNumber) AS version_type, sdk, sdkVersion AS sdk_version,
               machineName AS machine_name, machineIp AS machine_ip, properties AS properties_text
        FROM read_json($paths, format='array', columns={WEBHOOK_COLUMNS}, compression={literal(compression)},
                       filename=true, maximum_object_size=16777216)"""


def _insert_columns(con: duckdb.DuckDBPyConnection, table: str, columns: list[list]) -> None:
    """Insert rows given column by column, in one statement (executemany costs a round trip per row)."""
    if not columns or not columns[0]:
        return
    names = [f"c{i}" for i in range(len(columns))]
    con.execute(f"INSERT INTO {table} SELECT {', '.join(f'unnest(${n})' for n in names)}", dict(zip(names, columns, strict=True)))


def _classify(exc: duckdb.Error) -> str:
    message = str(exc).lower()
    if "gzip" in message or "compress" in message:
        return "corrupt gzip"
    if "top-level json array" in message:
        return "not a JSON array"
    if "duplicate key" in message:
        return "an object has a duplicate key"
    if "expected object" in message:
        return "an element is not an impression object"
    if "transform error" in message or "cast" in message:
        return "a field has the wrong type"
    if "malformed json" in message or "json" in message:
        return "not valid JSON"
    return "unreadable"


def _detail(exc: duckdb.Error) -> str:
    # DuckDB appends hints about reader options; the first lines say what is wrong.
    text = str(exc).split("Try setting")[0].strip()
    return text[:1000]


def _is_utf8(path, gzipped: bool) -> bool:
    """Whether the file's text (decompressed) is UTF-8, read in chunks: only for a file DuckDB already refused."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as stream:
            while chunk := stream.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
        return True
    except UnicodeDecodeError:
        return False
    except (OSError, EOFError, zlib.error):
        return True  # not a question of UTF-8: the gzip check says what is wrong


def _gzip_header_is_readable(path) -> bool:
    with open(path, "rb") as handle:
        return duckdb_reads_gzip_header(handle.read(4))


def _gzip_is_whole(path) -> bool:
    """Whether a gzip file decompresses to its end (DuckDB 1.5 reports a truncated stream as bad JSON)."""
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 20):
                pass
        return True
    except (OSError, EOFError, zlib.error):
        return False


def _stage(con: duckdb.DuckDBPyConnection, files: list[LandedFile], compression: str) -> dict[str, tuple[str, str]]:
    """Parse `files` into impression_stage; return the files that would not parse, with reason and detail.

    The whole group is parsed in one statement (DuckDB reads the files in parallel). Only when it fails is the
    group halved until each bad file is found: a few bad files cost a few extra parses, not one per file.
    """
    if not files:
        return {}
    try:
        # As patterns matching each file alone: a name holding `*`, `?` or `[` is a file name, not a glob.
        con.execute(f"INSERT INTO impression_stage BY NAME {_stage_select(compression)}",
                    {"paths": [glob_literal(f.path) for f in files]})
        return {}
    except DATA_ERRORS as exc:
        if len(files) == 1:
            if files[0].gzipped and not _gzip_is_whole(files[0].path):
                return {files[0].name: ("corrupt gzip", _detail(exc))}
            if files[0].gzipped and not _gzip_header_is_readable(files[0].path):
                return {files[0].name: ("unsupported gzip header", "DuckDB's gzip reader does not take the FTEXT, "
                                        "FHCRC or FCOMMENT header flags; recompress the file without them")}
            return {files[0].name: (_classify(exc), _detail(exc))}
    except UnicodeDecodeError as exc:
        # DuckDB refused the file and quoted some of its bytes in the message, which Python then could not decode:
        # the file is not UTF-8, or the quote cut a character in two. Either way it is this file that is bad.
        if len(files) == 1:
            if not _is_utf8(files[0].path, files[0].gzipped):
                return {files[0].name: ("not UTF-8", f"the file's text is not UTF-8 ({exc.reason})")}
            return {files[0].name: ("not valid JSON", "DuckDB's JSON reader refused the file (its message quoted "
                                                      "the file's bytes cut mid-character)")}
    middle = len(files) // 2
    return {**_stage(con, files[:middle], compression), **_stage(con, files[middle:], compression)}


def load_impression_files(con: duckdb.DuckDBPyConnection, files: Iterable[LandedFile], load_id: str,
                          quarantine_paths: dict[str, str], loaded_at: dt.datetime) -> ImpressionLoad:
    """Load complete landing files into split.impressions in one transaction and record each in the ledger.

    Bytes already loaded (the ledger knows the hash) are not parsed again; impressions already present are
    skipped (dedupe key); a file that does not parse, or lacks key fields, is recorded as quarantined (at
    `quarantine_paths[name]`) and the others still load. The caller moves the files once this has committed.
    """
    files = sorted(files, key=lambda f: f.name)
    result = ImpressionLoad()
    if not files:
        return result
    by_name = {f.name: f for f in files}
    con.execute("""CREATE OR REPLACE TEMP TABLE impression_batch
                   (name VARCHAR, path VARCHAR, content_hash VARCHAR, bytes BIGINT, gzipped BOOLEAN)""")
    _insert_columns(con, "impression_batch", [[f.name for f in files], [str(f.path) for f in files],
                                              [f.content_hash for f in files], [f.size for f in files],
                                              [f.gzipped for f in files]])
    # Same bytes as a loaded file (a retried run, a renamed copy); or as an earlier file of this batch, which is
    # parsed once and the copies follow it (loaded: a duplicate; quarantined: quarantined too).
    duplicates = {name for (name,) in con.execute("""
        SELECT name FROM impression_batch b
        WHERE EXISTS (SELECT 1 FROM split.impression_files l WHERE l.content_hash = b.content_hash AND l.status = 'loaded')""").fetchall()}
    copy_of = dict(con.execute("""
        SELECT name, first_value(name) OVER (PARTITION BY content_hash ORDER BY name) FROM impression_batch
        QUALIFY row_number() OVER (PARTITION BY content_hash ORDER BY name) > 1""").fetchall())
    to_parse = [f for f in files if f.name not in duplicates and f.name not in copy_of]
    con.execute(STAGE_DDL)
    bad = _stage(con, [f for f in to_parse if f.gzipped], "gzip")
    bad.update(_stage(con, [f for f in to_parse if not f.gzipped], "uncompressed"))
    # Every impression needs the fields of the dedupe key, and a time that is a timestamp; a file with any impression
    # lacking one is set aside.
    counts = con.execute(f"""SELECT b.name, count(s.path), count(*) FILTER (WHERE {TIME_OUT_OF_RANGE}),
                                    {", ".join(f"count(*) FILTER (WHERE {c})" for c in TYPE_CHECKS.values())},
                                    {", ".join(f"count(*) FILTER (WHERE {c})" for c in KEY_CHECKS.values())}
                             FROM impression_batch b LEFT JOIN impression_stage s ON s.path = b.path
                             GROUP BY b.name""").fetchall()
    rows_per_file = {}
    for name, rows, out_of_range, *found in counts:
        rows_per_file[name] = rows
        if name in bad or name in duplicates or name in copy_of:
            continue
        wrong, nulls = found[:len(TYPE_CHECKS)], found[len(TYPE_CHECKS):]
        lacking = [f"{fieldname} ({n} of {rows})" for fieldname, n in zip(KEY_CHECKS, nulls, strict=True) if n]
        mistyped = [f"{what} ({n} of {rows})" for what, n in zip(TYPE_CHECKS, wrong, strict=True) if n]
        if rows == 0:
            bad[name] = ("no impressions", "the file holds no impressions (it is empty, or an empty array)")
        elif lacking:
            bad[name] = ("missing key fields", "impressions without " + ", ".join(lacking))
        elif mistyped:
            bad[name] = ("a field has the wrong type", "; ".join(mistyped))
        elif out_of_range:
            bad[name] = ("time out of range", f"{out_of_range} of {rows} impressions have a time outside "
                                              f"{MIN_TIME_MS}..{MAX_TIME_MS} ms (1970-01-01 to 9999-12-31 UTC)")
    for name, first in copy_of.items():
        if first in bad and name not in duplicates:
            bad[name] = bad[first]
            rows_per_file[name] = rows_per_file.get(first, 0)
    good = [f.name for f in to_parse if f.name not in bad]
    con.execute("CREATE OR REPLACE TEMP TABLE impression_good (name VARCHAR)")
    _insert_columns(con, "impression_good", [good])
    # Deduplicate within the batch, then against what is already loaded (only the batch's time range is read).
    # The range covers every good file's times (a quarantined file's rows may lie outside what DuckDB can hold).
    in_range = TIME_IN_RANGE
    con.execute(f"""CREATE OR REPLACE TEMP TABLE impression_new AS
        WITH staged AS (
            SELECT md5(json_array(s.environment_id, s.split, s.key, s.treatment, s.time_ms,
                                  s.split_version_number)::VARCHAR) AS impression_id, s.*, b.name AS file_name
            FROM impression_stage s JOIN impression_batch b ON b.path = s.path SEMI JOIN impression_good g ON g.name = b.name
            QUALIFY row_number() OVER (PARTITION BY impression_id ORDER BY b.name) = 1)
        SELECT impression_id, environment_id, environment_name, split, key, bucketing_key, treatment, label,
               make_timestamptz(time_ms * 1000) AS time, split_version_number, sdk, sdk_version, machine_name, machine_ip,
               CASE WHEN properties_text IS NULL THEN NULL
                    WHEN json_valid(properties_text) THEN json(properties_text)
                    ELSE to_json(properties_text) END AS properties,
               file_name
        FROM staged
        WHERE impression_id NOT IN (
            SELECT impression_id FROM split.impressions
            WHERE time BETWEEN (SELECT make_timestamptz(min(time_ms) * 1000) FROM impression_stage WHERE {in_range})
                           AND (SELECT make_timestamptz(max(time_ms) * 1000) FROM impression_stage WHERE {in_range}))""")
    inserted = dict(con.execute("SELECT file_name, count(*) FROM impression_new GROUP BY file_name").fetchall())
    for f in files:
        if f.name in duplicates or (f.name in copy_of and f.name not in bad):
            result.files.append(FileOutcome(f.name, f.content_hash, "duplicate", reason="same bytes loaded before"))
        elif f.name in bad:
            reason, detail = bad[f.name]
            result.files.append(FileOutcome(f.name, f.content_hash, "quarantined", rows_per_file.get(f.name, 0),
                                            reason=reason, detail=detail))
        else:
            result.files.append(FileOutcome(f.name, f.content_hash, "loaded", rows_per_file.get(f.name, 0),
                                            inserted.get(f.name, 0)))
    params = {"load_id": load_id, "loaded_at": loaded_at}
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("""INSERT INTO split.impressions
                       SELECT * EXCLUDE (file_name), file_name, $load_id, $loaded_at FROM impression_new""", params)
        outcomes = result.files
        _insert_columns(con, "split.impression_files", [
            [o.name for o in outcomes], [o.content_hash for o in outcomes], [by_name[o.name].size for o in outcomes],
            [o.status for o in outcomes], [o.impressions for o in outcomes], [o.inserted for o in outcomes],
            [o.reason for o in outcomes], [load_id] * len(outcomes), [loaded_at] * len(outcomes)])
        quarantined = [o for o in result.files if o.status == "quarantined"]
        if quarantined:
            con.executemany("INSERT INTO split.impression_quarantine VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [[o.name, o.content_hash, by_name[o.name].size, o.reason, o.detail,
                              quarantine_paths[o.name], load_id, loaded_at] for o in quarantined])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.execute("DROP TABLE IF EXISTS impression_stage; DROP TABLE IF EXISTS impression_new; "
                    "DROP TABLE IF EXISTS impression_batch; DROP TABLE IF EXISTS impression_good")
    return result


def ledger_by_name(con: duckdb.DuckDBPyConnection, names: list[str]) -> dict[str, str]:
    """The last ledger status of each of `names` that the ledger knows (for files a retried run no longer finds)."""
    if not names:
        return {}
    return dict(con.execute("""SELECT file_name, arg_max(status, loaded_at) FROM split.impression_files
                               WHERE file_name IN (SELECT unnest($names)) GROUP BY file_name""",
                            {"names": names}).fetchall())


def enqueue_exposures(con: duckdb.DuckDBPyConnection, payload_sql: str, scope: str) -> int:
    """Put every impression the exposures outbox has not seen into it. Returns how many were added.

    `payload_sql` selects (id, payload) from split.impressions aliased `i`. Only impressions loaded since the last
    enqueue (with an hour of margin for clock steps) are read; the outbox's anti-join on id is the real guarantee.
    """
    since = con.execute(f"SELECT max(enqueued_at) - INTERVAL 1 HOUR FROM {EXPOSURES_OUTBOX}").fetchone()[0]
    where = "WHERE i.loaded_at >= $since" if since is not None else ""
    params = {"since": since} if since is not None else {}
    return enqueue(con, EXPOSURES_OUTBOX, scope, f"{payload_sql} {where}", params)


def exposure_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    return dict(con.execute(f"SELECT status, count(*) FROM {EXPOSURES_OUTBOX} GROUP BY status").fetchall())


def exposure_rejects_by_reason(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    return dict(con.execute(f"""SELECT coalesce(error, '(no message)'), count(*) FROM {EXPOSURES_OUTBOX}
                                WHERE status = 'rejected' GROUP BY ALL ORDER BY 2 DESC LIMIT 20""").fetchall())


register_ddl("split.impressions", DDL)

# For people (`analytics`): exposures per split and treatment per (UTC) day.
ANALYTICS_DDL = """
CREATE OR REPLACE VIEW analytics.exposures_per_day AS
    SELECT CAST(time AT TIME ZONE 'UTC' AS DATE) AS day, split, treatment, count(*) AS exposures,
           count(DISTINCT key) AS users
    FROM split.impressions GROUP BY ALL;
"""
register_ddl("analytics.exposures_per_day", ANALYTICS_DDL)
