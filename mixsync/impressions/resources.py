"""The impressions resource: the flow's settings as typed fields, checked when an asset needs them."""

from __future__ import annotations

from mixsync.impressions.settings import ImpressionsSettings
from mixsync.resources import EnvConfiguredResource, env_setting


class ImpressionsResource(EnvConfiguredResource):
    """Where Split's impression files land and how they become Mixpanel exposures."""

    impressions_dir: str | None = env_setting("MIXSYNC_IMPRESSIONS_DIR", "the landing folder (default <landing>/impressions)")
    archive_dir: str | None = env_setting("MIXSYNC_IMPRESSIONS_ARCHIVE_DIR", "loaded files (default beside it)")
    quarantine_dir: str | None = env_setting("MIXSYNC_IMPRESSIONS_QUARANTINE_DIR", "bad files (default beside it)")
    after_load: str | None = env_setting("MIXSYNC_IMPRESSIONS_AFTER_LOAD", "archive or delete (default archive)")
    batch_files: int | None = env_setting("MIXSYNC_IMPRESSIONS_BATCH_FILES", "files per run (default 500)")
    max_runs_per_tick: int | None = env_setting("MIXSYNC_IMPRESSIONS_MAX_RUNS_PER_TICK", "runs per tick (default 10)")
    settle_seconds: int | None = env_setting("MIXSYNC_IMPRESSIONS_SETTLE_SECONDS", "file quiet time (default 5)")
    exposure_event: str | None = env_setting("MIXSYNC_EXPOSURE_EVENT", "the event (default $experiment_started)")
    exposure_property_names: str | None = env_setting("MIXSYNC_EXPOSURE_PROPERTY_NAMES", "JSON: role -> property name")
    exposures_batch_size: int | None = env_setting("MIXSYNC_EXPOSURES_BATCH_SIZE", "events per /import (default 2000)")
    exposures_concurrency: int | None = env_setting("MIXSYNC_EXPOSURES_CONCURRENCY", "requests in flight (default 4)")

    def settings(self) -> ImpressionsSettings:
        return ImpressionsSettings.from_env(self.environ())
