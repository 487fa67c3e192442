"""Outboxes: what must be sent, keyed by a stable id, sent in batches and marked as the service acknowledges.

An outbox is a DuckDB table with the columns of `outbox_ddl`. A push:
1. applies what an earlier, interrupted push acknowledged (its journal), so nothing is sent twice;
2. snapshots the pending rows to a Parquet file in one short read (the DuckDB file is not held while sending);
3. sends batches with bounded concurrency, appending each acknowledgement to a journal file (fsynced), so a
   crash resends at most the batches that were in flight;
4. applies the journal to the table in one short write at the end (or, after a crash, at the next push).
Payloads are JSON text built by DuckDB (`json_object`); Python only joins bytes into request bodies.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.parquet as pq

from mixsync.warehouse import Warehouse

log = logging.getLogger("mixsync.outbox")


def outbox_ddl(table: str, extra_columns: str = "") -> str:
    """The standard outbox columns; `extra_columns` (", col TYPE ...") may add flow-specific ones."""
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    id VARCHAR NOT NULL,              -- stable id of the item; unique (enforced by the enqueue anti-join)
    scope VARCHAR NOT NULL,           -- what produced it, e.g. the partition key
    payload VARCHAR NOT NULL,         -- the JSON object to send, exactly as it will be sent
    status VARCHAR NOT NULL,          -- pending | sent | rejected
    enqueued_at TIMESTAMPTZ NOT NULL,
    sent_at TIMESTAMPTZ,
    attempts INTEGER NOT NULL DEFAULT 0,
    error VARCHAR{extra_columns}
);"""


@dataclass
class BatchOutcome:
    """What the service said about one batch: positions (within the batch) it refused, with its reason."""

    rejected: dict[int, str] = field(default_factory=dict)


@dataclass
class PushReport:
    considered: int = 0
    sent: int = 0
    rejected: int = 0
    batches: int = 0
    recovered_sent: int = 0
    recovered_rejected: int = 0
    in_flight_at_crash: int = 0

    def as_metadata(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class FatalPushError(RuntimeError):
    """Stop pushing: the service refused for a reason more batches will not fix (credentials, configuration)."""


def enqueue(con, table: str, scope: str, select_sql: str, params: dict | list | None = None) -> int:
    """Add the rows of `select_sql` (columns id, payload) that the outbox has never seen. Returns how many."""
    return con.execute(f"""
        INSERT INTO {table} (id, scope, payload, status, enqueued_at)
        SELECT n.id, '{scope.replace("'", "''")}', n.payload, 'pending', now()
        FROM ({select_sql}) n ANTI JOIN {table} o ON o.id = n.id""", params or []).fetchone()[0]


class _Journal:
    """Append-only acknowledgements for one snapshot: `start a b`, `sent a b`, `reject i reason`."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._handle = open(path, "a", encoding="utf-8")

    def write(self, line: str) -> None:
        with self._lock:
            self._handle.write(line + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def _read_journal(path: Path) -> tuple[list[tuple[int, int]], dict[int, str], list[tuple[int, int]]]:
    sent, rejected, started = [], {}, []
    for line in path.read_text(encoding="utf-8").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "sent":
            a, b = rest.split()
            sent.append((int(a), int(b)))
        elif kind == "start":
            a, b = rest.split()
            started.append((int(a), int(b)))
        elif kind == "reject":
            index, _, reason = rest.partition(" ")
            rejected[int(index)] = reason
    in_flight = [r for r in started if r not in sent]
    return sent, rejected, in_flight


def _apply(warehouse: Warehouse, table: str, snapshot: Path, journal: Path) -> tuple[int, int, int]:
    """Mark the journal's acknowledged rows sent (or rejected) in the outbox; then drop snapshot and journal."""
    sent, rejected, in_flight = _read_journal(journal) if journal.exists() else ([], {}, [])
    sent_rows = sum(b - a for a, b in sent) - len(rejected)
    if sent or rejected:
        now = dt.datetime.now(dt.timezone.utc)
        with warehouse.write() as con:
            con.execute("CREATE OR REPLACE TEMP TABLE outbox_acks (row_number BIGINT, status VARCHAR, error VARCHAR)")
            if sent:
                con.executemany("INSERT INTO outbox_acks SELECT unnest(range(?, ?)), 'sent', NULL", [list(r) for r in sent])
            if rejected:
                con.executemany("INSERT INTO outbox_acks VALUES (?, 'rejected', ?)",
                                [[i, why] for i, why in rejected.items()])
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(f"""
                    UPDATE {table} AS o SET status = a.status, error = a.error, sent_at = ?, attempts = o.attempts + 1
                    FROM (SELECT s.id, CASE WHEN bool_or(acks.status = 'rejected') THEN 'rejected' ELSE 'sent' END AS status,
                                 max(acks.error) AS error
                          FROM read_parquet('{snapshot}', file_row_number = true) s
                          JOIN outbox_acks acks ON acks.row_number = s.file_row_number
                          GROUP BY s.id) a
                    WHERE o.id = a.id AND o.status = 'pending'""", [now])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("DROP TABLE outbox_acks")
    in_flight_rows = sum(b - a for a, b in in_flight)
    journal.unlink(missing_ok=True)
    snapshot.unlink(missing_ok=True)
    return max(sent_rows, 0), len(rejected), in_flight_rows


def _batches(snapshot: Path, max_items: int, max_bytes: int) -> Iterator[tuple[int, list[bytes]]]:
    """(first row number, payloads) of each batch, within both the item and the byte limit."""
    row = 0
    batch: list[bytes] = []
    size = 2
    first = 0
    for record_batch in pq.ParquetFile(snapshot).iter_batches(batch_size=8192, columns=["payload"]):
        for payload in record_batch.column(0).to_pylist():
            data = payload.encode("utf-8")
            if batch and (len(batch) >= max_items or size + len(data) + 1 > max_bytes):
                yield first, batch
                batch, size, first = [], 2, row
            batch.append(data)
            size += len(data) + 1
            row += 1
    if batch:
        yield first, batch


def push(warehouse: Warehouse, table: str, send: Callable[[list[bytes]], BatchOutcome], work_dir: Path, *,
         scope: str | None = None, max_items: int = 1000, max_bytes: int = 1 << 21, concurrency: int = 4,
         logger: logging.Logger | None = None) -> PushReport:
    """Send every pending row of `table` (of one scope, or all) and mark what the service acknowledged.

    `send` gets the payloads of one batch and returns a BatchOutcome; it raises to fail the batch
    (after its own retries). A FatalPushError, or any other exception, stops the push: batches already
    acknowledged stay acknowledged, the rest stay pending for the next run.
    """
    logger = logger or log
    work_dir = Path(work_dir) / table.replace(".", "_")
    work_dir.mkdir(parents=True, exist_ok=True)
    report = PushReport()
    # 1. Anything an interrupted push acknowledged is applied first.
    for journal in sorted(work_dir.glob("*.journal")):
        sent, rejected, in_flight = _apply(warehouse, table, journal.with_suffix(".parquet"), journal)
        report.recovered_sent += sent
        report.recovered_rejected += rejected
        report.in_flight_at_crash += in_flight
        if in_flight:
            logger.warning(f"{table}: an earlier push was interrupted with {in_flight} items in flight; "
                           "they are sent again (the service may hold them twice)")
    for orphan in work_dir.glob("*.parquet"):
        orphan.unlink()
    # 2. Snapshot what is pending.
    name = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    snapshot = work_dir / f"{name}.parquet"
    journal_path = work_dir / f"{name}.journal"
    where = "status = 'pending'" + (" AND scope = $scope" if scope is not None else "")
    with warehouse.read() as con:
        report.considered = con.execute(f"SELECT count(*) FROM {table} WHERE {where}",
                                        {"scope": scope} if scope is not None else {}).fetchone()[0]
        if report.considered == 0:
            return report
        con.execute(f"COPY (SELECT id, payload FROM {table} WHERE {where} ORDER BY id) TO '{snapshot}' "
                    "(FORMAT parquet, ROW_GROUP_SIZE 65536)", {"scope": scope} if scope is not None else {})
    # 3. Send with bounded concurrency; every acknowledgement is journaled before we move on.
    journal = _Journal(journal_path)
    failure: BaseException | None = None
    unapplied = 0
    try:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"push-{table}") as pool:
            running: dict[Future, tuple[int, int]] = {}

            def settle(done: set[Future]) -> None:
                nonlocal failure, unapplied
                for future in done:
                    first, count = running.pop(future)
                    try:
                        outcome = future.result()
                    except BaseException as exc:
                        failure = failure or exc
                        continue
                    for index, reason in outcome.rejected.items():
                        journal.write(f"reject {first + index} {reason.replace(chr(10), ' ')}")
                    journal.write(f"sent {first} {first + count}")
                    report.batches += 1
                    report.rejected += len(outcome.rejected)
                    report.sent += count - len(outcome.rejected)
                    unapplied += 1

            for first, payloads in _batches(snapshot, max_items, max_bytes):
                if failure is not None:
                    break
                while len(running) >= concurrency:
                    settle(wait(running, return_when=FIRST_COMPLETED)[0])
                if failure is not None:
                    break
                journal.write(f"start {first} {first + len(payloads)}")
                running[pool.submit(send, payloads)] = (first, len(payloads))
            while running:
                settle(wait(running, return_when=FIRST_COMPLETED)[0])
    finally:
        journal.close()
        # 4. Record what went through, even when the push failed part way.
        _apply(warehouse, table, snapshot, journal_path)
    if failure is not None:
        raise failure
    return report
