"""Remote receivers over MQTT: ESPresense nodes (cheap ESP32s) and other Visita gateways.

Two kinds of message arrive on the store's broker:

* ESPresense node reports on ``espresense/devices/<id>/<room>``: one JSON object per device
  and node, as that firmware's ``BleFingerprint::fill`` writes it (``mac``, ``id``, ``idType``,
  ``rssi@1m``, ``rssi``, ``raw``, ``distance``, ``var``, ``int``, ...). The node has already
  reduced the advertisement to a fingerprint id and an RSSI: the advertisement's bytes are
  gone, so there is nothing for `gateway.decode` to parse. Nor does the report carry a time:
  it is stamped on arrival with the clock passed in (the runtime's data clock).
* Visita gateway batches on ``visita/v1/<store>/<gateway>/sightings``: Sightings another gateway
  of the store produced (see `encode_batch`), stamped with that gateway's clock, which is
  corrected by a bounded per-peer offset estimate.

So this source yields `Sighting`s, not `Advert`s (docs/nodes.md says why): `poll_sightings`
hands them to the runtime after the identify stage, and `poll` (the `Source` interface) yields
no Adverts. A report's address never leaves memory: it stays in a private reading until the
runtime's thread turns it into a subject through `gateway.identity` (the daily salted hash, or
the member the same address belongs to), and it is never logged, stored or shown.

Decoding (`parse_espresense`, `parse_batch`) is pure: untrusted bytes in, readings or None out,
never an exception. paho's network thread only parses and buffers; everything else happens on
the runtime's thread in `poll_sightings`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from gateway.identity import PHONE_REF_RSSI
from gateway.model import Advert, Sighting
from sensors.base import rate_per_s

log = logging.getLogger("visita.nodes")

ESPRESENSE_TOPIC = "espresense/devices/#"
BATCH_SCHEMA = "visita.sightings/1"
MAX_PAYLOAD = 512 * 1024
"""Largest message parsed, bytes; an ESPresense report is about 300."""
MAX_BATCH = 10_000
"""Most sightings one gateway batch may carry."""
MAX_BATCH_PAYLOAD = 2 << 20
"""Largest gateway batch parsed, bytes: MAX_BATCH rows of about 65 bytes (a beacon's subject up to 160) fit."""

_HEX12 = re.compile(r"[0-9a-f]{12}")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ROOM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SUBJECT = re.compile(r"anon:[0-9a-f]{16}|member:[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}|beacon:[0-9a-z:._-]{1,160}")
"""What a Visita gateway's identity stage makes of an advert (gateway/identity.py): a salted anonymous id, a member
ref, a beacon's id. Nothing else: a peer must not hand this gateway an address under one of these prefixes."""
_ADDRESS = re.compile(r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}(?![0-9A-Fa-f])")
"""A Bluetooth (or other MAC) address anywhere in a subject: refused whatever its prefix."""
_RECEIVER = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_ANON_KEY = re.compile(r"[0-9a-f]{16}")

DEFAULT_ACCEPT = ("iBeacon:", "altBeacon:", "eddy:", "apple:", "samsung:", "md:ffff:", "irk:")
"""ESPresense id kinds used by default: fixed beacons, and what a phone sends (Apple and Samsung
frames, the Visita member frame's company 0xFFFF, an IRK-resolved phone). Other kinds (speakers,
tags, thermometers) are counted by kind and dropped, as `gateway.decode` drops them locally."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One report of a remote receiver, before identity. Memory only: `key` may be an address."""

    ts: float
    """Receive time on this gateway's clock, UNIX seconds."""
    receiver: str
    """Plan receiver id that heard it."""
    subject: str | None
    """The subject when the report names it already (a beacon, a peer's sighting); else None."""
    key: str
    """For subject None: what identity hashes (an address as AA:BB:..., or `irk:<hex>`); else ""."""
    rssi: int
    """Received signal strength, dBm."""
    ref_rssi: int
    """Expected RSSI at 1 m, dBm."""


@dataclass(frozen=True, slots=True)
class NodesOptions:
    """Where the remote receivers publish and how their reports are taken."""

    host: str = "127.0.0.1"
    """Broker host (the store's broker)."""
    port: int = 1883
    """Broker port."""
    store: str = "store"
    """Store id: gateway batches are taken from visita/v1/<store>/+/sightings."""
    gateway: str = "gw"
    """This gateway's id: its own batches are not taken back."""
    rooms: Mapping[str, str] = field(default_factory=dict)
    """ESPresense room (the topic's last level, matched whatever its case) → plan receiver id; unmapped rooms are
    used as receiver ids, lowercased."""
    accept: tuple[str, ...] = DEFAULT_ACCEPT
    """ESPresense id prefixes taken; others are counted and dropped."""
    espresense: bool = True
    """Subscribe to espresense/devices/#."""
    peers: bool = True
    """Subscribe to other gateways' sighting batches."""
    dedup_s: float = 0.5
    """A second report of the same device from the same node within this long is a duplicate."""
    max_offset_s: float = 120.0
    """Largest peer clock correction applied, s; a larger measured offset is clamped and counted."""
    offset_samples: int = 32
    """Batches per peer the offset estimate (a running minimum of arrival - sent) looks back over."""
    buffer_max: int = 100_000
    """Readings kept between polls; beyond this the oldest are dropped and counted."""
    max_nodes: int = 256
    """Nodes and peers tracked for health; reports from further ones are dropped and counted."""
    client_id: str = ""
    """MQTT client id; empty: visita-nodes-<store>-<gateway>."""
    anon_key: str | None = None
    """The public id of this gateway's store secret (`gateway.identity.secret_id`), None without one: a peer's
    `anon:` rows fuse with this gateway's own subjects only when its batches name the same id."""
    connect_timeout_s: float = 5.0
    """Longest wait for the broker on stop/disconnect calls."""

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.port <= 65535:
            problems.append(f"port = {self.port}: must be 1..65535")
        for name in ("dedup_s", "max_offset_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} = {getattr(self, name)}: must be more than 0")
        if self.buffer_max < 1 or self.max_nodes < 1 or self.offset_samples < 1:
            problems.append("buffer_max, max_nodes and offset_samples must be at least 1")
        lowered: dict[str, str] = {}
        for room, rx in self.rooms.items():
            if not _RECEIVER.fullmatch(rx):
                problems.append(f"rooms[{room!r}] = {rx!r}: not a receiver id (lowercase, digits, - and _)")
            if not _ROOM.fullmatch(room):
                problems.append(f"rooms[{room!r}]: not an ESPresense room name (letters, digits, _ . -, at most 64)")
            if lowered.setdefault(room.lower(), rx) != rx:
                problems.append(f"rooms[{room!r}]: the same room as another one, mapped to another receiver")
        object.__setattr__(self, "rooms", lowered)  # rooms match whatever their case
        if not (self.espresense or self.peers):
            problems.append("espresense and peers are both off: nothing to take")
        if problems:
            raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------- pure decoders


def _address(mac: object) -> str | None:
    """ESPresense's `mac` (12 hex digits, most significant first) as bleak writes addresses."""
    if not isinstance(mac, str) or not _HEX12.fullmatch(mac.lower()):
        return None
    m = mac.upper()
    return ":".join(m[i : i + 2] for i in range(0, 12, 2))


def _int_in(value: object, lo: int, hi: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or not lo <= value <= hi:
        return None
    return round(value)


def espresense_beacon(device_id: str) -> str | None:
    """Subject of a fixed beacon from its ESPresense id, or None when the id is not a beacon's.

    iBeacon and AltBeacon ids are ``iBeacon:<uuid>-<major>-<minor>``; Eddystone-UID ids are
    ``eddy:<namespace>-<instance>``, where ESPresense writes the namespace's fifth byte twice
    (BleFingerprint.cpp formats bytes 2..6, 6..11 of the frame): that byte is removed again, so
    the subject is the one `gateway.identity.beacon_subject` derives from the frame itself.
    """
    kind, _, rest = device_id.partition(":")
    if kind in ("iBeacon", "altBeacon"):
        parts = rest.lower().rsplit("-", 2)
        if len(parts) != 3 or not _UUID.fullmatch(parts[0]):
            return None
        major, minor = parts[1], parts[2]
        if not (major.isdigit() and minor.isdigit() and int(major) < 65536 and int(minor) < 65536):
            return None
        return f"beacon:{parts[0]}:{int(major)}:{int(minor)}"
    if kind == "eddy":
        ns, sep, inst = rest.lower().partition("-")
        if not sep or len(inst) != 12 or not all(c in "0123456789abcdef" for c in ns + inst):
            return None
        if len(ns) == 22 and ns[8:10] == ns[10:12]:
            ns = ns[:10] + ns[12:]
        if len(ns) != 20:
            return None
        return f"beacon:{ns}:{inst}"
    return None


def parse_espresense(
    topic: str,
    payload: bytes,
    ts: float,
    rooms: Mapping[str, str],
    accept: Iterable[str] = DEFAULT_ACCEPT,
) -> Reading | str:
    """A Reading from one ESPresense report, or the reason it is not taken (a short word, never data). `rooms`: as
    NodesOptions.rooms has them (lowercase rooms).

    Reasons: "malformed" (not a report), "ignored" (an id kind not in `accept`), "no-address"
    (a phone's report without a usable `mac`).
    """
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "espresense" or parts[1] != "devices" or len(payload) > MAX_PAYLOAD:
        return "malformed"
    room = parts[3]
    if not _ROOM.fullmatch(room):
        return "malformed"
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return "malformed"
    if not isinstance(doc, dict):
        return "malformed"
    device_id = doc.get("id", parts[2])
    if not isinstance(device_id, str) or not 0 < len(device_id) <= 200:
        return "malformed"
    rssi = _int_in(doc.get("rssi"), -127, 20)
    ref = _int_in(doc.get("rssi@1m"), -127, 20)
    if rssi is None:
        return "malformed"
    receiver = rooms.get(room.lower(), room.lower())
    if not any(device_id.startswith(p) for p in accept):
        return "ignored"
    beacon = espresense_beacon(device_id)
    if beacon is not None:
        # A beacon's rssi@1m is the measured power its frame states (plus the node's rxAdjRssi, 0 by default).
        return Reading(ts, receiver, beacon, "", rssi, ref if ref is not None else PHONE_REF_RSSI)
    if device_id.startswith(("iBeacon:", "altBeacon:", "eddy:")):
        return "malformed"
    if device_id.startswith("irk:"):
        # The phone's identity resolving key picked this one out: stable for the phone, so hashed like an address.
        irk = device_id[4:].lower()
        if len(irk) != 32 or not all(c in "0123456789abcdef" for c in irk):
            return "malformed"
        key = "irk:" + irk
    else:
        # Type fingerprints such as apple:1005:9-26 are shared by every phone of a model: the address tells them apart.
        address = _address(doc.get("mac"))
        if address is None:
            return "no-address"
        key = address
    # A phone's rssi@1m is the node's guess by device type plus its rxAdjRssi; the gateway's own radio uses
    # PHONE_REF_RSSI for the same phone, and the estimator compares the two receivers, so the same is used here.
    return Reading(ts, receiver, None, key, rssi, PHONE_REF_RSSI)


@dataclass(frozen=True, slots=True)
class Batch:
    """A decoded gateway batch."""

    gateway: str
    """The gateway that sent it."""
    seq: int
    """Its batch counter (a QoS 1 resend repeats it)."""
    sent: float
    """When it was sent, on the sender's clock, UNIX seconds."""
    sightings: tuple[Sighting, ...]
    """The sightings, stamped with the sender's clock."""
    anon_key: str | None = None
    """The public id of the store secret the sender's `anon:` subjects are salted with; None: its own random salt."""


def encode_batch(
    gateway: str, seq: int, sent: float, sightings: Iterable[Sighting], anon_key: str | None = None
) -> bytes:
    """The payload of a sighting batch (docs/nodes.md), for a gateway that publishes its own (a relay).

    `anon_key`: the public id of the store secret its anonymous subjects are salted with (never the secret)."""
    doc = {
        "schema": BATCH_SCHEMA,
        "gateway": gateway,
        "seq": seq,
        "sent": round(sent, 3),
        "anon_key": anon_key,
        "sightings": [[round(s.ts, 3), s.receiver, s.subject, s.rssi, s.ref_rssi] for s in sightings],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_batch(topic: str, payload: bytes, store: str) -> Batch | None:
    """A gateway batch from ``visita/v1/<store>/<gateway>/sightings``, or None when it is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or parts[:3] != ["visita", "v1", store] or parts[4] != "sightings":
        return None
    if len(payload) > MAX_BATCH_PAYLOAD:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("schema") != BATCH_SCHEMA or doc.get("gateway") != parts[3]:
        return None
    seq, sent, rows = doc.get("seq"), doc.get("sent"), doc.get("sightings")
    if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(rows, list) or len(rows) > MAX_BATCH:
        return None
    if isinstance(sent, bool) or not isinstance(sent, int | float) or not math.isfinite(sent) or sent <= 0:
        return None
    anon_key = doc.get("anon_key")  # absent in batches of gateways older than the store secret
    if anon_key is not None and not (isinstance(anon_key, str) and _ANON_KEY.fullmatch(anon_key)):
        return None
    out: list[Sighting] = []
    for row in rows:
        if not isinstance(row, list) or len(row) != 5:
            return None
        ts, receiver, subject, rssi, ref = row
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts <= 0:
            return None
        if not isinstance(receiver, str) or not _RECEIVER.fullmatch(receiver):
            return None
        if not isinstance(subject, str) or not _SUBJECT.fullmatch(subject) or _ADDRESS.search(subject):
            return None
        r, f = _int_in(rssi, -127, 20), _int_in(ref, -127, 20)
        if r is None or f is None:
            return None
        out.append(Sighting(float(ts), receiver, subject, r, f))
    return Batch(parts[3], seq, float(sent), tuple(out), anon_key)


# --------------------------------------------------------------------------- clock offsets


class PeerClock:
    """A peer gateway's clock offset: the smallest (arrival - sent) over its last batches, among those within
    `JITTER_S` below their median.

    Transit only ever adds delay, so the minimum is the offset plus the shortest transit
    (milliseconds on a store's LAN); outliers from a slow broker cannot pull it. Nor can one batch stamped far in
    the future (a peer's clock that jumped, then was put right): below the median by more than any transit varies,
    it is not taken, where a plain minimum kept it for the next `samples` batches and dropped the peer's good
    readings as late. A real change of the peer's clock (NTP) takes over once it holds the median. The correction
    is bounded by `max_offset_s`: a peer whose clock is further off is still placed within that
    bound, and the clamp is counted, because its readings are then at best roughly placed.
    """

    JITTER_S = 2.0

    def __init__(self, samples: int, max_offset_s: float) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=samples)  # (arrival, arrival - sent)
        self._max = max_offset_s
        self.clamped = 0

    def observe(self, arrival: float, sent: float) -> None:
        """One batch: sent at `sent` on the peer's clock, arrived at `arrival` on ours."""
        self._samples.append((arrival, arrival - sent))

    def shift(self, by: float, at: float = math.inf) -> None:
        """Our clock was stepped forward by `by` seconds and the peer's was not: the offsets measured on our clock
        before the step (arrivals before `at - by / 2`, `at` our time just after it) are that much larger now; those of
        batches that came in after the step, before this call, were measured on the new clock already."""
        self._samples = deque(
            ((a + by, x + by) if a < at - by / 2 else (a, x) for a, x in self._samples), maxlen=self._samples.maxlen
        )

    @property
    def offset(self) -> float:
        """Seconds to add to the peer's timestamps (0 before the first batch)."""
        raw = self.measured
        return 0.0 if raw is None else max(-self._max, min(self._max, raw))

    @property
    def measured(self) -> float | None:
        """The unclamped estimate, for diagnostics."""
        if not self._samples:
            return None
        offsets = [x for _, x in self._samples]
        floor = statistics.median_high(offsets) - self.JITTER_S
        return min(x for x in offsets if x >= floor)


# --------------------------------------------------------------------------- the source


@dataclass(slots=True)
class _Node:
    kind: str  # "espresense" or "gateway"
    messages: int = 0
    last_seen: float = 0.0
    receivers: set[str] = field(default_factory=set)
    clock: PeerClock | None = None
    batches: int = 0
    duplicate_batches: int = 0
    recent_batches: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=64))
    """(seq, sent) of the peer's last batches: a resend repeats both; a restarted peer's new seqs differ in sent."""
    unfused_anon: int = 0
    """The peer's `anon:` rows taken without a store secret in common: its subjects, not this gateway's."""
    anon_problem: str = ""
    """Why its anonymous subjects do not fuse with this gateway's ("" while they do, or none came)."""


class NodesSource:
    """Sightings from remote receivers on the store's broker (ESPresense nodes, other gateways).

    `clock` stamps ESPresense reports on arrival and measures peers' offsets (the runtime's data
    clock). Implements `Source` (no Adverts) plus `poll_sightings`, which the runtime calls after
    its identify stage with the function that turns an address into a subject.
    """

    name = "nodes"

    def __init__(
        self,
        options: NodesOptions,
        clock: Callable[[], float],
        password: str | None = None,
        username: str | None = None,
    ) -> None:
        self.options = options
        self._clock = clock
        self._lock = threading.Lock()
        self._buffer: deque[Reading] = deque()
        self._nodes: OrderedDict[str, _Node] = OrderedDict()
        self._recent: dict[tuple[str, str], float] = {}  # (receiver, subject or key) -> last ts, for de-duplication
        self._pruned_at = 0.0
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self._counts = {
            "messages": 0,
            "readings": 0,
            "malformed": 0,
            "ignored": 0,
            "no_address": 0,
            "duplicates": 0,
            "duplicate_batches": 0,
            "own_batches": 0,
            "dropped": 0,
            "too_many_nodes": 0,
            "unknown_members": 0,
            "unfused_anon": 0,
        }
        self._ignored_kinds: dict[str, int] = {}
        self._connected = threading.Event()
        self._last_error = ""
        self._started = False
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=options.client_id or f"visita-nodes-{options.store}-{options.gateway}",
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        self._client.reconnect_delay_set(1, 30)
        if username:
            self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_message = self._on_message

    # ------------------------------------------------------------------ Source

    async def start(self) -> None:
        """Connect in the background (paho's thread); retries by itself, never blocks."""
        if self._started:
            return
        self._started = True
        self._client.connect_async(self.options.host, self.options.port, keepalive=30)
        self._client.loop_start()

    def poll(self, now: float) -> list[Advert]:
        """No Adverts: remote receivers deliver Sightings (`poll_sightings`)."""
        return []

    def shift(self, by: float, at: float = math.inf) -> None:
        """This gateway's data clock was stepped forward by `by` seconds (gateway.runtime.Gateway.shift; `at`: its time
        just after the step): the peers' clock offsets grow by as much at once (else their sightings would be placed
        that much early, as late, until the new offset held the median of `PeerClock`), and the arrival times kept
        move with it. Readings in the buffer keep their stamps: the gateway moves those dated before the step when it
        takes them. What came in between the step and this call (paho's thread reads the clock too, and may be the
        one that saw the step) was stamped by the new clock already: times from `at - by / 2` on do not move."""

        def moved(t: float) -> float:
            return t + by if t < at - by / 2 else t

        with self._lock:
            for node in self._nodes.values():
                node.last_seen = moved(node.last_seen)
                if node.clock is not None:
                    node.clock.shift(by, at)
            self._recent = {k: moved(t) for k, t in self._recent.items()}
            self._pruned_at = moved(self._pruned_at)

    def poll_sightings(
        self, now: float, subject_of: Callable[[str, float], str], member_known: Callable[[str], bool]
    ) -> list[Sighting]:
        """Sightings received up to `now` since the last call, in time order.

        `subject_of(key, ts)` turns an address (or `irk:<hex>`) into a subject: the runtime passes
        `Identifier.remote_subject`, so an address is hashed with the same daily salt as the
        gateway's own radio uses and the same phone is one subject whichever receiver heard it.
        A peer gateway's `member:` row is taken only for a member `member_known(ref)` says this gateway provisions
        (`MemberDirectory.known`); others are counted as `unknown_members`: a peer must not make members of its own
        here, nor put anything else (an address written as a member ref) into this gateway's events.
        """
        with self._lock:
            buf = self._buffer
            taken: list[Reading] = []
            keep: deque[Reading] = deque()
            for r in buf:
                (taken if r.ts <= now else keep).append(r)
            self._buffer = keep
            if len(self._recent) > 1_000 and now - self._pruned_at >= self.options.dedup_s:
                self._prune_recent(now)
        taken.sort(key=lambda r: r.ts)
        out: list[Sighting] = []
        for r in taken:
            subject = r.subject if r.subject is not None else subject_of(r.key, r.ts)
            if r.subject is not None and subject.startswith("member:") and not member_known(subject[7:]):
                self._counts["unknown_members"] += 1
                continue
            out.append(Sighting(r.ts, r.receiver, subject, r.rssi, r.ref_rssi))
        return out

    async def stop(self) -> None:
        """Disconnect and stop paho's thread."""
        if not self._started:
            return
        self._started = False
        self._connected.clear()  # our own disconnect: not a lost broker
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    @property
    def connected(self) -> bool:
        """True while subscribed on the broker."""
        return self._connected.is_set()

    def diagnostics(self) -> dict[str, Any]:
        """Health: messages/s, per-node last seen and receivers, peer clock offsets, drop counts."""
        now = self._clock()
        with self._lock:
            nodes = {}
            for name, n in self._nodes.items():
                entry: dict[str, Any] = {
                    "kind": n.kind,
                    "messages": n.messages,
                    "last_seen_age_s": round(now - n.last_seen, 1),
                    "receivers": sorted(n.receivers)[:32],
                }
                if n.clock is not None:
                    measured = n.clock.measured
                    entry["clock_offset_s"] = round(n.clock.offset, 3)
                    entry["clock_offset_measured_s"] = None if measured is None else round(measured, 3)
                    entry["clock_clamped"] = n.clock.clamped
                    entry["batches"] = n.batches
                    entry["duplicate_batches"] = n.duplicate_batches
                    entry["unfused_anon"] = n.unfused_anon
                    entry["anon_problem"] = n.anon_problem
                nodes[name] = entry
            buffered = len(self._buffer)
            counts = dict(self._counts)
            kinds = dict(self._ignored_kinds)
            quiet = not self._rate or time.monotonic() - self._rate[-1][0] > 10.0
            rate = 0.0 if quiet else rate_per_s(self._rate)
        return {
            "source": self.name,
            "broker": f"mqtt://{self.options.host}:{self.options.port}",
            "connected": self.connected,
            "last_error": self._last_error,
            "messages_per_s": round(rate, 1),
            **counts,
            "ignored_kinds": kinds,
            "buffered": buffered,
            "nodes": nodes,
        }

    # ------------------------------------------------------------------ paho's thread

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if rc.is_failure:
            self._last_error = f"broker refused the connection: {rc}"
            log.warning("remote receivers: %s", self._last_error)
            return
        topics = []
        if self.options.espresense:
            topics.append((ESPRESENSE_TOPIC, 0))
        if self.options.peers:
            topics.append((f"visita/v1/{self.options.store}/+/sightings", 1))
        client.subscribe(topics)
        self._connected.set()
        self._last_error = ""
        log.info("remote receivers: subscribed on mqtt://%s:%d", self.options.host, self.options.port)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        error = f"cannot reach the broker at mqtt://{self.options.host}:{self.options.port}"
        if not self._last_error:  # logged once per outage; paho keeps retrying with backoff
            log.warning("remote receivers: %s; retrying", error)
        self._last_error = error

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: ReasonCode, props: Any) -> None:
        if self._connected.is_set():
            log.warning("remote receivers: lost the broker (%s); reconnecting", rc)
        self._connected.clear()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.receive(msg.topic, bytes(msg.payload))
        except Exception as e:  # a decoder bug must not kill paho's thread; counted, and logged without data
            with self._lock:
                self._counts["malformed"] += 1
            log.debug("remote receivers: message not taken (%s)", type(e).__name__)

    def receive(self, topic: str, payload: bytes) -> int:
        """Take one message (paho's callback calls this); returns how many readings it added."""
        arrival = self._clock()
        with self._lock:
            self._counts["messages"] += 1
            mono = time.monotonic()
            if not self._rate or mono - self._rate[-1][0] >= 0.25:  # 64 samples span ~16 s whatever the rate
                self._rate.append((mono, self._counts["messages"]))
        if topic.startswith("espresense/"):
            return self._take_espresense(topic, payload, arrival)
        return self._take_batch(topic, payload, arrival)

    def _node(self, name: str, kind: str) -> _Node:
        node = self._nodes.get(name)
        if node is None:
            if len(self._nodes) >= self.options.max_nodes:
                # Drop the node heard from longest ago, so a retired node does not lock out a new one.
                oldest = min(self._nodes, key=lambda k: self._nodes[k].last_seen)
                del self._nodes[oldest]
                self._counts["too_many_nodes"] += 1
            node = self._nodes[name] = _Node(kind)
        return node

    def _take_espresense(self, topic: str, payload: bytes, arrival: float) -> int:
        result = parse_espresense(topic, payload, arrival, self.options.rooms, self.options.accept)
        with self._lock:
            if isinstance(result, str):
                if result == "ignored":
                    self._counts["ignored"] += 1
                    kind = _id_kind(topic)
                    if kind in self._ignored_kinds or len(self._ignored_kinds) < 64:
                        self._ignored_kinds[kind] = self._ignored_kinds.get(kind, 0) + 1
                else:
                    self._counts["no_address" if result == "no-address" else "malformed"] += 1
                return 0
            node = self._node("espresense:" + topic.split("/")[3], "espresense")
            node.messages += 1
            node.last_seen = arrival
            if len(node.receivers) < 32:
                node.receivers.add(result.receiver)
            ident = (result.receiver, result.subject or result.key)
            last = self._recent.get(ident)
            if last is not None and 0 <= result.ts - last < self.options.dedup_s:
                self._counts["duplicates"] += 1
                return 0
            self._recent[ident] = result.ts
            if len(self._recent) > 4 * self.options.buffer_max:
                self._prune_recent(result.ts)
            self._append(result)
        return 1

    def _take_batch(self, topic: str, payload: bytes, arrival: float) -> int:
        batch = parse_batch(topic, payload, self.options.store)
        with self._lock:
            if batch is None:
                self._counts["malformed"] += 1
                return 0
            if batch.gateway == self.options.gateway:
                self._counts["own_batches"] += 1
                return 0
            node = self._node("gateway:" + batch.gateway, "gateway")
            node.messages += 1
            node.last_seen = arrival
            if (batch.seq, batch.sent) in node.recent_batches:
                # A QoS 1 resend (or a second path through a bridge): the same sightings again.
                node.duplicate_batches += 1
                self._counts["duplicate_batches"] += 1
                return 0
            node.recent_batches.append((batch.seq, batch.sent))
            node.batches += 1
            if node.clock is None:
                node.clock = PeerClock(self.options.offset_samples, self.options.max_offset_s)
            node.clock.observe(arrival, batch.sent)
            measured = node.clock.measured
            if measured is not None and abs(measured) > self.options.max_offset_s:
                if node.clock.clamped == 0:
                    log.warning(
                        "gateway %s: its clock is %.0f s off ours, more than max_offset_s (%g s): its sightings "
                        "are placed %g s off at most; fix its time (NTP)",
                        batch.gateway,
                        measured,
                        self.options.max_offset_s,
                        self.options.max_offset_s,
                    )
                node.clock.clamped += 1
            offset = node.clock.offset
            self._check_anon(node, batch)
            n = 0
            for s in batch.sightings:
                if len(node.receivers) < 32:
                    node.receivers.add(s.receiver)
                # Never later than the batch's arrival: nothing is heard in our future.
                ts = min(s.ts + offset, arrival)
                self._append(Reading(ts, s.receiver, s.subject, "", s.rssi, s.ref_rssi))
                n += 1
        return n

    def _check_anon(self, node: _Node, batch: Batch) -> None:
        """Count the batch's `anon:` rows that do not fuse with this gateway's subjects (no store secret in common),
        and say why once per peer: the same phone heard here too is then two subjects, counted twice in footfall.
        They are still taken: the peer's receivers are the only ones to hear some phones. (Caller holds the lock.)"""
        anon = sum(1 for s in batch.sightings if s.subject.startswith("anon:"))
        ours = self.options.anon_key
        if not anon or (ours is not None and batch.anon_key == ours):
            return
        node.unfused_anon += anon
        self._counts["unfused_anon"] += anon
        if node.anon_problem:
            return
        if ours is None and batch.anon_key is None:
            why = "neither this gateway nor it has a store secret (identity.anon_secret_file)"
        elif ours is None:
            why = "it uses a store secret (identity.anon_secret_file) and this gateway has none"
        elif batch.anon_key is None:
            why = "this gateway uses a store secret (identity.anon_secret_file) and it has none"
        else:
            why = "its store secret (identity.anon_secret_file) is not this gateway's"
        node.anon_problem = (
            f"{why}: an anonymous phone both hear is two subjects, counted twice in footfall; copy the same "
            "secret file to both (docs/nodes.md)"
        )
        log.warning("gateway %s: %s", batch.gateway, node.anon_problem)

    def _append(self, r: Reading) -> None:
        if len(self._buffer) >= self.options.buffer_max:
            self._buffer.popleft()
            self._counts["dropped"] += 1
        self._buffer.append(r)
        self._counts["readings"] += 1

    def _prune_recent(self, now: float) -> None:
        self._pruned_at = now
        horizon = now - self.options.dedup_s
        self._recent = {k: t for k, t in self._recent.items() if t >= horizon}


def _id_kind(topic: str) -> str:
    """The kind of an ESPresense id (its text before the first ':'), never an address."""
    parts = topic.split("/")
    device_id = parts[2] if len(parts) > 2 else ""
    kind, sep, _ = device_id.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z]{1,16}", kind):
        return "address" if _HEX12.fullmatch(device_id.lower()) else "other"
    return kind
