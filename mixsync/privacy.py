"""Personal identifiers in logs and Dagster metadata (which Dagster keeps forever) appear only as pseudonyms."""

from __future__ import annotations

import hashlib
import json
import re


def pseudonym(identifier: object) -> str:
    """A short stable stand-in for an identifier: the same person gives the same pseudonym, which can be matched
    against `sha256(identifier)` in the warehouse, but the identifier (an e-mail address, say) is not shown."""
    return "sha256:" + hashlib.sha256(str(identifier).encode()).hexdigest()[:12]


def redact(text: str, identifier: object) -> str:
    """`text` (a service's error message, say) with `identifier` replaced by its pseudonym wherever it appears as is,
    JSON-escaped or Python-quoted (services quote the id they refuse either way). Matches stop at word characters,
    so a short id such as `7` does not eat the digits of `update 17`."""
    plain = str(identifier)
    if not plain.strip():
        return text
    forms = {plain, json.dumps(plain, ensure_ascii=False)[1:-1], json.dumps(plain)[1:-1], repr(plain)[1:-1]}
    for form in sorted(forms, key=len, reverse=True):
        text = re.sub(rf"(?<!\w){re.escape(form)}(?!\w)", lambda _: pseudonym(plain), text)
    return text
