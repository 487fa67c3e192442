"""Materializing mixpanel_events against the sandbox: real HTTP, a real DuckDB file, real Dagster runs."""

from __future__ import annotations

import datetime as dt
import gzip
import os
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import orjson
import pytest

from mixsync.mixpanel.assets import export_windows, mixpanel_events
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource
from mixsync.sandbox.data import Dataset, ensure_day_file

RESOURCES = {"mixpanel": MixpanelResource(), "warehouse": WarehouseResource()}


def materialize_days(instance, first: dt.date, last: dt.date | None = None, raise_on_error: bool = True):
    tags = {}
    partition_key = first.isoformat()
    if last and last != first:
        tags = {"dagster/asset_partition_range_start": first.isoformat(),
                "dagster/asset_partition_range_end": last.isoformat()}
        partition_key = None
    return dg.materialize([mixpanel_events], instance=instance, resources=RESOURCES, partition_key=partition_key,
                          tags=tags, raise_on_error=raise_on_error)


def metadata(result) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node("mixpanel_events")[0].metadata.items()}


def source_lines(sandbox, day: dt.date) -> list[bytes]:
    with gzip.open(ensure_day_file(sandbox.dataset, day, sandbox.mixpanel.data_dir)) as handle:
        return [line.rstrip(b"\n") for line in handle]


def dedupe_keys(lines: list[bytes]) -> set:
    keys = set()
    for line in lines:
        try:
            record = orjson.loads(line)
            props = record["properties"]
            if record.get("event") and "time" in props:
                keys.add((record["event"], props.get("distinct_id"), props["time"], props.get("$insert_id")))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            pass
    return keys


def export_requests(sandbox) -> list:
    return sandbox.mixpanel.recorder.matching("/api/2.0/export")


@pytest.mark.both_backends
def test_a_day_lands_deduplicated_with_rejects_and_metadata(sandbox, env, warehouse, instance):
    day = sandbox.dataset.days[0]
    result = materialize_days(instance, day)
    lines = source_lines(sandbox, day)
    expected_events = len(dedupe_keys(lines))
    with warehouse.read() as con:
        n, distinct = con.execute("""SELECT count(*), count(DISTINCT (event, distinct_id, time, insert_id))
                                     FROM mixpanel.events WHERE day = ?""", [day]).fetchone()
        rejects = con.execute("SELECT reason, count(*) FROM mixpanel.events_rejected GROUP BY reason").fetchall()
        reprocessed = con.execute("""SELECT count(*) FILTER (WHERE properties->>'reprocessed' = 'true'), count(*)
            FROM mixpanel.events e WHERE (event, insert_id) IN (
                SELECT (event, insert_id) FROM mixpanel.events WHERE properties->>'reprocessed' = 'true')""").fetchone()
    assert n == distinct == expected_events
    assert len(lines) > n  # the export held exact duplicates and reprocessed copies
    assert sum(count for _, count in rejects) == sandbox.dataset.malformed_per_day
    # the copy Mixpanel processed last wins
    assert reprocessed[0] == reprocessed[1] > 0
    meta = metadata(result)
    assert meta["dagster/row_count"] == n
    assert meta["run/lines"] == len(lines)
    # A line with no day of its own (not JSON, no time) is the run's, not the day's.
    assert meta["rejected"] + meta["run/rejected_without_day"] == meta["run/rejected"] == sandbox.dataset.malformed_per_day
    assert meta["duplicates_dropped"] == len(lines) - n - sandbox.dataset.malformed_per_day
    assert meta["run/export_requests"] == 1


# Both: on a lake the careful path's invalid lines are rejected inside the load's one transaction.
@pytest.mark.both_backends
def test_rejects_name_their_reason_and_keep_the_raw_line(sandbox, env, warehouse, instance):
    for day in sandbox.dataset.days:
        materialize_days(instance, day)
    with warehouse.read() as con:
        reasons = {r for (r,) in con.execute("SELECT DISTINCT reason FROM mixpanel.events_rejected").fetchall()}
        raws = [r for (r,) in con.execute("SELECT raw FROM mixpanel.events_rejected").fetchall()]
    assert reasons <= {"not valid JSON", "missing event", "missing properties.time", "properties.time is not a number"}
    assert {"not valid JSON", "missing event"} <= reasons
    assert all(raw for raw in raws)


def test_properties_are_kept_value_for_value(sandbox, env, warehouse, instance):
    day = sandbox.dataset.days[1]
    materialize_days(instance, day)
    originals = {}
    for line in source_lines(sandbox, day):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        props = record.get("properties", {})
        if "$insert_id" in props and "order_id" in props:
            originals[props["$insert_id"]] = props
    assert originals, "the seeded data should hold big integers"
    with warehouse.read() as con:
        rows = con.execute("SELECT insert_id, properties FROM mixpanel.events WHERE insert_id IN (SELECT unnest(?))",
                           [list(originals)]).fetchall()
    assert len(rows) == len(originals)
    for insert_id, properties in rows:
        # orjson keeps integers above 2**53 exact; a float round-trip would not
        assert orjson.loads(properties) == originals[insert_id]
        assert isinstance(orjson.loads(properties).get("cart", {}), dict)
    with warehouse.read() as con:
        cities = {c for (c,) in con.execute("""SELECT DISTINCT properties->>'$."$city"' FROM mixpanel.events""").fetchall()}
    assert {"São Paulo", "東京", "Zürich"} <= cities


@pytest.mark.both_backends
def test_rematerializing_replaces_the_day_without_duplicates(sandbox, env, warehouse, instance):
    day = sandbox.dataset.days[0]
    materialize_days(instance, day)
    with warehouse.read() as con:
        first = con.execute("SELECT count(*) FROM mixpanel.events").fetchone()[0]
    materialize_days(instance, day)
    with warehouse.read() as con:
        second = con.execute("SELECT count(*) FROM mixpanel.events").fetchone()[0]
        rejects = con.execute("SELECT count(*) FROM mixpanel.events_rejected").fetchone()[0]
        loads = con.execute("SELECT count(*) FROM mixpanel.event_loads").fetchone()[0]
    assert first == second
    assert rejects == sandbox.dataset.malformed_per_day
    assert loads == 1


def test_a_range_backfill_asks_for_one_window_not_one_call_per_day(sandbox, env, warehouse, instance):
    days = sorted(sandbox.dataset.days)
    result = materialize_days(instance, days[0], days[-1])
    assert len(export_requests(sandbox)) == 1 < len(days)
    request = export_requests(sandbox)[0]
    assert (request.params["from_date"], request.params["to_date"]) == (days[0].isoformat(), days[-1].isoformat())
    with warehouse.read() as con:
        per_day = dict(con.execute("SELECT day, count(*) FROM mixpanel.events GROUP BY day").fetchall())
    assert set(per_day) == set(days)
    by_partition = {m.partition: m.metadata["dagster/row_count"].value
                    for m in result.asset_materializations_for_node("mixpanel_events")}
    assert by_partition == {day.isoformat(): n for day, n in per_day.items()}


def test_export_windows_split_long_ranges():
    windows = export_windows(dt.date(2025, 1, 1), dt.date(2025, 12, 31), 31)
    assert len(windows) == 12
    assert windows[0] == (dt.date(2025, 1, 1), dt.date(2025, 1, 31))
    assert windows[-1][1] == dt.date(2025, 12, 31)
    assert all((b - a).days < 31 for a, b in windows)


@pytest.mark.parametrize("fault", [
    {"kind": "status", "status": 429, "retry_after": "0", "body": '{"error": "rate limited"}'},
    {"kind": "status", "status": 429},
    {"kind": "status", "status": 500, "body": "unknown error"},
    {"kind": "status", "status": 502},
    {"kind": "status", "status": 503},
    {"kind": "cut", "after_bytes": 3000},
    {"kind": "terminated_early"},
])
def test_the_export_survives_misbehaviour(fault, sandbox, env, warehouse, instance):
    day = sandbox.dataset.days[0]
    sandbox.mixpanel.faults.add("export", **fault)
    result = materialize_days(instance, day)
    with warehouse.read() as con:
        n = con.execute("SELECT count(*) FROM mixpanel.events WHERE day = ?", [day]).fetchone()[0]
    assert n == len(dedupe_keys(source_lines(sandbox, day)))
    assert len(export_requests(sandbox)) == 2
    assert metadata(result)["run/retries"] == 1


def test_an_export_that_keeps_ending_early_fails_and_keeps_the_previous_day(sandbox, env, warehouse, instance):
    day = sandbox.dataset.days[0]
    materialize_days(instance, day)
    with warehouse.read() as con:
        before = con.execute("SELECT count(*) FROM mixpanel.events").fetchone()[0]
    sandbox.mixpanel.faults.add("export", "terminated_early", times=3)
    result = materialize_days(instance, day, raise_on_error=False)
    assert not result.success
    assert "terminated early" in str(result.get_step_failure_events()[0].event_specific_data.error)
    with warehouse.read() as con:
        after = con.execute("SELECT count(*) FROM mixpanel.events").fetchone()[0]
    assert after == before > 0


@pytest.mark.both_backends
def test_a_failed_run_leaves_the_previous_copy_intact(sandbox, env, warehouse, instance):
    day = sandbox.dataset.days[0]
    materialize_days(instance, day)
    with warehouse.read() as con:
        before = con.execute("SELECT count(*), max(loaded_at) FROM mixpanel.events").fetchone()
    sandbox.mixpanel.faults.add("export", status=503, times=10)
    assert not materialize_days(instance, day, raise_on_error=False).success
    with warehouse.read() as con:
        assert con.execute("SELECT count(*), max(loaded_at) FROM mixpanel.events").fetchone() == before


@pytest.mark.parametrize("status,body,names", [
    (400, "some parameter is wrong", "MIXPANEL_PROJECT_ID"),
    (402, '{"error": "Your plan does not allow API calls"}', "plan"),
    (403, '{"error": "no access"}', "MIXPANEL_PROJECT_ID"),
])
def test_permanent_errors_fail_at_once_with_mixpanels_message(status, body, names, sandbox, env, instance):
    sandbox.mixpanel.faults.add("export", status=status, body=body)
    result = materialize_days(instance, sandbox.dataset.days[0], raise_on_error=False)
    assert not result.success
    message = str(result.get_step_failure_events()[0].event_specific_data.error)
    assert f"HTTP {status}" in message and body[:20] in message and names in message
    assert len(export_requests(sandbox)) == 1


def test_bad_credentials_fail_fast_naming_the_setting_without_the_secret(sandbox, env, instance, monkeypatch):
    wrong = "wrong-secret-value-0123456789"
    monkeypatch.setenv("MIXPANEL_SERVICE_ACCOUNT_SECRET", wrong)
    result = materialize_days(instance, sandbox.dataset.days[0], raise_on_error=False)
    assert not result.success
    message = str(result.get_step_failure_events()[0].event_specific_data.error)
    assert "HTTP 401" in message and "MIXPANEL_SERVICE_ACCOUNT_SECRET" in message
    assert len(export_requests(sandbox)) == 1
    logs = "\n".join(str(record.dagster_event or record.user_message)
                     for record in instance.all_logs(result.run_id))
    assert wrong not in message and wrong not in logs


def test_missing_settings_fail_naming_the_variable(sandbox, env, instance, monkeypatch):
    monkeypatch.delenv("MIXPANEL_PROJECT_ID")
    result = materialize_days(instance, sandbox.dataset.days[0], raise_on_error=False)
    assert "MIXPANEL_PROJECT_ID is not set" in str(result.get_step_failure_events()[0].event_specific_data.error)
    assert export_requests(sandbox) == []


@pytest.mark.both_backends
def test_the_daily_job_runs_the_volume_check_and_it_flags_an_empty_day(sandbox, env, warehouse, instance):
    from mixsync.definitions import defs

    job = defs.resolve_job_def("mixpanel_events_job")
    days = sorted(sandbox.dataset.days)
    materialize_days(instance, days[0], days[-2])
    healthy = job.execute_in_process(instance=instance, partition_key=days[-2].isoformat())
    assert healthy.get_asset_check_evaluations()[0].passed
    # The check is evaluated inside the load's step: one step, one process per run.
    assert [event.step_key for event in healthy.get_step_success_events()] == ["mixpanel_events"]
    sandbox.mixpanel.faults.add("export", status=200, body="")  # Mixpanel answered, with nothing in it
    result = job.execute_in_process(instance=instance, partition_key=days[-1].isoformat())
    evaluation = result.get_asset_check_evaluations()[0]
    assert not evaluation.passed
    assert days[-1].isoformat() in evaluation.metadata["low_days"].value


LEGACY_ZONE = "America/New_York"
DST_DAYS = (dt.date(2026, 3, 8), dt.date(2026, 11, 1))  # spring forward (a gap), fall back (a fold)


@pytest.mark.both_backends
@pytest.mark.parametrize("dataset", [Dataset(days=DST_DAYS, users=200, events_per_day=3000,
                                             legacy_timezone=LEGACY_ZONE)])
def test_legacy_local_times_become_true_utc_across_dst(dataset, sandbox, env, warehouse, instance):
    assert env["MIXPANEL_LEGACY_LOCAL_TIME"] == "true"
    for day in DST_DAYS:
        materialize_days(instance, day)
    zone = ZoneInfo(LEGACY_ZONE)
    with warehouse.read() as con:
        rows = con.execute("SELECT (properties->>'time')::BIGINT, time, day FROM mixpanel.events").fetchall()
    in_gap = in_fold = 0
    for local_ms, instant, day in rows:
        local = dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=local_ms)
        expected = local.replace(tzinfo=zone, fold=0).astimezone(dt.UTC)
        assert instant == expected, (local, instant, expected)
        assert day == local.date()
        in_gap += local.date() == DST_DAYS[0] and local.hour == 2
        in_fold += local.date() == DST_DAYS[1] and local.hour == 1
    assert in_gap > 0 and in_fold > 0  # the data really crosses both transitions
    # a fold's wall-clock hour maps to the first (daylight) occurrence, 4 hours behind UTC
    fold = [i for m, i, _ in rows
            if (dt.datetime(1970, 1, 1) + dt.timedelta(milliseconds=m)).hour == 1 and i.date() == DST_DAYS[1]]
    assert all(i.hour == 5 for i in fold)


def _cli_env(env: dict, home: Path) -> dict:
    out = dict(os.environ)
    out.update(env)
    out["DAGSTER_HOME"] = str(home)
    return out


@pytest.mark.slow
def test_cli_partition_range_and_concurrent_runs_with_a_reader_open(sandbox, env, warehouse, tmp_path):
    """Two `dagster asset materialize` processes at once, while an ad-hoc read session holds the file."""
    days = sorted(sandbox.dataset.days)
    home = tmp_path / "dagster_home"
    home.mkdir()
    # A first use creates the instance's SQLite storage; do it once so two processes don't race on it.
    dg.DagsterInstance.local_temp(str(home)).dispose()
    dagster = str(Path(sys.executable).with_name("dagster"))
    base = [dagster, "asset", "materialize", "-m", "mixsync.definitions", "--select", "mixpanel_events"]
    with warehouse.write():
        pass  # create the file so a reader can hold it
    with warehouse.read() as reader:
        runs = [
            subprocess.Popen([*base, "--partition-range", f"{days[0]}...{days[1]}"], env=_cli_env(env, home),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
            subprocess.Popen([*base, "--partition", str(days[2])], env=_cli_env(env, home),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
        ]
        deadline = time.monotonic() + 120
        while len([r for r in export_requests(sandbox) if r.status == 200]) < 2:
            assert time.monotonic() < deadline, "the runs never reached the export"
            ended = [run for run in runs if run.poll() is not None]
            assert not ended, f"a run ended while the reader held the file: {ended[0].communicate()[0].decode()[-3000:]}"
            time.sleep(0.05)
        reader.execute("SELECT 1").fetchall()
    outputs = [run.communicate(timeout=240)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert len(export_requests(sandbox)) == 2  # three days, two runs, two calls
    with warehouse.read() as con:
        assert {d for (d,) in con.execute("SELECT DISTINCT day FROM mixpanel.events").fetchall()} == set(days)


def test_the_volume_check_compares_a_day_with_the_7_calendar_days_before_it_not_older_loads(tmp_path):
    from mixsync.mixpanel.checks import daily_volume_result
    from mixsync.warehouse import Warehouse

    store = Warehouse(tmp_path / "w.duckdb", lock_timeout_seconds=30)
    january = [dt.date(2026, 1, 1) + dt.timedelta(days=n) for n in range(4)]
    ledger = [(day, 1000) for day in january] + [(dt.date(2026, 11, 29), 10),  # after a gap: nothing to compare
                                                 (dt.date(2026, 11, 30), 1)]    # 1 against 10 the day before: low
    with store.write() as con:
        con.execute("""INSERT INTO mixpanel.event_loads
                       SELECT unnest($days), unnest($events), 0, 0, unnest($days), unnest($days), now(), 1""",
                    {"days": [day for day, _ in ledger], "events": [events for _, events in ledger]})
        result = daily_volume_result(con)
    assert not result.passed
    assert result.metadata["low_days"].data == {"2026-11-30": {"events": 1, "trailing_mean": 10.0}}


@pytest.mark.parametrize("asset", ["mixpanel_events", "split_events"])
def test_a_reversed_partition_range_fails_naming_the_range_and_records_nothing(sandbox, env, instance, asset):
    from mixsync.split.assets import split_events
    from mixsync.split.resources import SplitResource

    days = sorted(sandbox.dataset.days)
    selected = mixpanel_events if asset == "mixpanel_events" else split_events
    result = dg.materialize([selected], instance=instance, raise_on_error=False,
                            resources={**RESOURCES, "split": SplitResource()},
                            tags={"dagster/asset_partition_range_start": days[-1].isoformat(),
                                  "dagster/asset_partition_range_end": days[0].isoformat()})
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert f"{days[-1]}...{days[0]} is reversed" in failure.step_failure_data.error.message
    assert result.asset_materializations_for_node(asset) == []
    assert export_requests(sandbox) == []
