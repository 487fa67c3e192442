"""Emulated Mixpanel query API: cohorts list and engage (filled in by the cohorts flow)."""

from __future__ import annotations

from starlette.routing import Route


def routes() -> list[Route]:
    return []
