"""The impressions receiver facing hostile clients, as a real `mixsync receive-impressions` process on real sockets."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import loopback
import orjson
import pytest
from waiting import free_ports, poll

from mixsync.sandbox.impressions import ImpressionGenerator

MIXSYNC = str(Path(sys.executable).parent / "mixsync")






class Receiver:
    def __init__(self, tmp_path: Path, **env: str):
        self.landing = tmp_path / "impressions"
        self.port = free_ports()[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"receiver-{self.port}.log"
        self.process = subprocess.Popen(
            [MIXSYNC, "receive-impressions", "--port", str(self.port)],
            env={**os.environ, "MIXSYNC_IMPRESSIONS_DIR": str(self.landing), **env},
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        poll(self.ready, 120, "the receiver to listen")

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            return loopback.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def landed(self) -> list[str]:
        return sorted(p.name for p in self.landing.iterdir()) if self.landing.exists() else []

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def receiver(tmp_path):
    running = Receiver(tmp_path, MIXSYNC_WEBHOOK_BODY_TIMEOUT_SECONDS="2", MIXSYNC_WEBHOOK_MAX_CONNECTIONS="100")
    yield running
    running.stop()


RECEIVED: dict[int, bytes] = {}


def closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing, once it has closed; None while the connection is open."""
    while True:
        try:
            chunk = sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except ConnectionResetError:
            return RECEIVED.get(sock.fileno()) or b"(reset)"
        if not chunk:
            return RECEIVED.get(sock.fileno()) or b"(closed)"
        RECEIVED[sock.fileno()] = RECEIVED.get(sock.fileno(), b"") + chunk


def slow_clients(port: int, count: int) -> list[tuple[str, socket.socket]]:
    """Half send one byte of the request line; half send headers announcing 1000 bytes, then one byte of body."""
    clients = []
    for n in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        if n % 2:
            sock.sendall(b"POST /impressions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n[")
            clients.append(("body", sock))
        else:
            sock.sendall(b"P")
            clients.append(("headers", sock))
    return clients


def test_thirty_one_byte_clients_are_cut_off_and_do_not_block_a_real_sender(receiver):
    clients = slow_clients(receiver.port, 30)
    try:
        body = orjson.dumps(ImpressionGenerator(seed=3).batch(50))
        response = loopback.post(receiver.url + "/impressions", content=body, timeout=30)
        assert response.status_code == 200 and len(receiver.landed()) == 1
        answers = poll(lambda: (lambda got: got if all(a is not None for a in got) else None)(
            [closed_by_server(sock) for _, sock in clients]), 120, "the server to close every slow connection")
        for (kind, _), answer in zip(clients, answers, strict=True):
            if kind == "body":
                assert answer.startswith(b"HTTP/1.1 408") and b"MIXSYNC_WEBHOOK_BODY_TIMEOUT_SECONDS" in answer
        assert len(receiver.landed()) == 1  # nothing half-received was landed
        assert "MIXSYNC_WEBHOOK_BODY_TIMEOUT_SECONDS" in receiver.log.read_text()
    finally:
        for _, sock in clients:
            sock.close()


def test_connections_over_the_cap_are_closed_at_once(tmp_path):
    receiver = Receiver(tmp_path, MIXSYNC_WEBHOOK_BODY_TIMEOUT_SECONDS="600", MIXSYNC_WEBHOOK_MAX_CONNECTIONS="20")
    sockets = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(25)]
    try:
        closed = poll(lambda: (lambda c: c if len(c) >= 5 else None)(
            [n for n, s in enumerate(sockets) if closed_by_server(s) is not None]), 60, "the extra connections to close")
        assert len(closed) == 5 and min(closed) >= 20  # the first 20 are kept; the five after them are not
        assert "MIXSYNC_WEBHOOK_MAX_CONNECTIONS" in receiver.log.read_text()
    finally:
        for s in sockets:
            s.close()
        receiver.stop()


def request_being_read(port: int) -> socket.socket:
    """A client whose request the receiver has begun to read: it asked for `100 Continue` (sent when the handler
    first reads the body), got it, then sent one byte of its 1000. Only then is the request surely in flight."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /impressions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\nExpect: 100-continue\r\n\r\n")
    sock.settimeout(120)  # the deadline for the server's answer
    assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
    sock.settimeout(None)  # blocking again, as closed_by_server expects
    sock.sendall(b"[")
    return sock


def test_sigterm_ends_the_receiver_with_slow_clients_connected(tmp_path):
    receiver = Receiver(tmp_path, MIXSYNC_WEBHOOK_BODY_TIMEOUT_SECONDS="600", MIXSYNC_WEBHOOK_SHUTDOWN_SECONDS="2")
    clients = slow_clients(receiver.port, 30)
    # Under load the server may not have read the slow clients' headers yet when the signal comes (then they are
    # idle connections, closed at once): these two requests are being read for certain.
    clients += [("body", request_being_read(receiver.port)) for _ in range(2)]
    try:
        # Every slow client is still connected when the signal comes.
        assert all(closed_by_server(sock) is None for _, sock in clients)
        receiver.process.send_signal(signal.SIGTERM)
        poll(lambda: receiver.process.poll() is not None, 120, "the receiver to exit after SIGTERM")
        # uvicorn shuts down, then re-raises the signal: the exit status says SIGTERM ended it.
        assert receiver.process.returncode in (0, -signal.SIGTERM), receiver.log.read_text()
        assert "timeout graceful shutdown exceeded" in receiver.log.read_text()
    finally:
        for _, sock in clients:
            sock.close()
        receiver.stop()


def test_health_shows_counts_and_no_paths(receiver):
    health = loopback.get(receiver.url + "/health").json()
    assert health["status"] == "ok" and set(health) == {"status", "bodies_written", "impressions", "bodies_refused",
                                                        "bodies_failed"}
    assert str(receiver.landing) not in str(health)


def test_two_gzip_members_are_refused(receiver):
    good = gzip.compress(orjson.dumps(ImpressionGenerator(seed=4).batch(5)))
    for trailer in (gzip.compress(b"x" * 100_000), b"\x00" * 10):
        response = loopback.post(receiver.url + "/impressions", content=good + trailer,
                              headers={"Content-Encoding": "gzip"})
        assert response.status_code == 400 and "after its first member" in response.json()["error"]
    assert receiver.landed() == []


@pytest.mark.parametrize("field, value, message", [
    ("treatment", None, "treatment must be a non-empty string"),
    ("key", "", "key must be a non-empty string"),
    ("split", 7, "split must be a non-empty string"),
    ("time", "1767225600000", "time must be an integer of milliseconds"),
    ("time", 1.5, "time must be an integer of milliseconds"),
    ("environmentId", 12, "environmentId must be a string"),
])
def test_an_impression_the_loader_could_not_use_refuses_the_body(receiver, field, value, message):
    batch = ImpressionGenerator(seed=5).batch(10)
    batch[7][field] = value
    response = loopback.post(receiver.url + "/impressions", content=orjson.dumps(batch))
    assert response.status_code == 400 and f"element 7: {message}" in response.json()["error"]
    assert receiver.landed() == []


def test_listening_beyond_loopback_without_a_token_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MIXSYNC_WEBHOOK_TOKEN"}
    refused = subprocess.run([MIXSYNC, "receive-impressions", "--host", "0.0.0.0", "--port", str(free_ports()[0])],
                             env={**env, "MIXSYNC_IMPRESSIONS_DIR": str(tmp_path / "i")}, capture_output=True,
                             text=True, timeout=120)
    assert refused.returncode != 0
    assert "refusing to listen on 0.0.0.0 without MIXSYNC_WEBHOOK_TOKEN" in refused.stderr
