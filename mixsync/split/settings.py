"""Split settings from the environment: the server-side SDK key, the Events API URL, the mapping, the push."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mixsync.settings import Secret, SettingsError, parse_int, parse_url, require

DEFAULT_EVENTS_URL = "https://events.split.io"
# Split documents no cap per request; its SDKs flush up to 5000. Past 1000 one refused batch costs too much.
MAX_BATCH_EVENTS = 1000


@dataclass(frozen=True)
class SplitSettings:
    sdk_key: Secret = field(repr=False)
    events_url: str
    traffic_type: str
    environment: str | None
    mapping_file: Path | None
    batch_size: int
    max_batch_bytes: int
    concurrency: int
    request_timeout_seconds: float = 60.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SplitSettings:
        environ = os.environ if environ is None else environ
        sdk_key = require(environ, "SPLIT_SDK_KEY",
                          "the server-side SDK key of the Split environment the events go to (Admin keys do not work)")
        if any(c.isspace() for c in sdk_key):
            raise SettingsError("SPLIT_SDK_KEY contains whitespace: paste the key alone")
        traffic_type = (environ.get("SPLIT_TRAFFIC_TYPE") or "user").strip()
        if not traffic_type or any(c.isspace() for c in traffic_type):
            raise SettingsError(f"SPLIT_TRAFFIC_TYPE={traffic_type!r} is not a traffic type name")
        if traffic_type != traffic_type.lower():
            raise SettingsError(f"SPLIT_TRAFFIC_TYPE={traffic_type!r}: Split's traffic type names are lowercase "
                                f"(use {traffic_type.lower()!r})")
        mapping_file = (environ.get("SPLIT_MAPPING_FILE") or "").strip()
        return cls(
            sdk_key=Secret(sdk_key),
            events_url=parse_url(environ, "SPLIT_EVENTS_URL", DEFAULT_EVENTS_URL),
            traffic_type=traffic_type,
            environment=(environ.get("SPLIT_ENVIRONMENT") or "").strip() or None,
            mapping_file=Path(mapping_file).expanduser() if mapping_file else None,
            batch_size=parse_int(environ, "SPLIT_BATCH_SIZE", MAX_BATCH_EVENTS, minimum=1, maximum=MAX_BATCH_EVENTS),
            max_batch_bytes=parse_int(environ, "SPLIT_MAX_BATCH_BYTES", 2 << 20, minimum=64 << 10, maximum=16 << 20),
            concurrency=parse_int(environ, "SPLIT_PUSH_CONCURRENCY", 4, minimum=1, maximum=32),
            # How long to wait for Split's answer once a batch is sent; past it the batch is in doubt, not resent.
            request_timeout_seconds=parse_int(environ, "SPLIT_REQUEST_TIMEOUT_SECONDS", 60, minimum=1, maximum=3600),
        )
