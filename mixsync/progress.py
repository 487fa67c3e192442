"""Progress of long work (downloads, backfills, pushes) as log lines, at most one every few seconds."""

from __future__ import annotations

import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path

from mixsync.settings import parse_int
from mixsync.warehouse.outbox import BatchOutcome, BodySender, Send

DEFAULT_PROGRESS_SECONDS = 10
# Bytes of a body read at a time when its lines are counted.
COUNT_BLOCK_BYTES = 1 << 20


def progress_seconds(environ: Mapping[str, str] | None = None) -> float:
    """MIXSYNC_PROGRESS_SECONDS: the least time between two progress lines of one piece of work (0: every step)."""
    return parse_int(os.environ if environ is None else environ, "MIXSYNC_PROGRESS_SECONDS",
                     DEFAULT_PROGRESS_SECONDS, minimum=0, maximum=3600)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Throttle:
    """True at most once per `interval` seconds of `clock` (the first call is always due)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last: float | None = None
        self._lock = threading.Lock()

    def due(self) -> bool:
        with self._lock:
            now = self.clock()
            if self._last is not None and now - self._last < self.interval:
                return False
            self._last = now
            return True


class LineCounter:
    """Counts the lines of a body as its raw chunks arrive, gunzipping on the way when the body is gzip.

    Only newlines are counted (C-speed `bytes.count`); nothing is parsed: DuckDB parses the file later.
    """

    def __init__(self, gzipped: bool):
        self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
        self.lines = 0

    def feed(self, chunk: bytes) -> None:
        if self._inflate is not None:
            try:
                chunk = self._inflate.decompress(chunk)
            except zlib.error:
                # A damaged body is DuckDB's to report; the count just stops growing.
                self._inflate = None
                return
            # A gzip body may hold several members (concatenated streams); each restarts the decoder.
            while self._inflate.eof and self._inflate.unused_data:
                rest = self._inflate.unused_data
                self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self.lines += chunk.count(b"\n")
                chunk = self._inflate.decompress(rest)
        self.lines += chunk.count(b"\n")


class DownloadProgress:
    """Bytes and lines of one download so far, logged every `interval` seconds: `<what>: 12.3 MB, 45,678 lines`.

    Lines are counted only when a line is due, from the body already on disk: a gzip body must be inflated to be
    counted (Python's zlib: ~1.5 s of CPU per 400 MB of JSON), and a download that ends before its first progress
    line never pays for that. When a line is due, every byte received so far is counted, so the figure is exact.
    """

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, what: str, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.what = what
        self.clock = clock
        self.throttle = Throttle(progress_seconds() if interval is None else interval, clock)
        self.throttle.due()  # nothing to say at the start: the first line comes after one interval
        self.started = clock()
        self.bytes = 0
        self._body: Path | None = None
        self._counted = 0
        self._lines: LineCounter | None = None

    def start(self, gzipped: bool, body: Path) -> None:
        """A (new) response begins, written to `body`: a retried request counts from zero again."""
        self.bytes = 0
        self._body = body
        self._counted = 0
        self._lines = LineCounter(gzipped)

    def advance(self, received: int, flush: Callable[[], None] | None = None) -> None:
        """`received` more bytes of the body are written; `flush` puts them on disk, called only when a line is due."""
        self.bytes += received
        if self.throttle.due():
            if flush is not None:
                flush()
            self._count_lines()
            self.logger.info(self.line())

    def _count_lines(self) -> None:
        if self._body is None or self._lines is None or self._counted >= self.bytes:
            return
        with open(self._body, "rb") as body:
            body.seek(self._counted)
            while self._counted < self.bytes:
                block = body.read(min(COUNT_BLOCK_BYTES, self.bytes - self._counted))
                if not block:
                    break
                self._lines.feed(block)
                self._counted += len(block)

    @property
    def lines(self) -> int:
        """Lines in the first `counted_bytes` bytes of the body (all bytes received when the last line was due)."""
        return self._lines.lines if self._lines is not None else 0

    @property
    def counted_bytes(self) -> int:
        return self._counted

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        return (f"{self.what}: {self.bytes / 1e6:,.1f} MB, {self.lines:,} lines so far "
                f"({self.bytes / 1e6 / elapsed:,.1f} MB/s, {_duration(elapsed)})")


class CountProgress:
    """Units of work done of a known total (windows, items), with an estimate of the time left. `batched`: each
    `advance` is one batch, and the line says how many were sent and about how many remain.

    Thread-safe: push workers call `advance` as their batches are acknowledged. Lines are throttled by time,
    except the last one (`done == total`), which is always logged.
    """

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, what: str, total: int, unit: str,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic, batched: bool = False):
        self.logger = logger
        self.batched = batched
        self.what = what
        self.total = total
        self.unit = unit
        self.clock = clock
        self.throttle = Throttle(progress_seconds() if interval is None else interval, clock)
        self.throttle.due()
        self.started = clock()
        self.done = 0
        self.batches = 0
        self._lock = threading.Lock()

    def advance(self, units: int = 1, note: str = "") -> None:
        with self._lock:
            self.done += units
            self.batches += 1
            finished = self.done >= self.total
            due = self.throttle.due()
            if finished or due:
                self.logger.info(self.line(note))

    def eta_seconds(self) -> float | None:
        if self.done <= 0:
            return None
        elapsed = self.clock() - self.started
        return elapsed / self.done * max(self.total - self.done, 0)

    def line(self, note: str = "") -> str:
        remaining = max(self.total - self.done, 0)
        eta = self.eta_seconds()
        text = f"{self.what}: {self.done:,} of {self.total:,} {self.unit} done, {remaining:,} remaining"
        if self.batched and self.batches:
            per_batch = self.done / self.batches
            text += f" ({self.batches:,} batches sent, about {int(-(-remaining // max(per_batch, 1))):,} to go)"
        if remaining and eta is not None:
            text += f", about {_duration(eta)} left"
        return text + (f"; {note}" if note else "")


def reporting_sends(send: Send, progress: CountProgress) -> Send:
    """Wrap an outbox push's `send` (a callable taking the payloads, or a BodySender): each batch the service
    answered advances `progress` by its items."""
    if isinstance(send, BodySender):

        def send_body_and_report(body: bytes, count: int) -> BatchOutcome:
            outcome = send.send(body, count)
            progress.advance(count)
            return outcome

        return BodySender(send_body_and_report)

    def send_and_report(payloads: list[bytes]) -> BatchOutcome:
        outcome = send(payloads)
        progress.advance(len(payloads))
        return outcome

    return send_and_report
