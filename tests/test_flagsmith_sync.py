"""flagsmith_cohort_traits against the sandbox: only changes are sent, exits, identifiers, renames, crashes, verification."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import orjson
import pytest
from waiting import journaled, run_and_sigkill

from mixsync.flagsmith.assets import flagsmith_cohort_traits
from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.flagsmith.traits import trait_key
from mixsync.mixpanel.cohort_assets import mixpanel_cohort_members, mixpanel_cohorts
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource
from mixsync.sandbox.mixpanel_query import profile_properties

RESOURCES = {"mixpanel": MixpanelResource(), "warehouse": WarehouseResource(), "flagsmith": FlagsmithResource()}
CHAIN = [mixpanel_cohorts, mixpanel_cohort_members, flagsmith_cohort_traits]
PREFIX = "mp_cohort_"


@pytest.fixture(autouse=True)
def read_back_a_sample(monkeypatch):
    # The default (100) reads back every identity of these small cohorts after every sync; ten still exercise the
    # read-back, at a fraction of the requests. The tests about the read-back set their own sample.
    monkeypatch.setenv("FLAGSMITH_VERIFY_SAMPLE", "10")


def sync(instance, assets=CHAIN, raise_on_error=True):
    return dg.materialize(assets, instance=instance, resources=RESOURCES, raise_on_error=raise_on_error)


def meta(result, node="flagsmith_cohort_traits"):
    return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}


def failure_message(result) -> str:
    """The step failures' messages, with the exceptions that caused them."""
    parts = []
    for event in result.all_events:
        error = event.event_specific_data.error if event.is_step_failure else None
        while error is not None:
            parts.append(error.message)
            error = error.cause
    return " ".join(parts)


def memberships(query) -> dict[str, set[str]]:
    """{trait key: members} as the sandbox's Mixpanel holds them now."""
    return {trait_key(PREFIX, c.id, c.name): set(c.members) for c in query.cohorts.values()}


def owned(flagsmith) -> dict[tuple[str, str], object]:
    return {(identifier, key): value for identifier, traits in flagsmith.all_traits().items()
            for key, value in traits.items() if key.startswith(PREFIX)}


def writes(flagsmith) -> dict[tuple[str, str], int]:
    return {k: n for k, n in flagsmith.writes.items() if k[1].startswith(PREFIX)}


@pytest.mark.both_backends
def test_first_sync_sends_everyone_then_only_entries_and_exits(sandbox, env, instance):
    query, flagsmith = sandbox.mixpanel.query, sandbox.flagsmith
    first = meta(sync(instance))
    before = memberships(query)
    expected = {(m, key): True for key, members in before.items() for m in members}
    assert owned(flagsmith) == expected
    assert writes(flagsmith) == dict.fromkeys(expected, 1)
    assert first["traits_set_true"] == len(expected) and first["trait_writes"] == len(expected)
    assert first["bulk_mode"] == "core" and first["verify_mismatches"] == 0

    query.advance()
    after = memberships(query)
    entered = {(m, k) for k, members in after.items() for m in members - before[k]}
    left = {(m, k) for k, members in before.items() for m in members - after[k]}
    assert entered and left
    counts_before = writes(flagsmith)
    second = meta(sync(instance))
    sent = {pair: n - counts_before.get(pair, 0) for pair, n in writes(flagsmith).items()
            if n != counts_before.get(pair, 0)}
    assert sent == dict.fromkeys(entered | left, 1)  # exactly the changes, each once
    assert second["traits_set_true"] == len(entered) and second["traits_set_false"] == len(left)
    assert second["traits_deleted"] == 0
    assert owned(flagsmith) == {**{(m, k): True for k, ms in after.items() for m in ms}, **dict.fromkeys(left, False)}

    counts = writes(flagsmith)
    third = meta(sync(instance))
    assert third["trait_writes"] == 0 and writes(flagsmith) == counts  # nothing changed, nothing sent


def test_exit_deletes_the_trait_when_asked(sandbox, env, instance, monkeypatch, warehouse):
    monkeypatch.setenv("FLAGSMITH_ON_COHORT_EXIT", "delete")
    query, flagsmith = sandbox.mixpanel.query, sandbox.flagsmith
    sync(instance)
    before = memberships(query)
    query.advance()
    after = memberships(query)
    left = {(m, k) for k, members in before.items() for m in members - after[k]}
    result = meta(sync(instance))
    assert result["traits_deleted"] == len(left) > 0 and result["traits_set_false"] == 0
    assert owned(flagsmith) == {(m, k): True for k, ms in after.items() for m in ms}
    with warehouse.read() as con:
        tombstones = con.execute("SELECT count(*) FROM sync.flagsmith_traits WHERE trait_value IS NULL").fetchone()[0]
    assert tombstones == len(left)


def test_a_profile_property_can_be_the_identifier(sandbox, env, instance, monkeypatch):
    monkeypatch.setenv("FLAGSMITH_IDENTIFIER_PROPERTY", "$email")
    query, flagsmith = sandbox.mixpanel.query, sandbox.flagsmith
    result = meta(sync(instance))
    expected, without_email = {}, 0
    for key, members in memberships(query).items():
        for m in members:
            email = profile_properties(m).get("$email")
            if email:
                expected[(email, key)] = True
            else:
                without_email += 1
    assert without_email > 0
    assert owned(flagsmith) == expected
    assert all("@" in identifier for identifier in flagsmith.all_traits())  # an empty identifier is never sent
    assert result["skipped_by_reason"] == {"profile has no $email": without_email}


def test_colliding_cohort_names_fail_clearly_and_send_nothing(sandbox, env, instance):
    sandbox.mixpanel.query.rename(1002, "power-users")
    result = sync(instance, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "'mp_cohort_power_users'" in message and "cohort 1001 ('Power Users')" in message
    assert "cohort 1002 ('power-users')" in message
    assert sandbox.flagsmith.writes == {}


def test_a_renamed_cohort_moves_its_trait_in_one_sync_and_leaves_other_traits_alone(sandbox, env, instance):
    query, flagsmith = sandbox.mixpanel.query, sandbox.flagsmith
    sync(instance)
    query.advance()
    sync(instance)  # some people now hold mp_cohort_power_users = false
    members = set(query.cohorts[1001].members)
    held_old = {i for (i, k) in owned(flagsmith) if k == "mp_cohort_power_users"}
    assert held_old - members
    someone = sorted(members)[0]
    flagsmith.set_trait(someone, "favourite_color", "blue")
    flagsmith.set_trait("hand-made", "mp_cohort_power_users", True)  # set by a person, not owned by mixsync
    query.rename(1001, "Super Users")
    result = meta(sync(instance))
    assert result["traits_set_true"] == len(members) and result["traits_deleted"] == len(held_old)
    assert result["identities_touched"] == len(held_old | members)
    after = owned(flagsmith)
    assert {i for (i, k), v in after.items() if k == "mp_cohort_super_users" and v is True} == members
    assert {i for (i, k) in after if k == "mp_cohort_power_users"} == {"hand-made"}
    assert flagsmith.traits(someone)["favourite_color"] == "blue"


CHILD = """
import dagster as dg
from mixsync.definitions import resources
from mixsync.flagsmith.assets import flagsmith_cohort_traits
dg.materialize([flagsmith_cohort_traits], resources=resources)
"""


@pytest.mark.both_backends
def test_a_run_killed_mid_push_resumes_and_writes_each_trait_once(sandbox, env, instance, monkeypatch):
    for name, value in {"FLAGSMITH_BULK_MODE": "core", "FLAGSMITH_BATCH_IDENTITIES": "10",
                        "FLAGSMITH_CONCURRENCY": "2"}.items():
        monkeypatch.setenv(name, value)
    query, flagsmith = sandbox.mixpanel.query, sandbox.flagsmith
    sync(instance, [mixpanel_cohorts, mixpanel_cohort_members])
    flagsmith.hold_after_requests = 3  # three batches go through; the next ones hang in flight
    journal_dir = Path(env["MIXSYNC_LANDING_DIR"]) / "outbox" / "sync_flagsmith_outbox"
    run_and_sigkill(CHILD, lambda: flagsmith.held >= 2 and journaled(journal_dir)[0] >= 3, 90,
                    "the push reached the held requests", flagsmith.release)
    flagsmith.hold_after_requests = None
    assert 0 < len(owned(flagsmith)) < sum(len(m) for m in memberships(query).values())

    # The held requests, dropped unapplied: every trait write in them is still wanted, so each is sent again.
    held_writes = sum(len(orjson.loads(r.body)) for r in flagsmith.recorder.matching("/traits/bulk/")[3:])

    result = meta(sync(instance, [flagsmith_cohort_traits]))
    assert result["recovered_identities"] == 30 and result["in_flight_at_crash"] == 20
    assert result["resent_in_flight_at_crash"] == held_writes > 0 and result["corrected_in_flight_at_crash"] == 0
    expected = {(m, k): True for k, ms in memberships(query).items() for m in ms}
    assert owned(flagsmith) == expected
    assert writes(flagsmith) == dict.fromkeys(expected, 1)  # nothing twice, nothing lost


@pytest.mark.both_backends
def test_a_write_applied_but_unanswered_at_a_kill_is_corrected_when_no_longer_wanted(sandbox, env, instance,
                                                                                      monkeypatch):
    for name, value in {"FLAGSMITH_BULK_MODE": "core", "FLAGSMITH_BATCH_IDENTITIES": "10",
                        "FLAGSMITH_CONCURRENCY": "1"}.items():
        monkeypatch.setenv(name, value)
    query, flagsmith = sandbox.mixpanel.query, sandbox.flagsmith
    for cohort_id in [c for c in query.cohorts if c != 1001]:
        del query.cohorts[cohort_id]  # one cohort: one trait per identity, one identity per outbox item
    key = trait_key(PREFIX, 1001, "Power Users")
    sync(instance, [mixpanel_cohorts, mixpanel_cohort_members])
    # Batch 1 is answered; batch 2 is applied by Flagsmith, and its answer never comes: the run is killed then.
    flagsmith.hold_after_requests, flagsmith.apply_held = 1, True
    journal_dir = Path(env["MIXSYNC_LANDING_DIR"]) / "outbox" / "sync_flagsmith_outbox"
    run_and_sigkill(CHILD, lambda: flagsmith.held >= 1 and journaled(journal_dir)[0] >= 1, 90,
                    "batch 1 answered and batch 2 held", flagsmith.release)
    flagsmith.hold_after_requests, flagsmith.apply_held = None, False
    batches = [[item["identity"]["identifier"] for item in orjson.loads(r.body)]
               for r in flagsmith.recorder.matching("/traits/bulk/")]
    assert len(batches) == 2 and all(len(b) == 10 for b in batches)
    in_flight = batches[1]
    assert {i for (i, k), v in owned(flagsmith).items() if v is True} == set(batches[0]) | set(in_flight)

    # Before the re-run, batch 1 and half of batch 2 leave the cohort; the other half of batch 2 stays.
    leavers, stayers = set(batches[0]) | set(in_flight[:5]), set(in_flight[5:])
    query.cohorts[1001].members = sorted(set(query.cohorts[1001].members) - leavers)
    members = set(query.cohorts[1001].members)
    counts = writes(flagsmith)
    result = meta(sync(instance))
    assert owned(flagsmith) == {**{(m, key): True for m in members}, **{(m, key): False for m in leavers}}
    sent = {pair: n - counts.get(pair, 0) for pair, n in writes(flagsmith).items() if n != counts.get(pair, 0)}
    assert sent == dict.fromkeys({(m, key) for m in members | leavers}, 1)  # the stayers of batch 2 included
    assert result["in_flight_at_crash"] == 10 and result["recovered_identities"] == 10
    assert result["resent_in_flight_at_crash"] == len(stayers) and result["corrected_in_flight_at_crash"] == 5
    assert result["traits_set_false"] == len(leavers) == 15
    counts = writes(flagsmith)
    assert meta(sync(instance))["trait_writes"] == 0 and writes(flagsmith) == counts  # nothing left to correct


def test_partial_bulk_application_is_caught_by_read_back_and_requeued(sandbox, env, instance, monkeypatch):
    monkeypatch.setenv("FLAGSMITH_BATCH_IDENTITIES", "20")
    monkeypatch.setenv("FLAGSMITH_VERIFY_SAMPLE", "1000")
    flagsmith = sandbox.flagsmith
    flagsmith.api = "edge"
    flagsmith.faults.add("bulk_identities_partial")  # the first bulk request applies 10 of its 20 identities
    result = meta(sync(instance))
    assert result["bulk_mode"] == "edge"
    assert result["verify_mismatches"] > 0
    assert result["requeued_trait_writes"] == result["verify_mismatches"]
    expected = {(m, k): True for k, ms in memberships(sandbox.mixpanel.query).items() for m in ms}
    assert owned(flagsmith) == expected
    assert len(flagsmith.recorder.matching("/bulk-identities/")) > 1


def test_read_back_examples_show_no_identifier_in_metadata_or_logs(sandbox, env, instance, monkeypatch):
    monkeypatch.setenv("FLAGSMITH_BATCH_IDENTITIES", "20")
    monkeypatch.setenv("FLAGSMITH_VERIFY_SAMPLE", "1000")
    sandbox.flagsmith.api = "edge"
    sandbox.flagsmith.faults.add("bulk_identities_partial")
    result = sync(instance)
    examples = meta(result)["verify_examples"]
    assert examples and all(e["identifier"].startswith("sha256:") for e in examples)
    shown = str(meta(result)) + " ".join(entry.user_message for entry in instance.all_logs(result.run_id))
    members = {m for ms in memberships(sandbox.mixpanel.query).values() for m in ms}
    assert not [m for m in members if f"'{m}'" in shown or f'"{m}"' in shown]


def test_a_wrong_key_fails_fast_without_showing_it(sandbox, env, instance, monkeypatch):
    sync(instance, [mixpanel_cohorts, mixpanel_cohort_members])
    monkeypatch.setenv("FLAGSMITH_ENVIRONMENT_KEY", "ser.wrong-secret-value")
    result = sync(instance, [flagsmith_cohort_traits], raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "FLAGSMITH_ENVIRONMENT_KEY" in message and "403" in message
    assert "wrong-secret-value" not in message
    # Two probes: a core server answers PUT bulk-identities/ 404 before looking at the key (observed), traits/bulk/ 403.
    assert [r.status for r in sandbox.flagsmith.recorder.requests] == [404, 403] and sandbox.flagsmith.writes == {}
    monkeypatch.setenv("FLAGSMITH_ENVIRONMENT_KEY", sandbox.flagsmith.client_key)
    result = sync(instance, [flagsmith_cohort_traits], raise_on_error=False)
    assert not result.success and "FLAGSMITH_ENVIRONMENT_KEY is not a server-side key" in failure_message(result)


def test_the_job_checks_the_flagsmith_key_before_any_mixpanel_request(sandbox, env, instance, monkeypatch):
    from mixsync.definitions import defs

    job = defs.resolve_job_def("flagsmith_cohort_traits_job")
    mixpanel, flagsmith = sandbox.mixpanel.recorder, sandbox.flagsmith.recorder
    monkeypatch.setenv("FLAGSMITH_ENVIRONMENT_KEY", "ser.wrong-secret-value")
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    message = failure_message(result)
    assert "FLAGSMITH_ENVIRONMENT_KEY" in message and "403" in message and "wrong-secret-value" not in message
    assert mixpanel.requests == []  # Mixpanel was asked nothing
    assert [(r.method, r.path, r.status) for r in flagsmith.requests] == [("GET", "/api/v1/flags/", 403)]

    flagsmith.clear()
    monkeypatch.setenv("FLAGSMITH_ENVIRONMENT_KEY", sandbox.flagsmith.client_key)
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    assert "FLAGSMITH_ENVIRONMENT_KEY is not a server-side key" in failure_message(result)
    assert mixpanel.requests == [] and flagsmith.requests == []  # refused before any request

    monkeypatch.setenv("FLAGSMITH_ENVIRONMENT_KEY", sandbox.flagsmith.server_key)
    assert job.execute_in_process(instance=instance).success
    assert (flagsmith.requests[0].method, flagsmith.requests[0].path) == ("GET", "/api/v1/flags/")
    assert mixpanel.requests and owned(sandbox.flagsmith)


def probes(flagsmith) -> list[str]:
    """The empty bulk writes that detect the route (PUT bulk-identities/ {"data": []}, PUT traits/bulk/ [])."""
    return [r.path for r in flagsmith.recorder.requests if r.method == "PUT" and r.body in (b'{"data": []}', b"[]")]


def test_a_run_with_nothing_to_send_makes_no_write_request_and_the_route_is_remembered(sandbox, env, instance,
                                                                                       warehouse):
    flagsmith = sandbox.flagsmith
    first = meta(sync(instance))
    assert first["bulk_mode"] == "core" and first["trait_writes"] > 0
    assert probes(flagsmith) == ["/api/v1/bulk-identities/", "/api/v1/traits/bulk/"]  # detected once
    with warehouse.read() as con:
        assert con.execute("SELECT api_url, bulk_mode FROM sync.flagsmith_routes").fetchall() == [
            (env["FLAGSMITH_API_URL"], "core")]

    flagsmith.recorder.clear()
    nothing = meta(sync(instance))  # membership unchanged: nothing to send
    assert nothing["trait_writes"] == 0 and nothing["requests"] > 0  # the read-back still reads
    assert [(r.method, r.path) for r in flagsmith.recorder.requests if r.method != "GET"] == []

    sandbox.mixpanel.query.advance()
    flagsmith.recorder.clear()
    changes = meta(sync(instance))
    assert changes["trait_writes"] > 0 and changes["bulk_mode"] == "core"
    assert probes(flagsmith) == []  # the remembered route, no probe
    assert flagsmith.recorder.matching("/traits/bulk/") and not flagsmith.recorder.matching("/bulk-identities/")


def test_a_remembered_route_that_disappears_is_detected_again(sandbox, env, instance, warehouse):
    flagsmith = sandbox.flagsmith
    flagsmith.api = "edge"
    assert meta(sync(instance))["bulk_mode"] == "edge"
    flagsmith.api = "core"  # the server changed: bulk-identities/ now answers 404
    sandbox.mixpanel.query.advance()
    flagsmith.recorder.clear()
    changed = meta(sync(instance))
    assert changed["rejected"] == 0
    assert flagsmith.recorder.matching("/api/v1/identities/")  # this run fell back to identity by identity
    with warehouse.read() as con:
        assert con.execute("SELECT count(*) FROM sync.flagsmith_routes").fetchone()[0] == 0
    sandbox.mixpanel.query.advance()
    flagsmith.recorder.clear()
    assert meta(sync(instance))["bulk_mode"] == "core"
    assert probes(flagsmith) == ["/api/v1/bulk-identities/", "/api/v1/traits/bulk/"]
    expected = {(m, k): True for k, ms in memberships(sandbox.mixpanel.query).items() for m in ms}
    assert {pair: v for pair, v in owned(flagsmith).items() if v} == expected


def test_a_429_storm_is_ridden_out_and_nothing_is_written_twice(sandbox, env, instance):
    flagsmith = sandbox.flagsmith
    limited = '{"detail": "Request was throttled. Expected available in 1 second."}'
    flagsmith.faults.add("traits_bulk", status=429, body=limited, retry_after="0", times=5)
    flagsmith.faults.add("identities_read", status=429, body=limited, times=2)
    result = meta(sync(instance))
    assert result["retries"] == 7 and sum(result["retry_reasons"].values()) == 7
    expected = {(m, k): True for k, ms in memberships(sandbox.mixpanel.query).items() for m in ms}
    assert owned(flagsmith) == expected and writes(flagsmith) == dict.fromkeys(expected, 1)


def test_a_refused_identity_is_recorded_and_does_not_block_the_rest(sandbox, env, instance, monkeypatch, warehouse):
    monkeypatch.setenv("FLAGSMITH_BATCH_IDENTITIES", "20")
    monkeypatch.setenv("FLAGSMITH_BULK_MODE", "core")  # no probe: the planned faults hit the first real batch
    flagsmith = sandbox.flagsmith
    # The bulk request of the first batch is refused; it is retried identity by identity, and one is refused.
    flagsmith.faults.add("traits_bulk", status=400, body='{"non_field_errors": ["bad batch"]}')
    flagsmith.faults.add("identities", status=400, body='{"traits": [{"trait_value": ["bad value"]}]}')
    result = meta(sync(instance))
    assert result["rejected"] == 1 and list(result["rejects_by_reason"].values()) == [1]
    with warehouse.read() as con:
        refused, error = con.execute("""SELECT payload->>'identifier', error FROM sync.flagsmith_outbox
                                        WHERE status = 'rejected'""").fetchone()
    assert "HTTP 400" in error and "bad value" in error
    expected = {(m, k): True for k, ms in memberships(sandbox.mixpanel.query).items() for m in ms}
    assert owned(flagsmith) == {pair: v for pair, v in expected.items() if pair[0] != refused}
    again = meta(sync(instance))
    assert again["trait_writes"] == 0 and again["rejected_earlier_not_resent"] >= 1


def test_definitions_schedule_the_chain_hourly():
    from mixsync.definitions import defs

    schedule = defs.resolve_schedule_def("flagsmith_cohort_traits_schedule")
    assert schedule.cron_schedule == "0 * * * *"
    job = defs.resolve_job_def("flagsmith_cohort_traits_job")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} >= {
        "mixpanel_cohorts", "mixpanel_cohort_members", "flagsmith_cohort_traits"}


def test_identifiers_flagsmith_cannot_store_are_skipped_with_a_reason(sandbox, env, instance, warehouse):
    too_long = "x" * 2001  # Flagsmith answers 500 above 2000 characters
    sandbox.mixpanel.query.cohorts[1003].members.append(too_long)
    result = meta(sync(instance))
    assert result["skipped_by_reason"] == {"identifier longer than 2000 characters": 1}
    assert too_long not in sandbox.flagsmith.all_traits()
    assert all(r.status < 500 for r in sandbox.flagsmith.recorder.requests)
    with warehouse.read() as con:
        assert con.execute("SELECT cohort_id, reason FROM sync.flagsmith_skipped").fetchall() == [
            (1003, "identifier longer than 2000 characters")]


# Every character Python (so Flagsmith, which trims with str.strip) counts as whitespace: tab, newline, vertical tab,
# form feed, the information separators, NEL, no-break, ogham, en/em/thin/hair spaces, line and paragraph separators,
# narrow no-break, medium mathematical and ideographic spaces.
UNICODE_WHITESPACE = [chr(c) for c in range(0x110000) if chr(c).isspace()]


def test_identifiers_of_only_whitespace_of_any_kind_are_skipped_with_a_reason(sandbox, env, instance, warehouse):
    assert len(UNICODE_WHITESPACE) >= 25 and "\u00a0" in UNICODE_WHITESPACE and "\u3000" in UNICODE_WHITESPACE
    blanks = [*UNICODE_WHITESPACE, "\u2003\u00a0", "\n\x0b ", "\t\r\x0c\u2028"]
    members = sandbox.mixpanel.query.cohorts[1003].members
    members += [*blanks, "\u00a0padded\t"]  # surrounding whitespace is trimmed, as Flagsmith does
    result = meta(sync(instance))
    assert result["skipped_by_reason"] == {"distinct_id is only whitespace": len(blanks)}
    stored = sandbox.flagsmith.all_traits()
    assert not any(identifier.strip() == "" for identifier in stored) and "padded" in stored
    sent = [item["identity"]["identifier"] for r in sandbox.flagsmith.recorder.matching("/traits/bulk/")
            for item in orjson.loads(r.body)]
    assert sent and not [identifier for identifier in sent if identifier.strip() == ""]
    with warehouse.read() as con:
        assert con.execute("""SELECT count(*) FROM sync.flagsmith_skipped
                              WHERE reason = 'distinct_id is only whitespace'""").fetchone()[0] == len(blanks)
        assert con.execute("SELECT count(*) FROM sync.flagsmith_traits WHERE trim(identifier) = ''").fetchone()[0] == 0


def test_the_client_refuses_a_blank_identifier_without_sending_it(sandbox, env):
    from mixsync.flagsmith.client import BLANK_IDENTIFIER, FlagsmithClient
    from mixsync.flagsmith.settings import FlagsmithSettings

    identifiers = ["\t", "\u00a0", "\u2029 \x1f", "ok"]
    payloads = [orjson.dumps({"identifier": i, "traits": [{"trait_key": "k", "trait_value": True}]})
                for i in identifiers]
    for mode in ("identities", "core"):
        sandbox.flagsmith.recorder.clear()
        with FlagsmithClient(FlagsmithSettings.from_env()) as client:
            refused = client.send(mode, payloads)
        assert refused == {0: BLANK_IDENTIFIER, 1: BLANK_IDENTIFIER, 2: BLANK_IDENTIFIER}
        bodies = [orjson.loads(r.body) for r in sandbox.flagsmith.recorder.requests]
        sent = [b["identifier"] if isinstance(b, dict) else item["identity"]["identifier"]
                for b in bodies for item in (b if isinstance(b, list) else [b])]
        assert sent == ["ok"]


def test_a_200_for_another_identifier_is_counted_as_refused_and_not_recorded_as_sent(sandbox, env, instance,
                                                                                    monkeypatch, warehouse):
    from mixsync.flagsmith.client import IDENTIFIER_CHANGED, NOT_ECHOED

    monkeypatch.setenv("FLAGSMITH_BULK_MODE", "identities")
    flagsmith = sandbox.flagsmith
    # Flagsmith answers 200 for an identity other than the one sent (as it does, with a hashed identifier, for an
    # identifier it cannot use): nothing was stored on the identity mixsync meant.
    flagsmith.faults.add("identities", status=200, body='{"identifier": "someone-else", "traits": [], "flags": []}')
    result = meta(sync(instance))
    assert result["rejected"] == 1 and result["rejects_by_reason"] == {IDENTIFIER_CHANGED[:120]: 1}
    with warehouse.read() as con:
        refused, error = con.execute("""SELECT payload->>'identifier', error FROM sync.flagsmith_outbox
                                        WHERE status = 'rejected'""").fetchone()
        in_ledger = con.execute("SELECT count(*) FROM sync.flagsmith_traits WHERE identifier = ?",
                                [refused]).fetchone()[0]
    assert error == IDENTIFIER_CHANGED and in_ledger == 0 and refused not in flagsmith.all_traits()

    # traits/bulk: a 200 whose answer does not echo an identity that was given a value.
    monkeypatch.setenv("FLAGSMITH_BULK_MODE", "core")
    monkeypatch.setenv("FLAGSMITH_BATCH_IDENTITIES", "100")
    sandbox.mixpanel.query.advance()
    flagsmith.faults.add("traits_bulk", status=200, body="[]")
    result = meta(sync(instance))
    with warehouse.read() as con:
        not_echoed = con.execute("""SELECT list(payload->>'identifier') FROM sync.flagsmith_outbox
                                    WHERE status = 'rejected' AND error = ?""", [NOT_ECHOED]).fetchone()[0]
    assert not_echoed and result["rejects_by_reason"][NOT_ECHOED[:120]] == len(not_echoed)
    with warehouse.read() as con:
        recorded = con.execute("""SELECT count(*) FROM sync.flagsmith_outbox_traits t JOIN sync.flagsmith_outbox o
                                  ON o.id = t.outbox_id JOIN sync.flagsmith_traits l
                                  ON l.identifier = t.identifier AND l.trait_key = t.trait_key AND l.sync_id = t.sync_id
                                  WHERE o.status = 'rejected'""").fetchone()[0]
    assert recorded == 0  # no refused change reached the ledger


def test_a_non_boolean_value_on_an_owned_trait_is_repaired_and_counted(sandbox, env, instance, monkeypatch,
                                                                       warehouse):
    monkeypatch.setenv("FLAGSMITH_VERIFY_SAMPLE", "100000")  # read every identity back
    query, flagsmith = sandbox.mixpanel.query, sandbox.flagsmith
    sync(instance)
    query.advance()
    sync(instance)  # now some owned traits are true (members) and some false (people who left)
    now = owned(flagsmith)
    member = next(pair for pair, value in sorted(now.items()) if value is True)
    leaver = next(pair for pair, value in sorted(now.items()) if value is False)

    def ledger(pair):
        with warehouse.read() as con:
            return con.execute("SELECT trait_value, drift::VARCHAR FROM sync.flagsmith_traits "
                               "WHERE identifier = ? AND trait_key = ?", list(pair)).fetchone()

    def sync_row(sync_id):
        with warehouse.read() as con:
            return con.execute("SELECT requeued, finished_at IS NOT NULL FROM sync.flagsmith_syncs WHERE sync_id = ?",
                               [sync_id]).fetchone()

    # 1. Found and repaired by the run that reads it back.
    flagsmith.set_trait(*member, "yes")
    result = meta(sync(instance))
    assert result["verify_non_boolean"] == 1 and result["requeued_trait_writes"] == 1
    assert flagsmith.traits(member[0])[member[1]] is True and ledger(member) == (True, None)
    assert sync_row(result["sync_id"]) == (1, True)

    # 2. The repair write fails (a 503 storm): the traits stay owned, marked with what was found, and the re-queued
    # writes are counted on the sync's row; the next run re-writes them.
    flagsmith.set_trait(*member, "yes")
    flagsmith.set_trait(*leaver, 7)
    flagsmith.faults.add("traits_bulk", status=503, body='{"detail": "unavailable"}', times=1000)
    failed = sync(instance, raise_on_error=False)
    assert not failed.success
    flagsmith.faults.clear()
    assert ledger(member) == (True, '"yes"') and ledger(leaver) == (False, "7")
    with warehouse.read() as con:
        failed_sync, requeued, finished = con.execute("""SELECT sync_id, requeued, finished_at IS NOT NULL
                                                         FROM sync.flagsmith_syncs ORDER BY sync_id DESC LIMIT 1""").fetchone()
    assert (requeued, finished) == (2, False)
    writes_before = writes(flagsmith)
    repaired = meta(sync(instance))
    assert repaired["sync_id"] > failed_sync and repaired["trait_writes"] == 2
    assert flagsmith.traits(member[0])[member[1]] is True and flagsmith.traits(leaver[0])[leaver[1]] is False
    assert ledger(member) == (True, None) and ledger(leaver) == (False, None)
    assert {pair: n - writes_before.get(pair, 0) for pair, n in writes(flagsmith).items()
            if n != writes_before.get(pair, 0)} == {member: 1, leaver: 1}
    assert repaired["verify_mismatches"] == 0


def test_the_push_logs_batches_sent_and_remaining_with_the_time_left(sandbox, env, instance, monkeypatch):
    monkeypatch.setenv("MIXSYNC_PROGRESS_SECONDS", "0")  # a line per batch, so the test sees them all
    monkeypatch.setenv("FLAGSMITH_BATCH_IDENTITIES", "20")
    monkeypatch.setenv("FLAGSMITH_CONCURRENCY", "1")
    result = sync(instance)
    identities = meta(result)["identities_touched"]
    assert identities > 40
    lines = [e.user_message for e in instance.all_logs(result.run_id)
             if e.user_message.startswith("push of sync-1-r0 to Flagsmith (core): ")]
    assert len(lines) == -(-identities // 20)
    assert lines[0].startswith(f"push of sync-1-r0 to Flagsmith (core): 20 of {identities:,} identities done, "
                               f"{identities - 20:,} remaining (1 batches sent, about ")
    assert " left" in lines[0]
    assert lines[-1] == (f"push of sync-1-r0 to Flagsmith (core): {identities:,} of {identities:,} identities done, "
                         f"0 remaining ({len(lines)} batches sent, about 0 to go)")


def test_a_warehouse_from_before_drift_and_requeued_gets_both_columns(env):
    import duckdb

    from mixsync.settings import WarehouseSettings
    from mixsync.warehouse import open_warehouse

    path = env["MIXSYNC_DUCKDB_PATH"]
    with duckdb.connect(path) as con:  # the tables as an older mixsync created them, with a row each
        con.execute("CREATE SCHEMA sync")
        con.execute("""CREATE TABLE sync.flagsmith_traits (identifier VARCHAR NOT NULL, trait_key VARCHAR NOT NULL,
                       cohort_id BIGINT, trait_value BOOLEAN, sync_id BIGINT NOT NULL, confirmed_at TIMESTAMPTZ NOT NULL)""")
        con.execute("INSERT INTO sync.flagsmith_traits VALUES ('p1', 'mp_cohort_a', 1, true, 1, now())")
        con.execute("""CREATE TABLE sync.flagsmith_syncs (sync_id BIGINT NOT NULL, started_at TIMESTAMPTZ NOT NULL,
                       finished_at TIMESTAMPTZ, bulk_mode VARCHAR, exit_mode VARCHAR, identities BIGINT, set_true BIGINT,
                       set_false BIGINT, deleted BIGINT, skipped BIGINT, verified BIGINT, mismatches BIGINT)""")
        con.execute("INSERT INTO sync.flagsmith_syncs (sync_id, started_at) VALUES (1, now())")
    with open_warehouse(WarehouseSettings.from_env()).write() as con:
        assert con.execute("SELECT identifier, trait_value, drift FROM sync.flagsmith_traits").fetchall() == [
            ("p1", True, None)]
        assert con.execute("SELECT sync_id, requeued FROM sync.flagsmith_syncs").fetchall() == [(1, None)]


def test_ledgers_from_before_unconfirmed_get_the_column(env):
    import duckdb

    import mixsync.flagsmith.profile_flags_sql  # noqa: F401  (registers the profile flags ledger)
    from mixsync.settings import WarehouseSettings
    from mixsync.warehouse import open_warehouse

    with duckdb.connect(env["MIXSYNC_DUCKDB_PATH"]) as con:  # both ledgers as an older mixsync created them
        con.execute("CREATE SCHEMA sync")
        con.execute("""CREATE TABLE sync.flagsmith_traits (identifier VARCHAR NOT NULL, trait_key VARCHAR NOT NULL,
                       cohort_id BIGINT, trait_value BOOLEAN, sync_id BIGINT NOT NULL, confirmed_at TIMESTAMPTZ NOT NULL,
                       drift JSON)""")
        con.execute("INSERT INTO sync.flagsmith_traits VALUES ('p1', 'mp_cohort_a', 1, true, 1, now(), NULL)")
        con.execute("""CREATE TABLE sync.mixpanel_profile_flags (distinct_id VARCHAR NOT NULL, property VARCHAR NOT NULL,
                       feature VARCHAR NOT NULL, value JSON, sync_id BIGINT NOT NULL, confirmed_at TIMESTAMPTZ NOT NULL)""")
        con.execute("INSERT INTO sync.mixpanel_profile_flags VALUES ('p1', 'flagsmith_f', 'f', 'true', 1, now())")
    with open_warehouse(WarehouseSettings.from_env()).write() as con:
        assert con.execute("SELECT identifier, trait_value, unconfirmed FROM sync.flagsmith_traits").fetchall() == [
            ("p1", True, None)]
        assert con.execute("SELECT distinct_id, value, unconfirmed FROM sync.mixpanel_profile_flags").fetchall() == [
            ("p1", "true", None)]
