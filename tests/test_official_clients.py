"""Clients nobody here wrote (Mixpanel's, Flagsmith's and Split's official SDKs, Airbyte's request shape) work
against the sandbox as they do against the real services."""

from __future__ import annotations

import threading
import time

import httpx
import mixpanel
import pytest
from flagsmith import Flagsmith
from mixpanel import Consumer, Mixpanel, ServiceAccountCredentials
from waiting import poll

from mixsync.http import tls_context


@pytest.fixture
def mp(sandbox):
    state = sandbox.mixpanel
    url = sandbox.url("mixpanel")
    credentials = ServiceAccountCredentials(username=state.username, secret=state.secret, project_id=state.project_id)
    consumer = Consumer(events_url=f"{url}/track", people_url=f"{url}/engage", import_url=f"{url}/import",
                        credentials=credentials, retry_limit=0, request_timeout=10)
    return Mixpanel(state.token, consumer=consumer)


def test_mixpanel_sdk_import_data_lands_in_the_sandbox(mp, sandbox):
    old = int(time.time()) - 30 * 24 * 3600  # older than /track accepts: what import_data exists for
    mp.import_data(api_key=None, distinct_id="sdk-user-1", event_name="Signed Up", timestamp=old,
                   properties={"plan": "pro", "nested": {"a": [1, 2]}})
    held = sandbox.mixpanel.ingest.held("Signed Up")
    assert len(held) == 1
    props = held[0]["properties"]
    assert props["distinct_id"] == "sdk-user-1" and props["time"] == old and props["plan"] == "pro"
    assert props["nested"] == {"a": [1, 2]} and props["mp_lib"] == "python"
    (request,) = sandbox.mixpanel.recorder.matching("/import")
    assert request.status == 200 and request.params == {"project_id": sandbox.mixpanel.project_id}
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"


def test_mixpanel_sdk_import_refusal_is_an_sdk_error(sandbox):
    state = sandbox.mixpanel
    url = sandbox.url("mixpanel")
    wrong = ServiceAccountCredentials(username=state.username, secret="wrong", project_id=state.project_id)
    client = Mixpanel(state.token, consumer=Consumer(import_url=f"{url}/import", credentials=wrong, retry_limit=0))
    with pytest.raises(mixpanel.MixpanelException):
        client.import_data(api_key=None, distinct_id="u", event_name="E", timestamp=int(time.time()) - 3600)
    right = Mixpanel(state.token, consumer=Consumer(import_url=f"{url}/import", retry_limit=0, credentials=
                                                     ServiceAccountCredentials(state.username, state.secret,
                                                                               state.project_id)))
    with pytest.raises(mixpanel.MixpanelException, match=r"properties\.time"):
        right.import_data(api_key=None, distinct_id="u", event_name="E", timestamp=10)  # before 1971
    assert sandbox.mixpanel.ingest.held() == []


def test_mixpanel_sdk_track_and_people_set(mp, sandbox):
    mp.track("sdk-user-2", "Opened App", {"screen": "home"})
    (event,) = sandbox.mixpanel.ingest.held("Opened App")
    assert event["properties"]["distinct_id"] == "sdk-user-2" and event["properties"]["screen"] == "home"
    mp.people_set("sdk-user-2", {"plan": "pro", "seats": 0, "beta": False})
    mp.people_unset("sdk-user-2", ["seats"])
    # The SDK sends ip=0: the sandbox would otherwise geolocate the profile from the request's address.
    assert sandbox.mixpanel.profiles.profile("sdk-user-2") == {"plan": "pro", "beta": False}


def test_track_refuses_events_older_than_five_days(mp, sandbox):
    with pytest.raises(mixpanel.MixpanelException, match="5 days"):
        mp.track("u", "Old", {"time": int(time.time()) - 6 * 24 * 3600})
    assert sandbox.mixpanel.ingest.held("Old") == []


def test_airbyte_style_json_body_reads_cohort_members(sandbox):
    """Airbyte's source-mixpanel `cohort_members`: POST /api/2.0/engage with the paging in the query string and
    `{"filter_by_cohort": "{\"id\":N}"}` as a JSON body; later pages carry page and session_id."""
    state = sandbox.mixpanel
    cohort = next(c for c in state.query.cohorts.values() if len(c.members) > 5)
    url = sandbox.url("mixpanel") + "/api/2.0/engage"
    seen: list[str] = []
    with httpx.Client(verify=tls_context(), auth=(state.username, state.secret), timeout=10) as client:
        params = {"project_id": state.project_id, "page_size": 5}
        body = {"filter_by_cohort": f'{{"id":{cohort.id}}}'}
        first = client.post(url, params=params, json=body)
        assert first.status_code == 200, first.text
        page = first.json()
        total = page["total"]
        while page["results"]:
            seen += [str(r["$distinct_id"]) for r in page["results"]]
            if len(seen) >= total:
                break
            params = {**params, "page": page["page"] + 1, "session_id": page["session_id"]}
            page = client.post(url, params=params, json=body).json()
        # A JSON object for the filter is accepted too; a JSON body that is not an object is refused clearly.
        assert client.post(url, params={"project_id": state.project_id},
                           json={"filter_by_cohort": {"id": cohort.id}}).status_code == 200
        refused = client.post(url, params={"project_id": state.project_id}, json=[1])
        assert refused.status_code == 400 and "object" in refused.text
    assert sorted(seen) == sorted(cohort.members)


@pytest.fixture
def flagsmith_features(sandbox):
    fs = sandbox.flagsmith
    fs.add_feature("checkout_v2", enabled=True, value=None)
    fs.add_feature("max_items", enabled=True, value=0)
    fs.add_feature("banner_text", enabled=True, value="")
    fs.add_feature("ratio", enabled=True, value=0.25)
    fs.add_feature("dark_mode", enabled=False, value="on")
    fs.override("vip-1", "dark_mode", True, "forced")
    fs.override("vip-1", "max_items", True, 50)
    return fs


def test_flagsmith_sdk_identity_and_environment_flags(sandbox, flagsmith_features):
    fs = flagsmith_features
    client = Flagsmith(environment_key=fs.server_key, api_url=sandbox.url("flagsmith") + "/api/v1/",
                       request_timeout_seconds=10)
    flags = client.get_identity_flags("vip-1", traits={"plan": "pro", "temp": {"value": 1, "transient": True}})
    assert flags.is_feature_enabled("dark_mode") and flags.get_feature_value("dark_mode") == "forced"
    assert flags.get_feature_value("max_items") == 50
    assert flags.get_feature_value("banner_text") == "" and flags.is_feature_enabled("banner_text")
    assert flags.get_feature_value("ratio") == 0.25 and flags.get_feature_value("checkout_v2") is None
    assert fs.traits("vip-1") == {"plan": "pro"}  # the transient trait was not stored
    plain = client.get_identity_flags("someone")
    assert not plain.is_feature_enabled("dark_mode") and plain.get_feature_value("max_items") == 0
    environment = client.get_environment_flags()
    assert {f.feature_name for f in environment.all_flags()} == set(fs.features)
    client.get_identity_flags("passer-by", traits={"x": 1}, transient=True)
    assert "passer-by" not in fs.all_traits()  # an identity-level transient request stores nothing


def test_splitio_sdk_track_reaches_the_events_api(sandbox):
    from splitio import get_factory

    api = sandbox.url("split") + "/api"
    factory = get_factory(sandbox.split.sdk_key, sdk_api_base_url=api, events_api_base_url=api,
                          auth_api_base_url=api, telemetry_api_base_url=api,
                          # A destroy() that overtakes the SDK's own start-up (it goes on after block_until_ready)
                          # skips the final flush, and the queued event waits for the periodic push instead: every
                          # second here rather than the default ten.
                          config={"streamingEnabled": False, "connectionTimeout": 5000, "readTimeout": 5000,
                                  "eventsPushRate": 1})
    try:
        factory.block_until_ready(15)
        client = factory.client()
        assert client.track("sdk-user-3", "user", "purchase", 12.5, {"plan": "pro"}) is True
    finally:
        done = threading.Event()
        factory.destroy(done)  # flushes the queued events before stopping
        done.wait(15)
    received = poll(lambda: [e for e in sandbox.split.events if e["eventTypeId"] == "purchase"], 20,
                    what="the SDK's event at the sandbox")
    (event,) = received
    assert event["key"] == "sdk-user-3" and event["trafficTypeName"] == "user" and event["value"] == 12.5
    assert event["properties"] == {"plan": "pro"}
