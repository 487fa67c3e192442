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
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mixsync.sandbox.server import Faults, Recorder, control_routes, fault_response, record

# Fault routes: state.faults.add(route, status=429, retry_after="1"). PARTIAL_BULK_ROUTE (any kind) makes the
# next non-empty bulk-identities request apply only its first half and still answer 202.
IDENTITIES_ROUTE = "identities"
IDENTITIES_READ_ROUTE = "identities_read"
FLAGS_ROUTE = "flags"
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
    # Flagsmith's default: a client key may write traits too (the real server then stores them).
    allow_client_traits: bool = True
    identities: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Features by name: {"id", "type", "enabled", "value"} (the environment's defaults), and per-identity
    # overrides {identifier: {feature name: (enabled, value)}}.
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    overrides: dict[str, dict[str, tuple[bool, Any]]] = field(default_factory=dict)
    writes: Counter = field(default_factory=Counter)
    recorder: Recorder = field(default_factory=Recorder)
    faults: Faults = field(default_factory=Faults)
    # Hold writes after this many write requests: they wait for release() and then fail unapplied (a crash test);
    # with apply_held, they are applied first (the service applied a write and never answered).
    hold_after_requests: int | None = None
    apply_held: bool = False
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

    def add_feature(self, name: str, enabled: bool = True, value: Any = None, feature_type: str = "STANDARD") -> None:
        """Create (or redefine) a feature with its environment default state and remote-config value."""
        with self._lock:
            existing = self.features.get(name)
            feature_id = existing["id"] if existing else 1 + max((f["id"] for f in self.features.values()), default=0)
            self.features[name] = {"id": feature_id, "type": feature_type, "enabled": enabled, "value": value}

    def delete_feature(self, name: str) -> None:
        with self._lock:
            self.features.pop(name, None)
            for overrides in self.overrides.values():
                overrides.pop(name, None)

    def override(self, identifier: str, name: str, enabled: bool, value: Any = None) -> None:
        """An identity override: this identity sees `enabled` and `value` for the feature."""
        with self._lock:
            self.overrides.setdefault(identifier, {})[name] = (enabled, value)

    def flags_json(self, identifier: str | None = None) -> list[dict[str, Any]]:
        """Flags as the SDK API serializes them, with this identity's overrides applied (None: the environment's)."""
        with self._lock:
            overrides = dict(self.overrides.get(identifier, {})) if identifier is not None else {}
            features = list(self.features.items())
        flags = []
        for name, feature in features:
            enabled, value = overrides.get(name, (feature["enabled"], feature["value"]))
            flag = {"id": feature["id"] * 1000 + (1 if name in overrides else 0),
                    "feature": {"id": feature["id"], "name": name, "created_date": "2025-01-01T00:00:00Z",
                                "description": None, "initial_value": _flag_value(feature["value"]),
                                "default_enabled": feature["enabled"], "type": feature["type"]},
                    "feature_state_value": _flag_value(value), "environment": 1,
                    "identity": None, "feature_segment": None, "enabled": enabled}
            if identifier is not None:
                flag["variant"] = None
            flags.append(flag)
        return flags

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


def _flag_value(value: Any) -> Any:
    """Remote-config values keep their type (string, integer, float, boolean) or are null."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a Flagsmith remote-config value is a string, number or boolean, not {type(value).__name__}")


def _identifier(value: Any) -> str:
    """Identifiers are strings; an integer is stringified and stored (observed), surrounding whitespace trimmed."""
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, (int, float)):
        return str(value)
    return value.strip() if isinstance(value, str) else ""


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
        raise BadRequest({"traits": [f'Expected a list of items but got type "{type(traits).__name__}".']})
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
            checked.append((str(key).strip(), _stored_value(value), bool(trait.get("transient"))))
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


def _hold_if_asked(state: FlagsmithSandbox) -> bool:
    """With hold_after_requests set, whether this write is past that count (and is to hang until release())."""
    with state._lock:
        state.write_requests += 1
        hold = state.hold_after_requests is not None and state.write_requests > state.hold_after_requests
        if hold:
            state.held += 1
    return hold


async def _held(state: FlagsmithSandbox) -> Response:
    while not state._release.is_set():
        await asyncio.sleep(0.01)
    return PlainTextResponse("held by the sandbox and dropped", status_code=503)


def _handler(route: str, handle, write: bool = True, exists=lambda state: True):
    async def endpoint(request: Request) -> Response:
        state: FlagsmithSandbox = request.app.state.flagsmith
        recorded = await record(state.recorder, request)
        key = _key(request, state)
        if not exists(state):
            # A route this flavour of Flagsmith does not have: 404 before any key check (observed).
            response: Response = JSONResponse({"detail": "Not found."}, status_code=404)
        elif key is None:
            response = JSONResponse(FORBIDDEN, status_code=403)
        elif (fault := state.faults.take(route)) is not None:
            response = fault_response(fault)
        else:
            hold = _hold_if_asked(state) if write else False
            if not hold or state.apply_held:
                try:
                    response = await handle(state, request, key == state.server_key)
                except BadRequest as exc:
                    response = JSONResponse(exc.body, status_code=400)
                except ServerError:
                    response = _server_error()
            if hold:  # never answered before release() (a held write that was applied: its answer is lost)
                response = await _held(state)
        recorded.status = response.status_code
        return response

    return endpoint


async def post_identity(state: FlagsmithSandbox, request: Request, server_side: bool) -> Response:
    body = await _body(request)
    if not isinstance(body, dict):
        raise BadRequest({"non_field_errors": ["Invalid data. Expected a dictionary."]})
    identifier = _identifier(body.get("identifier"))
    traits = _checked_traits(body.get("traits"))
    if not (server_side or state.allow_client_traits):
        traits = []  # a client key where client traits are off: the traits are dropped silently (observed)
    if not identifier:
        # Observed: no identifier gives 200 and a transient identity with a hashed identifier; nothing stored.
        hashed = hashlib.sha256(orjson.dumps(body.get("traits") or [])).hexdigest()
        return JSONResponse({"identifier": hashed, "traits": [
            {"id": None, "trait_key": k, "trait_value": v, "transient": True} for k, v, _ in traits],
            "flags": state.flags_json(hashed)})
    if len(identifier) > MAX_IDENTIFIER:
        return _server_error()
    if body.get("transient") is True:
        # An identity-level transient request persists nothing: the stored traits, overlaid by the sent ones.
        stored = {t["trait_key"]: t for t in state._trait_json(identifier)}
        for k, v, _ in traits:
            stored[k] = {"id": None, "trait_key": k, "trait_value": v, "transient": True}
        return JSONResponse({"identifier": identifier, "traits": [t for t in stored.values() if t["trait_value"]
                                                                  is not None], "flags": state.flags_json(identifier)})
    new_identity = identifier not in state.identities
    keys = [k for k, _, _ in traits]
    if len(keys) != len(set(keys)):
        if new_identity:
            state._apply(identifier, [])  # observed: not atomic, the identity exists afterwards without traits
            return _server_error()
        first: dict[str, tuple] = {}
        for trait in traits:
            first.setdefault(trait[0], trait)  # the first value wins
        traits = list(first.values())
    state._apply(identifier, [(k, v) for k, v, transient in traits if not transient])
    return JSONResponse({"identifier": identifier, "traits": state._trait_json(identifier),
                         "flags": state.flags_json(identifier)})


async def get_identity(state: FlagsmithSandbox, request: Request, server_side: bool) -> Response:
    identifier = (request.query_params.get("identifier") or "").strip()
    if not identifier:
        return JSONResponse({"detail": "Missing identifier"})  # observed: 200, not 400
    if len(identifier) > MAX_IDENTIFIER:
        return _server_error()
    state._apply(identifier, [])  # the SDK read creates the identity, as the real server does
    return JSONResponse({"identifier": identifier, "traits": state._trait_json(identifier),
                         "flags": state.flags_json(identifier)})


async def environment_flags(state: FlagsmithSandbox, request: Request, server_side: bool) -> Response:
    """GET /flags/: the environment's flags, no identity (a JSON array)."""
    return JSONResponse(state.flags_json())


async def bulk_identities(state: FlagsmithSandbox, request: Request, server_side: bool) -> Response:
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
    """Core's PUT traits/bulk/, in the order the real server works (observed on v2.265.0 and in its code):
    the null items are deleted first, by exact identifier and key (not trimmed, creating nothing); then the
    other items are validated (400 per item, deletes already done) and written, each identity created if needed.
    A key over 200 characters passes validation and fails in the database: a 500 after the deletes."""
    if request.method != "PUT":
        return JSONResponse({"detail": f'Method "{request.method}" not allowed.'}, status_code=405)
    if not (server_side or state.allow_client_traits):
        return HTMLResponse("<h1>Bad Request (400)</h1>", status_code=400)  # "Unable to set traits with client key."
    body = await _body(request)
    if not isinstance(body, list):
        raise BadRequest({"non_field_errors": ['Expected a list of items but got type "dict".']})
    deletes, sets = [], []
    for item in body:
        if isinstance(item, dict) and item.get("trait_value") is None:
            identity = item.get("identity")
            identifier = identity.get("identifier") if isinstance(identity, dict) else None
            deletes.append((identifier, item.get("trait_key")))
        else:
            sets.append(item)
    with state._lock:
        for identifier, key in deletes:
            traits = state.identities.get(str(identifier)) if isinstance(identifier, (str, int)) else None
            if traits is not None and isinstance(key, str):
                state.writes[(str(identifier), key)] += 1
                traits.pop(key, None)
    errors: list[dict] = []
    valid: list[tuple[str, str, Any]] = []
    too_long_key = False
    for item in sets:
        error: dict[str, Any] = {}
        identity = item.get("identity") if isinstance(item, dict) else None
        raw = identity.get("identifier") if isinstance(identity, dict) else None
        identifier = _identifier(raw)
        if not isinstance(item, dict):
            error["non_field_errors"] = ["Invalid data. Expected a dictionary."]
        elif not isinstance(identity, dict) or raw is None:
            error["identity"] = {"identifier": ["This field is required."]} if isinstance(identity, dict) \
                else ["This field is required."]
        elif not identifier:
            error["identity"] = {"identifier": ["This field may not be blank."]}
        elif len(identifier) > MAX_IDENTIFIER:
            error["identity"] = {"identifier": [f"Ensure this field has no more than {MAX_IDENTIFIER} characters."]}
        key = item.get("trait_key") if isinstance(item, dict) else None
        if isinstance(item, dict):
            if not isinstance(key, str) or not key.strip():
                error["trait_key"] = ["This field is required."] if key is None else ["This field may not be blank."]
            value = item.get("trait_value")
            if isinstance(value, str) and len(value) > MAX_STRING:
                error["trait_value"] = [f"Value string is too long. Must be less than {MAX_STRING} character"]
        errors.append(error)
        if not error:
            key = str(key).strip()
            if len(key) > MAX_TRAIT_KEY:
                too_long_key = True
            valid.append((identifier, key, _stored_value(item["trait_value"])))
    if any(errors):
        raise BadRequest(errors)
    if too_long_key or any(isinstance(v, int) and not isinstance(v, bool) and v > MAX_INT for _, _, v in valid):
        # Unknown on the real server: whether writes of other identities in the request land before the failing
        # one. The sandbox applies none of them (the deletes above stay applied, as observed).
        return _server_error()
    by_identity: dict[str, list[tuple[str, Any]]] = {}
    for identifier, key, value in valid:
        by_identity.setdefault(identifier, []).append((key, value))
    for identifier, identity_traits in by_identity.items():
        state._apply(identifier, identity_traits)
    # The answer echoes only the written (non-null) items, as the serializer saw them.
    return JSONResponse([{"identity": {"identifier": identifier}, "trait_value": value, "trait_key": key}
                         for identifier, key, value in valid])


def build_app(state: FlagsmithSandbox) -> Starlette:
    routes = [
        Route("/api/v1/identities/", _handler(IDENTITIES_ROUTE, post_identity), methods=["POST"]),
        Route("/api/v1/identities/", _handler(IDENTITIES_READ_ROUTE, get_identity, write=False), methods=["GET"]),
        Route("/api/v1/flags/", _handler(FLAGS_ROUTE, environment_flags, write=False), methods=["GET"]),
        Route("/api/v1/bulk-identities/", _handler(BULK_IDENTITIES_ROUTE, bulk_identities,
                                                   exists=lambda state: state.api == "edge"), methods=["PUT", "POST"]),
        Route("/api/v1/traits/bulk/", _handler(TRAITS_BULK_ROUTE, traits_bulk,
                                               exists=lambda state: state.api != "identities"), methods=["PUT", "POST"]),
    ]
    app = Starlette(routes=routes + control_routes(state.recorder, state.faults))
    app.state.flagsmith = state
    return app
