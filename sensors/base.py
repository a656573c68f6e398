"""The one interface every source implements, so the pipeline never asks which one it has."""

from __future__ import annotations

from typing import Any, Protocol

from gateway.model import Advert


class Source(Protocol):
    """A producer of Adverts: a radio, remote nodes, or the simulator."""

    name: str
    """Short name for logs and diagnostics."""

    async def start(self) -> None:
        """Begin receiving; may retry in the background, never blocks for long."""

    def poll(self, now: float) -> list[Advert]:
        """Adverts received up to `now` (data time) since the last call, in time order."""

    async def stop(self) -> None:
        """Stop receiving and release the radio."""

    def diagnostics(self) -> dict[str, Any]:
        """Health figures for the dashboard and the CLI."""
