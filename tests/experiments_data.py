"""Hand-made warehouse rows for the experiments tests: impressions and Mixpanel events with known answers."""

from __future__ import annotations

import datetime as dt

import orjson

from mixsync.warehouse import Warehouse

T0 = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.UTC)


def load(store: Warehouse, impressions: list[tuple], events: list[tuple] = ()) -> None:
    """impressions: (environment_id, split, key, treatment, time); events: (event, distinct_id, time, properties)."""
    with store.write() as con:
        if impressions:
            env, split, key, treatment, time = (list(c) for c in zip(*impressions, strict=False))
            con.execute("""INSERT INTO split.impressions (impression_id, environment_id, environment_name, split, key,
                                                          treatment, time, file_name, load_id, loaded_at)
                           SELECT md5(concat_ws('/', e, s, k, t, ts::VARCHAR)), e, 'Env ' || e, s, k, t, ts, 'test.json',
                                  'test', now()
                           FROM (SELECT unnest($env) AS e, unnest($split) AS s, unnest($key) AS k,
                                        unnest($treatment) AS t, unnest($time) AS ts)""",
                        {"env": env, "split": split, "key": key, "treatment": treatment, "time": time})
        if events:
            name, distinct_id, time, props = (list(c) for c in zip(*events, strict=False))
            con.execute("""INSERT INTO mixpanel.event_rows (event, distinct_id, time, properties, day, loaded_at, load_id)
                           SELECT n, d, ts, p::JSON, (ts AT TIME ZONE 'UTC')::DATE, now(), 1
                           FROM (SELECT unnest($name) AS n, unnest($distinct_id) AS d, unnest($time) AS ts,
                                        unnest($props) AS p)""",
                        {"name": name, "distinct_id": distinct_id, "time": time,
                         "props": [orjson.dumps(p).decode() for p in props]})
            # Delete + insert: event_loads has no key (the schema is portable to DuckLake).
            con.execute("DELETE FROM mixpanel.event_loads WHERE day IN (SELECT day FROM mixpanel.event_rows)")
            con.execute("""INSERT INTO mixpanel.event_loads
                           SELECT DISTINCT day, 0, 0, 0, day, day, now(), 1 FROM mixpanel.event_rows""")


def write_experiments(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)
