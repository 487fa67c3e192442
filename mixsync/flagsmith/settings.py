"""Flagsmith settings from the environment: key, API URL, trait naming, exit semantics, batching."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from mixsync.settings import MIXPANEL_REGIONS, Secret, SettingsError, parse_int, parse_url, require

EDGE_API_URL = "https://edge.api.flagsmith.com/api/v1"
DEFAULT_TRAIT_PREFIX = "mp_cohort_"
DEFAULT_SYNC_CRON = "0 * * * *"
DEFAULT_PROFILE_PROPERTY_PREFIX = "flagsmith_"
# A third of the way into the hour: after the cohort traits sync (on the hour) has updated the trait ledger.
DEFAULT_PROFILE_FLAGS_CRON = "20 * * * *"
BULK_MODES = ("auto", "edge", "core", "identities")
EXIT_MODES = ("false", "delete")


def _env(environ: Mapping[str, str], name: str) -> str | None:
    return (environ.get(name) or "").strip() or None


def api_base(url: str) -> str:
    """Accept the host alone or the /api/v1 base, as people copy either from Flagsmith's docs."""
    url = url.rstrip("/")
    return url if re.search(r"/api/v\d+$", url) else f"{url}/api/v1"


@dataclass(frozen=True)
class FlagsmithSettings:
    environment_key: Secret = field(repr=False)
    api_url: str
    trait_prefix: str
    exit_mode: str                   # 'false' (default) or 'delete' (trait_value null)
    identifier_property: str | None  # a profile property instead of distinct_id
    bulk_mode: str
    concurrency: int
    verify_sample: int
    batch_identities: int            # identities per request (Edge's bulk route takes at most 100)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FlagsmithSettings:
        environ = os.environ if environ is None else environ
        key = require(environ, "FLAGSMITH_ENVIRONMENT_KEY",
                      "the server-side environment key (starts with 'ser.'): Environment settings → Keys in Flagsmith")
        if not key.startswith("ser."):
            # Never echo the value: a client key is public, but a mistyped server key is not.
            raise SettingsError(
                "FLAGSMITH_ENVIRONMENT_KEY is not a server-side key (it does not start with 'ser.'). A client-side "
                "environment key can silently drop trait writes when the environment disallows client traits; "
                "create a server-side key under Environment settings → Keys and use that")
        prefix = _env(environ, "FLAGSMITH_TRAIT_PREFIX") or DEFAULT_TRAIT_PREFIX
        if len(prefix) > 100 or prefix != prefix.strip():
            raise SettingsError(f"FLAGSMITH_TRAIT_PREFIX={prefix!r} must be at most 100 characters, without spaces "
                                "around it")
        exit_mode = (_env(environ, "FLAGSMITH_ON_COHORT_EXIT") or "false").lower()
        if exit_mode not in EXIT_MODES:
            raise SettingsError(f"FLAGSMITH_ON_COHORT_EXIT={exit_mode!r} is not one of: false (set the trait to false), "
                                "delete (remove the trait)")
        bulk_mode = (_env(environ, "FLAGSMITH_BULK_MODE") or "auto").lower()
        if bulk_mode not in BULK_MODES:
            raise SettingsError(f"FLAGSMITH_BULK_MODE={bulk_mode!r} is not one of: {', '.join(BULK_MODES)}")
        return cls(
            environment_key=Secret(key),
            api_url=api_base(parse_url(environ, "FLAGSMITH_API_URL", EDGE_API_URL)),
            trait_prefix=prefix,
            exit_mode=exit_mode,
            identifier_property=_env(environ, "FLAGSMITH_IDENTIFIER_PROPERTY"),
            bulk_mode=bulk_mode,
            concurrency=parse_int(environ, "FLAGSMITH_CONCURRENCY", 4, minimum=1, maximum=32),
            verify_sample=parse_int(environ, "FLAGSMITH_VERIFY_SAMPLE", 100, minimum=0, maximum=100_000),
            batch_identities=parse_int(environ, "FLAGSMITH_BATCH_IDENTITIES", 100, minimum=1, maximum=100),
        )


@dataclass(frozen=True)
class ProfileFlagsSettings:
    """Flag states → Mixpanel profiles: where /engage is, the project token it takes, how properties are named."""

    project_token: Secret = field(repr=False)
    ingestion_url: str
    property_prefix: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProfileFlagsSettings:
        environ = os.environ if environ is None else environ
        token = require(environ, "MIXPANEL_PROJECT_TOKEN",
                        "the project token that /engage profile updates carry as $token (Project settings in Mixpanel)")
        region = (_env(environ, "MIXPANEL_REGION") or "us").lower()
        if region not in MIXPANEL_REGIONS:
            raise SettingsError(f"MIXPANEL_REGION={region!r} is not one of us, eu, in")
        prefix = environ.get("FLAGSMITH_PROFILE_PROPERTY_PREFIX")
        prefix = DEFAULT_PROFILE_PROPERTY_PREFIX if prefix is None else prefix
        if len(prefix) > 100 or prefix != prefix.strip():
            raise SettingsError(f"FLAGSMITH_PROFILE_PROPERTY_PREFIX={prefix!r} must be at most 100 characters, "
                                "without spaces around it")
        base_url = parse_url(environ, "MIXPANEL_BASE_URL")
        return cls(project_token=Secret(token), ingestion_url=base_url or MIXPANEL_REGIONS[region][2],
                   property_prefix=prefix)


def _cron(environ: Mapping[str, str] | None, name: str, default: str) -> str:
    """A cron read at import time, so a malformed value warns and falls back instead of breaking the code location."""
    environ = os.environ if environ is None else environ
    value = _env(environ, name) or default
    if len(value.split()) != 5:
        warnings.warn(f"{name}={value!r} is not a 5-field cron expression such as '0 * * * *'; using {default!r}",
                      stacklevel=3)
        return default
    return value


def sync_cron(environ: Mapping[str, str] | None = None) -> str:
    """The cohort sync's cron (FLAGSMITH_SYNC_CRON)."""
    return _cron(environ, "FLAGSMITH_SYNC_CRON", DEFAULT_SYNC_CRON)


def profile_flags_cron(environ: Mapping[str, str] | None = None) -> str:
    """The flag states → profiles sync's cron (FLAGSMITH_PROFILE_FLAGS_CRON)."""
    return _cron(environ, "FLAGSMITH_PROFILE_FLAGS_CRON", DEFAULT_PROFILE_FLAGS_CRON)
