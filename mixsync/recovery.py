"""Dead runs: find this instance's runs whose processes are gone, fail them and free their pool slots.

A run killed with SIGKILL (or by the OOM killer, or a reboot) reports nothing: Dagster keeps it STARTED and its
pool slots claimed, so the next run of the same pool waits forever ("Step blocked by limit for pool"). Every
Dagster run process logs its pid in engine events ("Executing steps in process (pid: …)", step subprocesses,
"Started process for run"); a run none of whose processes is alive any more is dead.

Two ways to act on it:
- `mixsync recover` (command line, no daemon): fails such runs and frees the slots of every finished run.
- `LocalRunLauncher` (dagster.yaml `run_launcher`): Dagster's default launcher plus a worker health check, so the
  daemon's run monitoring fails such runs itself and frees their slots after `free_slots_after_run_end_seconds`.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterable

import dagster as dg
import psutil
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus
from dagster._core.storage.dagster_run import FINISHED_STATUSES

# Runs in these statuses hold (or may soon hold) pool slots and have a process that should report their end.
WATCHED_STATUSES = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
# A pid's process must have started before the run's first engine event (plus clock slack), or the pid was reused.
PID_REUSE_SLACK_SECONDS = 2.0


@dataclasses.dataclass
class RunLiveness:
    run_id: str
    job_name: str
    status: str
    pids: list[int]
    alive_pids: list[int]

    @property
    def dead(self) -> bool:
        # No pid logged yet: the process may still be starting; the daemon's start timeout covers that case.
        return bool(self.pids) and not self.alive_pids


def run_pids(instance: dg.DagsterInstance, run_id: str) -> tuple[list[int], float | None]:
    """The pids a run's processes logged, and the time of the first such event."""
    pids: list[int] = []
    first: float | None = None
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        value = data.metadata.get("pid") if data and data.metadata else None
        text = str(getattr(value, "value", value))
        if text.isdigit() and int(text) not in pids:
            pids.append(int(text))
            first = entry.timestamp if first is None else min(first, entry.timestamp)
    return pids, first


def process_alive(pid: int, started_before: float | None) -> bool:
    """True while `pid` is a live (not zombie) process that existed when the run logged it."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = process.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True  # another user's process with that pid: cannot tell, so never fail the run on a guess
    return started_before is None or created <= started_before + PID_REUSE_SLACK_SECONDS


def liveness(instance: dg.DagsterInstance, run: dg.DagsterRun) -> RunLiveness:
    pids, first = run_pids(instance, run.run_id)
    alive = [pid for pid in pids if process_alive(pid, first)]
    return RunLiveness(run.run_id, run.job_name, run.status.value, pids, alive)


def watched_runs(instance: dg.DagsterInstance) -> Iterable[dg.DagsterRun]:
    for record in instance.get_run_records(filters=dg.RunsFilter(statuses=WATCHED_STATUSES)):
        yield record.dagster_run


def storage_is_local(instance: dg.DagsterInstance) -> bool:
    """SQLite run storage lives under DAGSTER_HOME: every run in it ran on this machine."""
    return type(instance.run_storage).__name__.startswith("Sqlite")


@dataclasses.dataclass
class RecoveryReport:
    failed: list[RunLiveness] = dataclasses.field(default_factory=list)
    alive: list[RunLiveness] = dataclasses.field(default_factory=list)
    unknown: list[RunLiveness] = dataclasses.field(default_factory=list)
    freed_slots: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def recover_runs(instance: dg.DagsterInstance, dry_run: bool = False) -> RecoveryReport:
    """Fail the watched runs whose processes are all gone, then free the pool slots of every finished run."""
    report = RecoveryReport()
    for run in watched_runs(instance):
        state = liveness(instance, run)
        if state.dead:
            report.failed.append(state)
            if not dry_run:
                instance.report_run_failed(
                    run, f"mixsync recover on {socket.gethostname()}: no process of this run is alive any more "
                         f"(pids {', '.join(map(str, state.pids))}); marked failed and its pool slots freed")
        elif state.alive_pids:
            report.alive.append(state)
        else:
            report.unknown.append(state)
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        held: dict[str, list[str]] = {}
        for pool in storage.get_concurrency_keys():
            for slot in storage.get_concurrency_info(pool).claimed_slots:
                held.setdefault(slot.run_id, []).append(pool)
        run_ids = sorted(set(held) | set(storage.get_concurrency_run_ids()))
        if run_ids:
            # Runs failed just above are finished now: their slots go in the same pass.
            for record in instance.get_run_records(filters=dg.RunsFilter(run_ids=run_ids, statuses=FINISHED_STATUSES)):
                run_id = record.dagster_run.run_id
                if not dry_run:
                    storage.free_concurrency_slots_for_run(run_id)
                report.freed_slots[run_id] = held.get(run_id, [])
    return report


class LocalRunLauncher(DefaultRunLauncher):
    """Dagster's default run launcher, plus a worker health check for run monitoring: a run is FAILED once none of
    the processes it logged is alive on this machine. Runs with no pid logged yet count as RUNNING (the start
    timeout covers them)."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        if not storage_is_local(self._instance):
            # Run storage shared by several machines (Postgres): a run of another machine has no process here,
            # and must not be failed for it. Such runs count as running (run monitoring fails anything else); see the
            # README.
            return CheckRunHealthResult(WorkerStatus.RUNNING, "run storage is shared: liveness not judged here")
        state = liveness(self._instance, run)
        if state.dead:
            return CheckRunHealthResult(WorkerStatus.FAILED,
                                        f"no process of the run is alive (pids {', '.join(map(str, state.pids))})")
        return CheckRunHealthResult(WorkerStatus.RUNNING)
