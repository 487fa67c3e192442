"""An emulated Split Events API (filled in by the Split flow)."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.applications import Starlette

from mixsync.sandbox.server import Faults, Recorder, control_routes


@dataclass
class SplitSandbox:
    recorder: Recorder = field(default_factory=Recorder)
    faults: Faults = field(default_factory=Faults)

    def env(self, url: str) -> dict[str, str]:
        return {}


def build_app(state: SplitSandbox) -> Starlette:
    app = Starlette(routes=control_routes(state.recorder, state.faults))
    app.state.split = state
    return app
