"""An emulated Mixpanel on one origin: raw export (and, in sibling modules, query and ingestion APIs)."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from mixsync.sandbox.data import Dataset, ensure_day_file
from mixsync.sandbox.server import Faults, Recorder, control_routes, fault_response, record

EXPORT_ROUTE = "export"


@dataclass
class MixpanelSandbox:
    """What the emulated Mixpanel knows: its project, credentials, data, planned faults and what it received."""

    dataset: Dataset
    data_dir: Path
    project_id: str = "424242"
    username: str = "sandbox-service-account"
    secret: str = "sandbox-service-account-secret"
    api_secret: str = "sandbox-legacy-api-secret"
    token: str = "sandbox-project-token"
    recorder: Recorder = field(default_factory=Recorder)
    faults: Faults = field(default_factory=Faults)
    # State of the sibling emulations (cohorts and engage queries; /import and /track; /engage profiles).
    query: Any = None
    ingest: Any = None
    profiles: Any = None

    def __post_init__(self) -> None:
        from mixsync.sandbox import mixpanel_ingest, mixpanel_profiles, mixpanel_query

        self.query = mixpanel_query.create_state(self)
        self.ingest = mixpanel_ingest.create_state(self)
        self.profiles = mixpanel_profiles.create_state(self)

    def env(self, url: str) -> dict[str, str]:
        first_day = min(self.dataset.days)
        env = {
            "MIXPANEL_BASE_URL": url,
            "MIXPANEL_PROJECT_ID": self.project_id,
            "MIXPANEL_SERVICE_ACCOUNT_USERNAME": self.username,
            "MIXPANEL_SERVICE_ACCOUNT_SECRET": self.secret,
            "MIXPANEL_PROJECT_TOKEN": self.token,
            "MIXPANEL_START_DATE": first_day.isoformat(),
        }
        if self.dataset.legacy_timezone:
            env["MIXPANEL_PROJECT_TIMEZONE"] = self.dataset.legacy_timezone
            env["MIXPANEL_LEGACY_LOCAL_TIME"] = "true"
        return env

    def today(self) -> dt.date:
        # "today" is UTC for new projects and the project's timezone for legacy ones.
        zone = ZoneInfo(self.dataset.legacy_timezone) if self.dataset.legacy_timezone else dt.UTC
        return dt.datetime.now(zone).date()

    def authenticate(self, request: Request, require_project: bool = True) -> Response | None:
        """None when the Basic credentials (service account + project_id, or legacy API secret) are right."""
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("basic "):
            return JSONResponse({"error": "Invalid credentials"}, status_code=401)
        try:
            username, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return JSONResponse({"error": "Invalid credentials"}, status_code=401)
        project_id = request.query_params.get("project_id")
        if username == self.api_secret and password == "":
            if project_id is not None and project_id != self.project_id:
                return JSONResponse({"error": "Invalid credentials"}, status_code=401)
            return None
        if username != self.username or password != self.secret:
            return JSONResponse({"error": "Invalid credentials"}, status_code=401)
        if require_project and project_id is None:
            return PlainTextResponse("project_id is required when authenticating with a service account", status_code=400)
        if project_id is not None and project_id != self.project_id:
            return JSONResponse({"error": f"service account does not have access to project {project_id}"}, status_code=403)
        return None


def json_string_list(value: str) -> list[str] | None:
    """A JSON-encoded array of strings, as Mixpanel's `event` and `output_properties` take; None if it is not one."""
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        return None
    return parsed


_WHERE_TERM = re.compile(r'^\s*properties\["\$time"\]\s*(>=|>|<=|<)\s*datetime\((\d+)\)\s*$')


def parse_where(expression: str) -> list[tuple[str, int]]:
    """The time-range form of `where` (terms joined by `and`); anything else is refused, not ignored."""
    terms = []
    for part in re.split(r"\s+and\s+", expression.strip()):
        match = _WHERE_TERM.match(part)
        if not match:
            raise ValueError(f"unsupported where expression: {part!r}")
        terms.append((match.group(1), int(match.group(2))))
    return terms


def _matches_time(seconds: float, terms: list[tuple[str, int]]) -> bool:
    for op, bound in terms:
        if (op == ">=" and not seconds >= bound) or (op == ">" and not seconds > bound) or \
           (op == "<=" and not seconds <= bound) or (op == "<" and not seconds < bound):
            return False
    return True


def _filtered_lines(state: MixpanelSandbox, days: list[dt.date], events: set[str] | None,
                    where: list[tuple[str, int]], time_in_ms: bool, limit: int | None) -> Iterator[bytes]:
    sent = 0
    for day in days:
        with gzip.open(ensure_day_file(state.dataset, day, state.data_dir), "rb") as lines:
            for line in lines:
                line = line.rstrip(b"\n")
                try:
                    record_ = orjson.loads(line)
                    name, props = record_["event"], record_["properties"]
                    ms = props["time"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    if not events and not where:
                        yield line + b"\n"  # the export passes through what it holds, broken or not
                    continue
                if events is not None and name not in events:
                    continue
                if where and not _matches_time(ms / 1000, where):
                    continue
                if not time_in_ms:
                    props["time"] = int(ms // 1000)
                    line = orjson.dumps(record_)
                yield line + b"\n"
                sent += 1
                if limit is not None and sent >= limit:
                    return


def _gzip_stream(chunks: Iterator[bytes]) -> Iterator[bytes]:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    buffer = []
    size = 0
    for chunk in chunks:
        buffer.append(chunk)
        size += len(chunk)
        if size >= 1 << 16:
            yield compressor.compress(b"".join(buffer))
            buffer, size = [], 0
    yield compressor.compress(b"".join(buffer)) + compressor.flush()


def _with_fault(chunks: Iterator[bytes], fault, gzipped: bool) -> Iterator[bytes]:
    """Apply a stream fault: a cut connection after some bytes, or a body that ends in `terminated early`."""
    if fault is None:
        yield from chunks
        return
    if fault.kind == "cut":
        sent = 0
        for chunk in chunks:
            yield chunk[: max(0, fault.after_bytes - sent)]
            sent += len(chunk)
            if sent >= fault.after_bytes:
                raise ConnectionResetError("sandbox: connection cut mid-stream on purpose")
        raise ConnectionResetError("sandbox: connection cut mid-stream on purpose")
    if fault.kind == "terminated_early":
        yield from chunks
        return


async def export(request: Request) -> Response:
    state: MixpanelSandbox = request.app.state.mixpanel
    recorded = await record(state.recorder, request)
    response = _export(state, request)
    recorded.status = response.status_code
    return response


def _export(state: MixpanelSandbox, request: Request) -> Response:
    denied = state.authenticate(request)
    if denied:
        return denied
    fault = state.faults.take(EXPORT_ROUTE)
    if fault is not None and fault.kind == "status":
        return fault_response(fault)
    q = request.query_params
    try:
        from_date = dt.date.fromisoformat(q["from_date"])
        to_date = dt.date.fromisoformat(q["to_date"])
    except KeyError as missing:
        return PlainTextResponse(f"{missing.args[0]} is a required parameter", status_code=400)
    except ValueError:
        return PlainTextResponse("from_date and to_date must be dates in the format yyyy-mm-dd", status_code=400)
    if to_date > state.today():
        return PlainTextResponse("to_date cannot be later than today", status_code=400)
    if from_date > to_date:
        return PlainTextResponse("from_date cannot be later than to_date", status_code=400)
    events = None
    if "event" in q:
        names = json_string_list(q["event"])
        if names is None:
            return PlainTextResponse("event must be a JSON-encoded array of event names", status_code=400)
        events = set(names)
    try:
        where = parse_where(q["where"]) if q.get("where") else []
    except ValueError as exc:
        return PlainTextResponse(str(exc), status_code=400)
    limit = None
    if "limit" in q:
        if not q["limit"].isdigit() or not 0 < int(q["limit"]) <= 100_000:
            return PlainTextResponse("limit must be an integer between 1 and 100000", status_code=400)
        limit = int(q["limit"])
    time_in_ms = q.get("time_in_ms", "").lower() == "true"
    days = [d for d in state.dataset.days if from_date <= d <= to_date]
    gzip_ok = "gzip" in request.headers.get("accept-encoding", "").lower()
    plain = events is None and not where and limit is None and time_in_ms
    if plain and gzip_ok and len(days) == 1 and (fault is None or fault.kind == "cut"):
        # The common production request for one day: serve the stored gzip bytes as they are.
        chunks = _file_chunks(ensure_day_file(state.dataset, days[0], state.data_dir))
    else:
        chunks = _filtered_lines(state, days, events, where, time_in_ms, limit)
        if fault is not None and fault.kind == "terminated_early":
            chunks = _then(chunks, b"terminated early\n")
        if gzip_ok:
            chunks = _gzip_stream(chunks)
    headers = {"Content-Encoding": "gzip"} if gzip_ok else {}
    # Mixpanel labels the body text/plain without a charset; clients must read it as UTF-8 bytes.
    return StreamingResponse(_with_fault(chunks, fault, gzip_ok), headers=headers, media_type="text/plain")


def _then(chunks: Iterator[bytes], tail: bytes) -> Iterator[bytes]:
    yield from chunks
    yield tail


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(size):
            yield chunk


def build_app(state: MixpanelSandbox) -> Starlette:
    from mixsync.sandbox import mixpanel_ingest, mixpanel_profiles, mixpanel_query

    # One origin for every Mixpanel API, as MIXPANEL_BASE_URL gives it: export, query (/api/query/...), ingestion.
    routes = ([Route("/api/2.0/export", export, methods=["GET"]), *mixpanel_query.routes(), *mixpanel_ingest.routes(), *mixpanel_profiles.routes()])
    app = Starlette(routes=routes + control_routes(state.recorder, state.faults))
    app.state.mixpanel = state
    return app
