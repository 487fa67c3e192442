"""The `mixsync` command: sandbox, demo, query (and receive-impressions)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

import click

from mixsync.output import FORMATS, print_result
from mixsync.settings import SettingsError, WarehouseSettings

SANDBOX_PORTS = {"mixpanel": 8701, "split": 8702, "flagsmith": 8703}


@click.group()
def main() -> None:
    """Keep Mixpanel, Split and Flagsmith in sync through a local DuckDB warehouse."""


@main.command()
@click.argument("sql")
@click.option("--format", "output_format", type=click.Choice(FORMATS), default="table", show_default=True,
              help="table for people; csv or json (every row, every cell whole) for other programs.")
@click.option("--max-rows", default=None, type=int,
              help="Rows to print; 0 for all. Default: 50 for table, all for csv and json.")
@click.option("--full", is_flag=True, help="table: print every cell whole (cut at 60 characters otherwise).")
def query(sql: str, output_format: str, max_rows: int | None, full: bool) -> None:
    """Run a read-only SQL query against the warehouse (MIXSYNC_WAREHOUSE) and print the result (a table, CSV or JSON).

    It waits for a running write to finish instead of breaking it, and cannot change anything: no files read or
    written outside the warehouse, no other database attached, no extension installed.
    """
    import duckdb

    from mixsync.warehouse import WarehouseLockTimeout, open_warehouse

    if not sql.strip():
        raise click.ClickException("no SQL given: mixsync query 'SELECT ...' (with make: make query SQL='SELECT ...')")
    try:
        settings = WarehouseSettings.from_env()
        store = open_warehouse(settings)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        # A connection of its own: lock_down locks its configuration for good.
        with store.read(private=True) as con:
            lock_down(con, warehouse_data_directories(store))
            rows = max_rows if max_rows is not None else (50 if output_format == "table" else 0)
            cursor = con.execute(sql)
            if cursor is None or cursor.description is None:  # no statement (a comment alone), or no result
                raise click.ClickException("the SQL returned no result to print: give a query, e.g. SELECT ...")
            print_result(cursor, output_format, rows, full, echo=click.echo)
    except (FileNotFoundError, ConnectionError) as exc:
        raise click.ClickException(str(exc)) from None
    except WarehouseLockTimeout:
        raise click.ClickException(
            f"the warehouse is busy: another process kept it for MIXSYNC_LOCK_TIMEOUT_SECONDS="
            f"{settings.lock_timeout_seconds}s; try again, or raise MIXSYNC_LOCK_TIMEOUT_SECONDS") from None
    except duckdb.PermissionException as exc:
        raise click.ClickException(
            "mixsync query is read-only: it cannot read or write files, attach databases or install extensions "
            f"({' '.join(str(exc).split())})") from None
    except duckdb.Error as exc:
        raise click.ClickException(f"query failed: {' '.join(str(exc).split())}") from None


def warehouse_data_directories(store) -> list[str]:
    """The folders the warehouse's own data lives in, beyond the open database: a lake's Parquet files."""
    data_path = getattr(store, "data_path", None)
    if not data_path:
        return []
    if "://" not in data_path:
        data_path = os.path.abspath(data_path)
    return [data_path.rstrip("/") + "/"]


def lock_down(con, data_directories: list[str] | None = None) -> None:
    """No file, network or extension access from here on, and no SET that could turn it back on; only the
    warehouse's own data folders stay readable (a lake's Parquet files).

    Applied after the warehouse (and any catalog it attaches) is open, so only the query is constrained.
    """
    if data_directories:
        con.execute("SET allowed_directories = $directories", {"directories": data_directories})
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
# Fixed default ports, so the printed `export` lines stay valid across restarts; 0 picks a free port (the tests do).
@click.option("--mixpanel-port", default=SANDBOX_PORTS["mixpanel"], show_default=True, type=click.IntRange(0, 65535),
              envvar="MIXSYNC_SANDBOX_MIXPANEL_PORT", help="MIXSYNC_SANDBOX_MIXPANEL_PORT; 0 picks a free port.")
@click.option("--split-port", default=SANDBOX_PORTS["split"], show_default=True, type=click.IntRange(0, 65535),
              envvar="MIXSYNC_SANDBOX_SPLIT_PORT", help="MIXSYNC_SANDBOX_SPLIT_PORT; 0 picks a free port.")
@click.option("--flagsmith-port", default=SANDBOX_PORTS["flagsmith"], show_default=True, type=click.IntRange(0, 65535),
              envvar="MIXSYNC_SANDBOX_FLAGSMITH_PORT", help="MIXSYNC_SANDBOX_FLAGSMITH_PORT; 0 picks a free port.")
@click.option("--days", default=5, show_default=True, help="Days of data, ending yesterday.")
@click.option("--events-per-day", default=5000, show_default=True)
@click.option("--users", default=3000, show_default=True)
@click.option("--legacy-timezone", default=None, help="Emulate a legacy project storing local time in this zone.")
def sandbox(host: str, mixpanel_port: int, split_port: int, flagsmith_port: int, days: int, events_per_day: int, users: int,
            legacy_timezone: str | None) -> None:
    """Serve emulated Mixpanel (and Split, Flagsmith) on loopback until interrupted."""
    from mixsync.sandbox import Sandbox
    from mixsync.sandbox.data import Dataset

    dataset = Dataset.recent(days, users=users, events_per_day=events_per_day, malformed_per_day=2,
                             legacy_timezone=legacy_timezone)
    ports = {"mixpanel": mixpanel_port, "split": split_port, "flagsmith": flagsmith_port}
    try:
        running = Sandbox(dataset, host=host, ports=ports).start()
    except OSError as exc:
        raise click.ClickException(
            f"could not listen on {host} ports {ports}: {exc.strerror or exc}. Another sandbox may be running; pick "
            "other ports with --mixpanel-port/--split-port/--flagsmith-port (or MIXSYNC_SANDBOX_*_PORT), 0 for free ones"
        ) from None
    try:
        click.echo("# mixsync sandbox is serving; point mixsync at it with:")
        for name, value in running.env().items():
            click.echo(f"export {name}={value}")
        click.echo("# what each service received: GET <url>/_sandbox/requests. Ctrl-C stops.", err=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        running.stop()


@main.command()
@click.option("--workdir", default="data/demo", show_default=True, type=click.Path(path_type=Path),
              help="Where the demo's DuckDB file and landing files go (emptied first).")
@click.option("--days", default=5, show_default=True, help="Days of sandbox data.")
@click.option("--events-per-day", default=4000, show_default=True)
@click.option("--users", default=2000, show_default=True)
def demo(workdir: Path, days: int, events_per_day: int, users: int) -> None:
    """Run every flow against the sandbox through Dagster and print what landed.

    Its runs go to a Dagster instance of its own (<workdir>/dagster_home), never to $DAGSTER_HOME's.
    """
    from mixsync.demo import run_demo

    sys.exit(run_demo(workdir, days=days, events_per_day=events_per_day, users=users))


@main.command()
@click.option("--dry-run", is_flag=True, help="Only list what would be failed and freed.")
@click.option("--single-host", is_flag=True,
              help="With run storage shared by several machines (Postgres): confirm every run ran on this one.")
def recover(dry_run: bool, single_host: bool) -> None:
    """Fail this Dagster instance's runs whose processes are gone and free their pool slots.

    For use without the daemon (the daemon's run monitoring does the same by itself): after a run was killed
    (SIGKILL, OOM killer, reboot) the next run of its pool otherwise waits forever. Uses $DAGSTER_HOME.
    """
    import dagster as dg

    from mixsync.recovery import recover_runs, storage_is_local

    with dg.DagsterInstance.get() as instance:
        if not storage_is_local(instance) and not single_host:
            raise click.ClickException(
                "this instance's run storage is shared (not SQLite under DAGSTER_HOME): a run of another machine "
                "would look dead here. Let the daemon's run monitoring recover runs, or pass --single-host if "
                "every run ran on this machine")
        report = recover_runs(instance, dry_run=dry_run)
    verb = "would fail" if dry_run else "failed"
    for state in report.failed:
        click.echo(f"{verb} run {state.run_id} ({state.job_name}): no process alive (pids {state.pids})")
    for state in report.alive:
        click.echo(f"left run {state.run_id} ({state.job_name}): still running (pids {state.alive_pids})")
    for state in report.unknown:
        click.echo(f"left run {state.run_id} ({state.job_name}, {state.status}): no process logged yet")
    for run_id, pools in report.freed_slots.items():
        click.echo(f"{'would free' if dry_run else 'freed'} the pool slots of finished run {run_id}: "
                   f"{', '.join(pools) or 'pending claims only'}")
    if not (report.failed or report.alive or report.unknown or report.freed_slots):
        click.echo("nothing to recover: no run in progress, no slot held by a finished run")


@main.command("receive-impressions")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="MIXSYNC_RECEIVER_HOST",
              help="Interface to listen on (MIXSYNC_RECEIVER_HOST); 0.0.0.0 to accept Split from outside.")
@click.option("--port", default=8787, show_default=True, envvar="MIXSYNC_RECEIVER_PORT",
              help="Port to listen on (MIXSYNC_RECEIVER_PORT).")
def receive_impressions(host: str, port: int) -> None:
    """Receive Split's impressions webhook: each body lands durably in MIXSYNC_IMPRESSIONS_DIR before the 200.

    With MIXSYNC_WEBHOOK_TOKEN set, give Split the URL http(s)://<host>/impressions/<token>.
    """
    from mixsync.impressions.receiver import run
    from mixsync.impressions.settings import ImpressionsSettings

    try:
        run(host, port, ImpressionsSettings.from_env())
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("receive-cohorts")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="MIXSYNC_COHORT_RECEIVER_HOST",
              help="Interface to listen on (MIXSYNC_COHORT_RECEIVER_HOST); 0.0.0.0 to accept Mixpanel from outside.")
@click.option("--port", default=8788, show_default=True, envvar="MIXSYNC_COHORT_RECEIVER_PORT",
              help="Port to listen on (MIXSYNC_COHORT_RECEIVER_PORT).")
def receive_cohorts(host: str, port: int) -> None:
    """Receive Mixpanel's cohort-sync webhook on POST /cohorts (HTTP Basic auth): each body lands durably in
    MIXSYNC_COHORT_WEBHOOK_DIR before Mixpanel gets its answer; mixpanel_cohort_webhook_sensor applies them."""
    from mixsync.mixpanel.cohort_webhook import CohortWebhookSettings, run

    try:
        settings = CohortWebhookSettings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    run(host, port, settings)


if __name__ == "__main__":
    main()
