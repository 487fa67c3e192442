"""Pure trait naming: a cohort's trait key is a prefix plus its snake_cased name; collisions are errors."""

from __future__ import annotations

import re
import unicodedata

MAX_TRAIT_KEY = 200  # Flagsmith answers 400 above this


class TraitKeyError(ValueError):
    """Cohort names that cannot become distinct, valid Flagsmith trait keys."""


def snake_case(name: str) -> str:
    """'Power Users' → 'power_users', 'betaTesters (EU)' → 'beta_testers_eu', 'Añadir' → 'anadir'."""
    decomposed = unicodedata.normalize("NFKD", name)
    text = "".join(c for c in decomposed if not unicodedata.combining(c))
    text = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", text)
    text = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", text)
    return re.sub(r"[\W_]+", "_", text).strip("_").lower()


def trait_key(prefix: str, cohort_id: int, name: str) -> str:
    """The cohort's trait key; a name with no letters or digits falls back to its id."""
    key = prefix + (snake_case(name) or f"cohort_{cohort_id}")
    if len(key) > MAX_TRAIT_KEY:
        raise TraitKeyError(f"cohort {cohort_id} ({name!r}) gives a trait key of {len(key)} characters; Flagsmith "
                            f"allows {MAX_TRAIT_KEY}: shorten the cohort name or FLAGSMITH_TRAIT_PREFIX")
    return key


def trait_keys(prefix: str, cohorts: list[tuple[int, str]]) -> dict[int, str]:
    """{cohort id: trait key} for the synced cohorts; two cohorts that would share a key are refused, not merged."""
    keys: dict[int, str] = {}
    owners: dict[str, tuple[int, str]] = {}
    clashes = []
    for cohort_id, name in sorted(cohorts):
        key = trait_key(prefix, cohort_id, name)
        if key in owners:
            other_id, other_name = owners[key]
            clashes.append(f"{key!r} from cohort {other_id} ({other_name!r}) and cohort {cohort_id} ({name!r})")
        owners[key] = (cohort_id, name)
        keys[cohort_id] = key
    if clashes:
        raise TraitKeyError("cohort names collide as Flagsmith trait keys: " + "; ".join(clashes) +
                            ". Rename one of them in Mixpanel, or leave one out with MIXPANEL_COHORTS")
    return keys
