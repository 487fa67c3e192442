"""What tests share for waiting on real processes and sockets: a poll with a deadline (never a bare sleep), free
loopback ports, and stopping a child that may still run."""

from __future__ import annotations

import socket
import subprocess
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
