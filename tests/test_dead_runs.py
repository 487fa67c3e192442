"""A run SIGKILLed mid-step no longer wedges its pool: `mixsync recover`, or the daemon on its own, frees it.

Real processes throughout: `dagster asset materialize` runs under a DAGSTER_HOME holding the repository's
dagster.yaml (pools of one slot), the first is killed with SIGKILL while its step holds the `split_events` slot,
the second waits on that slot, and then `mixsync recover` (or `dagster-daemon run`) lets it through.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from waiting import poll

from mixsync.recovery import recover_runs

REPO = Path(__file__).resolve().parents[1]
DEFS = Path(__file__).with_name("processes") / "held_step_defs.py"
BIN = Path(sys.executable).parent




@pytest.fixture
def dagster_home(tmp_path):
    """A DAGSTER_HOME with the repository's dagster.yaml, monitoring made quick enough for a test."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = yaml.safe_load((REPO / "dagster_home" / "dagster.yaml").read_text())
    config["run_monitoring"].update(poll_interval_seconds=1, free_slots_after_run_end_seconds=1)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    # Create the instance's storage here, where Dagster's migration scripts are already read (conftest), instead of
    # in the first `dagster` process (1.7 CPU-s there).
    dg.DagsterInstance.from_config(str(home)).dispose()
    return home


def materialize(home: Path, hold: Path | None, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "MIXSYNC_TEST_HOLD"}
    env["DAGSTER_HOME"] = str(home)
    if hold is not None:
        env["MIXSYNC_TEST_HOLD"] = str(hold)
    # Its own session, so the kill takes the whole run: orchestrator and step processes.
    return subprocess.Popen([str(BIN / "dagster"), "asset", "materialize", "-f", str(DEFS), "--select", "held_step"],
                            env=env, cwd=home, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_mid_step_and_queue_next(home: Path, tmp_path: Path) -> tuple[str, subprocess.Popen]:
    """Run 1 killed while its step holds the pool slot; run 2 started and seen blocked on that pool."""
    hold = tmp_path / "hold"
    hold.mkdir()
    first = materialize(home, hold, tmp_path / "first.log")
    poll(lambda: list(hold.glob("started-*")) or first.poll() is not None, 300, "the first run's step to start")
    assert first.poll() is None, (tmp_path / "first.log").read_text()
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        [dead] = instance.get_run_records()
        assert dead.dagster_run.status == dg.DagsterRunStatus.STARTED  # what a SIGKILL leaves behind
        dead_run_id = dead.dagster_run.run_id
    second = materialize(home, None, tmp_path / "second.log")

    def second_blocked() -> bool:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            runs = [r for r in instance.get_runs() if r.run_id != dead_run_id]
            return bool(runs) and any("blocked by limit for pool split_events" in (e.message or "")
                                      for e in instance.all_logs(runs[0].run_id))

    poll(lambda: second_blocked() or second.poll() is not None, 300, "the second run to wait on the pool")
    assert second.poll() is None, "the second run finished although the killed run held the only slot"
    return dead_run_id, second


@pytest.mark.slow
def test_mixsync_recover_frees_the_pool_of_a_sigkilled_run(dagster_home, tmp_path):
    dead_run_id, second = kill_mid_step_and_queue_next(dagster_home, tmp_path)
    try:
        recovered = subprocess.run([str(BIN / "mixsync"), "recover"], env={**os.environ, "DAGSTER_HOME": str(dagster_home)},
                                   capture_output=True, text=True, timeout=300)
        assert recovered.returncode == 0, recovered.stderr
        assert f"failed run {dead_run_id}" in recovered.stdout
        assert f"freed the pool slots of finished run {dead_run_id}: split_events" in recovered.stdout
        poll(lambda: second.poll() is not None, 300, "the second run to finish")
        assert second.returncode == 0, (tmp_path / "second.log").read_text()
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            assert instance.get_run_by_id(dead_run_id).status == dg.DagsterRunStatus.FAILURE
            assert instance.get_latest_materialization_event(dg.AssetKey("held_step")) is not None
            # Nothing left to do: a second pass neither fails the live nor frees anything.
            report = recover_runs(instance)
            assert not report.failed and not report.freed_slots
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait()


@pytest.mark.slow
def test_daemon_run_monitoring_frees_the_pool_of_a_sigkilled_run(dagster_home, tmp_path):
    dead_run_id, second = kill_mid_step_and_queue_next(dagster_home, tmp_path)
    daemon = subprocess.Popen([str(BIN / "dagster-daemon"), "run", "-f", str(DEFS)],
                              env={**os.environ, "DAGSTER_HOME": str(dagster_home)}, cwd=dagster_home,
                              stdout=(tmp_path / "daemon.log").open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        poll(lambda: second.poll() is not None or daemon.poll() is not None, 300, "the second run to finish")
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
        assert second.returncode == 0, (tmp_path / "second.log").read_text()
        with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
            assert instance.get_run_by_id(dead_run_id).status == dg.DagsterRunStatus.FAILURE
    finally:
        for process in (daemon, second):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM if process is daemon else signal.SIGKILL)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
