"""Zone estimation, first version: strongest receiver with hysteresis.

Per (subject, receiver) the RSSI is smoothed with an exponential moving average whose
weight follows the time between sightings (a time constant, not a sample count, so a
phone advertising at 100 ms and one at 1 s are smoothed alike). The subject is placed in
the zone of the receiver with the strongest smoothed signal; another receiver takes over
only when it is stronger by the hysteresis margin, or when the current one has gone
silent. A subject whose best signal, normalised to a -59 dBm-at-1-m transmitter, is below
`inside_min_rssi` is put in the plan's outside zone.

How fast a move is followed: when a subject moves so that the new receiver leads the old one by
D dB where it trailed by D dB before, the smoothed difference crosses the hysteresis margin h
after smoothing_s * ln(2D / (D - h)), give or take one advertising interval. For any move with
D >= 2h that is at most smoothing_s * ln 4, about 5.5 s with the defaults (4 s, 4 dB); noise on
the readings adds a little. A receiver that stops hearing the subject is dropped after stale_s.

This is the baseline the hidden-Markov estimator of a later issue has to beat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config import EstimateConfig, PlanConfig
from gateway.model import Sighting, ZoneEstimate

REFERENCE_RSSI_1M = -59.0
"""The transmitter strength `inside_min_rssi` is expressed for (dBm at 1 m)."""

FORGET_AFTER_S = 300.0
"""A subject not heard for this long is forgotten (bounds memory under address rotation)."""


@dataclass(slots=True)
class _Link:
    rssi: float
    last: float


@dataclass(slots=True)
class _Subject:
    links: dict[str, _Link] = field(default_factory=dict)
    current: str | None = None
    last: float = 0.0


class StrongestReceiver:
    """Strongest receiver with hysteresis; no I/O, time comes from the sightings."""

    def __init__(self, plan: PlanConfig, cfg: EstimateConfig) -> None:
        self._cfg = cfg
        self._zone_of = {r.id: r.zone for r in plan.receivers}
        self._gain = {r.id: r.gain_db for r in plan.receivers}
        outside = [z.id for z in plan.zones if z.outside]
        self._outside_zone = outside[0] if outside else "outside"
        self._outside_ids = set(outside)
        self._subjects: dict[str, _Subject] = {}
        self._beacon_heard: dict[str, float] = {}
        self._unknown_receiver = 0
        self._last_prune = 0.0

    def update(self, sightings: Sequence[Sighting]) -> list[ZoneEstimate]:
        """Fold in a batch of sightings; one estimate per non-beacon subject heard in it."""
        touched: dict[str, float] = {}
        tau = self._cfg.smoothing_s
        for s in sightings:
            gain = self._gain.get(s.receiver)
            if gain is None:
                self._unknown_receiver += 1
                continue
            if s.subject.startswith("beacon:"):
                self._beacon_heard[s.receiver] = max(s.ts, self._beacon_heard.get(s.receiver, 0.0))
                continue
            rssi = s.rssi + gain + (REFERENCE_RSSI_1M - s.ref_rssi)
            subj = self._subjects.get(s.subject)
            if subj is None:
                subj = self._subjects[s.subject] = _Subject()
            link = subj.links.get(s.receiver)
            if link is None:
                subj.links[s.receiver] = _Link(rssi, s.ts)
            else:
                dt = max(0.0, s.ts - link.last)
                if dt > self._cfg.stale_s:
                    link.rssi = rssi
                else:
                    alpha = 1.0 - math.exp(-dt / tau) if dt > 0 else 0.2
                    link.rssi += alpha * (rssi - link.rssi)
                link.last = max(link.last, s.ts)
            subj.last = max(subj.last, s.ts)
            touched[s.subject] = subj.last
        out = [self._decide(subject, ts) for subject, ts in touched.items()]
        if touched:
            self._prune(max(touched.values()))
        return out

    def _decide(self, subject: str, ts: float) -> ZoneEstimate:
        subj = self._subjects[subject]
        fresh = {rx: ln for rx, ln in subj.links.items() if ts - ln.last <= self._cfg.stale_s}
        best_rx = max(fresh, key=lambda rx: fresh[rx].rssi)
        current = subj.current
        if (
            current is None
            or current not in fresh
            or fresh[best_rx].rssi > fresh[current].rssi + self._cfg.hysteresis_db
        ):
            subj.current = current = best_rx
        # Inside or out is decided by the best signal, as documented: hysteresis may keep a weaker
        # current receiver, but that must not put a subject outside while another hears it well.
        best = fresh[best_rx].rssi
        if best < self._cfg.inside_min_rssi:
            return ZoneEstimate(ts, subject, self._outside_zone, False, best)
        zone = self._zone_of[current]
        return ZoneEstimate(ts, subject, zone, zone not in self._outside_ids, fresh[current].rssi)

    def _prune(self, now: float) -> None:
        if now - self._last_prune < 30.0:
            return
        self._last_prune = now
        for subject in [k for k, v in self._subjects.items() if now - v.last > FORGET_AFTER_S]:
            del self._subjects[subject]

    def diagnostics(self) -> dict[str, Any]:
        """Subjects tracked, sightings from receivers not in the plan, last beacon heard per receiver."""
        return {
            "estimator": "strongest-receiver",
            "subjects": len(self._subjects),
            "unknown_receiver_sightings": self._unknown_receiver,
            "beacon_last_heard": dict(self._beacon_heard),
        }
