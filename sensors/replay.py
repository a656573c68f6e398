"""A recorded advert log as a source: the adverts of `visita sim --out` (or any log) played again.

The log is read as a stream, chunk by chunk, so a day of a busy store never sits in memory.
Time comes from the data: `poll(now)` hands over every record up to `now`, whatever clock
drives it (the runtime's data-driven clock for "as fast as it goes", or a paced one).
A log that turns out damaged or cut short ends the replay there, logged once and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from firmware_sim.advlog import AdvertLog, Content, LogError
from gateway.model import Advert

log = logging.getLogger("visita.replay")


class ReplaySource:
    """Adverts from an advert log (docs/advert-log.md); opening it reads and checks the header."""

    name = "replay"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._log = AdvertLog(path)
        self.header: dict[str, Any] = self._log.header
        self.start_ts = self._log.start_ms / 1000
        """Start of the log's span, UNIX s."""
        self.end_ts = float(self.header.get("end", self.start_ts))
        """End of the log's span, UNIX s (its `end`; the start when it names none)."""
        self._receivers: list[str] = [str(r) for r in self.header["receivers"]]
        self._chunks: Iterator[npt.NDArray[np.void]] | None = None
        self._pending: npt.NDArray[np.void] | None = None
        self._done = False
        self._last_t = -(2**62)  # receive time (ms from start) of the newest record read
        self.error: str | None = None
        self.delivered = 0
        self.data_time = self.start_ts

    async def start(self) -> None:
        """Nothing to wait for: the file is open."""
        self._chunks = self._log.chunks()

    def _next(self) -> npt.NDArray[np.void] | None:
        if self._done:
            return None
        if self._chunks is None:
            self._chunks = self._log.chunks()
        try:
            while True:
                chunk = next(self._chunks)
                if not len(chunk):
                    continue  # an empty frame carries nothing (our writer never makes one)
                t = chunk["t"]
                if int(t[0]) < self._last_t or bool((t[1:] < t[:-1]).any()):
                    # poll() cuts chunks by binary search, which needs time order.
                    raise LogError(f"{self.path}: receive times go backwards after {self._last_t} ms")
                self._last_t = int(t[-1])
                return chunk
        except StopIteration:
            self._done = True
        except LogError as e:
            self._done = True
            self.error = str(e)
            log.error("replay stops early: %s", e)
        return None

    def poll(self, now: float) -> list[Advert]:
        """Every record with a receive time up to `now` not handed over yet, in time order."""
        limit = round(now * 1000) - self._log.start_ms
        parts: list[npt.NDArray[np.void]] = []
        while True:
            chunk = self._pending if self._pending is not None else self._next()
            self._pending = None
            if chunk is None:
                break
            if len(chunk) and int(chunk["t"][-1]) <= limit:
                parts.append(chunk)
                continue
            cut = int(np.searchsorted(chunk["t"], limit, side="right"))
            parts.append(chunk[:cut])
            self._pending = chunk[cut:]
            break
        self.data_time = max(self.data_time, now)
        if not parts:
            return []
        rec = np.concatenate(parts) if len(parts) > 1 else parts[0]
        self.delivered += len(rec)
        start_ms, rx_ids = self._log.start_ms, self._receivers
        addrs, rnd, pl = self._log.addresses, self._log.address_random, self._log.payloads
        out = []
        columns = (rec["t"].tolist(), rec["rx"].tolist(), rec["address"].tolist(), rec["payload"].tolist())
        for t, r, a, p, s in zip(*columns, rec["rssi"].tolist(), strict=True):
            c = pl[p]
            adv = Advert((start_ms + t) / 1000, rx_ids[r], addrs[a], rnd[a], s, c.tx_power, c.manufacturer_data)
            out.append(adv if not (c.service_data or c.service_uuids or c.local_name) else self._full(adv, c))
        return out

    @staticmethod
    def _full(adv: Advert, c: Content) -> Advert:
        return Advert(
            adv.ts, adv.receiver, adv.address, adv.address_random, adv.rssi, adv.tx_power,
            c.manufacturer_data, c.service_data, c.service_uuids, c.local_name,
        )  # fmt: skip

    @property
    def finished(self) -> bool:
        """True once every record has been handed over (or the log ended early)."""
        return self._done and self._pending is None

    async def stop(self) -> None:
        """Close the file."""
        self._log.close()

    def diagnostics(self) -> dict[str, Any]:
        """File, scenario, progress through the log's span, records handed over, and any read error."""
        span = max(self.end_ts - self.start_ts, 1e-9)
        return {
            "source": self.name,
            "file": str(self.path),
            "scenario": self.header.get("scenario"),
            "seed": self.header.get("seed"),
            "data_time": self.data_time,
            "progress": min(1.0, (self.data_time - self.start_ts) / span),
            "adverts": self.delivered,
            "error": self.error,
        }
