"""Pure mapping: a Split impression row -> a Mixpanel `$experiment_started` event, as SQL that DuckDB evaluates."""

from __future__ import annotations

import re
from collections.abc import Mapping

from mixsync.warehouse.sql import literal

# Mixpanel's /import: `$insert_id` must be at most 36 bytes of [A-Za-z0-9-] (apis/mixpanel.md).
INSERT_ID_PATTERN = re.compile(r"^[A-Za-z0-9-]{1,36}$")
SOURCE_VALUE = "Split"

# Property role -> the split.impressions expression (table alias `i`) it carries.
ROLE_EXPRESSIONS = {
    "experiment": "i.split",
    "variant": "i.treatment",
    "label": "i.label",
    "split_version": "i.split_version_number",
    "environment": "i.environment_name",
    "environment_id": "i.environment_id",
    "sdk": "i.sdk",
    "sdk_version": "i.sdk_version",
    "source": literal(SOURCE_VALUE),
}


def insert_id_sql(alias: str = "i") -> str:
    """`$insert_id` of an exposure: the impression id, the md5 hex (32 characters) of its dedupe key, so a resend
    of the same impression is deduplicated by Mixpanel."""
    return f"{alias}.impression_id"


def exposure_payload_sql(event_name: str, property_names: Mapping[str, str]) -> str:
    """SELECT id, payload FROM split.impressions i: one Mixpanel import event (JSON text) per impression.

    `time` is sent in milliseconds (Mixpanel accepts seconds or ms) to keep the impression's precision.
    """
    missing = set(ROLE_EXPRESSIONS) - set(property_names)
    if missing:
        raise ValueError(f"property names missing for roles: {', '.join(sorted(missing))}")
    properties = ", ".join(
        ["'time', epoch_ms(i.time)", "'distinct_id', i.key", f"'$insert_id', {insert_id_sql()}"]
        + [f"{literal(property_names[role])}, {expression}" for role, expression in ROLE_EXPRESSIONS.items()]
    )
    return (f"SELECT {insert_id_sql()} AS id, "
            f"json_object('event', {literal(event_name)}, 'properties', json_object({properties}))::VARCHAR AS payload "
            "FROM split.impressions i")
