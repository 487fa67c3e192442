"""Daily partitions of the raw export: one Mixpanel export day each."""

from __future__ import annotations

import datetime as dt
import os
import warnings

import dagster as dg

from mixsync.settings import parse_bool, parse_timezone, partitions_start_date


def accept_backfill_policy_beta() -> None:
    """Silence Dagster's beta notice for `backfill_policy`, which mixsync relies on knowingly.

    One run per backfill needs `backfill_policy`, which Dagster 1.13 still labels beta and announces at every import
    of the code location (6 times in one CLI run, 20 in `dagster dev`). Each asset module that passes it calls this
    just before its decorator; every other warning still shows, and the tests turn new ones into errors.
    """
    warnings.filterwarnings("ignore", message="Parameter `backfill_policy` of function `asset` is currently in beta",
                            category=dg.BetaWarning)


def _partition_timezone() -> str:
    # Legacy projects count days in the project's timezone; newer ones in UTC.
    if parse_bool(os.environ, "MIXPANEL_LEGACY_LOCAL_TIME", False):
        return parse_timezone(os.environ, "MIXPANEL_PROJECT_TIMEZONE", "UTC")
    return "UTC"


daily_partitions = dg.DailyPartitionsDefinition(
    start_date=partitions_start_date().isoformat(), timezone=_partition_timezone()
)


def partition_days(context: dg.AssetExecutionContext) -> tuple[dt.date, dt.date]:
    """The first and last day a run of a daily-partitioned asset covers.

    A reversed range (`--partition-range 2026-11-27...2026-11-25`) reaches the asset as an empty window that Dagster
    would record as a successful run with an unpartitioned materialization: refused, naming what to write instead.
    """
    window = context.partition_time_window
    first_day, last_day = window.start.date(), (window.end - dt.timedelta(days=1)).date()
    if first_day > last_day:
        raise dg.Failure(f"the partition range {first_day}...{last_day} is reversed: write the first day first "
                         f"({last_day}...{first_day})")
    return first_day, last_day
