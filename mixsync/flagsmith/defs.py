"""The flagsmith flow's Dagster definitions (assets, jobs, schedules) and resources."""

import dagster as dg

from mixsync.flagsmith.assets import flagsmith_cohort_traits
from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.flagsmith.settings import sync_cron

# The whole chain in one run: cohorts list, members (engage), then the trait changes.
flagsmith_cohort_traits_job = dg.define_asset_job(
    "flagsmith_cohort_traits_job",
    selection=dg.AssetSelection.assets("mixpanel_cohorts", "mixpanel_cohort_members", "flagsmith_cohort_traits"),
    tags={"mixsync/writes": "duckdb"},
    description="Mixpanel cohorts and members into DuckDB, then their changes as Flagsmith traits.",
)

flagsmith_cohort_traits_schedule = dg.ScheduleDefinition(
    name="flagsmith_cohort_traits_schedule",
    job=flagsmith_cohort_traits_job,
    cron_schedule=sync_cron(),
    execution_timezone="UTC",
    description="Hourly by default (FLAGSMITH_SYNC_CRON): a couple of engage queries per cohort, well inside "
                "Mixpanel's 60 queries/hour.",
)

resources: dict[str, dg.ConfigurableResource] = {"flagsmith": FlagsmithResource()}

defs = dg.Definitions(
    assets=[flagsmith_cohort_traits],
    jobs=[flagsmith_cohort_traits_job],
    schedules=[flagsmith_cohort_traits_schedule],
)
