"""Transactions that survive a DuckLake commit conflict, and ids made by construction (no sequences)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

import duckdb

from mixsync.warehouse.sql import identifier

log = logging.getLogger("mixsync.warehouse")
T = TypeVar("T")

# A DuckLake writer whose transaction touched a table another writer changed since it began loses at COMMIT
# (any DELETE conflicts with any concurrent write to the same table). Its work is already rolled back; running
# the whole transaction again on the new snapshot is correct. Bounded, so a hot table fails loudly instead.
CONFLICT_ATTEMPTS = 5


class ConflictRetriesExhausted(RuntimeError):
    """A transaction lost a DuckLake write conflict on every attempt."""


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.TransactionException) and "conflict" in str(exc).lower()


def run_transaction(con: duckdb.DuckDBPyConnection, body: Callable[[duckdb.DuckDBPyConnection], T],
                    attempts: int = CONFLICT_ATTEMPTS) -> tuple[T, int]:
    """Run `body` between BEGIN and COMMIT, retrying it whole when the commit loses a conflict.

    Returns (what `body` returned, how many times it was retried). `body` must start from the database's state
    alone (no values carried over from a failed attempt), since each attempt sees a newer snapshot.
    """
    for attempt in range(attempts):
        con.execute("BEGIN TRANSACTION")
        try:
            result = body(con)
            con.execute("COMMIT")
            return result, attempt
        except BaseException as exc:
            # A conflict at COMMIT has already rolled the transaction back; anything else has not.
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            if not is_conflict(exc):
                raise
            log.warning("transaction lost a write conflict (attempt %d of %d); running it again", attempt + 1, attempts)
            last = exc
    raise ConflictRetriesExhausted(
        f"a warehouse transaction lost a write conflict {attempts} times in a row: {last}") from last


def next_id(con: duckdb.DuckDBPyConnection, *columns: str) -> int:
    """One more than the largest id in any of `columns` ("schema.table.column"); call under the writer lock.

    Ids by construction rather than a sequence: DuckLake has no sequences, and the writer lock (a file lock or
    a Postgres advisory lock) makes read-then-insert safe across processes and hosts.
    """
    parts = []
    for column in columns:
        table, _, name = column.rpartition(".")
        parts.append(f"SELECT max({identifier(name)}) AS m FROM {identifier(table)}")
    return con.execute(f"SELECT coalesce(max(m), 0) + 1 FROM ({' UNION ALL '.join(parts)})").fetchone()[0]
