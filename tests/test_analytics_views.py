"""The `analytics` schema: the views people ask for first, each defined next to the SQL of the flow it reads."""

from __future__ import annotations

import datetime as dt

from experiments_data import T0, load

import mixsync.definitions  # noqa: F401  (every flow registers its tables and views)
from mixsync.warehouse import Warehouse


def test_the_analytics_views_answer_from_the_flows_tables(tmp_path):
    store = Warehouse(tmp_path / "w.duckdb")
    day2 = T0 + dt.timedelta(days=1)
    load(store,
         impressions=[("e1", "checkout", "u1", "on", T0), ("e1", "checkout", "u2", "off", T0),
                      ("e1", "checkout", "u1", "on", T0 + dt.timedelta(minutes=5)), ("e1", "checkout", "u3", "on", day2)],
         events=[("Signed up", "u1", T0, {}), ("Signed up", "u2", T0, {}), ("Purchase", "u1", T0, {}),
                 ("Purchase", "u1", day2, {})])
    with store.write() as con:
        con.execute("""INSERT INTO sync.split_events (id, scope, payload, status, enqueued_at, sent_at)
                       VALUES ('a', '2026-01-05', '{}', 'sent', now(), now()), ('b', '2026-01-05', '{}', 'pending', now(), NULL),
                              ('c', '2026-01-05', '{}', 'rejected', now(), NULL), ('d', '2026-01-06', '{}', 'sent', now(), now())""")
        con.execute("""INSERT INTO mixpanel.cohorts (id, name, loaded_at) VALUES (7, 'Power users', now())""")
        con.execute("""INSERT INTO mixpanel.cohort_members (cohort_id, distinct_id, entered_at, snapshot_id)
                       VALUES (7, 'u1', now(), 1), (7, 'u2', now(), 1)""")
    with store.read() as con:
        assert con.execute("SELECT day::VARCHAR, event, events, people FROM analytics.events_per_day ORDER BY ALL"
                           ).fetchall() == [("2026-01-05", "Purchase", 1, 1), ("2026-01-05", "Signed up", 2, 2),
                                            ("2026-01-06", "Purchase", 1, 1)]
        assert con.execute("SELECT day::VARCHAR, events, sent, pending, rejected FROM analytics.split_push_per_day "
                           "ORDER BY day").fetchall() == [("2026-01-05", 3, 1, 1, 1), ("2026-01-06", 1, 1, 0, 0)]
        assert con.execute("SELECT cohort_name, distinct_id FROM analytics.cohort_membership ORDER BY ALL"
                           ).fetchall() == [("Power users", "u1"), ("Power users", "u2")]
        assert con.execute("SELECT day::VARCHAR, split, treatment, exposures, users FROM analytics.exposures_per_day "
                           "ORDER BY ALL").fetchall() == [("2026-01-05", "checkout", "off", 1, 1),
                                                          ("2026-01-05", "checkout", "on", 2, 1),
                                                          ("2026-01-06", "checkout", "on", 1, 1)]


def test_a_view_left_by_an_older_version_is_replaced_by_the_current_definition(tmp_path):
    """Upgrading mixsync updates its views in an existing warehouse (they are created OR REPLACED, not IF NOT EXISTS)."""
    store = Warehouse(tmp_path / "w.duckdb")
    with store.write() as con:
        con.execute("CREATE OR REPLACE VIEW analytics.events_per_day AS SELECT 'stale' AS definition")
        # An older mixsync recorded the digest of its own DDL: this version's differs, so it applies its DDL.
        con.execute("UPDATE sync.warehouse_schema SET ddl_sha256 = 'the DDL digest of an older mixsync'")
    with store.write():
        pass
    with store.read() as con:
        columns = [d[0] for d in con.execute("SELECT * FROM analytics.events_per_day").description]
    assert columns[:2] == ["day", "event"], columns
