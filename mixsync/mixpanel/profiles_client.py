"""Mixpanel's /engage profile updates ($set, $unset) as plain Python: no Dagster, no DuckDB."""

from __future__ import annotations

import threading

import httpx
import orjson

from mixsync.http import (
    RetryPolicy,
    RetryStats,
    ServiceError,
    raise_for_status,
    timeouts,
    tls_context,
    user_agent,
    with_retries,
)

HINTS = {
    400: "Mixpanel refused the profile updates request",
    401: "Check MIXPANEL_PROJECT_TOKEN and MIXPANEL_REGION",
    403: "Check MIXPANEL_PROJECT_TOKEN and MIXPANEL_REGION",
    413: "The batch is over Mixpanel's size limit",
}


class ProfilesClient:
    """POST /engage?verbose=1&ip=0 with JSON arrays of updates (each carrying its `$token`).

    ip=0: the updates come from a server; without it Mixpanel would geolocate every profile to this machine.
    """

    def __init__(self, ingestion_url: str, policy: RetryPolicy | None = None, stats: RetryStats | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.url = ingestion_url.rstrip("/") + "/engage"
        self.policy = policy or RetryPolicy.from_env()
        self.stats = stats or RetryStats()
        self.requests_sent = 0
        self._count_lock = threading.Lock()
        self.http = httpx.Client(headers={"User-Agent": user_agent(), "Content-Type": "application/json"},
                                 timeout=timeouts(read_seconds=120.0), transport=transport,
                                 verify=tls_context())

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ProfilesClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, updates: list[bytes]) -> str | None:
        """One request; None when Mixpanel accepted every update, else its error text (the verbose body's)."""

        def attempt() -> httpx.Response:
            with self._count_lock:
                self.requests_sent += 1
            response = self.http.post(self.url, params={"verbose": "1", "ip": "0"},
                                      content=b"[" + b",".join(updates) + b"]")
            raise_for_status(response, "Mixpanel /engage", HINTS)
            return response

        response = with_retries(attempt, self.policy, self.stats, "Mixpanel /engage")
        try:
            answer = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict) or answer.get("status") not in (0, 1):
            raise ServiceError(f"Mixpanel /engage answered 200 without a verbose status: {response.text[:200]}",
                               status=response.status_code, body=response.text[:500])
        return None if answer["status"] == 1 else str(answer.get("error") or "refused without a reason")

    def send(self, updates: list[bytes]) -> dict[int, str]:
        """Send a batch; returns {position: Mixpanel's reason} for the updates it refused.

        /engage answers 200 with status 0 and one error text for the whole batch, and does not say which updates
        it applied. Profile updates ($set/$unset of the same values) are idempotent, so a refused batch is sent
        again one update per request: each refusal is then attributed to its own profile.
        """
        error = self._post(updates)
        if error is None:
            return {}
        if len(updates) == 1:
            return {0: error}
        refused = {}
        for position, update in enumerate(updates):
            single = self._post([update])
            if single is not None:
                refused[position] = single
        return refused
