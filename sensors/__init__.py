"""Input sources: every source yields batches of Adverts behind one small interface."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sensors.base import Source

__all__ = ["Source", "ble_source"]


def ble_source(
    adapters: Sequence[tuple[str, str]],
    clock: Callable[[], float],
    *,
    mode: str = "auto",
    expected_beacons: int = 0,
    silence_s: float = 4.0,
) -> Source:
    """The local Bluetooth adapters as a source: (adapter, receiver id) pairs, stamped by `clock`.

    bleak is imported here, on first use, so the simulator and replays never load it.
    ValueError names a bad option.
    """
    from sensors.ble import BleOptions, BleSource

    if mode not in ("auto", "passive", "active"):
        raise ValueError(f"mode = {mode!r}: must be auto, passive or active")
    options = BleOptions(
        adapters=tuple(adapters),
        mode=mode,  # type: ignore[arg-type]  # checked above
        expected_beacons=expected_beacons,
        silence_s=silence_s,
    )
    return BleSource(options, clock)
