"""Retries, fast: every case through httpx.MockTransport, with the sleeps recorded instead of slept."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

from mixsync.http import RetryPolicy, RetryStats, ServiceError, raise_for_status, with_retries
from mixsync.split.client import SplitEventsClient
from mixsync.split.settings import SplitSettings

URL = "https://api.example.test/thing"


class Script:
    """A MockTransport handler answering from a list, one answer per request; it records what it was sent."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def call(script: Script, policy: RetryPolicy, stats: RetryStats | None = None, hints=None):
    stats = stats if stats is not None else RetryStats()
    with httpx.Client(transport=httpx.MockTransport(script)) as http:
        def attempt() -> str:
            response = http.get(URL)
            raise_for_status(response, "Example API", hints or {})
            return response.text

        return with_retries(attempt, policy, stats, "Example API"), stats


def policy(**kwargs) -> tuple[RetryPolicy, list[float]]:
    slept: list[float] = []
    return RetryPolicy(sleep=slept.append, **kwargs), slept


def test_retry_after_seconds_is_honoured_exactly():
    p, slept = policy(attempts=4)
    script = Script(httpx.Response(429, headers={"Retry-After": "7"}, text="slow down"), httpx.Response(200, text="ok"))
    text, stats = call(script, p)
    assert text == "ok" and slept == [7.0] and len(script.requests) == 2
    assert stats.retries == 1 and stats.waited_seconds == 7.0 and dict(stats.reasons) == {"HTTP 429 from Example API": 1}


def test_retry_after_as_an_http_date_is_honoured():
    p, slept = policy(attempts=2)
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    _, _ = call(Script(httpx.Response(503, headers={"Retry-After": when}), httpx.Response(200)), p)
    assert len(slept) == 1 and 25 <= slept[0] <= 31


def test_without_retry_after_the_backoff_doubles_with_jitter_up_to_the_cap():
    p, slept = policy(attempts=7, initial_seconds=1.0, max_seconds=8.0)
    script = Script(*[httpx.Response(502)] * 6, httpx.Response(200))
    call(script, p)
    ceilings = [1, 2, 4, 8, 8, 8]
    assert len(slept) == 6
    assert all(c / 2 <= s <= c for s, c in zip(slept, ceilings, strict=True)), slept


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retried(status):
    p, slept = policy(attempts=3, initial_seconds=0.001)
    text, stats = call(Script(httpx.Response(status), httpx.Response(200, text="fine")), p)
    assert text == "fine" and stats.retries == 1 and len(slept) == 1


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 422])
def test_permanent_statuses_fail_at_once_with_the_body_and_the_hint(status):
    p, slept = policy(attempts=5)
    script = Script(httpx.Response(status, text="you sent something wrong"))
    with pytest.raises(ServiceError) as caught:
        call(script, p, hints={status: "Check EXAMPLE_KEY"})
    assert len(script.requests) == 1 and slept == []
    assert caught.value.status == status
    assert f"HTTP {status}" in str(caught.value) and "you sent something wrong" in str(caught.value)
    assert "Check EXAMPLE_KEY" in str(caught.value)


def test_a_cut_connection_is_retried():
    p, slept = policy(attempts=3, initial_seconds=0.001)
    text, stats = call(Script(httpx.ConnectError("connection refused"), httpx.ReadError("reset"),
                              httpx.Response(200, text="back")), p)
    assert text == "back" and stats.retries == 2 and len(slept) == 2
    assert set(stats.reasons) == {"ConnectError", "ReadError"}


def test_attempts_run_out_with_the_last_error():
    p, slept = policy(attempts=3, initial_seconds=0.001)
    script = Script(*[httpx.Response(503, text="down for maintenance")] * 3)
    with pytest.raises(ServiceError, match=r"failed after 3 attempts; last error: HTTP 503.*down for maintenance"):
        call(script, p)
    assert len(script.requests) == 3 and len(slept) == 2


def test_a_retry_after_longer_than_the_limit_fails_naming_the_setting_without_sleeping():
    p, slept = policy(attempts=5, max_retry_after_seconds=60)
    script = Script(httpx.Response(429, headers={"Retry-After": "3600"}))
    with pytest.raises(ServiceError, match="MIXSYNC_HTTP_MAX_RETRY_AFTER_SECONDS=60"):
        call(script, p)
    assert slept == [] and len(script.requests) == 1


def test_policy_from_env_reads_the_settings():
    p = RetryPolicy.from_env({"MIXSYNC_HTTP_ATTEMPTS": "3", "MIXSYNC_HTTP_BACKOFF_MS": "250",
                              "MIXSYNC_HTTP_BACKOFF_MAX_MS": "1000", "MIXSYNC_HTTP_MAX_RETRY_AFTER_SECONDS": "30"})
    assert (p.attempts, p.initial_seconds, p.max_seconds, p.max_retry_after_seconds) == (3, 0.25, 1.0, 30)


def test_the_split_client_resends_the_same_body_after_a_429():
    slept: list[float] = []
    script = Script(httpx.Response(429, headers={"Retry-After": "2"}), httpx.Response(202))
    settings = SplitSettings.from_env({"SPLIT_SDK_KEY": "sdk-key-for-tests", "SPLIT_EVENTS_URL": "https://split.test"})
    with SplitEventsClient(settings, RetryPolicy(attempts=3, sleep=slept.append),
                           transport=httpx.MockTransport(script)) as client:
        client.send_payloads([b'{"eventTypeId":"a"}', b'{"eventTypeId":"b"}'])
    assert slept == [2.0] and client.requests_sent == 2 and client.stats.retries == 1
    assert [r.content for r in script.requests] == [b'[{"eventTypeId":"a"},{"eventTypeId":"b"}]'] * 2
    assert all(r.url == "https://split.test/api/events/bulk" for r in script.requests)
    assert script.requests[0].headers["authorization"] == "Bearer sdk-key-for-tests"


def test_every_client_verifies_tls_through_one_shared_context(sandbox, env):
    """Building a verifying context reads the CA bundle; the clients share one that still checks certificates."""
    import ssl

    from mixsync.flagsmith.client import FlagsmithClient
    from mixsync.flagsmith.settings import FlagsmithSettings
    from mixsync.http import tls_context
    from mixsync.mixpanel.client import MixpanelClient
    from mixsync.settings import MixpanelSettings

    context = tls_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    clients = [SplitEventsClient(SplitSettings.from_env()), MixpanelClient(MixpanelSettings.from_env()),
               FlagsmithClient(FlagsmithSettings.from_env())]
    for client in clients:
        # httpx's transport keeps the context it was given in its connection pool.
        assert client.http._transport._pool._ssl_context is context
        client.http.close()
