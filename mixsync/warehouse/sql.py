"""The one way mixsync puts values into SQL text, where DuckDB cannot bind a parameter.

Bind values with `$name` parameters wherever DuckDB allows them (WHERE, VALUES, table-function arguments such as
`read_json($paths)`). What DuckDB cannot bind — a `COPY … TO` target, `SET` values, `ATTACH` options, names of
tables — goes through `literal`, `path` or `identifier` here, and nowhere else.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from pathlib import PurePath

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_GLOB = re.compile(r"[*?\[]")
_MEMORY = re.compile(r"\d+(\.\d+)?\s*(B|KB|KIB|MB|MIB|GB|GIB|TB|TIB)|\d+(\.\d+)?%", re.IGNORECASE)


def literal(value: object) -> str:
    """A SQL literal for a string, number, boolean, date, path or None."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} has no SQL literal")
        return repr(value)
    if isinstance(value, dt.datetime):
        return f"TIMESTAMPTZ {literal(value.isoformat())}"
    if isinstance(value, dt.date):
        return f"DATE {literal(value.isoformat())}"
    if isinstance(value, (PurePath, os.PathLike)):
        value = os.fspath(value)
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("a NUL character cannot go into SQL text")
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"no SQL literal for {type(value).__name__}")


def path(value: str | os.PathLike) -> str:
    """A file path as a SQL string literal (quotes, spaces and unicode in folder names are fine)."""
    return literal(os.fspath(value))


def glob_literal(value: str | os.PathLike) -> str:
    """A file path as a pattern that DuckDB's file readers (read_json, read_csv ...) match to that file alone.

    They expand `*`, `?` and `[...]` even in a bound parameter; a bracketed character matches only itself.
    """
    return _GLOB.sub(r"[\g<0>]", os.fspath(value))


def identifier(name: str) -> str:
    """A table or schema name known to mixsync (`schema.table`), checked rather than quoted."""
    if not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"{name!r} is not a plain SQL name")
    return name


def memory_limit(value: str, setting: str = "MIXSYNC_DUCKDB_MEMORY_LIMIT") -> str:
    """A DuckDB memory limit such as `256MB`, `1.5GB` or `50%`, validated before it reaches `SET`."""
    if not _MEMORY.fullmatch(value.strip()):
        raise ValueError(f"{setting}={value!r} is not a memory size such as 256MB, 2GB or 50%")
    return literal(value.strip())
