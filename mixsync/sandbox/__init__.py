"""Emulated Mixpanel, Split and Flagsmith servers for the demo and the tests; never imported by the flows."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path

from mixsync.sandbox import mixpanel
from mixsync.sandbox.data import Dataset
from mixsync.sandbox.server import RunningServer, serve


class Sandbox:
    """All emulated services, each a real HTTP server on its own 127.0.0.1 port (as in production, each
    service is its own origin). Use as a context manager; `env()` gives the settings that point mixsync at it."""

    def __init__(self, dataset: Dataset | None = None, data_dir: Path | None = None, host: str = "127.0.0.1",
                 ports: dict[str, int] | None = None):
        self.dataset = dataset or Dataset.recent(malformed_per_day=2)
        self._tmp = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mixsync-sandbox-")
            data_dir = Path(self._tmp.name)
        self.data_dir = Path(data_dir)
        self.host = host
        self.ports = ports or {}
        self.mixpanel = mixpanel.MixpanelSandbox(self.dataset, self.data_dir / "mixpanel")
        self.servers: dict[str, RunningServer] = {}

    def start(self) -> "Sandbox":
        self.servers["mixpanel"] = serve("mixpanel", mixpanel.build_app(self.mixpanel), self.mixpanel,
                                         self.host, self.ports.get("mixpanel", 0))
        return self

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()
        self.servers.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "Sandbox":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, service: str) -> str:
        return self.servers[service].url

    def env(self) -> dict[str, str]:
        """Environment variables that point mixsync at this sandbox: only URLs and credentials differ."""
        first_day: dt.date = min(self.dataset.days)
        env = {
            "MIXPANEL_BASE_URL": self.url("mixpanel"),
            "MIXPANEL_PROJECT_ID": self.mixpanel.project_id,
            "MIXPANEL_SERVICE_ACCOUNT_USERNAME": self.mixpanel.username,
            "MIXPANEL_SERVICE_ACCOUNT_SECRET": self.mixpanel.secret,
            "MIXPANEL_START_DATE": first_day.isoformat(),
        }
        if self.dataset.legacy_timezone:
            env["MIXPANEL_PROJECT_TIMEZONE"] = self.dataset.legacy_timezone
            env["MIXPANEL_LEGACY_LOCAL_TIME"] = "true"
        return env
