"""The split flow's Dagster definitions and resources."""

import dagster as dg

from mixsync.split.assets import split_events
from mixsync.split.resources import SplitResource

resources = {"split": SplitResource()}

split_events_job = dg.define_asset_job(
    "split_events_job", selection=[split_events], tags={"mixsync/writes": "duckdb"},
    description="Send a day (or a range of days) of mixpanel.events to Split; already-sent events are skipped.",
)

defs = dg.Definitions(assets=[split_events], jobs=[split_events_job])
