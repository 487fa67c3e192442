"""Run emulated services as real HTTP servers on 127.0.0.1, record what they receive, misbehave on demand."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

FAULT_KINDS = ("status", "terminated_early", "cut")


@dataclass
class Fault:
    """One planned misbehaviour for the next matching request.

    kind: "status" (answer `status` with `body` and optional `retry_after`), "terminated_early" (stop the
    export body with Mixpanel's `terminated early` line), "cut" (drop the connection mid-body).
    """

    route: str
    kind: str = "status"
    status: int = 500
    body: str = ""
    retry_after: str | None = None
    after_bytes: int = 2048
    times: int = 1


@dataclass
class RecordedRequest:
    method: str
    path: str
    params: dict[str, str]
    headers: dict[str, str]
    body: bytes
    status: int = 0


class Recorder:
    """Every request a sandbox service received, in order, with its answer's status; secrets are not kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[RecordedRequest] = []

    def add(self, request: RecordedRequest) -> RecordedRequest:
        with self._lock:
            self.requests.append(request)
        return request

    def matching(self, path_suffix: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.path.endswith(path_suffix)]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()


class Faults:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[Fault] = deque()

    def add(self, route: str, kind: str = "status", **kwargs: Any) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}: one of {', '.join(FAULT_KINDS)}")
        with self._lock:
            self._queue.append(Fault(route=route, kind=kind, **kwargs))

    def take(self, route: str) -> Fault | None:
        with self._lock:
            for fault in self._queue:
                if fault.route == route:
                    fault.times -= 1
                    if fault.times <= 0:
                        self._queue.remove(fault)
                    return fault
        return None

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()


def fault_response(fault: Fault) -> Response:
    headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
    media = "application/json" if fault.body.startswith(("{", "[")) else "text/plain"
    return Response(fault.body, status_code=fault.status, headers=headers, media_type=media)


SECRET_HEADERS = {"authorization", "x-environment-key", "cookie"}


async def record(recorder: Recorder, request: Request) -> RecordedRequest:
    body = await request.body()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in SECRET_HEADERS}
    return recorder.add(RecordedRequest(request.method, request.url.path, dict(request.query_params), headers, body))


def control_routes(recorder: Recorder, faults: Faults) -> list[Route]:
    """/_sandbox/requests and /_sandbox/faults let another process (the demo, a person) inspect and steer."""

    async def requests_(request: Request) -> Response:
        with recorder._lock:
            items = [{"method": r.method, "path": r.path, "params": r.params, "status": r.status,
                      "body_bytes": len(r.body)} for r in recorder.requests]
        return JSONResponse(items)

    async def add_fault(request: Request) -> Response:
        try:
            spec = await request.json()
            if not isinstance(spec, dict):
                raise ValueError("the body must be a JSON object: {\"route\": ..., \"kind\": ..., ...}")
            faults.add(**spec)
        except (ValueError, TypeError) as exc:  # bad JSON, an unknown kind or field, no route
            return JSONResponse({"error": f"fault not queued: {exc}"}, status_code=400)
        return JSONResponse({"queued": spec})

    return [Route("/_sandbox/requests", requests_, methods=["GET"]),
            Route("/_sandbox/faults", add_fault, methods=["POST"])]


class _QuickStoppingServer(uvicorn.Server):
    """uvicorn's server, stopped without waiting for its ticks. uvicorn looks at `should_exit` every 0.1 s, and its
    shutdown sleeps 0.1 s and then polls the open connections every 0.1 s: ~0.2 s of every stop. A sandbox starts
    and stops around each test (64 tests' teardowns took 11.7 s with uvicorn's ticks, 1.1 s without). Here a stop
    wakes the main loop at once, and the shutdown does what uvicorn's does (close the listeners, ask every connection to close,
    wait until those mid-response are done) polling every 5 ms; lifespan is off, so there is no shutdown event."""

    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        counter = 0
        while not await self.on_tick(counter):  # the tick also refreshes the Date header once a second
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 0.1)

    def request_stop(self) -> None:
        self.should_exit = True
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stop.set)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        while self.server_state.connections or self.server_state.tasks:
            await asyncio.sleep(0.005)
        for server in self.servers:
            await server.wait_closed()


@dataclass
class RunningServer:
    name: str
    url: str
    server: _QuickStoppingServer
    thread: threading.Thread
    state: Any = field(default=None)

    def stop(self) -> None:
        self.signal_stop()
        self.join()

    def signal_stop(self) -> None:
        """Ask the server to exit; `join` waits until the responses in flight are sent and it has."""
        self.server.request_stop()

    def join(self) -> None:
        self.thread.join(timeout=10)


def free_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def serve(name: str, app: Starlette, state: Any = None, host: str = "127.0.0.1", port: int = 0,
          startup_timeout: float = 15.0) -> RunningServer:
    """Start `app` in a background thread on a free (or given) port and wait until it accepts connections."""
    sock = free_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30)
    server = _QuickStoppingServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"sandbox-{name}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"sandbox {name} did not start on {bound_host}:{bound_port}")
        time.sleep(0.01)
    return RunningServer(name, f"http://{bound_host}:{bound_port}", server, thread, state)
