"""Building events: the envelope, the per-gateway sequence, topics (docs/events.md).

Topics are built here and only here. Config validation already restricts store and gateway
ids to `[a-z0-9_-]`; the topic functions check the parts again, so no MQTT wildcard or
separator can sneak into a topic from a caller that skipped the config.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from typing import Any

from gateway.config import ID_PATTERN
from gateway.model import EVENT_TYPES, Award, Event, Visit, VisitChange

TOPIC_ROOT = "visita/v1"
_ID = re.compile(ID_PATTERN)


def _check_ids(store: str, gateway: str) -> None:
    for what, value in (("store", store), ("gateway", gateway)):
        if not _ID.fullmatch(value):
            raise ValueError(
                f"{what} id {value!r} cannot be a topic level: use [a-z0-9_-], at most 64, no leading - or _"
            )


def topic(store: str, gateway: str, event_type: str) -> str:
    """visita/v1/<store>/<gateway>/<type>; ValueError for an unknown type or an id that is not a valid level."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event_type!r}")
    _check_ids(store, gateway)
    return f"{TOPIC_ROOT}/{store}/{gateway}/{event_type}"


def topic_prefix(store: str, gateway: str) -> str:
    """visita/v1/<store>/<gateway>/ (subscribe to this plus '#'); ValueError like `topic`."""
    _check_ids(store, gateway)
    return f"{TOPIC_ROOT}/{store}/{gateway}/"


def uuid7(ts: float, rand: Callable[[int], bytes] = os.urandom) -> str:
    """An RFC 9562 UUIDv7: 48-bit millisecond timestamp, version 7, variant 10, 74 random bits."""
    # Rounded to microseconds first, as the envelope's RFC 3339 `ts` is: int(ts * 1000) alone can land
    # a millisecond early (2180641271.285 * 1000 is 2180641271284.9998) and disagree with `ts`.
    ms = (round(ts * 1_000_000) // 1000) & ((1 << 48) - 1)
    r = int.from_bytes(rand(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((r >> 68) & 0xFFF) << 64 | (0b10 << 62) | (r & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def visit_data(v: Visit) -> dict[str, Any]:
    """The `data` of visit events: no address, no key; the member ref only for members."""
    return {
        "visit_id": v.visit_id,
        "subject_kind": "member" if v.member is not None else "anonymous",
        "subject": v.subject,
        "member": v.member,
        "started": v.started,
        "ended": v.ended,
        "dwell_s": round(v.dwell_s, 1),
        "zones": [{"zone": z, "dwell_s": round(d, 1)} for z, d in v.zone_dwell().items()],
        "path": list(v.path),
        "classification": v.classification,
        "source": v.source,
    }


class EventFactory:
    """Makes envelopes with a gapless per-gateway `seq`, continuing from the stored last value."""

    def __init__(self, store: str, gateway: str, last_seq: int) -> None:
        _check_ids(store, gateway)  # fail at start, not at the first event
        self.store = store
        self.gateway = gateway
        self._seq = last_seq
        self._lock = threading.Lock()  # status events are made on the MQTT thread

    @property
    def last_seq(self) -> int:
        """The seq of the newest event made (or the stored value it continued from)."""
        return self._seq

    def make(self, event_type: str, ts: float, data: dict[str, Any]) -> Event:
        """A durable-stream event with the next seq."""
        topic(self.store, self.gateway, event_type)  # validates the type
        self._seq += 1
        return Event(event_type, uuid7(ts), ts, self.store, self.gateway, self._seq, data)

    def status(
        self, ts: float, online: bool, version: str, resolution: str | None = None, role: str = "gateway"
    ) -> Event:
        """The retained status message; outside the durable stream, so seq is None.

        `resolution`: what the store's receivers can tell, "zones" or "presence" (docs/events.md). `role`: "gateway"
        (publishes the store's events) or "relay" (publishes sighting batches for another gateway, docs/nodes.md).
        """
        data = {"state": "online" if online else "offline", "version": version, "role": role}
        if resolution is not None:
            data["resolution"] = resolution
        with self._lock:
            return Event("status", uuid7(ts), ts, self.store, self.gateway, None, data)

    def from_change(self, change: VisitChange) -> Event | None:
        """visit.started / zone.changed / visit.ended, or None for a pass-by that never became a visit."""
        v = change.visit
        if change.kind == "started":
            return self.make("visit.started", change.ts, visit_data(v))
        if change.kind == "zone":
            data = {"visit_id": v.visit_id, "subject": v.subject, "from": change.from_zone, "to": v.zone}
            return self.make("zone.changed", change.ts, data)
        if v.classification == "pass-by":
            return None
        return self.make("visit.ended", change.ts, visit_data(v))

    def from_award(self, a: Award) -> Event:
        """points.awarded."""
        data = {
            "award_id": a.award_id,
            "member": a.member,
            "rule": a.rule,
            "points": a.points,
            "visit_id": a.visit_id,
            "day": a.day,
            "reason": a.reason,
        }
        return self.make("points.awarded", a.ts, data)
