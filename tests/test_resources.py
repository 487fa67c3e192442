"""Resources configured the Dagster way: typed fields bound to dg.EnvVar, overridable in run config, secrets unseen."""

from __future__ import annotations

import os
import subprocess
import sys

import dagster as dg
import duckdb
import pytest

from mixsync.mixpanel.assets import mixpanel_events
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource
from mixsync.settings import SettingsError

SECRET = "ser.this-value-must-never-show"

DEFINITIONS_PROBE = """
import mixsync.definitions as d
from mixsync.mixpanel.partitions import daily_partitions
repo = d.defs.get_repository_def()
print("start", daily_partitions.start.date().isoformat())
for name in ("warehouse", "mixpanel", "split", "flagsmith", "impressions", "experiments"):
    resource = d.resources[name]
    print(name, repr(resource), resource.model_dump())
"""


def probe_definitions(extra_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXPANEL_", "SPLIT_", "FLAGSMITH_", "MIXSYNC_"))}
    done = subprocess.run([sys.executable, "-c", DEFINITIONS_PROBE], env={**env, **extra_env}, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_fields_are_bound_to_the_variables_that_are_set_and_secrets_stay_names():
    out = probe_definitions({"FLAGSMITH_ENVIRONMENT_KEY": SECRET, "SPLIT_SDK_KEY": SECRET,
                             "MIXPANEL_SERVICE_ACCOUNT_SECRET": SECRET, "MIXSYNC_WEBHOOK_TOKEN": SECRET,
                             "MIXSYNC_DUCKDB_PATH": "/srv/mixsync.duckdb", "SPLIT_BATCH_SIZE": "500",
                             "MIXSYNC_EXPERIMENTS_FILE": "/srv/experiments.yaml"})
    assert SECRET not in out
    assert "environment_key='FLAGSMITH_ENVIRONMENT_KEY'" in out and "sdk_key='SPLIT_SDK_KEY'" in out
    assert "duckdb_path='MIXSYNC_DUCKDB_PATH'" in out and "/srv/mixsync.duckdb" not in out
    assert "experiments_file='MIXSYNC_EXPERIMENTS_FILE'" in out and "chart_dir=None" in out
    # Unset variables leave their fields empty, to be read when an asset runs.
    assert "events_url=None" in out and "project_id=None" in out


@pytest.mark.slow
def test_the_first_partition_is_a_fixed_day_without_mixpanel_start_date():
    assert probe_definitions({}).splitlines()[0] == "start 2025-01-01"
    assert probe_definitions({"MIXPANEL_START_DATE": "2024-03-01"}).splitlines()[0] == "start 2024-03-01"


def day_rows(path) -> int:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute("SELECT count(*) FROM mixpanel.events").fetchone()[0]


def test_dagster_resolves_the_variables_at_run_start_and_run_config_overrides_a_field(
        sandbox, env, instance, tmp_path, monkeypatch):
    # Bound while the variables are set, as the code location does when it loads.
    resources = {"mixpanel": MixpanelResource.from_environment(), "warehouse": WarehouseResource.from_environment()}
    day = sandbox.dataset.days[0].isoformat()
    assert dg.materialize([mixpanel_events], instance=instance, resources=resources, partition_key=day).success
    assert day_rows(env["MIXSYNC_DUCKDB_PATH"]) > 500

    # A deployment overrides one field in run config; everything else still comes from the environment.
    other = tmp_path / "other.duckdb"
    run_config = {"resources": {"warehouse": {"config": {"duckdb_path": str(other)}}}}
    assert dg.materialize([mixpanel_events], instance=instance, resources=resources, partition_key=day,
                          run_config=run_config).success
    assert day_rows(other) == day_rows(env["MIXSYNC_DUCKDB_PATH"])

    # Dagster reads a bound variable when the run starts, and names it when it cannot use it.
    monkeypatch.setenv("MIXSYNC_DUCKDB_THREADS", "two")
    bound = {**resources, "warehouse": WarehouseResource.from_environment()}
    with pytest.raises(dg.DagsterInvalidConfigError, match="MIXSYNC_DUCKDB_THREADS"):
        dg.materialize([mixpanel_events], instance=instance, resources=bound, partition_key=day)


def test_a_bad_setting_fails_the_asset_naming_the_variable(sandbox, env, instance, monkeypatch):
    monkeypatch.setenv("MIXSYNC_DUCKDB_MEMORY_LIMIT", "lots")
    resources = {"mixpanel": MixpanelResource.from_environment(), "warehouse": WarehouseResource.from_environment()}
    result = dg.materialize([mixpanel_events], instance=instance, resources=resources, raise_on_error=False,
                            partition_key=sandbox.dataset.days[0].isoformat())
    assert not result.success
    error = result.get_step_failure_events()[0].event_specific_data.error
    assert "MIXSYNC_DUCKDB_MEMORY_LIMIT='lots' is not a memory size" in str(error)


def test_explicit_fields_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("MIXPANEL_PROJECT_ID", "111")
    monkeypatch.setenv("MIXPANEL_SERVICE_ACCOUNT_USERNAME", "user")
    monkeypatch.setenv("MIXPANEL_SERVICE_ACCOUNT_SECRET", "secret")
    assert MixpanelResource(project_id="222", export_window_days=7).settings().project_id == "222"
    assert MixpanelResource(export_window_days=7).settings().export_window_days == 7
    assert MixpanelResource().settings().project_id == "111"
    with pytest.raises(SettingsError, match="MIXPANEL_EXPORT_WINDOW_DAYS=0 is out of range"):
        MixpanelResource(export_window_days=0).settings()
