"""Split's Events API as plain Python: POST batches of events, retried, errors that name the setting to check."""

from __future__ import annotations

import httpx

from mixsync.http import (
    NOT_SENT_ERRORS,
    OutcomeUnknown,
    RetryPolicy,
    RetryStats,
    raise_for_status,
    timeouts,
    tls_context,
    user_agent,
    with_retries,
)
from mixsync.split.settings import SplitSettings

KEY_HINT = ("Check SPLIT_SDK_KEY: it must be a server-side SDK key of the target environment "
            "(Split > Admin settings > API keys > SDK API keys); an Admin API key or a client-side key is the wrong key")
HINTS = {
    400: "Check that the traffic type (SPLIT_TRAFFIC_TYPE, or traffic_types in SPLIT_MAPPING_FILE) exists in Split "
         "and that SPLIT_ENVIRONMENT, if set, is the SDK key's environment",
    401: KEY_HINT,
    403: KEY_HINT,
    404: "Check SPLIT_EVENTS_URL (default https://events.split.io): the Events API answers at /api/events/bulk",
}


# Answers after which Split may have stored the batch: a server error or a gateway that lost the answer.
AMBIGUOUS_STATUSES = frozenset({500, 502, 504})


class SplitEventsClient:
    """Posts JSON arrays of events to `{SPLIT_EVENTS_URL}/api/events/bulk`. Thread-safe: one client per push."""

    def __init__(self, settings: SplitSettings, policy: RetryPolicy | None = None, stats: RetryStats | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.settings = settings
        self.policy = policy or RetryPolicy.from_env()
        self.stats = stats or RetryStats()
        self.url = f"{settings.events_url}/api/events/bulk"
        self.requests_sent = 0
        self.http = httpx.Client(
            headers={"Authorization": f"Bearer {settings.sdk_key.value}", "Content-Type": "application/json",
                     "User-Agent": user_agent()},
            timeout=timeouts(read_seconds=settings.request_timeout_seconds),
            limits=httpx.Limits(max_connections=settings.concurrency + 2,
                                max_keepalive_connections=settings.concurrency + 2),
            transport=transport,
            verify=tls_context(),
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SplitEventsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def post_events(self, body: bytes, count: int) -> None:
        """Send one JSON array of `count` events; returns when Split accepted it (202).

        Split counts every event it receives, so only what it cannot have applied is retried (honouring
        Retry-After): connect errors, connect and pool timeouts, 408, 429 and 503. An answer that leaves the
        outcome unknown (a read timeout or a cut connection after sending, 500, 502, 504) raises OutcomeUnknown
        at once; a refusal Split will repeat raises ServiceError.
        """

        def attempt() -> None:
            self.requests_sent += 1
            try:
                response = self.http.post(self.url, content=body)
            except NOT_SENT_ERRORS:
                raise  # retried by with_retries
            except httpx.TransportError as exc:
                raise OutcomeUnknown(f"{type(exc).__name__} after sending: {exc or 'no answer'}") from exc
            if response.status_code in AMBIGUOUS_STATUSES:
                raise OutcomeUnknown(f"HTTP {response.status_code} from Split Events API after sending")
            raise_for_status(response, "Split Events API", HINTS)

        with_retries(attempt, self.policy, self.stats, f"Split Events API (batch of {count} events)")

    def send_payloads(self, payloads: list[bytes]) -> None:
        """Join pre-serialized event objects into one request body (no per-event encoding)."""
        self.post_events(b"[" + b",".join(payloads) + b"]", len(payloads))
