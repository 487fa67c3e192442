"""The Split Events client against the emulated Events API: what Split accepts, refuses, and how errors read."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from mixsync.http import OutcomeUnknown, RetryPolicy, RetryStats, ServiceError
from mixsync.sandbox.split import BULK_ROUTE
from mixsync.settings import SettingsError
from mixsync.split.client import SplitEventsClient
from mixsync.split.settings import SplitSettings

GOOD = {"eventTypeId": "purchase", "trafficTypeName": "user", "key": "u-1", "timestamp": 1_773_187_199_123,
        "value": 9.5, "properties": {"plan": "pro", "n": 3, "ok": True, "none": None}}


@pytest.fixture
def client(sandbox, env):
    stats = RetryStats()
    with SplitEventsClient(SplitSettings.from_env(), RetryPolicy(attempts=4, initial_seconds=0.001), stats) as c:
        yield c


def post(client, events: list[dict]) -> None:
    client.send_payloads([orjson.dumps(e) for e in events])


def test_accepted_events_are_recorded_as_sent(sandbox, client):
    post(client, [GOOD, {**GOOD, "value": None, "properties": None}])
    assert sandbox.split.accepted == 2 and sandbox.split.events[0] == GOOD
    request = sandbox.split.recorder.matching(BULK_ROUTE)[0]
    assert request.status == 202 and request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers and "content-encoding" not in request.headers


@pytest.mark.parametrize("change, message", [
    ({"eventTypeId": "has space"}, "eventTypeId 'has space' must match"),
    ({"eventTypeId": "checkout:step"}, "must match"),
    ({"eventTypeId": "x" * 64}, "must match"),
    ({"trafficTypeName": "User"}, "traffic type 'User' does not exist"),
    ({"key": ""}, "key must be a non-empty string"),
    ({"key": "k" * 251}, "at most 250 characters"),
    ({"timestamp": "1773187199"}, "timestamp must be an integer"),
    ({"timestamp": 1_773_187_199}, "looks like seconds"),
    ({"value": True}, "value must be a number or null"),
    ({"value": "9.5"}, "value must be a number or null"),
    ({"properties": {"cart": {"total": 3}}}, "property 'cart' is nested"),
    ({"properties": {"tags": ["a"]}}, "property 'tags' is nested"),
    ({"properties": {f"k{n}": "x" * 2000 for n in range(9)}}, "properties exceed 32768 bytes"),
    ({"environmentName": "Staging"}, "environmentName 'Staging' is not the SDK key's environment"),
])
def test_the_sandbox_refuses_what_split_refuses_and_the_client_does_not_retry(sandbox, client, change, message):
    with pytest.raises(ServiceError) as error:
        post(client, [GOOD, {**GOOD, **change}])
    assert error.value.status == 400 and message in str(error.value) and "event 1" in str(error.value)
    assert "SPLIT_TRAFFIC_TYPE" in str(error.value)  # the hint names the settings to check
    assert sandbox.split.accepted == 0 and len(sandbox.split.recorder.matching(BULK_ROUTE)) == 1
    assert client.stats.retries == 0


def test_split_keeps_300_properties_of_an_event_with_more(sandbox, client):
    post(client, [{**GOOD, "properties": {f"p{n:03d}": n for n in range(320)}}])
    assert len(sandbox.split.events[0]["properties"]) == 300 and sandbox.split.trimmed_events == 1


@pytest.mark.parametrize("key, message", [
    ("admin", "an Admin API key cannot send events"),
    ("nope", "unknown SDK key"),
])
def test_wrong_keys_fail_fast_naming_the_setting_without_showing_the_key(sandbox, env, key, message):
    secret = sandbox.split.admin_key if key == "admin" else "not-a-real-key-123"
    settings = dataclasses.replace(SplitSettings.from_env(), sdk_key=type(SplitSettings.from_env().sdk_key)(secret))
    assert secret not in repr(settings)
    with (SplitEventsClient(settings, RetryPolicy(attempts=4, initial_seconds=0.001)) as client,
          pytest.raises(ServiceError) as error):
        post(client, [GOOD])
    text = str(error.value)
    assert error.value.status == 401 and message in text and "SPLIT_SDK_KEY" in text and secret not in text
    assert len(sandbox.split.recorder.matching(BULK_ROUTE)) == 1


def test_a_wrong_url_names_the_setting(sandbox, env, monkeypatch):
    monkeypatch.setenv("SPLIT_EVENTS_URL", sandbox.url("split") + "/nowhere")
    with (SplitEventsClient(SplitSettings.from_env(), RetryPolicy(attempts=2, initial_seconds=0.001)) as client,
          pytest.raises(ServiceError, match=r"HTTP 404.*SPLIT_EVENTS_URL")):
        post(client, [GOOD])


def test_429_and_503_are_retried_with_retry_after(sandbox, client):
    sandbox.split.faults.add(BULK_ROUTE, status=429, retry_after="0", times=2)
    sandbox.split.faults.add(BULK_ROUTE, status=503, times=1)
    post(client, [GOOD])
    assert sandbox.split.accepted == 1 and client.stats.retries == 3


@pytest.mark.parametrize("status", [500, 502, 504])
def test_an_answer_that_leaves_the_outcome_unknown_is_not_retried(sandbox, client, status):
    sandbox.split.faults.add(BULK_ROUTE, status=status, times=1)
    with pytest.raises(OutcomeUnknown, match=f"HTTP {status}"):
        post(client, [GOOD])
    assert len(sandbox.split.recorder.matching(BULK_ROUTE)) == 1 and client.stats.retries == 0


def test_retries_run_out_with_a_clear_error(sandbox, client):
    sandbox.split.faults.add(BULK_ROUTE, status=503, body="down for maintenance", times=10)
    with pytest.raises(ServiceError, match=r"failed after 4 attempts.*HTTP 503.*down for maintenance"):
        post(client, [GOOD])
    assert sandbox.split.accepted == 0


@pytest.mark.parametrize("name, value, message", [
    ("SPLIT_SDK_KEY", None, "SPLIT_SDK_KEY is not set"),
    ("SPLIT_SDK_KEY", "two words", "SPLIT_SDK_KEY contains whitespace"),
    ("SPLIT_EVENTS_URL", "events.split.io", "SPLIT_EVENTS_URL='events.split.io' is not an http(s) URL"),
    ("SPLIT_TRAFFIC_TYPE", "User", "lowercase"),
    ("SPLIT_BATCH_SIZE", "5000", "SPLIT_BATCH_SIZE=5000 is out of range"),
    ("SPLIT_PUSH_CONCURRENCY", "many", "SPLIT_PUSH_CONCURRENCY='many' is not a whole number"),
])
def test_settings_errors_name_the_variable(name, value, message):
    environ = {"SPLIT_SDK_KEY": "k"}
    if value is None:
        environ.pop(name, None)
    else:
        environ[name] = value
    with pytest.raises(SettingsError) as error:
        SplitSettings.from_env(environ)
    assert message in str(error.value)


def test_settings_defaults():
    settings = SplitSettings.from_env({"SPLIT_SDK_KEY": "k"})
    assert settings.events_url == "https://events.split.io" and settings.traffic_type == "user"
    assert settings.batch_size == 1000 and settings.concurrency == 4 and settings.environment is None
    assert settings.mapping_file is None and "k" not in repr(settings.sdk_key)
