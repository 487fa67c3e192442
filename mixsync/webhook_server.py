"""An HTTP server for webhooks that can face the internet: what every mixsync receiver shares.

A receiver (Split impressions; Mixpanel cohorts) is a Starlette app served by `serve()`, which adds what uvicorn
alone does not: a deadline for each request to arrive in full (slow clients cannot hold a connection), a cap on
open connections, keep-alive and graceful-shutdown timeouts (SIGTERM ends the process even with slow clients
connected), and a refusal to listen beyond loopback without a token. Request bodies are read with a size limit,
and gzip bodies are decompressed with a limit and refused if anything follows their first member.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.requests import Request

from mixsync.settings import SettingsError, parse_int

log = logging.getLogger("mixsync.webhook")


@dataclass(frozen=True)
class ServerLimits:
    """How long and how many: MIXSYNC_WEBHOOK_BODY_TIMEOUT_SECONDS and its siblings."""

    body_timeout_seconds: int = 30
    max_connections: int = 100
    keepalive_seconds: int = 5
    shutdown_seconds: int = 10

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerLimits:
        environ = os.environ if environ is None else environ
        return cls(
            body_timeout_seconds=parse_int(environ, "MIXSYNC_WEBHOOK_BODY_TIMEOUT_SECONDS", 30, minimum=1, maximum=3600),
            max_connections=parse_int(environ, "MIXSYNC_WEBHOOK_MAX_CONNECTIONS", 100, minimum=1, maximum=100_000),
            keepalive_seconds=parse_int(environ, "MIXSYNC_WEBHOOK_KEEPALIVE_SECONDS", 5, minimum=1, maximum=600),
            shutdown_seconds=parse_int(environ, "MIXSYNC_WEBHOOK_SHUTDOWN_SECONDS", 10, minimum=1, maximum=600),
        )


class BodyRefused(Exception):
    """A request body that gets no 200: the status to answer and why, for the sender."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: Request, limit: int, setting: str) -> bytes:
    """The whole body, refused with 413 past `limit` bytes (declared or received). Its deadline is the server's."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BodyRefused(413, f"the body is larger than {limit} bytes ({setting})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyRefused(413, f"the body is larger than {limit} bytes ({setting})")
        chunks.append(chunk)
    return b"".join(chunks)


def gunzip(body: bytes, limit: int, setting: str) -> bytes:
    """Decompress a gzip body of exactly one member without ever holding more than `limit` bytes of output.

    Anything after the first member (a second member, padding, garbage) is refused: a size check on the first
    member alone would let a small valid member carry a huge second one.
    """
    decompressor = zlib.decompressobj(wbits=31)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BodyRefused(400, f"the body is not valid gzip: {exc}") from None
    if len(data) > limit:
        raise BodyRefused(413, f"the body is larger than {limit} bytes once decompressed ({setting})")
    if not decompressor.eof:
        raise BodyRefused(400, "the gzip body is truncated")
    if decompressor.unused_data:
        raise BodyRefused(400, f"the gzip body has {len(decompressor.unused_data)} bytes after its first member: "
                               "send one gzip member")
    return data


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def refuse_open_without_token(host: str, has_token: bool, token_setting: str) -> None:
    if not has_token and not is_loopback(host):
        raise SettingsError(
            f"refusing to listen on {host} without {token_setting}: anyone who can reach the port could post. "
            f"Set {token_setting} (and give the sender the URL with it), or listen on 127.0.0.1 behind a proxy")


TIMEOUT_MESSAGE = b"the request did not arrive within MIXSYNC_WEBHOOK_BODY_TIMEOUT_SECONDS\n"
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(TIMEOUT_MESSAGE), TIMEOUT_MESSAGE))


def guarded_protocol(limits: ServerLimits):
    """uvicorn's h11 protocol with a connection cap and a deadline for each request to arrive in full."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                log.warning("refused a connection: %d open (MIXSYNC_WEBHOOK_MAX_CONNECTIONS)", limits.max_connections)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(limits.body_timeout_seconds, self._request_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _request_too_slow(self) -> None:
            self._deadline = None
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete and not cycle.more_body:
                return  # the request arrived in full; the app is answering it
            if self.transport.is_closing():
                return
            if cycle is not None and not cycle.response_started and not cycle.response_complete:
                # Headers came, the body did not: say so before closing (the app sees a disconnect).
                self.transport.write(TIMEOUT_RESPONSE)
            log.warning("closed a connection whose request did not arrive within %ds "
                        "(MIXSYNC_WEBHOOK_BODY_TIMEOUT_SECONDS)", limits.body_timeout_seconds)
            self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def serve(app, host: str, port: int, limits: ServerLimits) -> None:
    """Serve `app` until SIGTERM or Ctrl-C; in-flight requests get `shutdown_seconds` to finish."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, http=guarded_protocol(limits),
                timeout_keep_alive=limits.keepalive_seconds,
                timeout_graceful_shutdown=limits.shutdown_seconds,
                # No access log: it would print the URL, and with it the token.
                access_log=False, log_level="info", server_header=False)
