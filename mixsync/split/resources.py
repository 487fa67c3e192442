"""The Split resource: its settings as typed fields, checked when an asset needs them."""

from __future__ import annotations

from mixsync.http import RetryStats
from mixsync.resources import HttpResource, env_setting
from mixsync.split.client import SplitEventsClient
from mixsync.split.mapping import Mapping, load_mapping
from mixsync.split.settings import SplitSettings


class SplitResource(HttpResource):
    """Where Split events go and how they are mapped; only Split assets need them."""

    sdk_key: str | None = env_setting("SPLIT_SDK_KEY", "the server-side SDK key (bind with EnvVar only)")
    events_url: str | None = env_setting("SPLIT_EVENTS_URL", "the Events API (default https://events.split.io)")
    traffic_type: str | None = env_setting("SPLIT_TRAFFIC_TYPE", "the default traffic type (default user)")
    environment: str | None = env_setting("SPLIT_ENVIRONMENT", "environmentName sent with each event")
    mapping_file: str | None = env_setting("SPLIT_MAPPING_FILE", "the mapping file (YAML)")
    batch_size: int | None = env_setting("SPLIT_BATCH_SIZE", "events per request (default 1000)")
    max_batch_bytes: int | None = env_setting("SPLIT_MAX_BATCH_BYTES", "bytes per request (default 2 MiB)")
    push_concurrency: int | None = env_setting("SPLIT_PUSH_CONCURRENCY", "requests in flight (default 4)")
    request_timeout_seconds: int | None = env_setting("SPLIT_REQUEST_TIMEOUT_SECONDS",
                                                      "wait for Split's answer; past it a batch is in doubt (default 60)")

    def settings(self) -> SplitSettings:
        return SplitSettings.from_env(self.environ())

    def mapping(self, settings: SplitSettings) -> Mapping:
        return load_mapping(settings.mapping_file, settings.traffic_type)

    def client(self, settings: SplitSettings, stats: RetryStats | None = None) -> SplitEventsClient:
        return SplitEventsClient(settings, self.retry_policy(), stats)
