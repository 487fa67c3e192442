"""Mixpanel cohorts → mixpanel.cohorts, and their members (with history) → mixpanel.cohort_members."""

import shutil
import time

import dagster as dg

from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.http import RetryStats, ServiceError
from mixsync.metadata import table_metadata, table_name
from mixsync.mixpanel.cohort_sql import (
    UnknownCohorts,
    load_cohort_members,
    remove_unselected_cohorts,
    replace_cohorts,
    select_cohorts,
)
from mixsync.mixpanel.query_client import download_cohort_members, list_cohorts
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource
from mixsync.settings import SettingsError
from mixsync.warehouse import markdown_table

# Both assets call the query API, which allows 5 concurrent queries and 60 per hour per project: one pool.
QUERY_POOL = "mixpanel_query"
# The push at the end of flagsmith_cohort_traits_job: a run that includes it checks the Flagsmith key first.
FLAGSMITH_TRAITS = dg.AssetKey("flagsmith_cohort_traits")


def _run_materializes(context: dg.AssetExecutionContext, key: dg.AssetKey) -> bool:
    """Whether this run (not just this step) materializes `key`: the run's asset selection when it has one (a
    subset launched from the UI), else every asset of its job (an empty selection means the whole job)."""
    selection = context.run.asset_selection or context.job_def.asset_layer.executable_asset_keys
    return key in selection


@dg.asset(
    pool=QUERY_POOL,
    group_name="mixpanel",
    kinds={"mixpanel", "duckdb"},
    tags={"mixsync/source": "mixpanel"},
    metadata=table_name("mixpanel.cohorts"),
    description="The project's cohorts (id, name, description, count, visibility, created): mixpanel.cohorts, "
                "replaced each run.",
)
def mixpanel_cohorts(context: dg.AssetExecutionContext, mixpanel: MixpanelResource, warehouse: WarehouseResource,
                     flagsmith: FlagsmithResource) -> dg.MaterializeResult:
    started = time.monotonic()
    if _run_materializes(context, FLAGSMITH_TRAITS):
        # A wrong or client-side Flagsmith key would otherwise surface only after the whole Mixpanel extraction
        # (query quota spent, members loaded); one cheap read now fails the run before Mixpanel is asked anything.
        flagsmith.check_environment_key()
        context.log.info("Flagsmith accepted FLAGSMITH_ENVIRONMENT_KEY (checked before any Mixpanel request)")
    stats = RetryStats()
    store = warehouse.warehouse()
    try:
        client = mixpanel.client(stats)
    except SettingsError as exc:
        raise dg.Failure(str(exc)) from None
    with client:
        try:
            body = list_cohorts(client)
        except ServiceError as exc:
            raise dg.Failure(str(exc)) from None
    with store.write() as con:
        load = replace_cohorts(con, body)
        preview = markdown_table(con, """SELECT id, name, count, visibility, created FROM mixpanel.cohorts
                                         ORDER BY count DESC NULLS LAST LIMIT 10""")
        table = table_metadata(con, "mixpanel.cohorts")
    if load.rejected:
        context.log.warning(f"{load.rejected} cohort entries were malformed: {load.rejects_by_reason} "
                            "(see mixpanel.cohorts_rejected)")
    return dg.MaterializeResult(metadata={
        **table,
        "cohorts_loaded": load.cohorts,
        "rejected": load.rejected,
        "rejects_by_reason": load.rejects_by_reason,
        **stats.as_metadata(),
        "duration_seconds": round(time.monotonic() - started, 3),
        "cohorts": dg.MetadataValue.md(preview),
    })


@dg.asset(
    deps=[mixpanel_cohorts],
    pool=QUERY_POOL,
    group_name="mixpanel",
    kinds={"mixpanel", "duckdb"},
    tags={"mixsync/source": "mixpanel"},
    metadata=table_name("mixpanel.cohort_members"),
    description="Members of the selected cohorts (MIXPANEL_COHORTS, default all) through engage: current membership "
                "in mixpanel.cohort_members, who entered and left in mixpanel.cohort_membership_history.",
)
def mixpanel_cohort_members(context: dg.AssetExecutionContext, mixpanel: MixpanelResource,
                            warehouse: WarehouseResource, flagsmith: FlagsmithResource) -> dg.MaterializeResult:
    started = time.monotonic()
    # The property flagsmith_cohort_traits will identify people by, from the same resource it reads it from: a
    # value given as run config must reach this load too, or that push refuses members loaded without it.
    try:
        settings = mixpanel.cohort_settings(flagsmith.identifier_property_in_effect())
    except SettingsError as exc:
        raise dg.Failure(str(exc)) from None
    store = warehouse.warehouse()
    landing = warehouse.settings().landing_dir / "mixpanel-cohorts"
    with store.write() as con:
        try:
            selected = select_cohorts(con, settings.selection)
        except UnknownCohorts as exc:
            raise dg.Failure(str(exc)) from None
    stats = RetryStats()
    loads = []
    pages = 0
    downloaded = 0
    with mixpanel.client(stats) as client:
        for cohort_id, name in selected:
            # The download holds no warehouse lock; only the short load below does.
            try:
                download = download_cohort_members(client, cohort_id, landing, list(settings.member_properties),
                                                   settings.page_size)
            except ServiceError as exc:
                # Cohorts loaded before this one stay loaded: each is its own consistent snapshot.
                raise dg.Failure(f"cannot read members of cohort {cohort_id} ({name}): {exc}") from None
            try:
                with store.write() as con:
                    load = load_cohort_members(con, cohort_id, name, download.pages,
                                               list(settings.member_properties), download.total)
            finally:
                shutil.rmtree(download.directory, ignore_errors=True)
            loads.append(load)
            pages += len(download.pages)
            downloaded += download.bytes
            context.log.info(f"cohort {cohort_id} ({name}): {load.members} members, +{load.entered} -{load.left}")
            if download.total is not None and download.total != download.members:
                context.log.warning(f"cohort {cohort_id}: engage reported total {download.total} but served "
                                    f"{download.members} members")
        query_requests = client.requests_sent
    with store.write() as con:
        removed = remove_unselected_cohorts(con, [cohort_id for cohort_id, _ in selected])
        preview = markdown_table(con, """SELECT l.cohort_id, l.cohort_name, l.members, s.entered, s."left", s.rejected
                                         FROM mixpanel.cohort_member_loads l
                                         JOIN mixpanel.cohort_snapshots s USING (snapshot_id)
                                         ORDER BY l.members DESC LIMIT 10""")
        table = table_metadata(con, "mixpanel.cohort_members")
    rejects: dict[str, int] = {}
    for load in loads:
        for reason, n in load.rejects_by_reason.items():
            rejects[reason] = rejects.get(reason, 0) + n
    return dg.MaterializeResult(metadata={
        **table,
        "members_loaded": sum(l.members for l in loads),
        "cohorts": len(loads),
        "cohorts_removed": [l.cohort_id for l in removed],
        "entered": sum(l.entered for l in loads),
        "left": sum(l.left for l in loads) + sum(l.left for l in removed),
        "duplicates_dropped": sum(l.duplicates_dropped for l in loads),
        "rejected": sum(rejects.values()),
        "rejects_by_reason": rejects,
        "pages": pages,
        "query_requests": query_requests,
        "bytes_downloaded": downloaded,
        "member_properties": list(settings.member_properties),
        **stats.as_metadata(),
        "duration_seconds": round(time.monotonic() - started, 3),
        "members": dg.MetadataValue.md(preview),
    })
