"""`mixsync sandbox`: fixed default ports (so pasted `export` lines stay valid), overridable by env or flags."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from click.testing import CliRunner
from waiting import free_ports

from mixsync.cli import SANDBOX_PORTS, main

MIXSYNC = str(Path(sys.executable).with_name("mixsync"))




def _read_exports(process: subprocess.Popen, timeout: float = 120.0) -> dict[str, str]:
    """The `export NAME=value` lines the sandbox prints, read until the URLs are all there (with a deadline)."""
    exports: dict[str, str] = {}
    lines: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    deadline = time.monotonic() + timeout
    while not {"MIXPANEL_BASE_URL", "SPLIT_EVENTS_URL", "FLAGSMITH_API_URL"} <= exports.keys():
        assert time.monotonic() < deadline and process.poll() is None, f"sandbox printed only {exports}"
        with contextlib.suppress(queue.Empty):
            line = lines.get(timeout=0.5)
            if line.startswith("export "):
                name, _, value = line[len("export "):].strip().partition("=")
                exports[name] = value
    return exports


def test_default_ports_are_fixed_and_shown():
    help_text = CliRunner().invoke(main, ["sandbox", "--help"]).output
    for port in SANDBOX_PORTS.values():
        assert str(port) in help_text
    assert len(set(SANDBOX_PORTS.values())) == 3


def test_ports_come_from_the_environment_and_a_taken_port_is_a_clear_error():
    mixpanel, split, flagsmith = free_ports(3)
    env = {**os.environ, "MIXSYNC_SANDBOX_MIXPANEL_PORT": str(mixpanel), "MIXSYNC_SANDBOX_SPLIT_PORT": str(split),
           "MIXSYNC_SANDBOX_FLAGSMITH_PORT": str(flagsmith)}
    args = [MIXSYNC, "sandbox", "--days", "1", "--events-per-day", "50", "--users", "20"]
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)
    try:
        exports = _read_exports(first)
        assert exports["MIXPANEL_BASE_URL"] == f"http://127.0.0.1:{mixpanel}"
        assert exports["SPLIT_EVENTS_URL"] == f"http://127.0.0.1:{split}"
        assert exports["FLAGSMITH_API_URL"].startswith(f"http://127.0.0.1:{flagsmith}")
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert "--mixpanel-port" in second.stderr and "MIXSYNC_SANDBOX_" in second.stderr, second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


def test_a_port_out_of_range_is_a_usage_error_naming_the_option():
    result = CliRunner().invoke(main, ["sandbox", "--mixpanel-port", "99999"])
    assert result.exit_code == 2 and "--mixpanel-port" in result.output and "0<=x<=65535" in result.output


def test_a_fault_the_sandbox_cannot_play_is_refused_not_queued():
    from loopback import client

    from mixsync.sandbox import Sandbox

    post = client.post
    with Sandbox() as sandbox:
        faults = f"{sandbox.url('mixpanel')}/_sandbox/faults"
        refused = post(faults, json={"route": "export", "kind": "bogus"})
        assert refused.status_code == 400 and "unknown fault kind 'bogus'" in refused.json()["error"]
        assert post(faults, content=b"not json").status_code == 400
        assert post(faults, json={"route": "export", "stauts": 503}).status_code == 400  # a misspelt field
        assert post(faults, json={"route": "export", "kind": "status", "status": 503}).status_code == 200
