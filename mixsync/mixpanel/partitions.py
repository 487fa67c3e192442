"""Daily partitions of the raw export: one Mixpanel export day each."""

from __future__ import annotations

import os

import dagster as dg

from mixsync.settings import parse_bool, parse_timezone, partitions_start_date


def _partition_timezone() -> str:
    # Legacy projects count days in the project's timezone; newer ones in UTC.
    if parse_bool(os.environ, "MIXPANEL_LEGACY_LOCAL_TIME", False):
        return parse_timezone(os.environ, "MIXPANEL_PROJECT_TIMEZONE", "UTC")
    return "UTC"


daily_partitions = dg.DailyPartitionsDefinition(
    start_date=partitions_start_date().isoformat(), timezone=_partition_timezone()
)
