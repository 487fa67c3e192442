"""The registry of the flows' tables: each flow registers its DDL (and migrations); the warehouse runs them all.

The warehouse knows no flow by name. A flow's SQL module calls `register_ddl` when imported, so every flow a
process uses has its tables in place on each write connection. A flow that reads another flow's tables imports
that flow's SQL module, which registers those tables first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import duckdb

# Schemas shared by flows: `sync` holds the outboxes, `analytics` the views built on top of the flows' tables.
SCHEMAS = ("mixpanel", "split", "flagsmith", "sync", "analytics")


@dataclass(frozen=True)
class FlowDDL:
    name: str
    ddl: str
    migrate: Callable[[duckdb.DuckDBPyConnection], None] | None = None


_REGISTERED: dict[str, FlowDDL] = {}


def register_ddl(name: str, ddl: str, migrate: Callable[[duckdb.DuckDBPyConnection], None] | None = None) -> None:
    """Add (or, on a re-import, replace) a flow's tables; they are created in registration order."""
    _REGISTERED[name] = FlowDDL(name, ddl, migrate)


def registered() -> list[FlowDDL]:
    return list(_REGISTERED.values())
