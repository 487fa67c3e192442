"""mixpanel_profile_flags against the sandbox: values as Flagsmith typed them, diff-only, deletions, refusals, crashes."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import orjson
import pytest
from waiting import journaled, run_and_sigkill

from mixsync.flagsmith.assets import flagsmith_cohort_traits
from mixsync.flagsmith.profile_flags_assets import mixpanel_profile_flags
from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.flagsmith.settings import ProfileFlagsSettings
from mixsync.mixpanel.cohort_assets import mixpanel_cohort_members, mixpanel_cohorts
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.privacy import pseudonym
from mixsync.resources import WarehouseResource
from mixsync.sandbox.mixpanel_query import profile_properties
from mixsync.settings import SettingsError

RESOURCES = {"warehouse": WarehouseResource(), "flagsmith": FlagsmithResource()}
IDENTITIES = [f"user-{i:03d}" for i in range(30)] + ["vip-1"]


def run(instance, raise_on_error=True, run_config=None):
    return dg.materialize([mixpanel_profile_flags], instance=instance, resources=RESOURCES,
                          raise_on_error=raise_on_error, run_config=run_config)


def sync_cohort_traits(instance, run_config=None):
    """The real chain before this flow: cohorts and their members from Mixpanel, traits pushed to Flagsmith."""
    result = dg.materialize([mixpanel_cohorts, mixpanel_cohort_members, flagsmith_cohort_traits], instance=instance,
                            resources={**RESOURCES, "mixpanel": MixpanelResource()}, run_config=run_config)
    assert result.success
    return result


def meta(result):
    return {k: v.value for k, v in result.asset_materializations_for_node("mixpanel_profile_flags")[0].metadata.items()}


def warehouse_state(warehouse) -> dict[str, list]:
    """Every row of every flagsmith and sync table, to prove a dry run changed nothing."""
    with warehouse.read() as con:
        tables = [f"{s}.{t}" for s, t in con.execute("""SELECT table_schema, table_name FROM information_schema.tables
                 WHERE table_schema IN ('flagsmith', 'sync') AND table_type = 'BASE TABLE' ORDER BY ALL""").fetchall()]
        return {t: sorted(map(str, con.execute(f"SELECT * FROM {t}").fetchall())) for t in tables}


@pytest.fixture
def managed(sandbox, env, warehouse):
    """Identities in the cohort-traits ledger and the cohort members they were named after (as
    mixpanel_cohort_members and flagsmith_cohort_traits leave them), and features in Flagsmith."""
    with warehouse.write() as con:
        con.executemany("""INSERT INTO sync.flagsmith_traits (identifier, trait_key, cohort_id, trait_value, sync_id,
                                                            confirmed_at)
                           VALUES (?, 'mp_cohort_power_users', 1, true, 1, now())""",
                        [[i] for i in IDENTITIES])
        con.executemany("""INSERT INTO mixpanel.cohort_members (cohort_id, distinct_id, entered_at, snapshot_id)
                           VALUES (1, ?, now(), 1)""", [[i] for i in IDENTITIES])
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
    run_and_sigkill(CHILD, lambda: profiles.held >= 1 and journaled(journal_dir)[1] >= 5, 120,
                    "the push reached the held requests", profiles.release)
    profiles.hold_after_requests = None
    landed = [i for i in IDENTITIES if profiles.profile(i)]
    assert 0 < len(landed) < len(IDENTITIES)

    result = meta(run(instance))
    assert result["recovered_updates"] == 5
    assert all(profiles.profile(i) for i in IDENTITIES)  # nothing lost
    assert profiles.profile("user-020") == EXPECTED
    assert meta(run(instance))["updates_enqueued"] == 0


CHILD_ONE_REQUEST = """
import dagster as dg
from mixsync.definitions import resources
from mixsync.flagsmith.profile_flags_assets import mixpanel_profile_flags
dg.materialize([mixpanel_profile_flags], resources=resources)
"""


def test_updates_applied_but_unanswered_at_a_kill_are_unset_when_the_flag_is_deleted(sandbox, managed, instance):
    profiles = sandbox.mixpanel.profiles
    run(instance)
    managed.add_feature("promo", enabled=True, value="spring")
    managed.add_feature("promo_banner", enabled=True, value="top")
    # The next /engage request (every profile's $set of both new flags, one request) is applied by Mixpanel and
    # never answered: the run is killed then.
    profiles.hold_after_requests, profiles.apply_held = profiles.received_requests, True
    run_and_sigkill(CHILD_ONE_REQUEST, lambda: profiles.held >= 1, 120, "the $set request held", profiles.release)
    profiles.hold_after_requests, profiles.apply_held = None, False
    assert all(profiles.profile(i)["flagsmith_promo"] == "spring" for i in IDENTITIES)

    managed.delete_feature("promo")  # no longer wanted; promo_banner still is
    sandbox.mixpanel.recorder.clear()
    result = meta(run(instance))
    assert all(profiles.profile(i) == {**EXPECTED, "flagsmith_promo_banner": "top"}
               for i in IDENTITIES if i != "vip-1")
    assert "flagsmith_promo" not in profiles.profile("vip-1")
    assert result["properties_unset"] == len(IDENTITIES) and result["properties_set"] == len(IDENTITIES)
    assert result["in_flight_at_crash"] == len(IDENTITIES)
    assert result["resent_in_flight_at_crash"] == len(IDENTITIES)  # promo_banner, sent again
    assert result["corrected_in_flight_at_crash"] == len(IDENTITIES)  # promo, $unset
    assert result["updates_sent"] == 2 * len(IDENTITIES)  # a $set and an $unset per profile
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


def test_a_dry_run_shows_the_updates_and_sends_and_keeps_nothing(sandbox, managed, instance, warehouse):
    from mixsync.outbox_health import PENDING_AGE_CHECK, REJECTS_CHECK

    run(instance)
    managed.add_feature("max_items", enabled=True, value=3)  # a change for everyone but vip-1 (overridden)
    sandbox.mixpanel.recorder.clear()
    before = warehouse_state(warehouse)
    dry = dg.materialize([mixpanel_profile_flags], instance=instance, resources=RESOURCES,
                         run_config={"ops": {"mixpanel_profile_flags": {"config": {"dry_run": True}}}})
    assert dry.success and dry.asset_materializations_for_node("mixpanel_profile_flags") == []
    (observation,) = [e.event_specific_data.asset_observation for e in dry.all_events
                      if e.event_type_value == "ASSET_OBSERVATION"]
    shown = {k: v.value for k, v in observation.metadata.items()}
    assert shown["dry_run"] is True and shown["would_send_items"] == len(IDENTITIES) - 1
    assert shown["properties_set"] == len(IDENTITIES) - 1 and shown["properties_unset"] == 0
    assert '"flagsmith_max_items":3' in shown["would_send_preview"] and sandbox.mixpanel.token not in str(shown)
    assert sandbox.mixpanel.recorder.matching("/engage") == []  # nothing sent
    assert warehouse_state(warehouse) == before  # no ledger, outbox or landed flags changed
    assert {c.check_name for c in dry.get_asset_check_evaluations()} == {PENDING_AGE_CHECK, REJECTS_CHECK}

    real = run(instance)
    assert meta(real)["updates_sent"] == shown["would_send_items"]
    progress = [e.user_message for e in instance.all_logs(real.run_id) if e.user_message.startswith("push of sync-")]
    assert progress[-1] == (f"push of sync-2 to Mixpanel profiles: {len(IDENTITIES) - 1} of {len(IDENTITIES) - 1} "
                            "updates done, 0 remaining (1 batches sent, about 0 to go)")
    assert len([u for body in engage_bodies(sandbox) for u in body]) == shown["would_send_items"]
    assert {c.check_name: c.passed for c in real.get_asset_check_evaluations()} == {
        PENDING_AGE_CHECK: True, REJECTS_CHECK: True}


def test_the_outbox_checks_warn_on_old_pending_updates_and_too_many_refusals(sandbox, managed, instance, warehouse):
    from mixsync.flagsmith.profile_flags_sql import OUTBOX
    from mixsync.outbox_health import PENDING_AGE_CHECK, REJECTS_CHECK

    sandbox.mixpanel.profiles.refuse["user-003"] = "profile update refused for this distinct_id"
    result = run(instance)
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks[REJECTS_CHECK].passed is False  # 1 of 31 refused: over the 1 % default
    assert checks[REJECTS_CHECK].severity == dg.AssetCheckSeverity.WARN and checks[PENDING_AGE_CHECK].passed
    with warehouse.write() as con:  # an update left pending two days ago (a push that never got to it)
        con.execute(f"""INSERT INTO {OUTBOX} (id, scope, payload, status, enqueued_at)
                        VALUES ('stale', 'sync-0', '{{}}', 'pending', now() - INTERVAL 2 DAY)""")
    dry = dg.materialize([mixpanel_profile_flags], instance=instance, resources=RESOURCES,
                         run_config={"ops": {"mixpanel_profile_flags": {"config": {"dry_run": True}}}})
    checks = {c.check_name: c for c in dry.get_asset_check_evaluations()}
    assert checks[PENDING_AGE_CHECK].passed is False
    assert checks[PENDING_AGE_CHECK].metadata["pending_older_than_limit"].value == 1


def only_cohort(query, name: str, members: list[str]) -> None:
    """The sandbox's cohorts replaced by one small cohort of exactly `members`."""
    query.cohorts.clear()
    query.add_cohort(name, len(members), members, churn=0.0, cohort_id=2001)
    assert sorted(query.cohorts[2001].members) == sorted(members)


def test_identities_named_by_email_write_the_members_own_profiles_each(sandbox, env, instance, monkeypatch,
                                                                       warehouse):
    monkeypatch.setenv("FLAGSMITH_IDENTIFIER_PROPERTY", "$email")
    shared = ["$device:zz1", "device-zz1"]  # two profiles, one e-mail address: device-zz1@example.com
    alone = ["u-zz2", "u-zz3"]
    only_cohort(sandbox.mixpanel.query, "Inbox", shared + alone)
    assert {profile_properties(d)["$email"] for d in shared} == {"device-zz1@example.com"}
    sync_cohort_traits(instance)
    assert set(sandbox.flagsmith.all_traits()) == {"device-zz1@example.com", "u-zz2@example.com", "u-zz3@example.com"}
    with warehouse.write() as con:  # an identity no member has (any more): nothing to write it to
        con.execute("""INSERT INTO sync.flagsmith_traits (identifier, trait_key, cohort_id, trait_value, sync_id,
                                                         confirmed_at)
                       VALUES ('gone@example.com', 'mp_cohort_inbox', 2001, false, 1, now())""")
    sandbox.flagsmith.add_feature("checkout_v2", enabled=True, value="on")
    sandbox.flagsmith.override("u-zz2@example.com", "checkout_v2", True, "forced")

    result = meta(run(instance))
    profiles = sandbox.mixpanel.profiles.all_profiles()
    assert set(profiles) == set(shared + alone)  # no profile keyed by an e-mail address
    assert profiles["$device:zz1"] == profiles["device-zz1"] == {"flagsmith_checkout_v2": "on"}
    assert profiles["u-zz2"] == {"flagsmith_checkout_v2": "forced"} and profiles["u-zz3"] == {"flagsmith_checkout_v2": "on"}
    assert result["identities"] == 4 and result["identities_read"] == 3 and result["updates_sent"] == 4
    assert result["skipped_by_reason"] == {"no cohort member in the warehouse has this identity as its $email": 1}
    with warehouse.read() as con:
        ledger = {r[0] for r in con.execute("SELECT DISTINCT distinct_id FROM sync.mixpanel_profile_flags").fetchall()}
    assert ledger == set(shared + alone)


def test_identities_trimmed_for_flagsmith_write_the_untrimmed_distinct_ids(sandbox, env, instance):
    members = ["pad-1 ", "\tpad-1", "pad-2\u00a0"]  # Flagsmith keeps them as pad-1 (both) and pad-2
    only_cohort(sandbox.mixpanel.query, "Padded", members)
    sync_cohort_traits(instance)
    assert set(sandbox.flagsmith.all_traits()) == {"pad-1", "pad-2"}
    sandbox.flagsmith.add_feature("checkout_v2", enabled=True, value=None)
    result = meta(run(instance))
    profiles = sandbox.mixpanel.profiles.all_profiles()
    assert profiles == {m: {"flagsmith_checkout_v2": True} for m in members}  # not pad-1 or pad-2, other people
    assert result["identities_read"] == 2 and result["updates_sent"] == 3 and result["skipped_by_reason"] == {}


def test_identifier_property_given_as_run_config_reaches_the_members_load_and_wins_over_the_environment(
        sandbox, env, instance, monkeypatch, warehouse):
    monkeypatch.setenv("FLAGSMITH_IDENTIFIER_PROPERTY", "plan")  # the environment says otherwise: run config wins
    members = ["u-zz2", "u-zz3"]
    only_cohort(sandbox.mixpanel.query, "Inbox", members)
    config = {"resources": {"flagsmith": {"config": {"identifier_property": "$email"}}}}
    sync_cohort_traits(instance, run_config=config)
    with warehouse.read() as con:
        assert con.execute("SELECT properties FROM mixpanel.cohort_member_loads").fetchall() == [(["$email"],)]
    assert set(sandbox.flagsmith.all_traits()) == {"u-zz2@example.com", "u-zz3@example.com"}
    sandbox.flagsmith.add_feature("checkout_v2", enabled=True, value="on")
    result = meta(run(instance, run_config=config))
    assert sandbox.mixpanel.profiles.all_profiles() == {m: {"flagsmith_checkout_v2": "on"} for m in members}
    assert result["identities_read"] == 2 and result["skipped_by_reason"] == {}


def test_a_refusal_names_the_profile_only_by_its_pseudonym_in_metadata_the_log_and_the_check(sandbox, managed,
                                                                                              instance, warehouse):
    from mixsync.outbox_health import REJECTS_CHECK

    sandbox.mixpanel.profiles.refuse["vip-1"] = "profile update refused"  # Mixpanel's reason quotes the $distinct_id
    result = run(instance)
    shown = meta(result)
    assert shown["updates_rejected"] == 1
    (reason,) = shown["rejects_by_reason"]
    assert reason == f"update 0 ($distinct_id '{pseudonym('vip-1')}'): profile update refused"
    log = [e.user_message for e in instance.all_logs(result.run_id) if "Mixpanel refused" in e.user_message]
    assert len(log) == 1 and pseudonym("vip-1") in log[0]
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == REJECTS_CHECK]
    everything = " ".join([str(shown), *(e.user_message for e in instance.all_logs(result.run_id)),
                           str({k: v.value for k, v in check.metadata.items()})])
    assert "vip-1" not in everything and pseudonym("vip-1") in str(check.metadata["top_reasons"].value)
    with warehouse.read() as con:  # the warehouse still says which profile it was
        assert con.execute("""SELECT DISTINCT i.distinct_id FROM sync.mixpanel_profile_flags_outbox o
                              JOIN sync.mixpanel_profile_flags_outbox_items i ON i.outbox_id = o.id
                              WHERE o.status = 'rejected'""").fetchall() == [("vip-1",)]


@pytest.mark.both_backends
def test_a_dry_run_on_a_warehouse_no_run_has_written_shows_nothing_to_send(sandbox, env, instance):
    dry = dg.materialize([mixpanel_profile_flags], instance=instance, resources=RESOURCES,
                         run_config={"ops": {"mixpanel_profile_flags": {"config": {"dry_run": True}}}})
    assert dry.success
    (observation,) = [e.event_specific_data.asset_observation for e in dry.all_events
                      if e.event_type_value == "ASSET_OBSERVATION"]
    shown = {k: v.value for k, v in observation.metadata.items()}
    assert shown["dry_run"] is True and shown["identities"] == 0 and shown["would_send_items"] == 0
