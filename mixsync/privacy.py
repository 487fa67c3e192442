"""Personal identifiers in logs and Dagster metadata (which Dagster keeps forever) appear only as pseudonyms."""

from __future__ import annotations

import hashlib


def pseudonym(identifier: object) -> str:
    """A short stable stand-in for an identifier: the same person gives the same pseudonym, which can be matched
    against `sha256(identifier)` in the warehouse, but the identifier (an e-mail address, say) is not shown."""
    return "sha256:" + hashlib.sha256(str(identifier).encode()).hexdigest()[:12]
