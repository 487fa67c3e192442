"""Split push benchmark: mixsync's outbox push vs a plain httpx client posting the same batches to the same sandbox.

    .venv/bin/python bench/bench_split.py [--events 1000000] [--rounds 2]

Setup (cached under bench/out/split/): a day of 1M+ synthetic Mixpanel events is generated, loaded into DuckDB
and mapped into the sync.split_events outbox (timed: that is the mapping's throughput). Then, alternately, in
fresh processes against one emulated Split server in its own process:
  plain  — httpx.Client, 4 threads, POSTing the pre-built request bodies (same batches, same bytes) from a file;
  mixsync — mixsync.warehouse.outbox.push with the Split client: snapshot, batches, journal, acknowledgements.
Each side reports wall time, CPU time and its own peak RSS. The ratio is mixsync events/s over plain events/s.
A second server that counts bodies without validating them shows the clients' own cost, with the sandbox's
Python validation out of the way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "split"
DAY = dt.date(2026, 5, 1)
CONCURRENCY = 4
BATCH = 1000


def peak_rss_mb() -> float:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- the server process

def serve(validate: bool) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from mixsync.sandbox.split import SplitSandbox, build_app

    state = SplitSandbox(keep_events=False)
    if validate:
        app = build_app(state)
    else:
        counted = {"accepted": 0, "bulk_requests": 0, "trimmed_events": 0}

        async def sink(request):
            body = await request.body()
            counted["accepted"] += body.count(b'"eventTypeId"')
            counted["bulk_requests"] += 1
            return Response(status_code=202)

        async def stats(request):
            return Response(json.dumps(counted), media_type="application/json")

        app = Starlette(routes=[Route("/api/events/bulk", sink, methods=["POST"]),
                                Route("/_sandbox/split/stats", stats, methods=["GET"])])
    from mixsync.sandbox.server import free_socket

    sock = free_socket()
    print(json.dumps({"url": f"http://127.0.0.1:{sock.getsockname()[1]}", "sdk_key": state.sdk_key}), flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")).run(sockets=[sock])


# ---------------------------------------------------------------- the two clients (each in its own process)

def run_plain(url: str, sdk_key: str, bodies_path: Path) -> dict:
    import httpx

    started_cpu, started = cpu_seconds(), time.perf_counter()
    lock = threading.Lock()
    sent = 0
    with open(bodies_path, "rb") as bodies, httpx.Client(
            headers={"Authorization": f"Bearer {sdk_key}", "Content-Type": "application/json"},
            limits=httpx.Limits(max_connections=CONCURRENCY + 2), timeout=60) as client:

        def next_body() -> tuple[bytes, int] | None:
            with lock:
                header = bodies.readline()
                if not header:
                    return None
                size, count = map(int, header.split())
                return bodies.read(size), count

        def worker() -> None:
            nonlocal sent
            while (item := next_body()) is not None:
                response = client.post(f"{url}/api/events/bulk", content=item[0])
                if response.status_code != 202:
                    raise RuntimeError(f"plain client got HTTP {response.status_code}: {response.text[:200]}")
                with lock:
                    sent += item[1]

        threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"events": sent, "seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - started_cpu,
            "peak_rss_mb": peak_rss_mb()}


def run_mixsync(url: str, sdk_key: str, duckdb_path: Path, work_dir: Path) -> dict:
    import logging

    from mixsync.http import RetryPolicy, RetryStats
    from mixsync.progress import CountProgress, reporting_sends
    from mixsync.settings import Secret
    from mixsync.split.assets import batch_sender
    from mixsync.split.client import SplitEventsClient
    from mixsync.split.settings import SplitSettings
    from mixsync.split.sql import EVENTS_OUTBOX
    from mixsync.warehouse import Warehouse
    from mixsync.warehouse.outbox import push

    settings = SplitSettings(sdk_key=Secret(sdk_key), events_url=url, traffic_type="user", environment=None,
                             mapping_file=None, batch_size=BATCH, max_batch_bytes=2 << 20, concurrency=CONCURRENCY)
    store = Warehouse(duckdb_path)
    # Imports (Dagster comes with mixsync.split.assets) are done above: the clock measures the push alone.
    started_cpu, started = cpu_seconds(), time.perf_counter()
    stats = RetryStats()
    with SplitEventsClient(settings, RetryPolicy.from_env(), stats) as client:
        # As the asset pushes (split_events): its days' scopes, progress reported per batch, at most once (each
        # batch journaled in flight, on disk, before it is sent).
        with store.read() as con:
            pending = con.execute(f"SELECT count(*) FROM {EVENTS_OUTBOX} WHERE status = 'pending'").fetchone()[0]
        progress = CountProgress(logging.getLogger("bench_split"), "push to Split", pending, "events", batched=True)
        report = push(store, EVENTS_OUTBOX, reporting_sends(batch_sender(client), progress), work_dir,
                      scopes=[DAY.isoformat()], max_items=BATCH, max_bytes=settings.max_batch_bytes,
                      concurrency=CONCURRENCY, logger=logging.getLogger("bench_split"), at_most_once=True)
    return {"events": report.sent, "batches": report.batches, "retries": stats.retries,
            "seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - started_cpu,
            "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------- setup and orchestration

def prepare(events: int) -> tuple[Path, Path, dict]:
    """A DuckDB file whose outbox holds exactly `events` pending Split events, and their pre-built bodies."""
    from mixsync.mixpanel.sql import load_export_file
    from mixsync.sandbox.data import Dataset, ensure_day_file
    from mixsync.split.mapping import parse_mapping
    from mixsync.split.sql import EVENTS_OUTBOX, stage_window
    from mixsync.warehouse import Warehouse
    from mixsync.warehouse.outbox import _batches

    OUT.mkdir(parents=True, exist_ok=True)
    duckdb_path = OUT / f"split-{events}.duckdb"
    bodies_path = OUT / f"bodies-{events}.bin"
    figures: dict = {}
    store = Warehouse(duckdb_path, memory_limit="1GB")
    if not duckdb_path.exists():
        # ~0.6% of the generated events have no usable key or name: generate a few more than asked.
        dataset = Dataset(days=(DAY,), users=50_000, events_per_day=int(events * 1.01) + 100)
        started = time.perf_counter()
        export = ensure_day_file(dataset, DAY, OUT)
        figures["generate_seconds"] = round(time.perf_counter() - started, 1)
        with store.write() as con:
            started = time.perf_counter()
            load_export_file(con, export, DAY, DAY)
            figures["load_seconds"] = round(time.perf_counter() - started, 1)
    with store.write() as con:
        con.execute(f"DELETE FROM {EVENTS_OUTBOX}")
        mapping = parse_mapping("events:\n  rename:\n    購入完了: purchase_completed\n"
                                "value:\n  properties: [price]\n", "bench mapping")
        started = time.perf_counter()
        staged = stage_window(con, mapping, DAY, DAY, None, dt.datetime.now(dt.UTC))
        figures["map_seconds"] = round(time.perf_counter() - started, 2)
        figures["mapped"] = staged.mapped
        figures["map_events_per_second"] = round(staged.considered / figures["map_seconds"])
        con.execute(f"""DELETE FROM {EVENTS_OUTBOX} WHERE id NOT IN
                        (SELECT id FROM {EVENTS_OUTBOX} ORDER BY id LIMIT {events})""")
        assert con.execute(f"SELECT count(*) FROM {EVENTS_OUTBOX}").fetchone()[0] == events
        snapshot = OUT / "bodies.snapshot"  # the outbox's own snapshot format, so the batches are the same
        con.execute(f"COPY (SELECT payload FROM {EVENTS_OUTBOX} ORDER BY id) TO '{snapshot}' "
                    "(FORMAT csv, HEADER false, QUOTE '', ESCAPE '')")
    with open(bodies_path, "wb") as out:
        for _, count, body in _batches(snapshot, BATCH, 2 << 20, bodies=True):
            out.write(f"{len(body)} {count}\n".encode() + body)
    snapshot.unlink()
    return duckdb_path, bodies_path, figures


def start_server(validate: bool) -> tuple[subprocess.Popen, dict]:
    server = subprocess.Popen([sys.executable, __file__, "--serve", "validate" if validate else "count"],
                              stdout=subprocess.PIPE, text=True)
    info = json.loads(server.stdout.readline())
    deadline = time.monotonic() + 30
    while True:  # the port is bound before uvicorn listens on it
        try:
            server_stats(info["url"])
            return server, info
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def server_stats(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/_sandbox/split/stats").json()


def child(side: str, server: dict, duckdb_path: Path, bodies_path: Path) -> dict:
    if side == "mixsync":
        from mixsync.split.sql import EVENTS_OUTBOX
        from mixsync.warehouse import Warehouse

        with Warehouse(duckdb_path).write() as con:
            con.execute(f"UPDATE {EVENTS_OUTBOX} SET status = 'pending', sent_at = NULL")
    before = server_stats(server["url"])["accepted"]
    out = subprocess.run([sys.executable, __file__, "--side", side, server["url"], server["sdk_key"],
                          str(duckdb_path), str(bodies_path)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["server_accepted"] = server_stats(server["url"])["accepted"] - before
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    duckdb_path, bodies_path, figures = prepare(args.events)
    print(f"setup: {json.dumps(figures)}")
    # The machine is shared: the load around the measurement goes with its figures.
    print("load average at the start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    for validate in (True, False):
        label = "sandbox (validating every event)" if validate else "counting sink (no validation)"
        server_process, server = start_server(validate)
        try:
            runs: dict[str, list[dict]] = {"plain": [], "mixsync": []}
            for _ in range(args.rounds):
                for side in ("plain", "mixsync"):
                    result = child(side, server, duckdb_path, bodies_path)
                    assert result["events"] == result["server_accepted"] == args.events, result
                    runs[side].append(result)
        finally:
            server_process.terminate()
            server_process.wait()
        rate = {side: statistics.median(args.events / r["seconds"] for r in rs) for side, rs in runs.items()}
        print(f"\n{label}: {args.events:,} events, batches of {BATCH}, {CONCURRENCY} concurrent requests, "
              f"median of {args.rounds}")
        print(f"{'side':<8} {'events/s':>10} {'wall s':>8} {'client CPU s':>13} {'peak RSS MB':>12}")
        for side, rs in runs.items():
            print(f"{side:<8} {rate[side]:>10,.0f} {statistics.median(r['seconds'] for r in rs):>8.2f} "
                  f"{statistics.median(r['cpu_seconds'] for r in rs):>13.2f} {max(r['peak_rss_mb'] for r in rs):>12.0f}")
        target = 0.9 if validate else 0.5  # issue 10's targets, with the in-doubt bookkeeping included
        per_million = 1e6 / args.events
        cpu = {side: statistics.median(r["cpu_seconds"] for r in rs) * per_million for side, rs in runs.items()}
        print(f"ratio mixsync/plain: {rate['mixsync'] / rate['plain']:.2f}  (target >= {target}); client CPU-s per "
              f"million events: mixsync {cpu['mixsync']:.2f}, plain {cpu['plain']:.2f}; peak RSS target < 400 MB")
    print("\nload average at the end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"total bench time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2] == "validate")
    elif len(sys.argv) > 1 and sys.argv[1] == "--side":
        side, url, key, duckdb_path, bodies_path = sys.argv[2:7]
        work_dir = Path(duckdb_path).parent / "outbox-work"
        result = (run_plain(url, key, Path(bodies_path)) if side == "plain"
                  else run_mixsync(url, key, Path(duckdb_path), work_dir))
        print(json.dumps(result))
    else:
        main()
