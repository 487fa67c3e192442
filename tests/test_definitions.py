"""The whole code location loads, and the names users' scripts rely on are all there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from mixsync.definitions import defs

PUBLIC_ASSETS = {"mixpanel_events", "mixpanel_cohorts", "mixpanel_cohort_members", "split_events",
                 "flagsmith_cohort_traits", "split_impressions", "mixpanel_experiment_exposures",
                 "experiment_results", "mixpanel_profile_flags", "mixpanel_cohort_webhook_members"}


def test_the_code_location_has_every_public_name():
    dg.Definitions.validate_loadable(defs)
    repo = defs.get_repository_def()
    assert {key.to_user_string() for key in repo.asset_graph.get_all_asset_keys()} >= PUBLIC_ASSETS
    assert {"split_impression_files_sensor", "mixpanel_cohort_webhook_sensor"} <= {s.name for s in repo.sensor_defs}
    assert {"mixpanel_events_schedule", "split_events_schedule",
                                                                  "flagsmith_cohort_traits_schedule", "experiment_results_schedule"} <= {s.name for s in repo.schedule_defs}
    assert {"mixpanel_events_job", "split_events_job", "flagsmith_cohort_traits_job",
            "split_impressions_job", "experiment_results_job", "mixpanel_profile_flags_job",
            "mixpanel_cohort_webhook_job"} <= set(repo.job_names)
    assert "mixpanel_profile_flags_schedule" in {s.name for s in repo.schedule_defs}


def test_every_asset_names_its_group_kinds_and_pool():
    for spec in defs.resolve_all_asset_specs():
        assert spec.group_name and spec.group_name != "default", spec.key
        assert spec.kinds, spec.key
    # dagster.yaml gives every pool one slot: one step at a time per external API.
    assert {asset.op.pool for asset in defs.assets} == {
        "mixpanel_export", "mixpanel_query", "mixpanel_import", "split_events", "flagsmith", "impressions_landing",
        "experiments", "mixpanel_profile_flags", "mixpanel_cohort_webhooks", "warehouse_maintenance"}


@pytest.mark.slow
def test_the_code_location_loads_without_any_service_settings(tmp_path):
    """A team with only some credentials (or none) can still load the code location."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXPANEL_", "SPLIT_", "FLAGSMITH_", "MIXSYNC_"))}
    env["DAGSTER_HOME"] = str(tmp_path)
    dagster = str(Path(sys.executable).with_name("dagster"))
    done = subprocess.run([dagster, "definitions", "validate", "-m", "mixsync.definitions"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
