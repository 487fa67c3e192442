"""mixpanel_profile_flags against the sandbox: values as Flagsmith typed them, diff-only, deletions, refusals, crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import orjson
import pytest

from mixsync.flagsmith.profile_flags_assets import mixpanel_profile_flags
from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.flagsmith.settings import ProfileFlagsSettings
from mixsync.resources import WarehouseResource
from mixsync.settings import SettingsError

RESOURCES = {"warehouse": WarehouseResource(), "flagsmith": FlagsmithResource()}
IDENTITIES = [f"user-{i:03d}" for i in range(30)] + ["vip-1"]


def run(instance, raise_on_error=True):
    return dg.materialize([mixpanel_profile_flags], instance=instance, resources=RESOURCES,
                          raise_on_error=raise_on_error)


def meta(result):
    return {k: v.value for k, v in result.asset_materializations_for_node("mixpanel_profile_flags")[0].metadata.items()}


@pytest.fixture
def managed(sandbox, env, warehouse):
    """Identities in the cohort-traits ledger (as flagsmith_cohort_traits leaves them) and features in Flagsmith."""
    with warehouse.write() as con:
        con.executemany("INSERT INTO sync.flagsmith_traits VALUES (?, 'mp_cohort_power_users', 1, true, 1, now())",
                        [[i] for i in IDENTITIES])
    fs = sandbox.flagsmith
    fs.add_feature("checkout_v2", enabled=True, value=None)
    fs.add_feature("max_items", enabled=True, value=0)
    fs.add_feature("banner_text", enabled=True, value="")
    fs.add_feature("kill_switch", enabled=True, value=False)
    fs.add_feature("ratio", enabled=True, value=0.25)
    fs.add_feature("dark_mode", enabled=False, value="on")
    fs.override("vip-1", "dark_mode", True, "forced")
    fs.override("vip-1", "max_items", True, 50)
    return fs


EXPECTED = {"flagsmith_checkout_v2": True, "flagsmith_max_items": 0, "flagsmith_banner_text": "",
            "flagsmith_kill_switch": False, "flagsmith_ratio": 0.25, "flagsmith_dark_mode": False}


def engage_bodies(sandbox) -> list[list[dict]]:
    return [orjson.loads(r.body) for r in sandbox.mixpanel.recorder.matching("/engage")]


def test_first_run_sets_every_flag_with_its_exact_value_then_only_changes(sandbox, managed, instance, warehouse):
    first = meta(run(instance))
    profiles = sandbox.mixpanel.profiles
    assert profiles.profile("user-007") == EXPECTED  # 0, "" and false stay themselves; no geolocation (ip=0)
    assert profiles.profile("vip-1") == {**EXPECTED, "flagsmith_dark_mode": "forced", "flagsmith_max_items": 50}
    assert first["identities_read"] == len(IDENTITIES) and first["updates_sent"] == len(IDENTITIES)
    requests = sandbox.mixpanel.recorder.matching("/engage")
    assert all(r.params == {"verbose": "1", "ip": "0"} for r in requests)
    assert all(u["$token"] == sandbox.mixpanel.token for body in engage_bodies(sandbox) for u in body)
    with warehouse.read() as con:
        rows = con.execute("""SELECT feature, enabled, value::VARCHAR FROM flagsmith.identity_flags
                              WHERE identity = 'vip-1' ORDER BY feature""").fetchall()
    assert rows == [("banner_text", True, '""'), ("checkout_v2", True, None), ("dark_mode", True, '"forced"'),
                    ("kill_switch", True, "false"), ("max_items", True, "50"), ("ratio", True, "0.25")]

    sandbox.mixpanel.recorder.clear()
    assert meta(run(instance))["updates_enqueued"] == 0
    assert engage_bodies(sandbox) == []  # nothing changed, nothing sent

    managed.add_feature("max_items", enabled=True, value=3)    # a new default: everyone but vip-1 (overridden)
    managed.override("user-001", "banner_text", False, "")     # disabled for one identity: "" becomes false
    third = meta(run(instance))
    updates = [u for body in engage_bodies(sandbox) for u in body]
    assert len(updates) == len(IDENTITIES) - 1 and third["properties_set"] == len(IDENTITIES)
    assert profiles.profile("user-001") == {**EXPECTED, "flagsmith_max_items": 3, "flagsmith_banner_text": False}
    assert profiles.profile("vip-1")["flagsmith_max_items"] == 50


def test_a_deleted_flag_is_unset_where_mixsync_set_it(sandbox, managed, instance):
    sandbox.mixpanel.profiles.profiles["user-002"] = {"plan": "pro"}  # a property mixsync never owned
    run(instance)
    managed.delete_feature("banner_text")
    sandbox.mixpanel.recorder.clear()
    result = meta(run(instance))
    assert result["properties_unset"] == len(IDENTITIES) and result["properties_set"] == 0
    updates = [u for body in engage_bodies(sandbox) for u in body]
    assert {tuple(u["$unset"]) for u in updates} == {("flagsmith_banner_text",)}
    assert "flagsmith_banner_text" not in sandbox.mixpanel.profiles.profile("user-002")
    assert sandbox.mixpanel.profiles.profile("user-002")["plan"] == "pro"
    assert meta(run(instance))["updates_enqueued"] == 0


def test_a_refused_profile_is_recorded_from_the_verbose_body_and_the_rest_land(sandbox, managed, instance,
                                                                              warehouse):
    sandbox.mixpanel.profiles.refuse["user-005"] = "profile update refused for this distinct_id"
    result = meta(run(instance))
    assert result["updates_rejected"] == 1 and result["updates_sent"] == len(IDENTITIES) - 1
    assert sandbox.mixpanel.profiles.profile("user-005") == {}
    assert sandbox.mixpanel.profiles.profile("user-006") == EXPECTED
    with warehouse.read() as con:
        refused = con.execute("""SELECT i.distinct_id, o.error FROM sync.mixpanel_profile_flags_outbox o
                                 JOIN sync.mixpanel_profile_flags_outbox_items i ON i.outbox_id = o.id
                                 WHERE o.status = 'rejected' GROUP BY ALL""").fetchall()
    assert len(refused) == 1 and refused[0][0] == "user-005" and "refused for this distinct_id" in refused[0][1]
    assert meta(run(instance))["rejected_earlier_not_resent"] == len(EXPECTED)  # not resent every hour


def test_a_failed_read_keeps_the_profile_as_it_was(sandbox, managed, instance, monkeypatch):
    run(instance)
    managed.delete_feature("ratio")
    # Every read of the next run fails for good (a 4xx is not retried): no identity may lose its properties.
    managed.faults.add("identities_read", status=404, body='{"detail": "Not found."}', times=len(IDENTITIES))
    result = meta(run(instance))
    assert result["read_errors"] == len(IDENTITIES) and result["updates_enqueued"] == 0
    assert sandbox.mixpanel.profiles.profile("user-003") == EXPECTED


CHILD = """
import dagster as dg
import mixsync.flagsmith.profile_flags_assets as flow
from mixsync.definitions import resources
flow.PROFILES_PER_REQUEST = 5  # small batches, so the kill lands between acknowledged ones
dg.materialize([flow.mixpanel_profile_flags], resources=resources)
"""


def test_a_run_killed_mid_push_resumes_and_nothing_is_lost(sandbox, managed, instance, monkeypatch, env):
    profiles = sandbox.mixpanel.profiles
    profiles.hold_after_requests = 1  # the first request goes through; the next ones hang in flight
    journal_dir = Path(env["MIXSYNC_LANDING_DIR"]) / "outbox" / "sync_mixpanel_profile_flags_outbox"
    child = subprocess.Popen([sys.executable, "-c", CHILD], env=os.environ.copy(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            acked = sum(p.read_text().count("\tsent\n") for p in journal_dir.glob("*.journal")) \
                if journal_dir.exists() else 0
            if profiles.held >= 1 and acked >= 5:
                break
            assert child.poll() is None, "the push finished before it could be killed"
            assert time.monotonic() < deadline, "the push never reached the held requests"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        profiles.release()
    profiles.hold_after_requests = None
    landed = [i for i in IDENTITIES if profiles.profile(i)]
    assert 0 < len(landed) < len(IDENTITIES)

    result = meta(run(instance))
    assert result["recovered_updates"] == 5
    assert all(profiles.profile(i) for i in IDENTITIES)  # nothing lost
    assert profiles.profile("user-020") == EXPECTED
    assert meta(run(instance))["updates_enqueued"] == 0


def test_missing_token_fails_naming_the_variable(sandbox, managed, instance, monkeypatch):
    monkeypatch.delenv("MIXPANEL_PROJECT_TOKEN")
    result = run(instance, raise_on_error=False)
    assert not result.success
    messages = " ".join(e.event_specific_data.error.message for e in result.all_events if e.is_step_failure)
    assert "MIXPANEL_PROJECT_TOKEN" in messages


@pytest.mark.parametrize("region, host", [("us", "https://api.mixpanel.com"), ("eu", "https://api-eu.mixpanel.com"),
                                          ("in", "https://api-in.mixpanel.com")])
def test_regional_ingestion_hosts_and_prefix(region, host):
    settings = ProfileFlagsSettings.from_env({"MIXPANEL_PROJECT_TOKEN": "t", "MIXPANEL_REGION": region,
                                              "FLAGSMITH_PROFILE_PROPERTY_PREFIX": "ff."})
    assert settings.ingestion_url == host and settings.property_prefix == "ff."
    assert ProfileFlagsSettings.from_env({"MIXPANEL_PROJECT_TOKEN": "t"}).property_prefix == "flagsmith_"
    with pytest.raises(SettingsError, match="MIXPANEL_REGION"):
        ProfileFlagsSettings.from_env({"MIXPANEL_PROJECT_TOKEN": "t", "MIXPANEL_REGION": "apac"})


def test_definitions_schedule_the_push_hourly_in_its_own_pool():
    from mixsync.definitions import defs

    schedule = defs.resolve_schedule_def("mixpanel_profile_flags_schedule")
    assert schedule.cron_schedule == "20 * * * *" and schedule.job_name == "mixpanel_profile_flags_job"
    job = defs.resolve_job_def("mixpanel_profile_flags_job")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {"mixpanel_profile_flags"}
    spec = defs.resolve_assets_def("mixpanel_profile_flags")
    assert spec.group_names_by_key[dg.AssetKey("mixpanel_profile_flags")] == "flagsmith"
    assert spec.op.pool == "mixpanel_profile_flags"
