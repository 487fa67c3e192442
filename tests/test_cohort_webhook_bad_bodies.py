"""Mixpanel cohort webhook bodies that must never block the others: the receiver refuses what the loader could not
store or would read another way, and the loader skips (or quarantines) a stored body it cannot apply (or record)."""

from __future__ import annotations

import gzip

import dagster as dg
import loopback
import orjson
import pytest
from test_cohort_webhooks import PASSWORD, USER, body, cohort_receiver, post

from mixsync.impressions.landing import write_atomically
from mixsync.mixpanel.cohort_webhook import new_file_name
from mixsync.mixpanel.cohort_webhook_assets import mixpanel_cohort_webhook_members, mixpanel_cohort_webhook_sensor
from mixsync.resources import WarehouseResource

# Valid parameters, spelled out: the bodies below are raw bytes (a repeated key cannot be written as a dict).
PARAMETERS = (b'{"mixpanel_cohort_id": 7, "mixpanel_cohort_name": "VIPs", "mixpanel_session_id": "s-1", '
              b'"page_info": {"total_pages": 1, "page_count": 1}, '
              b'"members": [{"mixpanel_distinct_id": "dup-1", "email": "dup-1@example.com"}]}')
REPEATED_ACTION = b'{"action": "bogus", "action": "add_members", "parameters": ' + PARAMETERS + b'}'


@pytest.fixture
def receiver(env, tmp_path, monkeypatch):
    """A real receiver on a free loopback port, landing into tmp_path (as tests/test_cohort_webhooks.py's)."""
    directory = tmp_path / "cohort_webhooks"
    with cohort_receiver(directory, monkeypatch) as url:
        yield url, directory


def post_raw(url, content: bytes, **headers):
    return loopback.post(url + "/cohorts", content=content, auth=(USER, PASSWORD), timeout=10,
                         headers={"content-type": "application/json", **headers})


def landed(directory):
    return sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.exists() else []


def load(instance):
    result = dg.materialize([mixpanel_cohort_webhook_members], instance=instance,
                            resources={"warehouse": WarehouseResource()})
    return {k: v.value for k, v in result.asset_materializations_for_node("mixpanel_cohort_webhook_members")[0]
            .metadata.items()}


def members(warehouse, cohort_id):
    with warehouse.read() as con:
        return {r[0] for r in con.execute("SELECT distinct_id FROM mixpanel.cohort_members WHERE cohort_id = ?",
                                          [cohort_id]).fetchall()}


def test_a_body_repeating_a_key_is_refused_naming_the_key(receiver):
    url, directory = receiver
    answer = post_raw(url, REPEATED_ACTION)
    assert answer.status_code == 400 and answer.json()["status"] == "failure"
    assert "'action'" in answer.json()["error"]["message"] and "repeats" in answer.json()["error"]["message"]
    # A key repeated deeper (a member's id) is refused as well: the loader would read the other one.
    deep = (b'{"action": "add_members", "parameters": {"mixpanel_cohort_id": 7, "members": '
            b'[{"mixpanel_distinct_id": "a", "mixpanel_distinct_id": "b"}]}}')
    answer = post_raw(url, deep)
    assert answer.status_code == 400 and "'mixpanel_distinct_id'" in answer.json()["error"]["message"]
    assert landed(directory) == []


@pytest.mark.both_backends
def test_a_stored_body_that_cannot_be_applied_is_skipped_with_its_error_and_the_rest_applied(
        receiver, instance, warehouse):
    url, directory = receiver
    # Bodies an older receiver acknowledged: a repeated key (DuckDB reads the first, "bogus"), and a members page
    # without page_info. They arrived first, so they come first in arrival order.
    write_atomically(directory, new_file_name(), REPEATED_ACTION)
    no_pages = body("members", 7, "VIPs", ["snap-1"])
    del no_pages["parameters"]["page_info"]
    write_atomically(directory, new_file_name(), orjson.dumps(no_pages))
    assert post(url, body("add_members", 7, "VIPs", ["a"])).status_code == 200
    # page_info means nothing outside a members snapshot: whatever it holds there is accepted and applied.
    odd_pages = body("add_members", 7, "VIPs", ["b"], page=True, total=1099511627776)
    assert post(url, odd_pages).status_code == 200
    first = load(instance)
    assert first["bodies_applied"] == 2 and first["bodies_skipped"] == 2 and first["bodies_quarantined"] == 0
    assert members(warehouse, 7) == {"a", "b"}
    with warehouse.read() as con:
        errors = dict(con.execute("""SELECT action, error FROM mixpanel.cohort_webhook_bodies
                                     WHERE outcome = 'error'""").fetchall())
    assert set(errors) == {"bogus", "members"}
    assert "bogus" in errors["bogus"] and "page_info" in errors["members"]
    # Nothing is left waiting on them: a later body applies on the next run, and the skipped ones stay skipped.
    assert post(url, body("remove_members", 7, "VIPs", ["a"])).status_code == 200
    second = load(instance)
    assert second["bodies_applied"] == 1 and second["bodies_skipped"] == 0 and second["pages_waiting"] == 0
    assert members(warehouse, 7) == {"b"}


def test_values_the_loader_cannot_store_are_refused_naming_the_field(receiver):
    url, directory = receiver

    def refused(payload, field):
        answer = post(url, payload)
        assert answer.status_code == 400, (payload, answer.text)
        assert field in answer.json()["error"]["message"], answer.json()
        return True

    # Cohort ids beyond BIGINT, and digits DuckDB does not read (str.isdigit accepts them).
    for cohort_id in ("99999999999999999999999", 9223372036854775815, "١٢", "²", "1 2", True):
        assert refused(body("add_members", cohort_id, "VIPs", ["a"]), "parameters.mixpanel_cohort_id")
    # Page numbers beyond INTEGER, booleans, zero.
    for page_info, field in (({"total_pages": 1099511627776, "page_count": 1}, "page_info.total_pages"),
                             ({"total_pages": True, "page_count": True}, "page_info.total_pages"),
                             ({"total_pages": 2, "page_count": True}, "page_info.page_count"),
                             ({"total_pages": 2, "page_count": 0}, "page_info.page_count"),
                             ({"total_pages": 2, "page_count": 3}, "page_info.page_count")):
        snapshot = body("members", 7, "VIPs", ["a"])
        snapshot["parameters"]["page_info"] = page_info
        assert refused(snapshot, field)
    assert landed(directory) == []
    # The largest values the loader can store are accepted.
    largest = body("members", "9223372036854775807", "VIPs", ["a"], page=2147483647, total=2147483647)
    assert post(url, largest).status_code == 200
    assert post(url, body("add_members", 9223372036854775807, "VIPs", ["a"])).status_code == 200


@pytest.mark.both_backends
def test_a_landed_file_the_loader_cannot_record_is_quarantined_and_the_rest_load(receiver, instance, warehouse):
    url, directory = receiver
    # Files an older receiver (or another tool) landed: values out of the columns' types, not JSON, not UTF-8,
    # a member without an id.
    bad = []
    for payload in (body("add_members", "99999999999999999999999", "VIPs", ["x"]),
                    body("add_members", 9223372036854775815, "VIPs", ["x"]),
                    body("members", 7, "VIPs", ["x"], total=1099511627776),
                    body("members", 7, "VIPs", ["x"], page=True, total=True)):
        bad.append(write_atomically(directory, new_file_name(), orjson.dumps(payload)).name)
    bad.append(write_atomically(directory, new_file_name(), b'{"action": "add_members", "parameters": ').name)
    bad.append(write_atomically(directory, new_file_name(), b'{"action": "add_\xff"}').name)
    bad.append(write_atomically(directory, new_file_name(), orjson.dumps(
        {"action": "add_members", "parameters": {"mixpanel_cohort_id": 7, "members": [{"email": "x@y"}]}})).name)
    assert post(url, body("add_members", 7, "VIPs", ["a", "b"])).status_code == 200
    result = load(instance)
    assert result["bodies_landed"] == 1 and result["bodies_applied"] == 1 and result["bodies_quarantined"] == len(bad)
    assert members(warehouse, 7) == {"a", "b"}
    assert landed(directory) == []  # nothing left to block the next run
    assert isinstance(mixpanel_cohort_webhook_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)
    assert landed(directory / "quarantine") == sorted(bad)
    with warehouse.read() as con:
        reasons = dict(con.execute("SELECT file, reason FROM mixpanel.cohort_webhook_quarantine").fetchall())
    assert sorted(reasons) == sorted(bad) and all(reasons.values())
    assert "99999999999999999999999" in reasons[bad[0]]
    # The next body applies on the next run.
    assert post(url, body("add_members", 7, "VIPs", ["c"])).status_code == 200
    assert load(instance)["bodies_applied"] == 1 and members(warehouse, 7) == {"a", "b", "c"}


def test_a_compressed_body_is_refused_with_a_clear_reason(receiver):
    url, directory = receiver
    plain = orjson.dumps(body("add_members", 7, "VIPs", ["a"]))
    answer = post_raw(url, gzip.compress(plain), **{"content-encoding": "gzip"})
    assert answer.status_code == 415 and "Content-Encoding 'gzip'" in answer.json()["error"]["message"]
    # gzip bytes without the header: said so, not a UTF-8 decoding error.
    answer = post_raw(url, gzip.compress(plain))
    assert answer.status_code == 400 and "gzip" in answer.json()["error"]["message"]
    answer = post_raw(url, b'{"action": "add_\xff"}')
    assert answer.status_code == 400 and "not UTF-8" in answer.json()["error"]["message"]
    assert landed(directory) == []
    assert post_raw(url, plain, **{"content-encoding": "identity"}).status_code == 200


def test_a_warehouse_stuck_on_a_stored_bogus_body_recovers(env, receiver, instance, warehouse):
    import duckdb

    url, _ = receiver
    # As the auditor left it: an older mixsync's table (no `error` column) holding the body recorded as "bogus",
    # pending, which made every run fail with KeyError.
    with duckdb.connect(env["MIXSYNC_DUCKDB_PATH"]) as con:
        con.execute("CREATE SCHEMA mixpanel")
        con.execute("""CREATE TABLE mixpanel.cohort_webhook_bodies (file VARCHAR NOT NULL, action VARCHAR NOT NULL,
                       cohort_id BIGINT NOT NULL, cohort_name VARCHAR, session_id VARCHAR, page INTEGER,
                       total_pages INTEGER, members BIGINT NOT NULL, landed_at TIMESTAMPTZ NOT NULL,
                       applied_at TIMESTAMPTZ, snapshot_id BIGINT, outcome VARCHAR)""")
        con.execute("""INSERT INTO mixpanel.cohort_webhook_bodies
                       VALUES ('cohorts-20260101T000000000000Z-000000000000.json', 'bogus', 7, 'VIPs', 's-1', 1, 1, 1,
                               now(), NULL, NULL, NULL)""")
    assert post(url, body("add_members", 7, "VIPs", ["a"])).status_code == 200
    result = load(instance)
    assert result["bodies_applied"] == 1 and result["bodies_skipped"] == 1
    assert members(warehouse, 7) == {"a"}
    with warehouse.read() as con:
        assert con.execute("SELECT outcome, error FROM mixpanel.cohort_webhook_bodies WHERE action = 'bogus'"
                           ).fetchall() == [("error", 'action "bogus" is not one of members, add_members, remove_members')]
