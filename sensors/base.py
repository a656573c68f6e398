"""The one interface every source implements, so the pipeline never asks which one it has."""

from __future__ import annotations

from collections import deque
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


def rate_per_s(samples: deque[tuple[float, int]]) -> float:
    """Events per second over the last ~10 s of (monotonic time, running count) samples, oldest first."""
    if len(samples) < 2:
        return 0.0
    t1, n1 = samples[-1]
    for t0, n0 in samples:
        if t1 - t0 <= 10.0:
            return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
    return 0.0
