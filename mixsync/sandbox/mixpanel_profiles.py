"""Emulated Mixpanel profile ingestion: POST /engage ($set, $set_once, $unset, ...) validated, profiles recorded."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from mixsync.sandbox.mixpanel_ingest import MAX_BYTES, form_data, form_fields, is_form, verbose_answer
from mixsync.sandbox.server import fault_response, record

PROFILES_ROUTE = "profiles"
# Mixpanel recommends ~200 profiles per call; 2000 updates is the documented batch ceiling of its ingestion
# endpoints. The property cap is the events' (< 255): no profile-specific figure is published, so keep the strictest.
MAX_UPDATES = 2000
MAX_PROPERTIES = 255
OPERATIONS = ("$set", "$set_once", "$add", "$union", "$append", "$remove", "$unset", "$delete")
# Where Mixpanel puts a profile when it geolocates the sender's IP (ip=0 and "$ip" absent turn it off).
GEOLOCATED = {"$city": "San Francisco", "$region": "California", "$country_code": "US"}


@dataclass
class ProfileState:
    """What the emulated /engage holds: one property map per distinct_id, and what it refused."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    updates: int = 0            # updates applied (idempotent repeats included)
    refused: list[dict] = field(default_factory=list)
    requests: Counter = field(default_factory=Counter)
    # On demand: refuse updates of these distinct_ids with this reason (as Mixpanel refuses some profiles), and
    # hold requests after this many until release(), then fail them unapplied with a 503 (a crash test); with
    # apply_held, they are applied first (Mixpanel applied the updates and never answered).
    refuse: dict[str, str] = field(default_factory=dict)
    hold_after_requests: int | None = None
    apply_held: bool = False
    held: int = 0
    received_requests: int = 0
    _release: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self._release.set()

    def profile(self, distinct_id: str) -> dict[str, Any]:
        with self.lock:
            return dict(self.profiles.get(distinct_id, {}))

    def all_profiles(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {k: dict(v) for k, v in self.profiles.items()}

    def summary(self) -> dict[str, Any]:
        with self.lock:
            return {"profiles": len(self.profiles), "updates": self.updates, "refused": len(self.refused),
                    "requests_by_status": {str(k): v for k, v in sorted(self.requests.items())}}


def create_state(mixpanel_state) -> ProfileState:
    return ProfileState()


def _problem(update: Any, token: str) -> str | None:
    """Why Mixpanel refuses this profile update, or None when it is valid."""
    if not isinstance(update, dict):
        return "a profile update must be a JSON object"
    if update.get("$token") != token:
        return "'$token' is missing or is not this project's token"
    distinct_id = update.get("$distinct_id")
    if not isinstance(distinct_id, (str, int)) or isinstance(distinct_id, bool) or str(distinct_id) == "":
        return "'$distinct_id' is required and must be a non-empty string"
    operations = [op for op in OPERATIONS if op in update]
    if len(operations) != 1:
        return f"exactly one operation of {', '.join(OPERATIONS)} is required, got {len(operations)}"
    op = operations[0]
    value = update[op]
    if op == "$unset":
        if not isinstance(value, list) or not all(isinstance(name, str) and name for name in value):
            return "'$unset' must be a JSON array of property names"
    elif op == "$delete":
        return None
    elif not isinstance(value, dict):
        return f"'{op}' must be a JSON object of properties"
    elif any(not name for name in value):
        return f"'{op}' has an empty property name"
    elif op == "$add" and any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value.values()):
        return "'$add' values must be numbers"
    if len(value) >= MAX_PROPERTIES:
        return f"too many properties in one update: {len(value)}, the limit is {MAX_PROPERTIES - 1}"
    return None


def _apply(profiles: dict[str, dict[str, Any]], update: dict, geolocate: bool) -> None:
    distinct_id = str(update["$distinct_id"])
    if "$delete" in update:
        profiles.pop(distinct_id, None)
        return
    profile = profiles.setdefault(distinct_id, {})
    if "$set" in update:
        profile.update(update["$set"])
    elif "$set_once" in update:
        for name, value in update["$set_once"].items():
            profile.setdefault(name, value)
    elif "$unset" in update:
        for name in update["$unset"]:
            profile.pop(name, None)
    elif "$add" in update:
        for name, value in update["$add"].items():
            profile[name] = profile.get(name, 0) + value
    elif "$union" in update or "$append" in update:
        for name, value in (update.get("$union") or update.get("$append") or {}).items():
            items = list(profile.get(name) or [])
            for item in value if isinstance(value, list) and "$union" in update else [value]:
                if "$append" in update or item not in items:
                    items.append(item)
            profile[name] = items
    elif "$remove" in update:
        for name, value in update["$remove"].items():
            items = list(profile.get(name) or [])
            if value in items:
                items.remove(value)
            profile[name] = items
    if geolocate and "$ip" not in update:
        profile.update(GEOLOCATED)


async def engage_updates(request: Request) -> Response:
    mixpanel = request.app.state.mixpanel
    state: ProfileState = mixpanel.profiles
    recorded = await record(mixpanel.recorder, request)
    with state.lock:
        state.received_requests += 1
        hold = state.hold_after_requests is not None and state.received_requests > state.hold_after_requests
        state.held += hold
    if not hold or state.apply_held:
        response: Response = _engage(mixpanel, state, request, recorded.body)
    if hold:
        while not state._release.is_set():
            await asyncio.sleep(0.01)
        response = PlainTextResponse("held by the sandbox and dropped", status_code=503)
    recorded.status = response.status_code
    with state.lock:
        state.requests[response.status_code] += 1
    return response


def _engage(mixpanel, state: ProfileState, request: Request, body: bytes) -> Response:
    """200 with `1`/`0` (or, with verbose=1, `{"status", "error"}`) even on validation problems, as Mixpanel does.

    Whether the real endpoint applies the valid updates of a batch that holds an invalid one is not documented:
    the sandbox applies them, and a client that resends a refused batch one profile at a time is right either way.
    """
    fault = mixpanel.faults.take(PROFILES_ROUTE)
    if fault is not None:
        return fault_response(fault)
    form = form_fields(body) if is_form(request) else {}
    options = {**form, **request.query_params}
    verbose = options.get("verbose") == "1"

    def answer(error: str | None) -> Response:
        return verbose_answer(error) if verbose else PlainTextResponse("0" if error else "1")

    if request.headers.get("content-encoding"):
        return answer("this API does not support a Content-Encoding (gzip) on the request body")
    if len(body) > MAX_BYTES:
        return answer(f"request body is larger than {MAX_BYTES} bytes")
    if is_form(request):
        updates = form_data(form)
    else:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        updates = parsed if isinstance(parsed, list) else [parsed] if isinstance(parsed, dict) else None
    if updates is None:
        return answer("the body must be a JSON array of profile updates (or data=<JSON> form-encoded)")
    if len(updates) > MAX_UPDATES:
        return answer(f"too many profile updates in one request: {len(updates)}, the limit is {MAX_UPDATES}")
    geolocate = options.get("ip", "1") != "0"
    errors = []
    with state.lock:
        for index, update in enumerate(updates):
            problem = _problem(update, mixpanel.token)
            if problem is None and str(update["$distinct_id"]) in state.refuse:
                problem = state.refuse[str(update["$distinct_id"])]
            if problem is not None:
                distinct_id = update.get("$distinct_id") if isinstance(update, dict) else None
                errors.append(f"update {index} ($distinct_id {distinct_id!r}): {problem}")
                state.refused.append({"index": index, "$distinct_id": distinct_id, "message": problem})
                continue
            _apply(state.profiles, update, geolocate)
            state.updates += 1
    return answer("; ".join(errors) if errors else None)


def routes() -> list[Route]:
    return [Route("/engage", engage_updates, methods=["POST"])]
