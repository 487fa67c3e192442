"""Mixpanel's query API (cohorts list, engage) through MixpanelClient: page bodies go to disk as they arrive."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from mixsync.http import ServiceError
from mixsync.mixpanel.client import HINTS, MixpanelClient

NO_PROFILES_HINT = (
    "This Mixpanel plan does not include user profiles, so cohort members cannot be read through the engage "
    "API; upgrade the plan or leave mixpanel_cohort_members (and flagsmith_cohort_traits) unscheduled"
)
QUERY_HINTS = {**HINTS, 402: NO_PROFILES_HINT}
# Safety net against a server that never says it is done: no real cohort needs this many pages.
MAX_PAGES = 100_000


class NoProfilesPlan(ServiceError):
    """402 from the query API: the project's plan has no profiles."""


@dataclass
class MembersDownload:
    cohort_id: int
    directory: Path
    pages: list[Path] = field(default_factory=list)
    total: int | None = None
    members: int = 0
    bytes: int = 0


def _query(client: MixpanelClient, path: str, what: str, data: dict[str, str] | None = None):
    try:
        return client.send("POST", f"{client.settings.query_url}{path}", what, hints=QUERY_HINTS,
                           params={"project_id": client.settings.project_id}, data=data)
    except ServiceError as exc:
        if exc.status == 402:
            raise NoProfilesPlan(str(exc), exc.status, exc.body) from None
        raise


def list_cohorts(client: MixpanelClient) -> bytes:
    """The JSON array of every cohort of the project ({"id", "name", "description", "count", "is_visible",
    "created", "project_id"}), as sent: DuckDB reads and validates it."""
    response = _query(client, "/cohorts/list", "Mixpanel cohorts list")
    try:
        cohorts = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise ServiceError(f"Mixpanel cohorts list is not JSON: {response.content[:200]!r}") from None
    if not isinstance(cohorts, list):
        raise ServiceError(f"Mixpanel cohorts list answered a JSON {type(cohorts).__name__}, not a list of cohorts")
    return response.content


def download_cohort_members(client: MixpanelClient, cohort_id: int, directory: Path,
                            output_properties: list[str], page_size: int) -> MembersDownload:
    """Page through engage for one cohort, writing each page body verbatim to `directory` for DuckDB to read.

    Pages are 0-based; pages after the first carry the first page's session_id, so they come from the same
    result set even if the cohort changes meanwhile. `total` is only on the first page.
    """
    directory = directory / f"cohort-{cohort_id}-{uuid.uuid4().hex[:8]}"
    directory.mkdir(parents=True, exist_ok=True)
    download = MembersDownload(cohort_id, directory)
    form = {
        "filter_by_cohort": orjson.dumps({"id": cohort_id}).decode(),
        "output_properties": orjson.dumps(["$distinct_id", *output_properties]).decode(),
        "include_all_users": "true",
        "page_size": str(page_size),
    }
    session_id = None
    for page in range(MAX_PAGES):
        data = {**form, "page": str(page)}
        if session_id is not None:
            data["session_id"] = session_id
        response = _query(client, "/engage", f"Mixpanel engage (cohort {cohort_id}, page {page})", data)
        body = response.content
        parsed = orjson.loads(body)
        results = parsed.get("results") or []
        if page == 0:
            session_id = parsed.get("session_id")
            download.total = parsed.get("total")
        if not results:
            break
        path = directory / f"page-{page:06d}.json"
        path.write_bytes(body)
        download.pages.append(path)
        download.members += len(results)
        download.bytes += len(body)
        served = int(parsed.get("page_size") or page_size)
        if download.total is not None and download.total <= served * (page + 1):
            break
        if session_id is None:
            raise ServiceError(f"Mixpanel engage for cohort {cohort_id} returned no session_id on the first page; "
                               "later pages cannot be requested")
    else:
        raise ServiceError(f"Mixpanel engage for cohort {cohort_id} did not finish within {MAX_PAGES} pages")
    return download
