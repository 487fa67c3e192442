"""Mixpanel cohort webhooks: landed bodies recorded, then applied to the same membership tables the engage poll keeps.

New DDL here is portable to DuckLake: no sequences of its own, no PRIMARY KEY; a body is recorded once by the
anti-join on its (unique) file name. Snapshot ids come from the cohorts flow's own sequence.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

import mixsync.mixpanel.cohort_sql  # noqa: F401  (registers mixpanel.cohort_members and friends, written here)
from mixsync.mixpanel.cohort_sql import next_snapshot_id
from mixsync.warehouse.schema import register_ddl
from mixsync.warehouse.sql import glob_literal, literal

DDL = """
-- Every landed webhook body, once: what it asked, and when (and as which snapshot) it was applied.
CREATE TABLE IF NOT EXISTS mixpanel.cohort_webhook_bodies (
    file VARCHAR NOT NULL,
    action VARCHAR NOT NULL,         -- members | add_members | remove_members
    cohort_id BIGINT NOT NULL,
    cohort_name VARCHAR,
    session_id VARCHAR,
    page INTEGER,                    -- page_info.page_count, from 1
    total_pages INTEGER,
    members BIGINT NOT NULL,
    landed_at TIMESTAMPTZ NOT NULL,
    applied_at TIMESTAMPTZ,          -- NULL: a members page waiting for the other pages of its session
    snapshot_id BIGINT,              -- the mixpanel.cohort_snapshots row it made (NULL: nothing changed or a repeat)
    outcome VARCHAR
);
-- Why a body was skipped (outcome 'error'): an action or fields the loader cannot apply. A warehouse created
-- before this column gets it here.
ALTER TABLE mixpanel.cohort_webhook_bodies ADD COLUMN IF NOT EXISTS error VARCHAR;
-- The members each body carried, until its change is applied (a members page waits for its siblings here).
CREATE TABLE IF NOT EXISTS mixpanel.cohort_webhook_members (
    file VARCHAR NOT NULL,
    distinct_id VARCHAR NOT NULL,
    properties JSON
);
-- Landed files the loader could not record (not JSON, or a value out of its column's type), moved to the
-- landing folder's quarantine/ subfolder so they never block the others.
CREATE TABLE IF NOT EXISTS mixpanel.cohort_webhook_quarantine (
    file VARCHAR NOT NULL,
    reason VARCHAR NOT NULL,
    quarantined_at TIMESTAMPTZ NOT NULL
);
"""
register_ddl("mixpanel.cohort_webhooks", DDL)


# What a stored file's content can fail with when recorded (not UTF-8 or not JSON, a value out of its column's type,
# a member without a mixpanel_distinct_id): that file is quarantined. Any other error (I/O, a lost catalog
# connection) fails the run and leaves every file for the next one.
BAD_CONTENT = (duckdb.ConversionException, duckdb.InvalidInputException, duckdb.ConstraintException)


@dataclass
class WebhookApply:
    landed: int = 0
    applied: int = 0
    errors: dict[str, str] = field(default_factory=dict)  # file -> why it was skipped
    waiting_pages: int = 0
    entered: int = 0
    left: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


def record_bodies(con: duckdb.DuckDBPyConnection, paths: list[Path]) -> tuple[int, dict[Path, str]]:
    """Record landed bodies not recorded yet (a file that survived a crash after its commit is skipped).

    Returns how many were recorded and the files that could not be, with why: all in one transaction, and if a
    file's content refuses that, each file in its own, so one bad file never holds back the others.
    """
    if not paths:
        return 0, {}
    try:
        return _record(con, paths), {}
    except BAD_CONTENT:
        pass
    landed, refused = 0, {}
    for path in paths:
        try:
            landed += _record(con, [path])
        except BAD_CONTENT as exc:
            refused[path] = str(exc).split("\n")[0]
    return landed, refused


def record_quarantine(con: duckdb.DuckDBPyConnection, refused: dict[Path, str]) -> None:
    """Record the files `record_bodies` could not record, with why (before they move to the quarantine folder)."""
    if refused:
        con.execute("""INSERT INTO mixpanel.cohort_webhook_quarantine
                       SELECT unnest($files::VARCHAR[]), unnest($reasons::VARCHAR[]), $now""",
                    {"files": [p.name for p in refused], "reasons": list(refused.values()),
                     "now": dt.datetime.now(dt.UTC)})


def _record(con: duckdb.DuckDBPyConnection, paths: list[Path]) -> int:
    # As patterns matching each file alone: a folder named with `*`, `?` or `[` is a name, not a glob.
    files = "[" + ", ".join(literal(glob_literal(p)) for p in paths) + "]"
    con.execute(f"""CREATE OR REPLACE TEMP TABLE wh_raw AS
        SELECT parse_filename(r.filename) AS file, r.content::JSON AS body FROM read_text({files}) r
        -- r.filename: a DuckLake table has a virtual `filename` column of its own.
        ANTI JOIN mixpanel.cohort_webhook_bodies b ON b.file = parse_filename(r.filename)""")
    now = dt.datetime.now(dt.UTC)
    con.execute("BEGIN TRANSACTION")
    try:
        # Pages only for a members snapshot: the receiver checks page_info there alone, and nothing else reads it.
        landed = con.execute("""INSERT INTO mixpanel.cohort_webhook_bodies
            SELECT file, body->>'$.action', (body->>'$.parameters.mixpanel_cohort_id')::BIGINT,
                   body->>'$.parameters.mixpanel_cohort_name', body->>'$.parameters.mixpanel_session_id',
                   CASE WHEN body->>'$.action' = 'members'
                        THEN (body->>'$.parameters.page_info.page_count')::INTEGER END,
                   CASE WHEN body->>'$.action' = 'members'
                        THEN (body->>'$.parameters.page_info.total_pages')::INTEGER END,
                   json_array_length(body, '$.parameters.members'), $now, NULL, NULL, NULL, NULL
            FROM wh_raw""", {"now": now}).fetchone()[0]
        # mixpanel_distinct_id as text whether sent as a string or a number; the email as the poll path names it.
        con.execute("""INSERT INTO mixpanel.cohort_webhook_members
            SELECT file, json_extract_string(m, '$.mixpanel_distinct_id'),
                   CASE WHEN coalesce(json_extract_string(m, '$.email'), '') <> ''
                        THEN json_object('$email', json_extract_string(m, '$.email')) ELSE '{}'::JSON END
            FROM (SELECT file, unnest(json_extract(body, '$.parameters.members[*]')) AS m FROM wh_raw)""")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("DROP TABLE wh_raw")
    return landed


def _apply_change(con: duckdb.DuckDBPyConnection, files: list[str], action: str, cohort_id: int,
                  cohort_name: str) -> tuple[int, int, int]:
    """Apply one change (the members of `files`) to the cohort's membership; returns (snapshot, entered, left)."""
    con.execute("""CREATE OR REPLACE TEMP TABLE wh_set AS
        SELECT distinct_id, any_value(properties) AS properties FROM mixpanel.cohort_webhook_members
        WHERE file IN (SELECT unnest($files::VARCHAR[])) GROUP BY distinct_id""", {"files": files})
    current = "(SELECT distinct_id FROM mixpanel.cohort_members WHERE cohort_id = $c)"
    entered = f"SELECT s.distinct_id, s.properties FROM wh_set s ANTI JOIN {current} m USING (distinct_id)"
    left = {"members": f"SELECT m.distinct_id FROM {current} m ANTI JOIN wh_set s USING (distinct_id)",
            "remove_members": f"SELECT m.distinct_id FROM {current} m SEMI JOIN wh_set s USING (distinct_id)",
            "add_members": "SELECT NULL::VARCHAR AS distinct_id WHERE false"}[action]
    if action == "remove_members":
        entered = "SELECT NULL::VARCHAR AS distinct_id, NULL::JSON AS properties WHERE false"
    con.execute(f"CREATE OR REPLACE TEMP TABLE wh_entered AS {entered}", {"c": cohort_id} if "$c" in entered else {})
    con.execute(f"CREATE OR REPLACE TEMP TABLE wh_left AS {left}", {"c": cohort_id} if "$c" in left else {})
    n_entered = con.execute("SELECT count(*) FROM wh_entered").fetchone()[0]
    n_left = con.execute("SELECT count(*) FROM wh_left").fetchone()[0]
    # Ids by construction (no sequences: the schema is portable to DuckLake); every snapshot has its row in
    # mixpanel.cohort_snapshots, written below under the same writer lock.
    snapshot_id = next_snapshot_id(con)
    now = dt.datetime.now(dt.UTC)
    params = {"c": cohort_id, "s": snapshot_id, "t": now}
    con.execute("""INSERT INTO mixpanel.cohort_membership_history
                   SELECT $c, distinct_id, 'entered', $t, $s FROM wh_entered
                   UNION ALL SELECT $c, distinct_id, 'left', $t, $s FROM wh_left""", params)
    con.execute("""DELETE FROM mixpanel.cohort_members m USING wh_left l
                   WHERE m.cohort_id = $c AND m.distinct_id = l.distinct_id""", {"c": cohort_id})
    con.execute("INSERT INTO mixpanel.cohort_members SELECT $c, distinct_id, properties, $t, $s FROM wh_entered",
                params)
    members = con.execute("SELECT count(*) FROM mixpanel.cohort_members WHERE cohort_id = $c",
                          {"c": cohort_id}).fetchone()[0]
    pages = len(files) if action == "members" else 1
    con.execute("""INSERT INTO mixpanel.cohort_snapshots VALUES
                   ($s, $c, $name, $t, $kind, $members, $entered, $left, NULL, $pages, 0, 0, ['$email'])""",
                {**params, "name": cohort_name, "kind": f"webhook_{action}", "members": members,
                 "entered": n_entered, "left": n_left, "pages": pages})
    # The cohort is current in mixpanel.cohort_members: the Flagsmith push syncs it like a polled one.
    con.execute("DELETE FROM mixpanel.cohort_member_loads WHERE cohort_id = $c", {"c": cohort_id})
    con.execute("INSERT INTO mixpanel.cohort_member_loads VALUES ($c, $name, $s, $members, ['$email'], $t)",
                {**params, "name": cohort_name, "members": members})
    con.execute("DROP TABLE wh_set; DROP TABLE wh_entered; DROP TABLE wh_left")
    return snapshot_id, n_entered, n_left


# Why a recorded body cannot be applied (NULL when it can); such a body is skipped with this as its error.
INVALID = """CASE
    WHEN action NOT IN ('members', 'add_members', 'remove_members')
        THEN 'action "' || action || '" is not one of members, add_members, remove_members'
    WHEN action = 'members' AND session_id IS NULL
        THEN 'a members snapshot without parameters.mixpanel_session_id'
    WHEN action = 'members' AND NOT coalesce(page BETWEEN 1 AND total_pages, false)
        THEN 'a members snapshot without parameters.page_info 1 <= page_count <= total_pages'
    END"""


def _mark_invalid(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Skip every pending body that cannot be applied, with its reason in `error`, before any is applied (so an
    invalid page never counts towards its session's pages). Returns {file: reason}."""
    invalid = dict(con.execute(f"""SELECT file, {INVALID} FROM mixpanel.cohort_webhook_bodies
                                   WHERE applied_at IS NULL AND {INVALID} IS NOT NULL""").fetchall())
    for file, reason in invalid.items():
        _skip(con, file, reason)
    return invalid


def _skip(con: duckdb.DuckDBPyConnection, file: str, reason: str) -> None:
    """Mark one body as not applicable (outcome 'error', the reason in `error`) in its own transaction."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("""UPDATE mixpanel.cohort_webhook_bodies SET applied_at = now(), outcome = 'error', error = $e
                       WHERE file = $f""", {"f": file, "e": reason})
        con.execute("DELETE FROM mixpanel.cohort_webhook_members WHERE file = $f", {"f": file})
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def _mark(con, files: list[str], snapshot_id: int | None, outcome: str) -> None:
    con.execute("""UPDATE mixpanel.cohort_webhook_bodies SET applied_at = now(), snapshot_id = $s, outcome = $o
                   WHERE file IN (SELECT unnest($files::VARCHAR[]))""", {"files": files, "s": snapshot_id, "o": outcome})
    con.execute("DELETE FROM mixpanel.cohort_webhook_members WHERE file IN (SELECT unnest($files::VARCHAR[]))",
                {"files": files})


def apply_pending(con: duckdb.DuckDBPyConnection) -> WebhookApply:
    """Apply recorded bodies in arrival order, each change in its own transaction.

    add_members / remove_members apply at once (adding a member twice or removing an absent one changes nothing).
    A members snapshot applies once every page 1..total_pages of its session has arrived, and once per session:
    a page that arrives again is a repeat. A later snapshot is a full reconcile, so re-sent snapshots are harmless.
    """
    result = WebhookApply(errors=_mark_invalid(con))
    pending = con.execute("""SELECT file, action, cohort_id, coalesce(cohort_name, cohort_id::VARCHAR), session_id,
                                    total_pages
                             FROM mixpanel.cohort_webhook_bodies WHERE applied_at IS NULL ORDER BY file""").fetchall()
    done: set[str] = set()
    for file, action, cohort_id, name, session_id, total_pages in pending:
        if file in done:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            if action != "members":
                snapshot_id, entered, left = _apply_change(con, [file], action, cohort_id, name)
                _mark(con, [file], snapshot_id, "applied")
                outcome, files = "applied", [file]
            else:
                already = con.execute("""SELECT count(*) FROM mixpanel.cohort_webhook_bodies
                                         WHERE action = 'members' AND cohort_id = $c AND session_id = $s
                                           AND outcome = 'applied'""", {"c": cohort_id, "s": session_id}).fetchone()[0]
                session = [r[0] for r in con.execute("""
                    SELECT min(file) FROM mixpanel.cohort_webhook_bodies
                    WHERE action = 'members' AND cohort_id = $c AND session_id = $s AND applied_at IS NULL
                    GROUP BY page ORDER BY page""", {"c": cohort_id, "s": session_id}).fetchall()]
                all_files = [r[0] for r in con.execute("""
                    SELECT file FROM mixpanel.cohort_webhook_bodies
                    WHERE action = 'members' AND cohort_id = $c AND session_id = $s AND applied_at IS NULL""",
                                                         {"c": cohort_id, "s": session_id}).fetchall()]
                if already:
                    _mark(con, all_files, None, "repeat of an applied snapshot")
                    outcome, files, entered, left = "repeat", all_files, 0, 0
                elif len(session) < total_pages:
                    con.execute("COMMIT")
                    done.update(all_files)
                    continue
                else:
                    snapshot_id, entered, left = _apply_change(con, session, "members", cohort_id, name)
                    _mark(con, session, snapshot_id, "applied")
                    _mark(con, [f for f in all_files if f not in session], None, "repeated page")
                    outcome, files = "applied", all_files
            con.execute("COMMIT")
        except BAD_CONTENT as exc:
            # This body's content, not the warehouse: skip it with why, and go on with the others.
            con.execute("ROLLBACK")
            reason = str(exc).split("\n")[0]
            _skip(con, file, reason)
            result.errors[file] = reason
            done.add(file)
            continue
        except BaseException:
            con.execute("ROLLBACK")
            raise
        done.update(files)
        result.applied += len(files)
        result.entered += entered
        result.left += left
        result.outcomes[f"{action}: {outcome}"] = result.outcomes.get(f"{action}: {outcome}", 0) + 1
    result.waiting_pages = con.execute(
        "SELECT count(*) FROM mixpanel.cohort_webhook_bodies WHERE applied_at IS NULL").fetchone()[0]
    return result
