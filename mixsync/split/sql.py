"""Split events tables: the outbox of events to send, the events that could not be mapped, and the renames."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field

import duckdb

import mixsync.mixpanel.sql  # noqa: F401  (staging reads mixpanel.events; importing it registers those tables)
from mixsync.split.mapping import Mapping
from mixsync.split.mapping_sql import names_sql, stage_sql
from mixsync.warehouse.outbox import enqueue, outbox_ddl
from mixsync.warehouse.schema import register_ddl

EVENTS_OUTBOX = "sync.split_events"

DDL = outbox_ddl(EVENTS_OUTBOX) + """
CREATE TABLE IF NOT EXISTS split.events_rejected (
    day DATE NOT NULL,                 -- the mixpanel.events partition the event came from
    id VARCHAR NOT NULL,               -- the outbox id it would have had: '<traffic type>:' || md5 of Mixpanel's dedupe key
    traffic_type VARCHAR NOT NULL,
    event VARCHAR NOT NULL,            -- the Mixpanel event name
    event_type_id VARCHAR,             -- what it would have become (NULL when the name is unusable)
    key VARCHAR,
    time TIMESTAMPTZ,
    reason VARCHAR NOT NULL,
    rejected_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS split.event_renames (
    event VARCHAR NOT NULL,            -- the Mixpanel event name; one row each (replaced by delete + insert)
    event_type_id VARCHAR,             -- the Split eventTypeId it is sent as; NULL: unusable, needs a rename
    rule VARCHAR NOT NULL,             -- 'mapping file' or 'normalized'
    updated_at TIMESTAMPTZ NOT NULL
);
"""

_DAY_EVENTS = "SELECT event, distinct_id, time, insert_id, properties, day FROM mixpanel.events WHERE day BETWEEN $start AND $end"


@dataclass
class StagedEvents:
    """What the mapping made of a window of mixpanel.events, and what the outbox did with it."""

    considered: int = 0
    not_selected: int = 0
    mapped: int = 0
    properties_trimmed: int = 0
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    renames: dict[str, str | None] = field(default_factory=dict)
    enqueued: int = 0
    # Of the window's mapped events, those an earlier run sent (any status but pending: acknowledged or in doubt).
    already_sent: int = 0
    pending_before: int = 0
    pending_refreshed: int = 0
    withdrawn: int = 0
    # Put back to pending to be sent again: events Split had acknowledged (`resend`), events held in doubt
    # (`resend_in_doubt`, by either option). Apart, because each is warned about in its own terms.
    resend: int = 0
    resend_in_doubt: int = 0

    @property
    def rejected(self) -> int:
        return sum(self.rejects_by_reason.values())

    @property
    def already_sent_not_resent(self) -> int:
        """Events an earlier run sent that this run does not send again."""
        return self.already_sent - self.resend - self.resend_in_doubt


def stage_window(con: duckdb.DuckDBPyConnection, mapping: Mapping, start: dt.date, end: dt.date,
                 environment: str | None, now: dt.datetime, resend: bool = False,
                 resend_in_doubt: bool = False,
                 inspect: Callable[[duckdb.DuckDBPyConnection], object] | None = None) -> StagedEvents:
    """Map the events of days start..end and bring the outbox and the rejects table in line, in one transaction.

    New events are enqueued (never seen ids only); pending ones take the current mapping's payload; pending ones
    the mapping no longer produces are withdrawn; sent ones stay sent unless `resend` puts them back to pending;
    in_doubt ones stay held unless `resend_in_doubt` (or `resend`) puts them back to pending.
    With `inspect` (a dry run), it is called with the staged state inside the transaction, which is then rolled
    back: nothing is kept.
    """
    result = StagedEvents()
    window = {"start": start, "end": end}
    con.execute(f"""CREATE OR REPLACE TEMP TABLE split_names AS
                    {names_sql(mapping, f"SELECT DISTINCT event FROM ({_DAY_EVENTS})")}""", window)
    con.execute(f"CREATE OR REPLACE TEMP TABLE split_stage AS {stage_sql(mapping, _DAY_EVENTS, 'split_names', environment)}",
                {**window, "now": now})
    try:
        result.considered = con.execute(f"SELECT count(*) FROM ({_DAY_EVENTS})", window).fetchone()[0]
        result.not_selected = con.execute(f"""SELECT count(*) FROM ({_DAY_EVENTS}) s
            WHERE s.event NOT IN (SELECT event FROM split_names WHERE selected)""", window).fetchone()[0]
        result.mapped, result.properties_trimmed = con.execute(
            "SELECT count(*) FILTER (payload IS NOT NULL), count(*) FILTER (properties_trimmed) FROM split_stage").fetchone()
        result.rejects_by_reason = dict(con.execute(
            "SELECT reject_reason, count(*) FROM split_stage WHERE reject_reason IS NOT NULL GROUP BY ALL ORDER BY ALL").fetchall())
        result.renames = dict(con.execute(
            "SELECT DISTINCT event, event_type_id FROM split_names WHERE rename_rule IS NOT NULL AND selected ORDER BY ALL").fetchall())
        result.already_sent, result.pending_before = con.execute(f"""
            SELECT count(*) FILTER (o.status <> 'pending'), count(*) FILTER (o.status = 'pending')
            FROM {EVENTS_OUTBOX} o SEMI JOIN split_stage s ON s.id = o.id AND s.payload IS NOT NULL""").fetchone()
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute("DELETE FROM split.events_rejected WHERE day BETWEEN $start AND $end", window)
            con.execute("""INSERT INTO split.events_rejected
                           SELECT day, id, traffic_type, event, event_type_id, key, make_timestamptz(timestamp_ms * 1000),
                                  reject_reason, $now
                           FROM split_stage WHERE reject_reason IS NOT NULL""", {"now": now})
            # Delete then insert rather than INSERT OR REPLACE: a DuckLake table has no key to replace on.
            renamed = "SELECT DISTINCT event, event_type_id, rename_rule FROM split_names WHERE rename_rule IS NOT NULL AND selected"
            con.execute(f"DELETE FROM split.event_renames WHERE event IN (SELECT event FROM ({renamed}))")
            con.execute(f"INSERT INTO split.event_renames SELECT event, event_type_id, rename_rule, $now FROM ({renamed})",
                        {"now": now})
            result.withdrawn = con.execute(f"""
                DELETE FROM {EVENTS_OUTBOX} o WHERE o.scope BETWEEN $start AND $end AND o.status = 'pending'
                  AND o.id NOT IN (SELECT id FROM split_stage WHERE payload IS NOT NULL)""",
                {"start": start.isoformat(), "end": end.isoformat()}).fetchone()[0]
            result.pending_refreshed = con.execute(f"""
                UPDATE {EVENTS_OUTBOX} o SET payload = s.payload
                FROM split_stage s WHERE o.id = s.id AND o.status = 'pending' AND o.payload <> s.payload""").fetchone()[0]
            # In-doubt events first, so that what `resend` then puts back is only what Split had acknowledged.
            if resend_in_doubt or resend:
                result.resend_in_doubt = con.execute(f"""
                    UPDATE {EVENTS_OUTBOX} o SET status = 'pending', payload = s.payload, error = NULL
                    FROM split_stage s WHERE o.id = s.id AND s.payload IS NOT NULL AND o.status = 'in_doubt'""").fetchone()[0]
            if resend:
                result.resend = con.execute(f"""
                    UPDATE {EVENTS_OUTBOX} o SET status = 'pending', payload = s.payload, error = NULL
                    FROM split_stage s WHERE o.id = s.id AND s.payload IS NOT NULL AND o.status <> 'pending'""").fetchone()[0]
            result.enqueued = enqueue(con, EVENTS_OUTBOX, None,
                                      "SELECT id, day::VARCHAR AS scope, payload FROM split_stage WHERE payload IS NOT NULL")
            if inspect is not None:
                inspect(con)
                con.execute("ROLLBACK")
            else:
                con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.execute("DROP TABLE IF EXISTS split_stage; DROP TABLE IF EXISTS split_names")
    return result


def day_figures(con: duckdb.DuckDBPyConnection, days: list[str], sent_since: dt.datetime | None) -> dict[str, dict]:
    """Each day's own figures for its partition: what Split holds of that day (`sent`), what this push sent,
    what waits, what could not be mapped and why, and the day's events in mixpanel.events.

    What this push sent is the rows marked sent at or after `sent_since`, when its first request went out (None:
    it sent nothing). Not the run's start: the recovery of a dead push's journal stamps the rows it applies (sent
    by that push) when it applies them."""
    params = {"days": days, "since": sent_since}
    figures: dict[str, dict] = {day: {"events_considered": 0, "events_sent_total": 0, "events_sent": 0,
                                      "events_pending": 0, "events_rejected": 0, "rejects_by_reason": {},
                                      "outbox_by_status": {}} for day in days}
    for day, n in con.execute("""SELECT day::VARCHAR, count(*) FROM mixpanel.events
                                 WHERE list_contains($days, day::VARCHAR) GROUP BY ALL""", {"days": days}).fetchall():
        figures[day]["events_considered"] = n
    for day, status, n, sent_now in con.execute(f"""
            SELECT scope, status, count(*), count(*) FILTER (status = 'sent' AND sent_at >= $since)
            FROM {EVENTS_OUTBOX} WHERE list_contains($days, scope) GROUP BY ALL ORDER BY ALL""", params).fetchall():
        figures[day]["outbox_by_status"][status] = n
        figures[day]["events_sent"] += sent_now
        if status == "sent":
            figures[day]["events_sent_total"] = n
        elif status == "pending":
            figures[day]["events_pending"] = n
    for day, reason, n in con.execute("""SELECT day::VARCHAR, reason, count(*) FROM split.events_rejected
                                         WHERE list_contains($days, day::VARCHAR) GROUP BY ALL ORDER BY ALL""",
                                      {"days": days}).fetchall():
        figures[day]["rejects_by_reason"][reason] = n
        figures[day]["events_rejected"] += n
    return figures


register_ddl("split.events", DDL)

# For people (`analytics`): where the push to Split stands for each day (the outbox's scope is the day).
ANALYTICS_DDL = f"""
CREATE OR REPLACE VIEW analytics.split_push_per_day AS
    SELECT TRY_CAST(scope AS DATE) AS day, count(*) AS events,
           count(*) FILTER (WHERE status = 'sent') AS sent,
           count(*) FILTER (WHERE status = 'pending') AS pending,
           count(*) FILTER (WHERE status = 'rejected') AS rejected,
           max(sent_at) AS last_sent_at
    FROM {EVENTS_OUTBOX} GROUP BY scope;
"""
register_ddl("analytics.split_push_per_day", ANALYTICS_DDL)
