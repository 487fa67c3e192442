"""Mixpanel cohorts: the cohorts list, current membership, snapshots and the history of who entered and left."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from mixsync.warehouse.schema import register_ddl
from mixsync.warehouse.transactions import next_id

DDL = """
CREATE TABLE IF NOT EXISTS mixpanel.cohorts (
    id BIGINT NOT NULL,
    name VARCHAR NOT NULL,
    description VARCHAR,
    count BIGINT,                  -- Mixpanel's own count when the list was read
    visibility VARCHAR,            -- 'visible' | 'hidden' (Mixpanel's is_visible 1 | 0)
    created TIMESTAMP,             -- naive, as Mixpanel gives it (project time for legacy projects)
    project_id BIGINT,
    loaded_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS mixpanel.cohorts_rejected (
    reason VARCHAR NOT NULL,
    raw VARCHAR,
    loaded_at TIMESTAMPTZ NOT NULL
);
-- Current membership of every synced cohort: one row per (cohort_id, distinct_id).
CREATE TABLE IF NOT EXISTS mixpanel.cohort_members (
    cohort_id BIGINT NOT NULL,
    distinct_id VARCHAR NOT NULL,  -- $distinct_id, always a string (engage may type it as a number)
    properties JSON,               -- only the profile properties asked for (MIXPANEL_COHORT_MEMBER_PROPERTIES)
    entered_at TIMESTAMPTZ NOT NULL,
    snapshot_id BIGINT NOT NULL    -- the snapshot that first saw this person in the cohort
);
CREATE TABLE IF NOT EXISTS mixpanel.cohort_membership_history (
    cohort_id BIGINT NOT NULL,
    distinct_id VARCHAR NOT NULL,
    change VARCHAR NOT NULL,       -- 'entered' | 'left'
    observed_at TIMESTAMPTZ NOT NULL,
    snapshot_id BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS mixpanel.cohort_snapshots (
    snapshot_id BIGINT NOT NULL,
    cohort_id BIGINT NOT NULL,
    cohort_name VARCHAR,
    taken_at TIMESTAMPTZ NOT NULL,
    kind VARCHAR NOT NULL,         -- 'members' (a full read) | 'removed' (no longer selected or deleted in Mixpanel)
    members BIGINT NOT NULL,
    entered BIGINT NOT NULL,
    "left" BIGINT NOT NULL,
    total_reported BIGINT,         -- engage's `total` on the first page
    pages INTEGER,
    rejected BIGINT NOT NULL,
    duplicates_dropped BIGINT NOT NULL,
    properties VARCHAR[]           -- the profile properties requested with the members
);
-- The cohorts whose membership is current in mixpanel.cohort_members, with the snapshot that made it so.
CREATE TABLE IF NOT EXISTS mixpanel.cohort_member_loads (
    cohort_id BIGINT NOT NULL,
    cohort_name VARCHAR NOT NULL,
    snapshot_id BIGINT NOT NULL,
    members BIGINT NOT NULL,
    properties VARCHAR[],
    loaded_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS mixpanel.cohort_members_rejected (
    cohort_id BIGINT,
    snapshot_id BIGINT,
    reason VARCHAR NOT NULL,
    raw VARCHAR,
    loaded_at TIMESTAMPTZ NOT NULL
);
"""


class UnknownCohorts(ValueError):
    """The allowlist names cohorts that the project does not have."""


@dataclass
class CohortsLoad:
    cohorts: int = 0
    rejected: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class MembersLoad:
    cohort_id: int
    snapshot_id: int = 0
    members: int = 0
    entered: int = 0
    left: int = 0
    rejected: int = 0
    duplicates_dropped: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)


def replace_cohorts(con: duckdb.DuckDBPyConnection, cohorts_json: bytes) -> CohortsLoad:
    """Replace mixpanel.cohorts with the cohorts list (a JSON array as Mixpanel sent it); bad entries go to rejects."""
    loaded_at = dt.datetime.now(dt.UTC)
    con.execute("""CREATE OR REPLACE TEMP TABLE cohorts_stage AS
        SELECT c AS raw,
               TRY_CAST(c->>'id' AS BIGINT) AS id,
               c->>'name' AS name,
               c->>'description' AS description,
               TRY_CAST(c->>'count' AS BIGINT) AS count,
               CASE WHEN c->>'is_visible' IN ('1', 'true') THEN 'visible'
                    WHEN c->>'is_visible' IN ('0', 'false') THEN 'hidden' END AS visibility,
               TRY_CAST(c->>'created' AS TIMESTAMP) AS created,
               TRY_CAST(c->>'project_id' AS BIGINT) AS project_id
        FROM (SELECT unnest(from_json(?::JSON, '["JSON"]')) AS c)""", [cohorts_json.decode("utf-8")])
    reason = """CASE WHEN json_type(raw) <> 'OBJECT' THEN 'not an object'
                     WHEN id IS NULL THEN 'missing or non-numeric id'
                     WHEN name IS NULL OR trim(name) = '' THEN 'missing name'
                     WHEN count(*) OVER (PARTITION BY id) > 1 THEN 'duplicate id' END"""
    con.execute(f"CREATE OR REPLACE TEMP TABLE cohorts_checked AS SELECT *, {reason} AS reason FROM cohorts_stage")
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("DELETE FROM mixpanel.cohorts")
        con.execute("""INSERT INTO mixpanel.cohorts SELECT id, name, description, count, visibility, created, project_id, ?
                       FROM cohorts_checked WHERE reason IS NULL""", [loaded_at])
        con.execute("""INSERT INTO mixpanel.cohorts_rejected SELECT reason, raw::VARCHAR, ?
                       FROM cohorts_checked WHERE reason IS NOT NULL""", [loaded_at])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    result = CohortsLoad()
    result.cohorts = con.execute("SELECT count(*) FROM mixpanel.cohorts").fetchone()[0]
    result.rejects_by_reason = dict(con.execute(
        "SELECT reason, count(*) FROM cohorts_checked WHERE reason IS NOT NULL GROUP BY reason").fetchall())
    result.rejected = sum(result.rejects_by_reason.values())
    con.execute("DROP TABLE cohorts_stage; DROP TABLE cohorts_checked")
    return result


def select_cohorts(con: duckdb.DuckDBPyConnection, selection: tuple[str, ...]) -> list[tuple[int, str]]:
    """(id, name) of the cohorts to sync: all, or those whose id or exact name is in `selection`."""
    if not selection:
        return con.execute("SELECT id, name FROM mixpanel.cohorts ORDER BY id").fetchall()
    chosen = con.execute("""SELECT DISTINCT id, name FROM mixpanel.cohorts
                            WHERE CAST(id AS VARCHAR) IN (SELECT unnest($sel)) OR name IN (SELECT unnest($sel))
                            ORDER BY id""", {"sel": list(selection)}).fetchall()
    matched = {str(i) for i, _ in chosen} | {n for _, n in chosen}
    unknown = [s for s in selection if s not in matched]
    if unknown:
        known = con.execute("SELECT string_agg(id || ' ' || name, ', ' ORDER BY id) FROM mixpanel.cohorts").fetchone()[0]
        raise UnknownCohorts(f"MIXPANEL_COHORTS names cohorts this project does not have: {', '.join(unknown)} "
                             f"(cohorts are matched by id or exact name; the project has: {known or 'none'})")
    return chosen


def next_snapshot_id(con: duckdb.DuckDBPyConnection) -> int:
    # Snapshot ids by construction (a lake has no sequences): every snapshot that was ever committed has its
    # row in cohort_snapshots, and ids are taken under the writer lock.
    return next_id(con, "mixpanel.cohort_snapshots.snapshot_id")


def load_cohort_members(con: duckdb.DuckDBPyConnection, cohort_id: int, cohort_name: str, pages: list[Path],
                        properties: list[str], total_reported: int | None) -> MembersLoad:
    """Make `pages` (engage bodies on disk) the cohort's current membership, recording who entered and left."""
    result = MembersLoad(cohort_id)
    taken_at = dt.datetime.now(dt.UTC)
    if pages:
        # A page is one JSON object; read_text + a JSON path avoids read_json's per-file object buffers.
        source = "SELECT unnest(json_extract(content, '$.results[*]')) AS r FROM read_text($pages)"
    else:
        source = "SELECT NULL::JSON AS r WHERE false"
    # One transaction from the first read: on a lake every statement outside one is a transaction of its own,
    # with its own round of catalog queries (a cohort's statements took ~260 ms on a lake that way, ~170 ms in
    # one). The temp tables are created and dropped inside it, so a failure rolls them back with the rest.
    con.execute("BEGIN TRANSACTION")
    try:
        snapshot_id = result.snapshot_id = next_snapshot_id(con)
        # $distinct_id comes as a string or, now and then, a number: keep its text either way.
        con.execute(f"""CREATE OR REPLACE TEMP TABLE members_stage AS
            SELECT r AS raw,
                   CASE WHEN json_type(r->'$."$distinct_id"') IN ('VARCHAR', 'BIGINT', 'UBIGINT', 'DOUBLE')
                        THEN r->>'$."$distinct_id"' END AS distinct_id,
                   coalesce(r->'$."$properties"', '{{}}'::JSON) AS properties
            FROM ({source})""", {"pages": [str(p) for p in pages]} if pages else None)
        con.execute("""CREATE OR REPLACE TEMP TABLE members_checked AS
            SELECT *, CASE WHEN distinct_id IS NULL OR distinct_id = '' THEN 'missing $distinct_id'
                           WHEN json_type(properties) <> 'OBJECT' THEN '$properties is not an object' END AS reason,
                   row_number() OVER (PARTITION BY distinct_id) AS copy
            FROM members_stage""")
        con.execute("""CREATE OR REPLACE TEMP TABLE members_new AS
            SELECT distinct_id, properties FROM members_checked WHERE reason IS NULL AND copy = 1""")
        con.execute("""CREATE OR REPLACE TEMP TABLE members_entered AS
            SELECT n.distinct_id, n.properties FROM members_new n
            ANTI JOIN (SELECT distinct_id FROM mixpanel.cohort_members WHERE cohort_id = $c) m USING (distinct_id)""",
                    {"c": cohort_id})
        con.execute("""CREATE OR REPLACE TEMP TABLE members_left AS
            SELECT m.distinct_id FROM (SELECT distinct_id FROM mixpanel.cohort_members WHERE cohort_id = $c) m
            ANTI JOIN members_new n USING (distinct_id)""", {"c": cohort_id})
        result.members = con.execute("SELECT count(*) FROM members_new").fetchone()[0]
        result.entered = con.execute("SELECT count(*) FROM members_entered").fetchone()[0]
        result.left = con.execute("SELECT count(*) FROM members_left").fetchone()[0]
        result.duplicates_dropped = con.execute(
            "SELECT count(*) FROM members_checked WHERE reason IS NULL AND copy > 1").fetchone()[0]
        result.rejects_by_reason = dict(con.execute(
            "SELECT reason, count(*) FROM members_checked WHERE reason IS NOT NULL GROUP BY reason").fetchall())
        result.rejected = sum(result.rejects_by_reason.values())
        params = {"c": cohort_id, "s": snapshot_id, "t": taken_at}
        con.execute("""INSERT INTO mixpanel.cohort_membership_history
                       SELECT $c, distinct_id, 'entered', $t, $s FROM members_entered
                       UNION ALL SELECT $c, distinct_id, 'left', $t, $s FROM members_left""", params)
        if result.left:
            con.execute("""DELETE FROM mixpanel.cohort_members m USING members_left l
                           WHERE m.cohort_id = $c AND m.distinct_id = l.distinct_id""", {"c": cohort_id})
        # Profile properties (an email, a user id) may change while the person stays in the cohort.
        con.execute("""UPDATE mixpanel.cohort_members m SET properties = n.properties FROM members_new n
                       WHERE m.cohort_id = $c AND m.distinct_id = n.distinct_id
                         AND m.properties::VARCHAR IS DISTINCT FROM n.properties::VARCHAR""", {"c": cohort_id})
        con.execute("""INSERT INTO mixpanel.cohort_members
                       SELECT $c, distinct_id, properties, $t, $s FROM members_entered""", params)
        con.execute("""INSERT INTO mixpanel.cohort_members_rejected
                       SELECT $c, $s, reason, raw::VARCHAR, $t FROM members_checked WHERE reason IS NOT NULL""", params)
        con.execute("""INSERT INTO mixpanel.cohort_snapshots VALUES
                       ($s, $c, $name, $t, 'members', $members, $entered, $left, $total, $pages, $rejected, $dups, $props)""",
                    {**params, "name": cohort_name, "members": result.members, "entered": result.entered,
                     "left": result.left, "total": total_reported, "pages": len(pages), "rejected": result.rejected,
                     "dups": result.duplicates_dropped, "props": list(properties)})
        con.execute("DELETE FROM mixpanel.cohort_member_loads WHERE cohort_id = $c", {"c": cohort_id})
        con.execute("INSERT INTO mixpanel.cohort_member_loads VALUES ($c, $name, $s, $members, $props, $t)",
                    {**params, "name": cohort_name, "members": result.members, "props": list(properties)})
        con.execute("""DROP TABLE members_stage; DROP TABLE members_checked; DROP TABLE members_new;
                       DROP TABLE members_entered; DROP TABLE members_left""")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return result


def remove_unselected_cohorts(con: duckdb.DuckDBPyConnection, keep_ids: list[int]) -> list[MembersLoad]:
    """Cohorts no longer selected (or deleted in Mixpanel) stop being current: their members are recorded as left."""
    gone = con.execute("""SELECT cohort_id, cohort_name FROM mixpanel.cohort_member_loads
                          WHERE cohort_id NOT IN (SELECT unnest($keep::BIGINT[])) ORDER BY cohort_id""",
                       {"keep": keep_ids}).fetchall()
    results = []
    for cohort_id, name in gone:
        taken_at = dt.datetime.now(dt.UTC)
        con.execute("BEGIN TRANSACTION")
        try:
            snapshot_id = next_snapshot_id(con)
            params = {"c": cohort_id, "s": snapshot_id, "t": taken_at}
            left = con.execute("""INSERT INTO mixpanel.cohort_membership_history
                                  SELECT $c, distinct_id, 'left', $t, $s FROM mixpanel.cohort_members
                                  WHERE cohort_id = $c""", params).fetchone()[0]
            con.execute("DELETE FROM mixpanel.cohort_members WHERE cohort_id = $c", {"c": cohort_id})
            con.execute("DELETE FROM mixpanel.cohort_member_loads WHERE cohort_id = $c", {"c": cohort_id})
            con.execute("""INSERT INTO mixpanel.cohort_snapshots VALUES
                           ($s, $c, $name, $t, 'removed', 0, 0, $left, NULL, 0, 0, 0, NULL)""",
                        {**params, "name": name, "left": left})
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        results.append(MembersLoad(cohort_id, snapshot_id, left=left))
    return results


register_ddl("mixpanel.cohorts", DDL)

# For people (`analytics`): who is in which cohort now, by the cohort's name.
ANALYTICS_DDL = """
CREATE OR REPLACE VIEW analytics.cohort_membership AS
    SELECT m.cohort_id, c.name AS cohort_name, m.distinct_id, m.entered_at, m.properties
    FROM mixpanel.cohort_members m LEFT JOIN mixpanel.cohorts c ON c.id = m.cohort_id;
"""
register_ddl("analytics.cohort_membership", ANALYTICS_DDL)
