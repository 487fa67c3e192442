"""`mixsync demo`, as `make demo` runs it: every flow end to end, on a Dagster instance of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIXPANEL_", "SPLIT_", "FLAGSMITH_", "MIXSYNC_"))}
    env.update(extra)
    return env


@pytest.mark.slow
def test_the_demo_runs_every_flow_on_its_own_instance_and_its_hint_works(tmp_path):
    real_home = tmp_path / "real_home"
    real_home.mkdir()
    workdir = tmp_path / "demo"
    mixsync = str(Path(sys.executable).with_name("mixsync"))
    done = subprocess.run(
        [mixsync, "demo", "--workdir", str(workdir), "--days", "2", "--events-per-day", "300", "--users", "200"],
        env=_clean_env(DAGSTER_HOME=str(real_home)), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Done. Query it yourself:" in done.stdout
    # Quiet: none of Dagster's Beta/Supersession/instance warnings reach the person running the demo.
    assert "Warning" not in done.stderr and "will not be used" not in done.stderr, done.stderr[-3000:]

    # The real instance ($DAGSTER_HOME) holds no history; the demo's own instance holds every run it made.
    with dg.DagsterInstance.from_config(str(real_home)) as real:
        assert real.get_runs() == []
    with dg.DagsterInstance.from_config(str(workdir / "dagster_home")) as demo:
        runs = demo.get_runs()
        assert len(runs) >= 5 and all(run.is_success for run in runs)
        assert demo.get_latest_materialization_event(dg.AssetKey("mixpanel_events")) is not None

    # The closing hint is a command that works as printed, from where the demo ran.
    hint = done.stdout.split("Done. Query it yourself:")[1].strip().splitlines()[0]
    answer = subprocess.run(hint, shell=True, env=_clean_env(), cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert answer.stdout.splitlines()[0].split() == ["event", "events"] and "(5 rows)" in answer.stdout


@pytest.mark.slow
def test_the_demo_runs_on_a_ducklake(tmp_path, lake_env):
    """The same demo with MIXSYNC_WAREHOUSE=ducklake: every flow, the report, and `mixsync query` on the lake."""
    workdir = tmp_path / "demo"
    mixsync = str(Path(sys.executable).with_name("mixsync"))
    done = subprocess.run(
        [mixsync, "demo", "--workdir", str(workdir), "--days", "2", "--events-per-day", "300", "--users", "200"],
        env=_clean_env(DAGSTER_HOME=str(tmp_path), **lake_env), cwd=tmp_path, capture_output=True, text=True,
        timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Done. Query it yourself (same MIXSYNC_WAREHOUSE settings)" in done.stdout
    assert not (workdir / "mixsync.duckdb").exists()
    with dg.DagsterInstance.from_config(str(workdir / "dagster_home")) as demo:
        runs = demo.get_runs()
        assert len(runs) >= 5 and all(run.is_success for run in runs)
    answer = subprocess.run([mixsync, "query", "SELECT count(DISTINCT day) AS days, count(*) > 0 AS loaded "
                                               "FROM mixpanel.events"],
                            env=_clean_env(**lake_env), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert answer.stdout.splitlines()[2].split() == ["2", "True"], answer.stdout
