"""Impressions -> Mixpanel `$experiment_started` exposures: the mapping, the emulated /import, the outbox push."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import dagster as dg
import duckdb
import loopback
import orjson
import pytest

from mixsync.definitions import resources as RESOURCES
from mixsync.http import RetryPolicy, ServiceError
from mixsync.impressions.assets import mixpanel_experiment_exposures, split_impressions
from mixsync.impressions.exposures import INSERT_ID_PATTERN, exposure_payload_sql
from mixsync.impressions.landing import write_atomically
from mixsync.impressions.settings import ImpressionsSettings
from mixsync.impressions.sql import EXPOSURES_OUTBOX
from mixsync.mixpanel.client import MixpanelClient
from mixsync.mixpanel.import_client import import_events
from mixsync.sandbox.impressions import ImpressionGenerator, encode
from mixsync.settings import MixpanelSettings
from mixsync.warehouse import ensure_schema

IMPRESSION = {"key": "user-1", "bucketingKey": None, "split": "new_checkout_flow", "treatment": "on",
              "label": "default rule", "time": 1_760_000_000_123, "splitVersionNumber": 1_750_000_000_000,
              "environmentId": "env-1", "environmentName": "Production", "sdk": "java", "sdkVersion": "4.13.0",
              "machineName": "ip-1", "machineIp": "10.0.0.1", "properties": None}


def land(instance, impressions, name="impressions-1.json.gz"):
    settings = ImpressionsSettings.from_env()
    body, _ = encode(impressions)
    write_atomically(settings.impressions_dir, name, body)
    config = {"ops": {"split_impressions": {"config": {"files": [name]}}}}
    assert dg.materialize([split_impressions], run_config=config, instance=instance, resources=RESOURCES).success


def push(instance, raise_on_error=True):
    result = dg.materialize([mixpanel_experiment_exposures], instance=instance, resources=RESOURCES,
                            raise_on_error=raise_on_error)
    if not result.success:
        return result, {}
    meta = result.asset_materializations_for_node("mixpanel_experiment_exposures")[0].metadata
    return result, {k: v.value for k, v in meta.items()}


def import_requests(sandbox):
    return sandbox.mixpanel.recorder.matching("/import")


def mapped(impressions, event="$experiment_started", names=None):
    """Run the mapping SQL over impressions loaded into an in-memory DuckDB."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    ensure_schema(con)
    for i in impressions:
        con.execute("""INSERT INTO split.impressions VALUES (?, ?, ?, ?, ?, ?, ?, ?, make_timestamptz(? * 1000), ?,
                       ?, ?, ?, ?, ?, 'f', 'run', now())""",
                    [i["id"], i["environmentId"], i["environmentName"], i["split"], i["key"], i["bucketingKey"],
                     i["treatment"], i["label"], i["time"], i["splitVersionNumber"], i["sdk"], i["sdkVersion"],
                     i["machineName"], i["machineIp"], i["properties"]])
    settings = ImpressionsSettings.from_env(names or {})
    return [(id_, orjson.loads(payload)) for id_, payload in con.execute(
        exposure_payload_sql(event, settings.property_names)).fetchall()]


def test_an_impression_maps_to_an_experiment_started_event():
    [(id_, event)] = mapped([{**IMPRESSION, "id": "0123456789abcdef0123456789abcdef"}])
    assert event == {"event": "$experiment_started", "properties": {
        "time": 1_760_000_000_123, "distinct_id": "user-1", "$insert_id": id_,
        "Experiment name": "new_checkout_flow", "Variant name": "on", "Split label": "default rule",
        "Split version": 1_750_000_000_000, "Split environment": "Production", "Split environment id": "env-1",
        "Split SDK": "java", "Split SDK version": "4.13.0", "$source": "Split"}}
    assert INSERT_ID_PATTERN.match(id_)


def test_event_and_property_names_are_configurable():
    names = {"MIXSYNC_EXPOSURE_PROPERTY_NAMES": '{"label": "Targeting rule", "experiment": "Flag"}'}
    [(_, event)] = mapped([{**IMPRESSION, "id": "x"}], event="Flag Seen", names=names)
    assert event["event"] == "Flag Seen"
    assert event["properties"]["Flag"] == "new_checkout_flow" and event["properties"]["Targeting rule"] == "default rule"
    with pytest.raises(Exception, match="unknown role"):
        ImpressionsSettings.from_env({"MIXSYNC_EXPOSURE_PROPERTY_NAMES": '{"colour": "x"}'})


@pytest.fixture
def client(env):
    with MixpanelClient(MixpanelSettings.from_env(), RetryPolicy.from_env()) as mixpanel:
        yield mixpanel


def event(n, **props):
    return orjson.dumps({"event": "$experiment_started", "properties": {
        "time": 1_760_000_000_000 + n, "distinct_id": f"u{n}", "$insert_id": f"id-{n}", **props}})


def test_import_emulation_checks_auth_limits_and_dedupes(sandbox, env, client):
    url = f"{sandbox.url('mixpanel')}/import"
    body = b"[" + event(1) + b"]"
    assert loopback.post(url, params={"strict": "1", "project_id": sandbox.mixpanel.project_id}, content=body,
                      auth=("sandbox-service-account", "wrong")).status_code == 401
    assert loopback.post(url, params={"strict": "1"}, content=body, auth=(sandbox.mixpanel.token, "")).status_code == 200
    assert loopback.post(url, params={"strict": "1"}, content=body,
                      auth=(sandbox.mixpanel.username, sandbox.mixpanel.secret)).status_code == 400  # no project_id
    assert import_events(client, [event(1), event(2)]).failed == {}
    held = sandbox.mixpanel.ingest.summary()
    assert (held["held"], held["duplicates"]) == (2, 1)
    with pytest.raises(ServiceError, match="2000"):
        import_events(client, [event(n) for n in range(2001)])
    with pytest.raises(ServiceError, match="413"):
        import_events(client, [event(n, padding="x" * 2000) for n in range(1500)])
    assert sandbox.mixpanel.ingest.summary()["held"] == 2


def test_strict_partial_failure_names_only_the_refused_events(sandbox, env, client):
    batch = [event(0), event(1, time=1000), event(2), event(3, **{"$insert_id": "not valid!"}), event(4)]
    result = import_events(client, batch)
    assert sorted(result.failed) == [1, 3]
    assert "1971" in result.failed[1] and "$insert_id" in result.failed[3]
    assert result.imported == 3
    assert {e["properties"]["distinct_id"] for e in sandbox.mixpanel.ingest.held()} == {"u0", "u2", "u4"}


def test_429_is_retried(sandbox, env, client):
    sandbox.mixpanel.faults.add("import", status=429, body='{"error": "Project exceeded rate limits"}', times=2)
    assert import_events(client, [event(7)]).imported == 1
    assert [r.status for r in import_requests(sandbox)] == [429, 429, 200]
    assert client.stats.retries == 2


@pytest.mark.both_backends
def test_exposures_reach_mixpanel_once(sandbox, impressions_env, warehouse, instance, monkeypatch):
    monkeypatch.setenv("MIXSYNC_EXPOSURES_BATCH_SIZE", "100")
    land(instance, ImpressionGenerator(seed=1).batch(250))
    _, meta = push(instance)
    assert (meta["rows_inserted"], meta["sent"], meta["batches"]) == (250, 250, 3)
    requests = import_requests(sandbox)
    assert all(r.params["strict"] == "1" and r.headers["content-encoding"] == "gzip" for r in requests)
    assert all(len(orjson.loads(gzip.decompress(r.body))) <= 100 for r in requests)
    held = sandbox.mixpanel.ingest.held("$experiment_started")
    assert len(held) == 250
    with warehouse.read() as con:
        ids = {i for (i,) in con.execute("SELECT impression_id FROM split.impressions").fetchall()}
    assert {e["properties"]["$insert_id"] for e in held} == ids
    # Nothing new: the next run sends nothing.
    _, meta = push(instance)
    assert (meta["rows_inserted"], meta["sent"]) == (0, 0)
    assert len(import_requests(sandbox)) == len(requests)
    # New impressions: only they go out.
    land(instance, ImpressionGenerator(seed=2).batch(30), name="impressions-2.json.gz")
    _, meta = push(instance)
    assert (meta["rows_inserted"], meta["sent"]) == (30, 30)
    assert sandbox.mixpanel.ingest.summary()["held"] == 280


def test_strict_mode_refusals_are_recorded_and_never_resent(sandbox, impressions_env, warehouse, instance):
    good = ImpressionGenerator(seed=3).batch(40)
    ancient = [{**IMPRESSION, "key": f"old-{n}", "time": 5_000 + n} for n in range(3)]  # 1970: Mixpanel refuses
    land(instance, good + ancient)
    _, meta = push(instance)
    assert (meta["sent"], meta["rejected"]) == (40, 3)
    assert list(meta["rejects_by_reason"].values()) == [3]
    assert "1971" in next(iter(meta["rejects_by_reason"]))
    with warehouse.read() as con:
        rejected = con.execute(f"SELECT count(*) FROM {EXPOSURES_OUTBOX} WHERE status = 'rejected' "
                               "AND error LIKE '%1971%'").fetchone()[0]
    assert rejected == 3
    assert len(sandbox.mixpanel.ingest.held()) == 40
    sent_requests = len(import_requests(sandbox))
    _, meta = push(instance)
    assert meta["considered"] == 0 and len(import_requests(sandbox)) == sent_requests


def test_missing_mixpanel_settings_fail_naming_the_variable(sandbox, impressions_env, warehouse, instance, monkeypatch):
    land(instance, ImpressionGenerator(seed=4).batch(5))
    monkeypatch.delenv("MIXPANEL_PROJECT_ID")
    result, _ = push(instance, raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error.message
    assert "MIXPANEL_PROJECT_ID" in failure


def test_bad_credentials_fail_fast_without_printing_the_secret(sandbox, impressions_env, warehouse, instance,
                                                               monkeypatch):
    land(instance, ImpressionGenerator(seed=5).batch(5))
    monkeypatch.setenv("MIXPANEL_SERVICE_ACCOUNT_SECRET", "definitely-wrong-secret")
    result, _ = push(instance, raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error.message
    assert "401" in failure and "MIXPANEL_SERVICE_ACCOUNT_SECRET" in failure
    assert "definitely-wrong-secret" not in failure
    assert len(import_requests(sandbox)) == 1  # a 401 is not retried
    with warehouse.read() as con:
        assert con.execute(f"SELECT count(*) FROM {EXPOSURES_OUTBOX} WHERE status = 'pending'").fetchone()[0] == 5


CRASH_DURING_PUSH = """
import os, dagster as dg
from mixsync.definitions import resources
from mixsync.impressions import assets
real_import = assets.import_events
calls = []
def import_then_die(client, payloads):
    result = real_import(client, payloads)
    calls.append(1)
    if len(calls) == 3:
        os._exit(17)  # Mixpanel has the third batch; we die before recording that it went through
    return result
assets.import_events = import_then_die
dg.materialize([assets.mixpanel_experiment_exposures], instance=dg.DagsterInstance.ephemeral(), resources=resources)
"""


def test_a_crash_then_a_rerun_leaves_mixpanel_with_each_exposure_once(sandbox, impressions_env, warehouse, instance,
                                                                      monkeypatch):
    monkeypatch.setenv("MIXSYNC_EXPOSURES_BATCH_SIZE", "50")
    monkeypatch.setenv("MIXSYNC_EXPOSURES_CONCURRENCY", "1")
    land(instance, ImpressionGenerator(seed=6).batch(400))
    crashed = subprocess.run([sys.executable, "-c", CRASH_DURING_PUSH], env=os.environ.copy(),
                             capture_output=True, timeout=120)
    assert crashed.returncode == 17, crashed.stderr.decode()[-2000:]
    assert len(sandbox.mixpanel.ingest.held()) == 150
    _, meta = push(instance)
    assert meta["recovered_sent"] == 100          # the two batches journaled before the crash
    assert meta["in_flight_at_crash"] == 50       # the third: sent again, deduplicated by its $insert_id
    assert meta["sent"] == 300
    summary = sandbox.mixpanel.ingest.summary()
    assert (summary["held"], summary["duplicates"]) == (400, 50)
    with warehouse.read() as con:
        assert con.execute(f"SELECT count(*) FROM {EXPOSURES_OUTBOX} WHERE status = 'sent'").fetchone()[0] == 400


def test_the_push_logs_batches_sent_and_remaining_with_the_time_left(sandbox, impressions_env, warehouse, instance,
                                                                    monkeypatch):
    monkeypatch.setenv("MIXSYNC_PROGRESS_SECONDS", "0")  # a line per batch, so the test sees them all
    monkeypatch.setenv("MIXSYNC_EXPOSURES_BATCH_SIZE", "100")
    monkeypatch.setenv("MIXSYNC_EXPOSURES_CONCURRENCY", "1")
    land(instance, ImpressionGenerator(seed=3).batch(250))
    result, meta = push(instance)
    assert meta["sent"] == 250
    lines = [e.user_message for e in instance.all_logs(result.run_id)
             if e.user_message.startswith("push of exposures to Mixpanel: ")]
    assert lines[0].startswith("push of exposures to Mixpanel: 100 of 250 exposures done, 150 remaining "
                               "(1 batches sent, about 2 to go), about ")
    assert lines[0].endswith(" left")
    assert lines[-1] == "push of exposures to Mixpanel: 250 of 250 exposures done, 0 remaining (3 batches sent, about 0 to go)"
    assert len(lines) == 3
