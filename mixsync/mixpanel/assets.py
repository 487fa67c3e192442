"""Mixpanel raw export → mixpanel.events, a day per partition, wide windows per request."""


import contextlib
import datetime as dt
import errno
import os
import re
import threading
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import psutil

from mixsync.http import RetryStats
from mixsync.metadata import column_schema, table_name
from mixsync.mixpanel.checks import DAILY_VOLUME, daily_volume_result
from mixsync.mixpanel.client import MixpanelClient
from mixsync.mixpanel.partitions import accept_backfill_policy_beta, daily_partitions, partition_days
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.mixpanel.sql import ExportLoad, TruncatedExport, day_figures, load_export_file
from mixsync.progress import CountProgress, DownloadProgress
from mixsync.resources import WarehouseResource
from mixsync.settings import MixpanelSettings, SettingsError
from mixsync.warehouse import AnyWarehouse, markdown_table

TRUNCATION_ATTEMPTS = 3


def export_today(settings: MixpanelSettings) -> dt.date:
    """Mixpanel's "today": UTC for new projects, the project's timezone for legacy ones."""
    zone = ZoneInfo(settings.project_timezone) if settings.legacy_local_time else dt.UTC
    return dt.datetime.now(zone).date()


def export_windows(start: dt.date, end: dt.date, max_days: int) -> list[tuple[dt.date, dt.date]]:
    """Split start..end (inclusive) into request windows of at most `max_days` days."""
    windows = []
    while start <= end:
        stop = min(end, start + dt.timedelta(days=max_days - 1))
        windows.append((start, stop))
        start = stop + dt.timedelta(days=1)
    return windows


def load_export_window(client: MixpanelClient, warehouse: AnyWarehouse, settings: MixpanelSettings, landing,
                       start: dt.date, end: dt.date, log) -> tuple[list[ExportLoad], int]:
    """Download start..end, then replace those days in DuckDB. A `terminated early` body is fetched again,
    and if it keeps coming back for a multi-day window, the window is halved."""
    legacy_tz = settings.project_timezone if settings.legacy_local_time else None
    for attempt in range(1, TRUNCATION_ATTEMPTS + 1):
        progress = DownloadProgress(log, f"export {start}..{end}")
        # The warehouse is made ready while the body streams in (on a lake, DuckDB's extensions loaded and the
        # catalog attached: about a second in a new step process), without its writer lock: the download never
        # holds the warehouse.
        preparing = threading.Thread(target=_prepare_quietly, args=(warehouse,), name="mixsync-warehouse-prepare",
                                     daemon=True)
        preparing.start()
        try:
            download = client.export_to_file(start, end, landing, progress=progress)
        finally:
            preparing.join()
        try:
            # Only the parse and the write hold the warehouse; the download above did not.
            with warehouse.write() as con:
                return [load_export_file(con, download.path, start, end, legacy_tz)], download.bytes
        except TruncatedExport as exc:
            client.stats.retries += 1
            client.stats.reasons["terminated early"] += 1
            log.warning(f"{exc}; fetching {start}..{end} again (attempt {attempt}/{TRUNCATION_ATTEMPTS})")
            client.policy.sleep(client.policy.delay(attempt, None))
        finally:
            download.path.unlink(missing_ok=True)
    if start < end:
        middle = start + (end - start) // 2
        log.warning(f"export {start}..{end} keeps ending early; splitting it at {middle}")
        first, first_bytes = load_export_window(client, warehouse, settings, landing, start, middle, log)
        second, second_bytes = load_export_window(client, warehouse, settings, landing,
                                                  middle + dt.timedelta(days=1), end, log)
        return first + second, first_bytes + second_bytes
    raise dg.Failure(f"Mixpanel's export for {start} ended with 'terminated early' {TRUNCATION_ATTEMPTS} times; "
                     "the previous copy of the day is kept. Run again later.")


def _prepare_quietly(warehouse: AnyWarehouse) -> None:
    # A warehouse that cannot be opened fails in `warehouse.write()` right after, with its own clear error.
    with contextlib.suppress(Exception):
        warehouse.prepare()


accept_backfill_policy_beta()


_WRITER_PID = re.compile(r"^export-.*-p(\d+)-[0-9a-f]+\.jsonl(\.gz)?(\.part)?$")


def remove_orphaned_downloads(landing: Path, log) -> list[str]:
    """Delete export files whose writing process is gone (a run killed mid-download or mid-load left them)."""
    removed = []
    for path in landing.glob("export-*") if landing.is_dir() else []:
        match = _WRITER_PID.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not psutil.pid_exists(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.info(f"removed {len(removed)} export file(s) left by a run that died: {removed[:5]}")
    return removed


def disk_full(exc: OSError, folder: Path, setting: str) -> dg.Failure:
    return dg.Failure(f"no space left in {folder} ({setting}): free some space there or point {setting} at a "
                      f"larger disk; the previous copy of the data is kept ({exc.strerror})")


@dg.asset(
    partitions_def=daily_partitions,
    # One run for a whole backfill: the export is asked for wide windows, not one call per day (60 calls/hour).
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="mixpanel_export",
    group_name="mixpanel",
    kinds={"mixpanel", "duckdb"},
    tags={"mixsync/source": "mixpanel"},
    metadata=table_name("mixpanel.events"),
    description="Mixpanel's raw event export, one row per event (deduplicated), a day per partition: mixpanel.events.",
    check_specs=[DAILY_VOLUME],
)
def mixpanel_events(context: dg.AssetExecutionContext, mixpanel: MixpanelResource,
                    warehouse: WarehouseResource) -> dg.MaterializeResult:
    started = time.monotonic()
    try:
        settings = mixpanel.settings()
    except SettingsError as exc:
        raise dg.Failure(str(exc)) from None
    store = warehouse.warehouse()
    first_day, last_day = partition_days(context)
    today = export_today(settings)
    if first_day > today:
        raise dg.Failure(f"{first_day} is in the future for this project (today is {today}); nothing to export yet")
    # Mixpanel answers 400 'to_date cannot be later than today': clamp rather than fail.
    last_day = min(last_day, today)
    stats = RetryStats()
    loads: list[ExportLoad] = []
    downloaded = 0
    landing = warehouse.settings().landing_dir / "mixpanel"
    orphans_removed = remove_orphaned_downloads(landing, context.log)
    windows = export_windows(first_day, last_day, settings.export_window_days)
    # Windows take minutes each: every one is reported, with how many remain and an estimate of the time left.
    backfill = CountProgress(context.log, f"export of {first_day}..{last_day}", len(windows), "windows", interval=0)
    with mixpanel.client(stats) as client:
        for start, end in windows:
            try:
                window_loads, window_bytes = load_export_window(client, store, settings, landing, start, end,
                                                                context.log)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise disk_full(exc, landing, "MIXSYNC_LANDING_DIR") from None
                raise
            loads += window_loads
            downloaded += window_bytes
            backfill.advance(note=f"loaded {start}..{end}: {sum(l.events for l in window_loads):,} events")
        export_requests = client.requests_sent
    rejects: dict[str, int] = {}
    for load in loads:
        for reason, n in load.rejects_by_reason.items():
            rejects[reason] = rejects.get(reason, 0) + n
    with store.read() as con:
        days = day_figures(con, first_day, last_day)
        schema = column_schema(con, "mixpanel.events")
        preview = markdown_table(con, """SELECT event, count(*) AS events, count(DISTINCT distinct_id) AS people
                                         FROM mixpanel.events WHERE day BETWEEN ? AND ?
                                         GROUP BY event ORDER BY events DESC LIMIT 10""", [first_day, last_day])
        volume_check = daily_volume_result(con)
    # Each partition carries its own day's figures (a single-run backfill covers many days, and Dagster would
    # otherwise copy the run's figures onto every one of them); what belongs to the run is under run/.
    for key in context.partition_keys:
        figures = days.get(dt.date.fromisoformat(key))
        if figures is None:  # after Mixpanel's "today": nothing was asked for
            figures = {"events": 0, "rejected": 0, "duplicates_dropped": 0, "rejects_by_reason": {},
                       "export_window": "not exported: after Mixpanel's today"}
        context.add_asset_metadata({"dagster/row_count": figures["events"], **figures}, partition_key=key)
    return dg.MaterializeResult(check_results=[volume_check], metadata={
        "dagster/table_name": "mixpanel.events",
        "dagster/column_schema": schema,
        "run/days": f"{first_day}..{last_day}",
        "run/events": sum(l.events for l in loads),
        "run/export_requests": export_requests,
        "run/bytes_downloaded": downloaded,
        "run/lines": sum(l.lines for l in loads),
        "run/duplicates_dropped": sum(l.duplicates_dropped for l in loads),
        # Times a day's switch lost a DuckLake write conflict and was run again whole (always 0 on a file).
        "run/conflict_retries": sum(l.conflict_retries for l in loads),
        "run/rejected": sum(rejects.values()),
        # Lines with no day of the export window (not JSON, no readable time, outside it): on no day's figures.
        "run/rejected_without_day": sum(l.rejected_without_day for l in loads),
        "run/rejects_by_reason": rejects,
        **{f"run/{name}": value for name, value in stats.as_metadata().items()},
        "run/duration_seconds": round(time.monotonic() - started, 3),
        "run/orphaned_files_removed": len(orphans_removed),
        "run/top_events": dg.MetadataValue.md(preview),
    })
