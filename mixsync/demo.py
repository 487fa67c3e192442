"""`mixsync demo`: every flow against the sandbox, through the same Dagster assets production runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import dagster as dg

from mixsync.sandbox import Sandbox
from mixsync.sandbox.data import Dataset


# Dagster's per-event DEBUG lines would bury the summary; warnings and failures still show.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _instance() -> dg.DagsterInstance:
    # With DAGSTER_HOME (the Makefile sets it) runs are kept and show up in `make dev`'s UI.
    return dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()


def _print_query(con, title: str, sql: str, params: list | None = None) -> None:
    from mixsync.cli import format_table

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
                     "SELECT day, reason, left(raw, 60) AS raw FROM mixpanel.events_rejected ORDER BY day, reason")
    requests = sandbox.mixpanel.recorder.matching("/api/2.0/export")
    print(f"\nsandbox Mixpanel received {len(requests)} export request(s) for {len(days)} days")
    return True


def split_step(instance, sandbox: Sandbox, store) -> bool:
    """Filled in by the Split flow: materialize split_events, print what the sandbox received."""
    return True


def flagsmith_step(instance, sandbox: Sandbox, store) -> bool:
    """Filled in by the Flagsmith flow: cohorts, members, traits; print what the sandbox holds."""
    return True


def impressions_step(instance, sandbox: Sandbox, store) -> bool:
    """Filled in by the impressions flow: receiver, sensor, split_impressions, exposures to Mixpanel."""
    return True


STEPS = [mixpanel_step, split_step, flagsmith_step, impressions_step]


def run_demo(workdir: Path) -> int:
    from mixsync.warehouse import Warehouse

    workdir = workdir.absolute()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    dataset = Dataset.recent(5, users=2000, events_per_day=4000, malformed_per_day=2)
    with Sandbox(dataset, data_dir=workdir / "sandbox") as sandbox:
        os.environ.update(sandbox.env())
        os.environ["MIXSYNC_DUCKDB_PATH"] = str(workdir / "mixsync.duckdb")
        os.environ["MIXSYNC_LANDING_DIR"] = str(workdir / "landing")
        print("sandbox:", ", ".join(f"{name} {server.url}" for name, server in sandbox.servers.items()))
        store = Warehouse(workdir / "mixsync.duckdb")
        with _instance() as instance:
            for step in STEPS:
                if not step(instance, sandbox, store):
                    print(f"\ndemo step {step.__name__} failed; see the Dagster log above")
                    return 1
    print(f"\nDone. Query it yourself: MIXSYNC_DUCKDB_PATH={workdir / 'mixsync.duckdb'} mixsync query \"SELECT ...\"")
    return 0
