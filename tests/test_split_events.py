"""Materializing split_events against the sandbox: real HTTP, a real DuckDB file, real Dagster runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import dagster as dg
import orjson
import pytest
from waiting import poll, reap

from mixsync.mixpanel.assets import mixpanel_events
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource
from mixsync.sandbox.split import BULK_ROUTE
from mixsync.split.assets import split_events, split_events_in_doubt
from mixsync.split.resources import SplitResource
from mixsync.split.sql import EVENTS_OUTBOX

RESOURCES = {"mixpanel": MixpanelResource(), "split": SplitResource(), "warehouse": WarehouseResource()}
RESEND = {"ops": {"split_events": {"config": {"resend": True}}}}


def materialize(instance, assets, first: str, last: str | None = None, run_config=None, raise_on_error=True):
    tags, partition_key = {}, first
    if last and last != first:
        tags = {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
        partition_key = None
    return dg.materialize(assets, instance=instance, resources=RESOURCES, partition_key=partition_key, tags=tags,
                          run_config=run_config, raise_on_error=raise_on_error)


def split_metadata(result) -> dict:
    """The run's figures (run/..., without the prefix) and the first partition's dagster/ entries."""
    metadata = result.asset_materializations_for_node("split_events")[0].metadata.items()
    return {k.removeprefix("run/"): v.value for k, v in metadata if k.startswith(("run/", "dagster/"))}


def partition_metadata(result) -> dict[str, dict]:
    """Each day's materialization of split_events: its own figures and the run's (run/...)."""
    return {m.partition: {k: v.value for k, v in m.metadata.items()}
            for m in result.asset_materializations_for_node("split_events")}


def failure_text(result) -> str:
    failure = result.get_step_failure_events()[0].step_failure_data
    return " ".join(filter(None, [failure.error.message if failure.error else None,
                                  failure.user_failure_data.description if failure.user_failure_data else None]))


def run_logs(instance, result) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(result.run_id)]


def outbox_counts(warehouse) -> dict[str, int]:
    with warehouse.read() as con:
        return dict(con.execute(f"SELECT status, count(*) FROM {EVENTS_OUTBOX} GROUP BY status").fetchall())


def outbox_identities(warehouse, sandbox) -> set:
    with warehouse.read() as con:
        payloads = [orjson.loads(p) for (p,) in con.execute(f"SELECT payload FROM {EVENTS_OUTBOX}").fetchall()]
    return {sandbox.split.identity(p) for p in payloads}


@pytest.fixture
def day(sandbox, env, instance) -> str:
    """A day of the sandbox's Mixpanel data, loaded into mixpanel.events."""
    key = sandbox.dataset.days[0].isoformat()
    materialize(instance, [mixpanel_events], key)
    return key


@pytest.mark.both_backends
def test_a_day_is_sent_once_and_rematerializing_sends_nothing_new(sandbox, env, warehouse, instance, day):
    first = split_metadata(materialize(instance, [split_events], day))
    with warehouse.read() as con:
        considered = con.execute("SELECT count(*) FROM mixpanel.events WHERE day = ?", [day]).fetchone()[0]
        rejects = dict(con.execute("SELECT reason, count(*) FROM split.events_rejected GROUP BY reason").fetchall())
    assert first["events_considered"] == considered > 500
    assert first["events_mapped"] + first["events_rejected"] == considered
    assert first["events_sent"] == first["events_mapped"] == sandbox.split.accepted
    assert first["dagster/row_count"] == first["events_sent"]
    assert first["rejects_by_reason"] == rejects and rejects  # the dataset has events without distinct_id
    assert first["renames"] > 0 and first["renamed_events"]["$mp_web_page_view"] == "mp_web_page_view"
    assert first["batches"] == -(-first["events_sent"] // 1000)
    assert sandbox.split.duplicates() == 0
    assert outbox_identities(warehouse, sandbox) == set(sandbox.split.received())
    assert outbox_counts(warehouse) == {"sent": first["events_sent"]}

    result = materialize(instance, [split_events], day)
    again = split_metadata(result)
    assert again["events_sent"] == 0 and again["events_enqueued"] == 0 and again["batches"] == 0
    assert partition_metadata(result)[day]["events_sent"] == 0  # the day's: nothing sent by this run either
    assert again["events_already_sent_before"] == first["events_sent"]
    assert sandbox.split.accepted == first["events_sent"] and sandbox.split.duplicates() == 0


def test_resend_is_explicit_and_warned_about(sandbox, env, warehouse, instance, day):
    first = split_metadata(materialize(instance, [split_events], day))
    result = materialize(instance, [split_events], day, run_config=RESEND)
    again = split_metadata(result)
    assert again["events_resent"] == again["events_sent"] == first["events_sent"]
    assert sandbox.split.duplicates() == first["events_sent"]
    assert any("resend requested" in line and "twice" in line for line in run_logs(instance, result))


def test_a_range_backfill_flows_through_both_assets_in_one_run(sandbox, env, warehouse, instance):
    days = [d.isoformat() for d in sandbox.dataset.days]
    result = materialize(instance, [mixpanel_events, split_events], days[0], days[-1])
    meta = split_metadata(result)
    assert meta["days"] == f"{days[0]}..{days[-1]}"
    with warehouse.read() as con:
        scopes = dict(con.execute(f"SELECT scope, count(*) FROM {EVENTS_OUTBOX} GROUP BY scope").fetchall())
    assert sorted(scopes) == days and sum(scopes.values()) == meta["events_sent"] == sandbox.split.accepted


def test_a_429_storm_is_ridden_out_honouring_retry_after(sandbox, env, warehouse, instance, day, monkeypatch):
    monkeypatch.setenv("MIXSYNC_HTTP_ATTEMPTS", "40")
    sandbox.split.faults.add(BULK_ROUTE, status=429, body="Too Many Requests", retry_after="0", times=10)
    sandbox.split.faults.add(BULK_ROUTE, status=429, body="Too Many Requests", retry_after="1", times=2)
    sandbox.split.faults.add(BULK_ROUTE, status=503, body="Service Unavailable", times=3)
    meta = split_metadata(materialize(instance, [split_events], day))
    assert meta["retries"] == 15
    assert meta["retry_reasons"] == {"HTTP 429 from Split Events API": 12, "HTTP 503 from Split Events API": 3}
    assert meta["retry_wait_seconds"] >= 2.0  # the two Retry-After: 1 answers were honoured
    assert meta["events_sent"] == sandbox.split.accepted and sandbox.split.duplicates() == 0
    assert outbox_counts(warehouse) == {"sent": meta["events_sent"]}


def test_a_wrong_key_stops_with_splits_message_and_the_setting_then_a_fixed_key_sends_all(
        sandbox, env, warehouse, instance, day, monkeypatch):
    monkeypatch.setenv("SPLIT_SDK_KEY", sandbox.split.admin_key)
    result = materialize(instance, [split_events], day, raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    assert "HTTP 401" in text and "Admin API key cannot send events" in text and "SPLIT_SDK_KEY" in text
    assert sandbox.split.admin_key not in text and sandbox.split.admin_key not in " ".join(run_logs(instance, result))
    # Not retried: one request per concurrent batch at most, nothing accepted, everything still pending.
    assert len(sandbox.split.recorder.matching(BULK_ROUTE)) <= 4 and sandbox.split.accepted == 0
    assert set(outbox_counts(warehouse)) == {"pending"}

    monkeypatch.setenv("SPLIT_SDK_KEY", sandbox.split.sdk_key)
    meta = split_metadata(materialize(instance, [split_events], day))
    assert meta["events_sent"] == meta["events_mapped"] == sandbox.split.accepted
    assert sandbox.split.duplicates() == 0


def test_an_unknown_traffic_type_stops_naming_the_setting(sandbox, env, warehouse, instance, day, monkeypatch):
    monkeypatch.setenv("SPLIT_TRAFFIC_TYPE", "accounts")
    result = materialize(instance, [split_events], day, raise_on_error=False)
    text = failure_text(result)
    assert "HTTP 400" in text and "traffic type 'accounts' does not exist" in text and "SPLIT_TRAFFIC_TYPE" in text
    assert sandbox.split.accepted == 0


def test_missing_settings_and_bad_mapping_files_fail_only_this_asset_with_a_clear_message(
        sandbox, env, warehouse, instance, day, monkeypatch, tmp_path):
    monkeypatch.delenv("SPLIT_SDK_KEY")
    result = materialize(instance, [split_events], day, raise_on_error=False)
    assert "SPLIT_SDK_KEY is not set" in failure_text(result)
    monkeypatch.setenv("SPLIT_SDK_KEY", sandbox.split.sdk_key)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("events:\n  include: [Purchase]\nvalue:\n  propertes: [price]\n", encoding="utf-8")
    monkeypatch.setenv("SPLIT_MAPPING_FILE", str(mapping))
    result = materialize(instance, [split_events], day, raise_on_error=False)
    assert f"{mapping}, line 4: unknown setting value.propertes" in failure_text(result)
    assert sandbox.split.accepted == 0


@pytest.mark.both_backends
def test_a_mapping_file_is_applied(sandbox, env, warehouse, instance, day, monkeypatch, tmp_path):
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("events:\n  include: [Purchase, '$mp_web_page_view']\n  rename:\n    Purchase: purchase\n"
                       "value:\n  properties: [price]\nproperties:\n  drop_dollar: true\n", encoding="utf-8")
    monkeypatch.setenv("SPLIT_MAPPING_FILE", str(mapping))
    meta = split_metadata(materialize(instance, [split_events], day))
    events = sandbox.split.events
    assert {e["eventTypeId"] for e in events} == {"purchase", "mp_web_page_view"}
    assert all(e["value"] is not None for e in events if e["eventTypeId"] == "purchase")
    assert not any(k.startswith("$") for e in events for k in e["properties"])
    assert meta["events_not_selected"] == meta["events_considered"] - meta["events_mapped"] - meta["events_rejected"] > 0


CRASHING_RUN = """
import sys
import dagster as dg
from mixsync.definitions import resources
from mixsync.split.assets import split_events, split_events_in_doubt
dg.materialize([split_events], partition_key=sys.argv[1], resources=resources)
"""


def push_child(day: str, batch: int, concurrency: int, timeout_seconds: int = 60) -> subprocess.Popen:
    child_env = {**os.environ, "SPLIT_BATCH_SIZE": str(batch), "SPLIT_PUSH_CONCURRENCY": str(concurrency),
                 "SPLIT_REQUEST_TIMEOUT_SECONDS": str(timeout_seconds)}
    return subprocess.Popen([sys.executable, "-c", CRASHING_RUN, day], env=child_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_held_requests(sandbox, child, count: int) -> None:
    deadline = time.monotonic() + 120
    while sandbox.split.bulk_requests < count:
        assert child.poll() is None, "the push ended before it could be interrupted"
        assert time.monotonic() < deadline, "the push never reached the held requests"
        time.sleep(0.05)


def check_in_doubt(instance) -> dg.AssetCheckResult:
    return split_events_in_doubt(warehouse=WarehouseResource())


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGKILL", "SIGINT"])
def test_batches_in_flight_when_a_push_is_killed_or_interrupted_are_held_in_doubt_never_resent_by_default(
        sandbox, env, warehouse, instance, day, stop):
    batch, concurrency = 100, 2
    # From the third request on, Split receives and keeps the events but the answers never reach the client.
    sandbox.split.hold_from_request = 3
    child = push_child(day, batch, concurrency, timeout_seconds=5)
    try:
        wait_for_held_requests(sandbox, child, 2 + concurrency)
        child.send_signal(getattr(signal, stop))
        if stop == "SIGINT":
            # Interrupted, not killed: the run stops on its own once the requests in flight time out.
            child.wait(timeout=120)
        else:
            child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        sandbox.split.hold_from_request = None
        sandbox.split.release()
    in_flight = concurrency * batch
    assert sandbox.split.accepted == 2 * batch + in_flight

    result = materialize(instance, [split_events], day)
    meta = split_metadata(result)
    # Killed: the next run finds the batches in flight in the journal; interrupted: the run itself held them.
    # Either way they are not this run's in_doubt: its push sent nothing whose outcome is unknown.
    assert meta["in_doubt"] == 0
    assert meta["recovered_in_doubt"] == meta["in_flight_at_crash"] == (in_flight if stop == "SIGKILL" else 0)
    assert meta["recovered_sent"] == (2 * batch if stop == "SIGKILL" else 0)
    assert meta["events_in_doubt_held"] == in_flight
    assert partition_metadata(result)[day]["events_sent"] == meta["events_sent"]
    assert meta["events_sent"] == meta["events_mapped"] - 2 * batch - in_flight
    assert stop == "SIGINT" or any("in doubt" in line and "resend_in_doubt" in line for line in run_logs(instance, result))
    # Every event arrived once: the batches in flight were not sent again.
    assert set(sandbox.split.received()) == outbox_identities(warehouse, sandbox)
    assert sandbox.split.duplicates() == 0
    assert outbox_counts(warehouse) == {"sent": meta["events_mapped"] - in_flight, "in_doubt": in_flight}

    evaluation = check_in_doubt(instance)
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.metadata["in_doubt"].value == in_flight

    resent = materialize(instance, [split_events], day, run_config={"ops": {"split_events": {"config": {
        "resend_in_doubt": True}}}})
    meta = split_metadata(resent)
    assert meta["events_resent_in_doubt"] == meta["events_sent"] == in_flight
    # Sent before and not again: the acknowledged ones; the in-doubt ones are resent, not among them.
    assert meta["events_already_sent_before"] == meta["events_mapped"] - in_flight
    assert meta["events_resent"] == 0
    assert any("resend_in_doubt requested" in line and "twice" in line for line in run_logs(instance, resent))
    assert sandbox.split.duplicates() == in_flight  # what Split already had now counts twice, as warned
    assert outbox_counts(warehouse) == {"sent": meta["events_mapped"]}
    assert check_in_doubt(instance).passed


def test_a_batch_split_accepted_but_answered_after_the_timeout_is_in_doubt_not_retried(
        sandbox, env, warehouse, instance, day, monkeypatch):
    monkeypatch.setenv("SPLIT_BATCH_SIZE", "100")
    monkeypatch.setenv("SPLIT_PUSH_CONCURRENCY", "1")
    monkeypatch.setenv("SPLIT_REQUEST_TIMEOUT_SECONDS", "1")
    # Requests from the third on are received and kept, and answered only after the client gave up.
    sandbox.split.hold_from_request = 3
    try:
        result = materialize(instance, [split_events], day)
    finally:
        sandbox.split.hold_from_request = None
        sandbox.split.release()
    meta = split_metadata(result)
    assert (meta["events_sent"], meta["in_doubt"], meta["requests"]) == (200, 100, 3)
    assert sandbox.split.accepted == 300 and sandbox.split.duplicates() == 0
    assert meta["events_pending_after"] == meta["events_mapped"] - 300  # sending stopped; the rest wait
    assert any("in doubt" in line for line in run_logs(instance, result))
    with warehouse.read() as con:
        [(error,)] = con.execute(f"SELECT DISTINCT error FROM {EVENTS_OUTBOX} WHERE status = 'in_doubt'").fetchall()
    assert "ReadTimeout" in error

    again = split_metadata(materialize(instance, [split_events], day))
    assert again["events_sent"] == meta["events_mapped"] - 300 and again["events_in_doubt_held"] == 100
    assert sandbox.split.duplicates() == 0


def test_a_batch_answered_too_late_then_resend_counts_acknowledged_and_in_doubt_events_apart_and_warns_for_each(
        sandbox, env, warehouse, instance, day, monkeypatch):
    monkeypatch.setenv("SPLIT_BATCH_SIZE", "100")
    monkeypatch.setenv("SPLIT_PUSH_CONCURRENCY", "1")
    monkeypatch.setenv("SPLIT_REQUEST_TIMEOUT_SECONDS", "1")
    sandbox.split.hold_from_request = 3  # the third batch arrives, its answer comes after the client gave up
    try:
        first = split_metadata(materialize(instance, [split_events], day))
    finally:
        sandbox.split.hold_from_request = None
        sandbox.split.release()
    assert (first["events_sent"], first["in_doubt"]) == (200, 100)
    assert outbox_counts(warehouse) == {"sent": 200, "in_doubt": 100, "pending": first["events_mapped"] - 300}
    received_before = len(sandbox.split.events)

    # A dry run shows the same figures, and sends nothing.
    dry = materialize(instance, [split_events], day, run_config={"ops": {"split_events": {"config": {
        "resend": True, "dry_run": True}}}})
    (observation,) = [e.event_specific_data.asset_observation for e in dry.all_events
                      if e.event_type_value == "ASSET_OBSERVATION"]
    shown = {k: v.value for k, v in observation.metadata.items()}
    assert (shown["events_resent"], shown["events_resent_in_doubt"], shown["events_already_sent_before"]) == (200, 100, 0)
    assert shown["would_send_items"] == first["events_mapped"] and len(sandbox.split.events) == received_before

    result = materialize(instance, [split_events], day, run_config=RESEND)
    meta = split_metadata(result)
    sent_now = sandbox.split.events[received_before:]
    # 200 Split had acknowledged, 100 held in doubt (which had arrived), the rest never sent: all go now.
    assert (meta["events_resent"], meta["events_resent_in_doubt"]) == (200, 100)
    assert meta["events_already_sent_before"] == 0
    assert meta["events_sent"] == len(sent_now) == meta["events_mapped"]
    assert partition_metadata(result)[day]["events_sent"] == meta["events_sent"]
    assert meta["in_doubt"] == meta["recovered_in_doubt"] == meta["events_in_doubt_held"] == 0
    assert sandbox.split.duplicates() == 200 + 100
    assert outbox_counts(warehouse) == {"sent": meta["events_mapped"]}
    logs = run_logs(instance, result)
    assert any("resend requested: 200 events Split already acknowledged are sent again" in line for line in logs)
    assert any("resend requested: 100 events whose delivery is unknown" in line
               and "counts twice any that had arrived" in line for line in logs)


@pytest.mark.slow
def test_each_days_events_sent_is_what_this_run_sent_not_what_a_killed_push_sent_before(
        sandbox, env, warehouse, instance):
    days = [d.isoformat() for d in sandbox.dataset.days]
    materialize(instance, [mixpanel_events], days[0], days[-1])
    batch, concurrency = 100, 2
    sandbox.split.hold_from_request = 3  # two batches of the first day answered, the next two held: then killed
    child = push_child(days[0], batch, concurrency)
    try:
        def held() -> bool:
            assert child.poll() is None, "the push ended before it could be killed"
            return sandbox.split.bulk_requests >= 2 + concurrency
        poll(held, 120, "the killed push's requests to be held")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        reap(child)
        sandbox.split.hold_from_request = None
        sandbox.split.release()
    received_before = len(sandbox.split.events)
    assert received_before == 2 * batch + concurrency * batch

    result = materialize(instance, [split_events], days[0], days[-1])
    per_day = partition_metadata(result)
    run = {k.removeprefix("run/"): v for k, v in per_day[days[0]].items() if k.startswith("run/")}
    # What this run sent, day by day, as Split received it, and as sync.split_events records it.
    sent_now = sandbox.split.events[received_before:]
    with warehouse.read() as con:
        rows = con.execute(f"SELECT scope, status, payload FROM {EVENTS_OUTBOX}").fetchall()
    row_of = {sandbox.split.identity(orjson.loads(payload)): (scope, status) for scope, status, payload in rows}
    received_by_day = Counter(row_of[sandbox.split.identity(e)][0] for e in sent_now)
    assert all(row_of[sandbox.split.identity(e)][1] == "sent" for e in sent_now)
    sent_by_day = Counter(scope for scope, status, _ in rows if status == "sent")
    assert sandbox.split.duplicates() == 0
    assert run["events_sent"] == len(sent_now)
    for day in days:
        assert per_day[day]["events_sent"] == received_by_day[day], day
        # Split holds the day's events sent by the killed push and by this run.
        assert per_day[day]["events_sent_total"] == sent_by_day[day] == received_by_day[day] + (
            2 * batch if day == days[0] else 0), day
    assert sum(per_day[day]["events_sent"] for day in days) == run["events_sent"]
    assert (run["recovered_sent"], run["recovered_in_doubt"]) == (2 * batch, concurrency * batch)
