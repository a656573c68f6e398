"""The records that flow between stages.

Every record is frozen, slotted and typed; stages pass these and never loose dicts.
Each field is documented once, here. Timestamps are float UNIX seconds taken from
the data (a radio's receive time, a simulator's clock), never from the wall clock
of the stage that handles them.

Only `Advert` carries a raw Bluetooth address, and it lives only in memory:
`gateway.identity` turns it into a pseudonymous subject and nothing after that
stage ever sees the address.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

# --------------------------------------------------------------------------- input


@dataclass(frozen=True, slots=True)
class Advert:
    """One received BLE advertisement, as a radio hands it over."""

    ts: float
    """Receive time, UNIX seconds."""
    receiver: str
    """Id of the radio or remote node that heard it (matches a receiver of the store plan)."""
    address: str
    """Bluetooth address as the radio reports it. Memory only: never logged, stored or sent."""
    address_random: bool
    """True for random (private or static) addresses, False for public ones."""
    rssi: int
    """Received signal strength, dBm."""
    tx_power: int | None = None
    """TX power level from the advertisement's flags, dBm, when the advertiser includes it."""
    manufacturer_data: dict[int, bytes] = field(default_factory=dict)
    """Manufacturer-specific data by Bluetooth SIG company id; the value excludes the id itself."""
    service_data: dict[str, bytes] = field(default_factory=dict)
    """Service data by full 128-bit lowercase service UUID (as bleak reports it)."""
    service_uuids: tuple[str, ...] = ()
    """Advertised service UUIDs, full 128-bit lowercase."""
    local_name: str | None = None
    """Complete or shortened local name, if advertised."""


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class IBeacon:
    """Apple iBeacon (manufacturer data, company 0x004C, type 0x02 length 0x15)."""

    uuid: str
    """Proximity UUID, canonical lowercase 8-4-4-4-12 form."""
    major: int
    """Major, 0..65535."""
    minor: int
    """Minor, 0..65535."""
    measured_power: int
    """Calibrated RSSI at 1 m, dBm (signed)."""


@dataclass(frozen=True, slots=True)
class AltBeacon:
    """AltBeacon (manufacturer data with beacon code 0xBEAC), id split as id1 (16 B), id2, id3."""

    company_id: int
    """The manufacturer id the AltBeacon was sent under."""
    id1: str
    """First 16 bytes of the beacon id, as a canonical lowercase UUID."""
    id2: int
    """Next 2 bytes of the beacon id, big-endian."""
    id3: int
    """Last 2 bytes of the beacon id, big-endian."""
    ref_rssi: int
    """Reference RSSI at 1 m, dBm (signed)."""
    reserved: int
    """Manufacturer-reserved byte."""


@dataclass(frozen=True, slots=True)
class EddystoneUID:
    """Eddystone-UID (service data 0xFEAA, frame type 0x00)."""

    namespace: str
    """10-byte namespace, lowercase hex."""
    instance: str
    """6-byte instance, lowercase hex."""
    tx_power: int
    """Calibrated TX power at 0 m, dBm (signed)."""


@dataclass(frozen=True, slots=True)
class EddystoneURL:
    """Eddystone-URL (service data 0xFEAA, frame type 0x10)."""

    url: str
    """The expanded URL."""
    tx_power: int
    """Calibrated TX power at 0 m, dBm (signed)."""


@dataclass(frozen=True, slots=True)
class EddystoneTLM:
    """Eddystone-TLM, unencrypted version 0x00 (service data 0xFEAA, frame type 0x20)."""

    battery_mv: int | None
    """Battery voltage, mV; None when the beacon reports 0 (not supported)."""
    temperature_c: float | None
    """Beacon temperature, °C (8.8 fixed point); None for 0x8000 (not supported)."""
    adv_count: int
    """Advertising PDUs sent since power-up or reboot."""
    uptime_s: float
    """Time since power-up or reboot, seconds (0.1 s resolution)."""


@dataclass(frozen=True, slots=True)
class EddystoneEID:
    """Eddystone-EID (service data 0xFEAA, frame type 0x30)."""

    eid: str
    """8-byte ephemeral identifier, lowercase hex."""
    tx_power: int
    """Calibrated TX power at 0 m, dBm (signed)."""


@dataclass(frozen=True, slots=True)
class MemberFrame:
    """Visita member frame, sent by the loyalty app (see docs/frames.md)."""

    version: int
    """Frame format version (1)."""
    window_lo: int
    """Low 8 bits of the token's time window number, so the gateway picks the right table."""
    measured_power: int
    """The app's calibrated RSSI at 1 m for this phone model, dBm (signed)."""
    token: bytes
    """8-byte rotating token: HMAC-SHA256(member key, window as 8-byte big-endian)[:8]."""


@dataclass(frozen=True, slots=True)
class DeviceFrame:
    """A personal device without the app (for example an iPhone's Nearby Info): presence only."""

    vendor: Literal["apple", "samsung"]
    """Who made the frame format."""
    kind: str
    """Frame kind within the vendor's format (for example "nearby-info")."""


Frame = IBeacon | AltBeacon | EddystoneUID | EddystoneURL | EddystoneTLM | EddystoneEID | MemberFrame | DeviceFrame
"""Everything the decoder recognises."""


# --------------------------------------------------------------------------- identity onwards


@dataclass(frozen=True, slots=True)
class Sighting:
    """One advertisement attributed to a pseudonymous subject. Raw addresses end before this."""

    ts: float
    """Receive time, UNIX seconds."""
    receiver: str
    """Receiver that heard it."""
    subject: str
    """`beacon:<id>`, `member:<ref>` or `anon:<salted hash>`."""
    rssi: int
    """Received signal strength, dBm."""
    ref_rssi: int
    """Expected RSSI at 1 m from this transmitter, dBm."""


@dataclass(frozen=True, slots=True)
class ZoneEstimate:
    """Where the estimator believes a subject is, as of `ts`."""

    ts: float
    """Time of the newest sighting behind this estimate."""
    subject: str
    """The subject (never a beacon)."""
    zone: str
    """Zone id from the store plan."""
    inside: bool
    """False when the zone is an outside zone (sidewalk, car park)."""
    rssi: float
    """Smoothed RSSI at the receiver that decided the zone, dBm (diagnostic)."""
    x: float | None = None
    """Estimated position on the store plan (the posterior mean, metres), or None when the estimator has no
    geometry (the baseline). Used to link a phone across its own address change (gateway/handover.py)."""
    y: float | None = None
    """See `x`."""
    spread_m: float | None = None
    """How uncertain that position is: the root of the posterior's mean squared distance from it, metres."""
    sure: bool | None = None
    """Inside, and no place outside the store explains the signals nearly as well whatever the phone's power
    (HmmEstimator; docs/estimation.md "Sure inside"); False when it is inside only by the filter's word or
    outside; None when the estimator cannot tell (the baseline): the visit rule then takes inside as sure."""


LinkReason = Literal["member", "handover", "midnight"]


@dataclass(frozen=True, slots=True)
class SubjectLink:
    """Two subjects found to be one phone: `new` continues `old` (gateway/handover.py, docs/estimation.md)."""

    ts: float
    """When the link was found (data time, UNIX seconds)."""
    old: str
    """The subject seen first (an anonymous subject for "member", the silent one for "handover", yesterday's
    subject of the address for "midnight")."""
    new: str
    """The subject that continues it: the member for "member", the phone's new address for "handover", today's
    subject of the same address for "midnight"."""
    reason: LinkReason
    """member: a member frame came from an address that was anonymous until then; handover: a new anonymous
    address took over, where and when another fell silent, with no other candidate either way; midnight: the
    daily salt changed while an anonymous address was heard, so the same address has a new subject (in memory
    only, docs/estimation.md)."""


Classification = Literal["visitor", "pass-by", "staff"]
VisitSource = Literal["ble", "checkin", "both"]


@dataclass(frozen=True, slots=True)
class ZoneSegment:
    """A continuous stretch of a visit spent in one zone."""

    zone: str
    """Zone id."""
    entered: float
    """First time in the zone, UNIX seconds."""
    left: float
    """Last time in the zone so far (or when it was left), UNIX seconds."""

    @property
    def dwell_s(self) -> float:
        """Seconds spent in this segment."""
        return max(0.0, self.left - self.entered)


PATH_MIN_STAY_S = 10.0
"""Seconds in a zone that make a stay on a visit's path. The estimate reports a zone change within about 5 s
(docs/estimation.md), and near a zone edge it can cross and come back within seconds; a shopper who stops
at a shelf stays far longer. Measured on the supermarket (seeds 1-3, `visita eval`): the edit distance
between the true path (stays of 10 s or more) and the reported one went from 13.2-13.6 with every segment
on the path to 3.8-4.3."""


@dataclass(frozen=True, slots=True)
class Visit:
    """A subject's session in and around the store, open or ended."""

    visit_id: str
    """Stable id: derived from gateway, subject and start time."""
    subject: str
    """The subject this visit belongs to."""
    started: float
    """First sighting inside the store, UNIX seconds (or the session's first sighting for a pass-by)."""
    ended: float | None
    """Last sighting before the absence timeout closed the visit; None while open."""
    segments: tuple[ZoneSegment, ...]
    """Inside zones in time order; consecutive segments are in different zones unless the subject stepped
    outside in between (time outside belongs to no segment)."""
    classification: Classification
    """visitor, pass-by (never qualified as a visit) or staff (a member on the staff list)."""
    source: VisitSource
    """What proved the presence: BLE sightings, an app check-in, or both."""
    moved_m: float | None = None
    """How far the phone moved inside the store, metres: the largest distance of its position, smoothed over
    30 s, from where it settled in its first 30 s inside. None when no estimate had a position (the baseline
    estimator, or a visit known from a check-in alone). A phone lying still stays within a few metres."""

    @property
    def dwell_s(self) -> float:
        """Seconds inside the store: the sum of the segments (time stepped outside mid-visit does not count)."""
        return sum(s.dwell_s for s in self.segments)

    @property
    def zone(self) -> str | None:
        """The zone the subject is in now (or was in last): the latest segment's, None before any."""
        return self.segments[-1].zone if self.segments else None

    @property
    def path(self) -> tuple[str, ...]:
        """Zones the subject stayed in, in order (a zone repeats when another stay came in between).

        A stay is at least `PATH_MIN_STAY_S` in a zone: seconds the estimate spent in a zone on the way
        through, or flickering across a zone edge, are in the zone dwell but not in the path. A visit with no
        such stay has the zone of its longest segment as its path.
        """
        stays = [s for s in self.segments if s.dwell_s >= PATH_MIN_STAY_S]
        if not stays and self.segments:
            stays = [max(self.segments, key=lambda s: s.dwell_s)]
        out: list[str] = []
        for s in stays:
            if not out or out[-1] != s.zone:
                out.append(s.zone)
        return tuple(out)

    def zone_dwell(self) -> dict[str, float]:
        """Seconds per zone, summed over every segment in that zone."""
        out: dict[str, float] = {}
        for s in self.segments:
            out[s.zone] = out.get(s.zone, 0.0) + s.dwell_s
        return out

    @property
    def member(self) -> str | None:
        """Member ref when the subject is a member, else None."""
        return self.subject[len("member:") :] if self.subject.startswith("member:") else None


VisitChangeKind = Literal["started", "zone", "ended"]


@dataclass(frozen=True, slots=True)
class VisitChange:
    """What the visit tracker reports: a visit qualified, moved zone, or ended."""

    kind: VisitChangeKind
    """started: became a visit; zone: moved to another inside zone; ended: absence timeout passed."""
    ts: float
    """When the change happened, UNIX seconds (data time)."""
    visit: Visit
    """The visit as of this change."""
    from_zone: str | None = None
    """For kind "zone": the zone left."""


@dataclass(frozen=True, slots=True)
class Award:
    """Points granted to a member for a visit under one rule. Append-only in the ledger."""

    award_id: str
    """hash(member, visit, rule): the same award can never be granted twice."""
    member: str
    """Member ref."""
    rule: str
    """Rule id from the rules file."""
    points: int
    """Points granted."""
    visit_id: str
    """The visit that earned them."""
    ts: float
    """When the award was made (data time of the visit change that triggered it)."""
    day: str
    """Store-local date (YYYY-MM-DD) the award counts against for per-day limits."""
    reason: str
    """Human-readable reason, for support staff."""


# --------------------------------------------------------------------------- events

EVENT_TYPES = (
    "visit.started",
    "visit.ended",
    "zone.changed",
    "points.awarded",
    "checkin.accepted",
    "footfall.minute",
    "status",
    "health",
)
"""Every event type the gateway publishes (see docs/events.md)."""

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Event:
    """The envelope of everything sent upward."""

    type: str
    """One of EVENT_TYPES."""
    id: str
    """UUIDv7, unique per event; consumers de-duplicate on it."""
    ts: float
    """When the event happened (data time), UNIX seconds."""
    store: str
    """Store id."""
    gateway: str
    """Gateway id."""
    seq: int | None
    """Per-gateway counter, gapless over the durable stream; None for `status` (outside the stream)."""
    data: dict[str, Any]
    """Type-specific payload (JSON-safe values only)."""

    def envelope(self) -> dict[str, Any]:
        """The JSON object published on MQTT."""
        return {
            "schema": f"visita.{self.type}/{SCHEMA_VERSION}",
            "id": self.id,
            "ts": rfc3339(self.ts),
            "store": self.store,
            "gateway": self.gateway,
            "seq": self.seq,
            "data": self.data,
        }

    def payload(self) -> bytes:
        """UTF-8 JSON of the envelope, compact."""
        return json.dumps(self.envelope(), separators=(",", ":"), ensure_ascii=False).encode()

    def to_record(self) -> dict[str, Any]:
        """Plain dict for storage (the outbox)."""
        return {
            "type": self.type,
            "id": self.id,
            "ts": self.ts,
            "store": self.store,
            "gateway": self.gateway,
            "seq": self.seq,
            "data": self.data,
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Event:
        """Inverse of `to_record`."""
        return cls(
            type=str(rec["type"]),
            id=str(rec["id"]),
            ts=float(rec["ts"]),
            store=str(rec["store"]),
            gateway=str(rec["gateway"]),
            seq=None if rec["seq"] is None else int(rec["seq"]),
            data=dict(rec["data"]),
        )


def rfc3339(ts: float) -> str:
    """UNIX seconds as RFC 3339 UTC with milliseconds, e.g. 2026-11-24T10:00:00.123Z."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def visit_to_record(v: Visit) -> dict[str, Any]:
    """Plain dict for storage and the API."""
    return {
        "visit_id": v.visit_id,
        "subject": v.subject,
        "started": v.started,
        "ended": v.ended,
        "segments": [[s.zone, s.entered, s.left] for s in v.segments],
        "classification": v.classification,
        "source": v.source,
        "moved_m": v.moved_m,
    }


def visit_from_record(rec: dict[str, Any]) -> Visit:
    """Inverse of `visit_to_record`."""
    return Visit(
        visit_id=str(rec["visit_id"]),
        subject=str(rec["subject"]),
        started=float(rec["started"]),
        ended=None if rec["ended"] is None else float(rec["ended"]),
        segments=tuple(ZoneSegment(str(z), float(a), float(b)) for z, a, b in rec["segments"]),
        classification=rec["classification"],
        source=rec["source"],
        moved_m=None if rec.get("moved_m") is None else float(rec["moved_m"]),  # absent in older records
    )


def award_to_record(a: Award) -> dict[str, Any]:
    """Plain dict for storage."""
    return {
        "award_id": a.award_id,
        "member": a.member,
        "rule": a.rule,
        "points": a.points,
        "visit_id": a.visit_id,
        "ts": a.ts,
        "day": a.day,
        "reason": a.reason,
    }


def award_from_record(rec: dict[str, Any]) -> Award:
    """Inverse of `award_to_record`."""
    return Award(
        award_id=str(rec["award_id"]),
        member=str(rec["member"]),
        rule=str(rec["rule"]),
        points=int(rec["points"]),
        visit_id=str(rec["visit_id"]),
        ts=float(rec["ts"]),
        day=str(rec["day"]),
        reason=str(rec["reason"]),
    )
