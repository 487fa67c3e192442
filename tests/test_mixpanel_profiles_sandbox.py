"""The emulated /engage (profile updates) answers as Mixpanel's ingestion API does (apis/mixpanel.md)."""

from __future__ import annotations

import httpx
import orjson
import pytest

from mixsync.http import tls_context


@pytest.fixture
def engage(sandbox):
    with httpx.Client(verify=tls_context(), base_url=sandbox.url("mixpanel"), timeout=10) as client:
        yield client, sandbox.mixpanel


def test_set_and_unset_with_verbose_answers(engage):
    client, state = engage
    body = [{"$token": state.token, "$distinct_id": "u1", "$set": {"a": 0, "b": "", "c": False}},
            {"$token": state.token, "$distinct_id": "u2", "$set": {"a": 1}}]
    response = client.post("/engage", params={"verbose": "1", "ip": "0"}, json=body)
    assert response.status_code == 200 and response.json() == {"status": 1, "error": None}
    client.post("/engage", params={"verbose": "1", "ip": "0"},
                json=[{"$token": state.token, "$distinct_id": "u1", "$unset": ["b"]}])
    assert state.profiles.profile("u1") == {"a": 0, "c": False}
    assert state.profiles.profile("u2") == {"a": 1}


def test_validation_problems_are_200_with_status_0(engage):
    client, state = engage
    body = [{"$token": "wrong", "$distinct_id": "x", "$set": {"a": 1}},
            {"$token": state.token, "$set": {"a": 1}},
            {"$token": state.token, "$distinct_id": "y", "$set": {"a": 1}, "$unset": ["a"]},
            {"$token": state.token, "$distinct_id": "ok", "$set": {"a": 1}}]
    response = client.post("/engage", params={"verbose": "1", "ip": "0"}, json=body)
    assert response.status_code == 200
    answer = response.json()
    assert answer["status"] == 0 and "$token" in answer["error"] and "$distinct_id" in answer["error"]
    plain = client.post("/engage", params={"ip": "0"}, json=body[:1])
    assert plain.status_code == 200 and plain.text == "0"
    assert set(state.profiles.all_profiles()) == {"ok"}


def test_form_encoded_and_geolocation_without_ip_0(engage):
    client, state = engage
    data = orjson.dumps({"$token": state.token, "$distinct_id": "f", "$set": {"plan": "pro"}}).decode()
    response = client.post("/engage", data={"data": data, "verbose": "1"})
    assert response.json() == {"status": 1, "error": None}
    assert state.profiles.profile("f")["$city"] == "San Francisco"  # no ip=0: Mixpanel geolocates the sender


def test_gzip_and_oversized_batches_are_refused(engage):
    client, state = engage
    update = {"$token": state.token, "$distinct_id": "g", "$set": {"a": 1}}
    gz = client.post("/engage", params={"verbose": "1"}, content=orjson.dumps([update]),
                     headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert gz.json()["status"] == 0
    many = client.post("/engage", params={"verbose": "1"}, json=[update] * 2001)
    assert many.json()["status"] == 0 and "2000" in many.json()["error"]
    assert state.profiles.all_profiles() == {}


def test_import_accepts_the_sdk_form_body(engage):
    client, state = engage
    import time

    event = {"event": "E", "properties": {"time": int(time.time()) - 60, "distinct_id": "d", "$insert_id": "i-1"}}
    response = client.post("/import", params={"project_id": state.project_id}, auth=(state.username, state.secret),
                           data={"data": orjson.dumps(event).decode(), "verbose": "1"})
    assert response.status_code == 200 and response.json() == {"status": 1, "error": None}
    assert len(state.ingest.held("E")) == 1
