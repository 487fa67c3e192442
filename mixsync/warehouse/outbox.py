"""Outboxes: what must be sent, keyed by a stable id, sent in batches and marked as the service acknowledges.

An outbox is a DuckDB table with the columns of `outbox_ddl`. A push:
1. applies what an earlier, interrupted push acknowledged (its journal), so nothing is sent twice;
2. snapshots the pending rows in one short read to a text file, one `id \\x1f payload` line each (payloads are
   JSON built by DuckDB: never a raw control character), so the DuckDB file is not held while sending;
3. reads it in large chunks, cuts batches by item and byte limits without decoding payloads, sends them with
   bounded concurrency and appends each acknowledged batch's ids to a journal (fsynced) before moving on;
4. applies the journal to the table in one short write at the end (or, after a crash, at the next push).
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from mixsync.warehouse import Warehouse

log = logging.getLogger("mixsync.outbox")
READ_CHUNK = 4 << 20
UNIT, LINE = b"\x1f", b"\n"


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
        return dict(self.__dict__)


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


def _batches(snapshot: Path, max_items: int, max_bytes: int) -> Iterator[tuple[list[bytes], list[bytes]]]:
    """(ids, payloads) of each batch of the snapshot, within both limits (a payload over max_bytes goes alone).

    Only a chunk of the file is held at a time. Lines are split with bytes methods, never decoded: per-row
    Python work was most of the push's CPU time, which on a small machine the service needs too.
    """
    ids: list[bytes] = []
    payloads: list[bytes] = []
    rest = b""
    with open(snapshot, "rb", buffering=0) as file:
        while True:
            data = file.read(READ_CHUNK)
            end_of_file = not data
            data = rest + data
            cut = data.rfind(LINE) + 1
            data, rest = data[:cut], data[cut:]
            if end_of_file and rest:
                raise ValueError(f"{snapshot}: the last line is incomplete")
            if data:
                lines = data.count(LINE)
                fields = data[:-1].replace(LINE, UNIT).split(UNIT)
                if len(fields) != 2 * lines:
                    raise ValueError(f"{snapshot}: a line does not hold exactly one id and one payload "
                                     "(an id or payload with a newline or \\x1f in it)")
                ids += fields[0::2]
                payloads += fields[1::2]
            # ends[k]: bytes of payloads 0..k-1 in a body, a comma each; a body is "[" + ... + "]".
            ends = list(itertools.accumulate(map((1).__add__, map(len, payloads)), initial=0))
            start, count = 0, len(payloads)
            while start < count:
                stop = min(count, start + max_items)
                end = max(start + 1, bisect.bisect_right(ends, ends[start] + max_bytes - 1, start + 1, stop + 1) - 1)
                if end == count and end - start < max_items and not end_of_file:
                    break  # the next chunk may still fill this batch
                yield ids[start:end], payloads[start:end]
                start = end
            if end_of_file:
                return
            del ids[:start], payloads[:start]


def _apply(warehouse: Warehouse, table: str, journal: Path, count: bool = False) -> tuple[int, int, int]:
    """Mark the journal's acknowledged ids sent (or rejected) where still pending, then delete the journal.

    Returns (sent, rejected, in flight) as journaled when `count` is asked (recovery), else zeros. Idempotent:
    applying a journal twice changes nothing more.
    """
    counts = (0, 0, 0)
    if journal.exists():
        # Ack lines are `id<TAB>status[<TAB>reason]`; `start n c` / `sent n c` markers have no tab. A line torn by
        # an operating-system crash has no valid status and is ignored: its batch is sent again, never lost.
        lines = f"""read_csv('{journal}', delim = '\t', quote = '', escape = '', header = false, auto_detect = false,
                             null_padding = true, ignore_errors = true,
                             columns = {{'id': 'VARCHAR', 'status': 'VARCHAR', 'error': 'VARCHAR'}})"""
        with warehouse.write() as con:
            if count:
                markers = f"""SELECT split_part(id, ' ', 1) AS kind, split_part(id, ' ', 2) AS batch,
                                     TRY_CAST(split_part(id, ' ', 3) AS BIGINT) AS items
                              FROM {lines} WHERE status IS NULL"""
                sent, rejected, in_flight = con.execute(f"""
                    SELECT (SELECT count(*) FROM {lines} WHERE status = 'sent'),
                           (SELECT count(*) FROM {lines} WHERE status = 'rejected'),
                           (SELECT coalesce(sum(items), 0) FROM ({markers}) s WHERE kind = 'start'
                              AND batch NOT IN (SELECT batch FROM ({markers}) a WHERE kind = 'sent'))""").fetchone()
                counts = (sent, rejected, in_flight)
            con.execute(f"""
                UPDATE {table} AS o SET status = a.status, error = a.error, sent_at = $now, attempts = o.attempts + 1
                FROM (SELECT id, status, error FROM {lines} WHERE status IN ('sent', 'rejected')) a
                WHERE o.id = a.id AND o.status = 'pending'""", {"now": dt.datetime.now(dt.UTC)})
        journal.unlink()
    return counts


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
        sent, rejected, in_flight = _apply(warehouse, table, journal, count=True)
        report.recovered_sent += sent
        report.recovered_rejected += rejected
        report.in_flight_at_crash += in_flight
        if in_flight:
            logger.warning(f"{table}: an earlier push was interrupted with {in_flight} items in flight; "
                           "they are sent again (the service may hold them twice)")
    for leftover in work_dir.iterdir():  # snapshots: the journal alone says what went through
        leftover.unlink()
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
    report = recover(warehouse, table, work_dir, logger)
    work_dir = _work_dir(work_dir, table)
    name = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    snapshot, journal_path = work_dir / f"{name}.snapshot", work_dir / f"{name}.journal"
    where, params = "status = 'pending'", dict[str, object]()
    if scope is not None:
        where, params = where + " AND scope = $scope", {"scope": scope}
    elif scopes is not None:
        where, params = where + " AND list_contains($scopes, scope)", {"scopes": list(scopes)}
    with warehouse.read() as con:
        # No ORDER BY: any order will do, and sorting a million payloads on a read-only connection (which cannot
        # spill) ran out of memory. QUOTE '' keeps the JSON as it is.
        report.considered = con.execute(
            f"COPY (SELECT id || chr(31) || payload FROM {table} WHERE {where}) TO '{snapshot}' "
            "(FORMAT csv, HEADER false, QUOTE '', ESCAPE '')", params).fetchone()[0]
    if report.considered == 0:
        snapshot.unlink(missing_ok=True)
        return report

    # Unbuffered appends: each write is in the file (safe from a killed process) as soon as it returns.
    journal = os.open(journal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    failure: BaseException | None = None
    running: dict[Future, tuple[int, list[bytes]]] = {}

    def settle(done: set[Future]) -> None:
        nonlocal failure
        for future in done:
            number, ids = running.pop(future)
            try:
                rejected = future.result().rejected
            except BaseException as exc:
                failure = failure or exc
                continue
            if rejected:
                lines = b"".join(
                    id_ + (b"\trejected\t" + " ".join(rejected[i].split()).encode() if i in rejected else b"\tsent")
                    + LINE for i, id_ in enumerate(ids))
            else:
                lines = b"\tsent\n".join(ids) + b"\tsent\n"
            os.write(journal, lines + f"sent {number} {len(ids)}\n".encode())
            # One fsync a batch, so an acknowledgement survives an operating-system crash too: measured at ~0.3 ms
            # wall and 0.15 CPU-s per 1000 batches, too little to be worth a group fsync.
            os.fsync(journal)
            report.batches += 1
            report.rejected += len(rejected)
            report.sent += len(ids) - len(rejected)

    try:
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"push-{table}") as pool:
            try:
                for number, (ids, payloads) in enumerate(_batches(snapshot, max_items, max_bytes)):
                    while len(running) >= concurrency:
                        settle(wait(running, return_when=FIRST_COMPLETED)[0])
                    if failure is not None:
                        break
                    # Flushed, not synced: it only counts what was in flight after a crash.
                    os.write(journal, f"start {number} {len(ids)}\n".encode())
                    running[pool.submit(send, payloads)] = (number, ids)
            except BaseException as exc:
                failure = failure or exc
            while running:
                settle(wait(running, return_when=FIRST_COMPLETED)[0])
    finally:
        os.close(journal)
        snapshot.unlink(missing_ok=True)
        # Record what went through, even when the push failed part way.
        _apply(warehouse, table, journal_path)
    if failure is not None:
        raise failure
    return report
