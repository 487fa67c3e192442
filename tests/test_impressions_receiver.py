"""The impressions webhook receiver over real HTTP: what lands on disk, and what is refused."""

from __future__ import annotations

import gzip
import os

import httpx
import loopback
import orjson
import pytest

from mixsync.impressions.receiver import build_app
from mixsync.impressions.settings import ImpressionsSettings
from mixsync.sandbox.impressions import ImpressionGenerator, encode, post_batches
from mixsync.sandbox.server import serve
from mixsync.settings import SettingsError

TOKEN = "s3cr3t-token-for-tests-only"


@pytest.fixture
def landing(tmp_path):
    return tmp_path / "impressions"


def start(landing, **env):
    settings = ImpressionsSettings.from_env({"MIXSYNC_IMPRESSIONS_DIR": str(landing), **env})
    return serve("receiver", build_app(settings))


@pytest.fixture
def receiver(landing):
    running = start(landing)
    yield running
    running.stop()


@pytest.fixture
def token_receiver(landing):
    running = start(landing, MIXSYNC_WEBHOOK_TOKEN=TOKEN)
    yield running
    running.stop()


def landed(landing):
    return sorted(os.listdir(landing)) if landing.exists() else []


def test_gzipped_body_lands_byte_for_byte(receiver, landing):
    batch = ImpressionGenerator(seed=1).batch(120)
    body, headers = encode(batch, gzipped=True)
    response = loopback.post(receiver.url + "/impressions", content=body, headers=headers)
    assert response.status_code == 200
    [name] = landed(landing)
    assert name.endswith(".json.gz")
    assert (landing / name).read_bytes() == body
    assert orjson.loads(gzip.decompress((landing / name).read_bytes())) == batch


def test_plain_body_lands(receiver, landing):
    batch = ImpressionGenerator(seed=2).batch(30)
    body, headers = encode(batch, gzipped=False)
    assert loopback.post(receiver.url + "/impressions", content=body, headers=headers).status_code == 200
    [name] = landed(landing)
    assert name.endswith(".json") and not name.endswith(".gz")
    assert orjson.loads((landing / name).read_bytes()) == batch


def test_gzip_without_header_is_sniffed(receiver, landing):
    body = gzip.compress(orjson.dumps(ImpressionGenerator(seed=3).batch(5)))
    assert loopback.post(receiver.url + "/impressions", content=body).status_code == 200
    assert landed(landing)[0].endswith(".json.gz")


@pytest.mark.parametrize("body, status, message", [
    (b'{"key": "u1"}', 400, "not an array"),
    (b"not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "element 0"),
    (b'[{"key": "u1", "split": "s", "treatment": "on", "time": 1}]', 400, "environmentId"),
    (gzip.compress(b"[" * 10, mtime=0)[:8], 400, "gzip"),
])
def test_a_body_that_is_not_an_array_of_impressions_is_refused(receiver, landing, body, status, message):
    response = loopback.post(receiver.url + "/impressions", content=body)
    assert response.status_code == status
    assert message in response.json()["error"]
    assert landed(landing) == []


def test_empty_array_is_acknowledged_without_a_file(receiver, landing):
    assert loopback.post(receiver.url + "/impressions", content=b"[]").status_code == 200
    assert landed(landing) == []


def test_token_is_required_when_set(token_receiver, landing):
    body, headers = encode(ImpressionGenerator(seed=4).batch(10))
    assert loopback.post(token_receiver.url + "/impressions", content=body, headers=headers).status_code == 401
    assert loopback.post(token_receiver.url + "/impressions/wrong-token-xxxxxxxx", content=body,
                      headers=headers).status_code == 404
    assert landed(landing) == []
    assert loopback.post(token_receiver.url + f"/impressions/{TOKEN}", content=body, headers=headers).status_code == 200
    assert len(landed(landing)) == 1


def test_a_guessable_token_is_refused_at_start():
    with pytest.raises(SettingsError, match="MIXSYNC_WEBHOOK_TOKEN"):
        ImpressionsSettings.from_env({"MIXSYNC_WEBHOOK_TOKEN": "abc"})


def test_bodies_over_the_limit_are_refused(landing):
    running = start(landing, MIXSYNC_WEBHOOK_MAX_BYTES="2048")
    try:
        big = orjson.dumps(ImpressionGenerator(seed=5).batch(50))
        assert len(big) > 2048
        assert loopback.post(running.url + "/impressions", content=big).status_code == 413
        # Small on the wire, big once decompressed: the limit applies to both.
        bomb = gzip.compress(b"[" + b" " * 100_000 + b"]")
        assert len(bomb) < 2048
        assert loopback.post(running.url + "/impressions", content=bomb,
                          headers={"Content-Encoding": "gzip"}).status_code == 413
    finally:
        running.stop()
    assert landed(landing) == []


def test_a_body_that_fails_to_persist_gets_no_200(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the landing folder should be")
    running = start(blocker / "impressions")
    try:
        body, headers = encode(ImpressionGenerator(seed=6).batch(10))
        response = loopback.post(running.url + "/impressions", content=body, headers=headers)
        health = loopback.get(running.url + "/health").json()
    finally:
        running.stop()
    assert response.status_code == 503
    assert "could not persist" in response.json()["error"]
    assert health["bodies_failed"] == 1 and health["bodies_written"] == 0


def test_generator_posts_realistic_batches(receiver, landing):
    report = post_batches(receiver.url + "/impressions", ImpressionGenerator(seed=7), batches=8, size=60,
                          resend_probability=0.5)
    assert report.statuses == {200: report.bodies}
    assert report.resent > 0
    files = landed(landing)
    assert len(files) == report.bodies
    impressions = [i for name in files for i in orjson.loads(gzip.decompress((landing / name).read_bytes()))]
    assert len(impressions) == report.impressions + report.resent * 60
    assert {"key", "split", "treatment", "label", "time", "splitVersionNumber", "environmentId", "environmentName",
            "sdk", "sdkVersion", "machineName", "properties"} <= impressions[0].keys()
    assert not [n for n in os.listdir(landing) if n.endswith(".tmp")]


def test_receive_impressions_command_serves_the_webhook(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    landing = tmp_path / "impressions"
    env = {**os.environ, "MIXSYNC_IMPRESSIONS_DIR": str(landing), "MIXSYNC_WEBHOOK_TOKEN": TOKEN}
    server = subprocess.Popen([sys.executable, "-m", "mixsync.cli", "receive-impressions", "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if loopback.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, "the receiver did not start"
            time.sleep(0.05)
        body, headers = encode(ImpressionGenerator(seed=8).batch(10))
        assert loopback.post(f"http://127.0.0.1:{port}/impressions/{TOKEN}", content=body, headers=headers).status_code == 200
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode()
    assert len(landed(landing)) == 1
    assert "landed impressions-" in output
    assert TOKEN not in output
