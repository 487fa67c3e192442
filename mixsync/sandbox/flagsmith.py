"""An emulated Flagsmith identities/traits API, as observed on a real server (v2.265.0) and the Edge API."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mixsync.sandbox.server import Faults, Recorder, control_routes, fault_response, record

# Fault routes: state.faults.add(route, status=429, retry_after="1"). PARTIAL_BULK_ROUTE (any kind) makes the
# next non-empty bulk-identities request apply only its first half and still answer 202.
IDENTITIES_ROUTE = "identities"
IDENTITIES_READ_ROUTE = "identities_read"
BULK_IDENTITIES_ROUTE = "bulk_identities"
TRAITS_BULK_ROUTE = "traits_bulk"
PARTIAL_BULK_ROUTE = "bulk_identities_partial"

MAX_INT = 2**31 - 1
MAX_STRING = 2000
MAX_TRAIT_KEY = 200
MAX_IDENTIFIER = 2000
MAX_BULK_IDENTITIES = 100
FORBIDDEN = {"detail": "Invalid or missing Environment Key"}


class ServerError(Exception):
    """What the real server answers with a bare 500 (integer overflow, over-long identifier, duplicate keys)."""


class BadRequest(Exception):
    def __init__(self, body: Any):
        super().__init__(str(body))
        self.body = body


@dataclass
class FlagsmithSandbox:
    """What the emulated Flagsmith holds: identities and their traits, and every trait write it applied.

    api: "edge" (bulk-identities and the deprecated traits/bulk), "core" (self-hosted: traits/bulk, no
    bulk-identities: 404) or "identities" (neither bulk route).
    """

    api: str = "core"
    server_key: str = "ser.sandbox-server-key"
    client_key: str = "sandbox-client-key"
    allow_client_traits: bool = False
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)
    writes: Counter = field(default_factory=Counter)
    recorder: Recorder = field(default_factory=Recorder)
    faults: Faults = field(default_factory=Faults)
    # Hold writes after this many write requests: they wait for release() and then fail unapplied (a crash test).
    hold_after_requests: int | None = None
    held: int = 0
    write_requests: int = 0
    _release: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _next_trait_id: int = 1

    def env(self, url: str) -> dict[str, str]:
        return {"FLAGSMITH_API_URL": f"{url}/api/v1", "FLAGSMITH_ENVIRONMENT_KEY": self.server_key}

    def traits(self, identifier: str) -> dict[str, Any]:
        with self._lock:
            return dict(self.identities.get(identifier, {}))

    def all_traits(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {identifier: dict(traits) for identifier, traits in self.identities.items()}

    def set_trait(self, identifier: str, key: str, value: Any) -> None:
        """Seed a trait as a person (or another tool) would have set it, outside mixsync."""
        with self._lock:
            self.identities.setdefault(identifier, {})[key] = value

    def release(self) -> None:
        self._release.set()

    # --- the write semantics shared by every route ---

    def _apply(self, identifier: str, traits: list[tuple[str, Any]], overwrite: bool = False) -> None:
        with self._lock:
            stored = self.identities.setdefault(identifier, {})
            if overwrite:
                stored.clear()
            for key, value in traits:
                self.writes[(identifier, key)] += 1
                if value is None:
                    stored.pop(key, None)  # null deletes
                else:
                    stored[key] = value

    def _trait_json(self, identifier: str) -> list[dict[str, Any]]:
        with self._lock:
            items = list(self.identities.get(identifier, {}).items())
        return [{"id": abs(hash((identifier, k))) % 10**9, "trait_key": k, "trait_value": v, "transient": False}
                for k, v in items]


def _stored_value(value: Any) -> Any:
    """Flagsmith keeps bool/int/float/str; lists and dicts end up as their Python repr."""
    if isinstance(value, (list, dict)):
        return repr(value)
    return value


def _checked_traits(traits: Any) -> list[tuple[str, Any, bool]]:
    """(key, value, transient) of a `traits` list, or the 400/500 the real server gives."""
    if traits is None:
        return []
    if not isinstance(traits, list):
        raise BadRequest({"traits": ['Expected a list of items but got type "%s".' % type(traits).__name__]})
    checked = []
    errors: list[dict] = []
    for trait in traits:
        error: dict[str, list[str]] = {}
        if not isinstance(trait, dict):
            errors.append({"non_field_errors": ["Invalid data. Expected a dictionary."]})
            continue
        key = trait.get("trait_key")
        if not isinstance(key, str) or not key.strip():
            error["trait_key"] = ["This field is required."]
        elif len(key.strip()) > MAX_TRAIT_KEY:
            error["trait_key"] = [f"Ensure this field has no more than {MAX_TRAIT_KEY} characters."]
        value = trait.get("trait_value")
        if isinstance(value, str) and len(value) > MAX_STRING:
            error["trait_value"] = [f"Value string is too long. Must be less than {MAX_STRING} character"]
        errors.append(error)
        if not error:
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_INT:
                raise ServerError("integer trait value above 2**31-1")
            checked.append((key.strip(), _stored_value(value), bool(trait.get("transient"))))
    if any(errors):
        raise BadRequest({"traits": errors})
    return checked


def _key(request: Request, state: FlagsmithSandbox) -> str | None:
    key = request.headers.get("x-environment-key", "")
    return key if key in (state.server_key, state.client_key) else None


def _server_error() -> Response:
    return PlainTextResponse("Server Error (500)", status_code=500)


async def _body(request: Request) -> Any:
    try:
        return orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise BadRequest({"detail": f"JSON parse error - {exc}"}) from None


async def _hold_if_asked(state: FlagsmithSandbox) -> Response | None:
    """With hold_after_requests set, writes past that count hang until release(), then fail without applying."""
    with state._lock:
        state.write_requests += 1
        hold = state.hold_after_requests is not None and state.write_requests > state.hold_after_requests
        if hold:
            state.held += 1
    if not hold:
        return None
    while not state._release.is_set():
        await asyncio.sleep(0.01)
    return PlainTextResponse("held by the sandbox and dropped", status_code=503)


def _handler(route: str, handle, write: bool = True):
    async def endpoint(request: Request) -> Response:
        state: FlagsmithSandbox = request.app.state.flagsmith
        recorded = await record(state.recorder, request)
        key = _key(request, state)
        if key is None:
            response: Response = JSONResponse(FORBIDDEN, status_code=403)
        elif (fault := state.faults.take(route)) is not None:
            response = fault_response(fault)
        else:
            response = await _hold_if_asked(state) if write else None
            if response is None:
                try:
                    response = await handle(state, request, key == state.server_key)
                except BadRequest as exc:
                    response = JSONResponse(exc.body, status_code=400)
                except ServerError:
                    response = _server_error()
        recorded.status = response.status_code
        return response

    return endpoint


async def post_identity(state: FlagsmithSandbox, request: Request, server_side: bool) -> Response:
    body = await _body(request)
    if not isinstance(body, dict):
        raise BadRequest({"non_field_errors": ["Invalid data. Expected a dictionary."]})
    identifier = body.get("identifier")
    identifier = identifier.strip() if isinstance(identifier, str) else ""
    traits = _checked_traits(body.get("traits"))
    if not identifier:
        # Observed: no identifier gives 200 and a transient identity with a hashed identifier; nothing stored.
        hashed = hashlib.sha256(orjson.dumps(body.get("traits") or [])).hexdigest()
        return JSONResponse({"identifier": hashed, "traits": [
            {"id": None, "trait_key": k, "trait_value": v, "transient": True} for k, v, _ in traits], "flags": []})
    if len(identifier) > MAX_IDENTIFIER:
        return _server_error()
    new_identity = identifier not in state.identities
    keys = [k for k, _, _ in traits]
    if len(keys) != len(set(keys)):
        if new_identity:
            state._apply(identifier, [])  # observed: not atomic, the identity exists afterwards without traits
            return _server_error()
        seen: set[str] = set()
        traits = [t for t in traits if not (t[0] in seen or seen.add(t[0]))]  # the first value wins
    persistent = [(k, v) for k, v, transient in traits if not transient]
    if server_side or state.allow_client_traits:
        state._apply(identifier, persistent)
    else:
        state._apply(identifier, [])  # a client key in an environment without client traits: silently dropped
    return JSONResponse({"identifier": identifier, "traits": state._trait_json(identifier), "flags": []})


async def get_identity(state: FlagsmithSandbox, request: Request, server_side: bool) -> Response:
    identifier = (request.query_params.get("identifier") or "").strip()
    if not identifier:
        raise BadRequest({"detail": "Missing identifier"})
    if len(identifier) > MAX_IDENTIFIER:
        return _server_error()
    state._apply(identifier, [])  # the SDK read creates the identity, as the real server does
    return JSONResponse({"identifier": identifier, "traits": state._trait_json(identifier), "flags": []})


async def bulk_identities(state: FlagsmithSandbox, request: Request, server_side: bool) -> Response:
    if state.api != "edge":
        return JSONResponse({"detail": "Not found."}, status_code=404)
    if not server_side:
        return JSONResponse(FORBIDDEN, status_code=403)
    body = await _body(request)
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise BadRequest({"data": ["This field is required."]})
    if len(data) > MAX_BULK_IDENTITIES:
        raise BadRequest({"data": [f"Ensure this field has no more than {MAX_BULK_IDENTITIES} elements."]})
    parsed = []
    for item in data:
        identifier = item.get("identifier") if isinstance(item, dict) else None
        if not isinstance(identifier, str) or not identifier.strip():
            raise BadRequest({"data": [{"identifier": ["This field is required."]}]})
        parsed.append((identifier.strip(), _checked_traits(item.get("traits"))))
    if parsed and state.faults.take(PARTIAL_BULK_ROUTE) is not None:
        # Seen under load: the 202 came back, but only part of the request was applied.
        parsed = parsed[: len(parsed) // 2]
    overwrite = request.method == "POST"
    for identifier, traits in parsed:
        state._apply(identifier, [(k, v) for k, v, transient in traits if not transient], overwrite=overwrite)
    return Response(status_code=202)


async def traits_bulk(state: FlagsmithSandbox, request: Request, server_side: bool) -> Response:
    if state.api == "identities":
        return JSONResponse({"detail": "Not found."}, status_code=404)
    if request.method != "PUT":
        return JSONResponse({"detail": f'Method "{request.method}" not allowed.'}, status_code=405)
    body = await _body(request)
    if not isinstance(body, list):
        raise BadRequest({"non_field_errors": ["Expected a list of items but got type \"dict\"."]})
    by_identity: dict[str, list[tuple[str, Any]]] = {}
    errors = []
    for item in body:
        identity = item.get("identity") if isinstance(item, dict) else None
        identifier = identity.get("identifier") if isinstance(identity, dict) else None
        if not isinstance(identifier, str) or not identifier.strip():
            errors.append({"identity": ["This field is required."]})
            continue
        try:
            (key, value, _), = _checked_traits([{k: v for k, v in item.items() if k != "identity"}])
        except BadRequest as exc:
            errors.append(exc.body["traits"][0])
            continue
        errors.append({})
        by_identity.setdefault(identifier.strip(), []).append((key, value))
    if any(errors):
        raise BadRequest(errors)
    if server_side or state.allow_client_traits:
        for identifier, traits in by_identity.items():
            state._apply(identifier, traits)
    return JSONResponse(body)


def build_app(state: FlagsmithSandbox) -> Starlette:
    routes = [
        Route("/api/v1/identities/", _handler(IDENTITIES_ROUTE, post_identity), methods=["POST"]),
        Route("/api/v1/identities/", _handler(IDENTITIES_READ_ROUTE, get_identity, write=False), methods=["GET"]),
        Route("/api/v1/bulk-identities/", _handler(BULK_IDENTITIES_ROUTE, bulk_identities), methods=["PUT", "POST"]),
        Route("/api/v1/traits/bulk/", _handler(TRAITS_BULK_ROUTE, traits_bulk), methods=["PUT", "POST"]),
    ]
    app = Starlette(routes=routes + control_routes(state.recorder, state.faults))
    app.state.flagsmith = state
    return app
