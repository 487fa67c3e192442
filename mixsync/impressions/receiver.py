"""Split's impressions webhook: persist each valid body as a landing file, durably, before answering 200."""

from __future__ import annotations

import hmac
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from threading import Lock

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mixsync.impressions.landing import (
    GZIP_MAGIC,
    INT64_MAX,
    INT64_MIN,
    MAX_TIME_MS,
    MIN_TIME_MS,
    duckdb_reads_gzip_header,
    new_file_name,
    write_atomically,
)
from mixsync.impressions.settings import ImpressionsSettings
from mixsync.webhook_server import BodyRefused, ServerLimits, gunzip, read_body, refuse_open_without_token, serve

log = logging.getLogger("mixsync.receiver")
WEBHOOK_PATH = "/impressions"
# Without these an impression cannot be deduplicated or attributed: such a body is refused, not landed.
REQUIRED_FIELDS = frozenset({"key", "split", "treatment", "time", "environmentId"})


@dataclass
class ReceiverStats:
    lock: Lock = field(default_factory=Lock)
    written: int = 0
    impressions: int = 0
    refused: int = 0
    failed: int = 0

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {"bodies_written": self.written, "impressions": self.impressions,
                    "bodies_refused": self.refused, "bodies_failed": self.failed}


def _shown(value: object) -> str:
    # The standard library's encoder: it takes integers past 64 bits, which orjson refuses.
    return json.dumps(value, ensure_ascii=False)[:40]


def _invalid(item: dict) -> str | None:
    """Why the loader could not use this impression, or None. Kept to what the loader checks, or stricter."""
    for name in ("key", "split", "treatment"):
        value = item.get(name)
        if not isinstance(value, str) or not value.strip():
            return f"{name} must be a non-empty string, not {_shown(value)}"
    environment = item.get("environmentId")
    if not isinstance(environment, str):
        return f"environmentId must be a string, not {_shown(environment)}"
    if not environment.strip():
        return f"environmentId must be a non-empty string, not {_shown(environment)}"
    time = item.get("time")
    if not isinstance(time, int) or isinstance(time, bool) or not MIN_TIME_MS <= time <= MAX_TIME_MS:
        return (f"time must be an integer of milliseconds from {MIN_TIME_MS} to {MAX_TIME_MS} "
                f"(1970-01-01 to 9999-12-31 UTC), not {_shown(time)}")
    version = item.get("splitVersionNumber")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)
                                or not INT64_MIN <= version <= INT64_MAX):
        return f"splitVersionNumber must be null or a 64-bit integer, not {_shown(version)}"
    return None


class _DuplicateKeys(dict):
    """A JSON object that named a key more than once (DuckDB's reader refuses such an impression)."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) == len(pairs):
        return result
    marked = _DuplicateKeys(result)
    counts = Counter(key for key, _ in pairs)
    marked.duplicates = [key for key, n in counts.items() if n > 1]
    return marked


# orjson keeps the last of duplicate keys without a word, so the body is parsed by the standard library's decoder
# with a hook that sees every key (after orjson's stricter check: UTF-8, no BOM, no NaN, no lone surrogate).
_DECODER = json.JSONDecoder(object_pairs_hook=_object)


def check_impressions(body: bytes, compressed: bool, limit: int) -> int:
    """The number of impressions in a webhook body; BodyRefused when it is not a JSON array of impressions the
    loader can use in full (so a 200 is never followed by a quarantine of that body)."""
    data = gunzip(body, limit, "MIXSYNC_WEBHOOK_MAX_BYTES") if compressed else body
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BodyRefused(400, f"the body is not valid JSON: {exc}") from None
    try:
        items = _DECODER.decode(data.decode())
    except RecursionError:
        raise BodyRefused(400, "the body is not valid JSON: nested too deeply") from None
    if not isinstance(items, list):
        raise BodyRefused(400, f"the body is a JSON {type(items).__name__}, not an array of impressions")
    # One pass over a few hundred small dicts per request; the bulk parsing happens later, in DuckDB.
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise BodyRefused(400, f"element {position} is a JSON {type(item).__name__}, not an impression object")
        if isinstance(item, _DuplicateKeys):
            names = ", ".join(json.dumps(name) for name in dict.fromkeys(item.duplicates))
            raise BodyRefused(400, f"element {position} names the key {names} more than once")
        if not item.keys() >= REQUIRED_FIELDS:
            missing = ", ".join(sorted(REQUIRED_FIELDS - item.keys()))
            raise BodyRefused(400, f"element {position} lacks {missing}")
        reason = _invalid(item)
        if reason:
            raise BodyRefused(400, f"element {position}: {reason}")
    return len(items)


def build_app(settings: ImpressionsSettings) -> Starlette:
    """The webhook app. With MIXSYNC_WEBHOOK_TOKEN set, only POST /impressions/<token> lands anything."""
    stats = ReceiverStats()
    token = settings.webhook_token.value if settings.webhook_token else None

    def land(body: bytes, compressed: bool):
        count = check_impressions(body, compressed, settings.max_body_bytes)
        if count == 0:
            return 0, None
        if compressed and not duckdb_reads_gzip_header(body):
            # Valid gzip that DuckDB's reader would refuse: landed decompressed, so that this 200 too means it loads.
            body, compressed = gunzip(body, settings.max_body_bytes, "MIXSYNC_WEBHOOK_MAX_BYTES"), False
        # Raw bytes as received (still gzipped): the landed file is exactly what Split sent.
        return count, write_atomically(settings.impressions_dir, new_file_name(compressed), body)

    async def receive(request: Request) -> Response:
        given = request.path_params.get("token")
        if token is not None and given is None:
            return PlainTextResponse("this receiver needs its token in the URL: POST /impressions/<token>",
                                     status_code=401)
        if given is not None and (token is None or not hmac.compare_digest(given.encode(), token.encode())):
            return PlainTextResponse("not found", status_code=404)
        try:
            body = await read_body(request, settings.max_body_bytes, "MIXSYNC_WEBHOOK_MAX_BYTES")
            # Split gzips unless told not to; trust the magic bytes as much as the header.
            compressed = (request.headers.get("content-encoding", "").lower() == "gzip"
                          or body[:2] == GZIP_MAGIC)
            # One hop to a worker thread for the checks and the fsynced write: the event loop keeps accepting.
            count, path = await run_in_threadpool(land, body, compressed)
        except ClientDisconnect:
            # The sender went away (or was cut off for being too slow) before its body arrived: nothing to land.
            stats.add(refused=1)
            return Response(status_code=400)
        except BodyRefused as refused:
            stats.add(refused=1)
            log.warning("refused a webhook body: %s", refused.message)
            return JSONResponse({"error": refused.message}, status_code=refused.status)
        except OSError as exc:
            stats.add(failed=1)
            log.error("could not persist a webhook body: %s", exc)
            # Not 200: Split retries once after 300 ms, and a body we did not persist must not be acknowledged.
            return JSONResponse({"error": f"could not persist the body: {exc.strerror or exc}"}, status_code=503)
        if path is None:
            return PlainTextResponse("ok: no impressions", status_code=200)
        stats.add(written=1, impressions=count)
        log.info("landed %s (%d impressions)", path.name, count)
        return PlainTextResponse("ok", status_code=200)

    async def health(request: Request) -> Response:
        # Counts only: no path, setting or version a stranger could use.
        return JSONResponse({"status": "ok", **stats.as_dict()})

    app = Starlette(routes=[
        Route(WEBHOOK_PATH, receive, methods=["POST"]),
        Route(WEBHOOK_PATH + "/{token}", receive, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ])
    app.state.stats = stats
    return app


def run(host: str, port: int, settings: ImpressionsSettings | None = None, limits: ServerLimits | None = None) -> None:
    """Serve the webhook until SIGTERM or Ctrl-C (the `mixsync receive-impressions` command)."""
    settings = settings or ImpressionsSettings.from_env()
    limits = limits or ServerLimits.from_env()
    refuse_open_without_token(host, settings.webhook_token is not None, "MIXSYNC_WEBHOOK_TOKEN")
    settings.impressions_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = WEBHOOK_PATH + ("/<MIXSYNC_WEBHOOK_TOKEN>" if settings.webhook_token else "")
    log.info("receiving Split impressions on POST http://%s:%d%s into %s", host, port, path, settings.impressions_dir)
    if settings.webhook_token is None:
        log.warning("MIXSYNC_WEBHOOK_TOKEN is not set: any local process can post impressions")
    serve(build_app(settings), host, port, limits)
