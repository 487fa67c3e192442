"""Cohort → Flagsmith traits at 100,000 members: a first sync, then a sync after 1% churn, side by side.

Run: .venv/bin/python bench/bench_flagsmith.py [--members 100000] [--churn 0.01]
Everything runs against the sandbox on loopback (Mixpanel engage + Flagsmith core bulk route) through the
real Dagster assets and a fresh DuckDB file. Churn c means c × members membership changes: half of them
people leaving, half people joining.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixsync.sandbox import Sandbox
from mixsync.sandbox.data import Dataset, user_ids


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_chain(instance, resources, assets) -> dict[str, dict]:
    result = dg.materialize(assets, instance=instance, resources=resources,
                            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
    return {node: {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}
            for node in ("mixpanel_cohort_members", "flagsmith_cohort_traits")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--churn", type=float, default=0.01)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-flagsmith-"))
    dataset = Dataset.recent(1, users=300, events_per_day=10)
    with Sandbox(dataset, data_dir=workdir / "sandbox") as sandbox:
        query = sandbox.mixpanel.query
        query.cohorts.clear()
        population = user_ids(int(args.members * 1.05), seed=11)
        query.add_cohort("Bench Cohort", args.members, population, description="benchmark")
        os.environ.update(sandbox.env())
        os.environ.update({
            "MIXSYNC_DUCKDB_PATH": str(workdir / "mixsync.duckdb"),
            "MIXSYNC_LANDING_DIR": str(workdir / "landing"),
            "MIXPANEL_ENGAGE_PAGE_SIZE": "10000",
            "FLAGSMITH_VERIFY_SAMPLE": "100",
        })
        from mixsync.definitions import resources
        from mixsync.flagsmith.assets import flagsmith_cohort_traits
        from mixsync.mixpanel.cohort_assets import mixpanel_cohort_members, mixpanel_cohorts

        assets = [mixpanel_cohorts, mixpanel_cohort_members, flagsmith_cohort_traits]
        rows = []
        with dg.instance_for_test() as instance:
            for label in ("first sync", f"after {args.churn:.1%} churn"):
                if label != "first sync":
                    query.advance(leave=args.churn / 2, enter=args.churn / 2)
                writes_before = sum(sandbox.flagsmith.writes.values())
                requests_before = len(sandbox.flagsmith.recorder.requests)
                started = time.monotonic()
                meta = run_chain(instance, resources, assets)
                elapsed = time.monotonic() - started
                traits = meta["flagsmith_cohort_traits"]
                rows.append({
                    "run": label,
                    "members": meta["mixpanel_cohort_members"]["members_loaded"],
                    "entered": meta["mixpanel_cohort_members"]["entered"],
                    "left": meta["mixpanel_cohort_members"]["left"],
                    "trait_writes": traits["trait_writes"],
                    "flagsmith_applied": sum(sandbox.flagsmith.writes.values()) - writes_before,
                    "flagsmith_requests": len(sandbox.flagsmith.recorder.requests) - requests_before,
                    "members_s": meta["mixpanel_cohort_members"]["duration_seconds"],
                    "traits_s": traits["duration_seconds"],
                    "total_s": round(elapsed, 2),
                    "mismatches": traits["verify_mismatches"],
                })
    first, second = rows
    columns = list(first)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    ratio = second["trait_writes"] / first["trait_writes"]
    print(f"\nsecond/first trait writes: {ratio:.4%} (limit 1.1%): {'OK' if ratio <= 0.011 else 'TOO MANY'}")
    print(f"second/first Flagsmith requests: {second['flagsmith_requests'] / first['flagsmith_requests']:.2%}")
    print(f"second/first flagsmith_cohort_traits time: {second['traits_s'] / first['traits_s']:.2%}")
    print(f"peak RSS (this process, sandbox servers included): {peak_rss_mb():.0f} MB")
    return 0 if ratio <= 0.011 else 1


if __name__ == "__main__":
    raise SystemExit(main())
