"""The experiments resource: the experiments file and chart folder as typed fields, read when the asset runs."""

from __future__ import annotations

from mixsync.experiments.settings import ExperimentsSettings
from mixsync.resources import EnvConfiguredResource, env_setting


class ExperimentsResource(EnvConfiguredResource):
    """Which experiments to analyse and where their charts go; the file is validated when the asset runs."""

    experiments_file: str | None = env_setting("MIXSYNC_EXPERIMENTS_FILE",
                                               "the experiments file (YAML); unset: exposures and sample ratios only")
    chart_dir: str | None = env_setting("MIXSYNC_EXPERIMENTS_CHART_DIR",
                                        "where charts are written (default: beside the warehouse file)")

    def settings(self) -> ExperimentsSettings:
        return ExperimentsSettings.from_env(self.environ())
