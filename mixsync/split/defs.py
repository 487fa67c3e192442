"""The split flow's Dagster definitions and resources."""

import dagster as dg

from mixsync.mixpanel.schedules import recent_days_request
from mixsync.split.assets import split_events, split_events_in_doubt
from mixsync.split.resources import SplitResource

resources = {"split": SplitResource.from_environment()}

split_events_job = dg.define_asset_job(
    "split_events_job", selection=[split_events], tags={"mixsync/writes": "duckdb"},
    description="Send a day (or a range of days) of mixpanel.events to Split; already-sent events are skipped.",
)


@dg.schedule(job=split_events_job, cron_schedule="15 3 * * *", execution_timezone="UTC",
             description="An hour after mixpanel_events_schedule: the same days, so late events reach Split too; "
                         "events already sent are skipped by the outbox.")
def split_events_schedule(context: dg.ScheduleEvaluationContext):
    return recent_days_request(context, "split-events")


defs = dg.Definitions(assets=[split_events], asset_checks=[split_events_in_doubt], jobs=[split_events_job], schedules=[split_events_schedule])
