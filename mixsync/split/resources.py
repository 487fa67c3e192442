"""The Split resource: settings and mapping from the environment, checked when an asset needs them."""

from __future__ import annotations

import dagster as dg

from mixsync.http import RetryPolicy, RetryStats
from mixsync.split.client import SplitEventsClient
from mixsync.split.mapping import Mapping, load_mapping
from mixsync.split.settings import SplitSettings


class SplitResource(dg.ConfigurableResource):
    """Reads SPLIT_* at run time, so the code location loads without them and only Split assets need them."""

    def settings(self) -> SplitSettings:
        return SplitSettings.from_env()

    def mapping(self, settings: SplitSettings) -> Mapping:
        return load_mapping(settings.mapping_file, settings.traffic_type)

    def client(self, settings: SplitSettings, stats: RetryStats | None = None) -> SplitEventsClient:
        return SplitEventsClient(settings, RetryPolicy.from_env(), stats)
