"""Dry runs of the pushes: exactly what a push would send, shown as an observation; nothing sent, nothing kept.

A push's dry run stages its outbox as the real run would, inside a transaction that is rolled back, and reads the
pending items (what `push` would snapshot and send) before the rollback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg
import duckdb

from mixsync.warehouse.sql import identifier

PREVIEW_ITEMS = 5


class DryRunConfig(dg.Config):
    dry_run: bool = False
    """Compute exactly what would be sent and show counts and a preview; send nothing and change no ledger."""


@dataclass
class WouldSend:
    """The pending items a push would send, counted and previewed."""

    items: int = 0
    payload_bytes: int = 0
    batches: int = 0
    by_scope: dict[str, int] = field(default_factory=dict)
    preview: list[str] = field(default_factory=list)

    def metadata(self) -> dict:
        return {
            "dry_run": True,
            "would_send_items": self.items,
            "would_send_bytes": self.payload_bytes,
            "would_send_batches": self.batches,
            "would_send_by_scope": self.by_scope,
            "would_send_preview": dg.MetadataValue.md(
                "\n".join(f"```json\n{payload}\n```" for payload in self.preview) or "(nothing to send)"),
        }


def would_send(con: duckdb.DuckDBPyConnection, table: str, scopes: list[str] | None = None,
               max_items: int = 1000) -> WouldSend:
    """What `push(table, scopes=...)` would send now: its pending items (call inside the staging transaction).

    `batches` counts by item limit only (the byte limit may cut a few more).
    """
    where, params = "status = 'pending'", {}
    if scopes is not None:
        where, params = where + " AND list_contains($scopes, scope)", {"scopes": scopes}
    result = WouldSend()
    result.items, result.payload_bytes = con.execute(
        f"SELECT count(*), coalesce(sum(strlen(payload)), 0) FROM {identifier(table)} WHERE {where}",
        params).fetchall()[0]
    result.batches = -(-result.items // max_items)
    result.by_scope = dict(con.execute(f"""SELECT scope, count(*) FROM {identifier(table)} WHERE {where}
                                           GROUP BY scope ORDER BY scope LIMIT 100""", params).fetchall())
    result.preview = [payload for (payload,) in con.execute(
        f"SELECT payload FROM {identifier(table)} WHERE {where} ORDER BY id LIMIT {PREVIEW_ITEMS}", params).fetchall()]
    return result
