"""Mixpanel export → the warehouse: mixsync's end-to-end path against DuckDB's own read_json of the same file
into the same backend, on a DuckDB file and on a DuckLake (catalog on a private Postgres, data in a folder).

Prints ratios measured side by side in one run. Each measurement runs in a fresh child process, so its
peak RSS (ru_maxrss) is its own. Usage:
python bench/bench_mixpanel.py [--events 1000000] [--small-events 250000] [--rounds 5] [--backends duckdb,ducklake]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
DAY = dt.date(2026, 1, 15)


def _lake_connection(lake: dict):
    """An in-memory DuckDB with the lake attached as mixsync attaches it (same extensions, same row groups)."""
    import duckdb

    from mixsync.warehouse.ducklake import PARQUET_ROW_GROUP_SIZE, load_extensions

    con = duckdb.connect()
    con.execute(f"SET temp_directory = '{tempfile.gettempdir()}/mixsync-duckdb-spill'")
    load_extensions(con)
    con.execute(f"ATTACH 'ducklake:postgres:{lake['catalog']}' AS lake (DATA_PATH '{lake['data_path']}')")
    con.execute("USE lake")
    con.execute(f"CALL lake.set_option('parquet_row_group_size', {PARQUET_ROW_GROUP_SIZE})")
    return con


def child_duckdb_read_json(path: str, db: str, extract: str, lake: dict | None = None) -> dict:
    """extract: "tuned" (the columns mixsync lands, as fast as DuckDB does them), "plain" (the same columns
    written the obvious way: one `->>` per field, default storage), "bare" (event and properties only) or
    "auto" (`SELECT *` with read_json's own schema detection: properties become a STRUCT)."""
    import duckdb

    con = _lake_connection(lake) if lake else duckdb.connect(db)
    # The same DuckDB settings as mixsync's loader (MIXSYNC_DUCKDB_MEMORY_LIMIT, threads), so only the path differs.
    con.execute(f"SET threads = 2; SET memory_limit = '{os.environ.get('MIXSYNC_DUCKDB_MEMORY_LIMIT', '256MB')}'; "
                "SET preserve_insertion_order = false")
    started = time.perf_counter()
    source = f"read_json('{path}', format='newline_delimited', columns={{event: 'VARCHAR', properties: 'JSON'}})"
    if extract == "plain":
        con.execute(f"""CREATE TABLE events AS
            SELECT event, properties->>'distinct_id' AS distinct_id,
                   epoch_ms(TRY_CAST(round(TRY_CAST(properties->>'time' AS DOUBLE)) AS BIGINT)) AS time,
                   properties->>'$."$insert_id"' AS insert_id, properties,
                   CAST(epoch_ms(TRY_CAST(round(TRY_CAST(properties->>'time' AS DOUBLE)) AS BIGINT)) AS DATE) AS day
            FROM {source}""")
    elif extract == "tuned":
        # As fast as DuckDB does it: the fields in one parse of `properties`, and `properties` stored with zstd,
        # the same two choices mixsync makes (each measured faster), so the ratio shows only the pipeline's cost.
        # (A lake has no compression clause: it compresses its Parquet itself, snappy by default, on both sides.)
        compression = "" if lake else " USING COMPRESSION zstd"
        con.execute(f"""CREATE TABLE events (event VARCHAR, distinct_id VARCHAR, time TIMESTAMPTZ, insert_id VARCHAR,
                                             properties JSON{compression}, day DATE)""")
        # The fields as text in that one parse (json_extract_string: json_extract would write each out as JSON for
        # `->>` to parse again), as mixsync pulls them.
        con.execute(f"""INSERT INTO events
            SELECT event, f[1], epoch_ms(TRY_CAST(round(TRY_CAST(f[3] AS DOUBLE)) AS BIGINT)), f[2],
                   properties, CAST(epoch_ms(TRY_CAST(round(TRY_CAST(f[3] AS DOUBLE)) AS BIGINT)) AS DATE)
            FROM (SELECT event, properties,
                         json_extract_string(properties, ['$.distinct_id', '$."$insert_id"', '$.time']) AS f FROM {source})""")
    elif extract == "auto":
        con.execute(f"CREATE TABLE events AS SELECT * FROM read_json('{path}')")
    else:
        con.execute(f"CREATE TABLE events AS SELECT * FROM {source}")
    rows = con.execute("SELECT count(*) FROM events").fetchone()[0]
    # Closed inside the clock, as mixsync's connection is inside its own: closing a DuckDB file checkpoints it
    # (the WAL written into the file), which a real load does too. Both sides do the same durable work.
    con.close()
    return {"seconds": time.perf_counter() - started, "rows": rows}


def child_mixsync(env: dict, db: str, landing: str, lake: dict | None = None) -> dict:
    os.environ.update(env)
    if lake:
        os.environ.update({"MIXSYNC_WAREHOUSE": "ducklake", "MIXSYNC_DUCKLAKE_CATALOG": lake["catalog"],
                           "MIXSYNC_DUCKLAKE_DATA_PATH": lake["data_path"]})
    else:
        os.environ.update({"MIXSYNC_WAREHOUSE": "duckdb", "MIXSYNC_DUCKDB_PATH": db})
    import logging

    import mixsync.mixpanel.sql as mixpanel_sql
    from mixsync.http import RetryPolicy
    from mixsync.mixpanel.assets import load_export_window
    from mixsync.mixpanel.client import MixpanelClient
    from mixsync.settings import MixpanelSettings, WarehouseSettings
    from mixsync.warehouse import open_warehouse

    settings = MixpanelSettings.from_env()
    store = open_warehouse(WarehouseSettings.from_env())
    setup_started = time.perf_counter()
    # Before the clock, as the baseline connects (a lake: extensions loaded, catalog attached) before its clock:
    # open the warehouse once and create mixsync's schema, which a warehouse has from its first run on (on a fresh
    # lake, ~60 DDL statements in one catalog commit, ~0.4 s quiet). Timed apart and printed, not in the ratio.
    with store.write():
        pass
    # Then connect once more, as a process does that attaches a warehouse which already has its schema: on a lake the
    # catalog read at attach (`USE lake`) is of the schema in place. Without it, the first statement in the clock
    # re-read the whole catalog that the set-up's own DDL commit had just changed (~45-70 ms for mixsync's ~60
    # objects, measured), a cost a warehouse pays once after a schema change, not per load; the baseline's catalog
    # is read at its attach before its clock too. (A file opens a new connection per write: nothing changes there.)
    with store.write():
        pass
    setup_seconds = time.perf_counter() - setup_started
    # In-process timers per phase: where mixsync's time goes beyond the baseline's.
    phases: dict[str, float] = {}

    def timed(name, function):
        def run(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - began
        return run

    mixpanel_sql._insert_rows = timed("insert", mixpanel_sql._insert_rows)
    mixpanel_sql._switch = timed("switch", mixpanel_sql._switch)  # in its own transaction on a file, in the insert's on a lake
    started = time.perf_counter()
    with MixpanelClient(settings, RetryPolicy.from_env()) as client:
        client.export_to_file = timed("download", client.export_to_file)
        loads, downloaded = load_export_window(client, store, settings, Path(landing), DAY, DAY,
                                               logging.getLogger("bench"))
    seconds = time.perf_counter() - started
    phases["other"] = seconds - sum(phases.values())  # opening the file or a lake cursor, the schema check, the load id
    return {"seconds": seconds, "rows": loads[0].events, "bytes": downloaded, "setup_seconds": setup_seconds,
            "phases": phases}


def run_child(kind: str, *args) -> dict:
    code = (f"import json, resource, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import bench_mixpanel as b; r = b.{kind}(*json.loads(sys.argv[1])); "
            "r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_seconds(runs: list[dict]) -> float:
    return statistics.median(r["seconds"] for r in runs)


def peak(runs: list[dict]) -> float:
    return max(r["peak_rss_mb"] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--small-events", type=int, default=250_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backends", default="duckdb,ducklake", help="comma-separated: duckdb, ducklake")
    parser.add_argument("--extra-references", action="store_true",
                        help="also time plain, bare and auto-detected read_json (DuckDB file only)")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mixsync.sandbox import Sandbox
    from mixsync.sandbox.data import Dataset, ensure_day_file
    from mixsync.sandbox.postgres import PostgresServer

    data_dir = OUT / "mixpanel-data"
    # The machine is shared: the load around the measurement goes with its figures.
    load_at_start = os.getloadavg()
    results: dict = {}
    databases = iter(range(1, 1_000_000))
    with contextlib.ExitStack() as stack:
        postgres = stack.enter_context(PostgresServer()) if "ducklake" in backends else None

        def fresh_lake(tmp: str) -> dict:
            n = next(databases)
            return {"catalog": postgres.create_database(f"bench_{n}"), "data_path": f"{tmp}/lake{n}"}

        for label, n in (("large", args.events), ("small", args.small_events)):
            dataset = Dataset(days=(DAY,), users=20_000, events_per_day=n)
            local_file = ensure_day_file(dataset, DAY, data_dir / "mixpanel")
            with Sandbox(dataset, data_dir=data_dir) as sandbox, tempfile.TemporaryDirectory() as tmp:
                env = {**sandbox.env(), **{k: v for k, v in os.environ.items() if k.startswith("MIXSYNC_DUCKDB")}}
                runs: dict[str, list[dict]] = {}
                rounds = args.rounds if label == "large" else 1
                for r in range(rounds):
                    # Alternating, so a busy moment on the shared machine falls on both sides alike.
                    for backend in backends:
                        lake = (lambda: fresh_lake(tmp)) if backend == "ducklake" else (lambda: None)
                        runs.setdefault(f"{backend} read_json", []).append(run_child(
                            "child_duckdb_read_json", str(local_file), f"{tmp}/a{r}.duckdb", "tuned", lake()))
                        runs.setdefault(f"{backend} mixsync", []).append(run_child(
                            "child_mixsync", env, f"{tmp}/m{r}.duckdb", f"{tmp}/landing", lake()))
                    if label == "large" and args.extra_references:
                        for extract in ("bare", "plain", "auto"):
                            runs.setdefault(f"duckdb read_json_{extract}", []).append(run_child(
                                "child_duckdb_read_json", str(local_file), f"{tmp}/{extract}{r}.duckdb", extract))
            results[label] = {"events": n, "gz_mb": round(local_file.stat().st_size / 2**20, 1), "runs": runs}

    large, small = results["large"]["runs"], results["small"]["runs"]
    print(f"events: {results['large']['events']:,} ({results['large']['gz_mb']} MB gzipped), rounds: {args.rounds}, "
          f"memory limit {os.environ.get('MIXSYNC_DUCKDB_MEMORY_LIMIT', '256MB')}")
    print("load average at the start: {:.2f} {:.2f} {:.2f}; at the end: {:.2f} {:.2f} {:.2f}".format(
        *load_at_start, *os.getloadavg()))
    print(f"{'backend':<9} {'read_json s':>11} {'mixsync s':>10} {'ratio':>6} {'read_json RSS':>14} {'mixsync RSS':>12} "
          f"{'mixsync RSS at ' + format(results['small']['events'], ','):>22}")
    for backend in backends:
        t_base, t_ours = median_seconds(large[f"{backend} read_json"]), median_seconds(large[f"{backend} mixsync"])
        print(f"{backend:<9} {t_base:>11.2f} {t_ours:>10.2f} {t_base / t_ours:>6.2f} "
              f"{peak(large[f'{backend} read_json']):>11.0f} MB {peak(large[f'{backend} mixsync']):>9.0f} MB "
              f"{peak(small[f'{backend} mixsync']):>19.0f} MB")
    print("ratio = read_json seconds / mixsync seconds, same backend (target >= 0.85); RSS target < 500 MB, flat")
    for backend in backends:
        # Each round's pair ran back to back: on a shared machine its ratio drifts less than the medians' ratio.
        paired = [b["seconds"] / m["seconds"]
                  for b, m in zip(large[f"{backend} read_json"], large[f"{backend} mixsync"], strict=True)]
        print(f"{backend}: each round's ratio {' '.join(f'{r:.2f}' for r in paired)}; median {statistics.median(paired):.2f}")
    for backend in backends:
        ours = large[f"{backend} mixsync"]
        medians = {name: statistics.median(r["phases"][name] for r in ours) for name in ours[0]["phases"]}
        print(f"{backend}: mixsync's phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items())
              + f"; warehouse set-up before the clock {statistics.median(r['setup_seconds'] for r in ours):.2f}"
              + f" (ratio with it counted: {median_seconds(large[f'{backend} read_json']) / statistics.median(r['seconds'] + r['setup_seconds'] for r in ours):.2f})"
              # What the ratio could at most be if mixsync's own steps cost nothing: a bound, not a measurement.
              + f"; ratio if the switch were free: {median_seconds(large[f'{backend} read_json']) / statistics.median(r['seconds'] - r['phases']['switch'] for r in ours):.2f}"
              + f", and the download too: {median_seconds(large[f'{backend} read_json']) / statistics.median(r['seconds'] - r['phases']['switch'] - r['phases']['download'] for r in ours):.2f}")
    for label in ("large", "small"):
        for key, runs in results[label]["runs"].items():
            print(f"{results[label]['events']:>9,} {key:<26} " + " ".join(f"{r['seconds']:.2f}" for r in runs)
                  + "  RSS " + " ".join(f"{r['peak_rss_mb']:.0f}" for r in runs))
    if args.extra_references:
        t_ours = median_seconds(large["duckdb mixsync"])
        for extract in ("plain", "bare", "auto"):
            t = median_seconds(large[f"duckdb read_json_{extract}"])
            print(f"duckdb: ratio against read_json {extract}: {t / t_ours:.2f} ({t:.2f} s)")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_mixpanel.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
