"""Flagsmith's SDK API for identities and traits as plain Python: no Dagster, no DuckDB."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import orjson

from mixsync.flagsmith.settings import FlagsmithSettings
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

KEY_HINT = ("Check FLAGSMITH_ENVIRONMENT_KEY: it must be the server-side key (ser.…) of the environment that "
            "FLAGSMITH_API_URL serves")
HINTS = {
    401: KEY_HINT,
    403: KEY_HINT,
    404: "Check FLAGSMITH_API_URL: it should end in /api/v1 (Edge: https://edge.api.flagsmith.com/api/v1)",
    400: "Flagsmith refused the data",
}
# Refusal reasons the client gives itself (grouped as they are in the run's rejects_by_reason: no identifier in them).
BLANK_IDENTIFIER = "identifier empty or only whitespace: not sent (Flagsmith answers 200 and stores nothing)"
IDENTIFIER_CHANGED = ("HTTP 200 for a different identifier than the one sent: the traits are not on this identity "
                      "(not recorded as sent)")
NOT_ECHOED = ("HTTP 200 from traits/bulk without this identifier in its answer: not stored as sent "
              "(not recorded as sent)")
# Bulk routes by flavour: Edge's asynchronous bulk identities (≤ 100 per request, 202) or core's traits/bulk.
EDGE_BULK_LIMIT = 100


class FlagsmithKeyError(ServiceError):
    """The environment key was refused (403): no further request can succeed."""


class FlagsmithClient:
    """One Flagsmith environment. Requests retry 429/5xx through the shared policy; 4xx are returned or raised."""

    def __init__(self, settings: FlagsmithSettings, policy: RetryPolicy | None = None,
                 stats: RetryStats | None = None, transport: httpx.BaseTransport | None = None):
        self.settings = settings
        self.policy = policy or RetryPolicy.from_env()
        self.stats = stats or RetryStats()
        self.requests_sent = 0
        # A bulk route that answered 404/405 in this run (the server changed since it was detected): the rest of
        # the run goes identity by identity, and the caller forgets the remembered route.
        self.missing_bulk_route: str | None = None
        self._count_lock = threading.Lock()
        self.http = httpx.Client(
            base_url=settings.api_url + "/",
            headers={"X-Environment-Key": settings.environment_key.value, "User-Agent": user_agent(),
                     "Content-Type": "application/json"},
            timeout=timeouts(read_seconds=120.0),
            transport=transport,
            verify=tls_context(),
            limits=httpx.Limits(max_connections=max(10, settings.concurrency * 2)),
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> FlagsmithClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, what: str, content: bytes | None = None,
                 params: dict | None = None, accept_4xx: bool = False) -> httpx.Response:
        """One request with retries. 403 raises FlagsmithKeyError; other 4xx are returned when `accept_4xx`."""

        def attempt() -> httpx.Response:
            with self._count_lock:
                self.requests_sent += 1
            response = self.http.request(method, path, content=content, params=params)
            if response.status_code == 403:
                raise FlagsmithKeyError(f"{what}: Flagsmith answered 403 {response.text[:200]}. {KEY_HINT}",
                                        status=403, body=response.text[:500])
            if accept_4xx and 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                return response
            raise_for_status(response, f"Flagsmith {what}", HINTS)
            return response

        return with_retries(attempt, self.policy, self.stats, f"Flagsmith {what}")

    def check_key(self) -> None:
        """One cheap authenticated read, `GET flags/` (the environment's flags): a key Flagsmith does not know
        answers 403, raised as FlagsmithKeyError naming FLAGSMITH_ENVIRONMENT_KEY. Writes nothing."""
        self._request("GET", "flags/", "key check (GET flags/)")

    def detect_bulk_mode(self) -> str:
        """'edge' when PUT bulk-identities/ exists, else 'core' when PUT traits/bulk/ exists, else 'identities'.

        Empty bodies change nothing; a route that does not exist answers 404 before any validation.
        """
        edge = self._request("PUT", "bulk-identities/", "bulk-identities probe", b'{"data": []}', accept_4xx=True)
        if edge.status_code not in (404, 405):
            return "edge"
        core = self._request("PUT", "traits/bulk/", "traits/bulk probe", b"[]", accept_4xx=True)
        if core.status_code not in (404, 405):
            return "core"
        return "identities"

    def send(self, mode: str, payloads: list[bytes]) -> dict[int, str]:
        """Send identities (each payload `{"identifier", "traits": [...]}`); returns {position: reason} refused.

        A bulk request refused with a 4xx is retried identity by identity, so one bad item cannot sink the rest.
        An identifier that is empty or only whitespace is refused here, unsent: Flagsmith would answer 200 and
        store nothing. A 200 that does not name the identifier sent (Flagsmith stored the traits elsewhere, or
        nowhere) is a refusal too, never an acknowledgement.
        """
        identities = [orjson.loads(payload) for payload in payloads]
        refused = {position: BLANK_IDENTIFIER for position, identity in enumerate(identities)
                   if _blank(identity.get("identifier"))}
        positions = [position for position in range(len(payloads)) if position not in refused]
        if positions and mode in ("edge", "core") and mode != self.missing_bulk_route:
            if mode == "edge":
                body = b'{"data":[' + b",".join(payloads[p] for p in positions) + b"]}"
                response = self._request("PUT", "bulk-identities/", f"bulk-identities ({len(positions)} identities)",
                                         body, accept_4xx=True)
            else:
                response = self._request("PUT", "traits/bulk/", f"traits/bulk ({len(positions)} identities)",
                                         _core_bulk_body([identities[p] for p in positions]), accept_4xx=True)
            if response.status_code in (404, 405):
                self.missing_bulk_route = mode
            if response.status_code < 400:
                if mode == "edge":
                    return refused  # 202, no body: the read-back checks what was stored
                echoed = _echoed_identifiers(response.content)
                if echoed is not None:
                    refused.update({p: NOT_ECHOED for p in positions if _sets_a_value(identities[p])
                                    and identities[p]["identifier"] not in echoed})
                    return refused
                # An answer that cannot be checked: the per-identity route below can (a trait set is idempotent).
        for position in positions:
            response = self._request("POST", "identities/", "POST identities/", payloads[position], accept_4xx=True)
            if response.status_code >= 400:
                refused[position] = f"HTTP {response.status_code}: {response.text[:300]}"
            elif _answered_identifier(response.content) != identities[position]["identifier"]:
                refused[position] = IDENTIFIER_CHANGED
        return refused

    def identity_flags(self, identifier: str) -> bytes:
        """The raw answer of GET identities/?identifier=… (server key): `{"identifier", "traits", "flags": [...]}`.

        Checked to hold a `flags` list, since an answer without one (`{"detail": "Missing identifier"}` comes with a
        200) must never read as "this identity has no flags"; the bytes go to DuckDB as they came.
        """
        response = self._request("GET", "identities/", "GET identities/ (flags)", params={"identifier": identifier})
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("flags"), list):
            raise ServiceError(f"Flagsmith's identity answer for {identifier!r} holds no flags list: "
                               f"{response.text[:200]}", status=response.status_code, body=response.text[:500])
        return response.content

    def read_traits(self, identifier: str) -> dict[str, Any]:
        """The traits Flagsmith holds for an identity (GET identities/?identifier=…, server key)."""
        response = self._request("GET", "identities/", "GET identities/", params={"identifier": identifier})
        body = orjson.loads(response.content)
        return {t["trait_key"]: t.get("trait_value") for t in body.get("traits") or []}


def _blank(identifier: Any) -> bool:
    # str.strip() without arguments strips every Unicode whitespace, as Flagsmith (Python) trims identifiers.
    return not isinstance(identifier, str) or not identifier.strip()


def _sets_a_value(identity: dict) -> bool:
    # traits/bulk echoes only the items it wrote: deletes (null) are never in its answer.
    return any(trait.get("trait_value") is not None for trait in identity["traits"])


def _answered_identifier(content: bytes) -> Any:
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return body.get("identifier") if isinstance(body, dict) else None


def _echoed_identifiers(content: bytes) -> set[str] | None:
    """The identifiers traits/bulk says it wrote (`[{"identity": {"identifier"}, ...}]`); None if not that shape."""
    try:
        items = orjson.loads(content)
        return {str(item["identity"]["identifier"]) for item in items}
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return None


def _core_bulk_body(identities: list[dict]) -> bytes:
    # Core's traits/bulk wants one item per trait. A batch is at most a few thousand small objects, and the
    # server needs ~1 ms per item (observed), so reshaping here costs nothing next to the request itself.
    items: list[dict] = []
    for identity in identities:
        owner = {"identifier": identity["identifier"]}
        items.extend({"identity": owner, **trait} for trait in identity["traits"])
    return orjson.dumps(items)
