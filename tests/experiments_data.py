"""Hand-made warehouse rows for the experiments tests: impressions and Mixpanel events with known answers."""

from __future__ import annotations

import datetime as dt

import orjson

from mixsync.warehouse import Warehouse

T0 = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.UTC)


def load(store: Warehouse, impressions: list[tuple], events: list[tuple] = ()) -> None:
    """impressions: (environment_id, split, key, treatment, time); events: (event, distinct_id, time, properties).

    The rows go in as one JSON document that DuckDB parses: binding Python lists makes DuckDB convert every value
    (and try to import pandas for each one), which took most of a minute for the demo's 100,000 rows.
    """
    with store.write() as con:
        if impressions:
            rows = [{"e": e, "s": s, "k": k, "t": t, "ts": ts} for e, s, k, t, ts in impressions]
            con.execute("""INSERT INTO split.impressions (impression_id, environment_id, environment_name, split, key,
                                                          treatment, time, file_name, load_id, loaded_at)
                           SELECT md5(concat_ws('/', e, s, k, t, ts::VARCHAR)), e, 'Env ' || e, s, k, t, ts, 'test.json',
                                  'test', now()
                           FROM (SELECT unnest(from_json($rows, '[{"e": "VARCHAR", "s": "VARCHAR", "k": "VARCHAR",
                                                                  "t": "VARCHAR", "ts": "TIMESTAMPTZ"}]'),
                                               recursive := true))""",
                        {"rows": orjson.dumps(rows).decode()})
        if events:
            rows = [{"n": n, "d": d, "ts": ts, "p": p} for n, d, ts, p in events]
            con.execute("""INSERT INTO mixpanel.event_rows (event, distinct_id, time, properties, day, loaded_at, load_id)
                           SELECT n, d, ts, p, (ts AT TIME ZONE 'UTC')::DATE, now(), 1
                           FROM (SELECT unnest(from_json($rows, '[{"n": "VARCHAR", "d": "VARCHAR", "ts": "TIMESTAMPTZ",
                                                                  "p": "JSON"}]'), recursive := true))""",
                        {"rows": orjson.dumps(rows).decode()})
            # Delete + insert: event_loads has no key (the schema is portable to DuckLake).
            con.execute("DELETE FROM mixpanel.event_loads WHERE day IN (SELECT day FROM mixpanel.event_rows)")
            con.execute("""INSERT INTO mixpanel.event_loads
                           SELECT DISTINCT day, 0, 0, 0, day, day, now(), 1 FROM mixpanel.event_rows""")


def write_experiments(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)
