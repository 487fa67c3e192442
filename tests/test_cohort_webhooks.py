"""Mixpanel cohort webhooks: `mixsync receive-cohorts` lands bodies durably; the sensor's run applies them and
pushes to Flagsmith through the same membership tables, ledger and trait as the engage poll."""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import Iterator

import dagster as dg
import httpx
import loopback
import pytest

from mixsync.flagsmith.assets import flagsmith_cohort_traits
from mixsync.flagsmith.resources import FlagsmithResource
from mixsync.flagsmith.traits import trait_key
from mixsync.mixpanel.cohort_assets import mixpanel_cohort_members, mixpanel_cohorts
from mixsync.mixpanel.cohort_webhook import CohortWebhookSettings, build_app
from mixsync.mixpanel.cohort_webhook_assets import mixpanel_cohort_webhook_members, mixpanel_cohort_webhook_sensor
from mixsync.mixpanel.resources import MixpanelResource
from mixsync.resources import WarehouseResource
from mixsync.sandbox.server import serve

USER, PASSWORD = "mixpanel", "a-long-random-webhook-password"
RESOURCES = {"mixpanel": MixpanelResource(), "warehouse": WarehouseResource(), "flagsmith": FlagsmithResource()}


@pytest.fixture
def receiver(env, tmp_path, monkeypatch):
    directory = tmp_path / "cohort_webhooks"
    with cohort_receiver(directory, monkeypatch, MIXSYNC_COHORT_WEBHOOK_MAX_BYTES="200000") as url:
        yield url, directory


@contextlib.contextmanager
def cohort_receiver(directory, monkeypatch, **settings: str) -> Iterator[str]:
    """A real receiver on a free loopback port landing into `directory`, with the tests' credentials; its URL."""
    for name, value in {"MIXSYNC_COHORT_WEBHOOK_USER": USER, "MIXSYNC_COHORT_WEBHOOK_PASSWORD": PASSWORD,
                        "MIXSYNC_COHORT_WEBHOOK_DIR": str(directory), **settings}.items():
        monkeypatch.setenv(name, value)
    server = serve("cohort-receiver", build_app(CohortWebhookSettings.from_env()))
    try:
        yield server.url
    finally:
        server.stop()


def body(action, cohort_id, name, members, session="s-1", page=1, total=1):
    return {"action": action, "parameters": {
        "mixpanel_project_id": "424242", "mixpanel_cohort_id": cohort_id, "mixpanel_cohort_name": name,
        "mixpanel_cohort_description": "", "mixpanel_session_id": session,
        "page_info": {"total_pages": total, "page_count": page},
        "members": [{"mixpanel_distinct_id": m, "email": f"{m}@example.com"} for m in members]}}


def post(url, payload, auth=(USER, PASSWORD)):
    return loopback.post(url + "/cohorts", json=payload, auth=auth, timeout=10)


def test_auth_limits_and_the_answer_mixpanel_expects(receiver):
    url, directory = receiver
    good = body("add_members", 7, "VIPs", ["a", "b"])
    for auth in (None, (USER, "wrong-password-but-long"), ("someone", PASSWORD)):
        refused = post(url, good, auth=auth)
        assert refused.status_code == 401 and refused.json()["status"] == "failure"
        assert refused.json()["error"]["code"] == 401
    bad = post(url, {"action": "nonsense", "parameters": {}})
    assert bad.status_code == 400 and "action" in bad.json()["error"]["message"]
    no_pages = body("members", 7, "VIPs", ["a"])
    del no_pages["parameters"]["page_info"]
    assert post(url, no_pages).status_code == 400
    too_many = post(url, body("add_members", 7, "VIPs", [f"u{i}" for i in range(1001)]))
    assert too_many.status_code == 413 and "1000" in too_many.json()["error"]["message"]
    too_big = loopback.post(url + "/cohorts", content=b"{" + b" " * 300_000 + b"}", auth=(USER, PASSWORD))
    assert too_big.status_code == 413
    assert not directory.exists() or list(directory.iterdir()) == []  # nothing refused was landed
    ok = post(url, good)
    assert ok.status_code == 200 and ok.json() == {"action": "add_members", "status": "success"}
    (landed,) = directory.iterdir()  # on disk (fsynced, renamed into place) before the answer came back
    assert httpx.Response(200, content=landed.read_bytes()).json() == good


def test_a_body_that_cannot_be_persisted_is_not_acknowledged(env, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the landing folder should be")
    for name, value in {"MIXSYNC_COHORT_WEBHOOK_USER": USER, "MIXSYNC_COHORT_WEBHOOK_PASSWORD": PASSWORD,
                        "MIXSYNC_COHORT_WEBHOOK_DIR": str(blocker / "sub")}.items():
        monkeypatch.setenv(name, value)
    server = serve("cohort-receiver", build_app(CohortWebhookSettings.from_env()))
    try:
        answer = post(server.url, body("add_members", 7, "VIPs", ["a"]))
    finally:
        server.stop()
    assert answer.status_code == 503 and answer.json()["status"] == "failure"


def owned(flagsmith, key):
    return {i for i, traits in flagsmith.all_traits().items() if traits.get(key) is True}


def apply(instance, sandbox):
    context = dg.build_sensor_context(instance=instance)
    request = mixpanel_cohort_webhook_sensor(context)
    assert isinstance(request, dg.RunRequest)
    return dg.materialize([mixpanel_cohort_webhook_members, flagsmith_cohort_traits], instance=instance,
                          resources=RESOURCES)


def meta(result, node="mixpanel_cohort_webhook_members"):
    return {k: v.value for k, v in result.asset_materializations_for_node(node)[0].metadata.items()}


@pytest.mark.slow
def test_webhooks_and_the_poll_share_one_trait_and_one_ledger(sandbox, receiver, instance, warehouse):
    url, directory = receiver
    query, flagsmith = sandbox.mixpanel.query, sandbox.flagsmith
    cohort = next(iter(query.cohorts.values()))
    key = trait_key("mp_cohort_", cohort.id, cohort.name)
    # The poll first: the cohort's current members get the trait.
    dg.materialize([mixpanel_cohorts, mixpanel_cohort_members, flagsmith_cohort_traits], instance=instance,
                   resources=RESOURCES)
    polled = set(cohort.members)
    assert owned(flagsmith, key) == polled
    # A snapshot in two pages of one session, page 2 first and twice (at least once): nothing until page 1.
    snapshot = [*sorted(polled)[:-3], "newcomer-1", "newcomer-2"]
    half = len(snapshot) // 2
    assert post(url, body("members", cohort.id, cohort.name, snapshot[half:], "sess-9", 2, 2)).status_code == 200
    assert post(url, body("members", cohort.id, cohort.name, snapshot[half:], "sess-9", 2, 2)).status_code == 200
    first = meta(apply(instance, sandbox))
    assert first["pages_waiting"] == 2 and owned(flagsmith, key) == polled
    assert list(directory.iterdir()) == []  # recorded in DuckDB, so the sensor has nothing more to do
    assert mixpanel_cohort_webhook_sensor(dg.build_sensor_context(instance=instance)).__class__ is dg.SkipReason
    assert post(url, body("members", cohort.id, cohort.name, snapshot[:half], "sess-9", 1, 2)).status_code == 200
    second = meta(apply(instance, sandbox))
    assert second["members_entered"] == 2 and second["members_left"] == 3
    assert owned(flagsmith, key) == set(snapshot)
    # add / remove; a delivery repeated changes nothing more.
    for _ in range(2):
        assert post(url, body("add_members", cohort.id, cohort.name, ["late-joiner"])).status_code == 200
        assert post(url, body("remove_members", cohort.id, cohort.name, ["newcomer-1"])).status_code == 200
    apply(instance, sandbox)
    expected = set(snapshot) - {"newcomer-1"} | {"late-joiner"}
    assert owned(flagsmith, key) == expected
    assert flagsmith.traits("newcomer-1")[key] is False
    # The same snapshot session delivered again later: a repeat, applied once.
    assert post(url, body("members", cohort.id, cohort.name, snapshot[:half], "sess-9", 1, 2)).status_code == 200
    assert meta(apply(instance, sandbox))["outcomes"] == {"members: repeat": 1}
    assert owned(flagsmith, key) == expected
    with warehouse.read() as con:
        dupes = con.execute("""SELECT count(*) FROM (SELECT identifier, trait_key FROM sync.flagsmith_traits
                               GROUP BY ALL HAVING count(*) > 1)""").fetchone()[0]
        keys = {r[0] for r in con.execute("SELECT DISTINCT trait_key FROM sync.flagsmith_traits "
                                          "WHERE cohort_id = ?", [cohort.id]).fetchall()}
        history = con.execute("""SELECT change, count(*) FROM mixpanel.cohort_membership_history
                                 WHERE distinct_id = 'late-joiner' GROUP BY ALL""").fetchall()
    assert dupes == 0 and keys == {key} and history == [("entered", 1)]
    # The hourly poll runs again: Mixpanel's engage still says the old membership, and the poll reconciles to it.
    dg.materialize([mixpanel_cohorts, mixpanel_cohort_members, flagsmith_cohort_traits], instance=instance,
                   resources=RESOURCES)
    assert owned(flagsmith, key) == polled


def test_missing_credentials_name_the_variables(monkeypatch):
    monkeypatch.delenv("MIXSYNC_COHORT_WEBHOOK_USER", raising=False)
    from mixsync.settings import SettingsError

    with pytest.raises(SettingsError, match="MIXSYNC_COHORT_WEBHOOK_USER"):
        CohortWebhookSettings.from_env({"MIXSYNC_COHORT_WEBHOOK_PASSWORD": PASSWORD})
    with pytest.raises(SettingsError, match="16 characters"):
        CohortWebhookSettings.from_env({"MIXSYNC_COHORT_WEBHOOK_USER": "u", "MIXSYNC_COHORT_WEBHOOK_PASSWORD": "x"})


def test_receive_cohorts_command_serves_on_the_shared_hardened_server(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    landing = tmp_path / "cohort_webhooks"
    env = {**os.environ, "MIXSYNC_COHORT_WEBHOOK_DIR": str(landing), "MIXSYNC_COHORT_WEBHOOK_USER": USER,
           "MIXSYNC_COHORT_WEBHOOK_PASSWORD": PASSWORD, "MIXSYNC_WEBHOOK_BODY_TIMEOUT_SECONDS": "2"}
    server = subprocess.Popen([sys.executable, "-m", "mixsync.cli", "receive-cohorts", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if loopback.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the receiver did not start"
            time.sleep(0.05)
        assert post(url, body("remove_members", 3, "Churn Risk", ["x"])).json() == {
            "action": "remove_members", "status": "success"}
        # A sender that never finishes its body is cut off (the shared server's request deadline).
        with socket.create_connection(("127.0.0.1", port)) as slow:
            auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            slow.sendall(f"POST /cohorts HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
            slow.settimeout(30)
            answer = slow.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408")
    finally:
        server.terminate()  # SIGTERM ends it (communicate would time out otherwise)
        output = server.communicate(timeout=30)[0].decode()
    assert len([p for p in landing.iterdir() if p.name.startswith("cohorts-")]) == 1
    assert PASSWORD not in output


def test_bodies_whose_run_failed_are_asked_for_again_without_waiting_for_a_new_body(receiver, instance):
    url, _ = receiver
    assert post(url, body("add_members", 7, "VIPs", ["a"])).status_code == 200
    first = mixpanel_cohort_webhook_sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(first, dg.RunRequest)
    from mixsync.definitions import defs

    job = defs.resolve_job_def("mixpanel_cohort_webhook_job")
    # A run for the key exists and has not ended: nothing more is asked for.
    running = instance.create_run_for_job(job, tags={"dagster/run_key": first.run_key},
                                          status=dg.DagsterRunStatus.STARTED)
    assert isinstance(mixpanel_cohort_webhook_sensor(dg.build_sensor_context(instance=instance)), dg.SkipReason)
    # It failed (the bodies are still in the folder): the same set is asked for again, under a new key.
    instance.report_run_failed(running)
    again = mixpanel_cohort_webhook_sensor(dg.build_sensor_context(instance=instance))
    assert isinstance(again, dg.RunRequest) and again.run_key == f"{first.run_key}-again-1"


def test_a_landing_folder_named_with_glob_characters_is_read_as_itself(env, tmp_path, monkeypatch, instance, warehouse):
    """The folder's name holds `*`: read as a pattern, it would also match a sibling folder holding a file of the
    same name (another cohort's body), and that body would be applied too."""
    directory = tmp_path / "hooks*"
    with cohort_receiver(directory, monkeypatch) as url:
        assert post(url, body("add_members", 7, "VIPs", ["a", "b"])).status_code == 200
    [landed] = list(directory.iterdir())
    sibling = tmp_path / "hooks-elsewhere"
    sibling.mkdir()
    (sibling / landed.name).write_text(json.dumps(body("add_members", 8, "Others", ["z"])))
    result = dg.materialize([mixpanel_cohort_webhook_members], instance=instance, resources=RESOURCES)
    assert result.success and list(directory.iterdir()) == []
    with warehouse.read() as con:
        assert con.execute("SELECT count(*) FROM mixpanel.cohort_webhook_bodies").fetchone()[0] == 1
        members = con.execute("SELECT cohort_id, distinct_id FROM mixpanel.cohort_members").fetchall()
    assert sorted(members) == [(7, "a"), (7, "b")]
