"""The Mixpanel → Split mapping: the mapping file's validation, and the SQL on real DuckDB rows."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson
import pytest

from mixsync.split.mapping import (
    EVENT_TYPE_ID,
    MAX_PROPERTIES,
    MAX_PROPERTIES_BYTES,
    Mapping,
    MappingError,
    TrafficTypeRule,
    load_mapping,
    parse_mapping,
)
from mixsync.split.sql import EVENTS_OUTBOX, stage_window
from mixsync.warehouse import Warehouse

DAY = dt.date(2026, 3, 10)
NOON = dt.datetime(2026, 3, 10, 12, 0, tzinfo=dt.UTC)
NOW = dt.datetime(2026, 3, 11, 8, 0, tzinfo=dt.UTC)
EXAMPLE = Path(__file__).resolve().parents[1] / "mixsync" / "split" / "mapping.example.yaml"


# ---------------------------------------------------------------- the mapping file

def test_no_file_means_every_event_to_the_default_traffic_type():
    mapping = load_mapping(None, "account")
    assert mapping.include == ("*",) and mapping.exclude == ()
    assert mapping.traffic_types == (TrafficTypeRule("account", "distinct_id"),)
    assert not mapping.filters_properties and mapping.max_age_days is None


def test_example_file_is_valid_and_documented():
    mapping = load_mapping(EXAMPLE)
    assert mapping.renames["購入完了"] == "purchase_completed"
    assert [t.name for t in mapping.traffic_types] == ["user", "account"]
    assert mapping.traffic_types[1].key == "properties.account_id"
    assert mapping.value_properties == ("revenue", "price")


@pytest.mark.parametrize("text, line, fragment", [
    ("events:\n  include: [Purchase]\n  exlude: [x]\n", 3, "unknown setting events.exlude"),
    ("events:\n  rename:\n    Purchase: 'has space'\n", 3, "not a valid Split eventTypeId"),
    ("events:\n  rename:\n    Purchase: '$purchase'\n", 3, "not a valid Split eventTypeId"),
    ("events:\n  rename:\n    Purchase: " + "x" * 64 + "\n", 3, "not a valid Split eventTypeId"),
    ("traffic_types:\n  - name: User\n", 2, "lowercase"),
    ("traffic_types:\n  - name: user\n    key: email\n", 3, "use distinct_id or properties.<name>"),
    ("traffic_types:\n  - name: user\n  - name: user\n", 3, "listed twice"),
    ("traffic_types: []\n", 1, "non-empty list"),
    ("properties:\n  drop_dollar: maybe\n", 2, "true or false"),
    ("timestamps:\n  max_age_days: -3\n", 2, "whole number"),
    ("value:\n  properties: {a: 1}\n", 2, "list of strings"),
    ("events: [a, b]\n", 1, "must be a mapping"),
    ("events:\n  include: [Purchase\n", 3, "not valid YAML"),
    ("events:\n  include: ['Sign [Up']\n", 2, "unbalanced"),
])
def test_bad_mapping_files_name_the_line(text, line, fragment):
    with pytest.raises(MappingError) as error:
        parse_mapping(text, "mapping.yaml")
    assert f"mapping.yaml, line {line}" in str(error.value)
    assert fragment in str(error.value)


def test_missing_mapping_file_names_the_setting(tmp_path):
    with pytest.raises(MappingError, match=r"SPLIT_MAPPING_FILE=.*no such file"):
        load_mapping(tmp_path / "nope.yaml")


# ---------------------------------------------------------------- the SQL, on a real DuckDB file

@pytest.fixture
def store(tmp_path) -> Warehouse:
    return Warehouse(tmp_path / "mapping.duckdb", lock_timeout_seconds=30)


def load_events(store: Warehouse, events: list[dict]) -> None:
    rows = [[e["event"], e.get("distinct_id"), e.get("time", NOON), e.get("insert_id", f"id-{n}"),
             orjson.dumps(e.get("properties", {})).decode(), DAY] for n, e in enumerate(events)]
    with store.write() as con:
        # A hand-made load 0 of DAY: its rows, and the ledger row that makes them mixpanel.events.
        con.executemany("""INSERT INTO mixpanel.event_rows (event, distinct_id, time, insert_id, properties, day, loaded_at, load_id)
                           VALUES (?, ?, ?, ?, ?, ?, now(), 0)""", rows)
        # Delete + insert: event_loads has no key (the schema is portable to DuckLake).
        con.execute("DELETE FROM mixpanel.event_loads WHERE day = ?", [DAY])
        con.execute("""INSERT INTO mixpanel.event_loads VALUES (?, ?, 0, 0, ?, ?, now(), 0)""",
                    [DAY, len(rows), DAY, DAY])


def run(store: Warehouse, mapping: Mapping, environment: str | None = None, now: dt.datetime = NOW):
    with store.write() as con:
        staged = stage_window(con, mapping, DAY, DAY, environment, now)
        payloads = [orjson.loads(p) for (p,) in con.execute(f"SELECT payload FROM {EVENTS_OUTBOX} ORDER BY id").fetchall()]
        rejects = con.execute("SELECT event, reason FROM split.events_rejected ORDER BY event").fetchall()
        renames = dict(con.execute("SELECT event, event_type_id FROM split.event_renames").fetchall())
    return staged, payloads, rejects, renames


def by_event(payloads: list[dict]) -> dict[str, dict]:
    return {p["eventTypeId"]: p for p in payloads}


def test_event_names_become_valid_event_type_ids_and_every_rename_is_recorded(store):
    long_name = "A very long event name that goes on and on past eighty characters to test the limits of Split"
    names = ["Purchase", "$mp_web_page_view", "Sign Up", "Añadir al carrito", "checkout:step 2 (payment)",
             "🚀 Launched rocket", long_name, "購入完了", "$", "ok.name-1_x"]
    load_events(store, [{"event": n, "distinct_id": "u-1"} for n in names])
    staged, payloads, rejects, renames = run(store, Mapping())
    ids = {p["eventTypeId"] for p in payloads}
    assert all(EVENT_TYPE_ID.match(i) for i in ids)
    assert {"Purchase", "mp_web_page_view", "Sign_Up", "Anadir_al_carrito", "checkout_step_2_payment",
            "Launched_rocket", "ok.name-1_x"} <= ids
    truncated = renames[long_name]
    assert len(truncated) == 63 and truncated.startswith("A_very_long_event_name")
    # Valid names are not renames; the rest are recorded, unusable ones with no target.
    assert "Purchase" not in renames and "ok.name-1_x" not in renames
    assert renames["$mp_web_page_view"] == "mp_web_page_view" and renames["購入完了"] is None
    assert sorted(rejects) == [("$", "event name has no character Split accepts: add a rename to the mapping file"),
                               ("購入完了", "event name has no character Split accepts: add a rename to the mapping file")]
    assert staged.mapped == 8 and staged.rejected == 2 and len(staged.renames) == 8


def test_a_rename_in_the_mapping_file_wins(store):
    load_events(store, [{"event": "購入完了", "distinct_id": "u-1"}, {"event": "Sign Up", "distinct_id": "u-1"}])
    _, payloads, rejects, renames = run(store, parse_mapping("events:\n  rename:\n    購入完了: purchase_completed\n"))
    assert {p["eventTypeId"] for p in payloads} == {"purchase_completed", "Sign_Up"}
    assert rejects == [] and renames == {"購入完了": "purchase_completed", "Sign Up": "Sign_Up"}


def test_nested_properties_flatten_to_dotted_keys_and_arrays_become_json_strings(store):
    properties = {"plan": "pro", "cart": {"total": 12.5, "coupon": None, "items": [{"sku": "A", "n": 2}],
                                          "shipping": {"address": {"city": "Zürich", "geo": {"lat": 47.37}}}},
                  "tags": ["beta", "ünïcode", 3, None], "big": 9007199254740993, "flag": True,
                  "$browser": "Chrome", "payload": '{"nested": "json in a string"}'}
    load_events(store, [{"event": "Purchase", "distinct_id": "u-1", "properties": properties}])
    _, payloads, _, _ = run(store, Mapping())
    props = payloads[0]["properties"]
    assert props == {"plan": "pro", "cart.total": 12.5, "cart.coupon": None, "cart.items": '[{"sku":"A","n":2}]',
                     "cart.shipping.address.city": "Zürich", "cart.shipping.address.geo.lat": 47.37,
                     "tags": '["beta","ünïcode",3,null]', "big": 9007199254740993, "flag": True,
                     "$browser": "Chrome", "payload": '{"nested": "json in a string"}'}
    assert not any(isinstance(v, (dict, list)) for v in props.values())


def test_flat_events_pass_through_untouched_by_the_list_work(store):
    properties = {"plan": "pro", "n": 3, "big": 9007199254740993, "$city": "東京", "ok": False, "none": None}
    load_events(store, [{"event": "Viewed Page", "distinct_id": "u-1", "properties": properties}])
    _, payloads, _, _ = run(store, Mapping())
    assert payloads[0]["properties"] == properties


def test_property_rules_drop_dollar_include_and_exclude(store):
    properties = {"$browser": "Chrome", "$insert_id": "x", "plan": "pro", "cart": {"total": 3, "secret": "s"},
                  "mp_lib": "web", "other": 1}
    load_events(store, [{"event": "Purchase", "distinct_id": "u-1", "properties": properties}])
    mapping = parse_mapping("properties:\n  drop_dollar: true\n  include: [plan, cart, mp_*]\n"
                            "  exclude: [cart.secret, mp_lib]\n")
    _, payloads, _, _ = run(store, mapping)
    assert payloads[0]["properties"] == {"plan": "pro", "cart.total": 3}


@pytest.mark.parametrize("raw, expected", [
    ("49.90", 49.9), (" 12 ", 12.0), ("1e3", 1000.0), (12, 12.0), (-3.5, -3.5), ("free", None), (True, None),
    (None, None), ({"amount": 3}, None), ("NaN", None), ("Infinity", None), ("", None),
])
def test_value_takes_numbers_and_numeric_strings_only(store, raw, expected):
    load_events(store, [{"event": "Purchase", "distinct_id": "u-1", "properties": {"price": raw}}])
    _, payloads, _, _ = run(store, parse_mapping("value:\n  properties: [price]\n"))
    assert payloads[0]["value"] == expected


def test_value_candidates_and_per_event_overrides(store):
    load_events(store, [
        {"event": "Purchase", "distinct_id": "u-1", "properties": {"revenue": "oops", "price": "7", "amount": 99}},
        {"event": "Refund", "distinct_id": "u-1", "properties": {"price": "7", "amount": 99}},
        {"event": "Viewed", "distinct_id": "u-1", "properties": {"cart": {"total": "5.5"}}},
    ])
    mapping = parse_mapping("value:\n  properties: [revenue, price, cart.total]\n  by_event:\n    Refund: [amount]\n")
    _, payloads, _, _ = run(store, mapping)
    values = {p["eventTypeId"]: p["value"] for p in payloads}
    assert values == {"Purchase": 7.0, "Refund": 99.0, "Viewed": 5.5}


def test_missing_or_unusable_keys_are_rejected_with_the_reason(store):
    load_events(store, [
        {"event": "A", "distinct_id": None}, {"event": "B", "distinct_id": ""},
        {"event": "C", "distinct_id": "x" * 251}, {"event": "D", "distinct_id": "x" * 250},
    ])
    staged, payloads, rejects, _ = run(store, Mapping())
    assert [p["eventTypeId"] for p in payloads] == ["D"]
    assert rejects == [("A", "missing key (distinct_id)"), ("B", "missing key (distinct_id)"),
                       ("C", "key longer than 250 characters")]
    assert staged.rejects_by_reason == {"key longer than 250 characters": 1, "missing key (distinct_id)": 2}


def test_a_property_can_be_the_key_of_another_traffic_type(store):
    load_events(store, [
        {"event": "Purchase", "distinct_id": "u-1", "properties": {"account_id": 4217}},
        {"event": "Purchase", "distinct_id": "u-2", "properties": {}},
        {"event": "Viewed", "distinct_id": "u-3", "properties": {"account_id": "acme"}},
    ])
    mapping = parse_mapping("traffic_types:\n  - name: user\n  - name: account\n    key: properties.account_id\n"
                            "    events:\n      include: [Purchase]\n")
    _, payloads, rejects, _ = run(store, mapping)
    sent = sorted((p["trafficTypeName"], p["key"], p["eventTypeId"]) for p in payloads)
    assert sent == [("account", "4217", "Purchase"), ("user", "u-1", "Purchase"), ("user", "u-2", "Purchase"),
                    ("user", "u-3", "Viewed")]
    assert rejects == [("Purchase", "missing key (properties.account_id)")]


def test_timestamps_are_the_true_instant_in_ms_and_future_or_too_old_events_are_rejected(store):
    load_events(store, [
        {"event": "Now", "distinct_id": "u-1", "time": dt.datetime(2026, 3, 10, 23, 59, 59, 123000, tzinfo=dt.UTC)},
        {"event": "Future", "distinct_id": "u-1", "time": NOW + dt.timedelta(minutes=5)},
        {"event": "Old", "distinct_id": "u-1", "time": NOW - dt.timedelta(days=40)},
    ])
    _, payloads, rejects, _ = run(store, Mapping())
    old_ms = int((NOW - dt.timedelta(days=40)).timestamp() * 1000)
    assert {p["eventTypeId"]: p["timestamp"] for p in payloads} == {"Now": 1773187199123, "Old": old_ms}
    assert rejects == [("Future", "timestamp in the future")]
    _, payloads, rejects, _ = run(store, parse_mapping("timestamps:\n  max_age_days: 30\n"))
    assert sorted(rejects) == [("Future", "timestamp in the future"), ("Old", "older than timestamps.max_age_days")]


def test_event_selection_by_name_and_pattern(store):
    load_events(store, [{"event": n, "distinct_id": "u-1"} for n in
                        ["Purchase", "$identify", "$mp_click", "Viewed Page", "Viewed Cart", "Sign Up"]])
    mapping = parse_mapping("events:\n  include: ['Viewed *', Purchase, '$*']\n  exclude: ['$identify', 'Viewed C?rt']\n")
    staged, payloads, _, _ = run(store, mapping)
    assert sorted(p["eventTypeId"] for p in payloads) == ["Purchase", "Viewed_Page", "mp_click"]
    assert staged.not_selected == 3 and staged.considered == 6


def test_properties_are_trimmed_to_splits_limits_deterministically(store):
    many = {f"p{n:03d}": n for n in range(350)}
    huge = {f"k{n}": "x" * 2000 for n in range(20)}  # 2 bytes a character: 20 x ~4 KB
    load_events(store, [{"event": "Many", "distinct_id": "u-1", "properties": many},
                        {"event": "Huge", "distinct_id": "u-1", "properties": huge},
                        {"event": "Small", "distinct_id": "u-1", "properties": {"a": 1}}])
    staged, payloads, _, _ = run(store, Mapping())
    events = by_event(payloads)
    assert list(events["Many"]["properties"]) == [f"p{n:03d}" for n in range(MAX_PROPERTIES)]
    kept = events["Huge"]["properties"]
    size = sum(2 * len(k) + 2 * len(v) for k, v in kept.items())
    assert size <= MAX_PROPERTIES_BYTES and len(kept) == 8 and list(kept) == sorted(kept)
    assert staged.properties_trimmed == 2


def test_environment_name_is_added_when_configured(store):
    load_events(store, [{"event": "Purchase", "distinct_id": "u-1"}])
    _, payloads, _, _ = run(store, Mapping(), environment="Production")
    assert payloads[0]["environmentName"] == "Production"
    assert set(payloads[0]) == {"eventTypeId", "trafficTypeName", "key", "timestamp", "value", "properties",
                                "environmentName"}


def test_restaging_enqueues_nothing_new_and_refreshes_only_pending_payloads(store):
    load_events(store, [{"event": "Purchase", "distinct_id": "u-1", "properties": {"a": 1}},
                        {"event": "Viewed", "distinct_id": "u-1"}])
    first, _, _, _ = run(store, Mapping())
    assert first.enqueued == 2
    with store.write() as con:
        con.execute(f"UPDATE {EVENTS_OUTBOX} SET status = 'sent' WHERE payload LIKE '%Purchase%'")
    again, payloads, _, _ = run(store, parse_mapping("properties:\n  exclude: [a]\n"))
    assert again.enqueued == 0 and again.already_sent == 1 and again.pending_before == 1
    # The sent event keeps what was sent; a pending one takes the current mapping (nothing to refresh here).
    assert by_event(payloads)["Purchase"]["properties"] == {"a": 1}
    narrowed, _, _, _ = run(store, parse_mapping("events:\n  include: [Purchase]\n"))
    assert narrowed.withdrawn == 1
    with store.read() as con:
        assert con.execute(f"SELECT count(*) FROM {EVENTS_OUTBOX}").fetchone()[0] == 1
