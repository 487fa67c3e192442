"""Asset checks every push carries on its outbox: items left pending too long, and too many refusals.

They are evaluated by the push's own step (check specs on the asset), so they cost no extra step process.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping

import dagster as dg
import duckdb

from mixsync.settings import parse_int
from mixsync.warehouse.sql import identifier

PENDING_AGE_CHECK = "outbox_pending_age"
REJECTS_CHECK = "outbox_rejects"


def thresholds(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(MIXSYNC_OUTBOX_MAX_PENDING_HOURS, MIXSYNC_OUTBOX_MAX_REJECT_PERCENT)."""
    environ = os.environ if environ is None else environ
    return (parse_int(environ, "MIXSYNC_OUTBOX_MAX_PENDING_HOURS", 24, minimum=1),
            parse_int(environ, "MIXSYNC_OUTBOX_MAX_REJECT_PERCENT", 1, minimum=0, maximum=100))


def outbox_check_specs(asset: str, table: str) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(PENDING_AGE_CHECK, asset=asset,
                          description=f"No item of {table} has waited (pending, or any status but sent, "
                                      "rejected and superseded) longer than MIXSYNC_OUTBOX_MAX_PENDING_HOURS (default 24)."),
        dg.AssetCheckSpec(REJECTS_CHECK, asset=asset,
                          description=f"The service refused at most MIXSYNC_OUTBOX_MAX_REJECT_PERCENT (default 1) "
                                      f"percent of the items {table} holds."),
    ]


def outbox_check_results(con: duckdb.DuckDBPyConnection, asset: str, table: str,
                         now: dt.datetime | None = None) -> list[dg.AssetCheckResult]:
    """Both checks, WARN when they fail: a stuck or refusing push needs a look, not a stopped pipeline."""
    max_hours, max_percent = thresholds()
    now = now or dt.datetime.now(dt.UTC)
    cutoff = now - dt.timedelta(hours=max_hours)
    old, oldest, considered, rejected = con.execute(f"""
        SELECT count(*) FILTER (status NOT IN ('sent', 'rejected', 'superseded') AND enqueued_at < $cutoff),
               min(enqueued_at) FILTER (status NOT IN ('sent', 'rejected', 'superseded')),
               count(*), count(*) FILTER (status = 'rejected')
        FROM {identifier(table)}""", {"cutoff": cutoff}).fetchall()[0]
    reasons = dict(con.execute(f"""SELECT coalesce(error, '(no reason)'), count(*) FROM {identifier(table)}
                                   WHERE status = 'rejected' GROUP BY ALL ORDER BY 2 DESC LIMIT 10""").fetchall())
    share = 100.0 * rejected / considered if considered else 0.0
    return [
        dg.AssetCheckResult(
            asset_key=asset, check_name=PENDING_AGE_CHECK, passed=old == 0, severity=dg.AssetCheckSeverity.WARN,
            metadata={"pending_older_than_limit": old, "max_pending_hours": max_hours,
                      "oldest_pending_enqueued_at": oldest.isoformat() if oldest else "none pending"}),
        dg.AssetCheckResult(
            asset_key=asset, check_name=REJECTS_CHECK, passed=share <= max_percent,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"items": considered, "rejected": rejected, "rejected_percent": round(share, 3),
                      "max_reject_percent": max_percent, "top_reasons": reasons}),
    ]
