"""How `mixsync query` prints a result: an aligned table for people, CSV or JSON for other programs."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import sys
import uuid
from collections.abc import Callable
from typing import Any, TextIO

import orjson

FORMATS = ("table", "csv", "json")
CELL_WIDTH = 60
BATCH_ROWS = 1000


def format_table(cursor, max_rows: int = 50, full: bool = False) -> str:
    """A plain aligned text table of a DuckDB cursor's result; cells cut at 60 characters unless `full`."""
    columns = [d[0] for d in cursor.description]
    rows = cursor.fetchall() if max_rows <= 0 else cursor.fetchmany(max_rows + 1)
    more = max_rows > 0 and len(rows) > max_rows
    shown = rows if max_rows <= 0 else rows[:max_rows]
    cut = None if full else CELL_WIDTH
    cells = [[("NULL" if v is None else str(v)).replace("\n", " ")[:cut] for v in row] for row in shown]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    out.append(f"({len(cells)} rows{', more not shown' if more else ''})")
    return "\n".join(out)


def _json_default(value: Any) -> Any:
    # orjson writes dates, datetimes and UUIDs itself; DuckDB also returns these.
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, (dt.timedelta, uuid.UUID, bytes, bytearray)):
        return value.hex() if isinstance(value, (bytes, bytearray)) else str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _batches(cursor, max_rows: int):
    left = max_rows if max_rows > 0 else None
    while left is None or left > 0:
        batch = cursor.fetchmany(BATCH_ROWS if left is None else min(BATCH_ROWS, left))
        if not batch:
            return
        if left is not None:
            left -= len(batch)
        yield batch


def write_csv(cursor, out: TextIO, max_rows: int = 0) -> None:
    """Every row (or the first max_rows) as CSV with a header, streamed in batches; NULL is an empty field."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([d[0] for d in cursor.description])
    for batch in _batches(cursor, max_rows):
        writer.writerows(batch)


def write_json(cursor, out: TextIO, max_rows: int = 0) -> None:
    """Every row (or the first max_rows) as one JSON array of objects keyed by column name, streamed in batches."""
    columns = [d[0] for d in cursor.description]
    out.write("[")
    first = True
    for batch in _batches(cursor, max_rows):
        for row in batch:
            out.write("\n" if first else ",\n")
            first = False
            record = dict(zip(columns, row, strict=True))
            out.write(orjson.dumps(record, default=_json_default, option=orjson.OPT_NON_STR_KEYS).decode())
    out.write("\n]\n" if not first else "]\n")


def print_result(cursor, output_format: str, max_rows: int, full: bool,
                 echo: Callable[[str], None] | None = None, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if output_format == "table":
        (echo or out.write)(format_table(cursor, max_rows, full) + ("" if echo else "\n"))
    elif output_format == "csv":
        write_csv(cursor, out, max_rows)
    elif output_format == "json":
        write_json(cursor, out, max_rows)
    else:
        raise ValueError(f"unknown format {output_format!r}; one of {', '.join(FORMATS)}")
