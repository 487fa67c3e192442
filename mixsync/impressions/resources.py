"""The impressions resource: the flow's settings from the environment, checked when an asset needs them."""

from __future__ import annotations

import dagster as dg

from mixsync.impressions.settings import ImpressionsSettings


class ImpressionsResource(dg.ConfigurableResource):
    """Reads MIXSYNC_IMPRESSIONS_* and MIXSYNC_EXPOSURE* at run time, so the code location loads without them."""

    def settings(self) -> ImpressionsSettings:
        return ImpressionsSettings.from_env()
