"""The impressions flow's Dagster definitions (assets, checks, jobs, schedules, sensors) and resources."""

import dagster as dg

from mixsync.impressions.assets import mixpanel_experiment_exposures, split_impressions
from mixsync.impressions.resources import ImpressionsResource
from mixsync.impressions.sensors import split_impression_files_sensor, split_impressions_job

resources: dict[str, dg.ConfigurableResource] = {"impressions": ImpressionsResource.from_environment()}

defs = dg.Definitions(
    assets=[split_impressions, mixpanel_experiment_exposures],
    jobs=[split_impressions_job],
    sensors=[split_impression_files_sensor],
)
