"""The Mixpanel flow's Dagster definitions and resources."""

import dagster as dg

from mixsync.mixpanel.assets import mixpanel_events
from mixsync.mixpanel.cohort_assets import mixpanel_cohort_members, mixpanel_cohorts
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.mixpanel.schedules import mixpanel_events_job, mixpanel_events_schedule

resources = {"mixpanel": MixpanelResource.from_environment()}

defs = dg.Definitions(
    assets=[mixpanel_events, mixpanel_cohorts, mixpanel_cohort_members],
    jobs=[mixpanel_events_job],
    schedules=[mixpanel_events_schedule],
)
