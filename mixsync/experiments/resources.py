"""The experiments resource: the experiments file and chart folder from the environment, read when the asset runs."""

from __future__ import annotations

import dagster as dg

from mixsync.experiments.settings import ExperimentsSettings


class ExperimentsResource(dg.ConfigurableResource):
    """Reads MIXSYNC_EXPERIMENTS_FILE and MIXSYNC_EXPERIMENTS_CHART_DIR at run time."""

    def settings(self) -> ExperimentsSettings:
        return ExperimentsSettings.from_env()
