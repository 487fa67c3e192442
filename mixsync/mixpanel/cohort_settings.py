"""Settings of the cohorts extract: which cohorts, how big the engage pages, which profile properties."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from mixsync.settings import SettingsError, parse_int

DEFAULT_ENGAGE_PAGE_SIZE = 5000


def _env(environ: Mapping[str, str], name: str) -> str | None:
    return (environ.get(name) or "").strip() or None


def _name_list(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list, or a JSON array of strings when the names themselves contain commas."""
    value = _env(environ, name)
    if value is None:
        return ()
    if value.startswith("["):
        try:
            items = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise SettingsError(f"{name} starts with '[' but is not a JSON array of strings") from None
        if not isinstance(items, list) or not all(isinstance(i, (str, int)) for i in items):
            raise SettingsError(f"{name} must be a JSON array of strings (cohort ids or names)")
        items = [str(i).strip() for i in items]
    else:
        items = [part.strip() for part in value.split(",")]
    return tuple(dict.fromkeys(i for i in items if i))


@dataclass(frozen=True)
class CohortSettings:
    selection: tuple[str, ...]            # cohort ids or exact names; empty means every cohort
    page_size: int
    member_properties: tuple[str, ...]    # profile properties kept with each member (JSON)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None,
                 identifier_property: str | None = None) -> CohortSettings:
        """`identifier_property`: the Flagsmith flow's FLAGSMITH_IDENTIFIER_PROPERTY as the run has it (its
        resource's config, else the environment); it identifies people by that property, so it is fetched too."""
        environ = os.environ if environ is None else environ
        properties = list(_name_list(environ, "MIXPANEL_COHORT_MEMBER_PROPERTIES"))
        if identifier_property and identifier_property not in properties:
            properties.append(identifier_property)
        return cls(
            selection=_name_list(environ, "MIXPANEL_COHORTS"),
            page_size=parse_int(environ, "MIXPANEL_ENGAGE_PAGE_SIZE", DEFAULT_ENGAGE_PAGE_SIZE, minimum=1, maximum=100_000),
            member_properties=tuple(properties),
        )
