"""The Mixpanel resource: settings from the environment, checked when an asset needs them."""

from __future__ import annotations

import dagster as dg

from mixsync.http import RetryPolicy, RetryStats
from mixsync.mixpanel.client import MixpanelClient
from mixsync.settings import MixpanelSettings


class MixpanelResource(dg.ConfigurableResource):
    """Reads MIXPANEL_* at run time, so the code location loads without them and only Mixpanel assets need them."""

    def settings(self) -> MixpanelSettings:
        return MixpanelSettings.from_env()

    def client(self, stats: RetryStats | None = None) -> MixpanelClient:
        return MixpanelClient(self.settings(), RetryPolicy.from_env(), stats)
