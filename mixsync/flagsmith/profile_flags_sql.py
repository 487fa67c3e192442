"""Flag states → Mixpanel profiles: the landed flags, the outbox, the ledger of what Mixpanel was sent, the change SQL.

New DDL here is portable to DuckLake: no sequences, no PRIMARY KEY; uniqueness by construction (one writer,
ids derived from the sync id and the profile).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb

from mixsync.flagsmith.sql import EDGE_WHITESPACE, identifier_path  # (registers sync.flagsmith_traits too)
from mixsync.warehouse.outbox import enqueue, outbox_ddl
from mixsync.warehouse.schema import register_ddl
from mixsync.warehouse.sql import path as sql_path

OUTBOX = "sync.mixpanel_profile_flags_outbox"
LEDGER = "sync.mixpanel_profile_flags"
# One $set carries at most this many properties: Mixpanel's per-event cap is < 255 and no profile-specific
# figure is published, so an identity with more flags gets several updates.
PROPERTIES_PER_UPDATE = 200

DDL = """
-- The flags Flagsmith last answered for each managed identity (replaced per identity at each successful read).
CREATE TABLE IF NOT EXISTS flagsmith.identity_flags (
    identity VARCHAR NOT NULL,
    feature VARCHAR NOT NULL,
    enabled BOOLEAN NOT NULL,
    value JSON,                       -- the remote-config value as Flagsmith typed it; NULL when it has none
    read_at TIMESTAMPTZ NOT NULL
);
""" + outbox_ddl(OUTBOX, ",\n    folded_at TIMESTAMPTZ            -- when a sent item was applied to the ledger") + f"""
-- One outbox item is one profile update ($set or $unset); these are its properties, one row each.
CREATE TABLE IF NOT EXISTS {OUTBOX}_items (
    outbox_id VARCHAR NOT NULL,
    sync_id BIGINT NOT NULL,
    distinct_id VARCHAR NOT NULL,
    property VARCHAR NOT NULL,
    feature VARCHAR NOT NULL,
    value JSON                        -- NULL: $unset
);
-- The ledger: what Mixpanel was last sent for the properties mixsync owns on each profile (NULL: unset by mixsync).
CREATE TABLE IF NOT EXISTS {LEDGER} (
    distinct_id VARCHAR NOT NULL,
    property VARCHAR NOT NULL,
    feature VARCHAR NOT NULL,
    value JSON,
    sync_id BIGINT NOT NULL,
    confirmed_at TIMESTAMPTZ NOT NULL,
    unconfirmed BOOLEAN               -- true: in flight when a push was killed (possibly applied, not acknowledged):
                                      -- the next plan sends what is wanted now ($set again, or $unset)
);
-- Warehouses created before the column existed get it (a no-op once it is there).
ALTER TABLE {LEDGER} ADD COLUMN IF NOT EXISTS unconfirmed BOOLEAN;
CREATE TABLE IF NOT EXISTS sync.mixpanel_profile_flags_syncs (
    sync_id BIGINT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    identities BIGINT,
    identities_read BIGINT,
    read_errors BIGINT,
    profiles BIGINT,
    properties_set BIGINT,
    properties_unset BIGINT
);
"""


register_ddl("flagsmith.profile_flags", DDL)


@dataclass
class Plan:
    sync_id: int
    profiles: int = 0
    properties_set: int = 0
    properties_unset: int = 0
    updates: int = 0
    superseded: int = 0
    held_back_rejected: int = 0
    # Properties in flight when an earlier push was killed (unconfirmed in the ledger) that this plan sends again
    # with the same value, or corrects (another value, or $unset: no longer wanted).
    resent_in_flight: int = 0
    corrected_in_flight: int = 0


@contextmanager
def _transaction(con: duckdb.DuckDBPyConnection, own: bool) -> Iterator[None]:
    """A transaction of its own when `own`; else the statements run in the caller's (a dry run rolls it back)."""
    if not own:
        yield
        return
    con.execute("BEGIN TRANSACTION")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def managed_identities(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Every identity in the cohort-traits ledger: the members (present and past) of the synced cohorts."""
    return [r[0] for r in con.execute(
        "SELECT DISTINCT identifier FROM sync.flagsmith_traits ORDER BY identifier").fetchall()]


def _profiles_sql(identities: list[str], identifier_property: str | None) -> tuple[str, dict]:
    """A query of (identity, distinct_id): the Mixpanel profiles of each Flagsmith identity in `identities`.

    A Flagsmith identity is not a profile id: flagsmith_cohort_traits named it after the member's
    FLAGSMITH_IDENTIFIER_PROPERTY (an e-mail address, say), or after its distinct_id, trimmed as Flagsmith trims
    identifiers. Writing to `$distinct_id = identity` would make new profiles (or update another person's), so each
    identity goes back to the distinct_ids of the cohort members it was derived from, exactly as stored in
    mixpanel.cohort_members (with the membership history for past members when the identity is the distinct_id
    itself: their properties are not kept once they left). Several members sharing one identity get it each."""
    params: dict = {"edge_whitespace": EDGE_WHITESPACE, "identities": identities}
    if identifier_property is None:
        members = """SELECT distinct_id, distinct_id AS raw_identifier FROM mixpanel.cohort_members
                     UNION ALL
                     SELECT distinct_id, distinct_id AS raw_identifier FROM mixpanel.cohort_membership_history"""
    else:
        # A profile property: text stays text, a number (a user id) becomes its text, as the traits flow reads it.
        members = """SELECT distinct_id, json_extract_string(properties, $identifier_path) AS raw_identifier
                     FROM mixpanel.cohort_members"""
        params["identifier_path"] = identifier_path(identifier_property)
    return f"""SELECT DISTINCT identity, distinct_id
               FROM (SELECT regexp_replace(raw_identifier, $edge_whitespace, '', 'g') AS identity, distinct_id
                     FROM ({members}))
               WHERE identity IN (SELECT unnest($identities::VARCHAR[]))""", params


def unmapped_reason(identifier_property: str | None) -> str:
    return f"no cohort member in the warehouse has this identity as its {identifier_property or 'distinct_id'}"


def identities_to_read(con: duckdb.DuckDBPyConnection, identities: list[str], identifier_property: str | None
                       ) -> tuple[list[str], dict[str, int]]:
    """The identities that have a Mixpanel profile to write, and the count of the others by reason (they are
    neither read nor written)."""
    query, params = _profiles_sql(identities, identifier_property)
    mapped = {r[0] for r in con.execute(f"SELECT DISTINCT identity FROM ({query})", params).fetchall()}
    unmapped = len(identities) - len(mapped)
    return [i for i in identities if i in mapped], {unmapped_reason(identifier_property): unmapped} if unmapped else {}


def begin_sync(con: duckdb.DuckDBPyConnection, identities: int) -> int:
    # One writer at a time (the warehouse lock), so the next id is simply one more than the last.
    sync_id = con.execute("SELECT coalesce(max(sync_id), 0) + 1 FROM sync.mixpanel_profile_flags_syncs").fetchone()[0]
    con.execute("INSERT INTO sync.mixpanel_profile_flags_syncs (sync_id, started_at, identities) VALUES (?, now(), ?)",
                [sync_id, identities])
    return sync_id


def land_flags(con: duckdb.DuckDBPyConnection, answers: Path, managed: list[str], transaction: bool = True) -> int:
    """Replace flagsmith.identity_flags for every identity read this run (one `{"identity", "read_at", "answer"}`
    line each, the answer as Flagsmith sent it) and drop identities no longer managed. Returns identities read.

    Leaves `pf_read` (identity, read_at): the identities whose flags are known now; only they get a plan."""
    source = f"""read_json({sql_path(answers)}, format = 'newline_delimited',
                           columns = {{'identity': 'VARCHAR', 'read_at': 'TIMESTAMPTZ', 'answer': 'JSON'}})"""
    con.execute(f"CREATE OR REPLACE TEMP TABLE pf_read AS SELECT identity, read_at, answer FROM {source}")
    con.execute("""CREATE OR REPLACE TEMP TABLE pf_flags AS
        SELECT identity, json_extract_string(flag, '$.feature.name') AS feature,
               json_extract(flag, '$.enabled')::BOOLEAN AS enabled,
               -- a JSON null (or no value at all) is "no remote-config value"
               CASE WHEN coalesce(json_type(flag, '$.feature_state_value'), 'NULL') <> 'NULL'
                    THEN json_extract(flag, '$.feature_state_value') END AS value, read_at
        FROM (SELECT identity, read_at, unnest(CAST(answer->'$.flags' AS JSON[])) AS flag FROM pf_read)""")
    with _transaction(con, transaction):
        con.execute("""DELETE FROM flagsmith.identity_flags
                       WHERE identity IN (SELECT identity FROM pf_read)
                          OR identity NOT IN (SELECT unnest($managed::VARCHAR[]))""", {"managed": managed})
        con.execute("INSERT INTO flagsmith.identity_flags SELECT identity, feature, enabled, value, read_at FROM pf_flags")
    con.execute("DROP TABLE pf_flags")
    return con.execute("SELECT count(*) FROM pf_read").fetchone()[0]


# Outbox items the ledger takes: acknowledged ones, and pending ones that went out in a push that was killed before
# their answer (a `sent_at`: the outbox recorded them in flight). Those may be on the profiles, so they are folded
# as `unconfirmed`: were they left out, a property no longer wanted would never be $unset (no ledger row).
FOLDABLE = "(o.status = 'sent' OR (o.status = 'pending' AND o.sent_at IS NOT NULL)) AND o.folded_at IS NULL"


def fold_acknowledged(con: duckdb.DuckDBPyConnection, transaction: bool = True) -> int:
    """Apply every acknowledged (or possibly applied: in flight at a kill), not yet applied outbox item to the
    ledger, in one transaction (the caller's when `transaction` is False: a dry run rolls it back)."""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE pf_fold AS
        SELECT i.distinct_id, i.property, i.feature, i.value, i.sync_id, o.sent_at, o.status <> 'sent' AS unconfirmed
        FROM {OUTBOX} o JOIN {OUTBOX}_items i ON i.outbox_id = o.id
        WHERE {FOLDABLE}
        QUALIFY row_number() OVER (PARTITION BY i.distinct_id, i.property ORDER BY i.sync_id DESC, o.sent_at DESC) = 1""")
    folded = con.execute("SELECT count(*) FROM pf_fold").fetchone()[0]
    with _transaction(con, transaction):
        if folded:
            con.execute(f"""DELETE FROM {LEDGER} l USING pf_fold f
                            WHERE l.distinct_id = f.distinct_id AND l.property = f.property""")
            con.execute(f"""INSERT INTO {LEDGER} (distinct_id, property, feature, value, sync_id, confirmed_at, unconfirmed)
                            SELECT distinct_id, property, feature, value, sync_id, sent_at, unconfirmed FROM pf_fold""")
        con.execute(f"""UPDATE {OUTBOX} AS o SET folded_at = now()
                        WHERE {FOLDABLE} OR (o.status = 'rejected' AND o.folded_at IS NULL)""")
    con.execute("DROP TABLE pf_fold")
    return folded


def plan_changes(con: duckdb.DuckDBPyConnection, sync_id: int, prefix: str, token: str,
                 identifier_property: str | None, transaction: bool = True) -> Plan:
    """Enqueue the profile updates that bring Mixpanel from the ledger to the flags just read (`pf_read`), on the
    profiles of the cohort members each identity stands for (`_profiles_sql`).

    A property's value: the remote-config value exactly as typed (0, "" and false stay themselves) when the flag
    is enabled and has one, true when it is enabled without one, false when it is disabled. A property the ledger
    holds for a flag no longer in the identity's answer (the feature was deleted) is $unset. Pending items of an
    earlier, interrupted sync are superseded: this plan already holds whatever of them still matters (those in
    flight at a kill were folded into the ledger as `unconfirmed`, and an unconfirmed property always gets the
    update wanted now: the same `$set` again, or an `$unset`).
    """
    plan = Plan(sync_id)
    query, params = _profiles_sql([r[0] for r in con.execute("SELECT identity FROM pf_read").fetchall()],
                                  identifier_property)
    con.execute(f"CREATE OR REPLACE TEMP TABLE pf_profiles AS {query}", params)
    # A profile reached from two identities (its property changed between cohort loads) takes one of them, always
    # the same: never two values for one property in one plan.
    con.execute("""CREATE OR REPLACE TEMP TABLE pf_desired AS
        SELECT p.distinct_id, $prefix || f.feature AS property, f.feature,
               CASE WHEN NOT f.enabled THEN 'false'::JSON WHEN f.value IS NULL THEN 'true'::JSON ELSE f.value END
                   AS value
        FROM flagsmith.identity_flags f JOIN pf_profiles p USING (identity)
        QUALIFY row_number() OVER (PARTITION BY p.distinct_id, f.feature ORDER BY f.identity) = 1""",
                {"prefix": prefix})
    con.execute(f"""CREATE OR REPLACE TEMP TABLE pf_changes AS
        SELECT d.distinct_id, d.property, d.feature, d.value
        FROM pf_desired d LEFT JOIN {LEDGER} l USING (distinct_id, property)
        WHERE l.value IS NULL OR l.value::VARCHAR <> d.value::VARCHAR OR l.unconfirmed
        UNION ALL
        SELECT l.distinct_id, l.property, l.feature, NULL::JSON
        FROM {LEDGER} l ANTI JOIN pf_desired d USING (distinct_id, property)
        WHERE (l.value IS NOT NULL OR l.unconfirmed) AND l.distinct_id IN (SELECT distinct_id FROM pf_profiles)""")
    # An update Mixpanel refused is not sent again every hour: only when the wanted value changes.
    plan.held_back_rejected = con.execute(f"""DELETE FROM pf_changes c USING (
            SELECT DISTINCT i.distinct_id, i.property, i.value::VARCHAR AS value FROM {OUTBOX} o
            JOIN {OUTBOX}_items i ON i.outbox_id = o.id
            LEFT JOIN {LEDGER} l USING (distinct_id, property)
            WHERE o.status = 'rejected' AND i.sync_id > coalesce(l.sync_id, 0)) r
        WHERE c.distinct_id = r.distinct_id AND c.property = r.property
          AND c.value::VARCHAR IS NOT DISTINCT FROM r.value""").fetchone()[0]
    plan.resent_in_flight, plan.corrected_in_flight = con.execute(f"""
        SELECT count(*) FILTER (c.value::VARCHAR IS NOT DISTINCT FROM l.value::VARCHAR),
               count(*) FILTER (c.value::VARCHAR IS DISTINCT FROM l.value::VARCHAR)
        FROM pf_changes c JOIN {LEDGER} l USING (distinct_id, property) WHERE l.unconfirmed""").fetchone()
    con.execute(f"""CREATE OR REPLACE TEMP TABLE pf_items AS
        SELECT md5(concat_ws('|', $sync, distinct_id, op, part)) AS outbox_id, *
        FROM (SELECT *, CASE WHEN value IS NULL THEN '$unset' ELSE '$set' END AS op,
                     (row_number() OVER (PARTITION BY distinct_id, value IS NULL ORDER BY property) - 1)
                        // {PROPERTIES_PER_UPDATE} AS part
              FROM pf_changes)""", {"sync": sync_id})
    with _transaction(con, transaction):
        plan.superseded = con.execute(f"UPDATE {OUTBOX} SET status = 'superseded' WHERE status = 'pending'").fetchone()[0]
        plan.updates = enqueue(con, OUTBOX, f"sync-{sync_id}", """
            SELECT outbox_id AS id,
                   CASE WHEN op = '$set'
                        THEN json_object('$token', $token, '$distinct_id', distinct_id,
                                         '$set', json_group_object(property, value))
                        ELSE json_object('$token', $token, '$distinct_id', distinct_id,
                                         '$unset', to_json(list(property ORDER BY property)))
                   END::VARCHAR AS payload
            FROM pf_items GROUP BY outbox_id, distinct_id, op""", {"token": token})
        con.execute(f"""INSERT INTO {OUTBOX}_items
                        SELECT outbox_id, $sync, distinct_id, property, feature, value FROM pf_items""",
                    {"sync": sync_id})
    plan.profiles, plan.properties_set, plan.properties_unset = con.execute("""
        SELECT count(DISTINCT distinct_id), count(*) FILTER (value IS NOT NULL), count(*) FILTER (value IS NULL)
        FROM pf_changes""").fetchone()
    con.execute("DROP TABLE pf_profiles; DROP TABLE pf_desired; DROP TABLE pf_changes; DROP TABLE pf_items")
    return plan


def finish_sync(con: duckdb.DuckDBPyConnection, plan: Plan, identities_read: int, read_errors: int) -> None:
    con.execute("""UPDATE sync.mixpanel_profile_flags_syncs SET finished_at = now(), identities_read = ?,
                   read_errors = ?, profiles = ?, properties_set = ?, properties_unset = ? WHERE sync_id = ?""",
                [identities_read, read_errors, plan.profiles, plan.properties_set, plan.properties_unset, plan.sync_id])


def rejected_by_reason(con: duckdb.DuckDBPyConnection, sync_id: int) -> dict[str, int]:
    return dict(con.execute(f"""SELECT left(error, 120), count(*) FROM {OUTBOX}
                                WHERE status = 'rejected' AND scope = ? GROUP BY ALL""",
                            [f"sync-{sync_id}"]).fetchall())


def ledger_summary(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    row = con.execute(f"""SELECT count(DISTINCT distinct_id) FILTER (value IS NOT NULL),
                                 count(*) FILTER (value IS NOT NULL) FROM {LEDGER}""").fetchone()
    return {"ledger_profiles": row[0], "ledger_properties": row[1]}
