"""Dagster's own floor: a daily-partitioned asset that does nothing, materialized by the same CLI command.

With NOOP_IN_PROCESS=1 its step runs in the run's process (Dagster's in_process executor), as mixsync's steps do:
the like-for-like floor. Without it, Dagster's default: a step process of its own."""

import os

import dagster as dg


@dg.asset(partitions_def=dg.DailyPartitionsDefinition(start_date="2024-01-01"))
def noop_day() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"dagster/row_count": 0})


defs = dg.Definitions(assets=[noop_day],
                      executor=dg.in_process_executor if os.environ.get("NOOP_IN_PROCESS") == "1" else None)
