"""An emulated Flagsmith API (filled in by the Flagsmith flow)."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.applications import Starlette

from mixsync.sandbox.server import Faults, Recorder, control_routes


@dataclass
class FlagsmithSandbox:
    recorder: Recorder = field(default_factory=Recorder)
    faults: Faults = field(default_factory=Faults)

    def env(self, url: str) -> dict[str, str]:
        return {}


def build_app(state: FlagsmithSandbox) -> Starlette:
    app = Starlette(routes=control_routes(state.recorder, state.faults))
    app.state.flagsmith = state
    return app
