"""Settings of the impressions flow: the landing folder, the webhook receiver, the sensor and the exposure mapping."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from mixsync.settings import DEFAULT_LANDING_DIR, Secret, SettingsError, _env, parse_int

AFTER_LOAD_CHOICES = ("archive", "delete")
# Mixpanel /import: at most 2000 events per request and 2 MB of uncompressed JSON (apis/mixpanel.md).
MIXPANEL_IMPORT_MAX_EVENTS = 2000
MIXPANEL_IMPORT_MAX_BYTES = 2_000_000
MIN_TOKEN_LENGTH = 16

# Mixpanel's Experiments report reads `Experiment name` and `Variant name`; the rest are ours to name.
DEFAULT_PROPERTY_NAMES = {
    "experiment": "Experiment name",
    "variant": "Variant name",
    "label": "Split label",
    "split_version": "Split version",
    "environment": "Split environment",
    "environment_id": "Split environment id",
    "sdk": "Split SDK",
    "sdk_version": "Split SDK version",
    "source": "$source",
}
RESERVED_PROPERTIES = {"time", "distinct_id", "$insert_id", "token"}


def _parse_choice(environ: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (_env(environ, name) or default).lower()
    if value not in choices:
        raise SettingsError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def _parse_token(environ: Mapping[str, str]) -> Secret | None:
    value = _env(environ, "MIXSYNC_WEBHOOK_TOKEN")
    if value is None:
        return None
    # The token is a URL path segment and the only protection of the endpoint (Split sends no auth header).
    if len(value) < MIN_TOKEN_LENGTH or not re.fullmatch(r"[A-Za-z0-9_-]+", value):
        raise SettingsError(
            f"MIXSYNC_WEBHOOK_TOKEN must be at least {MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 _ - to be "
            "unguessable; make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )
    return Secret(value)


def _parse_property_names(environ: Mapping[str, str]) -> dict[str, str]:
    names = dict(DEFAULT_PROPERTY_NAMES)
    raw = _env(environ, "MIXSYNC_EXPOSURE_PROPERTY_NAMES")
    if raw is None:
        return names
    try:
        overrides = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise SettingsError("MIXSYNC_EXPOSURE_PROPERTY_NAMES is not a JSON object such as "
                            '{"label": "Targeting rule"}') from None
    if not isinstance(overrides, dict):
        raise SettingsError("MIXSYNC_EXPOSURE_PROPERTY_NAMES must be a JSON object of role -> property name")
    for role, name in overrides.items():
        if role not in DEFAULT_PROPERTY_NAMES:
            raise SettingsError(f"MIXSYNC_EXPOSURE_PROPERTY_NAMES: unknown role {role!r}; "
                                f"known roles: {', '.join(DEFAULT_PROPERTY_NAMES)}")
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise SettingsError(f"MIXSYNC_EXPOSURE_PROPERTY_NAMES: the name for {role!r} must be a non-empty "
                                "string of at most 255 characters")
        if name in RESERVED_PROPERTIES:
            raise SettingsError(f"MIXSYNC_EXPOSURE_PROPERTY_NAMES: {name!r} is set by mixsync itself; pick another name")
        names[role] = name
    if len(set(names.values())) != len(names):
        raise SettingsError("MIXSYNC_EXPOSURE_PROPERTY_NAMES: two roles map to the same property name")
    return names


@dataclass(frozen=True)
class ImpressionsSettings:
    impressions_dir: Path
    archive_dir: Path
    quarantine_dir: Path
    after_load: str
    webhook_token: Secret | None = field(repr=False)
    max_body_bytes: int
    batch_files: int
    max_runs_per_tick: int
    settle_seconds: int
    exposure_event: str
    property_names: dict[str, str]
    exposure_batch_size: int
    exposure_concurrency: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ImpressionsSettings:
        environ = os.environ if environ is None else environ
        landing = Path(_env(environ, "MIXSYNC_LANDING_DIR") or DEFAULT_LANDING_DIR)
        directory = Path(_env(environ, "MIXSYNC_IMPRESSIONS_DIR") or landing / "impressions").expanduser().absolute()
        # Archive and quarantine sit next to the landing folder, so it holds only what is pending, and on the
        # same file system, so moving a file there is an atomic rename.
        archive = Path(_env(environ, "MIXSYNC_IMPRESSIONS_ARCHIVE_DIR")
                       or directory.with_name(directory.name + "-archive")).expanduser().absolute()
        quarantine = Path(_env(environ, "MIXSYNC_IMPRESSIONS_QUARANTINE_DIR")
                          or directory.with_name(directory.name + "-quarantine")).expanduser().absolute()
        for name, path in (("MIXSYNC_IMPRESSIONS_ARCHIVE_DIR", archive), ("MIXSYNC_IMPRESSIONS_QUARANTINE_DIR", quarantine)):
            if path == directory:
                raise SettingsError(f"{name} must differ from MIXSYNC_IMPRESSIONS_DIR, or loaded files would be loaded again")
        event = _env(environ, "MIXSYNC_EXPOSURE_EVENT") or "$experiment_started"
        if len(event) > 255:
            raise SettingsError("MIXSYNC_EXPOSURE_EVENT is longer than Mixpanel's 255 characters")
        return cls(
            impressions_dir=directory,
            archive_dir=archive,
            quarantine_dir=quarantine,
            after_load=_parse_choice(environ, "MIXSYNC_IMPRESSIONS_AFTER_LOAD", "archive", AFTER_LOAD_CHOICES),
            webhook_token=_parse_token(environ),
            max_body_bytes=parse_int(environ, "MIXSYNC_WEBHOOK_MAX_BYTES", 16 << 20, minimum=1024),
            batch_files=parse_int(environ, "MIXSYNC_IMPRESSIONS_BATCH_FILES", 500, minimum=1, maximum=100_000),
            max_runs_per_tick=parse_int(environ, "MIXSYNC_IMPRESSIONS_MAX_RUNS_PER_TICK", 10, minimum=1, maximum=1000),
            settle_seconds=parse_int(environ, "MIXSYNC_IMPRESSIONS_SETTLE_SECONDS", 5, minimum=0, maximum=3600),
            exposure_event=event,
            property_names=_parse_property_names(environ),
            exposure_batch_size=parse_int(environ, "MIXSYNC_EXPOSURES_BATCH_SIZE", MIXPANEL_IMPORT_MAX_EVENTS,
                                          minimum=1, maximum=MIXPANEL_IMPORT_MAX_EVENTS),
            exposure_concurrency=parse_int(environ, "MIXSYNC_EXPOSURES_CONCURRENCY", 4, minimum=1, maximum=20),
        )
