"""`mixsync demo`: every flow against the sandbox, through the same Dagster assets production runs."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

import dagster as dg
import orjson

from mixsync.experiments.stats import disagreement
from mixsync.sandbox import Sandbox
from mixsync.sandbox.data import Dataset

# Dagster's per-event DEBUG lines would bury the summary; warnings and failures still show.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _instance(workdir: Path) -> dg.DagsterInstance:
    # The demo's runs go to an instance of its own, never to $DAGSTER_HOME's: demo history in the real instance would
    # show partitions as materialized that the real warehouse does not hold. Browse it with
    # `make dev DAGSTER_HOME=$PWD/data/demo/dagster_home`.
    home = workdir / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.local_temp(tempdir=str(home))


def query_hint(database: Path) -> str:
    """A command the user can paste as it is: the mixsync next to this Python, the demo's file, a real query."""
    mixsync = Path(sys.executable).with_name("mixsync")
    with_cwd = Path.cwd()
    shown = mixsync.relative_to(with_cwd) if mixsync.is_relative_to(with_cwd) else mixsync
    db = database.relative_to(with_cwd) if database.is_relative_to(with_cwd) else database
    sql = "SELECT event, count(*) AS events FROM mixpanel.events GROUP BY event ORDER BY events DESC LIMIT 5"
    return f"MIXSYNC_DUCKDB_PATH={shlex.quote(str(db))} {shlex.quote(str(shown))} query {shlex.quote(sql)}"


def _print_query(con, title: str, sql: str, params: list | None = None) -> None:
    from mixsync.output import format_table

    print(f"\n== {title}")
    print(format_table(con.execute(sql, params or []), max_rows=15))


def mixpanel_step(instance, sandbox: Sandbox, store) -> bool:
    from mixsync.definitions import resources
    from mixsync.mixpanel.assets import mixpanel_events

    days = sorted(sandbox.dataset.days)
    print(f"\n-- mixpanel_events: materializing {days[0]}..{days[-1]} in one run (one export request per window)")
    result = dg.materialize([mixpanel_events], instance=instance, resources=resources, raise_on_error=False,
                            run_config=QUIET,
                            tags={"dagster/asset_partition_range_start": days[0].isoformat(),
                                  "dagster/asset_partition_range_end": days[-1].isoformat()})
    if not result.success:
        return False
    with store.read() as con:
        _print_query(con, "events per day (mixpanel.event_loads)",
                     "SELECT day, events, duplicates_dropped, rejected FROM mixpanel.event_loads ORDER BY day")
        _print_query(con, "top events (mixpanel.events)",
                     "SELECT event, count(*) AS events, count(DISTINCT distinct_id) AS people FROM mixpanel.events "
                     "GROUP BY event ORDER BY events DESC LIMIT 8")
        _print_query(con, "rejects (mixpanel.events_rejected)",
                     "SELECT coalesce(day::VARCHAR, 'none in ' || window_start || '..' || window_end) AS day, reason, "
                     "left(raw, 60) AS raw FROM mixpanel.events_rejected ORDER BY day, reason")
    requests = sandbox.mixpanel.recorder.matching("/api/2.0/export")
    print(f"\nsandbox Mixpanel received {len(requests)} export request(s) for {len(days)} days")
    return True


def split_step(instance, sandbox: Sandbox, store) -> bool:
    """Materialize split_events for every day (twice: the second run sends nothing), print what Split received."""

    from mixsync.definitions import resources
    from mixsync.split.assets import split_events

    days = sorted(sandbox.dataset.days)
    tags = {"dagster/asset_partition_range_start": days[0].isoformat(),
            "dagster/asset_partition_range_end": days[-1].isoformat()}
    print(f"\n-- split_events: {days[0]}..{days[-1]} from mixpanel.events to Split's Events API, in one run")
    sent = []
    for attempt in ("first run", "second run (nothing new to send)"):
        result = dg.materialize([split_events], instance=instance, resources=resources, raise_on_error=False,
                                run_config=QUIET, tags=tags)
        if not result.success:
            return False
        # The run's own figures (a partition's are that day's only).
        meta = {k.removeprefix("run/"): v.value
                for k, v in result.asset_materializations_for_node("split_events")[0].metadata.items()
                if k.startswith("run/")}
        sent.append(meta["events_sent"])
        print(f"{attempt}: considered {meta['events_considered']}, mapped {meta['events_mapped']}, "
              f"sent {meta['events_sent']} in {meta['batches']} batches, already sent before "
              f"{meta['events_already_sent_before']}, rejected {meta['events_rejected']}, renames {meta['renames']}")
    with store.read() as con:
        _print_query(con, "outbox (sync.split_events)",
                     "SELECT scope AS day, status, count(*) AS events FROM sync.split_events GROUP BY ALL ORDER BY ALL")
        _print_query(con, "rejects (split.events_rejected)",
                     "SELECT reason, count(*) AS events FROM split.events_rejected GROUP BY reason ORDER BY events DESC")
        _print_query(con, "renames (split.event_renames)",
                     "SELECT event, event_type_id, rule FROM split.event_renames ORDER BY event LIMIT 8")
    split = sandbox.split
    print(f"\nsandbox Split received {split.accepted} events in {split.bulk_requests} bulk requests; "
          f"duplicates: {split.duplicates()}")
    by_type: dict[str, int] = {}
    for event in split.events:
        by_type[event["eventTypeId"]] = by_type.get(event["eventTypeId"], 0) + 1
    top = sorted(by_type.items(), key=lambda item: -item[1])[:5]
    print("top eventTypeIds:", ", ".join(f"{name} {n}" for name, n in top))
    if split.events:
        print("one event as Split got it:", orjson.dumps(split.events[0]).decode()[:300])
    return sent[1] == 0 and split.accepted == sent[0] and split.duplicates() == 0


def flagsmith_step(instance, sandbox: Sandbox, store) -> bool:
    """Cohorts and members from Mixpanel, their traits in Flagsmith; then churn, and a second sync sends only that."""
    from collections import Counter

    from mixsync.definitions import resources
    from mixsync.flagsmith.assets import flagsmith_cohort_traits
    from mixsync.mixpanel.cohort_assets import mixpanel_cohort_members, mixpanel_cohorts

    assets = [mixpanel_cohorts, mixpanel_cohort_members, flagsmith_cohort_traits]
    for label in ("first sync", "second sync, after the sandbox's cohorts churned"):
        if label.startswith("second"):
            sandbox.mixpanel.query.advance()
        print(f"\n-- mixpanel_cohorts, mixpanel_cohort_members, flagsmith_cohort_traits: {label}")
        writes_before = sum(sandbox.flagsmith.writes.values())
        result = dg.materialize(assets, instance=instance, resources=resources, raise_on_error=False,
                                run_config=QUIET)
        if not result.success:
            return False
        print(f"sandbox Flagsmith applied {sum(sandbox.flagsmith.writes.values()) - writes_before} trait writes")
    with store.read() as con:
        _print_query(con, "cohorts (mixpanel.cohorts)",
                     "SELECT id, name, count, visibility, created FROM mixpanel.cohorts ORDER BY id")
        _print_query(con, "membership snapshots (mixpanel.cohort_snapshots)",
                     """SELECT snapshot_id, cohort_id, cohort_name, members, entered, "left", pages
                        FROM mixpanel.cohort_snapshots ORDER BY snapshot_id""")
        _print_query(con, "syncs (sync.flagsmith_syncs)",
                     """SELECT sync_id, bulk_mode, identities, set_true, set_false, deleted, skipped, verified, mismatches
                        FROM sync.flagsmith_syncs ORDER BY sync_id""")
    held = sandbox.flagsmith.all_traits()
    per_key = Counter((key, value) for traits in held.values() for key, value in traits.items())
    print(f"\n== what the sandbox Flagsmith holds: {len(held)} identities")
    for (key, value), n in sorted(per_key.items()):
        print(f"  {key} = {str(value).lower():5}  on {n} identities")
    for identifier in sorted(held)[:5]:
        print(f"  {identifier}: {held[identifier]}")
    return True


def profile_flags_step(instance, sandbox: Sandbox, store) -> bool:
    """The managed identities' Flagsmith flags onto their Mixpanel profiles; a flag changes, only that is sent."""
    from mixsync.definitions import resources
    from mixsync.flagsmith.profile_flags_assets import mixpanel_profile_flags

    fs = sandbox.flagsmith
    fs.add_feature("new_checkout", enabled=True)
    fs.add_feature("max_cart_items", enabled=True, value=0)
    fs.add_feature("banner_text", enabled=True, value="")
    fs.add_feature("dark_mode", enabled=False, value="auto")
    someone = sorted(fs.all_traits())[0]
    fs.override(someone, "dark_mode", True, "always")
    for label in ("first sync", "second sync, after max_cart_items changed to 25"):
        if label.startswith("second"):
            fs.add_feature("max_cart_items", enabled=True, value=25)
        print(f"\n-- mixpanel_profile_flags: {label}")
        before = len(sandbox.mixpanel.recorder.matching("/engage"))
        result = dg.materialize([mixpanel_profile_flags], instance=instance, resources=resources,
                                raise_on_error=False, run_config=QUIET)
        if not result.success:
            return False
        print(f"sandbox Mixpanel got {len(sandbox.mixpanel.recorder.matching('/engage')) - before} /engage requests")
    with store.read() as con:
        _print_query(con, "flags read (flagsmith.identity_flags)",
                     """SELECT feature, enabled, value::VARCHAR AS value, count(*) AS identities
                        FROM flagsmith.identity_flags GROUP BY ALL ORDER BY ALL""")
        _print_query(con, "syncs (sync.mixpanel_profile_flags_syncs)",
                     """SELECT sync_id, identities, identities_read, profiles, properties_set, properties_unset
                        FROM sync.mixpanel_profile_flags_syncs ORDER BY sync_id""")
    profiles = sandbox.mixpanel.profiles.all_profiles()
    print(f"\n== what the sandbox Mixpanel holds: {len(profiles)} profiles")
    for distinct_id in [someone, *sorted(p for p in profiles if p != someone)[:2]]:
        print(f"  {distinct_id}: {orjson.dumps(profiles.get(distinct_id, {})).decode()}")
    return True


def impressions_step(instance, sandbox: Sandbox, store) -> bool:
    """Split's webhook -> receiver -> landing files -> sensor -> split_impressions -> exposures in Mixpanel."""
    from mixsync.definitions import resources
    from mixsync.impressions.assets import mixpanel_experiment_exposures, split_impressions
    from mixsync.impressions.receiver import build_app
    from mixsync.impressions.sensors import split_impression_files_sensor
    from mixsync.impressions.settings import ImpressionsSettings
    from mixsync.sandbox.impressions import ImpressionGenerator, post_batches
    from mixsync.sandbox.server import serve

    # The receiver writes atomically (temp name, fsync, rename): no need to wait for files to settle.
    os.environ["MIXSYNC_IMPRESSIONS_SETTLE_SECONDS"] = "0"
    os.environ["MIXSYNC_IMPRESSIONS_BATCH_FILES"] = "10"
    settings = ImpressionsSettings.from_env()
    receiver = serve("impressions-receiver", build_app(settings))
    try:
        print(f"\n-- impressions: posting Split webhook batches (gzipped) to the receiver at {receiver.url}/impressions")
        posted = post_batches(f"{receiver.url}/impressions", ImpressionGenerator(seed=11, users=400), batches=24,
                              size=150, resend_probability=0.15)
    finally:
        receiver.stop()
    print(f"posted {posted.bodies} bodies ({posted.resent} resent, as Split's retry does), {posted.impressions} "
          f"distinct impressions; answers {posted.statuses}; {len(os.listdir(settings.impressions_dir))} files landed")
    result = split_impression_files_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    requests = (result.run_requests or []) if isinstance(result, dg.SensorResult) else []
    print(f"split_impression_files_sensor asked for {len(requests)} run(s) of split_impressions: "
          + ", ".join(f"{r.tags['mixsync/files']} files" for r in requests))
    for request in requests:
        run = dg.materialize([split_impressions], instance=instance, resources=resources, raise_on_error=False,
                             run_config={**request.run_config, **QUIET}, tags=request.tags)
        if not run.success:
            return False
    print("-- mixpanel_experiment_exposures: pushing to the sandbox Mixpanel's /import")
    pushed = dg.materialize([mixpanel_experiment_exposures], instance=instance, resources=resources,
                            raise_on_error=False, run_config=QUIET)
    if not pushed.success:
        return False
    with store.read() as con:
        _print_query(con, "landing files (split.impression_files)",
                     "SELECT status, count(*) AS files, sum(impressions) AS impressions, sum(inserted) AS inserted "
                     "FROM split.impression_files GROUP BY status ORDER BY status")
        _print_query(con, "impressions by split and treatment (split.impressions)",
                     "SELECT split, treatment, count(*) AS impressions, count(DISTINCT key) AS users "
                     "FROM split.impressions GROUP BY ALL ORDER BY split, treatment")
        _print_query(con, "exposures outbox (sync.mixpanel_exposures)",
                     "SELECT status, count(*) AS exposures FROM sync.mixpanel_exposures GROUP BY status")
    held = sandbox.mixpanel.ingest.summary()
    print(f"\nsandbox Mixpanel holds {held['held']} events {held['held_by_event']} from "
          f"{sum(held['requests_by_status'].values())} /import request(s) {held['requests_by_status']}")
    return True


def _verdict(split: str, metric: str, treatment: str, control: str, lift, low, high, p_value, reason) -> str:
    if lift is None:
        return f"  {split} {metric}: {treatment} vs {control}: no lift ({reason})"
    figures = f"{lift * 100:+.1f}% [95% CI {low * 100:+.1f}%, {high * 100:+.1f}%], p = {p_value:.2g}"
    # Never a small p-value next to "not distinguishable": when the test and the interval disagree, say so.
    if (why := disagreement(low, high, p_value)) is not None:
        return f"  {split} {metric}: {treatment} against {control} is inconclusive: {figures}: {why}"
    if p_value < 0.05:
        return f"  {split} {metric}: {treatment} is {'better' if lift > 0 else 'worse'} than {control}: {figures}"
    return f"  {split} {metric}: {treatment} is not distinguishable from {control}: {figures}"


def experiments_step(instance, sandbox: Sandbox, store) -> bool:
    """The seeded experiments' impressions land like any others; experiment_results then joins them to the events."""
    from mixsync.definitions import resources
    from mixsync.experiments.assets import experiment_results
    from mixsync.impressions.assets import split_impressions
    from mixsync.impressions.receiver import build_app
    from mixsync.impressions.settings import ImpressionsSettings
    from mixsync.sandbox import experiments
    from mixsync.sandbox.impressions import encode
    from mixsync.sandbox.server import serve

    example = Path(__file__).parent / "experiments" / "experiments.example.yaml"
    os.environ.setdefault("MIXSYNC_EXPERIMENTS_FILE", str(example))
    dataset = sandbox.dataset
    batch = experiments.impressions(dataset.days, dataset.experiment_users, dataset.seed)
    print(f"\n-- experiments: {len(batch)} impressions of {experiments.CHECKOUT} (a real effect) and "
          f"{experiments.CAROUSEL} (none), posted to the webhook receiver; their shoppers' events are in mixpanel.events")
    receiver = serve("impressions-receiver", build_app(ImpressionsSettings.from_env()))
    try:
        import httpx

        with httpx.Client(timeout=30) as client:
            for start in range(0, len(batch), 2000):
                body, headers = encode(batch[start:start + 2000])
                client.post(f"{receiver.url}/impressions", content=body, headers=headers).raise_for_status()
    finally:
        receiver.stop()
    landed = dg.materialize([split_impressions], instance=instance, resources=resources, raise_on_error=False,
                            run_config=QUIET)
    if not landed.success:
        return False
    print(f"-- experiment_results with MIXSYNC_EXPERIMENTS_FILE={os.environ['MIXSYNC_EXPERIMENTS_FILE']}")
    result = dg.materialize([experiment_results], instance=instance, resources=resources, raise_on_error=False,
                            run_config=QUIET)
    if not result.success:
        return False
    metadata = result.asset_materializations_for_node("experiment_results")[0].metadata
    [check] = result.get_asset_check_evaluations()
    with store.read() as con:
        _print_query(con, "results (analytics.experiment_results)",
                     """SELECT split, metric, treatment, is_control, users, round(mean, 4) AS mean, round(lift, 4) AS lift,
                               round(ci_low, 4) AS ci_low, round(ci_high, 4) AS ci_high, printf('%.2g', p_value) AS p_value
                        FROM analytics.experiment_results ORDER BY split, metric, NOT is_control, treatment""")
        _print_query(con, "sample ratios (analytics.experiment_srm)",
                     """SELECT split, treatment, users, round(expected_share, 3) AS expected_share,
                               round(srm_p_value, 4) AS srm_p_value FROM analytics.experiment_srm ORDER BY split, treatment""")
        rows = con.execute("""SELECT r.split, r.metric, r.treatment, c.treatment, r.lift, r.ci_low, r.ci_high, r.p_value,
                                     r.reason
                              FROM analytics.experiment_results r JOIN analytics.experiment_results c
                                ON c.split = r.split AND c.metric = r.metric AND c.is_control
                              WHERE NOT r.is_control ORDER BY r.split DESC, r.metric, r.treatment""").fetchall()
    print("\n== what it means (two-sided Welch t test, 95% intervals of the relative lift)")
    for row in rows:
        print(_verdict(*row))
    print(f"sample-ratio check experiment_sample_ratio: {'passed' if check.passed else 'FAILED'} "
          f"({check.description})")
    for name, value in metadata.items():
        if name.startswith("chart_path "):
            print(f"chart of {name.removeprefix('chart_path ')}: {value.value}")
    return True


STEPS = [mixpanel_step, split_step, flagsmith_step, profile_flags_step, impressions_step, experiments_step]


def run_demo(workdir: Path, days: int = 5, events_per_day: int = 4000, users: int = 2000) -> int:
    from mixsync.settings import WarehouseSettings
    from mixsync.warehouse import open_warehouse

    workdir = workdir.absolute()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    # Three experiment shoppers per regular user: 6000 by default, enough for the checkout effect to be clear.
    dataset = Dataset.recent(days, users=users, events_per_day=events_per_day, malformed_per_day=2,
                             experiment_users=3 * users)
    with Sandbox(dataset, data_dir=workdir / "sandbox") as sandbox:
        os.environ.update(sandbox.env())
        os.environ["MIXSYNC_DUCKDB_PATH"] = str(workdir / "mixsync.duckdb")
        os.environ["MIXSYNC_LANDING_DIR"] = str(workdir / "landing")
        print("sandbox:", ", ".join(f"{name} {server.url}" for name, server in sandbox.servers.items()))
        # MIXSYNC_WAREHOUSE=ducklake (with its catalog and data path) runs the demo on a lake instead: give it
        # an empty catalog database, since the demo's counts assume an empty warehouse.
        store = open_warehouse(WarehouseSettings.from_env())
        print("warehouse:", store.description)
        with _instance(workdir) as instance:
            for step in STEPS:
                if not step(instance, sandbox, store):
                    print(f"\ndemo step {step.__name__} failed; see the Dagster log above")
                    return 1
    if os.environ.get("MIXSYNC_WAREHOUSE", "duckdb").strip().lower() == "ducklake":
        print("\nDone. Query it yourself (same MIXSYNC_WAREHOUSE settings): mixsync query \"SELECT ...\"")
    else:
        print(f"\nDone. Query it yourself:\n  {query_hint(workdir / 'mixsync.duckdb')}")
    return 0
