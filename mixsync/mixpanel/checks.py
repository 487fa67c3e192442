"""Asset checks on the raw export: a day that loaded nothing, or far less than usual, is worth a look."""

import os

import dagster as dg
import duckdb

from mixsync.settings import parse_int

# Evaluated inside the mixpanel_events step (the asset declares it in check_specs), not as a step of its own: a second
# step is a second process that imports the code location again, about 2 s per run for a query of a few milliseconds
# (bench/bench_one_day.py).
DAILY_VOLUME = dg.AssetCheckSpec(
    "mixpanel_events_daily_volume", asset="mixpanel_events", blocking=False,
    description="Each of the last loaded days has events, and at least MIXSYNC_MIN_DAY_RATIO_PERCENT of the mean of "
                "the days loaded in the 7 calendar days before it (no such day: no comparison).")


def daily_volume_result(con: duckdb.DuckDBPyConnection) -> dg.AssetCheckResult:
    ratio = parse_int(os.environ, "MIXSYNC_MIN_DAY_RATIO_PERCENT", 20, minimum=0, maximum=100) / 100
    rows = con.execute("""
        WITH loads AS (
            SELECT day, events,
                   -- Calendar days, not the 7 previous rows: a day loaded after a gap is not measured against
                   -- days long past (a row window compared a new day with loads ten months old).
                   avg(events) OVER (ORDER BY day RANGE BETWEEN INTERVAL 7 DAY PRECEDING
                                                         AND INTERVAL 1 DAY PRECEDING) AS trailing_mean
            FROM mixpanel.event_loads)
        SELECT day, events, trailing_mean FROM loads ORDER BY day DESC LIMIT 7""").fetchall()
    low = [(day, events, mean) for day, events, mean in rows
           if events == 0 or (mean is not None and mean > 0 and events < ratio * mean)]
    return dg.AssetCheckResult(
        check_name=DAILY_VOLUME.name,
        passed=not low,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "days_checked": len(rows),
            "low_days": {str(day): {"events": events, "trailing_mean": round(mean or 0, 1)} for day, events, mean in low},
        },
    )
