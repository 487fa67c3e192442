"""The Flagsmith resource: settings from the environment, checked when an asset needs them."""

from __future__ import annotations

import dagster as dg

from mixsync.flagsmith.client import FlagsmithClient
from mixsync.flagsmith.settings import FlagsmithSettings
from mixsync.http import RetryPolicy, RetryStats


class FlagsmithResource(dg.ConfigurableResource):
    """Reads FLAGSMITH_* at run time, so the code location loads without them and only Flagsmith assets need them."""

    def settings(self) -> FlagsmithSettings:
        return FlagsmithSettings.from_env()

    def client(self, stats: RetryStats | None = None) -> FlagsmithClient:
        return FlagsmithClient(self.settings(), RetryPolicy.from_env(), stats)
