"""Emulated Mixpanel query API: the cohorts list and engage, with seeded cohorts whose membership moves per generation."""

from __future__ import annotations

import collections
import datetime as dt
import random
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mixsync.sandbox.data import user_ids
from mixsync.sandbox.mixpanel import json_string_list
from mixsync.sandbox.server import fault_response, record

# Fault routes: state.faults.add(COHORTS_ROUTE, status=429, ...) plans a misbehaviour of the next request.
COHORTS_ROUTE = "cohorts_list"
ENGAGE_ROUTE = "engage"
DEFAULT_PAGE_SIZE = 1000
# Mixpanel's documented query API limits: 60 queries per rolling hour and 5 running concurrently per project.
QUERIES_PER_HOUR = 60
CONCURRENT_QUERIES = 5
MAX_SESSIONS = 32
PLANS = ("free", "growth", "enterprise")


@dataclass
class SandboxCohort:
    """One emulated cohort: its population, its members at generation 0, and how much it churns per generation."""

    id: int
    name: str
    description: str
    population: list[str]
    size: int
    churn: float = 0.1
    is_visible: int = 1
    created: str = "2024-01-15 09:30:00"
    members: list[str] = field(default_factory=list)

    def start(self, seed: int) -> None:
        self.members = sorted(random.Random(f"{seed}-{self.id}").sample(self.population, self.size))

    def advance(self, seed: int, generation: int, leave: float | None = None, enter: float | None = None) -> tuple[int, int]:
        """Move membership one generation: `leave` of the members exit, `enter` (of the size) join from outside."""
        rng = random.Random(f"{seed}-{self.id}-{generation}")
        leave = self.churn / 2 if leave is None else leave
        enter = self.churn / 2 if enter is None else enter
        current = set(self.members)
        leaving = set(rng.sample(self.members, min(len(self.members), round(len(self.members) * leave))))
        outside = [p for p in self.population if p not in current]
        entering = rng.sample(outside, min(len(outside), round(self.size * enter)))
        self.members = sorted((current - leaving) | set(entering))
        return len(entering), len(leaving)


def profile_properties(distinct_id: str) -> dict[str, Any]:
    """A profile's properties, derived from its id so every generation agrees; some profiles have no email."""
    number = sum(ord(c) for c in distinct_id)
    props: dict[str, Any] = {
        "$name": f"Person {distinct_id}",
        "plan": PLANS[number % len(PLANS)],
        "$created": "2024-03-01T10:00:00",
        "$last_seen": "2025-06-01T12:34:56",
    }
    if number % 10 != 0:
        props["$email"] = f"{distinct_id.replace('$', '').replace(':', '-')}@example.com"
    if number % 7 == 0:
        props["user_id"] = 10_000_000 + number  # a numeric user id, as some teams identify people
    return props


@dataclass
class QueryState:
    """The emulated query API's cohorts, engage sessions, and the rolling-hour query log."""

    seed: int
    cohorts: dict[int, SandboxCohort] = field(default_factory=dict)
    generation: int = 0
    sessions: dict[str, list[str]] = field(default_factory=dict)
    queries_per_hour: int | None = QUERIES_PER_HOUR
    concurrent_limit: int = CONCURRENT_QUERIES
    profiles_in_plan: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _recent: collections.deque = field(default_factory=collections.deque)
    _running: int = 0

    def add_cohort(self, name: str, size: int, population: list[str] | None = None, churn: float = 0.1,
                   description: str = "", cohort_id: int | None = None) -> SandboxCohort:
        cohort_id = cohort_id if cohort_id is not None else 1000 + len(self.cohorts) + 1
        cohort = SandboxCohort(cohort_id, name, description, population or [], size, churn)
        cohort.start(self.seed)
        self.cohorts[cohort_id] = cohort
        return cohort

    def advance(self, leave: float | None = None, enter: float | None = None) -> dict[int, tuple[int, int]]:
        """The next generation: every cohort loses and gains some members. Returns {id: (entered, left)}."""
        with self._lock:
            self.generation += 1
            return {c.id: c.advance(self.seed, self.generation, leave, enter) for c in self.cohorts.values()}

    def rename(self, cohort_id: int, name: str) -> None:
        self.cohorts[cohort_id].name = name

    def members(self, cohort_id: int) -> list[str]:
        return list(self.cohorts[cohort_id].members)

    def _admit(self, project_id: str) -> Response | None:
        """Count one query against the hourly and concurrency limits, or answer 429 as Mixpanel does."""
        now = time.monotonic()
        with self._lock:
            while self._recent and now - self._recent[0] > 3600:
                self._recent.popleft()
            over_hour = self.queries_per_hour is not None and len(self._recent) >= self.queries_per_hour
            if over_hour or self._running >= self.concurrent_limit:
                retry_after = int(3600 - (now - self._recent[0])) + 1 if over_hour else None
                message = (f"Query rate limit exceeded for project_id: {project_id}. {self._running}/{self.concurrent_limit} "
                           f"queries running concurrently and {len(self._recent) + 1}/{self.queries_per_hour} queries "
                           "running in the last hour. Please try again later.")
                headers = {"Retry-After": str(retry_after)} if retry_after else {}
                return JSONResponse({"request": "", "error": message}, status_code=429, headers=headers)
            self._recent.append(now)
            self._running += 1
        return None

    def _done(self) -> None:
        with self._lock:
            self._running -= 1


def create_state(mixpanel_state) -> QueryState:
    """Seeded cohorts of different sizes drawn from the dataset's users, one of them with an awkward name."""
    users = user_ids(mixpanel_state.dataset.users, mixpanel_state.dataset.seed)
    state = QueryState(seed=mixpanel_state.dataset.seed)
    size = len(users)
    state.add_cohort("Power Users", max(1, size // 5), users, description="Used the product 20+ days last month")
    state.add_cohort("Churn Risk", max(1, size // 20), users, description="No session for 14 days")
    state.add_cohort("Beta Testers (EU)", max(1, size // 100), users, description="Opted in to beta features")
    state.add_cohort("Checkout: Abandoned 🛒", max(1, size // 10), users, description="Left a cart this week")
    return state


async def _form(request: Request) -> dict[str, str] | None:
    """Mixpanel's query API takes parameters in the query string and in the body, form-encoded or as a JSON
    object (Airbyte's connector sends `{"filter_by_cohort": "{\"id\":N}"}`). JSON values that are objects or
    arrays count as their JSON text, as if form-encoded. None when a JSON body is not an object."""
    params = dict(request.query_params)
    if request.method == "POST":
        body = await request.body()
        if request.headers.get("content-type", "").lower().startswith("application/json"):
            try:
                parsed = orjson.loads(body) if body.strip() else {}
            except orjson.JSONDecodeError:
                return None
            if not isinstance(parsed, dict):
                return None
            params.update({k: v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in parsed.items()})
        else:
            params.update(urllib.parse.parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True))
    return params


async def cohorts_list(request: Request) -> Response:
    state = request.app.state.mixpanel
    recorded = await record(state.recorder, request)
    response = _answer(state, request, COHORTS_ROUTE, lambda: _cohorts(state))
    recorded.status = response.status_code
    return response


def _cohorts(state) -> Response:
    query: QueryState = state.query
    body = [{"id": c.id, "name": c.name, "description": c.description, "count": len(c.members),
             "is_visible": c.is_visible, "created": c.created, "project_id": int(state.project_id)}
            for c in query.cohorts.values()]
    return Response(orjson.dumps(body), media_type="application/json")


def _answer(state, request: Request, route: str, build) -> Response:
    denied = state.authenticate(request)
    if denied:
        return denied
    fault = state.faults.take(route)
    if fault is not None:
        return fault_response(fault)
    query: QueryState = state.query
    if not query.profiles_in_plan:
        return JSONResponse({"error": "Your plan does not include access to user profiles. Upgrade to query "
                                      "profiles.", "status": "error"}, status_code=402)
    refused = query._admit(state.project_id)
    if refused is not None:
        return refused
    try:
        return build()
    finally:
        query._done()


async def engage(request: Request) -> Response:
    state = request.app.state.mixpanel
    recorded = await record(state.recorder, request)
    params = await _form(request)
    if params is None:
        response: Response = PlainTextResponse("a JSON request body must be an object of parameters", status_code=400)
    else:
        response = _answer(state, request, ENGAGE_ROUTE, lambda: _engage(state, params))
    recorded.status = response.status_code
    return response


def _engage(state, params: dict[str, str]) -> Response:
    query: QueryState = state.query
    try:
        page = int(params.get("page", "0"))
        page_size = int(params.get("page_size", str(DEFAULT_PAGE_SIZE)))
    except ValueError:
        return PlainTextResponse("page and page_size must be integers", status_code=400)
    if page < 0 or page_size < 1:
        return PlainTextResponse("page must be >= 0 and page_size >= 1", status_code=400)
    output_properties = None
    if "output_properties" in params:
        output_properties = json_string_list(params["output_properties"])
        if output_properties is None:
            return PlainTextResponse("output_properties must be a JSON array of property names", status_code=400)
    session_id = params.get("session_id")
    if page == 0:
        cohort_filter = params.get("filter_by_cohort")
        if cohort_filter is None:
            return PlainTextResponse("this sandbox serves only cohort queries: filter_by_cohort is required",
                                     status_code=400)
        try:
            cohort_id = int(orjson.loads(cohort_filter)["id"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return PlainTextResponse('filter_by_cohort must be a JSON object like {"id": 123}', status_code=400)
        if cohort_id not in query.cohorts:
            return PlainTextResponse(f"cohort {cohort_id} does not exist", status_code=400)
        # A session freezes the result set, so later pages agree with the first even if the cohort moves.
        session_id = uuid.uuid4().hex
        with query._lock:
            query.sessions[session_id] = list(query.cohorts[cohort_id].members)
            while len(query.sessions) > MAX_SESSIONS:  # sessions expire; keep the sandbox's memory bounded
                query.sessions.pop(next(iter(query.sessions)))
    elif not session_id or session_id not in query.sessions:
        return PlainTextResponse("session_id is required for page > 0: pass the session_id of the first page",
                                 status_code=400)
    members = query.sessions[session_id]
    chunk = members[page * page_size:(page + 1) * page_size]
    results = []
    for distinct_id in chunk:
        props = profile_properties(distinct_id)
        if output_properties is not None:
            props = {k: v for k, v in props.items() if k in output_properties}
        # The spec types $distinct_id as an integer; numeric-looking ids do come back as numbers sometimes.
        results.append({"$distinct_id": int(distinct_id) if distinct_id.isdigit() else distinct_id,
                        "$properties": props})
    body: dict[str, Any] = {"page": page, "page_size": page_size, "session_id": session_id, "status": "ok",
                            "results": results, "computed_at": dt.datetime.now(dt.UTC).isoformat()}
    if page == 0:
        body["total"] = len(members)
    return Response(orjson.dumps(body), media_type="application/json")


def routes() -> list[Route]:
    return [
        Route("/api/query/cohorts/list", cohorts_list, methods=["POST", "GET"]),
        Route("/api/2.0/cohorts/list", cohorts_list, methods=["GET", "POST"]),
        Route("/api/query/engage", engage, methods=["POST", "GET"]),
        Route("/api/2.0/engage", engage, methods=["POST", "GET"]),
    ]
