"""What every asset tells the Dagster UI about its table: name, columns (from DuckDB itself) and rows."""

from __future__ import annotations

import dagster as dg
import duckdb

from mixsync.warehouse.sql import identifier


def table_name(table: str) -> dict:
    """Definition metadata: the asset's table, shown on the asset page before anything is materialized."""
    return {"dagster/table_name": table}


def column_schema(con: duckdb.DuckDBPyConnection, table: str) -> dg.TableSchema:
    """The table's columns as DuckDB describes them, so the UI can never show a stale schema."""
    rows = con.execute(f"DESCRIBE {identifier(table)}").fetchall()
    return dg.TableSchema(columns=[
        dg.TableColumn(name=column, type=str(column_type),
                       constraints=dg.TableColumnConstraints(nullable=nullable == "YES"))
        for column, column_type, nullable, *_ in rows])


def table_metadata(con: duckdb.DuckDBPyConnection, table: str, row_count: bool = True) -> dict:
    """Materialization metadata of an unpartitioned table: its name, columns and (by default) all its rows.

    `dagster/row_count` is the table's rows after the run; what the run itself inserted goes under its own key.
    """
    metadata: dict = {"dagster/table_name": table, "dagster/column_schema": column_schema(con, table)}
    if row_count:
        metadata["dagster/row_count"] = con.execute(f"SELECT count(*) FROM {identifier(table)}").fetchall()[0][0]
    return metadata
