"""The nightly pull: yesterday, plus a few days before it again for late-arriving events, in one run."""

import datetime as dt
import os

import dagster as dg

from mixsync.mixpanel.assets import mixpanel_events
from mixsync.mixpanel.partitions import daily_partitions
from mixsync.settings import parse_int

mixpanel_events_job = dg.define_asset_job(
    "mixpanel_events_job", selection=[mixpanel_events], tags={"mixsync/writes": "duckdb"},
    description="Mixpanel's raw export into mixpanel.events for a day or a range of days.",
)


def recent_days_request(context: dg.ScheduleEvaluationContext, run_key_prefix: str) -> dg.RunRequest | dg.SkipReason:
    """One run for yesterday and the MIXPANEL_LOOKBACK_DAYS before it (a partition range, not a run per day)."""
    lookback = parse_int(os.environ, "MIXPANEL_LOOKBACK_DAYS", 3, minimum=0, maximum=60)
    keys = daily_partitions.get_partition_keys(current_time=context.scheduled_execution_time)
    if not keys:
        return dg.SkipReason("no complete day since MIXPANEL_START_DATE yet")
    yesterday = dt.date.fromisoformat(keys[-1])
    start = max(dt.date.fromisoformat(keys[0]), yesterday - dt.timedelta(days=lookback))
    return dg.RunRequest(
        run_key=f"{run_key_prefix}-{yesterday}",
        tags={"dagster/asset_partition_range_start": start.isoformat(),
              "dagster/asset_partition_range_end": yesterday.isoformat()},
    )


@dg.schedule(job=mixpanel_events_job, cron_schedule="15 2 * * *", execution_timezone="UTC",
             description="Every night: yesterday and the MIXPANEL_LOOKBACK_DAYS before it, in one run.")
def mixpanel_events_schedule(context: dg.ScheduleEvaluationContext):
    return recent_days_request(context, "mixpanel-events")
