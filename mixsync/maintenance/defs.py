"""warehouse_maintenance: keep the warehouse small. On a DuckLake, expire old snapshots and delete the Parquet
files no snapshot needs; on a DuckDB file, CHECKPOINT (write the WAL into the file, reclaim deleted rows)."""

import time

import dagster as dg

from mixsync.resources import WarehouseResource


@dg.asset(
    pool="warehouse_maintenance",
    group_name="warehouse",
    kinds={"duckdb"},
    tags={"mixsync/source": "warehouse"},
    description="Expires DuckLake snapshots older than MIXSYNC_DUCKLAKE_SNAPSHOT_RETENTION_DAYS and deletes the files "
                "they alone used; checkpoints a DuckDB file.",
)
def warehouse_maintenance(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    started = time.monotonic()
    settings = warehouse.settings()
    store = warehouse.warehouse()
    # Under the writer lock: expiring snapshots and deleting files must not race a load's commit.
    with store.write() as con:
        done = store.maintain(con, settings.snapshot_retention_days)
    context.log.info(f"{store.kind} maintenance: {done}")
    return dg.MaterializeResult(metadata={
        "warehouse": store.kind,
        **done,
        "duration_seconds": round(time.monotonic() - started, 3),
    })


warehouse_maintenance_job = dg.define_asset_job(
    "warehouse_maintenance_job", selection=[warehouse_maintenance], tags={"mixsync/writes": "duckdb"},
    description="Expire old DuckLake snapshots and delete superseded files, or checkpoint the DuckDB file.",
)

# Daily, after the nightly pulls (02:15) and pushes have had their hour.
warehouse_maintenance_schedule = dg.ScheduleDefinition(
    name="warehouse_maintenance_schedule", job=warehouse_maintenance_job, cron_schedule="30 4 * * *",
    execution_timezone="UTC", description="Every day at 04:30 UTC: warehouse_maintenance.",
)

resources: dict = {}

defs = dg.Definitions(assets=[warehouse_maintenance], jobs=[warehouse_maintenance_job],
                      schedules=[warehouse_maintenance_schedule])
