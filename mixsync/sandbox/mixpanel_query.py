"""Emulated Mixpanel query API: cohorts list and engage (filled in by the cohorts flow)."""

from __future__ import annotations

from typing import Any

from starlette.routing import Route


def create_state(mixpanel_state) -> Any:
    """This emulation's state, kept on the MixpanelSandbox; handlers reach it via request.app.state.mixpanel."""
    return None


def routes() -> list[Route]:
    return []
