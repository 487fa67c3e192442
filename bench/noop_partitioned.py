"""Dagster's own floor: a daily-partitioned asset that does nothing, materialized by the same CLI command."""

import dagster as dg


@dg.asset(partitions_def=dg.DailyPartitionsDefinition(start_date="2024-01-01"))
def noop_day() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"dagster/row_count": 0})


defs = dg.Definitions(assets=[noop_day])
