"""Two hosts on one DuckLake: two processes, two DAGSTER_HOMEs on one Postgres instance, two landing folders."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import pytest
from test_ducklake import readme_dagster_yaml

from mixsync.settings import WarehouseSettings
from mixsync.split.sql import EVENTS_OUTBOX
from mixsync.warehouse import open_warehouse

DAGSTER = str(Path(sys.executable).with_name("dagster"))


def host(name: str, tmp_path: Path, postgres, base_env: dict) -> dict:
    """One host's environment: its own DAGSTER_HOME (the README's Postgres dagster.yaml) and landing folder."""
    home = tmp_path / f"{name}_dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(readme_dagster_yaml())
    return {**os.environ, **base_env, "DAGSTER_HOME": str(home), "MIXSYNC_LANDING_DIR": str(tmp_path / f"{name}_landing"),
            "DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(postgres.port), "DAGSTER_PG_USERNAME": "postgres",
            "DAGSTER_PG_PASSWORD": "unused-with-trust-auth", "DAGSTER_PG_DB": "two_hosts_dagster"}


def readme_pools() -> list[str]:
    """The pools the README's "give every pool its limit" loop names; they must be every pool mixsync uses."""
    import re

    import mixsync.definitions as definitions

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- pool-limits -->", 1)[1]
    named = re.search(r"for pool in ([a-z_ ]+); do", block).group(1).split()
    graph = definitions.defs.resolve_asset_graph()
    used = {definitions.defs.get_assets_def(key).op.pool for key in graph.get_all_asset_keys()} - {None}
    assert set(named) == used, f"README pool list {sorted(named)} != the definitions' pools {sorted(used)}"
    return named


def launch(env: dict, asset: str, *partition: str) -> subprocess.Popen:
    return subprocess.Popen([DAGSTER, "asset", "materialize", "-m", "mixsync.definitions", "--select", asset, *partition],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(*runs: subprocess.Popen) -> None:
    outputs = [run.communicate(timeout=900)[0].decode() for run in runs]
    assert [run.returncode for run in runs] == [0] * len(runs), "\n".join(o[-3000:] for o in outputs)


@pytest.mark.slow
def test_two_hosts_export_and_push_at_once_and_a_reader_only_sees_whole_days(sandbox, postgres, lake_env, tmp_path,
                                                                            monkeypatch):
    postgres.create_database("two_hosts_dagster")
    base = {**sandbox.env(), **lake_env, "MIXSYNC_HTTP_BACKOFF_MS": "5", "MIXSYNC_HTTP_BACKOFF_MAX_MS": "20"}
    a, b = host("a", tmp_path, postgres, base), host("b", tmp_path, postgres, base)
    # The instance's tables are created on first use; do it once so two hosts' first runs don't race on it.
    for name in ("DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USERNAME", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
        monkeypatch.setenv(name, a[name])
    with dg.DagsterInstance.from_config(a["DAGSTER_HOME"]) as instance:
        assert instance.get_runs_count() == 0
        # The README's one-time step: every pool gets its limit before the hosts run (see readme_pools).
        for pool in readme_pools():
            instance.event_log_storage.set_concurrency_slots(pool, 1)
    lake = open_warehouse(WarehouseSettings.from_env(lake_env))
    first, second = (d.isoformat() for d in sorted(sandbox.dataset.days)[:2])

    # Two days exported at once, one on each host.
    finish(launch(a, "mixpanel_events", "--partition", first), launch(b, "mixpanel_events", "--partition", second))
    with lake.read() as con:
        whole = dict(con.execute("SELECT day::VARCHAR, count(*) FROM mixpanel.events GROUP BY day").fetchall())
        loads = dict(con.execute("SELECT day::VARCHAR, events FROM mixpanel.event_loads").fetchall())
    assert whole == loads and set(whole) == {first, second} and min(whole.values()) > 500

    # A reader polls while host A pushes both days to Split and host B exports the first day again.
    seen: list[dict] = []
    stop = threading.Event()

    def read_until_stopped() -> None:
        # A read every ~0.1 s: back to back, the reader took a core from the two hosts it watches.
        while not stop.wait(0.05):
            with lake.read() as con:  # one statement, one snapshot
                seen.append(dict(con.execute(
                    "SELECT day::VARCHAR, count(*) FROM mixpanel.events GROUP BY day").fetchall()))

    reader = threading.Thread(target=read_until_stopped)
    reader.start()
    try:
        finish(launch(a, "split_events", "--partition-range", f"{first}...{second}"),
               launch(b, "mixpanel_events", "--partition", first))
    finally:
        stop.set()
        reader.join(timeout=120)
    assert seen and all(snapshot == whole for snapshot in seen), [s for s in seen if s != whole][:3]

    with lake.read() as con:
        assert dict(con.execute("SELECT day::VARCHAR, count(*) FROM mixpanel.events GROUP BY day").fetchall()) == whole
        assert con.execute("SELECT count(*) FROM mixpanel.event_loads").fetchone()[0] == 2
        sent = con.execute(f"SELECT count(*) FROM {EVENTS_OUTBOX} WHERE status = 'sent'").fetchone()[0]
        pending = con.execute(f"SELECT count(*) FROM {EVENTS_OUTBOX} WHERE status <> 'sent'").fetchone()[0]
        scopes = {s for (s,) in con.execute(f"SELECT DISTINCT scope FROM {EVENTS_OUTBOX}").fetchall()}
    assert scopes == {first, second} and pending == 0
    # Split received every event of both days exactly once.
    assert sandbox.split.accepted == sent > 1000 and sandbox.split.duplicates() == 0
