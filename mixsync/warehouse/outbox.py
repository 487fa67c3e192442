"""Outboxes: what must be sent, keyed by a stable id, sent in batches and marked as the service acknowledges.

An outbox is a DuckDB table with the columns of `outbox_ddl`. A push:
1. applies what an earlier, interrupted push acknowledged (its journal), so nothing is sent twice;
2. snapshots the pending rows to Parquet files in short reads (the DuckDB file is not held while sending), in
   parts for a big push, written in the background while earlier parts are sent;
3. sends batches with bounded concurrency, appending each acknowledgement to a journal file (fsynced), so a
   crash resends at most the batches that were in flight;
4. applies the journal to the table in one short write at the end (or, after a crash, at the next push).
Payloads are JSON text built by DuckDB (`json_object`); Python only joins bytes into request bodies.
"""

from __future__ import annotations

import bisect
import datetime as dt
import logging
import operator
import os
import queue
import threading
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from mixsync.warehouse import Warehouse

log = logging.getLogger("mixsync.outbox")
# A push of more rows than this is snapshotted in three growing parts (1/16, 3/16, 12/16 of the rows, by a hash
# of the id): the first is on disk quickly, the bigger ones are written while the earlier ones are sent.
SNAPSHOT_PART_ROWS = 100_000
SNAPSHOT_PARTS = ((0, 1), (1, 4), (4, 16))


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


def enqueue(con, table: str, scope: str | None, select_sql: str, params: dict | list | None = None) -> int:
    """Add the rows of `select_sql` (columns id, payload) that the outbox has never seen. Returns how many.

    With `scope=None`, `select_sql` gives each row's scope in a `scope` column (one insert for many partitions).
    """
    scope_sql = "n.scope" if scope is None else f"'{scope.replace(chr(39), chr(39) * 2)}'"
    return con.execute(f"""
        INSERT INTO {table} (id, scope, payload, status, enqueued_at)
        SELECT n.id, {scope_sql}, n.payload, 'pending', now()
        FROM ({select_sql}) n ANTI JOIN {table} o ON o.id = n.id""", params or []).fetchone()[0]


class _Journal:
    """Append-only acknowledgements for one snapshot: `start a b`, `sent a b`, `reject i reason`."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._handle = open(path, "a", encoding="utf-8")

    def write(self, line: str, sync: bool = True) -> None:
        """Append a line; flushed lines survive a killed process, synced ones an operating-system crash too."""
        with self._lock:
            self._handle.write(line + "\n")
            self._handle.flush()
            if sync:
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


def _snapshot_parts(snapshot: Path) -> list[Path]:
    """The files of a snapshot: `name.parquet` (one file), or `name.pNNN.parquet` parts in row order."""
    if snapshot.exists():
        return [snapshot]
    return sorted(snapshot.parent.glob(f"{snapshot.stem}.p*.parquet"))


def _apply(warehouse: Warehouse, table: str, snapshot: Path, journal: Path) -> tuple[int, int, int]:
    """Mark the journal's acknowledged rows sent (or rejected) in the outbox; then drop snapshot and journal."""
    sent, rejected, in_flight = _read_journal(journal) if journal.exists() else ([], {}, [])
    sent_rows = sum(b - a for a, b in sent) - len(rejected)
    parts = _snapshot_parts(snapshot)
    if (sent or rejected) and parts:
        now = dt.datetime.now(dt.timezone.utc)
        # Row numbers run on from one part to the next, in name order.
        offsets, total = [], 0
        for part in parts:
            offsets.append(total)
            total += pq.ParquetFile(part).metadata.num_rows
        files = [str(part) for part in parts]
        with warehouse.write() as con:
            # One statement per kind of acknowledgement (not one per batch), keyed by row position in the snapshot.
            con.execute("""CREATE OR REPLACE TEMP TABLE outbox_acks AS
                           SELECT unnest(range(r.first, r.stop)) AS row_number
                           FROM (SELECT unnest($firsts) AS first, unnest($stops) AS stop) r""",
                        {"firsts": [a for a, _ in sent], "stops": [b for _, b in sent]})
            con.execute("""CREATE OR REPLACE TEMP TABLE outbox_rejects AS
                           SELECT unnest($rows) AS row_number, unnest($reasons) AS error""",
                        {"rows": list(rejected), "reasons": list(rejected.values())})
            con.execute("BEGIN TRANSACTION")
            try:
                # Snapshot rows are unique by id; a row refused by the service is rejected even if its batch's
                # `sent` line never made it to the journal.
                con.execute(f"""
                    UPDATE {table} AS o SET status = a.status, error = a.error, sent_at = $now, attempts = o.attempts + 1
                    FROM (SELECT s.id, CASE WHEN r.row_number IS NULL THEN 'sent' ELSE 'rejected' END AS status, r.error
                          FROM (SELECT s.id, s.file_row_number + p.row_offset AS row_number
                                FROM read_parquet($files, filename = true, file_row_number = true) s
                                JOIN (SELECT unnest($files) AS filename, unnest($offsets) AS row_offset) p
                                  ON p.filename = s.filename) s
                          LEFT JOIN outbox_rejects r ON r.row_number = s.row_number
                          WHERE r.row_number IS NOT NULL
                             OR s.row_number IN (SELECT row_number FROM outbox_acks)) a
                    WHERE o.id = a.id AND o.status = 'pending'""", {"now": now, "files": files, "offsets": offsets})
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("DROP TABLE outbox_acks; DROP TABLE outbox_rejects")
    in_flight_rows = sum(b - a for a, b in in_flight)
    journal.unlink(missing_ok=True)
    for part in parts:
        part.unlink(missing_ok=True)
    return max(sent_rows, 0), len(rejected), in_flight_rows


def _payload_chunks(snapshot: Path) -> Iterator[tuple[bytes, list[int]]]:
    """Each Parquet chunk's payloads as one bytes object and their offsets (n + 1 of them)."""
    for record_batch in pq.ParquetFile(snapshot).iter_batches(batch_size=65536, columns=["payload"]):
        column = record_batch.column(0).cast(pa.large_binary())
        _, offsets_buffer, data_buffer = column.buffers()
        offsets = memoryview(offsets_buffer).cast("q")[column.offset:column.offset + len(column) + 1].tolist()
        yield (data_buffer.to_pybytes() if data_buffer is not None else b""), offsets


def _batches(snapshot: Path, max_items: int, max_bytes: int) -> Iterator[tuple[int, list[bytes]]]:
    """(first row number, payloads) of each batch, within both the item and the byte limit.

    Batch boundaries come from the payloads' offsets by bisection, and payloads are sliced from each chunk's
    buffer: profiling showed that decoding and re-encoding every payload was most of the push's CPU time.
    """
    batch: list[bytes] = []
    size = 2
    first = 0
    for data, offsets in _payload_chunks(snapshot):
        count = len(offsets) - 1
        # ends[i] - ends[j]: the bytes of payloads j..i-1 in a body, a comma (or bracket) each.
        ends = list(map(operator.add, offsets, range(count + 1)))
        start = 0
        while start < count:
            stop = min(count, start + max_items - len(batch))
            fits = bisect.bisect_right(ends, ends[start] + max_bytes - size, start + 1, stop + 1) - (start + 1)
            if fits == 0 and not batch:
                fits = 1  # a payload larger than max_bytes goes alone
            end = start + fits
            batch.extend([data[offsets[i]:offsets[i + 1]] for i in range(start, end)])
            size += ends[end] - ends[start]
            start = end
            if start < count:  # a limit stopped this batch, not the end of the chunk
                yield first, batch
                first += len(batch)
                batch, size = [], 2
    if batch:
        yield first, batch


def _work_dir(work_dir: Path, table: str) -> Path:
    path = Path(work_dir) / table.replace(".", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


def recover(warehouse: Warehouse, table: str, work_dir: Path, logger: logging.Logger | None = None) -> PushReport:
    """Apply what an interrupted push of `table` acknowledged (push does this first; call it yourself before
    changing pending rows, so a row the service already holds is never taken for unsent)."""
    logger = logger or log
    work_dir = _work_dir(work_dir, table)
    report = PushReport()
    for journal in sorted(work_dir.glob("*.journal")):
        sent, rejected, in_flight = _apply(warehouse, table, journal.with_suffix(".parquet"), journal)
        report.recovered_sent += sent
        report.recovered_rejected += rejected
        report.in_flight_at_crash += in_flight
        if in_flight:
            logger.warning(f"{table}: an earlier push was interrupted with {in_flight} items in flight; "
                           "they are sent again (the service may hold them twice)")
    for orphan in [*work_dir.glob("*.parquet"), *work_dir.glob("*.parquet.tmp")]:
        orphan.unlink()
    return report


def push(warehouse: Warehouse, table: str, send: Callable[[list[bytes]], BatchOutcome], work_dir: Path, *,
         scope: str | None = None, max_items: int = 1000, max_bytes: int = 1 << 21, concurrency: int = 4,
         logger: logging.Logger | None = None, scopes: list[str] | None = None) -> PushReport:
    """Send every pending row of `table` (of one scope, of the `scopes` listed, or all) and mark what the
    service acknowledged.

    `send` gets the payloads of one batch and returns a BatchOutcome; it raises to fail the batch
    (after its own retries). A FatalPushError, or any other exception, stops the push: batches already
    acknowledged stay acknowledged, the rest stay pending for the next run.
    """
    logger = logger or log
    # 1. Anything an interrupted push acknowledged is applied first.
    report = recover(warehouse, table, work_dir, logger)
    work_dir = _work_dir(work_dir, table)
    # 2. Snapshot what is pending, in parts written by a background thread: sending starts as soon as the first
    #    part is on disk instead of after the whole copy (measured: the copy was ~20% of a million-event push).
    name = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    snapshot = work_dir / f"{name}.parquet"
    journal_path = work_dir / f"{name}.journal"
    where, params = "status = 'pending'", {}
    if scope is not None:
        where, params = where + " AND scope = $scope", {"scope": scope}
    elif scopes is not None:
        where, params = where + " AND list_contains($scopes, scope)", {"scopes": list(scopes)}
    with warehouse.read() as con:
        report.considered = con.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).fetchone()[0]
    if report.considered == 0:
        return report
    part_buckets = SNAPSHOT_PARTS if report.considered > SNAPSHOT_PART_ROWS else ((0, 16),)
    parts: queue.Queue = queue.Queue()
    stop = threading.Event()

    def snapshot_parts() -> None:
        try:
            for k, (low, high) in enumerate(part_buckets):
                if stop.is_set():
                    break
                part = work_dir / f"{name}.p{k:03d}.parquet"
                partial = part.with_name(part.name + ".tmp")
                # Each row falls in exactly one part (hash of its id), so rows enqueued meanwhile are sent once.
                # No ORDER BY: the journal names rows by position in these files, so any fixed order will do,
                # and sorting a million payloads on a read-only connection (which cannot spill) ran out of memory.
                part_filter = f" AND hash(id) % 16 BETWEEN {low} AND {high - 1}" if len(part_buckets) > 1 else ""
                with warehouse.read() as con:
                    con.execute(f"COPY (SELECT id, payload FROM {table} WHERE {where}{part_filter}) TO '{partial}' "
                                "(FORMAT parquet, ROW_GROUP_SIZE 65536, DICTIONARY_SIZE_LIMIT 1)", params)
                os.replace(partial, part)
                parts.put(part)
        except BaseException as exc:
            parts.put(exc)
        finally:
            parts.put(None)

    producer = threading.Thread(target=snapshot_parts, name=f"snapshot-{table}", daemon=True)
    producer.start()

    def snapshot_batches() -> Iterator[tuple[int, list[bytes]]]:
        offset = 0
        while (part := parts.get()) is not None:
            if isinstance(part, BaseException):
                raise part
            for first, payloads in _batches(part, max_items, max_bytes):
                yield offset + first, payloads
            offset += pq.ParquetFile(part).metadata.num_rows

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
                        journal.write(f"reject {first + index} {reason.replace(chr(10), ' ')}", sync=False)
                    journal.write(f"sent {first} {first + count}")
                    report.batches += 1
                    report.rejected += len(outcome.rejected)
                    report.sent += count - len(outcome.rejected)
                    unapplied += 1

            try:
                for first, payloads in snapshot_batches():
                    if failure is not None:
                        break
                    while len(running) >= concurrency:
                        settle(wait(running, return_when=FIRST_COMPLETED)[0])
                    if failure is not None:
                        break
                    # `start` only counts what was in flight after a crash: flushed, not synced (one fsync a batch).
                    journal.write(f"start {first} {first + len(payloads)}", sync=False)
                    running[pool.submit(send, payloads)] = (first, len(payloads))
            except BaseException as exc:
                failure = failure or exc
            while running:
                settle(wait(running, return_when=FIRST_COMPLETED)[0])
    finally:
        stop.set()
        producer.join()
        journal.close()
        # 4. Record what went through, even when the push failed part way.
        _apply(warehouse, table, snapshot, journal_path)
    if failure is not None:
        raise failure
    return report
