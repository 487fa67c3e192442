"""Split impressions: webhook receiver throughput, and sensor -> split_impressions -> DuckDB throughput.

Prints ratios measured side by side in one run, with peak RSS. The receiver runs as its own process
(`mixsync receive-impressions`, fsync on every body) and is driven over loopback; each load measurement runs in
a fresh child process so its peak RSS is its own.
Usage: python bench/bench_impressions.py [--files 10000] [--per-file 100] [--bodies 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bench_receiver(work: Path, bodies: int, size: int) -> dict:
    import httpx

    from mixsync.sandbox.impressions import ImpressionGenerator, encode

    generator = ImpressionGenerator(seed=3, users=5000)
    payloads = [encode(generator.batch(size)) for _ in range(50)]
    landing = work / "receiver-landing"
    port = free_port()
    env = {**os.environ, "MIXSYNC_IMPRESSIONS_DIR": str(landing), "MIXSYNC_WEBHOOK_TOKEN": "bench-token-0123456789abcdef"}
    server = subprocess.Popen([PYTHON, "-m", "mixsync.cli", "receive-impressions", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/impressions/bench-token-0123456789abcdef"
    results = {}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the receiver did not start")
            time.sleep(0.05)
        with httpx.Client(timeout=30) as client:
            started = time.perf_counter()
            for n in range(bodies):
                body, headers = payloads[n % len(payloads)]
                assert client.post(url, content=body, headers=headers).status_code == 200
            results["sequential"] = bodies / (time.perf_counter() - started)

        async def concurrent(workers: int) -> float:
            limits = httpx.Limits(max_connections=workers)
            async with httpx.AsyncClient(timeout=30, limits=limits) as client:
                counter = iter(range(bodies))

                async def worker() -> None:
                    for n in counter:
                        body, headers = payloads[n % len(payloads)]
                        response = await client.post(url, content=body, headers=headers)
                        assert response.status_code == 200

                started = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(workers)))
                return bodies / (time.perf_counter() - started)

        for workers in (4, 16):
            results[f"concurrent_{workers}"] = asyncio.run(concurrent(workers))
        results["receiver_peak_rss_mb"] = peak_rss_mb(server.pid)
        results["files"] = len(os.listdir(landing))
    finally:
        server.terminate()
        server.wait(timeout=30)
    results["body_bytes_gzipped"] = sum(len(b) for b, _ in payloads) / len(payloads)
    results["impressions_per_body"] = size
    return results


def make_files(source: Path, files: int, per_file: int) -> float:
    from mixsync.sandbox.impressions import ImpressionGenerator, encode

    source.mkdir(parents=True)
    generator = ImpressionGenerator(seed=5, users=20_000)
    start_ms = int(time.time() * 1000) - files * 10_000
    started = time.perf_counter()
    for n in range(files):
        body, _ = encode(generator.batch(per_file, end_ms=start_ms + n * 10_000))
        (source / f"impressions-{n:06d}.json.gz").write_bytes(body)
    return time.perf_counter() - started


def child_sensor_load(source: str, work: str, batch_files: int, limit: int | None, per_file_runs: bool) -> dict:
    """Link the files into a fresh landing folder, then tick the sensor and materialize its runs until done."""
    import dagster as dg

    landing = Path(work) / "landing" / "impressions"
    landing.mkdir(parents=True)
    names = sorted(os.listdir(source))[:limit]
    for name in names:
        os.link(Path(source) / name, landing / name)
    os.environ.update({
        "MIXSYNC_DUCKDB_PATH": str(Path(work) / "bench.duckdb"),
        "MIXSYNC_LANDING_DIR": str(Path(work) / "landing"),
        "MIXSYNC_IMPRESSIONS_DIR": str(landing),
        "MIXSYNC_IMPRESSIONS_SETTLE_SECONDS": "0",
        "MIXSYNC_IMPRESSIONS_BATCH_FILES": str(1 if per_file_runs else batch_files),
        "MIXSYNC_IMPRESSIONS_MAX_RUNS_PER_TICK": "1000",
    })
    from mixsync.definitions import resources
    from mixsync.impressions.assets import split_impressions
    from mixsync.impressions.sensors import split_impression_files_sensor
    from mixsync.warehouse import Warehouse

    quiet = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
    ticks, runs, tick_seconds, first_tick = 0, 0, 0.0, None
    cursor = None
    started = time.perf_counter()
    with dg.instance_for_test() as instance:
        while True:
            t = time.perf_counter()
            result = split_impression_files_sensor(dg.build_sensor_context(instance=instance, cursor=cursor))
            elapsed = time.perf_counter() - t
            first_tick = elapsed if first_tick is None else first_tick
            tick_seconds += elapsed
            ticks += 1
            cursor = result.cursor
            if not result.run_requests:
                break
            for request in result.run_requests:
                outcome = dg.materialize([split_impressions], instance=instance, resources=resources,
                                         run_config={**request.run_config, **quiet})
                assert outcome.success
                runs += 1
    seconds = time.perf_counter() - started
    with Warehouse(Path(work) / "bench.duckdb").read() as con:
        rows = con.execute("SELECT count(*) FROM split.impressions").fetchone()[0]
    return {"files": len(names), "rows": rows, "runs": runs, "ticks": ticks, "seconds": seconds,
            "first_tick_seconds": first_tick, "tick_seconds": tick_seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child_tick_only(source: str, work: str, in_flight: bool) -> dict:
    """One sensor tick over every file: all new (they are stat'ed in batches) or all already requested."""
    import dagster as dg

    from mixsync.impressions.sensors import CursorState, split_impression_files_sensor

    os.environ.update({"MIXSYNC_IMPRESSIONS_DIR": source, "MIXSYNC_IMPRESSIONS_SETTLE_SECONDS": "1",
                       "MIXSYNC_IMPRESSIONS_BATCH_FILES": "500", "MIXSYNC_IMPRESSIONS_MAX_RUNS_PER_TICK": "10"})
    cursor = None
    if in_flight:
        cursor = CursorState(1, {e.name: e.inode() for e in os.scandir(source)}).encode()
    with dg.instance_for_test() as instance:
        started = time.perf_counter()
        result = split_impression_files_sensor(dg.build_sensor_context(instance=instance, cursor=cursor))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "runs_requested": len(result.run_requests or []), "cursor_bytes": len(result.cursor or "")}


def run_child(function: str, *args) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_impressions as b; "
            f"print(json.dumps(b.{function}(*json.loads(sys.argv[1]))))")
    output = subprocess.run([PYTHON, "-c", code, json.dumps(args)], capture_output=True, text=True, check=False)
    if output.returncode:
        raise RuntimeError(output.stderr[-3000:])
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--per-file", type=int, default=100)
    parser.add_argument("--bodies", type=int, default=2000)
    parser.add_argument("--body-size", type=int, default=150)
    args = parser.parse_args()
    OUT.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-impressions-", dir=OUT))
    report: dict = {"args": vars(args)}
    try:
        print(f"receiver: {args.bodies} gzipped bodies of {args.body_size} impressions, fsync per body", flush=True)
        rec = bench_receiver(work, args.bodies, args.body_size)
        report["receiver"] = rec
        print(f"  sequential        {rec['sequential']:8.0f} bodies/s  ({rec['sequential'] * args.body_size:9.0f} impressions/s)")
        for workers in (4, 16):
            rate = rec[f"concurrent_{workers}"]
            print(f"  {workers:2d} concurrent     {rate:8.0f} bodies/s  ({rate * args.body_size:9.0f} impressions/s)  "
                  f"x{rate / rec['sequential']:.2f} of sequential")
        print(f"  receiver peak RSS {rec['receiver_peak_rss_mb']:.0f} MB; {rec['files']} files landed; "
              f"{rec['body_bytes_gzipped']:.0f} bytes per body")

        source = work / "source"
        made = make_files(source, args.files, args.per_file)
        print(f"\nsensor -> DuckDB: {args.files} files of {args.per_file} impressions (made in {made:.1f}s)", flush=True)
        for in_flight in (False, True):
            tick = run_child("child_tick_only", str(source), str(work / f"tick-{in_flight}"), in_flight)
            report[f"tick_{'in_flight' if in_flight else 'new'}"] = tick
            print(f"  one tick, {args.files} files {'all in flight' if in_flight else 'all new      '}: "
                  f"{tick['seconds'] * 1000:7.1f} ms, {tick['runs_requested']} runs requested, "
                  f"cursor {tick['cursor_bytes']} bytes")
        loads = {}
        for batch in (500, 2000):
            result = run_child("child_sensor_load", str(source), str(work / f"load-{batch}"), batch, None, False)
            loads[batch] = result
            print(f"  batch bound {batch:5d}: {result['runs']:3d} runs, {result['seconds']:6.1f} s, "
                  f"{result['files'] / result['seconds']:6.0f} files/s, {result['rows'] / result['seconds']:8.0f} "
                  f"impressions/s, ticks {result['tick_seconds'] * 1000:.0f} ms in all, peak RSS {result['peak_rss_mb']:.0f} MB")
            assert result["rows"] == args.files * args.per_file, result
        report["loads"] = loads
        sample = min(50, args.files)
        per_file = run_child("child_sensor_load", str(source), str(work / "per-file"), 1, sample, True)
        batched = run_child("child_sensor_load", str(source), str(work / "per-file-batched"), 500, sample, False)
        report["per_file_vs_batched"] = {"per_file": per_file, "batched": batched}
        print(f"  {sample} files, a run per file (what a partition per file costs): {per_file['seconds']:.1f} s; "
              f"one batched run: {batched['seconds']:.2f} s -> batching x{per_file['seconds'] / batched['seconds']:.0f} faster")
        (OUT / "bench_impressions.json").write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
