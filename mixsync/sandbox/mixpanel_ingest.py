"""Emulated Mixpanel ingestion API: /import (filled in by the impressions flow)."""

from __future__ import annotations

from starlette.routing import Route


def routes() -> list[Route]:
    return []
