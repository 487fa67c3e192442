"""mixpanel_cohorts and mixpanel_cohort_members against the sandbox: pagination, history, allowlist, 429/402."""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg
import duckdb
import loopback
import pytest

from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.mixpanel.cohort_assets import mixpanel_cohort_members, mixpanel_cohorts
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource

# mixpanel_cohorts checks the Flagsmith key only in runs that push to Flagsmith; none of these do.
RESOURCES = {"mixpanel": MixpanelResource(), "warehouse": WarehouseResource(), "flagsmith": FlagsmithResource()}
ASSETS = [mixpanel_cohorts, mixpanel_cohort_members]


def run(instance, raise_on_error=True):
    return dg.materialize(ASSETS, instance=instance, resources=RESOURCES, raise_on_error=raise_on_error)


def meta(result, node="mixpanel_cohort_members"):
    return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}


def failure_message(result) -> str:
    return " ".join(str(e.event_specific_data.error.message) for e in result.all_events if e.is_step_failure)


def current_members(con, cohort_id):
    return {r[0] for r in con.execute("SELECT distinct_id FROM mixpanel.cohort_members WHERE cohort_id = ?",
                                      [cohort_id]).fetchall()}


@pytest.mark.both_backends
def test_cohorts_list_lands_and_is_replaced(sandbox, env, warehouse, instance):
    query = sandbox.mixpanel.query
    run(instance)
    with warehouse.read() as con:
        rows = con.execute("SELECT id, name, count, visibility, typeof(created) FROM mixpanel.cohorts ORDER BY id").fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [(c.id, c.name, len(c.members)) for c in query.cohorts.values()]
    assert {r[3] for r in rows} == {"visible"} and rows[0][4] == "TIMESTAMP"
    query.rename(1001, "Power Users (renamed)")
    del query.cohorts[1003]
    run(instance)
    with warehouse.read() as con:
        names = dict(con.execute("SELECT id, name FROM mixpanel.cohorts").fetchall())
        removed = con.execute("""SELECT kind, "left" FROM mixpanel.cohort_snapshots WHERE cohort_id = 1003
                                 ORDER BY snapshot_id DESC LIMIT 1""").fetchone()
        assert current_members(con, 1003) == set()
    assert names[1001] == "Power Users (renamed)" and 1003 not in names
    assert removed[0] == "removed" and removed[1] > 0


@pytest.mark.both_backends
def test_members_page_with_session_ids_and_history_records_who_entered_and_left(sandbox, env, warehouse, instance,
                                                                              monkeypatch):
    monkeypatch.setenv("MIXPANEL_ENGAGE_PAGE_SIZE", "7")
    query = sandbox.mixpanel.query
    first = meta(run(instance))
    expected_pages = sum(math.ceil(len(c.members) / 7) for c in query.cohorts.values())
    assert first["pages"] == expected_pages
    engage = sandbox.mixpanel.recorder.matching("/api/query/engage")
    assert len(engage) == expected_pages
    later_pages = [r for r in engage if b"page=0&" not in r.body + b"&"]
    assert later_pages and all(b"session_id=" in r.body for r in later_pages)
    assert all(b"session_id=" not in r.body for r in engage if r not in later_pages)
    with warehouse.read() as con:
        for cohort in query.cohorts.values():
            assert current_members(con, cohort.id) == set(cohort.members)
        # Numeric-looking ids come back from engage as JSON numbers; they land as the same strings.
        numeric = con.execute("SELECT count(*) FROM mixpanel.cohort_members WHERE regexp_full_match(distinct_id, '\\d+')").fetchone()[0]
    assert numeric > 0
    before = {c.id: set(c.members) for c in query.cohorts.values()}
    changes = query.advance()
    second = meta(run(instance))
    assert second["entered"] == sum(e for e, _ in changes.values()) > 0
    assert second["left"] == sum(l for _, l in changes.values()) > 0
    with warehouse.read() as con:
        for cohort in query.cohorts.values():
            after = set(cohort.members)
            assert current_members(con, cohort.id) == after
            history = con.execute("""SELECT change, list(distinct_id) FROM mixpanel.cohort_membership_history
                                     WHERE cohort_id = ? AND snapshot_id = (SELECT max(snapshot_id)
                                        FROM mixpanel.cohort_snapshots WHERE cohort_id = ?) GROUP BY change""",
                                  [cohort.id, cohort.id]).fetchall()
            history = {change: set(ids) for change, ids in history}
            assert history.get("entered", set()) == after - before[cohort.id]
            assert history.get("left", set()) == before[cohort.id] - after


def test_allowlist_by_id_and_name_and_unknown_names_fail(sandbox, env, warehouse, instance, monkeypatch):
    monkeypatch.setenv("MIXPANEL_COHORTS", "1002, Power Users")
    result = meta(run(instance))
    assert result["cohorts"] == 2
    with warehouse.read() as con:
        loaded = {r[0] for r in con.execute("SELECT DISTINCT cohort_id FROM mixpanel.cohort_members").fetchall()}
    assert loaded == {1001, 1002}
    monkeypatch.setenv("MIXPANEL_COHORTS", '["Power Users", "Power Usres"]')
    failed = run(instance, raise_on_error=False)
    assert not failed.success
    assert "MIXPANEL_COHORTS names cohorts this project does not have: Power Usres" in failure_message(failed)


def test_member_properties_and_malformed_members(sandbox, env, warehouse, instance, monkeypatch):
    monkeypatch.setenv("MIXPANEL_COHORT_MEMBER_PROPERTIES", "$email,plan")
    sandbox.mixpanel.query.cohorts[1003].members.append("")
    result = meta(run(instance))
    assert result["rejects_by_reason"] == {"missing $distinct_id": 1}
    with warehouse.read() as con:
        keys = con.execute("""SELECT DISTINCT unnest(json_keys(properties)) FROM mixpanel.cohort_members""").fetchall()
        rejected = con.execute("SELECT cohort_id, reason FROM mixpanel.cohort_members_rejected").fetchall()
    assert {k[0] for k in keys} <= {"$email", "plan"} and ("plan",) in keys
    assert rejected == [(1003, "missing $distinct_id")]


def test_429s_are_retried_through_the_shared_machinery(sandbox, env, warehouse, instance):
    body = '{"request": "/api/query/engage", "error": "Query rate limit exceeded for project_id: 424242."}'
    sandbox.mixpanel.faults.add("engage", status=429, body=body, retry_after="0", times=3)
    sandbox.mixpanel.faults.add("cohorts_list", status=429, body=body, times=1)
    result = run(instance)
    assert meta(result)["retries"] == 3
    assert meta(result, "mixpanel_cohorts")["retries"] == 1


def test_the_hourly_query_limit_is_honoured_not_hammered(sandbox, env, warehouse, instance):
    sandbox.mixpanel.query.queries_per_hour = 3
    result = run(instance, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "Retry-After" in message and "MIXSYNC_HTTP_MAX_RETRY_AFTER_SECONDS" in message
    # One list call and two engage calls fit the limit; the third engage call is refused once, not hammered.
    assert [r.status for r in sandbox.mixpanel.recorder.matching("/api/query/engage")] == [200, 200, 429]


def test_a_plan_without_profiles_fails_with_a_clear_message(sandbox, env, warehouse, instance):
    sandbox.mixpanel.query.profiles_in_plan = False
    result = run(instance, raise_on_error=False)
    assert not result.success
    assert "does not include user profiles" in failure_message(result)


def test_sandbox_engage_is_faithful(sandbox, env):
    state = sandbox.mixpanel
    auth = (state.username, state.secret)
    url = sandbox.url("mixpanel") + "/api/query/engage"
    params = {"project_id": state.project_id}
    first = loopback.post(url, params=params, auth=auth, data={"filter_by_cohort": '{"id": 1001}', "page_size": "10"}).json()
    assert first["page"] == 0 and first["total"] == len(state.query.cohorts[1001].members) and len(first["results"]) == 10
    second = loopback.post(url, params=params, auth=auth, data={"page": "1", "page_size": "10",
                                                             "session_id": first["session_id"]}).json()
    assert "total" not in second and second["page"] == 1 and second["results"] != first["results"]
    assert loopback.post(url, params=params, auth=auth, data={"page": "1"}).status_code == 400
    assert loopback.post(url, params=params, auth=("x", "y"), data={"filter_by_cohort": '{"id": 1001}'}).status_code == 401
    listed = loopback.post(sandbox.url("mixpanel") + "/api/query/cohorts/list", params=params, auth=auth).json()
    assert isinstance(listed, list) and set(listed[0]) == {"id", "name", "description", "count", "is_visible",
                                                            "created", "project_id"}


@pytest.mark.both_backends
def test_a_member_load_that_fails_midway_leaves_the_last_membership_whole(env, warehouse, tmp_path):
    """A cohort's load is one transaction from its first read: a page that cannot be parsed fails the load, the
    last membership, history and snapshots stay as they were, and the next load on the same connection works."""
    import orjson

    from mixsync.mixpanel.cohort_sql import load_cohort_members

    def page(name: str, ids: list[str]) -> Path:
        path = tmp_path / name
        path.write_bytes(orjson.dumps({"results": [{"$distinct_id": i, "$properties": {"$email": f"{i}@x"}}
                                                   for i in ids]}))
        return path

    def state(con) -> tuple:
        return (current_members(con, 7),
                con.execute("SELECT count(*) FROM mixpanel.cohort_membership_history").fetchone()[0],
                con.execute("SELECT count(*) FROM mixpanel.cohort_snapshots").fetchone()[0])

    broken = tmp_path / "broken.json"
    broken.write_text('{"results": [{"$distinct_id": "c"')  # a page cut off mid-body
    with warehouse.write() as con:
        load_cohort_members(con, 7, "buyers", [page("first.json", ["a", "b"])], ["$email"], 2)
        assert state(con) == ({"a", "b"}, 2, 1)
        with pytest.raises(duckdb.Error):
            load_cohort_members(con, 7, "buyers", [page("second.json", ["b", "c"]), broken], ["$email"], 3)
        assert state(con) == ({"a", "b"}, 2, 1)
        load = load_cohort_members(con, 7, "buyers", [page("third.json", ["b", "c"])], ["$email"], 2)
        assert (load.entered, load.left, state(con)) == (1, 1, ({"b", "c"}, 4, 2))
    with warehouse.read() as con:
        assert state(con) == ({"b", "c"}, 4, 2)
