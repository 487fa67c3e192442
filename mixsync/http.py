"""Retries with backoff that honour Retry-After, timeouts, and errors that name the setting to check."""

from __future__ import annotations

import email.utils
import functools
import logging
import os
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import httpx

from mixsync.settings import parse_int

log = logging.getLogger("mixsync.http")
T = TypeVar("T")

# 408/429 and the transient 5xx are worth another try; every other 4xx means the request itself is wrong.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class ServiceError(RuntimeError):
    """A service refused the request for good (bad credentials, bad parameters, plan limits)."""

    def __init__(self, message: str, status: int | None = None, body: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = body


class RetryableError(RuntimeError):
    """A failure that another attempt may fix: a 429, a 5xx, a cut or truncated stream."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class OutcomeUnknown(RuntimeError):
    """The request may or may not have been applied: sent, then no usable answer (a read timeout, a connection
    reset after sending, 500/502/504). Sending it again could apply it twice."""


# Transport errors raised before the request can have reached the service: safe to send again.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol,
                   httpx.ProxyError)


@dataclass
class RetryPolicy:
    attempts: int = 8
    initial_seconds: float = 2.0
    max_seconds: float = 60.0
    max_retry_after_seconds: float = 900.0
    sleep: Callable[[float], None] = time.sleep

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RetryPolicy:
        environ = os.environ if environ is None else environ
        initial_ms = parse_int(environ, "MIXSYNC_HTTP_BACKOFF_MS", 2000, minimum=0)
        return cls(
            attempts=parse_int(environ, "MIXSYNC_HTTP_ATTEMPTS", 8, minimum=1, maximum=100),
            initial_seconds=initial_ms / 1000,
            max_seconds=max(initial_ms / 1000, parse_int(environ, "MIXSYNC_HTTP_BACKOFF_MAX_MS", 60000, minimum=0) / 1000),
            max_retry_after_seconds=parse_int(environ, "MIXSYNC_HTTP_MAX_RETRY_AFTER_SECONDS", 900, minimum=0),
        )

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before attempt `attempt + 1`: the server's Retry-After, else capped exponential with jitter."""
        if retry_after is not None:
            return retry_after
        ceiling = min(self.max_seconds, self.initial_seconds * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


@dataclass
class RetryStats:
    """What the retries cost, for materialization metadata."""

    retries: int = 0
    waited_seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)

    def as_metadata(self) -> dict:
        return {"retries": self.retries, "retry_wait_seconds": round(self.waited_seconds, 3),
                "retry_reasons": dict(self.reasons)}


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def with_retries(operation: Callable[[], T], policy: RetryPolicy, stats: RetryStats, what: str) -> T:
    """Run `operation` until it succeeds, a permanent error escapes, or the attempts run out."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return operation()
        except (RetryableError, httpx.TransportError) as exc:
            reason = exc.reason if isinstance(exc, RetryableError) else f"{type(exc).__name__}: {exc}"
            retry_after = exc.retry_after if isinstance(exc, RetryableError) else None
            if attempt == policy.attempts:
                raise ServiceError(f"{what} failed after {attempt} attempts; last error: {reason}") from exc
            if retry_after is not None and retry_after > policy.max_retry_after_seconds:
                raise ServiceError(
                    f"{what}: the service asked us to wait {retry_after:.0f}s (Retry-After), longer than "
                    f"MIXSYNC_HTTP_MAX_RETRY_AFTER_SECONDS={policy.max_retry_after_seconds:.0f}; run again later"
                ) from exc
            wait = policy.delay(attempt, retry_after)
            stats.retries += 1
            stats.waited_seconds += wait
            stats.reasons[reason.split(":")[0]] += 1
            log.warning("%s: %s; retry %d/%d in %.2fs", what, reason, attempt, policy.attempts - 1, wait)
            policy.sleep(wait)
    raise AssertionError("unreachable")


def raise_for_status(response: httpx.Response, service: str, hints: Mapping[int, str]) -> None:
    """Turn a non-2xx answer into RetryableError or a ServiceError that quotes the service and names the fix."""
    status = response.status_code
    if 200 <= status < 300:
        return
    body = _body_excerpt(response)
    if status in RETRYABLE_STATUSES:
        raise RetryableError(f"HTTP {status} from {service}: {body}", retry_after_seconds(response))
    hint = hints.get(status) or hints.get(status // 100 * 100) or ""
    message = f"{service} answered HTTP {status}: {body}"
    if hint:
        message += f". {hint}"
    raise ServiceError(message, status=status, body=body)


def _body_excerpt(response: httpx.Response, limit: int = 500) -> str:
    try:
        response.read()
        text = response.content.decode("utf-8", errors="replace").strip()
    except httpx.HTTPError:
        return "(no body)"
    return text[:limit] if text else "(empty body)"


def timeouts(read_seconds: float = 120.0) -> httpx.Timeout:
    return httpx.Timeout(connect=15.0, read=read_seconds, write=60.0, pool=30.0)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The verifying TLS context every mixsync client shares. httpx builds one per Client otherwise, reading the CA
    bundle each time (0.05-0.3 s of CPU, several times per run); a context is safe to share between threads."""
    return httpx.create_ssl_context()


def user_agent() -> str:
    return "mixsync/0.1 (+https://github.com/mixsync/mixsync)"
