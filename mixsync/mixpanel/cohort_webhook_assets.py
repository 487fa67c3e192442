"""Landed Mixpanel cohort webhook bodies → mixpanel.cohort_members (the same tables the engage poll keeps)."""

import os

import dagster as dg

from mixsync.metadata import table_metadata, table_name
from mixsync.mixpanel import cohort_webhook_sql as sql
from mixsync.mixpanel.cohort_webhook import cohort_webhook_dir
from mixsync.resources import WarehouseResource
from mixsync.sensor_runs import all_runs_failed


def landed_bodies(directory) -> list:
    """Complete landed bodies, oldest first (the receiver writes under a dot-name and renames into place)."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.name.startswith("cohorts-") and p.name.endswith(".json"))


def quarantine_dir(directory):
    """Where landed files the loader cannot record go: inside the landing folder (one file system, so a move is a
    rename), where the sensor does not look."""
    return directory / "quarantine"


@dg.asset(
    pool="mixpanel_cohort_webhooks",
    group_name="mixpanel",
    kinds={"mixpanel", "duckdb"},
    metadata=table_name("mixpanel.cohort_members"),
    description="Mixpanel cohort webhook bodies (landed by `mixsync receive-cohorts`) applied to "
                "mixpanel.cohort_members and mixpanel.cohort_membership_history: add_members and remove_members "
                "at once, a members snapshot once all pages of its session arrived.",
)
def mixpanel_cohort_webhook_members(context: dg.AssetExecutionContext,
                                    warehouse: WarehouseResource) -> dg.MaterializeResult:
    directory = cohort_webhook_dir()
    paths = landed_bodies(directory)
    store = warehouse.warehouse()
    with store.write() as con:
        landed, refused = sql.record_bodies(con, paths)
        sql.record_quarantine(con, refused)
    # Recorded (committed) first, removed after: a crash in between leaves files that the next run skips (or
    # quarantines again).
    if refused:
        quarantine_dir(directory).mkdir(exist_ok=True)
    for path in paths:
        if path in refused:
            os.replace(path, quarantine_dir(directory) / path.name)
            context.log.warning(f"quarantined {path.name} (mixpanel.cohort_webhook_quarantine): {refused[path]}")
        else:
            path.unlink(missing_ok=True)
    with store.write() as con:
        result = sql.apply_pending(con)
        table = table_metadata(con, "mixpanel.cohort_members")
    for file, reason in result.errors.items():
        context.log.warning(f"skipped {file} (outcome 'error' in mixpanel.cohort_webhook_bodies): {reason}")
    context.log.info(f"{landed} bodies landed, {result.applied} applied (+{result.entered} -{result.left}), "
                     f"{len(refused)} quarantined, {len(result.errors)} skipped as not applicable, "
                     f"{result.waiting_pages} members pages waiting for their session's other pages")
    return dg.MaterializeResult(metadata={
        **table,
        "bodies_landed": landed,
        "bodies_applied": result.applied,
        "bodies_quarantined": len(refused),
        "bodies_skipped": len(result.errors),
        "members_entered": result.entered,
        "members_left": result.left,
        "pages_waiting": result.waiting_pages,
        "outcomes": result.outcomes,
    })



mixpanel_cohort_webhook_job = dg.define_asset_job(
    "mixpanel_cohort_webhook_job",
    # Applying and pushing in one run: a webhook's change reaches Flagsmith without waiting for the hourly poll.
    selection=dg.AssetSelection.assets("mixpanel_cohort_webhook_members", "flagsmith_cohort_traits"),
    tags={"mixsync/writes": "duckdb"},
    description="Apply landed Mixpanel cohort webhook bodies, then push the trait changes to Flagsmith.",
)


@dg.sensor(job=mixpanel_cohort_webhook_job, minimum_interval_seconds=30,
           default_status=dg.DefaultSensorStatus.STOPPED)
def mixpanel_cohort_webhook_sensor(context: dg.SensorEvaluationContext):
    """A run whenever bodies are in the landing folder; the run key (newest name and count) keeps one run per set.

    Bodies leave the folder once recorded in DuckDB, so a folder with files in it always means work to do. When
    the runs for this set all failed or were canceled, it is asked for again under a new key (`-again-<n>`):
    Dagster drops a request whose key it has seen, so the set would otherwise wait for the next body to arrive."""
    paths = landed_bodies(cohort_webhook_dir())
    if not paths:
        return dg.SkipReason("no cohort webhook bodies landed")
    base = f"{paths[-1].name}-{len(paths)}"
    key, attempt = base, 0
    while (every_run_failed := all_runs_failed(context.instance, {key}).get(key)) is True:
        attempt += 1
        key = f"{base}-again-{attempt}"
    if every_run_failed is None:  # no run for this key yet
        return dg.RunRequest(run_key=key)
    return dg.SkipReason(f"the run for these {len(paths)} bodies ({key}) is queued, running or done")
