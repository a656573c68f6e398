"""The simulator as a source: the firmware_sim world played in-process at any speed."""

from __future__ import annotations

from typing import Any

from firmware_sim.world import World
from gateway.model import Advert


class SimSource:
    """Adverts from a simulated store; `now` drives the simulation forward."""

    name = "sim"

    def __init__(self, world: World) -> None:
        self.world = world

    async def start(self) -> None:
        """Nothing to open: the world is in memory."""

    def poll(self, now: float) -> list[Advert]:
        """Play the world forward to `now`."""
        return self.world.advance(now)

    async def stop(self) -> None:
        """Nothing to release."""

    def diagnostics(self) -> dict[str, Any]:
        """The world's running summary (ground-truth counts, adverts per receiver)."""
        return {"source": self.name, "scenario": self.world.scenario.name, **self.world.summary()}
