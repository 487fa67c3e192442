"""The experiments flow's Dagster definitions (asset with its sample-ratio check, job, schedule) and resources."""

import dagster as dg

from mixsync.experiments.assets import experiment_results
from mixsync.experiments.resources import ExperimentsResource
from mixsync.experiments.schedules import experiment_results_job, experiment_results_schedule

resources: dict[str, dg.ConfigurableResource] = {"experiments": ExperimentsResource.from_environment()}

defs = dg.Definitions(
    assets=[experiment_results],
    jobs=[experiment_results_job],
    schedules=[experiment_results_schedule],
)
