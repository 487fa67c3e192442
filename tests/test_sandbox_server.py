"""The sandbox's servers stop as uvicorn's do, without uvicorn's 0.1 s ticks: a response in flight is still sent,
idle keep-alive connections are closed, and the port is closed afterwards."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest
from loopback import get
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from waiting import poll

from mixsync.http import tls_context
from mixsync.sandbox.server import serve


def test_a_stopped_server_sends_the_response_in_flight_and_closes_its_idle_connections_and_its_port():
    entered, release = threading.Event(), threading.Event()

    def slow(request):  # Starlette runs a sync endpoint in a worker thread, off the event loop
        entered.set()
        release.wait(60)
        return PlainTextResponse("slow, but sent")

    running = serve("probe", Starlette(routes=[Route("/slow", slow), Route("/quick", lambda r: PlainTextResponse("ok"))]))
    keep_alive = httpx.Client(base_url=running.url, verify=tls_context())
    answers: list[httpx.Response] = []
    in_flight = threading.Thread(target=lambda: answers.append(get(running.url + "/slow", timeout=60)))
    try:
        assert keep_alive.get("/quick").text == "ok"  # its connection stays open, idle
        in_flight.start()
        poll(entered.is_set, 30, "the slow request to reach its handler")
        running.signal_stop()
        release.set()
        running.join()  # gives up after 10 s: a server still waiting on a connection would still be alive
        assert not running.thread.is_alive()
        in_flight.join(60)
        assert [(answer.status_code, answer.text) for answer in answers] == [(200, "slow, but sent")]
        host, port = running.url.removeprefix("http://").rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5).close()
    finally:
        release.set()
        keep_alive.close()
        running.stop()
