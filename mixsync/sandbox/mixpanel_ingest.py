"""Emulated Mixpanel ingestion API: POST /import and /track with auth, gzip, limits, strict validation and dedupe."""

from __future__ import annotations

import base64
import datetime as dt
import re
import threading
import time
import urllib.parse
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mixsync.sandbox.server import fault_response, record

IMPORT_ROUTE = "import"
TRACK_ROUTE = "track"
# /track refuses events older than this (the SDKs' reason for /import); "time" is optional there.
TRACK_MAX_AGE_SECONDS = 5 * 24 * 3600
MAX_EVENTS = 2000
MAX_BYTES = 2 * 1024 * 1024        # uncompressed; newer docs say 10 MB, the 413 example says 2 MB
MAX_EVENT_BYTES = 1024 * 1024
MAX_PROPERTIES = 255
MAX_DEPTH = 3
MAX_STRING = 255
EARLIEST_SECONDS = dt.datetime(1971, 1, 1, tzinfo=dt.UTC).timestamp()
INSERT_ID = re.compile(r"^[A-Za-z0-9-]{1,36}$")


@dataclass
class IngestState:
    """What the emulated /import holds: one copy per dedupe key (event, distinct_id, time, $insert_id)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    events: dict[tuple, dict] = field(default_factory=dict)
    received: int = 0           # events that arrived in accepted requests, valid or not
    imported: int = 0           # events reported as imported (duplicates included, as Mixpanel does)
    duplicates: int = 0         # imported events whose dedupe key was already held
    failed: int = 0             # events refused by strict validation
    requests: Counter = field(default_factory=Counter)   # status -> count

    def held(self, event: str | None = None) -> list[dict]:
        with self.lock:
            return [e for e in self.events.values() if event is None or e["event"] == event]

    def summary(self) -> dict[str, Any]:
        with self.lock:
            by_event = Counter(e["event"] for e in self.events.values())
            return {"held": len(self.events), "received": self.received, "imported": self.imported,
                    "duplicates": self.duplicates, "failed": self.failed,
                    "requests_by_status": {str(k): v for k, v in sorted(self.requests.items())},
                    "held_by_event": dict(by_event)}

    def clear(self) -> None:
        with self.lock:
            self.events.clear()
            self.received = self.imported = self.duplicates = self.failed = 0
            self.requests.clear()


def create_state(mixpanel_state) -> IngestState:
    """This emulation's state, kept on the MixpanelSandbox; handlers reach it via request.app.state.mixpanel."""
    return IngestState()


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"code": status, "error": message, "status": "Bad Request" if status == 400 else "error", **extra},
                        status_code=status)


def _authenticate(state, request: Request) -> Response | None:
    """A service account (with project_id), the legacy API secret, or the project token as username."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            username = base64.b64decode(header[6:]).decode().partition(":")[0]
        except (ValueError, UnicodeDecodeError):
            username = None
        if username == state.token:
            return None
    denied = state.authenticate(request)
    if denied is not None and denied.status_code == 401:
        return _error(401, "Invalid credentials")
    return denied


def _depth(value: Any, level: int = 0) -> int:
    if isinstance(value, dict):
        return max([_depth(v, level + 1) for v in value.values()], default=level + 1)
    if isinstance(value, list):
        return max([_depth(v, level + 1) for v in value], default=level + 1)
    return level


def _truncate(value: Any) -> Any:
    if isinstance(value, str):
        return value[:MAX_STRING]
    if isinstance(value, dict):
        return {k: _truncate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_truncate(v) for v in value]
    return value


def _validate(item: Any, now: float) -> tuple[str, str] | None:
    """(field, message) of the first problem strict mode reports for this event, or None when it is valid."""
    if not isinstance(item, dict):
        return "event", "event must be a JSON object"
    name = item.get("event")
    if not isinstance(name, str) or not name:
        return "event", "'event' must be a non-empty string"
    props = item.get("properties")
    if not isinstance(props, dict):
        return "properties", "'properties' must be an object"
    if len(props) >= MAX_PROPERTIES:
        return "properties", f"too many properties: {len(props)}, the limit is {MAX_PROPERTIES - 1}"
    if _depth(props) > MAX_DEPTH:
        return "properties", f"properties are nested deeper than {MAX_DEPTH} levels"
    moment = props.get("time")
    if isinstance(moment, bool) or not isinstance(moment, (int, float)):
        return "properties.time", "'properties.time' is required and must be a number (seconds or milliseconds)"
    seconds = moment / 1000 if moment > 1e11 else moment
    if seconds < EARLIEST_SECONDS:
        return "properties.time", "'properties.time' is before 1971-01-01"
    if seconds > now + 3600:
        return "properties.time", "'properties.time' is more than 1 hour in the future"
    distinct_id = props.get("distinct_id")
    if distinct_id is None or isinstance(distinct_id, (dict, list, bool)):
        return "properties.distinct_id", "'properties.distinct_id' is required and must be a string or number"
    insert_id = props.get("$insert_id")
    if not isinstance(insert_id, str) or not INSERT_ID.match(insert_id):
        return "properties.$insert_id", "'properties.$insert_id' is required: at most 36 characters of [A-Za-z0-9-]"
    if len(orjson.dumps(item)) >= MAX_EVENT_BYTES:
        return "event", "event is larger than 1 MB"
    return None


def _parse(body: bytes) -> list | None:
    """A JSON array, or NDJSON (one object per line); None when it is neither."""
    try:
        parsed = orjson.loads(body)
        return parsed if isinstance(parsed, list) else [parsed] if isinstance(parsed, dict) else None
    except orjson.JSONDecodeError:
        pass
    try:
        return [orjson.loads(line) for line in body.splitlines() if line.strip()]
    except orjson.JSONDecodeError:
        return None


def is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("application/x-www-form-urlencoded")


def form_fields(body: bytes) -> dict[str, str]:
    """The fields of a form-encoded body, as the official SDKs post them (`data=<json>&verbose=1&ip=0`)."""
    return dict(urllib.parse.parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))


def form_data(fields: dict[str, str]) -> list | None:
    """The `data` field of a form body: JSON (an object or an array), or the base64 of it that older SDKs send."""
    raw = fields.get("data")
    if raw is None:
        return None
    items = _parse(raw.encode())
    if items is None:
        try:
            items = _parse(base64.b64decode(raw, validate=True))
        except ValueError:
            return None
    return items


def verbose_answer(error: str | None, status: int = 200) -> JSONResponse:
    """The answer of the ingestion endpoints to `verbose=1`: `{"status": 1, "error": null}` or status 0 and why."""
    return JSONResponse({"status": 0 if error else 1, "error": error}, status_code=status)


def _gunzip(body: bytes) -> bytes | None:
    decompressor = zlib.decompressobj(wbits=31)
    try:
        data = decompressor.decompress(body, MAX_BYTES + 1)
    except zlib.error:
        return None
    if len(data) <= MAX_BYTES and not decompressor.eof:
        return None
    return data


async def _recorded(request: Request, handle) -> Response:
    """Record the request, answer it with `handle(mixpanel, state, request, body)`, and count the answer's status."""
    mixpanel = request.app.state.mixpanel
    state: IngestState = mixpanel.ingest
    recorded = await record(mixpanel.recorder, request)
    response = handle(mixpanel, state, request, recorded.body)
    recorded.status = response.status_code
    with state.lock:
        state.requests[response.status_code] += 1
    return response


async def import_events(request: Request) -> Response:
    return await _recorded(request, _import)


def _import(mixpanel, state: IngestState, request: Request, body: bytes) -> Response:
    denied = _authenticate(mixpanel, request)
    if denied is not None:
        return denied
    fault = mixpanel.faults.take(IMPORT_ROUTE)
    if fault is not None:
        return fault_response(fault)
    if request.headers.get("content-encoding", "").lower() == "gzip":
        unzipped = _gunzip(body)
        if unzipped is None:
            return _error(400, "could not decompress the gzip request body")
        body = unzipped
    if len(body) > MAX_BYTES:
        return _error(413, f"request body is larger than {MAX_BYTES} bytes uncompressed")
    form = form_fields(body) if is_form(request) else None
    items = form_data(form) if form is not None else _parse(body)
    if items is None:
        if form is not None:
            return verbose_answer("the form field 'data' must hold a JSON object or array of events", 400)
        return _error(400, "request body is not a JSON array or newline-delimited JSON")
    if len(items) > MAX_EVENTS:
        return _error(400, f"too many events in one request: {len(items)}, the limit is {MAX_EVENTS}")
    strict = request.query_params.get("strict") == "1" or (form or {}).get("strict") == "1"
    imported, failed_records = _hold(state, items, _validate)
    if form is not None:
        # Form posts (the SDKs') read the verbose answer. Which answer the real endpoint gives a form post with
        # invalid events is not documented: the strictest reading is a 400 naming the first refused event.
        if failed_records:
            first = failed_records[0]
            return verbose_answer(f"event {first['index']}: {first['field']}: {first['message']}", 400)
        return verbose_answer(None)
    if failed_records and strict:
        return _error(400, "some data points in the request failed validation", num_records_imported=imported,
                      failed_records=failed_records)
    return JSONResponse({"code": 200, "num_records_imported": imported, "status": "OK"})


def _hold(state: IngestState, items: list, validate) -> tuple[int, list[dict]]:
    """Keep the valid events (one copy per dedupe key, the latest wins); returns (imported, failed records)."""
    now = time.time()
    failed_records = []
    imported = 0
    with state.lock:
        state.received += len(items)
        for index, item in enumerate(items):
            problem = validate(item, now)
            if problem is not None:
                state.failed += 1
                props = item.get("properties") if isinstance(item, dict) else None
                insert_id = props.get("$insert_id") if isinstance(props, dict) else None
                failed_records.append({"index": index, "$insert_id": insert_id, "field": problem[0],
                                       "message": problem[1]})
                continue
            props = item["properties"]
            moment = props["time"]
            key = (item["event"], str(props.get("distinct_id")), int(moment if moment > 1e11 else moment * 1000),
                   props.get("$insert_id") or uuid.uuid4().hex)
            if key in state.events:
                state.duplicates += 1
            state.events[key] = {"event": item["event"], "properties": _truncate(props)}
            imported += 1
        state.imported += imported
    return imported, failed_records


def _validate_track(item: Any, now: float, token: str) -> tuple[str, str] | None:
    """/track: the project token rides in each event; `time` defaults to now and must be within 5 days."""
    if not isinstance(item, dict) or not isinstance(item.get("event"), str) or not item["event"]:
        return "event", "'event' must be a non-empty string"
    props = item.get("properties")
    if not isinstance(props, dict):
        return "properties", "'properties' must be an object"
    if props.get("token") != token:
        return "properties.token", "'properties.token' must be the project token"
    props.setdefault("time", now)
    moment = props["time"]
    if isinstance(moment, bool) or not isinstance(moment, (int, float)):
        return "properties.time", "'properties.time' must be a number (seconds or milliseconds)"
    seconds = moment / 1000 if moment > 1e11 else moment
    if seconds < now - TRACK_MAX_AGE_SECONDS:
        return "properties.time", "events older than 5 days are refused by /track: use /import"
    if seconds > now + 3600:
        return "properties.time", "'properties.time' is more than 1 hour in the future"
    insert_id = props.get("$insert_id")
    if insert_id is not None and (not isinstance(insert_id, str) or not INSERT_ID.match(insert_id)):
        return "properties.$insert_id", "'properties.$insert_id': at most 36 characters of [A-Za-z0-9-]"
    if len(props) >= MAX_PROPERTIES:
        return "properties", f"too many properties: {len(props)}, the limit is {MAX_PROPERTIES - 1}"
    return None


async def track(request: Request) -> Response:
    return await _recorded(request, _track)


def _track(mixpanel, state: IngestState, request: Request, body: bytes) -> Response:
    """POST /track: form (`data=`) or a JSON array; answers 200 `1`/`0`, or the verbose object with verbose=1."""
    fault = mixpanel.faults.take(TRACK_ROUTE)
    if fault is not None:
        return fault_response(fault)
    fields = form_fields(body) if is_form(request) else {}
    verbose = request.query_params.get("verbose") == "1" or fields.get("verbose") == "1"
    if len(body) > MAX_BYTES:
        return _error(413, f"request body is larger than {MAX_BYTES} bytes")
    items = form_data(fields) if is_form(request) else _parse(body)
    if items is None or len(items) > MAX_EVENTS:
        problem = "the body must hold a JSON object or an array of at most 2000 events"
        return verbose_answer(problem) if verbose else PlainTextResponse("0")
    _, failed_records = _hold(state, items, lambda item, now: _validate_track(item, now, mixpanel.token))
    if failed_records:
        first = failed_records[0]
        message = f"event {first['index']}: {first['field']}: {first['message']}"
        return verbose_answer(message) if verbose else PlainTextResponse("0")
    return verbose_answer(None) if verbose else PlainTextResponse("1")


async def imported_summary(request: Request) -> Response:
    return JSONResponse(request.app.state.mixpanel.ingest.summary())


def routes() -> list[Route]:
    return [Route("/import", import_events, methods=["POST"]),
            Route("/track", track, methods=["POST"]),
            Route("/_sandbox/imported", imported_summary, methods=["GET"])]
