"""Mixpanel's cohort-sync webhook: each valid body lands durably as a file before Mixpanel gets its answer.

Mixpanel posts `{"action": "members" | "add_members" | "remove_members", "parameters": {...}}` and reads
`{"action", "status": "success" | "failure", "error": {"message", "code"}}` back. Delivery is at least once:
what is landed here is applied idempotently later (mixpanel_cohort_webhook_sensor).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from threading import Lock

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mixsync.impressions.landing import write_atomically
from mixsync.settings import Secret, SettingsError, WarehouseSettings, parse_int, require
from mixsync.webhook_server import BodyRefused, ServerLimits, read_body, serve

log = logging.getLogger("mixsync.cohort_receiver")
WEBHOOK_PATH = "/cohorts"
ACTIONS = ("members", "add_members", "remove_members")
# Mixpanel sends at most 1000 members per call.
MAX_MEMBERS = 1000
DEFAULT_MAX_BYTES = 4 << 20
# The loader's column types (mixpanel.cohort_webhook_bodies): cohort_id BIGINT, page and total_pages INTEGER. A value
# outside them is refused here, so a 200 is never followed by a body the loader cannot record.
MAX_BIGINT = (1 << 63) - 1
MAX_INTEGER = (1 << 31) - 1


@dataclass(frozen=True)
class CohortWebhookSettings:
    user: str
    password: Secret = field(repr=False)
    directory: Path
    max_body_bytes: int

    @classmethod
    def from_env(cls, environ=None) -> CohortWebhookSettings:
        environ = os.environ if environ is None else environ
        user = require(environ, "MIXSYNC_COHORT_WEBHOOK_USER",
                       "the user name of the HTTP Basic auth you give Mixpanel's webhook destination")
        password = require(environ, "MIXSYNC_COHORT_WEBHOOK_PASSWORD",
                           "the password of the HTTP Basic auth you give Mixpanel's webhook destination")
        if len(password) < 16:
            raise SettingsError("MIXSYNC_COHORT_WEBHOOK_PASSWORD is shorter than 16 characters: use a long random one")
        return cls(user=user, password=Secret(password), directory=cohort_webhook_dir(environ),
                   max_body_bytes=parse_int(environ, "MIXSYNC_COHORT_WEBHOOK_MAX_BYTES", DEFAULT_MAX_BYTES,
                                            minimum=1024, maximum=1 << 30))


def cohort_webhook_dir(environ=None) -> Path:
    """Where bodies land (MIXSYNC_COHORT_WEBHOOK_DIR, default <MIXSYNC_LANDING_DIR>/cohort_webhooks)."""
    environ = os.environ if environ is None else environ
    value = (environ.get("MIXSYNC_COHORT_WEBHOOK_DIR") or "").strip()
    if value:
        return Path(value).expanduser().absolute()
    return WarehouseSettings.from_env(environ).landing_dir / "cohort_webhooks"


def new_file_name(now: dt.datetime | None = None) -> str:
    """A unique name that sorts by arrival time: bodies are applied in that order."""
    now = now or dt.datetime.now(dt.UTC)
    return f"cohorts-{now:%Y%m%dT%H%M%S%f}Z-{uuid.uuid4().hex[:12]}.json"


class _DuplicateKey(ValueError):
    pass


def _refuse_duplicate_keys(pairs: list) -> None:
    """json's object_pairs_hook: JSON parsers disagree on which of two equal keys wins (orjson keeps the last,
    DuckDB the first), so a body that repeats one is refused rather than read two ways."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen.add(key)


def _cohort_id(value) -> int | None:
    """The cohort id as the loader stores it (BIGINT): an integer, or a string of ASCII digits (`str.isdigit` also
    accepts other scripts' digits and superscripts, which DuckDB does not); None if it is neither or too big."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not -MAX_BIGINT - 1 <= value <= MAX_BIGINT:
        return None
    return value


def _page_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_INTEGER


def check_body(body: bytes) -> str:
    """The action of a cohort webhook body; BodyRefused naming what is wrong otherwise."""
    if body[:2] == b"\x1f\x8b":
        raise BodyRefused(400, "the body is gzip-compressed: send plain JSON (Mixpanel's cohort webhook does)")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyRefused(400, f"the body is not UTF-8 text: {exc}") from None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyRefused(400, f"the body is not valid JSON: {exc}") from None
    try:
        json.loads(body, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as exc:
        raise BodyRefused(400, f"the body repeats the key {exc.args[0]!r} in one object: send each key once") from None
    except RecursionError:
        raise BodyRefused(400, "the body nests too deeply") from None
    if not isinstance(data, dict):
        raise BodyRefused(400, f"the body is a JSON {type(data).__name__}, not an object")
    action = data.get("action")
    if action not in ACTIONS:
        raise BodyRefused(400, f"action {action!r} is not one of {', '.join(ACTIONS)}")
    params = data.get("parameters")
    if not isinstance(params, dict):
        raise BodyRefused(400, "parameters is missing or not an object")
    if _cohort_id(params.get("mixpanel_cohort_id")) is None:
        raise BodyRefused(400, "parameters.mixpanel_cohort_id is missing or not a cohort id (an integer, or a string "
                               f"of ASCII digits, at most {MAX_BIGINT})")
    members = params.get("members")
    if not isinstance(members, list):
        raise BodyRefused(400, "parameters.members is missing or not an array")
    if len(members) > MAX_MEMBERS:
        raise BodyRefused(413, f"parameters.members holds {len(members)} members, more than Mixpanel's {MAX_MEMBERS}")
    for position, member in enumerate(members):
        distinct_id = member.get("mixpanel_distinct_id") if isinstance(member, dict) else None
        if isinstance(distinct_id, bool) or not isinstance(distinct_id, (str, int)) or str(distinct_id) == "":
            raise BodyRefused(400, f"parameters.members[{position}] has no mixpanel_distinct_id")
    if action == "members":
        if not params.get("mixpanel_session_id"):
            raise BodyRefused(400, "a members snapshot needs parameters.mixpanel_session_id")
        page_info = params.get("page_info")
        if not isinstance(page_info, dict):
            raise BodyRefused(400, "a members snapshot needs parameters.page_info {total_pages, page_count}")
        for name in ("total_pages", "page_count"):
            if not _page_number(page_info.get(name)):
                raise BodyRefused(400, f"parameters.page_info.{name} is missing or not a whole number from 1 to "
                                       f"{MAX_INTEGER}")
        if page_info["page_count"] > page_info["total_pages"]:
            raise BodyRefused(400, "parameters.page_info.page_count is larger than parameters.page_info.total_pages")
    return action


def _authorized(request: Request, settings: CohortWebhookSettings) -> bool:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    # Both compared in constant time, both always compared.
    return (hmac.compare_digest(user.encode(), settings.user.encode())
            & hmac.compare_digest(password.encode(), settings.password.value.encode()))


def _answer(action: str | None, status: int, message: str | None = None) -> JSONResponse:
    if message is None:
        return JSONResponse({"action": action, "status": "success"}, status_code=status)
    return JSONResponse({"action": action, "status": "failure", "error": {"message": message, "code": status}},
                        status_code=status)


def build_app(settings: CohortWebhookSettings) -> Starlette:
    """The webhook app: POST /cohorts with HTTP Basic auth; GET /health."""
    lock = Lock()
    counts = {"bodies_written": 0, "bodies_refused": 0, "bodies_failed": 0}

    def count(name: str) -> None:
        with lock:
            counts[name] += 1

    def land(body: bytes) -> str:
        action = check_body(body)
        write_atomically(settings.directory, new_file_name(), body)
        return action

    async def receive(request: Request) -> Response:
        if not _authorized(request, settings):
            count("bodies_refused")
            response = _answer(None, 401, "HTTP Basic credentials are missing or wrong")
            response.headers["WWW-Authenticate"] = 'Basic realm="mixsync cohorts"'
            return response
        try:
            encoding = request.headers.get("content-encoding", "").strip().lower()
            if encoding not in ("", "identity"):
                # Mixpanel's cohort webhook posts plain JSON; a compressed body would be stored unreadable.
                raise BodyRefused(415, f"Content-Encoding {encoding!r} is not accepted: send the body as plain JSON")
            body = await read_body(request, settings.max_body_bytes, "MIXSYNC_COHORT_WEBHOOK_MAX_BYTES")
            # The checks and the fsynced write in a worker thread: the event loop keeps accepting.
            action = await run_in_threadpool(land, body)
        except ClientDisconnect:
            # The sender went away (or was cut off for being too slow) before its body arrived: nothing landed.
            count("bodies_refused")
            return Response(status_code=400)
        except BodyRefused as refused:
            count("bodies_refused")
            log.warning("refused a cohort webhook body: %s", refused.message)
            return _answer(None, refused.status, refused.message)
        except OSError as exc:
            count("bodies_failed")
            log.error("could not persist a cohort webhook body: %s", exc)
            # Not a success: Mixpanel retries, and a body we did not persist must not be acknowledged.
            return _answer(None, 503, f"could not persist the body: {exc.strerror or exc}")
        count("bodies_written")
        return _answer(action, 200)

    async def health(request: Request) -> Response:
        # Counts only: no path, setting or version a stranger could use.
        with lock:
            return JSONResponse({"status": "ok", **counts})

    return Starlette(routes=[Route(WEBHOOK_PATH, receive, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


def run(host: str, port: int, settings: CohortWebhookSettings, limits: ServerLimits | None = None) -> None:
    """Serve the webhook until SIGTERM or Ctrl-C (the `mixsync receive-cohorts` command), on the hardened server
    every mixsync receiver shares (request deadline, connection cap, graceful shutdown). HTTP Basic auth is always
    on, so it may listen beyond loopback."""
    limits = limits or ServerLimits.from_env()
    settings.directory.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("receiving Mixpanel cohort webhooks on POST http://%s:%d%s into %s", host, port, WEBHOOK_PATH,
             settings.directory)
    serve(build_app(settings), host, port, limits)
