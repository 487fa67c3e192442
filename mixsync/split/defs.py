"""The split flow's Dagster definitions (assets, checks, jobs, schedules, sensors) and resources."""

import dagster as dg

resources: dict[str, dg.ConfigurableResource] = {}

defs = dg.Definitions()
