"""Mixpanel's /import (strict mode, gzip): send one batch of events, learn which ones Mixpanel refused."""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field

import orjson

from mixsync.http import ServiceError
from mixsync.mixpanel.client import HINTS, MixpanelClient

IMPORT_HINTS = {
    **HINTS,
    400: "Mixpanel refused the whole request; check the event payloads",
    413: "The batch is over Mixpanel's size limit; lower MIXSYNC_EXPOSURES_BATCH_SIZE",
}


@dataclass
class ImportResult:
    imported: int
    failed: dict[int, str] = field(default_factory=dict)   # position in the batch -> Mixpanel's message


def _failure_message(record: dict) -> str:
    field_name = record.get("field")
    message = record.get("message") or "rejected"
    return f"{field_name}: {message}" if field_name and field_name not in message else str(message)


def import_events(client: MixpanelClient, payloads: list[bytes], gzip_level: int = 1) -> ImportResult:
    """POST `payloads` (JSON objects as bytes) to /import?strict=1 as one gzipped JSON array.

    A strict-mode 400 that lists `failed_records` is a partial success: the other events were imported, so the
    failures are returned rather than raised and must not be resent. Any other 4xx raises ServiceError; 429 and
    5xx are retried by the client's policy.
    """
    settings = client.settings
    body = b"[" + b",".join(payloads) + b"]"
    response = client.send(
        "POST", f"{settings.ingestion_url}/import", "Mixpanel import", ok_statuses=(400,), hints=IMPORT_HINTS,
        params={"strict": "1", "project_id": settings.project_id},
        # Level 1: nearly all of level 6's saving for a fraction of the CPU on JSON this repetitive.
        content=gzip.compress(body, compresslevel=gzip_level),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    try:
        answer = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        answer = None
    if response.status_code == 200:
        imported = answer.get("num_records_imported", len(payloads)) if isinstance(answer, dict) else len(payloads)
        return ImportResult(imported)
    records = answer.get("failed_records") if isinstance(answer, dict) else None
    if not records:
        excerpt = response.content[:500].decode("utf-8", errors="replace")
        raise ServiceError(f"Mixpanel import answered HTTP 400: {excerpt}. {IMPORT_HINTS[400]}", status=400, body=excerpt)
    failed: dict[int, str] = {}
    positions_by_id: dict[str, int] | None = None
    for record in records:
        index = record.get("index")
        if not isinstance(index, int) or not 0 <= index < len(payloads):
            insert_id = record.get("$insert_id") or record.get("insert_id")
            if positions_by_id is None:
                positions_by_id = {orjson.loads(p).get("properties", {}).get("$insert_id"): n for n, p in enumerate(payloads)}
            index = positions_by_id.get(insert_id)
            if index is None:
                raise ServiceError(f"Mixpanel import reported a failed record we cannot place in the batch: {record}",
                                   status=400)
        message = _failure_message(record)
        failed[index] = f"{failed[index]}; {message}" if index in failed else message
    return ImportResult(int(answer.get("num_records_imported", len(payloads) - len(failed))), failed)
