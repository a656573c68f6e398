"""Who sent an advert: member tokens, anonymous hashing, the fixed-beacon registry.

This is where raw Bluetooth addresses end. Anonymous devices become `anon:<hash>` where the
hash is keyed with a random salt that rotates every store-local day and is never stored, so
the same phone cannot be linked across days, and an address can never be recovered from
anything the gateway writes. Member phones become `member:<ref>` through their rotating
token; a token the gateway cannot resolve is treated as an anonymous device.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gateway.days import LocalDays
from gateway.model import (
    Advert,
    AltBeacon,
    DeviceFrame,
    EddystoneEID,
    EddystoneTLM,
    EddystoneUID,
    EddystoneURL,
    Frame,
    IBeacon,
    MemberFrame,
    Sighting,
)

TOKEN_WINDOW_S = 900
"""Member tokens rotate every 15 minutes (docs/frames.md)."""

PHONE_REF_RSSI = -59
"""Typical RSSI at 1 m of a phone that does not say its own (dBm)."""

EDDYSTONE_0M_TO_1M_DB = 41
"""Eddystone states TX power at 0 m; the RSSI at 1 m is about 41 dB lower (Eddystone spec)."""

MAX_TLM_ADDRESSES = 4096
"""Beacon addresses remembered to attach TLM frames to their beacon (memory bound)."""

MAX_MEMBER_ADDRESSES = 20_000
"""App phones' current addresses remembered to attach their OS adverts to the member (memory bound)."""


def member_token(key: bytes, window: int) -> bytes:
    """The 8-byte token a member's phone advertises in `window` (docs/frames.md)."""
    return hmac.new(key, window.to_bytes(8, "big"), hashlib.sha256).digest()[:8]


class MemberDirectory:
    """Member keys and the token tables that resolve a heard token to a member ref in O(1).

    Tables are built per window on first need and kept for the current and neighbouring
    windows, so a phone whose clock is off by up to one window is still recognised.
    Keys live only in memory here; nothing in this class logs or returns them.
    """

    def __init__(self, window_s: int = TOKEN_WINDOW_S) -> None:
        self._window_s = window_s
        self._keys: dict[str, bytes] = {}
        self._tables: dict[int, dict[bytes, str]] = {}

    def set_members(self, keys: Mapping[str, bytes]) -> None:
        """Replace the whole member set (ref → 32-byte key)."""
        self._keys = dict(keys)
        self._tables.clear()

    def __len__(self) -> int:
        return len(self._keys)

    def _table(self, window: int) -> dict[bytes, str]:
        table = self._tables.get(window)
        if table is None:
            table = {member_token(k, window): ref for ref, k in self._keys.items()}
            self._tables[window] = table
            for w in [w for w in self._tables if abs(w - window) > 2]:
                del self._tables[w]
        return table

    def resolve(self, frame: MemberFrame, ts: float) -> str | None:
        """Member ref for a heard frame at receive time `ts`, or None if no member matches."""
        current = int(ts // self._window_s)
        for window in (current, current - 1, current + 1):
            if window & 0xFF == frame.window_lo:
                ref = self._table(window).get(frame.token)
                if ref is not None:
                    return ref
        return None


class Identifier:
    """Turns decoded adverts into Sightings of pseudonymous subjects."""

    def __init__(
        self,
        members: MemberDirectory,
        days: LocalDays,
        salt_source: Callable[[], bytes] = lambda: secrets.token_bytes(32),
    ) -> None:
        self._members = members
        self._days = days
        self._salt_source = salt_source
        self._salts: dict[str, bytes] = {}  # local day -> salt, for at most the two newest days
        self._beacon_by_address: dict[str, str] = {}
        # An app phone also sends the OS's own adverts (Apple Nearby Info, Samsung) from the same address:
        # they are that member, not a second, anonymous shopper. Memory only, bounded, gone when it rotates.
        self._member_by_address: dict[str, str] = {}
        self._battery: dict[str, int | None] = {}
        self._counts = {
            "member": 0,
            "member_device": 0,
            "member_unresolved": 0,
            "anonymous": 0,
            "beacon": 0,
            "telemetry": 0,
        }

    def _anon(self, address: str, ts: float) -> str:
        day = self._days.day(ts)
        salt = self._salts.get(day)
        if salt is None:
            # A new salt each local day, never stored: yesterday's hashes cannot be linked to today's.
            # Yesterday's stays in memory next to today's because remote receivers deliver late and
            # batches are unsorted: a sighting from 23:59 must not replace today's salt mid-day.
            salt = self._salts[day] = self._salt_source()
            for old in sorted(self._salts)[:-2]:
                del self._salts[old]
        return "anon:" + hmac.new(salt, address.encode(), hashlib.sha256).hexdigest()[:16]

    def _remember_beacon(self, address: str, subject: str) -> None:
        if address not in self._beacon_by_address and len(self._beacon_by_address) >= MAX_TLM_ADDRESSES:
            self._beacon_by_address.pop(next(iter(self._beacon_by_address)))
        self._beacon_by_address[address] = subject

    def _remember_member(self, address: str, ref: str) -> None:
        known = self._member_by_address
        if address not in known and len(known) >= MAX_MEMBER_ADDRESSES:
            known.pop(next(iter(known)))
        known[address] = ref

    def identify(self, decoded: Sequence[tuple[Advert, Frame]]) -> list[Sighting]:
        """One Sighting per advert that belongs to a subject (TLM frames only update diagnostics)."""
        out: list[Sighting] = []
        counts = self._counts
        members: dict[int, str | None] = {}
        for i, (adv, frame) in enumerate(decoded):  # member frames first: the batch's other frames may be theirs
            if isinstance(frame, MemberFrame):
                ref = members[i] = self._members.resolve(frame, adv.ts)
                if ref is not None:
                    self._remember_member(adv.address, ref)
        for i, (adv, frame) in enumerate(decoded):
            if isinstance(frame, MemberFrame):
                ref = members[i]
                if ref is None:
                    counts["member_unresolved"] += 1
                    subject = self._anon(adv.address, adv.ts)
                else:
                    counts["member"] += 1
                    subject = "member:" + ref
                out.append(Sighting(adv.ts, adv.receiver, subject, adv.rssi, frame.measured_power))
            elif isinstance(frame, DeviceFrame):
                ref = self._member_by_address.get(adv.address)
                if ref is None:
                    counts["anonymous"] += 1
                    subject = self._anon(adv.address, adv.ts)
                else:
                    counts["member_device"] += 1
                    subject = "member:" + ref
                out.append(Sighting(adv.ts, adv.receiver, subject, adv.rssi, PHONE_REF_RSSI))
            elif isinstance(frame, EddystoneTLM):
                counts["telemetry"] += 1
                beacon = self._beacon_by_address.get(adv.address)
                if beacon is not None:
                    self._battery[beacon] = frame.battery_mv
            else:
                subject, ref_rssi = beacon_subject(frame)
                counts["beacon"] += 1
                self._remember_beacon(adv.address, subject)
                out.append(Sighting(adv.ts, adv.receiver, subject, adv.rssi, ref_rssi))
        return out

    def diagnostics(self) -> dict[str, Any]:
        """Counts by kind, members known, and the last battery reading per fixed beacon (mV)."""
        return {**self._counts, "members_known": len(self._members), "beacon_battery_mv": dict(self._battery)}


def beacon_subject(frame: IBeacon | AltBeacon | EddystoneUID | EddystoneURL | EddystoneEID) -> tuple[str, int]:
    """Subject id and RSSI at 1 m of a fixed beacon's frame."""
    if isinstance(frame, IBeacon):
        return f"beacon:{frame.uuid}:{frame.major}:{frame.minor}", frame.measured_power
    if isinstance(frame, AltBeacon):
        return f"beacon:{frame.id1}:{frame.id2}:{frame.id3}", frame.ref_rssi
    if isinstance(frame, EddystoneUID):
        return f"beacon:{frame.namespace}:{frame.instance}", frame.tx_power - EDDYSTONE_0M_TO_1M_DB
    if isinstance(frame, EddystoneURL):
        digest = hashlib.sha256(frame.url.encode()).hexdigest()[:12]
        return f"beacon:url-{digest}", frame.tx_power - EDDYSTONE_0M_TO_1M_DB
    return f"beacon:eid-{frame.eid}", frame.tx_power - EDDYSTONE_0M_TO_1M_DB
