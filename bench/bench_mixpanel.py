"""Mixpanel export → DuckDB: mixsync's end-to-end path against DuckDB's own read_json of the same file.

Prints ratios measured side by side in one run. Each measurement runs in a fresh child process, so its
peak RSS (ru_maxrss) is its own. Usage: python bench/bench_mixpanel.py [--events 1000000] [--rounds 5]
"""

from __future__ import annotations

import argparse
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


def child_duckdb_read_json(path: str, db: str, extract: str) -> dict:
    """extract: "tuned" (the columns mixsync lands, as fast as DuckDB does them), "plain" (the same columns
    written the obvious way: one `->>` per field, default storage), "bare" (event and properties only) or
    "auto" (`SELECT *` with read_json's own schema detection: properties become a STRUCT)."""
    import duckdb

    con = duckdb.connect(db)
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
        con.execute("""CREATE TABLE events (event VARCHAR, distinct_id VARCHAR, time TIMESTAMPTZ, insert_id VARCHAR,
                                            properties JSON USING COMPRESSION zstd, day DATE)""")
        con.execute(f"""INSERT INTO events
            SELECT event, f[1]->>'$', epoch_ms(TRY_CAST(round(TRY_CAST(f[3]->>'$' AS DOUBLE)) AS BIGINT)), f[2]->>'$',
                   properties, CAST(epoch_ms(TRY_CAST(round(TRY_CAST(f[3]->>'$' AS DOUBLE)) AS BIGINT)) AS DATE)
            FROM (SELECT event, properties,
                         json_extract(properties, ['$.distinct_id', '$."$insert_id"', '$.time']) AS f FROM {source})""")
    elif extract == "auto":
        con.execute(f"CREATE TABLE events AS SELECT * FROM read_json('{path}')")
    else:
        con.execute(f"CREATE TABLE events AS SELECT * FROM {source}")
    rows = con.execute("SELECT count(*) FROM events").fetchone()[0]
    return {"seconds": time.perf_counter() - started, "rows": rows}


def child_mixsync(env: dict, db: str, landing: str) -> dict:
    os.environ.update(env)
    import logging

    from mixsync.http import RetryPolicy
    from mixsync.mixpanel.assets import load_export_window
    from mixsync.mixpanel.client import MixpanelClient
    from mixsync.settings import MixpanelSettings, WarehouseSettings
    from mixsync.warehouse import Warehouse

    settings = MixpanelSettings.from_env()
    ws = WarehouseSettings.from_env()
    store = Warehouse(db, memory_limit=ws.memory_limit, threads=ws.threads)
    started = time.perf_counter()
    with MixpanelClient(settings, RetryPolicy.from_env()) as client:
        loads, downloaded = load_export_window(client, store, settings, Path(landing), DAY, DAY,
                                               logging.getLogger("bench"))
    return {"seconds": time.perf_counter() - started, "rows": loads[0].events, "bytes": downloaded}


def run_child(kind: str, *args) -> dict:
    code = (f"import json, resource, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import bench_mixpanel as b; r = b.{kind}(*json.loads(sys.argv[1])); "
            "r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--small-events", type=int, default=250_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mixsync.sandbox import Sandbox
    from mixsync.sandbox.data import Dataset, ensure_day_file

    data_dir = OUT / "mixpanel-data"
    results = {}
    for label, n in (("large", args.events), ("small", args.small_events)):
        dataset = Dataset(days=(DAY,), users=20_000, events_per_day=n)
        local_file = ensure_day_file(dataset, DAY, data_dir / "mixpanel")
        with Sandbox(dataset, data_dir=data_dir) as sandbox, tempfile.TemporaryDirectory() as tmp:
            env = {**sandbox.env(), **{k: v for k, v in os.environ.items() if k.startswith("MIXSYNC_DUCKDB")}}
            runs: dict[str, list[dict]] = {"read_json": [], "read_json_plain": [], "read_json_bare": [],
                                           "read_json_auto": [], "mixsync": []}
            rounds = args.rounds if label == "large" else 1
            for r in range(rounds):
                runs["read_json"].append(run_child("child_duckdb_read_json", str(local_file), f"{tmp}/a{r}.duckdb", "tuned"))
                runs["mixsync"].append(run_child("child_mixsync", env, f"{tmp}/m{r}.duckdb", f"{tmp}/landing"))
                if label == "large":
                    runs["read_json_bare"].append(run_child("child_duckdb_read_json", str(local_file), f"{tmp}/b{r}.duckdb", "bare"))
                    runs["read_json_plain"].append(run_child("child_duckdb_read_json", str(local_file), f"{tmp}/p{r}.duckdb", "plain"))
                    runs["read_json_auto"].append(run_child("child_duckdb_read_json", str(local_file), f"{tmp}/x{r}.duckdb", "auto"))
        results[label] = {"events": n, "gz_mb": round(local_file.stat().st_size / 2**20, 1), "runs": runs}

    large = results["large"]["runs"]
    t_base = statistics.median(r["seconds"] for r in large["read_json"])
    t_bare = statistics.median(r["seconds"] for r in large["read_json_bare"])
    t_plain = statistics.median(r["seconds"] for r in large["read_json_plain"])
    t_auto = statistics.median(r["seconds"] for r in large["read_json_auto"])
    t_ours = statistics.median(r["seconds"] for r in large["mixsync"])
    rows = large["mixsync"][0]["rows"]
    print(f"events: {results['large']['events']:,} ({results['large']['gz_mb']} MB gzipped), rounds: {args.rounds}")
    print(f"DuckDB read_json, same columns, tuned       : {t_base:6.2f} s  {rows / t_base:>10,.0f} ev/s  "
          f"peak RSS {max(r['peak_rss_mb'] for r in large['read_json']):.0f} MB")
    print(f"DuckDB read_json, same columns, plain SQL   : {t_plain:6.2f} s")
    print(f"DuckDB read_json, bare (event, properties)  : {t_bare:6.2f} s")
    print(f"DuckDB read_json, auto-detected (SELECT *)  : {t_auto:6.2f} s")
    print(f"mixsync export over HTTP → mixpanel.events  : {t_ours:6.2f} s  {rows / t_ours:>10,.0f} ev/s  "
          f"peak RSS {max(r['peak_rss_mb'] for r in large['mixsync']):.0f} MB")
    print(f"ratio (mixsync throughput / read_json same columns, tuned): {t_base / t_ours:.2f}   (target >= 0.7)")
    print(f"ratio (mixsync throughput / read_json same columns, plain): {t_plain / t_ours:.2f}")
    print(f"ratio (mixsync throughput / read_json bare)               : {t_bare / t_ours:.2f}")
    print(f"ratio (mixsync throughput / read_json auto-detected)      : {t_auto / t_ours:.2f}")
    small = results["small"]["runs"]["mixsync"][0]
    print(f"peak RSS, {results['small']['events']:,} events: {small['peak_rss_mb']:.0f} MB; "
          f"{results['large']['events']:,} events: {max(r['peak_rss_mb'] for r in large['mixsync']):.0f} MB "
          "(target < 600 MB, flat)")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_mixpanel.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
