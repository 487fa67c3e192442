"""What the Dagster UI shows per partition: a single-run backfill gives each day its own figures, read back
through the instance API the UI itself uses."""

from __future__ import annotations

import datetime as dt
import gzip
import json

import dagster as dg
import pytest

from mixsync.mixpanel.assets import mixpanel_events
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource
from mixsync.sandbox import Sandbox
from mixsync.sandbox.data import Dataset, ensure_day_file
from mixsync.split.assets import split_events
from mixsync.split.resources import SplitResource

DAYS = (dt.date(2026, 2, 2), dt.date(2026, 2, 3), dt.date(2026, 2, 4))
# Lines kept of each day's export: three clearly different days.
KEEP_LINES = {DAYS[0]: 900, DAYS[1]: 150, DAYS[2]: 450}
RESOURCES = {"mixpanel": MixpanelResource(), "split": SplitResource(), "warehouse": WarehouseResource()}


@pytest.fixture
def uneven_sandbox(tmp_path, monkeypatch):
    """A sandbox whose three days hold 900, 150 and 450 export lines (a private data folder: others keep theirs)."""
    dataset = Dataset(days=DAYS, users=200, events_per_day=1000, malformed_per_day=2)
    data_dir = tmp_path / "sandbox"
    for day, keep in KEEP_LINES.items():
        path = ensure_day_file(dataset, day, data_dir / "mixpanel")
        with gzip.open(path, "rb") as handle:
            lines = handle.readlines()[:keep]
        with gzip.open(path, "wb") as handle:
            handle.writelines(lines)
    with Sandbox(dataset, data_dir=data_dir) as sandbox:
        for name, value in {**sandbox.env(), "MIXSYNC_DUCKDB_PATH": str(tmp_path / "warehouse.duckdb"),
                            "MIXSYNC_LANDING_DIR": str(tmp_path / "landing"), "MIXSYNC_HTTP_BACKOFF_MS": "5"}.items():
            monkeypatch.setenv(name, value)
        yield sandbox


def latest_partition_metadata(instance, asset: str, day: dt.date) -> dict:
    """The latest materialization of one partition, as the UI's partition view reads it."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[day.isoformat()]), limit=1).records
    assert len(records) == 1, f"{asset} {day}: expected one materialization, got {len(records)}"
    materialization = records[0].asset_materialization
    assert materialization.partition == day.isoformat()
    return {key: value.value for key, value in materialization.metadata.items()}


def test_a_single_run_backfill_gives_each_day_its_own_figures(uneven_sandbox, instance):
    tags = {"dagster/asset_partition_range_start": DAYS[0].isoformat(),
            "dagster/asset_partition_range_end": DAYS[-1].isoformat()}
    result = dg.materialize([mixpanel_events, split_events], instance=instance, resources=RESOURCES, tags=tags)
    assert result.success
    assert len(instance.get_run_records()) == 1  # one run covered the three days

    from mixsync.settings import WarehouseSettings
    from mixsync.warehouse import Warehouse
    with Warehouse(WarehouseSettings.from_env().duckdb_path).read() as con:
        truth = {day: con.execute("""SELECT l.events, l.rejected, l.duplicates_dropped,
                                            (SELECT count(*) FROM mixpanel.events e WHERE e.day = l.day),
                                            (SELECT count(*) FROM sync.split_events s
                                             WHERE s.scope = l.day::VARCHAR AND s.status = 'sent'),
                                            (SELECT count(*) FROM split.events_rejected r WHERE r.day = l.day)
                                     FROM mixpanel.event_loads l WHERE l.day = ?""", [day]).fetchone()
                 for day in DAYS}
    sizes = [truth[day][3] for day in DAYS]
    assert len(set(sizes)) == 3 and max(sizes) > 4 * min(sizes)  # the days really differ

    total_bytes = None
    for day in DAYS:
        events, rejected, duplicates, rows, sent, split_rejected = truth[day]
        mixpanel_meta = latest_partition_metadata(instance, "mixpanel_events", day)
        assert mixpanel_meta["dagster/row_count"] == mixpanel_meta["events"] == events == rows
        assert mixpanel_meta["rejected"] == rejected
        assert mixpanel_meta["duplicates_dropped"] == duplicates
        assert sum(mixpanel_meta["rejects_by_reason"].values()) == rejected
        # Run-wide figures are under run/, the same on every day and never under a per-day name.
        assert mixpanel_meta["run/events"] == sum(truth[d][0] for d in DAYS)
        assert mixpanel_meta["run/days"] == f"{DAYS[0]}..{DAYS[-1]}"
        assert total_bytes in (None, mixpanel_meta["run/bytes_downloaded"])
        total_bytes = mixpanel_meta["run/bytes_downloaded"]
        assert not {"bytes_downloaded", "export_requests", "duration_seconds", "retries", "lines"} & set(mixpanel_meta)
        assert mixpanel_meta["dagster/table_name"] == "mixpanel.events"
        assert "time" in [column.name for column in mixpanel_meta["dagster/column_schema"].columns]

        split_meta = latest_partition_metadata(instance, "split_events", day)
        assert split_meta["dagster/row_count"] == split_meta["events_sent_total"] == split_meta["events_sent"] == sent
        assert split_meta["events_considered"] == rows
        assert split_meta["events_rejected"] == split_rejected
        assert split_meta["run/events_sent"] == sum(truth[d][4] for d in DAYS) == uneven_sandbox.split.accepted
        assert not {"requests", "batches", "duration_seconds", "retries"} & set(split_meta)
        assert split_meta["dagster/table_name"] == "sync.split_events"


def test_a_day_shows_the_same_figures_however_it_was_backfilled(uneven_sandbox, instance):
    day = DAYS[1]
    tags = {"dagster/asset_partition_range_start": DAYS[0].isoformat(),
            "dagster/asset_partition_range_end": DAYS[-1].isoformat()}
    dg.materialize([mixpanel_events], instance=instance, resources=RESOURCES, tags=tags)
    in_range = latest_partition_metadata(instance, "mixpanel_events", day)
    dg.materialize([mixpanel_events], instance=instance, resources=RESOURCES, partition_key=day.isoformat())
    alone = latest_partition_metadata(instance, "mixpanel_events", day)
    for name in ("dagster/row_count", "events", "rejected", "duplicates_dropped", "rejects_by_reason"):
        assert in_range[name] == alone[name], name
    assert in_range["run/events"] > alone["run/events"] == alone["events"]


def _rejects_in_file(sandbox, day: dt.date) -> tuple[int, list[str]]:
    """(lines rejected with a time on `day`, lines rejected with no day of their own) in the day's export file."""
    dated, dayless = 0, []
    with gzip.open(ensure_day_file(sandbox.dataset, day, sandbox.data_dir / "mixpanel"), "rt") as handle:
        for line in handle:
            try:
                parsed = json.loads(line)
            except ValueError:
                dayless.append(line.strip())
                continue
            time = parsed.get("properties", {}).get("time")
            if not isinstance(time, (int, float)):
                dayless.append(line.strip())
            elif not parsed.get("event"):
                dated += 1
    return dated, dayless


def test_a_line_with_no_day_of_its_own_counts_on_no_day_and_is_kept_once(uneven_sandbox, instance):
    """A line that is not JSON or has no time came with one of a multi-day window's days, which one is unknown: no
    day's figures count it (the run's do), and reloading any one day keeps each such line once in the table."""
    truth = {day: _rejects_in_file(uneven_sandbox, day) for day in DAYS}
    dayless_total = sum(len(dayless) for _, dayless in truth.values())
    reloaded = next(day for day in DAYS[1:] if truth[day][1])  # a day past the window's first with such a line
    assert dayless_total and sum(dated for dated, _ in truth.values())
    tags = {"dagster/asset_partition_range_start": DAYS[0].isoformat(),
            "dagster/asset_partition_range_end": DAYS[-1].isoformat()}
    assert dg.materialize([mixpanel_events], instance=instance, resources=RESOURCES, tags=tags).success
    for day in DAYS:
        meta = latest_partition_metadata(instance, "mixpanel_events", day)
        assert meta["rejected"] == sum(meta["rejects_by_reason"].values()) == truth[day][0], day
        assert meta["run/rejected_without_day"] == dayless_total
        assert meta["run/rejected"] == dayless_total + sum(dated for dated, _ in truth.values())

    from mixsync.settings import WarehouseSettings
    from mixsync.warehouse import Warehouse
    warehouse = Warehouse(WarehouseSettings.from_env().duckdb_path)
    with warehouse.read() as con:
        windows = con.execute("""SELECT window_start, window_end, count(*) FROM mixpanel.events_rejected
                                 WHERE day IS NULL GROUP BY ALL""").fetchall()
    assert windows == [(DAYS[0], DAYS[-1], dayless_total)]

    assert dg.materialize([mixpanel_events], instance=instance, resources=RESOURCES,
                          partition_key=reloaded.isoformat()).success
    assert latest_partition_metadata(instance, "mixpanel_events", reloaded)["rejected"] == truth[reloaded][0]
    with warehouse.read() as con:
        by_window = con.execute("""SELECT window_start, window_end, count(*) FROM mixpanel.events_rejected
                                   WHERE day IS NULL GROUP BY ALL ORDER BY ALL""").fetchall()
        dated_rows = con.execute("SELECT count(*) FROM mixpanel.events_rejected WHERE day IS NOT NULL").fetchone()[0]
    # The reloaded day's lines were rejected again: their copies from the wider window are gone (as many as the day
    # has, though the same text comes on other days too), the other days' stay.
    reloaded_count = len(truth[reloaded][1])
    assert by_window == sorted([(DAYS[0], DAYS[-1], dayless_total - reloaded_count), (reloaded, reloaded, reloaded_count)])
    assert dated_rows == sum(dated for dated, _ in truth.values())
