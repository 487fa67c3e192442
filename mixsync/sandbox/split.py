"""An emulated Split Events API: Bearer SDK key, 202, the fact sheet's validation and limits, faults on demand."""

from __future__ import annotations

import asyncio
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from mixsync.sandbox.server import SECRET_HEADERS, Faults, RecordedRequest, Recorder, control_routes, fault_response

BULK_ROUTE = "/api/events/bulk"
# Split's docs regex (63 characters, no colon): the strictest of the published rules, so passing here passes all.
EVENT_TYPE_ID = re.compile(r"^[a-zA-Z0-9][-_.a-zA-Z0-9]{0,62}$")
MAX_KEY_CHARS = 250
MAX_PROPERTIES = 300
MAX_PROPERTIES_BYTES = 32 * 1024


class InvalidEvent(ValueError):
    pass


def properties_size(properties: dict) -> int:
    """Split's SDK estimate: 2 bytes per character of keys and strings, 8 per number, 4 per boolean, 0 for null."""
    size = 0
    for key, value in properties.items():
        size += 2 * len(key)
        if isinstance(value, str):
            size += 2 * len(value)
        elif isinstance(value, bool):
            size += 4
        elif value is not None:
            size += 8
    return size


@dataclass
class SplitSandbox:
    recorder: Recorder = field(default_factory=Recorder)
    faults: Faults = field(default_factory=Faults)
    sdk_key: str = "sandbox-server-side-sdk-key-0f3c9a"
    admin_key: str = "sandbox-admin-api-key-7d21e4"
    environment: str = "Production"
    traffic_types: set[str] = field(default_factory=lambda: {"user", "account"})
    # Keep every accepted event (tests count duplicates); a benchmark turns it off and keeps counts only.
    keep_events: bool = True
    events: list[dict] = field(default_factory=list)
    accepted: int = 0
    bulk_requests: int = 0
    trimmed_events: int = 0
    # From this bulk request on (1-based), events are accepted and recorded but the answer is held back until
    # `release()`: a client killed meanwhile has batches in flight that Split did receive.
    hold_from_request: int | None = None
    hold_seconds: float = 30.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _released: threading.Event = field(default_factory=threading.Event)

    def env(self, url: str) -> dict[str, str]:
        return {"SPLIT_EVENTS_URL": url, "SPLIT_SDK_KEY": self.sdk_key, "SPLIT_TRAFFIC_TYPE": "user"}

    def release(self) -> None:
        self._released.set()

    def identity(self, event: dict) -> tuple:
        """What makes two received events the same event (Split has no event id)."""
        return (event["eventTypeId"], event["trafficTypeName"], event["key"], event["timestamp"],
                orjson.dumps(event.get("properties"), option=orjson.OPT_SORT_KEYS))

    def received(self) -> Counter:
        with self._lock:
            return Counter(self.identity(e) for e in self.events)

    def duplicates(self) -> int:
        """How many received events are extra copies of one received before."""
        return sum(n - 1 for n in self.received().values() if n > 1)

    def reset(self) -> None:
        with self._lock:
            self.events.clear()
            self.accepted = self.bulk_requests = self.trimmed_events = 0
        self.recorder.clear()
        self.faults.clear()


def validate_event(event, index: int, state: SplitSandbox) -> bool:
    """Raise InvalidEvent naming the field; returns True when the properties were trimmed to 300 keys."""
    if not isinstance(event, dict):
        raise InvalidEvent(f"event {index}: must be a JSON object")
    event_type = event.get("eventTypeId")
    if not isinstance(event_type, str) or not EVENT_TYPE_ID.match(event_type):
        raise InvalidEvent(f"event {index}: eventTypeId {event_type!r} must match {EVENT_TYPE_ID.pattern}")
    traffic_type = event.get("trafficTypeName")
    if not isinstance(traffic_type, str) or not traffic_type:
        raise InvalidEvent(f"event {index}: trafficTypeName is required")
    if traffic_type != traffic_type.lower() or traffic_type not in state.traffic_types:
        raise InvalidEvent(f"event {index}: traffic type {traffic_type!r} does not exist "
                           f"(this organization has {', '.join(sorted(state.traffic_types))})")
    key = event.get("key")
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
        raise InvalidEvent(f"event {index}: key must be a non-empty string of at most {MAX_KEY_CHARS} characters")
    timestamp = event.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp < 0:
        raise InvalidEvent(f"event {index}: timestamp must be an integer of milliseconds since the epoch")
    if timestamp < 100_000_000_000:
        raise InvalidEvent(f"event {index}: timestamp {timestamp} looks like seconds; Split wants milliseconds")
    value = event.get("value")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or (isinstance(value, float) and not math.isfinite(value))):
        raise InvalidEvent(f"event {index}: value must be a number or null")
    environment = event.get("environmentName")
    if environment is not None and environment != state.environment:
        raise InvalidEvent(f"event {index}: environmentName {environment!r} is not the SDK key's environment")
    properties = event.get("properties")
    if properties is None:
        return False
    if not isinstance(properties, dict):
        raise InvalidEvent(f"event {index}: properties must be an object")
    for name, item in properties.items():
        if isinstance(item, (dict, list)):
            raise InvalidEvent(f"event {index}: property {name!r} is nested; properties must be flat")
    if properties_size(properties) > MAX_PROPERTIES_BYTES:
        raise InvalidEvent(f"event {index}: properties exceed {MAX_PROPERTIES_BYTES} bytes")
    if len(properties) > MAX_PROPERTIES:
        # Split's server keeps 300 properties and drops the rest.
        event["properties"] = dict(list(properties.items())[:MAX_PROPERTIES])
        return True
    return False


def build_app(state: SplitSandbox) -> Starlette:
    async def bulk(request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in SECRET_HEADERS}
        recorded = state.recorder.add(RecordedRequest(request.method, request.url.path, dict(request.query_params),
                                                      headers, body if state.keep_events else b""))
        response = _bulk(state, request, body)
        recorded.status = response.status_code
        number = getattr(request.state, "bulk_number", 0)
        if response.status_code == 202 and state.hold_from_request is not None and number >= state.hold_from_request:
            waited = 0.0
            while not state._released.is_set() and waited < state.hold_seconds:
                await asyncio.sleep(0.02)
                waited += 0.02
        return response

    async def stats(request: Request) -> Response:
        with state._lock:
            counts = {"accepted": state.accepted, "bulk_requests": state.bulk_requests,
                      "trimmed_events": state.trimmed_events}
        return Response(orjson.dumps(counts), media_type="application/json")

    routes = [*control_routes(state.recorder, state.faults), Route(BULK_ROUTE, bulk, methods=["POST"]), Route("/_sandbox/split/stats", stats, methods=["GET"]), *sdk_routes(state)]
    app = Starlette(routes=routes)
    app.state.split = state
    return app


def sdk_routes(state: SplitSandbox) -> list[Route]:
    """The least of Split's SDK API an official SDK needs to start and send events: an environment without
    feature flags or segments, streaming refused (the SDK polls), impressions and telemetry accepted.
    Their responses follow the SDK's own parser (splitio-client 10.7, spec 1.3); nothing else is emulated."""

    def authorized(request: Request) -> bool:
        return request.headers.get("authorization", "") == f"Bearer {state.sdk_key}"

    def since(request: Request, name: str) -> int:
        try:
            return int(request.query_params.get(name, "-1"))
        except ValueError:
            return -1

    async def split_changes(request: Request) -> Response:
        if not authorized(request):
            return PlainTextResponse("Unauthorized", status_code=401)
        # Nothing ever changes: the first fetch (since=-1) moves to change number 1, later fetches stay there.
        ff, rbs = since(request, "since"), since(request, "rbSince")
        body = {"ff": {"d": [], "s": ff, "t": max(ff, 1)}, "rbs": {"d": [], "s": rbs, "t": max(rbs, 1)}}
        return Response(orjson.dumps(body), media_type="application/json")

    async def segment_changes(request: Request) -> Response:
        if not authorized(request):
            return PlainTextResponse("Unauthorized", status_code=401)
        value = since(request, "since")
        body = {"name": request.path_params["name"], "added": [], "removed": [], "since": value,
                "till": max(value, 1)}
        return Response(orjson.dumps(body), media_type="application/json")

    async def auth(request: Request) -> Response:
        if not authorized(request):
            return PlainTextResponse("Unauthorized", status_code=401)
        return Response(orjson.dumps({"pushEnabled": False, "token": ""}), media_type="application/json")

    async def accepted(request: Request) -> Response:
        await request.body()
        return Response(status_code=200 if authorized(request) else 401)

    return [Route("/api/splitChanges", split_changes, methods=["GET"]),
            Route("/api/segmentChanges/{name}", segment_changes, methods=["GET"]),
            Route("/api/v2/auth", auth, methods=["GET"]),
            Route("/api/testImpressions/bulk", accepted, methods=["POST"]),
            Route("/api/testImpressions/count", accepted, methods=["POST"]),
            Route("/api/v1/metrics/config", accepted, methods=["POST"]),
            Route("/api/v1/metrics/usage", accepted, methods=["POST"])]


def _bulk(state: SplitSandbox, request: Request, body: bytes) -> Response:
    fault = state.faults.take(BULK_ROUTE)
    if fault is not None:
        return fault_response(fault)
    auth = request.headers.get("authorization", "")
    if not auth.startswith("Bearer "):
        return PlainTextResponse("Unauthorized: missing Authorization: Bearer <SDK key>", status_code=401)
    token = auth[len("Bearer "):].strip()
    if token == state.admin_key:
        return PlainTextResponse("Unauthorized: an Admin API key cannot send events; use a server-side SDK key",
                                 status_code=401)
    if token != state.sdk_key:
        return PlainTextResponse("Unauthorized: unknown SDK key", status_code=401)
    if request.headers.get("content-encoding"):
        return PlainTextResponse("Unsupported Content-Encoding", status_code=415)
    if not request.headers.get("content-type", "").startswith("application/json"):
        return PlainTextResponse("Content-Type must be application/json", status_code=400)
    try:
        events = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return PlainTextResponse(f"malformed JSON: {exc}", status_code=400)
    if not isinstance(events, list):
        return PlainTextResponse("the body must be a JSON array of events", status_code=400)
    trimmed = 0
    try:
        for index, event in enumerate(events):
            trimmed += validate_event(event, index, state)
    except InvalidEvent as exc:
        # No partial acceptance: a refused batch leaves nothing behind.
        return Response(orjson.dumps({"code": 400, "message": str(exc)}), status_code=400,
                        media_type="application/json")
    with state._lock:
        state.bulk_requests += 1
        request.state.bulk_number = state.bulk_requests
        state.accepted += len(events)
        state.trimmed_events += trimmed
        if state.keep_events:
            state.events.extend(events)
    return Response(status_code=202)
