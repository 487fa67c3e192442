"""One day of 100,000 events through the CLI, next to Dagster's own floor and DuckDB's load alone, side by side.

    mixsync      `dagster asset materialize -m mixsync.definitions --select mixpanel_events --partition DAY`
                 (the export from the sandbox, the load, the daily-volume check), on an instance with mixsync's
                 dagster.yaml (pools on)
    floor        the same command for a no-op daily-partitioned asset (bench/noop_partitioned.py), same instance setup,
                 with Dagster's default executor (a process per step) and, as "floor in process", with the
                 in_process executor mixsync's definitions use (the like-for-like floor)
    load         DuckDB's read_json of the same export file into the same columns (bench_mixpanel's "tuned" load)

Each is a fresh process, measured wall-clock, median of --rounds. Prints where the mixsync run's time went (the
run's steps from the instance's event log, and the code location's import time), then the overhead:
mixsync - (floor + load), with the target of 1.5 s. Usage: python bench/bench_one_day.py [--events 100000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
DAY = dt.date(2026, 1, 15)
TARGET_SECONDS = 1.5


def timed(cmd: list[str], env: dict, cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stderr + done.stdout


def fresh_home(root: Path, name: str) -> Path:
    home = root / name
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    return home


def step_breakdown(home: Path) -> dict:
    """Seconds per phase of the latest run in `home`: run start to end, and each step's start to end."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_runs(limit=1)[0]
        records = instance.all_logs(run.run_id)
    times: dict[str, float] = {}
    steps: dict[str, dict[str, float]] = {}
    for record in records:
        event = record.dagster_event
        if event is None:
            continue
        kind = event.event_type_value
        if kind in ("PIPELINE_START", "RUN_START", "PIPELINE_SUCCESS", "RUN_SUCCESS"):
            times[kind.replace("PIPELINE", "RUN")] = record.timestamp
        elif kind in ("STEP_START", "STEP_SUCCESS") and event.step_key:
            steps.setdefault(event.step_key, {})[kind] = record.timestamp
        elif kind == "STEP_WORKER_STARTING" and event.step_key:
            steps.setdefault(event.step_key, {})["WORKER"] = record.timestamp
    out = {"run_seconds": round(times.get("RUN_SUCCESS", 0) - times.get("RUN_START", 0), 2), "steps": {}}
    for key, t in steps.items():
        out["steps"][key] = {
            "worker_to_start": round(t.get("STEP_START", 0) - t.get("WORKER", t.get("STEP_START", 0)), 2),
            "start_to_success": round(t.get("STEP_SUCCESS", 0) - t.get("STEP_START", 0), 2),
        }
    return out


def import_seconds(module: str, env: dict) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(HERE))
    import bench_mixpanel

    from mixsync.sandbox import Sandbox
    from mixsync.sandbox.data import Dataset, ensure_day_file

    dagster = str(Path(sys.executable).with_name("dagster"))
    data_dir = OUT / "one-day-data"
    dataset = Dataset(days=(DAY,), users=20_000, events_per_day=args.events)
    local_file = ensure_day_file(dataset, DAY, data_dir / "mixpanel")
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("MIXPANEL_", "SPLIT_", "FLAGSMITH_", "MIXSYNC_", "DAGSTER_"))}
    base_env["MIXPANEL_START_DATE"] = "2026-01-01"
    runs: dict[str, list[float]] = {"floor": [], "floor in process": [], "mixsync": [], "load": []}
    breakdowns = []
    with Sandbox(dataset, data_dir=data_dir) as sandbox, tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        env = {**base_env, **sandbox.env()}
        for r in range(args.rounds):
            home = fresh_home(tmp, f"floor{r}")
            seconds, _ = timed([dagster, "asset", "materialize", "-f", str(HERE / "noop_partitioned.py"),
                                "--select", "noop_day", "--partition", DAY.isoformat()],
                               {**env, "DAGSTER_HOME": str(home)}, tmp)
            runs["floor"].append(seconds)

            home = fresh_home(tmp, f"floor-in-process{r}")
            seconds, _ = timed([dagster, "asset", "materialize", "-f", str(HERE / "noop_partitioned.py"),
                                "--select", "noop_day", "--partition", DAY.isoformat()],
                               {**env, "DAGSTER_HOME": str(home), "NOOP_IN_PROCESS": "1"}, tmp)
            runs["floor in process"].append(seconds)

            home = fresh_home(tmp, f"mixsync{r}")
            run_env = {**env, "DAGSTER_HOME": str(home), "MIXSYNC_DUCKDB_PATH": str(tmp / f"m{r}.duckdb"),
                       "MIXSYNC_LANDING_DIR": str(tmp / f"landing{r}")}
            seconds, _ = timed([dagster, "asset", "materialize", "-m", "mixsync.definitions",
                                "--select", "mixpanel_events", "--partition", DAY.isoformat()], run_env, tmp)
            runs["mixsync"].append(seconds)
            breakdowns.append(step_breakdown(home))

            load = bench_mixpanel.run_child("child_duckdb_read_json", str(local_file), str(tmp / f"l{r}.duckdb"),
                                            "tuned")
            runs["load"].append(load["seconds"])
        imports = {name: round(import_seconds(name, env), 2)
                   for name in ("dagster", "mixsync.definitions", "mixsync.mixpanel.assets")}

    med = {k: statistics.median(v) for k, v in runs.items()}
    overhead = med["mixsync"] - (med["floor"] + med["load"])
    print(f"one day of {args.events:,} events ({local_file.stat().st_size / 2**20:.1f} MB gzipped), "
          f"{args.rounds} rounds, median wall-clock seconds (each round: {json.dumps(runs)})")
    print(f"Dagster floor (no-op partitioned asset, CLI)   : {med['floor']:6.2f} s   (Dagster's default: a step process)")
    print(f"Dagster floor, step in the run's process        : {med['floor in process']:6.2f} s   (like mixsync's steps)")
    print(f"DuckDB load alone (read_json, same columns)     : {med['load']:6.2f} s")
    print(f"mixsync one-day CLI run (export, load, check)   : {med['mixsync']:6.2f} s")
    print(f"overhead = mixsync - (floor + load)             : {overhead:6.2f} s   (target <= {TARGET_SECONDS} s: "
          f"{'met' if overhead <= TARGET_SECONDS else 'NOT met'})")
    print(f"ratio mixsync / (floor + load)                  : {med['mixsync'] / (med['floor'] + med['load']):6.2f}")
    like = med["mixsync"] - (med["floor in process"] + med["load"])
    print(f"overhead against the in-process floor           : {like:6.2f} s   (target <= {TARGET_SECONDS} s: "
          f"{'met' if like <= TARGET_SECONDS else 'NOT met'})")
    print(f"import seconds (one process each)               : {imports}")
    print(f"mixsync run's steps (last round)                : {json.dumps(breakdowns[-1])}")


if __name__ == "__main__":
    main()
