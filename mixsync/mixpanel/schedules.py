"""The daily pull: yesterday, plus a few days before it again for late-arriving events."""


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

def refresh_range(yesterday: dt.date, lookback_days: int, first_day: dt.date) -> tuple[dt.date, dt.date]:
    return max(first_day, yesterday - dt.timedelta(days=lookback_days)), yesterday

@dg.schedule(job=mixpanel_events_job, cron_schedule="15 2 * * *", execution_timezone="UTC",
             description="Every night: yesterday and the MIXPANEL_LOOKBACK_DAYS before it, in one run.")
def mixpanel_events_schedule(context: dg.ScheduleEvaluationContext):

    lookback = parse_int(os.environ, "MIXPANEL_LOOKBACK_DAYS", 3, minimum=0, maximum=60)
    keys = daily_partitions.get_partition_keys(dynamic_partitions_store=None,
                                               current_time=context.scheduled_execution_time)
    if not keys:
        return dg.SkipReason("no complete day since MIXPANEL_START_DATE yet")
    yesterday = dt.date.fromisoformat(keys[-1])
    start, end = refresh_range(yesterday, lookback, dt.date.fromisoformat(keys[0]))
    return dg.RunRequest(
        run_key=f"mixpanel-events-{end}",
        tags={"dagster/asset_partition_range_start": start.isoformat(),
              "dagster/asset_partition_range_end": end.isoformat()},
    )
