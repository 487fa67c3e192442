"""Reverse-ETL manners: a push's dry run shows exactly what it would send and sends and keeps nothing; the outbox
checks warn about items pending too long and about too many refusals."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from mixsync.definitions import resources as RESOURCES
from mixsync.impressions.assets import mixpanel_experiment_exposures, split_impressions
from mixsync.impressions.landing import write_atomically
from mixsync.impressions.settings import ImpressionsSettings
from mixsync.impressions.sql import EXPOSURES_OUTBOX
from mixsync.mixpanel.assets import mixpanel_events
from mixsync.outbox_health import PENDING_AGE_CHECK, REJECTS_CHECK
from mixsync.sandbox.impressions import ImpressionGenerator, encode
from mixsync.split.assets import split_events


def snapshot(warehouse) -> dict:
    """Every table a push may change: outboxes, ledgers, rejects."""
    with warehouse.read() as con:
        tables = [f"{schema}.{name}" for schema, name in con.execute(
            """SELECT schema_name, table_name FROM duckdb_tables()
               WHERE schema_name IN ('split', 'sync', 'flagsmith')""").fetchall()]
        return {table: sorted(map(str, con.execute(f"SELECT * FROM {table}").fetchall())) for table in tables}


def observation(result, asset: str) -> dict:
    (event,) = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    observed = event.event_specific_data.asset_observation
    assert observed.asset_key == dg.AssetKey(asset)
    return {key: value.value for key, value in observed.metadata.items()}


def checks(result) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.event_specific_data.check_name: e.event_specific_data
            for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}


def test_a_split_dry_run_shows_what_would_go_and_sends_and_keeps_nothing(sandbox, env, warehouse, instance):
    day = sandbox.dataset.days[0].isoformat()
    assert dg.materialize([mixpanel_events], instance=instance, resources=RESOURCES, partition_key=day).success
    before = snapshot(warehouse)
    dry = dg.materialize([split_events], instance=instance, resources=RESOURCES, partition_key=day,
                         run_config={"ops": {"split_events": {"config": {"dry_run": True}}}})
    assert dry.success and dry.asset_materializations_for_node("split_events") == []  # no partition marked done
    shown = observation(dry, "split_events")
    (event,) = [e for e in dry.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    assert event.event_specific_data.asset_observation.partition == day  # on the day's partition in the UI
    assert sandbox.split.accepted == 0 and sandbox.split.bulk_requests == 0
    assert snapshot(warehouse) == before
    assert shown["dry_run"] is True and shown["would_send_items"] > 500
    assert shown["would_send_by_scope"] == {day: shown["would_send_items"]}
    assert '"eventTypeId"' in shown["would_send_preview"]

    real = dg.materialize([split_events], instance=instance, resources=RESOURCES, partition_key=day)
    sent = real.asset_materializations_for_node("split_events")[0].metadata["run/events_sent"].value
    assert sent == shown["would_send_items"] == sandbox.split.accepted  # exactly what the dry run said
    assert {name: c.passed for name, c in checks(real).items()} == {PENDING_AGE_CHECK: True, REJECTS_CHECK: True}


def test_an_exposures_dry_run_shows_what_would_go_and_sends_and_keeps_nothing(sandbox, impressions_env, warehouse,
                                                                              instance):
    settings = ImpressionsSettings.from_env()
    body, _ = encode(ImpressionGenerator(seed=5).batch(120))
    write_atomically(settings.impressions_dir, "impressions-1.json.gz", body)
    config = {"ops": {"split_impressions": {"config": {"files": ["impressions-1.json.gz"]}}}}
    assert dg.materialize([split_impressions], run_config=config, instance=instance, resources=RESOURCES).success
    before = snapshot(warehouse)
    dry = dg.materialize([mixpanel_experiment_exposures], instance=instance, resources=RESOURCES,
                         run_config={"ops": {"mixpanel_experiment_exposures": {"config": {"dry_run": True}}}})
    assert dry.success and dry.asset_materializations_for_node("mixpanel_experiment_exposures") == []
    shown = observation(dry, "mixpanel_experiment_exposures")
    assert sandbox.mixpanel.recorder.matching("/import") == []
    assert snapshot(warehouse) == before
    assert shown["would_send_items"] == 120 and '"$experiment_started"' in shown["would_send_preview"]
    real = dg.materialize([mixpanel_experiment_exposures], instance=instance, resources=RESOURCES)
    assert real.asset_materializations_for_node("mixpanel_experiment_exposures")[0].metadata["sent"].value == 120


def test_outbox_checks_warn_about_old_pending_items_and_refusals(sandbox, impressions_env, warehouse, instance,
                                                                 monkeypatch):
    settings = ImpressionsSettings.from_env()
    body, _ = encode(ImpressionGenerator(seed=6).batch(50))
    write_atomically(settings.impressions_dir, "impressions-1.json.gz", body)
    config = {"ops": {"split_impressions": {"config": {"files": ["impressions-1.json.gz"]}}}}
    assert dg.materialize([split_impressions], run_config=config, instance=instance, resources=RESOURCES).success
    real = dg.materialize([mixpanel_experiment_exposures], instance=instance, resources=RESOURCES)
    assert {name: c.passed for name, c in checks(real).items()} == {PENDING_AGE_CHECK: True, REJECTS_CHECK: True}
    with warehouse.write() as con:
        # An item Mixpanel refused, and one that has waited two days.
        con.execute(f"""INSERT INTO {EXPOSURES_OUTBOX} (id, scope, payload, status, enqueued_at, error)
                        VALUES ('refused', 'old', '{{}}', 'rejected', now(), 'bad event'),
                               ('stuck', 'old', '{{}}', 'pending', $then, NULL)""",
                    {"then": dt.datetime.now(dt.UTC) - dt.timedelta(days=2)})
    dry_run = {"ops": {"mixpanel_experiment_exposures": {"config": {"dry_run": True}}}}
    found = checks(dg.materialize([mixpanel_experiment_exposures], instance=instance, resources=RESOURCES,
                                  run_config=dry_run))
    assert not found[PENDING_AGE_CHECK].passed and found[PENDING_AGE_CHECK].severity == dg.AssetCheckSeverity.WARN
    assert found[PENDING_AGE_CHECK].metadata["pending_older_than_limit"].value == 1
    # 1 refused of 52 items: about 1.9%, over the default 1%.
    assert not found[REJECTS_CHECK].passed and found[REJECTS_CHECK].severity == dg.AssetCheckSeverity.WARN
    assert found[REJECTS_CHECK].metadata["top_reasons"].value == {"bad event": 1}
    monkeypatch.setenv("MIXSYNC_OUTBOX_MAX_PENDING_HOURS", "72")
    monkeypatch.setenv("MIXSYNC_OUTBOX_MAX_REJECT_PERCENT", "5")
    found = checks(dg.materialize([mixpanel_experiment_exposures], instance=instance, resources=RESOURCES,
                                  run_config=dry_run))
    assert {name: c.passed for name, c in found.items()} == {PENDING_AGE_CHECK: True, REJECTS_CHECK: True}


def test_a_flagsmith_dry_run_shows_the_changes_and_sends_and_keeps_nothing(sandbox, env, warehouse, instance):
    from mixsync.flagsmith.assets import flagsmith_cohort_traits
    from mixsync.mixpanel.cohort_assets import mixpanel_cohort_members, mixpanel_cohorts

    chain = [mixpanel_cohorts, mixpanel_cohort_members, flagsmith_cohort_traits]
    assert dg.materialize(chain, instance=instance, resources=RESOURCES).success
    sandbox.mixpanel.query.advance()  # members enter and leave
    assert dg.materialize(chain[:2], instance=instance, resources=RESOURCES).success
    writes_before = dict(sandbox.flagsmith.writes)
    before = snapshot(warehouse)
    dry = dg.materialize([flagsmith_cohort_traits], instance=instance, resources=RESOURCES,
                         run_config={"ops": {"flagsmith_cohort_traits": {"config": {"dry_run": True}}}})
    assert dry.success and dry.asset_materializations_for_node("flagsmith_cohort_traits") == []
    shown = observation(dry, "flagsmith_cohort_traits")
    assert dict(sandbox.flagsmith.writes) == writes_before
    assert snapshot(warehouse) == before
    assert shown["would_send_items"] > 0 and shown["traits_set_true"] > 0 and shown["traits_set_false"] > 0
    real = dg.materialize([flagsmith_cohort_traits], instance=instance, resources=RESOURCES)
    metadata = real.asset_materializations_for_node("flagsmith_cohort_traits")[0].metadata
    assert metadata["identities_touched"].value == shown["would_send_items"]
    assert (metadata["traits_set_true"].value, metadata["traits_set_false"].value) == (
        shown["traits_set_true"], shown["traits_set_false"])
    assert {name: c.passed for name, c in checks(real).items()} == {PENDING_AGE_CHECK: True, REJECTS_CHECK: True}
