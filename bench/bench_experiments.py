"""experiment_results on 1,000,000 exposures and 10,000,000 events in their windows, against the floor: a plain DuckDB
GROUP BY of the same events.

The data is generated in DuckDB SQL straight into a warehouse file (cached under bench/out/). Each measurement runs in
a fresh child process, alternating, so its peak RSS (VmHWM) is its own; both use mixsync's DuckDB settings
(memory_limit 256MB, 2 threads). Timed: the materialization (experiment_results through dg.materialize on an ephemeral
instance created just before: exposures, per-user metrics, statistics, the three tables, the charts; the instance's
creation is printed apart) against
  floor (count):        SELECT distinct_id, count(*) FROM mixpanel.events WHERE event = 'Purchase' GROUP BY 1
  floor (count + sum):  the same, plus sum(TRY_CAST(properties->>'$.amount' AS DOUBLE)): the per-user aggregates the
                        three configured metrics need, with the same one JSON read of `amount` per event.
Each side also reports the CPU time its process spent over the same interval (all threads): less disturbed by a busy
machine than the wall time, which is what the target is about.
Usage: python bench/bench_experiments.py [--exposures 1000000] [--events 10000000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
PYTHON = sys.executable
WINDOW_DAYS = 7
EXPERIMENTS = f"""experiments:
  - split: bench_checkout
    control: "off"
    window_days: {WINDOW_DAYS}
    metrics:
      - {{name: purchased, event: Purchase, type: conversion}}
      - {{name: purchases, event: Purchase, type: count}}
      - {{name: revenue, event: Purchase, type: sum, property: amount}}
"""


def generate(path: Path, exposures: int, events: int) -> None:
    """Impressions (each exposed key once or twice) and `events` Purchase events inside their keys' windows."""
    import mixsync.experiments.sql  # noqa: F401  (registers the tables it reads: split.impressions, mixpanel.events)
    from mixsync.warehouse import Warehouse

    tmp = path.with_name(path.name + ".partial")
    tmp.unlink(missing_ok=True)
    started = time.monotonic()
    with Warehouse(tmp, memory_limit="1GB").write() as con:
        params = {"exposures": exposures, "events": events, "window_s": WINDOW_DAYS * 86400}
        # Key k is first exposed at T0 + k * 0.1 s (about a day for a million keys); a fifth see the split again.
        con.execute("""
            INSERT INTO split.impressions (impression_id, environment_id, environment_name, split, key, treatment, time,
                                           file_name, load_id, loaded_at)
            SELECT md5(k::VARCHAR || '/' || r), 'prod', 'Production', 'bench_checkout', 'user-' || k,
                   CASE WHEN hash(k) % 2 = 0 THEN 'on' ELSE 'off' END,
                   TIMESTAMPTZ '2026-01-01 00:00:00+00' + to_milliseconds(k * 100 + r * 3600000), 'bench.json', 'bench', now()
            FROM range($exposures) t(k), range(2) s(r)
            WHERE r = 0 OR hash(k) % 5 = 0""", {"exposures": exposures})
        # Each event: a random exposed key, a time inside its window, a Purchase with an amount (a few without).
        con.execute("""
            INSERT INTO mixpanel.event_rows (event, distinct_id, time, insert_id, mp_processing_time_ms, properties, day,
                                             loaded_at, load_id)
            SELECT 'Purchase', 'user-' || k, t, md5(i::VARCHAR), epoch_ms(t) + 1000,
                   CASE WHEN i % 100 = 0 THEN json_object('currency', 'EUR')
                        ELSE json_object('amount', round((hash(i * 7) % 10000) / 100.0, 2), 'currency', 'EUR',
                                         'mp_lib', 'web', '$browser', 'Chrome', '$city', 'Berlin') END,
                   (t AT TIME ZONE 'UTC')::DATE, now(), 1
            FROM (SELECT i, hash(i) % $exposures AS k,
                         TIMESTAMPTZ '2026-01-01 00:00:00+00'
                           + to_milliseconds((hash(i) % $exposures) * 100 + (hash(i * 3) % ($window_s * 1000 - 1))) AS t
                  FROM range($events) r(i))""", params)
        con.execute("""INSERT INTO mixpanel.event_loads
                       SELECT day, count(*), 0, 0, day, day, now(), 1 FROM mixpanel.event_rows GROUP BY day""")
    os.replace(tmp, path)
    print(f"generated {exposures:,} exposures and {events:,} events in {time.monotonic() - started:.0f} s "
          f"({path.stat().st_size / 1e6:.0f} MB)", flush=True)


CHILD_ASSET = """
import json, os, sys, time, warnings
import dagster as dg
warnings.filterwarnings("ignore")
from mixsync.definitions import resources
from mixsync.experiments.assets import experiment_results
# The instance exists before the run, as a deployment's does: its creation (Dagster importing its storage
# modules) is process start-up, timed apart.
started = time.monotonic()
instance = dg.DagsterInstance.ephemeral()
instance_seconds = time.monotonic() - started
started, cpu = time.monotonic(), time.process_time()
result = dg.materialize([experiment_results], resources=resources, instance=instance,
                        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
seconds, cpu = time.monotonic() - started, time.process_time() - cpu
meta = result.asset_materializations_for_node("experiment_results")[0].metadata
print(json.dumps({"seconds": seconds, "cpu": cpu, "instance_seconds": instance_seconds,
                  "exposures": meta["exposures"].value}))
"""

CHILD_FLOOR = """
import json, sys, time
import duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
con.execute("SET memory_limit = '256MB'; SET threads = 2; SET preserve_insertion_order = false")
aggregates = "count(*)" + (", sum(TRY_CAST(properties->>'$.amount' AS DOUBLE))" if sys.argv[2] == "sum" else "")
started, cpu = time.monotonic(), time.process_time()
con.execute(f"CREATE TEMP TABLE per_user AS SELECT distinct_id, {aggregates} FROM mixpanel.events "
            "WHERE event = 'Purchase' GROUP BY distinct_id")
seconds, cpu = time.monotonic() - started, time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu": cpu, "users": con.execute("SELECT count(*) FROM per_user").fetchone()[0]}))
"""


def run_child(code: str, args: list[str], env: dict) -> dict:
    process = subprocess.Popen([PYTHON, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    peak = 0.0
    while process.poll() is None:
        try:
            for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.05)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"child failed ({process.returncode}):\n{stderr[-3000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exposures", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    warehouse = OUT / f"experiments-{args.exposures}-{args.events}.duckdb"
    if not warehouse.exists():
        generate(warehouse, args.exposures, args.events)
    experiments = OUT / "bench_experiments.yaml"
    experiments.write_text(EXPERIMENTS)
    env = {**os.environ, "MIXSYNC_DUCKDB_PATH": str(warehouse), "MIXSYNC_EXPERIMENTS_FILE": str(experiments),
           "MIXSYNC_EXPERIMENTS_CHART_DIR": str(OUT / "experiment_charts"), "MIXSYNC_DUCKDB_MEMORY_LIMIT": "256MB",
           "MIXSYNC_DUCKDB_THREADS": "2", "MIXPANEL_START_DATE": "2025-12-01"}
    runs: dict[str, list[dict]] = {"experiment_results": [], "floor (count)": [], "floor (count + sum)": []}
    for round_number in range(args.rounds):
        for name, code, extra in (("floor (count)", CHILD_FLOOR, [str(warehouse), "count"]),
                                  ("experiment_results", CHILD_ASSET, []),
                                  ("floor (count + sum)", CHILD_FLOOR, [str(warehouse), "sum"])):
            result = run_child(code, extra, env)
            runs[name].append(result)
            instance = (f"  (+{result['instance_seconds']:.2f} s creating the Dagster instance)"
                        if "instance_seconds" in result else "")
            print(f"round {round_number + 1} {name:20} {result['seconds']:7.2f} s  CPU {result['cpu']:6.2f} s  "
                  f"peak RSS {result['peak_rss_mb']:5.0f} MB  (load average {os.getloadavg()[0]:.1f}){instance}",
                  flush=True)
    best = {name: min(r["seconds"] for r in results) for name, results in runs.items()}
    peak = {name: max(r["peak_rss_mb"] for r in results) for name, results in runs.items()}
    cpu = {name: min(r["cpu"] for r in results) for name, results in runs.items()}
    print(f"\n{args.exposures:,} exposures, {args.events:,} events in the window; best of {args.rounds} rounds")
    for name in runs:
        print(f"  {name:20} {best[name]:7.2f} s  CPU {cpu[name]:6.2f} s  peak RSS {peak[name]:5.0f} MB")
    for floor in ("floor (count)", "floor (count + sum)"):
        print(f"  experiment_results / {floor}: {best['experiment_results'] / best[floor]:.2f}x (target <= 3x); "
              f"CPU time {cpu['experiment_results'] / cpu[floor]:.2f}x")
    with_instance = min(r["seconds"] + r["instance_seconds"] for r in runs["experiment_results"])
    print(f"  experiment_results with the Dagster instance's creation: {with_instance:.2f} s, "
          f"{with_instance / best['floor (count + sum)']:.2f}x floor (count + sum)")
    print(f"  experiment_results peak RSS: {peak['experiment_results']:.0f} MB (target < 600 MB)")


if __name__ == "__main__":
    main()
