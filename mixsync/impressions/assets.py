"""Landing files -> split.impressions, and split.impressions -> Mixpanel `$experiment_started` exposures."""

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from pydantic import Field

from mixsync.dry_run import DryRunConfig, would_send
from mixsync.http import RetryStats, ServiceError
from mixsync.impressions.exposures import exposure_payload_sql
from mixsync.impressions.landing import (
    LandingFile,
    archive_folder,
    fingerprint,
    landed_names,
    move_aside,
    move_file,
    prefixed_name,
)
from mixsync.impressions.resources import ImpressionsResource
from mixsync.impressions.settings import MIXPANEL_IMPORT_MAX_BYTES, ImpressionsSettings
from mixsync.impressions.sql import (
    EXPOSURES_OUTBOX,
    ImpressionLoad,
    enqueue_exposures,
    exposure_counts,
    exposure_rejects_by_reason,
    ledger_by_name,
    load_impression_files,
)
from mixsync.metadata import table_metadata, table_name
from mixsync.mixpanel.client import MixpanelClient
from mixsync.mixpanel.import_client import import_events
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.outbox_health import outbox_check_results, outbox_check_specs
from mixsync.progress import CountProgress, reporting_sends
from mixsync.resources import WarehouseResource
from mixsync.settings import SettingsError
from mixsync.warehouse import AnyWarehouse, markdown_table
from mixsync.warehouse.outbox import BatchOutcome, PushReport, push


class SplitImpressionsConfig(dg.Config):
    files: list[str] = Field(
        default_factory=list,
        description="Names of files in MIXSYNC_IMPRESSIONS_DIR to load (split_impression_files_sensor fills this in). "
                    "Empty: every complete file waiting there.",
    )


def _settings(resource) -> ImpressionsSettings:
    try:
        return resource.settings()
    except SettingsError as exc:
        raise dg.Failure(str(exc)) from None


def _resolve(settings: ImpressionsSettings, names: list[str]) -> tuple[list[LandingFile], list[str]]:
    """Fingerprint the named files; also return the names no longer there (moved by an earlier attempt)."""
    present, absent = [], []
    for name in dict.fromkeys(names):
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise dg.Failure(f"run config files: {name!r} is not a file name inside MIXSYNC_IMPRESSIONS_DIR")
        try:
            present.append(fingerprint(settings.impressions_dir / name))
        except FileNotFoundError:
            absent.append(name)
    return present, absent


def _settle(load: ImpressionLoad, files: dict[str, LandingFile], settings: ImpressionsSettings,
            quarantine_paths: dict[str, str], loaded_at: dt.datetime) -> None:
    """After the commit: loaded files leave the landing folder (archived or deleted), bad ones go to quarantine.

    A crash before this leaves them in place; the ledger then makes the retry skip them. A file that cannot be moved
    does not keep the others in place: they move, then the run fails naming it."""
    archive = archive_folder(settings.archive_dir, loaded_at)
    stuck: list[str] = []
    for outcome in load.files:
        path = files[outcome.name].path
        try:
            if outcome.status == "quarantined":
                move_file(path, Path(quarantine_paths[outcome.name]))
            elif settings.after_load == "delete":
                path.unlink()
            else:
                move_aside(path, archive, outcome.content_hash)
        except FileNotFoundError:
            pass  # another run got there first; the ledger already says what happened to these bytes
        except OSError as exc:
            stuck.append(f"{outcome.name} ({outcome.status}): {exc.strerror or exc}")
    if stuck:
        raise dg.Failure(f"the load is committed, but {len(stuck)} file(s) could not leave the landing folder: "
                         + "; ".join(stuck[:5]) + ". Fix the folder, then re-execute this run (the ledger knows "
                         "these bytes).")


@dg.asset(
    pool="impressions_landing",
    group_name="impressions",
    kinds={"split", "duckdb"},
    tags={"mixsync/source": "split"},
    metadata=table_name("split.impressions"),
    description="Split impressions from the webhook's landing files, deduplicated: split.impressions "
                "(ledger: split.impression_files, bad files: split.impression_quarantine).",
)
def split_impressions(context: dg.AssetExecutionContext, config: SplitImpressionsConfig, warehouse: WarehouseResource,
                      impressions: ImpressionsResource) -> dg.MaterializeResult:
    started = time.monotonic()
    settings = _settings(impressions)
    store = warehouse.warehouse()
    names = config.files
    if not names:
        directory = settings.impressions_dir
        names = sorted(landed_names(directory)) if directory.is_dir() else []
    landed, absent = _resolve(settings, names)
    quarantine_paths = {f.name: str(settings.quarantine_dir / prefixed_name(f.content_hash, f.name)) for f in landed}
    with store.write() as con:
        # Taken under the writer lock: rows committed after an exposures enqueue carry a later loaded_at.
        loaded_at = dt.datetime.now(dt.UTC)
        load = load_impression_files(con, landed, context.run.run_id, quarantine_paths, loaded_at)
        known = ledger_by_name(con, absent)
    _settle(load, {f.name: f for f in landed}, settings, quarantine_paths, loaded_at)
    missing = [n for n in absent if n not in known]
    if missing:
        context.log.warning(f"{len(missing)} file(s) of this run are gone and were never loaded: {missing[:5]}")
    for outcome in load.files:
        if outcome.status == "quarantined":
            context.log.warning(f"quarantined {outcome.name}: {outcome.reason} ({outcome.detail})")
    with store.read() as con:
        preview = markdown_table(con, """SELECT split, treatment, count(*) AS impressions, count(DISTINCT key) AS keys
                                         FROM split.impressions WHERE load_id = ? GROUP BY ALL
                                         ORDER BY impressions DESC LIMIT 10""", [context.run.run_id])
        table = table_metadata(con, "split.impressions")
    return dg.MaterializeResult(metadata={
        **table,
        "rows_inserted": load.inserted,
        "files_requested": len(names),
        "files_loaded": load.count("loaded"),
        "files_duplicate": load.count("duplicate"),
        "files_quarantined": load.count("quarantined"),
        "files_already_handled": len(absent) - len(missing),
        "files_missing": len(missing),
        "impressions_in_files": load.impressions,
        "duplicates_skipped": load.impressions - load.inserted,
        "quarantine_reasons": load.quarantine_reasons(),
        "after_load": "deleted" if settings.after_load == "delete" else str(archive_folder(settings.archive_dir, loaded_at)),
        "duration_seconds": round(time.monotonic() - started, 3),
        "impressions_loaded": dg.MetadataValue.md(preview),
    })


class ExposuresConfig(DryRunConfig):
    pass


def push_exposures(store: AnyWarehouse, client: MixpanelClient, settings: ImpressionsSettings, work_dir: Path,
                   logger=None, progress: CountProgress | None = None) -> PushReport:
    """Send the outbox's pending exposures to /import; each batch's acknowledgement is journaled as it comes, and
    `progress` (when given) hears of each batch."""

    def send(payloads: list[bytes]) -> BatchOutcome:
        result = import_events(client, payloads)
        return BatchOutcome(rejected=result.failed)

    sender = reporting_sends(send, progress) if progress is not None else send
    return push(store, EXPOSURES_OUTBOX, sender, work_dir, max_items=settings.exposure_batch_size,
                max_bytes=MIXPANEL_IMPORT_MAX_BYTES, concurrency=settings.exposure_concurrency, logger=logger)


@dg.asset(
    deps=[split_impressions],
    pool="mixpanel_import",
    group_name="impressions",
    kinds={"mixpanel", "duckdb"},
    tags={"mixsync/destination": "mixpanel"},
    metadata=table_name(EXPOSURES_OUTBOX),
    check_specs=outbox_check_specs("mixpanel_experiment_exposures", EXPOSURES_OUTBOX),
    # A dry run materializes nothing: it reports what would be sent as an observation.
    output_required=False,
    description="Every impression sent once to Mixpanel's /import as an `$experiment_started` exposure, through the "
                "outbox sync.mixpanel_exposures (deterministic $insert_id; strict-mode refusals recorded there).",
)
def mixpanel_experiment_exposures(context: dg.AssetExecutionContext, config: ExposuresConfig,
                                  warehouse: WarehouseResource, mixpanel: MixpanelResource,
                                  impressions: ImpressionsResource
                                  ) -> Iterator[dg.MaterializeResult | dg.AssetObservation | dg.AssetCheckResult]:
    started = time.monotonic()
    settings = _settings(impressions)
    store = warehouse.warehouse()
    payload_sql = exposure_payload_sql(settings.exposure_event, settings.property_names)
    stats = RetryStats()
    _settings(mixpanel)  # a missing MIXPANEL_* setting fails here, before anything is enqueued
    if config.dry_run:
        # Enqueued exactly as below, read, then rolled back: the outbox does not change.
        with store.write() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                enqueued = enqueue_exposures(con, payload_sql, context.run.run_id)
                seen = would_send(con, EXPOSURES_OUTBOX, None, settings.exposure_batch_size)
            finally:
                con.execute("ROLLBACK")
            checks = outbox_check_results(con, "mixpanel_experiment_exposures", EXPOSURES_OUTBOX)
        context.log.info(f"dry run: would send {seen.items} exposures in about {seen.batches} batches; "
                         "nothing was sent or kept")
        yield dg.AssetObservation(asset_key=context.asset_key,
                                  metadata={**seen.metadata(), "would_enqueue": enqueued})
        yield from checks
        return
    with store.write() as con:
        enqueued = enqueue_exposures(con, payload_sql, context.run.run_id)
        (pending,) = con.execute(f"SELECT count(*) FROM {EXPOSURES_OUTBOX} WHERE status = 'pending'").fetchall()[0]
    # Batches sent and remaining, with the time left, in the run log (throttled by MIXSYNC_PROGRESS_SECONDS).
    progress = CountProgress(context.log, "push of exposures to Mixpanel", pending, "exposures", batched=True)
    try:
        with mixpanel.client(stats) as client:
            report = push_exposures(store, client, settings, warehouse.settings().landing_dir / "outbox", context.log,
                                    progress)
    except ServiceError as exc:
        with store.read() as con:
            counts = exposure_counts(con)
        raise dg.Failure(f"{exc}. Exposures acknowledged so far are recorded; {counts.get('pending', 0)} stay pending "
                         "and go out on the next run.", metadata=stats.as_metadata()) from None
    with store.read() as con:
        counts = exposure_counts(con)
        rejects = exposure_rejects_by_reason(con)
        preview = markdown_table(con, f"""SELECT status, count(*) AS exposures, max(sent_at) AS last_sent
                                          FROM {EXPOSURES_OUTBOX} GROUP BY status ORDER BY status""")
        table = table_metadata(con, EXPOSURES_OUTBOX)
        checks = outbox_check_results(con, "mixpanel_experiment_exposures", EXPOSURES_OUTBOX)
    if report.rejected:
        context.log.warning(f"Mixpanel refused {report.rejected} exposure(s); see rejects_by_reason "
                            f"and {EXPOSURES_OUTBOX} WHERE status = 'rejected'")
    yield dg.MaterializeResult(check_results=checks, metadata={
        **table,
        "rows_inserted": enqueued,
        **report.as_metadata(),
        "outbox_pending": counts.get("pending", 0),
        "outbox_sent": counts.get("sent", 0),
        "outbox_rejected": counts.get("rejected", 0),
        "rejects_by_reason": rejects,
        "event": settings.exposure_event,
        **stats.as_metadata(),
        "duration_seconds": round(time.monotonic() - started, 3),
        "outbox": dg.MetadataValue.md(preview),
    })
