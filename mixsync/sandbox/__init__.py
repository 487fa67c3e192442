"""Emulated Mixpanel, Split and Flagsmith servers for the demo and the tests; never imported by the flows."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mixsync.sandbox import flagsmith, mixpanel, split
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
        self.split = split.SplitSandbox()
        self.flagsmith = flagsmith.FlagsmithSandbox()
        self.servers: dict[str, RunningServer] = {}

    def _services(self):
        return {"mixpanel": (self.mixpanel, mixpanel.build_app), "split": (self.split, split.build_app),
                "flagsmith": (self.flagsmith, flagsmith.build_app)}

    def start(self) -> Sandbox:
        try:
            for name, (state, build_app) in self._services().items():
                self.servers[name] = serve(name, build_app(state), state, self.host, self.ports.get(name, 0))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        # All at once: each server takes a tick to notice, and three ticks in a row add up over a test suite.
        for server in self.servers.values():
            server.signal_stop()
        for server in self.servers.values():
            server.join()
        self.servers.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def url(self, service: str) -> str:
        return self.servers[service].url

    def env(self) -> dict[str, str]:
        """Environment variables that point mixsync at this sandbox: only URLs and credentials differ."""
        env: dict[str, str] = {}
        for name, (state, _) in self._services().items():
            env.update(state.env(self.url(name)))
        return env
