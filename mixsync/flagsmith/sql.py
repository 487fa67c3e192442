"""Flagsmith cohort traits: the outbox, the ledger of traits mixsync owns per identity, and the change SQL."""

from __future__ import annotations

from dataclasses import dataclass, field

import duckdb
import orjson

import mixsync.mixpanel.cohort_sql  # noqa: F401  (plan reads mixpanel.cohort_members; importing it registers those tables)
from mixsync.warehouse.outbox import enqueue, outbox_ddl
from mixsync.warehouse.schema import register_ddl
from mixsync.warehouse.sql import literal
from mixsync.warehouse.transactions import next_id

OUTBOX = "sync.flagsmith_outbox"
MAX_IDENTIFIER = 2000  # Flagsmith answers 500 above this

DDL = outbox_ddl(OUTBOX, ",\n    folded_at TIMESTAMPTZ            -- when a sent item was applied to the ledger") + """
-- One outbox item is one identity's trait changes; these are its traits, one row each (NULL value = delete).
CREATE TABLE IF NOT EXISTS sync.flagsmith_outbox_traits (
    outbox_id VARCHAR NOT NULL,
    sync_id BIGINT NOT NULL,
    identifier VARCHAR NOT NULL,
    trait_key VARCHAR NOT NULL,
    cohort_id BIGINT,
    trait_value BOOLEAN
);
-- The ledger: what Flagsmith was last confirmed to hold for the traits mixsync set. A NULL value is a trait
-- mixsync deleted (no longer owned). Traits not in here are never touched.
CREATE TABLE IF NOT EXISTS sync.flagsmith_traits (
    identifier VARCHAR NOT NULL,
    trait_key VARCHAR NOT NULL,
    cohort_id BIGINT,
    trait_value BOOLEAN,
    sync_id BIGINT NOT NULL,
    confirmed_at TIMESTAMPTZ NOT NULL,
    drift JSON,                      -- a non-boolean value a read-back found in its place: re-written by the next plan
    unconfirmed BOOLEAN              -- true: the value was in flight when a push was killed (possibly applied, not
                                     -- acknowledged): the next plan writes what is wanted now, whatever it is
);
CREATE TABLE IF NOT EXISTS sync.flagsmith_syncs (
    sync_id BIGINT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    bulk_mode VARCHAR,
    exit_mode VARCHAR,
    identities BIGINT,
    set_true BIGINT,
    set_false BIGINT,
    deleted BIGINT,
    skipped BIGINT,
    verified BIGINT,
    mismatches BIGINT,
    requeued BIGINT                  -- trait writes re-queued because the read-back found Flagsmith holding otherwise
);
-- Warehouses created before these columns existed get them (a no-op once they are there).
ALTER TABLE sync.flagsmith_traits ADD COLUMN IF NOT EXISTS drift JSON;
ALTER TABLE sync.flagsmith_traits ADD COLUMN IF NOT EXISTS unconfirmed BOOLEAN;
ALTER TABLE sync.flagsmith_syncs ADD COLUMN IF NOT EXISTS requeued BIGINT;
-- The write route detected for each Flagsmith API URL (FLAGSMITH_BULK_MODE=auto), so that later runs do not probe
-- again; forgotten when that route answers 404/405 (the server changed), so the next run that sends detects anew.
CREATE TABLE IF NOT EXISTS sync.flagsmith_routes (
    api_url VARCHAR NOT NULL,
    bulk_mode VARCHAR NOT NULL,
    detected_at TIMESTAMPTZ NOT NULL
);
-- Members that the latest sync could not send (no identifier, identifier too long), replaced each sync.
CREATE TABLE IF NOT EXISTS sync.flagsmith_skipped (
    sync_id BIGINT NOT NULL,
    cohort_id BIGINT,
    distinct_id VARCHAR,
    identifier VARCHAR,
    reason VARCHAR NOT NULL
);
"""


@dataclass
class Plan:
    sync_id: int
    round: int = 0
    identities: int = 0
    set_true: int = 0
    set_false: int = 0
    deleted: int = 0
    superseded: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    held_back_rejected: int = 0
    # Trait writes in flight when an earlier push was killed (unconfirmed in the ledger) that this plan sends again
    # with the same value, or corrects (false, deleted: no longer wanted).
    resent_in_flight: int = 0
    corrected_in_flight: int = 0

    @property
    def traits(self) -> int:
        return self.set_true + self.set_false + self.deleted


_WHITESPACE = r"[\s\x{0b}\x{1c}-\x{1f}\x{85}\pZ]"
# Whitespace at either end of an identifier, which Flagsmith trims (a regexp_replace pattern).
EDGE_WHITESPACE = f"^{_WHITESPACE}+|{_WHITESPACE}+$"


def begin_sync(con: duckdb.DuckDBPyConnection, bulk_mode: str, exit_mode: str) -> int:
    # Ids by construction (a lake has no sequences); begin_sync runs under the writer lock.
    sync_id = next_id(con, "sync.flagsmith_syncs.sync_id", "sync.flagsmith_outbox_traits.sync_id",
                      "sync.flagsmith_traits.sync_id")
    con.execute("INSERT INTO sync.flagsmith_syncs (sync_id, started_at, bulk_mode, exit_mode) VALUES (?, now(), ?, ?)",
                [sync_id, bulk_mode, exit_mode])
    return sync_id


def remembered_bulk_mode(con: duckdb.DuckDBPyConnection, api_url: str) -> str | None:
    row = con.execute("SELECT bulk_mode FROM sync.flagsmith_routes WHERE api_url = ? ORDER BY detected_at DESC LIMIT 1",
                      [api_url]).fetchone()
    return row[0] if row else None


def remember_bulk_mode(con: duckdb.DuckDBPyConnection, api_url: str, bulk_mode: str | None) -> None:
    """Keep `bulk_mode` as the route of `api_url` (None: forget it, so the next run that sends probes again)."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute("DELETE FROM sync.flagsmith_routes WHERE api_url = ?", [api_url])
        if bulk_mode is not None:
            con.execute("INSERT INTO sync.flagsmith_routes VALUES (?, ?, now())", [api_url, bulk_mode])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def finish_sync(con: duckdb.DuckDBPyConnection, sync_id: int, plan: Plan, verified: int, mismatches: int,
                bulk_mode: str | None, requeued: int) -> None:
    con.execute("""UPDATE sync.flagsmith_syncs SET finished_at = now(), identities = ?, set_true = ?, set_false = ?,
                   deleted = ?, skipped = ?, verified = ?, mismatches = ?, bulk_mode = ?, requeued = ?
                   WHERE sync_id = ?""",
                [plan.identities, plan.set_true, plan.set_false, plan.deleted, sum(plan.skipped_by_reason.values()),
                 verified, mismatches, bulk_mode, requeued, sync_id])


# Outbox items the ledger takes: acknowledged ones, and pending ones that went out in a push that was killed before
# their answer (a `sent_at`: the outbox recorded them in flight). Those may be at Flagsmith, so they are folded as
# `unconfirmed`: were they left out, a value no longer wanted would never be corrected (no ledger row, no exit).
FOLDABLE = "(o.status = 'sent' OR (o.status = 'pending' AND o.sent_at IS NOT NULL)) AND o.folded_at IS NULL"


def fold_acknowledged(con: duckdb.DuckDBPyConnection, transaction: bool = True) -> int:
    """Apply every acknowledged (or possibly applied: in flight at a kill), not yet applied outbox item to the
    ledger, in one transaction (the caller's when `transaction` is False: a dry run rolls it back)."""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE fold_items AS
        SELECT t.identifier, t.trait_key, t.cohort_id, t.trait_value, t.sync_id, o.sent_at, o.id,
               o.status <> 'sent' AS unconfirmed
        FROM {OUTBOX} o JOIN sync.flagsmith_outbox_traits t ON t.outbox_id = o.id
        WHERE {FOLDABLE}
        QUALIFY row_number() OVER (PARTITION BY t.identifier, t.trait_key ORDER BY t.sync_id DESC, o.sent_at DESC) = 1""")
    folded = con.execute("SELECT count(*) FROM fold_items").fetchone()[0]
    if not folded:
        con.execute("DROP TABLE fold_items")
        return 0
    if transaction:
        con.execute("BEGIN TRANSACTION")
    try:
        con.execute("""DELETE FROM sync.flagsmith_traits l USING fold_items f
                       WHERE l.identifier = f.identifier AND l.trait_key = f.trait_key""")
        con.execute("""INSERT INTO sync.flagsmith_traits (identifier, trait_key, cohort_id, trait_value, sync_id,
                                                        confirmed_at, unconfirmed)
                       SELECT identifier, trait_key, cohort_id, trait_value, sync_id, sent_at, unconfirmed
                       FROM fold_items""")
        con.execute(f"UPDATE {OUTBOX} AS o SET folded_at = now() WHERE {FOLDABLE}")
        if transaction:
            con.execute("COMMIT")
    except BaseException:
        if transaction:
            con.execute("ROLLBACK")
        raise
    con.execute("DROP TABLE fold_items")
    return folded


def _identifier_sql(identifier_property: str | None) -> str:
    if identifier_property is None:
        return "m.distinct_id"
    # A profile property: text stays text, a number (a user id) becomes its text.
    return "json_extract_string(m.properties, $identifier_path)"


def identifier_path(identifier_property: str) -> str:
    """The JSON path of a profile property in mixpanel.cohort_members.properties (bound as $identifier_path)."""
    return '$."' + identifier_property.replace('"', '\\"') + '"'


def plan_changes(con: duckdb.DuckDBPyConnection, sync_id: int, round_: int, keys: dict[int, str], exit_mode: str,
                 identifier_property: str | None, transaction: bool = True) -> Plan:
    """Enqueue, per identity, the trait changes between current cohort membership and the ledger.

    Members get `true` where the ledger does not hold true; owned traits of people who left become `false`
    (or are deleted with exit_mode='delete'); owned traits whose key is no longer a synced cohort's key
    (renamed or removed cohort) are deleted. Pending items of an earlier, interrupted sync are superseded:
    this plan already contains whatever of them still matters (those that were in flight at a kill were folded
    into the ledger as `unconfirmed`, and an unconfirmed trait always gets the write wanted now: `true` again, or
    its exit).
    """
    plan = Plan(sync_id, round_)
    if transaction:  # else the caller's (a dry run rolls it back)
        # From the first read: on a lake every statement outside a transaction is one of its own, with its own
        # round of catalog queries. The temp tables are made and dropped inside it.
        con.execute("BEGIN TRANSACTION")
    try:
        con.execute("CREATE OR REPLACE TEMP TABLE fs_keys (cohort_id BIGINT, trait_key VARCHAR)")
        if keys:
            con.execute("""INSERT INTO fs_keys SELECT unnest(from_json($keys, '[{"c": "BIGINT", "k": "VARCHAR"}]'),
                                                      recursive := true)""",
                        {"keys": orjson.dumps([{"c": c, "k": k} for c, k in keys.items()]).decode()})
        # Whitespace of any kind at either end (tabs, no-break and em spaces too, as Python's str.strip sees it):
        # an identifier of only whitespace is empty, and Flagsmith would answer 200 and store nothing.
        params: dict = {"edge_whitespace": EDGE_WHITESPACE}
        if identifier_property is not None:
            params["identifier_path"] = identifier_path(identifier_property)
        reason_missing = literal("empty distinct_id" if identifier_property is None
                                 else f"profile has no {identifier_property}")
        reason_blank = literal(f"{identifier_property or 'distinct_id'} is only whitespace")
        con.execute(f"""CREATE OR REPLACE TEMP TABLE fs_members AS
            SELECT cohort_id, distinct_id, trait_key, raw_identifier IS NULL OR raw_identifier = '' AS missing,
                   regexp_replace(raw_identifier, $edge_whitespace, '', 'g') AS identifier
            FROM (SELECT m.cohort_id, m.distinct_id, k.trait_key, {_identifier_sql(identifier_property)} AS raw_identifier
                  FROM mixpanel.cohort_members m JOIN fs_keys k USING (cohort_id))""", params)
        # Flagsmith trims identifiers, answers 200 and stores nothing for an empty one, and 500 above 2000 chars.
        con.execute(f"""CREATE OR REPLACE TEMP TABLE fs_skipped AS
            SELECT cohort_id, distinct_id, identifier,
                   CASE WHEN missing THEN {reason_missing}
                        WHEN identifier IS NULL OR identifier = '' THEN {reason_blank}
                        ELSE 'identifier longer than {MAX_IDENTIFIER} characters' END AS reason
            FROM fs_members WHERE identifier IS NULL OR identifier = '' OR length(identifier) > {MAX_IDENTIFIER}""")
        con.execute(f"""CREATE OR REPLACE TEMP TABLE fs_desired AS
            SELECT identifier, trait_key, any_value(cohort_id) AS cohort_id FROM fs_members
            WHERE identifier <> '' AND length(identifier) <= {MAX_IDENTIFIER}
            GROUP BY identifier, trait_key""")
        exit_value = "false" if exit_mode == "false" else "NULL::BOOLEAN"
        con.execute(f"""CREATE OR REPLACE TEMP TABLE fs_changes AS
            SELECT d.identifier, d.trait_key, d.cohort_id, true AS trait_value
            FROM fs_desired d LEFT JOIN sync.flagsmith_traits l USING (identifier, trait_key)
            WHERE l.trait_value IS DISTINCT FROM true OR l.drift IS NOT NULL OR l.unconfirmed
            UNION ALL
            SELECT l.identifier, l.trait_key, l.cohort_id,
                   CASE WHEN k.trait_key IS NOT NULL THEN {exit_value} ELSE NULL::BOOLEAN END AS trait_value
            FROM sync.flagsmith_traits l
            LEFT JOIN (SELECT DISTINCT trait_key FROM fs_keys) k USING (trait_key)
            ANTI JOIN fs_desired d USING (identifier, trait_key)
            WHERE (l.trait_value IS NOT NULL OR l.drift IS NOT NULL OR l.unconfirmed)
              AND NOT (k.trait_key IS NOT NULL AND {exit_value} IS NOT NULL AND l.trait_value = {exit_value}
                       AND l.drift IS NULL AND l.unconfirmed IS NOT TRUE)""")
        # A change Flagsmith refused (a 4xx) is not sent again every hour: only when the wanted value changes.
        plan.held_back_rejected = con.execute(f"""DELETE FROM fs_changes c USING (
                SELECT DISTINCT t.identifier, t.trait_key, t.trait_value FROM {OUTBOX} o
                JOIN sync.flagsmith_outbox_traits t ON t.outbox_id = o.id
                LEFT JOIN sync.flagsmith_traits l USING (identifier, trait_key)
                WHERE o.status = 'rejected' AND t.sync_id > coalesce(l.sync_id, 0)) r
            WHERE c.identifier = r.identifier AND c.trait_key = r.trait_key
              AND c.trait_value IS NOT DISTINCT FROM r.trait_value""").fetchone()[0]
        plan.resent_in_flight, plan.corrected_in_flight = con.execute("""
            SELECT count(*) FILTER (c.trait_value IS NOT DISTINCT FROM l.trait_value),
                   count(*) FILTER (c.trait_value IS DISTINCT FROM l.trait_value)
            FROM fs_changes c JOIN sync.flagsmith_traits l USING (identifier, trait_key) WHERE l.unconfirmed""").fetchone()
        item_id = f"md5({literal(f'{sync_id}|{round_}|')} || identifier)"
        plan.superseded = con.execute(f"UPDATE {OUTBOX} SET status = 'superseded' WHERE status = 'pending'").fetchone()[0]
        enqueue(con, OUTBOX, f"sync-{sync_id}-r{round_}", f"""
            SELECT {item_id} AS id,
                   json_object('identifier', identifier,
                               'traits', to_json(list(json_object('trait_key', trait_key, 'trait_value', trait_value)
                                                      ORDER BY trait_key)))::VARCHAR AS payload
            FROM fs_changes GROUP BY identifier""")
        con.execute(f"""INSERT INTO sync.flagsmith_outbox_traits
                        SELECT {item_id}, {sync_id}, identifier, trait_key, cohort_id, trait_value FROM fs_changes""")
        if round_ == 0:
            con.execute("DELETE FROM sync.flagsmith_skipped")
            con.execute(f"INSERT INTO sync.flagsmith_skipped SELECT {sync_id}, * FROM fs_skipped")
        plan.identities, plan.set_true, plan.set_false, plan.deleted = con.execute("""
            SELECT count(DISTINCT identifier), count(*) FILTER (trait_value), count(*) FILTER (NOT trait_value),
                   count(*) FILTER (trait_value IS NULL) FROM fs_changes""").fetchone()
        plan.skipped_by_reason = dict(con.execute("SELECT reason, count(*) FROM fs_skipped GROUP BY reason").fetchall())
        con.execute("DROP TABLE fs_members; DROP TABLE fs_skipped; DROP TABLE fs_desired; DROP TABLE fs_changes")
        if transaction:
            con.execute("COMMIT")
    except BaseException:
        if transaction:
            con.execute("ROLLBACK")
        raise
    return plan


def verification_sample(con: duckdb.DuckDBPyConnection, sync_id: int, size: int) -> list[str]:
    """Identities to read back: a random sample of those this sync wrote, topped up from the rest of the ledger."""
    if size <= 0:
        return []
    touched = [r[0] for r in con.execute(f"""
        SELECT DISTINCT t.identifier FROM sync.flagsmith_outbox_traits t JOIN {OUTBOX} o ON o.id = t.outbox_id
        WHERE t.sync_id = ? AND o.status = 'sent' ORDER BY random() LIMIT ?""", [sync_id, size]).fetchall()]
    if len(touched) < size:
        touched += [r[0] for r in con.execute("""
            SELECT identifier FROM (SELECT DISTINCT identifier FROM sync.flagsmith_traits WHERE trait_value IS NOT NULL)
            WHERE identifier NOT IN (SELECT unnest(?::VARCHAR[])) ORDER BY random() LIMIT ?""",
                                               [touched, size - len(touched)]).fetchall()]
    return touched


def reconcile_read_back(con: duckdb.DuckDBPyConnection, sync_id: int, read_back: list[tuple[str, str, str]],
                        identifiers: list[str]) -> tuple[int, int, list[dict]]:
    """Compare what Flagsmith holds (identifier, trait_key, trait_value as JSON) for `identifiers` with the ledger.

    Only traits mixsync owns are compared: live ledger rows, and deletions made by this sync. Where Flagsmith
    holds another boolean or nothing, the ledger takes what Flagsmith really holds, so the next plan re-queues the
    change. Where it holds something that is not a boolean (a string, a number), the trait stays owned as it was
    and its `drift` keeps the value found, so every plan re-writes it until a write is acknowledged.
    Returns (mismatches, of which non-boolean, a few examples).
    """
    con.execute("CREATE OR REPLACE TEMP TABLE fs_read_back (identifier VARCHAR, trait_key VARCHAR, trait_value JSON)")
    if read_back:
        # One JSON document DuckDB parses, not a statement per row (executemany took seconds for a sample).
        con.execute("""INSERT INTO fs_read_back
                       SELECT r[1], r[2], r[3]::JSON FROM (SELECT unnest(from_json($rows, '[["VARCHAR"]]')) AS r)""",
                    {"rows": orjson.dumps(read_back).decode()})
    con.execute("""CREATE OR REPLACE TEMP TABLE fs_mismatches AS
        SELECT identifier, trait_key, ledger_value, flagsmith_value, held,
               coalesce(json_type(flagsmith_value) NOT IN ('BOOLEAN', 'NULL'), false) AS non_boolean
        FROM (SELECT l.identifier, l.trait_key, l.trait_value AS ledger_value, r.trait_value AS flagsmith_value,
                     CASE WHEN json_type(r.trait_value) = 'BOOLEAN' THEN r.trait_value::BOOLEAN END AS held
              FROM sync.flagsmith_traits l LEFT JOIN fs_read_back r USING (identifier, trait_key)
              WHERE l.identifier IN (SELECT unnest($ids::VARCHAR[]))
                AND (l.trait_value IS NOT NULL OR l.sync_id = $sync))
        WHERE held IS DISTINCT FROM ledger_value OR coalesce(json_type(flagsmith_value) NOT IN ('BOOLEAN', 'NULL'),
                                                             false)""", {"ids": identifiers, "sync": sync_id})
    mismatches, non_boolean = con.execute("SELECT count(*), count(*) FILTER (non_boolean) FROM fs_mismatches"
                                          ).fetchone()
    examples = [dict(zip(("identifier", "trait_key", "ledger", "flagsmith"), row, strict=True)) for row in con.execute(
        "SELECT identifier, trait_key, ledger_value, flagsmith_value::VARCHAR FROM fs_mismatches ORDER BY ALL LIMIT 5"
    ).fetchall()]
    if mismatches:
        con.execute("""UPDATE sync.flagsmith_traits l
                       SET trait_value = CASE WHEN m.non_boolean THEN l.trait_value ELSE m.held END,
                           drift = CASE WHEN m.non_boolean THEN m.flagsmith_value END, confirmed_at = now()
                       FROM fs_mismatches m WHERE l.identifier = m.identifier AND l.trait_key = m.trait_key""")
    con.execute("DROP TABLE fs_read_back; DROP TABLE fs_mismatches")
    return mismatches, non_boolean, examples


def record_requeue(con: duckdb.DuckDBPyConnection, sync_id: int, requeued: int) -> None:
    """Count the re-queued trait writes on the sync's row as soon as they are queued (a run that fails later
    still shows them)."""
    con.execute("UPDATE sync.flagsmith_syncs SET requeued = ? WHERE sync_id = ?", [requeued, sync_id])


def ledger_summary(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    row = con.execute("""SELECT count(DISTINCT identifier) FILTER (trait_value IS NOT NULL),
                                count(*) FILTER (trait_value), count(*) FILTER (NOT trait_value)
                         FROM sync.flagsmith_traits""").fetchone()
    return {"ledger_identities": row[0], "ledger_true": row[1], "ledger_false": row[2]}


def rejected_by_reason(con: duckdb.DuckDBPyConnection, sync_id: int) -> dict[str, int]:
    return dict(con.execute(f"""SELECT left(error, 120), count(*) FROM {OUTBOX}
                                WHERE status = 'rejected' AND scope LIKE ? GROUP BY ALL""",
                            [f"sync-{sync_id}-%"]).fetchall())


register_ddl("flagsmith.traits", DDL)
