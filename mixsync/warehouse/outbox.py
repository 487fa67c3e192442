"""Outboxes: what must be sent, keyed by a stable id, sent in batches and marked as the service acknowledges.

An outbox is a DuckDB table with the columns of `outbox_ddl`. A push:
1. applies what an earlier, interrupted push journaled, so nothing is sent twice;
2. snapshots the pending rows in one read transaction: their row numbers and ids, in order, to a Parquet file
   (kept until the journal is applied: it is how a batch's line numbers become rows), then their payloads, in the
   same order, to a text file, one payload a line (JSON built by DuckDB: never a raw newline). The DuckDB file is
   held only for that read, and batches are sent from the text file while DuckDB is still writing it;
3. cuts batches by item and byte limits from the newline positions alone (a batch's request body is one slice of
   the file with its newlines turned into commas: no per-item Python work), sends them with bounded concurrency;
   each batch's line range goes to a journal as `inflight` before it is sent, and its outcome (sent, refused
   items, in doubt) is appended, fsynced, when it settles: a few lines a batch, whatever its size;
4. applies the journal to the table: while later batches are still being sent (and will be for a while), the
   lines of the batches that settled (in windows of OVERLAP_LINES, each a short write), then what is left in one
   short write at the end (or, after a crash, all of it again at the next push: applying changes only rows still
   pending).

Two delivery policies, for two kinds of service:
- `at_most_once=False` (Mixpanel /import dedupes on $insert_id, a Flagsmith trait set is idempotent): a batch in
  flight when the push was interrupted or killed stays pending and is sent again; its items get a `sent_at`, so a
  pending item with a `sent_at` went out and may be at the service already (a flow that plans against a ledger of
  what the service holds takes it as possibly applied).
- `at_most_once=True` (Split counts every event it receives): such a batch becomes `in_doubt` and is not sent
  again unless someone decides so. Either way, a send that raises `OutcomeUnknown` (the service may have applied
  the batch) marks its batch `in_doubt`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import duckdb

from mixsync.http import OutcomeUnknown
from mixsync.warehouse import AnyWarehouse
from mixsync.warehouse.sql import literal
from mixsync.warehouse.sql import path as sql_path

log = logging.getLogger("mixsync.outbox")
READ_CHUNK = 4 << 20
# Lines of a journal applied by one UPDATE (and committed): the UPDATE's hash join holds the ids of its lines and
# DuckDB keeps the changed values until the commit, so this bounds the apply's memory whatever the push's size.
APPLY_LINES = 500_000
# Settled lines that make the push apply them while it sends later batches: the apply overlaps the sends instead of
# running alone after the last one. Each apply scans the outbox once, so windows much smaller cost more CPU.
OVERLAP_LINES = 250_000
# ...but only while the sends still have this long to go. A window applied on its own costs a write of its own
# (opening the file, its checkpoint): 1M lines in four windows took ~1.9 CPU-s, in one apply ~1.2. That pays when it
# hides behind sends that wait on the service; against a service as fast as the client, the sends end about when
# the window would, and it would only take CPU from them: there everything is applied at the end. (A window of
# 250,000 lines takes ~0.3-1 s: three seconds leave it time to end before the sends do.)
OVERLAP_MIN_SECONDS = 3.0
SNAPSHOT_SETTINGS: dict[str, str | int | bool] = {
    # Both copies stream: a small buffer pool keeps DuckDB from caching the table's blocks it read (the push's peak
    # memory was the snapshot's, at the warehouse's memory limit).
    "memory_limit": "128MB",
    # Both statements must read the same rows in the same order: one transaction, no ORDER BY (sorting a million
    # payloads on a read connection, which cannot spill, ran out of memory), and one thread, which scans the
    # table's row groups in order. The warehouse turns preserve_insertion_order off for its loads: with it off and
    # two threads, the payloads of 1M rows came out in another order than their ids (99% of lines), and a batch's
    # outcome landed on other rows. One thread costs no more: 1.2-1.4 CPU-s for the payloads of 1M events, against
    # 1.5-2.1 with two threads unordered and ~3.9 with two threads ordered (the parallel writer buffers and reorders).
    "threads": 1,
    "preserve_insertion_order": True,
}
LINE = b"\n"
JOURNAL, IDS = ".journal", ".ids.parquet"


def outbox_ddl(table: str, extra_columns: str = "") -> str:
    """The standard outbox columns; `extra_columns` (", col TYPE ...") may add flow-specific ones."""
    return f"""
CREATE TABLE IF NOT EXISTS {table} (
    id VARCHAR NOT NULL,              -- stable id of the item; unique (enforced by the enqueue anti-join)
    scope VARCHAR NOT NULL,           -- what produced it, e.g. the partition key
    payload VARCHAR NOT NULL,         -- the JSON object to send, exactly as it will be sent
    status VARCHAR NOT NULL,          -- pending | sent | rejected | in_doubt (may or may not have arrived)
    enqueued_at TIMESTAMPTZ NOT NULL,
    sent_at TIMESTAMPTZ,
    attempts INTEGER NOT NULL DEFAULT 0,
    error VARCHAR{extra_columns}
);"""


@dataclass
class BatchOutcome:
    """What the service said about one batch: positions (within the batch) it refused, with its reason."""

    rejected: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BodySender:
    """A `send` that takes a batch as its request body, the JSON array of its payloads (`[p1,p2,...]`), and the
    number of items in it. Building the body is then one copy of the batch's bytes; a plain callable gets the
    payloads as a list of bytes instead."""

    send: Callable[[bytes, int], BatchOutcome]


Send = Callable[[list[bytes]], BatchOutcome] | BodySender


@dataclass
class PushReport:
    considered: int = 0
    sent: int = 0
    rejected: int = 0
    batches: int = 0
    recovered_sent: int = 0
    recovered_rejected: int = 0
    in_flight_at_crash: int = 0
    in_doubt: int = 0
    recovered_in_doubt: int = 0

    def as_metadata(self) -> dict:
        return dict(self.__dict__)


class FatalPushError(RuntimeError):
    """Stop pushing: the service refused for a reason more batches will not fix (credentials, configuration)."""


def enqueue(con, table: str, scope: str | None, select_sql: str, params: dict | list | None = None) -> int:
    """Add the rows of `select_sql` (columns id, payload) that the outbox has never seen. Returns how many.

    With `scope=None`, `select_sql` gives each row's scope in a `scope` column (one insert for many partitions).
    """
    scope_sql = "n.scope" if scope is None else literal(scope)
    return con.execute(f"""
        INSERT INTO {table} (id, scope, payload, status, enqueued_at)
        SELECT n.id, {scope_sql}, n.payload, 'pending', now()
        FROM ({select_sql}) n ANTI JOIN {table} o ON o.id = n.id""", params or []).fetchone()[0]


def _batches(payloads: Path, max_items: int, max_bytes: int, bodies: bool,
             writer_done: Callable[[], bool] = lambda: True) -> Iterator[tuple[int, int, bytes | list[bytes]]]:
    """(first line, line count, request body or payloads) of each batch of a file of one payload a line, within
    both limits (a payload over max_bytes goes alone).

    The body of lines i..j is "[" + their bytes with the newlines as commas + "]", so its size is known from the
    newline positions alone, which numpy finds a chunk at a time: no Python work per payload. While
    `writer_done()` is false the file is still being written (by DuckDB), and its end is waited for, not taken
    for the end of the snapshot.

    The file is read into one buffer, reused: the newlines of what was read become commas in place, and a body is
    the one copy of its slice. (A new buffer per chunk, its copy with commas and a mask of newlines made ~3 copies
    of the file and a fresh heap allocation, page faults included, each time.)
    """
    # Imported by the push, not with the code location: numpy costs ~0.2 s of import in every Dagster process.
    import numpy as np

    buffer = bytearray(2 * READ_CHUNK)
    is_line_end = np.empty(len(buffer), dtype=np.bool_)
    # buffer[:filled] holds lines read but not yet batched (their newlines at `ends`), the rest is free.
    filled, first_line, eof = 0, 0, False
    ends = np.empty(0, dtype=np.int64)
    with open(payloads, "rb", buffering=0) as file:
        while not eof:
            if len(buffer) < filled + READ_CHUNK:  # lines held over longer than a chunk: grow (no view is held)
                buffer.extend(bytes(filled + READ_CHUNK - len(buffer)))
                is_line_end = np.empty(len(buffer), dtype=np.bool_)
            read = filled
            with memoryview(buffer) as free:
                while read - filled < READ_CHUNK:
                    done = writer_done()  # read after seeing the writer done: then everything it wrote is read
                    count = file.readinto(free[read:filled + READ_CHUNK])
                    if count:
                        read += count
                    elif done:
                        eof = True
                        break
                    elif read > filled:
                        break  # DuckDB is behind the sender: send what there is
                    else:
                        threading.Event().wait(0.002)  # let DuckDB write
            data = np.frombuffer(buffer, dtype=np.uint8, count=read)
            new_ends = np.flatnonzero(np.equal(data[filled:read], LINE[0], out=is_line_end[:read - filled]))
            new_ends += filled
            if bodies:
                data[new_ends] = ord(",")
            del data  # no view of the buffer may outlive the chunk: it is moved and may grow
            ends = np.concatenate((ends, new_ends))
            # (the buffer's newlines may be commas by now: the positions tell where lines end)
            if eof and read and (not len(ends) or ends[-1] != read - 1):
                raise ValueError(f"{payloads}: the last line is incomplete")
            count, line, offset = len(ends), 0, 0
            with memoryview(buffer) as view:
                while line < count:
                    # Lines line..stop-1 fit when the last one ends within max_bytes - 2 (the brackets) of the start.
                    fitting = int(np.searchsorted(ends, offset + max_bytes - 2, side="right"))
                    stop = min(count, line + max_items, max(line + 1, fitting))
                    if stop == count and stop - line < max_items and not eof:
                        break  # the next lines may still fit in this batch
                    end = int(ends[stop - 1])
                    if bodies:
                        batch: bytes | list[bytes] = b"".join((b"[", view[offset:end], b"]"))
                    else:
                        batch = bytes(view[offset:end]).split(LINE)
                    yield first_line, stop - line, batch
                    first_line += stop - line
                    line, offset = stop, end + 1
            buffer[:read - offset] = buffer[offset:read]  # the lines held over go to the front
            filled = read - offset
            ends = ends[line:] - offset


IN_FLIGHT_REASON = "in flight when a push was interrupted or killed: the service may or may not have it"
JOURNAL_COLUMNS = "{'kind': 'VARCHAR', 'batch': 'BIGINT', 'first': 'BIGINT', 'count': 'BIGINT', " \
                  "'reason': 'VARCHAR', 'complete': 'VARCHAR'}"


def _apply(warehouse: AnyWarehouse, table: str, journal: Path, at_most_once: bool,
           logger: logging.Logger = log, applied_lines: int = 0) -> tuple[int, int, int, int]:
    """Apply a journal, of this version (a few lines a batch) or of an earlier one (a line an item).
    `applied_lines`: the snapshot's lines before it were applied already, during the push (not scanned again)."""
    ids = journal.with_suffix(IDS)
    if not journal.exists():
        ids.unlink(missing_ok=True)
        return 0, 0, 0, 0
    with open(journal, "rb") as file:
        first_line = file.readline()
    if not first_line:  # killed before its first batch
        journal.unlink()
        ids.unlink(missing_ok=True)
        return 0, 0, 0, 0
    if not (first_line.startswith(b"inflight\t") and first_line.endswith(b"\t.\n")):
        return _apply_legacy(warehouse, table, journal, at_most_once)
    if not ids.exists():
        # Its ids file is deleted only after the journal, and is fsynced (with its folder) before the journal
        # is written: this journal was applied already (a copy put back), so there is nothing left to apply.
        logger.warning(f"{table}: journal {journal.name} has no ids file {ids.name}: it was applied already")
        journal.unlink()
        return 0, 0, 0, 0
    return _apply_batches(warehouse, table, journal, ids, at_most_once, applied_lines)


def _apply_batches(warehouse: AnyWarehouse, table: str, journal: Path, ids: Path, at_most_once: bool,
                   first_line: int = 0, last_line: int | None = None,
                   finish: bool = True) -> tuple[int, int, int, int]:
    """Mark the items of the journal's settled batches sent, rejected or in doubt where still pending, then delete
    the journal and its ids file.

    A batch journaled `inflight` that never settled becomes `in_doubt` when `at_most_once`, else stays pending
    with a `sent_at` (it may have reached the service). Returns (sent, rejected, in doubt, in flight unsettled). Idempotent: applying a journal twice changes
    nothing more.

    Only the snapshot's lines `first_line` to `last_line` (exclusive; None: to the end) are applied. With
    `finish=False` (a window applied while the push is still sending later batches) only batches that settled
    are applied, unsettled ones are never taken for in doubt, the journal is kept and nothing is counted.
    """
    # Lines are `kind<TAB>batch<TAB>first<TAB>count<TAB>reason<TAB>.`: `inflight` (the batch's first line in the
    # snapshot and its item count), `rejected` (first = the refused item's position in the batch), then `sent`,
    # `in_doubt` or `failed` once the batch settled. A line torn by an operating-system crash lacks the final
    # `.` and is ignored. Ids come from the snapshot's ids file: line n of the payloads is its row n.
    with warehouse.write() as con:
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE outbox_journal AS
            SELECT kind, batch, first, count, reason FROM read_csv(
                $journal, delim = '\t', quote = '', escape = '', header = false, auto_detect = false,
                null_padding = true, ignore_errors = true, columns = {JOURNAL_COLUMNS})
            WHERE complete = '.'""", {"journal": str(journal)})
        try:
            con.execute("""
                CREATE OR REPLACE TEMP TABLE outbox_batches AS
                SELECT i.batch, i.first, i.count, coalesce(s.kind, 'unsettled') AS outcome, s.reason
                FROM (SELECT batch, any_value(first) AS first, any_value(count) AS count FROM outbox_journal
                      WHERE kind = 'inflight' AND first IS NOT NULL AND count IS NOT NULL GROUP BY batch) i
                LEFT JOIN (SELECT batch, any_value(kind) AS kind, any_value(reason) AS reason FROM outbox_journal
                           WHERE kind IN ('sent', 'in_doubt', 'failed') GROUP BY batch) s USING (batch)""")
            settled, in_doubt, unsettled, rejected = con.execute("""
                SELECT coalesce(sum(count) FILTER (outcome = 'sent'), 0)::BIGINT,
                       coalesce(sum(count) FILTER (outcome = 'in_doubt'), 0)::BIGINT,
                       coalesce(sum(count) FILTER (outcome = 'unsettled'), 0)::BIGINT,
                       (SELECT count(DISTINCT (r.batch, r.first)) FROM outbox_journal r JOIN outbox_batches b
                        USING (batch) WHERE r.kind = 'rejected' AND b.outcome = 'sent')
                FROM outbox_batches""").fetchone()
            sent = settled - rejected
            if sent + rejected + in_doubt + (unsettled if finish else 0):
                outcomes = "('sent', 'in_doubt', 'unsettled')" if finish else "('sent', 'in_doubt')"
                # Consecutive batches with the same outcome become one range of lines (most pushes: one range),
                # so lines find their outcome by a range join with a few rows, not a join per line.
                con.execute(f"""
                    CREATE OR REPLACE TEMP TABLE outbox_ranges AS
                    SELECT outcome, reason, min(first) AS lo, max(first + count) AS hi
                    FROM (SELECT *, sum(starts) OVER (ORDER BY first) AS island
                          FROM (SELECT *, CASE WHEN lag(first + count) OVER w = first AND lag(outcome) OVER w = outcome
                                                    AND lag(reason) OVER w IS NOT DISTINCT FROM reason
                                               THEN 0 ELSE 1 END AS starts
                                FROM outbox_batches WHERE outcome IN {outcomes} WINDOW w AS (ORDER BY first)))
                    GROUP BY island, outcome, reason;
                    CREATE OR REPLACE TEMP TABLE outbox_rejected AS
                    SELECT b.first + r.first AS line, any_value(r.reason) AS reason
                    FROM outbox_journal r JOIN outbox_batches b USING (batch)
                    WHERE r.kind = 'rejected' AND b.outcome = 'sent' GROUP BY ALL""")
                now = dt.datetime.now(dt.UTC)
                lines = con.execute("SELECT max(hi) FROM outbox_ranges").fetchone()[0] or 0
                if last_line is not None:
                    lines = min(lines, last_line)
                # Ids files of earlier versions hold no row numbers: their rows are found by id alone.
                by_row = con.execute("SELECT count(*) FROM parquet_schema($ids) WHERE name = 'row'",
                                     {"ids": str(ids)}).fetchone()[0] > 0
                # A window of lines per UPDATE, each committed on its own (peak memory ~30 MB lower at 1M lines
                # than one UPDATE, for ~0.1 CPU-s more). Safe to stop between two: only rows still pending change,
                # and the journal is deleted after the last.
                for first in range(first_line, lines, APPLY_LINES):
                    _apply_window(con, table, ids, first, min(first + APPLY_LINES, lines), by_row, now,
                                  "in_doubt" if at_most_once else "pending")
        finally:
            con.execute("DROP TABLE IF EXISTS outbox_journal; DROP TABLE IF EXISTS outbox_batches; "
                        "DROP TABLE IF EXISTS outbox_ranges; DROP TABLE IF EXISTS outbox_rejected")
    if not finish:
        return 0, 0, 0, 0
    journal.unlink()
    ids.unlink(missing_ok=True)
    return sent, rejected, in_doubt + (unsettled if at_most_once else 0), unsettled


def _apply_window(con: duckdb.DuckDBPyConnection, table: str, ids: Path, first: int, last: int, by_row: bool,
                  now: dt.datetime, unsettled_status: str = "in_doubt") -> None:
    """Mark the items of the snapshot's lines first..last-1 that belong to settled batches (`outbox_rejected`,
    `outbox_ranges`; there, a batch that never settled gets `unsettled_status`: `in_doubt`, or `pending` with a
    `sent_at`), where still pending.

    A row is found first where the snapshot saw it, by its row number (`rowid`), and taken only if its id is the
    line's: an integer join over the window's part of the table, not a string join over the whole table (for a
    million rows ~0.55 CPU-s instead of ~0.85, measured alone; with the constants below, the UPDATE and its commit
    ~1.0 instead of ~1.6). Row numbers can change since the snapshot (a checkpoint compacts a table after
    deletes); then fewer rows are marked than the window has items, and the window is applied again by id, which
    changes only the rows still pending: the result is the same as by id alone (ids are unique in an outbox),
    whatever moved.
    """
    window = {"first": first, "last": last}
    ranges = con.execute("""
        SELECT outcome, reason, lo, hi FROM outbox_ranges WHERE lo < $last AND hi > $first""", window).fetchall()
    items = sum(min(hi, last) - max(lo, first) for _, _, lo, hi in ranges)
    if not items:
        return
    refused = con.execute("SELECT count(*) FROM outbox_rejected WHERE line >= $first AND line < $last",
                          window).fetchone()[0]
    lines = "read_parquet($ids, file_row_number = true) i"
    in_window = "i.file_row_number >= $first AND i.file_row_number < $last"
    if len(ranges) == 1 and not refused:
        # Most windows lie in one run of batches with one outcome: its status for every line, no join.
        outcome, reason, lo, hi = ranges[0]
        status, error = (unsettled_status, IN_FLIGHT_REASON) if outcome == "unsettled" else (outcome, reason)
        window = {"first": max(lo, first), "last": min(hi, last)}
        # Items all sent leave `error` as it is: NULL on every pending row (enqueue and each re-queue clear it).
        # One column fewer to write: ~0.1-0.2 CPU-s less per million rows; the status a constant, not a column
        # of the join: ~0.2 less.
        params: dict[str, object] = {**window, "now": now, "ids": str(ids), "status": status}
        assign = "status = $status,"
        if status not in ("sent", "pending"):  # a pending item's error stays NULL
            params["error"], assign = error, assign + " error = $error,"
        source = f"SELECT i.* FROM {lines} WHERE {in_window}"
    else:
        params = {**window, "now": now, "ids": str(ids), "unsettled": unsettled_status,
                  "in_flight": IN_FLIGHT_REASON if unsettled_status == "in_doubt" else None}
        assign = "status = a.status, error = a.error,"
        source = f"""SELECT i.*,
                            CASE WHEN r.reason IS NOT NULL THEN 'rejected'
                                 WHEN g.outcome = 'unsettled' THEN $unsettled ELSE g.outcome END AS status,
                            CASE WHEN r.reason IS NOT NULL THEN r.reason
                                 WHEN g.outcome = 'unsettled' THEN $in_flight ELSE g.reason END AS error
                     FROM {lines}
                     JOIN outbox_ranges g ON i.file_row_number >= g.lo AND i.file_row_number < g.hi
                     LEFT JOIN outbox_rejected r ON r.line = i.file_row_number
                     WHERE {in_window}"""

    # An item left pending (in flight, never answered) keeps its first sent_at and its attempts: it stays pending,
    # so applying the journal again (after a kill during the apply) would otherwise change it again.
    stamp = ("sent_at = CASE WHEN a.status = 'pending' THEN coalesce(o.sent_at, $now) ELSE $now END, "
             "attempts = o.attempts + CASE WHEN a.status = 'pending' THEN 0 ELSE 1 END")
    if len(ranges) == 1 and not refused:
        stamp = ("sent_at = coalesce(o.sent_at, $now)" if params["status"] == "pending"
                 else "sent_at = $now, attempts = o.attempts + 1")

    def update(match: str, bounds: dict | None = None) -> int:
        return con.execute(f"""
            UPDATE {table} AS o
            SET {assign} {stamp}
            FROM ({source}) a
            WHERE {match} AND o.status = 'pending'""", {**params, **(bounds or {})}).fetchone()[0]

    if by_row:
        first_row, last_row = con.execute(f"SELECT min(i.row), max(i.row) FROM {lines} WHERE {in_window}",
                                          {"ids": str(ids), **window}).fetchone()
        # The bounds let DuckDB skip the table's other row groups. `IS TRUE` keeps the id comparison out of the
        # join's hash (an integer join, then one string comparison per matched row).
        if update("o.rowid = a.row AND (o.id = a.id) IS TRUE AND o.rowid BETWEEN $first_row AND $last_row",
                  {"first_row": first_row, "last_row": last_row}) == items:
            return
    update("o.id = a.id")


def _apply_legacy(warehouse: AnyWarehouse, table: str, journal: Path, at_most_once: bool) -> tuple[int, int, int, int]:
    """Apply a journal in the one-line-per-id format of earlier versions (left by a push that crashed before an
    upgrade). Same rules and return value as `_apply_batches`."""
    # Lines are `id<TAB>status[<TAB>detail]` (detail: the reason, or an inflight id's batch number); settle markers
    # `sent n c` / `failed n c` have no tab.
    with warehouse.write() as con:
        con.execute("""
            CREATE OR REPLACE TEMP TABLE outbox_journal AS
            SELECT * FROM read_csv($journal, delim = '\t', quote = '', escape = '', header = false,
                                   auto_detect = false, null_padding = true, ignore_errors = true,
                                   columns = {'id': 'VARCHAR', 'status': 'VARCHAR', 'detail': 'VARCHAR'})""",
                    {"journal": str(journal)})
        try:
            con.execute("""
                CREATE OR REPLACE TEMP TABLE outbox_unsettled AS
                SELECT id FROM outbox_journal
                WHERE status = 'inflight' AND detail NOT IN (
                    SELECT split_part(id, ' ', 2) FROM outbox_journal
                    WHERE status IS NULL AND split_part(id, ' ', 1) IN ('sent', 'failed'))""")
            sent, rejected, in_doubt, unsettled = con.execute("""
                SELECT count(*) FILTER (status = 'sent'), count(*) FILTER (status = 'rejected'),
                       count(*) FILTER (status = 'in_doubt'), (SELECT count(*) FROM outbox_unsettled)
                FROM outbox_journal""").fetchone()
            unsettled_sql = ("UNION ALL SELECT id, 'in_doubt', $reason FROM outbox_unsettled" if at_most_once
                             else "UNION ALL SELECT id, 'pending', NULL FROM outbox_unsettled")
            con.execute(f"""
                UPDATE {table} AS o SET status = a.status, error = a.detail,
                    sent_at = CASE WHEN a.status = 'pending' THEN coalesce(o.sent_at, $now) ELSE $now END,
                    attempts = o.attempts + CASE WHEN a.status = 'pending' THEN 0 ELSE 1 END
                FROM (SELECT id, status, detail FROM outbox_journal WHERE status IN ('sent', 'rejected', 'in_doubt')
                      {unsettled_sql}) a
                WHERE o.id = a.id AND o.status = 'pending'""",
                {"now": dt.datetime.now(dt.UTC), **({"reason": IN_FLIGHT_REASON} if at_most_once else {})})
        finally:
            con.execute("DROP TABLE IF EXISTS outbox_journal; DROP TABLE IF EXISTS outbox_unsettled")
    journal.unlink()
    return sent, rejected, in_doubt + (unsettled if at_most_once else 0), unsettled


def acknowledged(journal: Path) -> tuple[int, int]:
    """(batches, items) a push's journal records as answered by the service so far: to watch a push from outside
    (tests that kill one part way)."""
    counts: dict[str, int] = {}
    batches = items = 0
    for line in journal.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) == 6 and fields[5] == "." and fields[0] == "inflight":
            counts[fields[1]] = int(fields[3])
        elif len(fields) == 6 and fields[5] == "." and fields[0] == "sent":
            batches, items = batches + 1, items + counts.get(fields[1], 0)
    return batches, items


def _work_dir(work_dir: Path, table: str) -> Path:
    path = Path(work_dir) / table.replace(".", "_")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _outbox_lock(work_dir: Path, table: str, logger: logging.Logger) -> Iterator[Path]:
    """This outbox's work folder, locked for as long as a push or a recovery uses it (an flock on the folder).

    A journal in the folder is either a live push's or a dead one's; only with the lock held is it surely dead.
    Without it, a second run's recovery (Dagster's pools keep such runs apart, but a run on an instance without
    pools does not) took a live push's journal for an interrupted one: it marked the batches in flight in doubt
    and deleted the journal, so what the live push then sent stayed pending and was sent again. The lock is the
    kernel's: a process that dies, even by SIGKILL, releases it.
    """
    folder = _work_dir(work_dir, table)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(f"{table}: another push of this outbox is running; waiting for it to end")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield folder
    finally:
        os.close(descriptor)


def recover(warehouse: AnyWarehouse, table: str, work_dir: Path, logger: logging.Logger | None = None, *,
            at_most_once: bool = False) -> PushReport:
    """Apply what an interrupted push of `table` journaled (push does this first; call it yourself before
    changing pending rows, so a row the service already holds is never taken for unsent). Waits for a push of
    the same outbox running meanwhile to end: its journal is not an interrupted push's."""
    logger = logger or log
    with _outbox_lock(work_dir, table, logger) as folder:
        return _recover(warehouse, table, folder, logger, at_most_once)


def _recover(warehouse: AnyWarehouse, table: str, work_dir: Path, logger: logging.Logger,
             at_most_once: bool) -> PushReport:
    """`recover` with the outbox's lock held (`work_dir` is the outbox's own folder)."""
    report = PushReport()
    for journal in sorted(work_dir.glob(f"*{JOURNAL}")):
        sent, rejected, in_doubt, in_flight = _apply(warehouse, table, journal, at_most_once, logger)
        report.recovered_sent += sent
        report.recovered_rejected += rejected
        report.recovered_in_doubt += in_doubt
        report.in_flight_at_crash += in_flight
        if in_flight and at_most_once:
            logger.warning(f"{table}: an earlier push was interrupted or killed with {in_flight} items in flight; "
                           "they are marked in_doubt and not sent again (the service may or may not have them)")
        elif in_flight:
            logger.warning(f"{table}: an earlier push was interrupted with {in_flight} items in flight; "
                           "they are sent again (the service dedupes them)")
    for leftover in work_dir.iterdir():  # snapshots, ids files of no journal: nothing went out with them
        leftover.unlink()
    return report


class _Journal:
    """Appends with one unbuffered write each (in the file, safe from a killed process, as soon as it returns);
    a thread fsyncs what was written, so no send waits on the disk.

    What an operating-system crash (not a killed process) could lose is the last milliseconds of lines: a lost
    outcome makes its batch count as in flight (in doubt, with at most once), never as unsent; but a lost
    `inflight` line makes its batch count as never sent, though its request may have gone out. The README's
    guarantees cover a killed or interrupted run, not a machine crash. Waiting for the fsync of each `inflight`
    line before its request (one thread's group commit) was measured and not kept: during a push of 1M events
    1,019 fsyncs took 1.1 ms median, 3.7 ms at p90 on this machine's disk, and against the counting sink the
    sends took ~10% longer (three alternating runs each, load ~6: 6.5-6.9 s against 5.4-6.3 s)."""

    def __init__(self, path: Path):
        self.descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.written, self.closing = threading.Event(), False
        self.flusher = threading.Thread(target=self._flush, name=f"journal-{path.name}", daemon=True)
        self.flusher.start()

    def write(self, text: str) -> None:
        os.write(self.descriptor, text.encode())
        self.written.set()

    def _flush(self) -> None:
        while True:
            self.written.wait()
            self.written.clear()
            closing = self.closing
            os.fsync(self.descriptor)
            if closing:
                return

    def close(self) -> None:
        self.closing = True
        self.written.set()
        self.flusher.join()
        os.close(self.descriptor)


class _Applier(threading.Thread):
    """Applies the journal's lines of settled batches while the push sends later ones, a window of at least
    OVERLAP_LINES at a time, so that at the end only the last lines remain to apply; only while the sends still
    have OVERLAP_MIN_SECONDS to go at their pace so far (else the window would not hide behind them).

    It applies only lines that the push told it are settled (every batch up to them answered and journaled),
    and only once the snapshot's read is over (the write waits for no reader of this process). A window it
    applied is only an early copy of what the final apply would do: a push killed afterwards leaves its journal,
    whose next application changes nothing on those rows (only pending rows change)."""

    def __init__(self, warehouse: AnyWarehouse, table: str, journal: Path, ids: Path, at_most_once: bool,
                 snapshot_done: threading.Event, lines: int, logger: logging.Logger):
        super().__init__(name=f"apply-{table}", daemon=True)
        self.warehouse, self.table, self.journal, self.ids = warehouse, table, journal, ids
        self.at_most_once, self.snapshot_done, self.lines, self.logger = at_most_once, snapshot_done, lines, logger
        self.changed = threading.Condition()
        self.settled = self.applied = 0  # lines: settled by the push, applied to the table
        self.closing = False
        self.first_settled: tuple[float, int] | None = None  # when the first batches settled, and their lines

    def sends_left_seconds(self) -> float:
        """How long the sends of the lines not settled yet should take at their pace since the first answer (a
        stall slows the pace, so a window is applied while the sends wait)."""
        if self.first_settled is None:
            return float("inf")
        since, lines = self.first_settled
        pace = (self.settled - lines) / max(time.monotonic() - since, 1e-3)
        return (self.lines - self.settled) / pace if pace else float("inf")

    def settle(self, lines: int) -> None:
        with self.changed:
            if self.first_settled is None:
                self.first_settled = (time.monotonic(), lines)
            self.settled = lines
            self.changed.notify()

    def run(self) -> None:
        while True:
            with self.changed:
                while not self.closing and not (self.snapshot_done.is_set()
                                                and self.settled - self.applied >= OVERLAP_LINES
                                                and self.sends_left_seconds() >= OVERLAP_MIN_SECONDS):
                    self.changed.wait(0.05)  # the snapshot's end is an Event of its own, the pace changes: look again
                if self.closing:
                    return
                first, last = self.applied, self.settled
            try:
                _apply_batches(self.warehouse, self.table, self.journal, self.ids, self.at_most_once,
                               first, last, finish=False)
            except Exception as exc:  # the final apply does the rest, and raises if the warehouse stays unwritable
                self.logger.warning(f"{self.table}: applying acknowledgements while sending failed ({exc}); "
                                    "they are applied at the end of the push")
                return
            self.applied = last

    def close(self) -> int:
        """Stop after the window being applied (if any); returns the lines applied."""
        with self.changed:
            self.closing = True
            self.changed.notify()
        self.join()
        return self.applied


class _Snapshot(threading.Thread):
    """A read of one state of the table: the pending ids to a Parquet file (fsynced before `ids_ready` is set) and
    their payloads, in the same order, to a text file that the push reads while it is written (on a DuckDB file,
    both at once; on a lake, in one transaction, one after the other)."""

    def __init__(self, warehouse: AnyWarehouse, table: str, where: str, params: dict, ids: Path, payloads: Path):
        super().__init__(name=f"snapshot-{table}", daemon=True)
        self.warehouse, self.table, self.where, self.params = warehouse, table, where, params
        self.ids, self.payloads = ids, payloads
        self.ids_ready, self.done = threading.Event(), threading.Event()
        self.count: int | None = None
        self.error: BaseException | None = None
        self.connection: duckdb.DuckDBPyConnection | None = None
        self.payloads_copy: _PayloadsCopy | None = None
        self.stopped = False

    def run(self) -> None:
        try:
            # An instance of the snapshot's own (a private one on a file, one kept for snapshots on a lake): the
            # SNAPSHOT_SETTINGS apply to a whole DuckDB instance, and the warehouse's shared one keeps its own.
            with self.warehouse.read(settings=SNAPSHOT_SETTINGS) as con:
                self.connection = con
                # On a DuckDB file opened read-only nothing can change the table while it is open (DuckDB's file
                # lock keeps every writer out), so the payloads are copied on a second connection at the same time
                # as the ids: the sends, which wait for the ids, then find payloads written already (the COPYs
                # one after the other left a core idle ~0.3 s per million). A lake's catalog can change between two
                # transactions: there both COPYs run in one, one after the other.
                payloads_copy = _PayloadsCopy(self, con.cursor()) if self.warehouse.kind == "duckdb" else None
                self.payloads_copy = payloads_copy
                try:
                    con.execute("BEGIN TRANSACTION")
                    # Uncompressed: ids (hashes, mostly) gain little from compression, and the COPY costs ~40% less.
                    self.count = con.execute(
                        f"COPY (SELECT rowid AS row, id FROM {self.table} WHERE {self.where}) TO {sql_path(self.ids)} "
                        "(FORMAT parquet, COMPRESSION uncompressed)", self.params).fetchone()[0]
                    for durable in (self.ids, self.ids.parent):  # the journal will name its lines: they must
                        descriptor = os.open(durable, os.O_RDONLY)  # outlive an operating-system crash too
                        try:
                            os.fsync(descriptor)
                        finally:
                            os.close(descriptor)
                    self.ids_ready.set()
                    if payloads_copy is None and self.count:
                        written = self.copy_payloads(con)
                    elif payloads_copy is not None:
                        written = payloads_copy.result()
                    con.execute("COMMIT")
                finally:
                    if payloads_copy is not None:
                        payloads_copy.stop()
                if self.count and written != self.count:
                    raise RuntimeError(f"outbox {self.table}: the snapshot read {self.count} ids and {written} "
                                       "payloads")
        except BaseException as exc:
            # An interruption the push asked for is not the snapshot's failure; any other error is, even when
            # the push stopped meanwhile (its own error, e.g. the payloads file gone, may be this one's effect).
            if not (self.stopped and isinstance(exc, duckdb.InterruptException)):
                self.error = exc
        finally:
            self.connection = self.payloads_copy = None
            self.ids_ready.set()
            self.done.set()

    def copy_payloads(self, con: duckdb.DuckDBPyConnection) -> int:
        # A newline inside a payload would split it into two lines: refuse it before it is written.
        return con.execute(
            f"""COPY (SELECT CASE WHEN contains(payload, chr(10))
                             THEN error('outbox {self.table}: item ' || id || ' has a newline in its '
                                        || 'payload (payloads are JSON, one a line)')
                             ELSE payload END
                      FROM {self.table} WHERE {self.where})
                TO {sql_path(self.payloads)} (FORMAT csv, HEADER false, QUOTE '', ESCAPE '')""",
            self.params).fetchone()[0]

    def stop(self) -> None:
        self.stopped = True
        connection = self.connection
        if connection is not None and not self.done.is_set():
            with contextlib.suppress(Exception):  # already closing: nothing left to stop
                connection.interrupt()
        payloads_copy = self.payloads_copy
        if payloads_copy is not None and payloads_copy.is_alive():
            with contextlib.suppress(Exception):
                payloads_copy.cursor.interrupt()
        self.join()


class _PayloadsCopy(threading.Thread):
    """The snapshot's payloads COPY on a connection of its own, in its own transaction (see `_Snapshot.run`)."""

    def __init__(self, snapshot: _Snapshot, cursor: duckdb.DuckDBPyConnection):
        super().__init__(name=f"{snapshot.name}-payloads", daemon=True)
        self.snapshot, self.cursor = snapshot, cursor
        self.written: int | None = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.cursor.execute("BEGIN TRANSACTION")
            self.written = self.snapshot.copy_payloads(self.cursor)
            self.cursor.execute("COMMIT")
        except BaseException as exc:
            self.error = exc

    def result(self) -> int:
        self.join()
        if self.error is not None:
            raise self.error
        return cast(int, self.written)

    def stop(self) -> None:
        """Interrupt the COPY if it still runs (the ids COPY failed, or the push stopped), then close."""
        if self.is_alive():
            with contextlib.suppress(Exception):
                self.cursor.interrupt()
        self.join()
        with contextlib.suppress(Exception):
            self.cursor.close()


def push(warehouse: AnyWarehouse, table: str, send: Send, work_dir: Path, *,
         scope: str | None = None, max_items: int = 1000, max_bytes: int = 1 << 21, concurrency: int = 4,
         logger: logging.Logger | None = None, scopes: list[str] | None = None,
         at_most_once: bool = False) -> PushReport:
    """Send every pending row of `table` (of one scope, of the `scopes` listed, or all) and mark what the
    service acknowledged.

    `send` gets the payloads of one batch (a BodySender: its request body) and returns a BatchOutcome; it raises
    to fail the batch (after its own retries). OutcomeUnknown marks the batch in_doubt and stops sending new
    batches (a service that answers so is not healthy), without failing the push. A FatalPushError, or any other
    exception, stops the push: batches already settled stay so, the rest stay pending for the next run (or, with
    `at_most_once`, in_doubt if they were in flight).
    """
    logger = logger or log
    # Held from the recovery to the final apply: a second push of this outbox waits (a live push's journal is
    # never taken for a dead one's, and the two never snapshot the same pending rows).
    with _outbox_lock(work_dir, table, logger) as folder:
        return _push(warehouse, table, send, folder, scope=scope, max_items=max_items, max_bytes=max_bytes,
                     concurrency=concurrency, logger=logger, scopes=scopes, at_most_once=at_most_once)


def _push(warehouse: AnyWarehouse, table: str, send: Send, work_dir: Path, *, scope: str | None, max_items: int,
          max_bytes: int, concurrency: int, logger: logging.Logger, scopes: list[str] | None,
          at_most_once: bool) -> PushReport:
    """`push` with the outbox's lock held (`work_dir` is the outbox's own folder)."""
    report = _recover(warehouse, table, work_dir, logger, at_most_once)
    name = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    journal_path = work_dir / f"{name}{JOURNAL}"
    payloads_path = work_dir / f"{name}.payloads"
    where, params = "status = 'pending'", dict[str, object]()
    if scope is not None:
        where, params = where + " AND scope = $scope", {"scope": scope}
    elif scopes is not None:
        where, params = where + " AND list_contains($scopes, scope)", {"scopes": list(scopes)}
    snapshot = _Snapshot(warehouse, table, where, params, journal_path.with_suffix(IDS), payloads_path)
    snapshot.start()
    snapshot.ids_ready.wait()
    if snapshot.error is not None or not snapshot.count:
        snapshot.join()
        for unused in (journal_path.with_suffix(IDS), payloads_path):  # nothing was sent
            unused.unlink(missing_ok=True)
        if snapshot.error is not None:
            raise snapshot.error
        return report
    report.considered = snapshot.count
    bodies = isinstance(send, BodySender)

    journal = _Journal(journal_path)
    applier = _Applier(warehouse, table, journal_path, journal_path.with_suffix(IDS), at_most_once, snapshot.done,
                       snapshot.count, logger)
    applier.start()
    failure: BaseException | None = None
    # Set when no new batch may be sent: a batch in doubt, a failed one, or the push itself stopping.
    stopping = threading.Event()
    # Batches cut ahead of the senders: each sender takes the next one itself as soon as its request is answered
    # and journals it, instead of waiting for this thread to be scheduled, settle it and cut the next (a hand-over
    # per batch through one thread, as a plain client has none). A batch waiting here was not sent and is not
    # journaled: a push stopped now leaves it pending, never in doubt.
    ready: queue.Queue[tuple[int, int, int, bytes | list[bytes]] | None] = queue.Queue(maxsize=concurrency)
    lines_read = 0
    settling = threading.Lock()  # the senders settle batches: journal outcome, counts, the applier's progress
    # Batches settle out of order; the applier gets the lines of the longest run of settled batches from the first.
    settled_ends: dict[int, int] = {}
    next_unsettled = 0

    def settle(number: int, first: int, count: int, outcome: BatchOutcome | BaseException) -> None:
        nonlocal next_unsettled
        journal_outcome(number, count, outcome)  # written before the applier may read it
        settled_ends[number] = first + count
        if next_unsettled in settled_ends:
            while next_unsettled in settled_ends:
                settled_lines = settled_ends.pop(next_unsettled)
                next_unsettled += 1
            applier.settle(settled_lines)

    def journal_outcome(number: int, count: int, outcome: BatchOutcome | BaseException) -> None:
        nonlocal failure
        if isinstance(outcome, OutcomeUnknown):
            journal.write(f"in_doubt\t{number}\t\t\t{' '.join(str(outcome).split())}\t.\n")
            stopping.set()
            report.in_doubt += count
            logger.warning(f"{table}: a batch of {count} items is in doubt ({outcome}); it is held, not resent")
            return
        if isinstance(outcome, BaseException):
            journal.write(f"failed\t{number}\t\t\t\t.\n")
            stopping.set()
            failure = failure or outcome
            return
        rejected = outcome.rejected
        journal.write("".join(f"rejected\t{number}\t{position}\t\t{' '.join(reason.split())}\t.\n"
                              for position, reason in rejected.items()) + f"sent\t{number}\t\t\t\t.\n")
        report.batches += 1
        report.rejected += len(rejected)
        report.sent += count - len(rejected)

    def sender() -> None:
        nonlocal failure
        while (item := ready.get()) is not None:
            number, first, count, batch = item
            if stopping.is_set():
                continue  # not sent: stays pending
            try:
                # Written before the request (the kernel keeps it if this process is killed): after a crash, this
                # batch is what may have reached the service.
                journal.write(f"inflight\t{number}\t{first}\t{count}\t\t.\n")
                outcome: BatchOutcome | BaseException
                try:
                    # `bodies` made each batch a body for a BodySender and a list of payloads otherwise.
                    outcome = (send.send(cast(bytes, batch), count) if isinstance(send, BodySender)
                               else send(cast(list, batch)))
                except BaseException as exc:
                    outcome = exc
                del batch
                with settling:
                    settle(number, first, count, outcome)
            except BaseException as exc:  # the journal could not be written: stop (an unsettled batch stays so)
                with settling:
                    failure = failure or exc
                stopping.set()

    senders = [threading.Thread(target=sender, name=f"push-{table}_{n}", daemon=True) for n in range(concurrency)]
    try:
        for thread in senders:
            thread.start()
        try:
            while not payloads_path.exists() and not snapshot.done.is_set():
                snapshot.done.wait(0.002)  # DuckDB creates the payloads file as its COPY starts
            batches = _batches(payloads_path, max_items, max_bytes, bodies, snapshot.done.is_set)
            for number, (first, count, batch) in enumerate(batches):
                if stopping.is_set():
                    break
                ready.put((number, first, count, batch))
                lines_read = first + count
            else:
                if snapshot.error is None and lines_read != snapshot.count:
                    raise RuntimeError(f"outbox {table}: the snapshot holds {snapshot.count} items but its "
                                       f"payloads file {lines_read} lines")
        except BaseException as exc:
            with settling:
                failure = failure or exc
            stopping.set()
        finally:
            # The senders end their requests in flight, skip the batches cut ahead if stopping, and exit.
            for _ in senders:
                ready.put(None)
            for thread in senders:
                thread.join()
    finally:
        snapshot.stop()
        applied = applier.close()
        journal.close()
        payloads_path.unlink(missing_ok=True)
        # Record what went through, even when the push failed part way.
        _apply(warehouse, table, journal_path, at_most_once, logger, applied_lines=applied)
    failure = snapshot.error or failure  # a snapshot that failed is the cause of what followed
    if failure is not None:
        raise failure
    return report
