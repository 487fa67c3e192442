"""The flagsmith flow's Dagster definitions (assets, jobs, schedules) and resources."""

import dagster as dg

from mixsync.flagsmith.assets import flagsmith_cohort_traits
from mixsync.flagsmith.profile_flags_assets import mixpanel_profile_flags
from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.flagsmith.settings import profile_flags_cron, sync_cron
from mixsync.mixpanel.cohort_webhook_assets import (
                                                    mixpanel_cohort_webhook_job,
                                                    mixpanel_cohort_webhook_members,
                                                    mixpanel_cohort_webhook_sensor,
)

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

mixpanel_profile_flags_job = dg.define_asset_job(
    "mixpanel_profile_flags_job",
    selection=dg.AssetSelection.assets("mixpanel_profile_flags"),
    tags={"mixsync/writes": "duckdb"},
    description="Each managed identity's Flagsmith flags into DuckDB, then their changes as Mixpanel profile "
                "properties.",
)

mixpanel_profile_flags_schedule = dg.ScheduleDefinition(
    name="mixpanel_profile_flags_schedule",
    job=mixpanel_profile_flags_job,
    cron_schedule=profile_flags_cron(),
    execution_timezone="UTC",
    description="Hourly by default (FLAGSMITH_PROFILE_FLAGS_CRON), 20 minutes after the cohort traits sync that "
                "decides which identities are managed.",
)

resources: dict[str, dg.ConfigurableResource] = {"flagsmith": FlagsmithResource.from_environment()}

defs = dg.Definitions(
    assets=[flagsmith_cohort_traits, mixpanel_profile_flags, mixpanel_cohort_webhook_members],
    jobs=[flagsmith_cohort_traits_job, mixpanel_profile_flags_job, mixpanel_cohort_webhook_job],
    schedules=[flagsmith_cohort_traits_schedule, mixpanel_profile_flags_schedule],
    sensors=[mixpanel_cohort_webhook_sensor],
)
