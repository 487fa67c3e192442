"""What tests share for waiting on real processes and sockets: a poll with a deadline (never a bare sleep), free
loopback ports, and stopping a child that may still run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(condition: Callable[[], T], seconds: float, what: str, interval: float = 0.05) -> T:
    """Call `condition` until it returns something truthy, and return that; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"gave up after {seconds}s waiting for {what}")


def sigkill_when(process: subprocess.Popen, ready: Callable[[], object], seconds: float, what: str) -> None:
    """SIGKILL `process` as soon as `ready()` is truthy (polled with a deadline), and wait for it; fail if the
    process ended first (it finished before the moment the test needs it killed at)."""
    poll(lambda: process.poll() is not None or ready(), seconds, what)
    assert process.poll() is None, f"the process ended before {what}"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def run_and_sigkill(script: str, ready: Callable[[], object], seconds: float, what: str,
                    release: Callable[[], None]) -> None:
    """Run `script` in a child Python with this environment, SIGKILL it as soon as `ready()`, then `release()` what
    the test held for it (a server's held requests). A failed wait leaves no child behind."""
    child = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sigkill_when(child, ready, seconds, what)
    finally:
        reap(child)
        release()


def reap(process: subprocess.Popen) -> None:
    """SIGKILL `process` if it still runs, and wait for it: a failed test leaves no child (nor its server) behind."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def free_ports(count: int = 1) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (all held open together, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def journaled(folder) -> tuple[int, int]:
    """(batches, items) the push journals in `folder` record as answered so far: to watch a push from outside."""
    from mixsync.warehouse.outbox import acknowledged

    answered = [acknowledged(path) for path in folder.glob("*.journal")] if folder.exists() else []
    return sum(batches for batches, _ in answered), sum(items for _, items in answered)
