"""The Mixpanel export client against the sandbox over loopback, and the settings it is built from."""

from __future__ import annotations

import datetime as dt
import gzip

import httpx
import pytest

from mixsync.http import RetryPolicy, RetryStats, ServiceError
from mixsync.mixpanel.client import MixpanelClient
from mixsync.settings import MixpanelSettings, Secret, SettingsError


class SleepRecorder:
    def __init__(self):
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


@pytest.fixture
def sleeps():
    return SleepRecorder()


@pytest.fixture
def client(sandbox, sleeps):
    settings = MixpanelSettings.from_env(sandbox.env())
    with MixpanelClient(settings, RetryPolicy(attempts=4, initial_seconds=0.4, max_seconds=1.0, sleep=sleeps),
                        RetryStats()) as mixpanel:
        yield mixpanel


def lines_of(download) -> list[bytes]:
    opener = gzip.open if download.gzipped else open
    with opener(download.path, "rb") as handle:
        return handle.read().splitlines()


def test_retry_after_is_honoured(sandbox, client, sleeps, tmp_path):
    sandbox.mixpanel.faults.add("export", status=429, retry_after="7", body='{"error": "rate limit"}')
    client.export_to_file(sandbox.dataset.days[0], sandbox.dataset.days[0], tmp_path)
    assert sleeps.delays == [7.0]
    assert client.stats.reasons == {"HTTP 429 from Mixpanel export": 1}


def test_without_retry_after_the_backoff_grows_with_jitter(sandbox, client, sleeps, tmp_path):
    sandbox.mixpanel.faults.add("export", status=429, times=3)
    client.export_to_file(sandbox.dataset.days[0], sandbox.dataset.days[0], tmp_path)
    assert len(sleeps.delays) == 3
    assert 0.2 <= sleeps.delays[0] <= 0.4 and 0.4 <= sleeps.delays[1] <= 0.8 and 0.5 <= sleeps.delays[2] <= 1.0


def test_a_retry_after_longer_than_allowed_fails_with_advice(sandbox, client, tmp_path):
    sandbox.mixpanel.faults.add("export", status=429, retry_after="3600")
    with pytest.raises(ServiceError, match="MIXSYNC_HTTP_MAX_RETRY_AFTER_SECONDS"):
        client.export_to_file(sandbox.dataset.days[0], sandbox.dataset.days[0], tmp_path)


def test_giving_up_after_the_last_attempt_names_the_last_error(sandbox, client, tmp_path):
    sandbox.mixpanel.faults.add("export", status=502, times=10)
    with pytest.raises(ServiceError, match="failed after 4 attempts; last error: HTTP 502"):
        client.export_to_file(sandbox.dataset.days[0], sandbox.dataset.days[0], tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


def test_a_cut_stream_is_fetched_again_and_leaves_no_partial_file(sandbox, client, tmp_path):
    sandbox.mixpanel.faults.add("export", "cut", after_bytes=5000)
    download = client.export_to_file(sandbox.dataset.days[0], sandbox.dataset.days[0], tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [download.path.name]
    assert client.stats.retries == 1
    assert len(lines_of(download)) > 600


def test_the_body_is_kept_as_sent_gzip_and_utf8(sandbox, client, tmp_path):
    download = client.export_to_file(sandbox.dataset.days[0], sandbox.dataset.days[0], tmp_path)
    assert download.gzipped and download.path.suffix == ".gz"
    assert download.bytes == download.path.stat().st_size
    assert "São Paulo".encode() in b"\n".join(lines_of(download))


def test_future_to_date_is_mixpanels_400(sandbox, client, tmp_path):
    tomorrow = dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)
    with pytest.raises(ServiceError, match="to_date cannot be later than today") as caught:
        client.export_to_file(sandbox.dataset.days[0], tomorrow, tmp_path)
    assert caught.value.status == 400


def test_event_and_where_filters(sandbox, client, tmp_path):
    day = sandbox.dataset.days[0]
    start = int(dt.datetime(day.year, day.month, day.day, 12, tzinfo=dt.UTC).timestamp())
    download = client.export_to_file(day, day, tmp_path, events=["$identify", "Purchase"],
                                     where=f'properties["$time"]>=datetime({start})')
    import orjson

    records = [orjson.loads(line) for line in lines_of(download)]
    assert records and {r["event"] for r in records} <= {"$identify", "Purchase"}
    assert all(r["properties"]["time"] >= start * 1000 for r in records)
    request = sandbox.mixpanel.recorder.matching("/api/2.0/export")[-1]
    assert request.params["event"] == '["$identify","Purchase"]'


def test_the_legacy_api_secret_authenticates(sandbox, tmp_path):
    env = {k: v for k, v in sandbox.env().items() if "SERVICE_ACCOUNT" not in k}
    env["MIXPANEL_API_SECRET"] = sandbox.mixpanel.api_secret
    with MixpanelClient(MixpanelSettings.from_env(env)) as legacy:
        download = legacy.export_to_file(sandbox.dataset.days[0], sandbox.dataset.days[0], tmp_path)
    assert download.bytes > 0


def test_wrong_credentials_are_a_401_naming_the_settings(sandbox, tmp_path):
    env = dict(sandbox.env(), MIXPANEL_SERVICE_ACCOUNT_SECRET="not-the-secret")
    with (MixpanelClient(MixpanelSettings.from_env(env)) as wrong,
          pytest.raises(ServiceError, match=r"HTTP 401.*MIXPANEL_SERVICE_ACCOUNT_SECRET") as caught):
        wrong.export_to_file(sandbox.dataset.days[0], sandbox.dataset.days[0], tmp_path)
    assert "not-the-secret" not in str(caught.value)
    assert len(sandbox.mixpanel.recorder.requests) == 1
    assert "authorization" not in sandbox.mixpanel.recorder.requests[0].headers


BASE = {
    "MIXPANEL_PROJECT_ID": "123",
    "MIXPANEL_SERVICE_ACCOUNT_USERNAME": "sa",
    "MIXPANEL_SERVICE_ACCOUNT_SECRET": "s3cr3t-value",
    "MIXPANEL_START_DATE": "2025-01-01",
}


@pytest.mark.parametrize("change,message", [
    ({"MIXPANEL_PROJECT_ID": None}, "MIXPANEL_PROJECT_ID is not set"),
    ({"MIXPANEL_PROJECT_ID": "abc"}, "MIXPANEL_PROJECT_ID='abc' is not a numeric project id"),
    ({"MIXPANEL_SERVICE_ACCOUNT_SECRET": None}, "MIXPANEL_SERVICE_ACCOUNT_SECRET is not set"),
    ({"MIXPANEL_SERVICE_ACCOUNT_USERNAME": None}, "MIXPANEL_SERVICE_ACCOUNT_USERNAME is not set"),
    ({"MIXPANEL_SERVICE_ACCOUNT_USERNAME": None, "MIXPANEL_SERVICE_ACCOUNT_SECRET": None}, "MIXPANEL_API_SECRET"),
    ({"MIXPANEL_REGION": "asia"}, "MIXPANEL_REGION='asia' is not one of us, eu, in"),
    ({"MIXPANEL_BASE_URL": "localhost:8000"}, "MIXPANEL_BASE_URL='localhost:8000' is not an http(s) URL"),
    ({"MIXPANEL_START_DATE": "01/02/2025"}, "MIXPANEL_START_DATE='01/02/2025' is not a date"),
    ({"MIXPANEL_PROJECT_TIMEZONE": "Mars/Olympus"}, "MIXPANEL_PROJECT_TIMEZONE='Mars/Olympus' is not an IANA time zone"),
    ({"MIXPANEL_LEGACY_LOCAL_TIME": "maybe"}, "MIXPANEL_LEGACY_LOCAL_TIME='maybe' is not a boolean"),
    ({"MIXPANEL_EXPORT_WINDOW_DAYS": "0"}, "MIXPANEL_EXPORT_WINDOW_DAYS=0 is out of range"),
])
def test_settings_errors_name_the_variable(change, message):
    env = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(SettingsError) as caught:
        MixpanelSettings.from_env(env)
    assert message in str(caught.value)
    assert "s3cr3t-value" not in str(caught.value)


@pytest.mark.parametrize("region,export_host", [("us", "https://data.mixpanel.com"),
                                                ("eu", "https://data-eu.mixpanel.com"),
                                                ("in", "https://data-in.mixpanel.com")])
def test_regions_pick_their_hosts_and_secrets_stay_hidden(region, export_host):
    settings = MixpanelSettings.from_env({**BASE, "MIXPANEL_REGION": region.upper()})
    assert settings.export_url == export_host
    assert "s3cr3t-value" not in repr(settings) and "s3cr3t-value" not in f"{settings.secret}"
    assert settings.secret.value == "s3cr3t-value"
    assert repr(Secret("x")) == "Secret('********')"


def test_the_client_sends_the_bytes_mixpanel_expects(sandbox, client, tmp_path):
    client.export_to_file(sandbox.dataset.days[0], sandbox.dataset.days[0], tmp_path)
    request = sandbox.mixpanel.recorder.requests[-1]
    assert request.headers["accept-encoding"] == "gzip"
    assert request.params["time_in_ms"] == "true"
    assert request.params["project_id"] == sandbox.mixpanel.project_id
    assert isinstance(client.http, httpx.Client)
