"""Who sent an advert: member tokens, anonymous hashing, the fixed-beacon registry.

This is where raw Bluetooth addresses end. Anonymous devices become `anon:<hash>` where the
hash is keyed with a random salt that rotates every store-local day and is never stored, so
the same phone cannot be linked across days, and an address can never be recovered from
anything the gateway writes. A store whose gateways must agree on a phone's subject (a relay and
its main gateway, docs/nodes.md) opts in to a store secret instead (`store_day_salt`): the day's
salt is then derived from it, the same on every gateway of the store, and whoever holds the secret
file can compute a day's pseudonym of an address. Member phones become `member:<ref>` through their rotating
token; a token the gateway cannot resolve is treated as an anonymous device.

At store-local midnight the salt changes, so a phone still heard then gets a new subject. For an address heard
on both sides of midnight, within `carry_s` of it, the identifier links yesterday's subject to today's (a
"midnight" `SubjectLink`), so that the stages after it carry the phone's state and visit on. The link exists only
in memory and is gone the day after: nothing stored, logged or sent holds both subjects.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.config import BeaconConfig
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
    SubjectLink,
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

MAX_LATE_SUBJECTS = 20_000
"""Anonymous subjects heard just before midnight remembered to link across it (memory bound)."""

MIDNIGHT_CARRY_S = 3600.0
"""Default of `Identifier`'s `carry_s`: the longest absence timeout a config allows (visits.absence_timeout_s)."""


EID_MAX_RESOLVE = 4096
"""Ephemeral ids kept per beacon (a few rotation periods' worth; memory bound)."""

BeaconProof = Literal["none", "verified", "fixed", "unknown"]
"""What a check-in's `beacon` claim proved (docs/checkin.md): nothing claimed; a current ephemeral id of one of the
store's Eddystone-EID beacons; a fixed beacon id of the store (public, anyone can send it: it proves nothing);
or neither (another store's beacon, an id that is not current, a forgery)."""


def _aes128(key: bytes, block: bytes) -> bytes:
    # One block, no chaining: what the Eddystone-EID computation specifies.
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def eddystone_eid(identity_key: bytes, exponent: int, beacon_time: int) -> bytes:
    """The 8-byte ephemeral id an Eddystone-EID beacon sends when its seconds counter reads `beacon_time`.

    Eddystone's EID computation: a temporary key = AES-128(identity key, 11 zero bytes, 0xFF, 2 zero bytes, the
    counter's bits 31-16), then the id = AES-128(temporary key, 11 zero bytes, the rotation exponent K, the 32-bit
    counter with its low K bits cleared)[:8], so it changes every 2^K seconds.
    """
    counter = beacon_time & 0xFFFFFFFF
    temporary = _aes128(identity_key, bytes(11) + b"\xff" + bytes(2) + (counter >> 16).to_bytes(2, "big"))
    quantum = counter & ~((1 << exponent) - 1) & 0xFFFFFFFF
    return _aes128(temporary, bytes(11) + bytes([exponent]) + quantum.to_bytes(4, "big"))[:8]


class BeaconRegistry:
    """The store's fixed beacons: which one is where, and the ephemeral ids its Eddystone-EID beacons send now.

    An EID beacon's id changes every 2^K s, so nobody who has not been near it lately knows the current one; the
    gateway computes them from the identity key (plan.beacons[].eid). `resolve` accepts the id of the current
    period and of both neighbours (a beacon's clock drifts; a phone reports what it heard a little while ago).
    """

    def __init__(self, beacons: Sequence[BeaconConfig]) -> None:
        self._beacons = {b.id: b for b in beacons}
        self._eid = [
            (b, b.eid.identity_key(f"plan.beacons[{i}].eid")) for i, b in enumerate(beacons) if b.eid is not None
        ]
        self._sent: dict[tuple[str, int], bytes] = {}  # (beacon id, period number) -> the id it sends then

    def _sends(self, b: BeaconConfig, key: bytes, period: int) -> bytes:
        assert b.eid is not None
        eid = self._sent.get((b.id, period))
        if eid is None:
            if len(self._sent) >= EID_MAX_RESOLVE:
                del self._sent[next(iter(self._sent))]
            eid = self._sent[(b.id, period)] = eddystone_eid(key, b.eid.exponent, period << b.eid.exponent)
        return eid

    def resolve(self, eid: bytes, ts: float) -> BeaconConfig | None:
        """The store's EID beacon that sends `eid` around `ts` (this period or a neighbour), or None."""
        for b, key in self._eid:
            assert b.eid is not None
            period = (int(ts) - b.eid.epoch) >> b.eid.exponent
            periods = [p for p in (period, period - 1, period + 1) if p >= 0]
            if any(hmac.compare_digest(self._sends(b, key, p), eid) for p in periods):
                return b
        return None

    def claim(self, beacon: str | None, ts: float) -> tuple[BeaconConfig | None, BeaconProof]:
        """What a check-in's `beacon` field proves at `ts`: the beacon (only when verified) and the proof."""
        if beacon is None:
            return None, "none"
        if beacon.startswith("eid:"):
            found = self.resolve(bytes.fromhex(beacon[4:]), ts)
            return (found, "verified") if found is not None else (None, "unknown")
        return None, ("fixed" if beacon in self._beacons else "unknown")

    def __len__(self) -> int:
        return len(self._beacons)


STORE_SALT_CONTEXT = b"visita anon salt v1"
"""Domain separation of `store_day_salt`'s HMAC input, so the store secret keys nothing else by accident."""


def store_day_salt(secret: bytes, store: str) -> Callable[[str], bytes]:
    """The day's salt of anonymous subjects from a store secret (`identity.anon_secret_file`):
    HMAC-SHA256(secret, "visita anon salt v1" NUL store id NUL local day as YYYY-MM-DD).

    Every gateway of the store that holds the same secret derives the same salt for a day, so one phone's address
    hashes to the same `anon:` subject on all of them; the next day's salt is unrelated to it for anyone without the
    secret. Give it to `Identifier` as `day_salt`.
    """

    def salt(day: str) -> bytes:
        msg = STORE_SALT_CONTEXT + b"\0" + store.encode() + b"\0" + day.encode()
        return hmac.new(secret, msg, hashlib.sha256).digest()

    return salt


def secret_id(secret: bytes) -> str:
    """A short public name of a store secret (16 hex digits of an HMAC of a constant under it): two gateways with
    the same secret show the same id, so a mismatch can be seen (status, sighting batches) without showing the
    secret; it does not help compute a pseudonym."""
    return hmac.new(secret, b"visita store secret id", hashlib.sha256).hexdigest()[:16]


def member_token(key: bytes, window: int) -> bytes:
    """The 8-byte token a member's phone advertises in `window` (docs/frames.md)."""
    return hmac.new(key, window.to_bytes(8, "big"), hashlib.sha256).digest()[:8]


class MemberDirectory:
    """Member keys (and tiers) and the token tables that resolve a heard token to a member ref in O(1).

    A table maps every member's token of one window to the member's ref. Tables for the current
    window and its neighbours are kept, so a phone whose clock is off by up to one window is still
    recognised. `prepare(now)` builds those and, a chunk of members per call, the table of the window
    after next, so that when a window starts its neighbour's table is already there: with 100,000
    members a whole table takes a fraction of a second, which a pipeline tick must not stall on
    (benchmarks/members_bench.py). Keys live only in memory here; nothing in this class logs them,
    and `__repr__` shows counts only.
    """

    def __init__(self, window_s: int = TOKEN_WINDOW_S, chunk: int = 1_000) -> None:
        self._window_s = window_s
        self._chunk = chunk
        self._keys: dict[str, bytes] = {}
        self._tiers: dict[str, str] = {}
        self._tables: dict[int, dict[bytes, str]] = {}
        self._building: tuple[int, dict[bytes, str], list[str], int] | None = None  # window, table, refs, next
        self.version = 0
        """Version of the member set (from the backend or `visita keys import`); 0 when never provisioned."""
        self._counts = {"tables_prepared": 0, "tables_on_demand": 0}

    def __repr__(self) -> str:
        return f"MemberDirectory({len(self._keys)} members, version {self.version})"

    def set_members(
        self, keys: Mapping[str, bytes], tiers: Mapping[str, str] | None = None, version: int | None = None
    ) -> None:
        """Replace the whole member set (ref → 32-byte key, ref → tier)."""
        self._keys = dict(keys)
        self._tiers = {r: t for r, t in (tiers or {}).items() if r in self._keys}
        self._tables.clear()
        self._building = None
        if version is not None:
            self.version = version

    def upsert(self, ref: str, key: bytes, tier: str | None = None) -> None:
        """Add a member or change its key or tier; the tables follow at once."""
        old = self._keys.get(ref)
        self._keys[ref] = key
        if tier is None:
            self._tiers.pop(ref, None)
        else:
            self._tiers[ref] = tier
        if old != key:
            for window, table in self._tables.items():
                if old is not None:
                    table.pop(member_token(old, window), None)
                table[member_token(key, window)] = ref
            self._building = None  # restarted by the next prepare(), over the new set

    def remove(self, ref: str) -> bool:
        """Forget a member; False if it was not known."""
        old = self._keys.pop(ref, None)
        self._tiers.pop(ref, None)
        if old is None:
            return False
        for window, table in self._tables.items():
            table.pop(member_token(old, window), None)
        self._building = None
        return True

    def known(self, ref: str) -> bool:
        """Whether the backend provisions this member now."""
        return ref in self._keys

    def key(self, ref: str) -> bytes | None:
        """The member's key (for verifying its check-ins), or None for an unknown member."""
        return self._keys.get(ref)

    def tier(self, ref: str) -> str | None:
        """The member's tier as the backend provisioned it, or None."""
        return self._tiers.get(ref)

    def items(self) -> list[tuple[str, bytes, str | None]]:
        """(ref, key, tier) of every member, for the encrypted key store."""
        return [(r, k, self._tiers.get(r)) for r, k in self._keys.items()]

    def __len__(self) -> int:
        return len(self._keys)

    def _build(self, window: int) -> dict[bytes, str]:
        return {member_token(k, window): ref for ref, k in self._keys.items()}

    def _table(self, window: int) -> dict[bytes, str]:
        table = self._tables.get(window)
        if table is None:
            table = self._tables[window] = self._build(window)
            self._counts["tables_on_demand"] += 1
            self._drop_old(window - 1)
        return table

    def _drop_old(self, oldest: int) -> None:
        for w in [w for w in self._tables if w < oldest - 1]:
            del self._tables[w]

    def prepare(self, now: float) -> None:
        """Have the current window's and its neighbours' tables ready, and build part of the next one.

        Call once per pipeline tick. Builds at most `chunk` tokens of the window after next per call,
        so a tick never stalls on a whole table; missing current tables (at start) are built at once.
        """
        current = int(now // self._window_s)
        for window in (current - 1, current, current + 1):
            if window not in self._tables:
                self._tables[window] = self._build(window)
                self._counts["tables_prepared"] += 1
        self._drop_old(current - 1)
        ahead = current + 2
        if ahead in self._tables:
            return
        if self._building is None or self._building[0] != ahead:
            self._building = (ahead, {}, list(self._keys), 0)
        window, table, refs, pos = self._building
        keys = self._keys
        for ref in refs[pos : pos + self._chunk]:
            table[member_token(keys[ref], window)] = ref
        pos += self._chunk
        if pos >= len(refs):
            self._tables[window] = table
            self._building = None
            self._counts["tables_prepared"] += 1
        else:
            self._building = (window, table, refs, pos)

    def ready(self, window: int) -> bool:
        """True when the table of `window` is built."""
        return window in self._tables

    def resolve(self, frame: MemberFrame, ts: float) -> str | None:
        """Member ref for a heard frame at receive time `ts`, or None if no member matches."""
        current = int(ts // self._window_s)
        for window in (current, current - 1, current + 1):
            if window & 0xFF == frame.window_lo:
                ref = self._table(window).get(frame.token)
                if ref is not None:
                    return ref
        return None

    def diagnostics(self) -> dict[str, int]:
        """Members known, the set's version, tables ready, and how tables came to be."""
        return {"members": len(self._keys), "version": self.version, "tables": len(self._tables), **self._counts}


class Identifier:
    """Turns decoded adverts into Sightings of pseudonymous subjects."""

    def __init__(
        self,
        members: MemberDirectory,
        days: LocalDays,
        salt_source: Callable[[], bytes] = lambda: secrets.token_bytes(32),
        beacons: BeaconRegistry | None = None,
        carry_s: float = MIDNIGHT_CARRY_S,
        day_salt: Callable[[str], bytes] | None = None,
    ) -> None:
        """`carry_s`: an address heard within this long before and after midnight is linked across it; the runtime
        gives the visits' absence timeout (a longer silence ends the visit anyway). `day_salt`: the salt of a local
        day from the store secret (`store_day_salt`), instead of `salt_source`'s random one."""
        self._members = members
        self._days = days
        self._registry = beacons
        self._salt_source = salt_source
        self._day_salt = day_salt
        self._salts: dict[str, bytes] = {}  # local day -> salt, for at most the two newest days
        self._carry_s = carry_s
        # Across midnight, memory only, dropped with the day's salt: subjects heard in the last `carry_s` of their
        # day (never addresses), and yesterday's subject -> today's of the addresses heard on both sides.
        self._late: dict[str, dict[str, None]] = {}  # day -> subjects
        self._carried: dict[str, dict[str, str]] = {}  # day -> {that day's subject: the next day's}
        self._carried_new: dict[str, str] = {}  # carried since `carry_over` last looked
        self._calm, self._calm_day = (0.0, 0.0), ""  # a day's time away from both its midnights by `carry_s`
        self._newest = -math.inf  # the newest time an anonymous subject was made for (`shift`)
        self._beacon_by_address: dict[str, str] = {}
        # An app phone also sends the OS's own adverts (Apple Nearby Info, Samsung) from the same address:
        # they are that member, not a second, anonymous shopper. Memory only, bounded, gone when it rotates.
        self._member_by_address: dict[str, str] = {}
        self._links: list[SubjectLink] = []
        self._battery: dict[str, int | None] = {}
        self._counts = {
            "member": 0,
            "member_device": 0,
            "member_unresolved": 0,
            "anonymous": 0,
            "beacon": 0,
            "telemetry": 0,
            "midnight_links": 0,
        }

    def _hash(self, day: str, address: str) -> str:
        salt = self._salts.get(day)
        if salt is None:
            # A new salt each local day, never stored: yesterday's hashes cannot be linked to today's.
            # Yesterday's stays in memory next to today's because remote receivers deliver late and
            # batches are unsorted: a sighting from 23:59 must not replace today's salt mid-day.
            # With a store secret, the day's salt is derived from it, as every gateway of the store derives it.
            salt = self._day_salt(day) if self._day_salt is not None else self._salt_source()
            self._salts[day] = salt
            for old in sorted(self._salts)[:-2]:
                del self._salts[old]
                self._late.pop(old, None)
                self._carried.pop(old, None)
        return "anon:" + hmac.new(salt, address.encode(), hashlib.sha256).hexdigest()[:16]

    def _anon(self, address: str, ts: float) -> str:
        if ts > self._newest:
            self._newest = ts
        if self._calm[0] <= ts < self._calm[1]:  # most of the day: nothing to carry over (the fast path)
            return self._hash(self._calm_day, address)
        day = self._days.day(ts)
        subject = self._hash(day, address)
        start, end = self._days.bounds(ts)
        if start + self._carry_s <= ts < end - self._carry_s:
            self._calm, self._calm_day = (start + self._carry_s, end - self._carry_s), day
        elif end - ts <= self._carry_s:
            carried = self._carried.get(day, {}).get(subject)
            if carried is not None:
                return carried  # heard late (a remote receiver) from before midnight, after it was carried over
            late = self._late.setdefault(day, {})
            if subject not in late and len(late) >= MAX_LATE_SUBJECTS:
                del late[next(iter(late))]
            late[subject] = None
        elif ts - start < self._carry_s:
            for prev, late in [(d, late) for d, late in self._late.items() if d < day and late]:
                old = self._hash(prev, address)
                if old in late and old != subject:  # the same subject: a constant salt (`visita eval`)
                    # The same address just before midnight: the same phone, whose subject changed with the salt.
                    del late[old]
                    self._counts["midnight_links"] += 1
                    self._carried.setdefault(prev, {})[old] = subject
                    self._carried_new[old] = subject
                    self._add_link(SubjectLink(ts, old, subject, "midnight"))
        return subject

    def shift(self, by: float) -> None:
        """The clock was stepped forward by `by` seconds (`Gateway.shift`): the times before the step were that much
        behind. Links not taken yet move with them; and when the step crosses a store-local midnight (a Pi that
        booted on yesterday evening's saved time), the day the addresses heard before it were hashed for becomes the
        day they really were heard on: its salt, and what it keeps for the midnight links, serve the new day, so a
        phone keeps its subject across the step, as it would have on a clock that was right all along (unless that
        wrong clock itself ran across a real midnight, the salt serves one real day still)."""
        self._links = [replace(k, ts=k.ts + by) for k in self._links]
        if not math.isfinite(self._newest):
            return
        was, self._newest = self._days.day(self._newest), self._newest + by
        day = self._days.day(self._newest)
        # With a store secret the day's salt is the store's, not this gateway's: the other gateways (on the right
        # time) use the new day's, so this one must too; the phone's subject then changes as at midnight.
        if day != was and was in self._salts and day not in self._salts and self._day_salt is None:
            self._salts[day] = self._salts.pop(was)
            if was in self._late:
                self._late[day] = self._late.pop(was)
            if was in self._carried:
                self._carried[day] = self._carried.pop(was)
        self._calm, self._calm_day = (0.0, 0.0), ""

    def _add_link(self, link: SubjectLink) -> None:
        if len(self._links) >= MAX_MEMBER_ADDRESSES:  # nobody takes them (a tool that only identifies)
            del self._links[: len(self._links) // 2]
        self._links.append(link)

    def carry_over(self, sightings: list[Sighting]) -> list[Sighting]:
        """`sightings` with yesterday's subject of an address replaced by today's where a midnight link was made
        since the last call: the sightings of the batch that came before the link (in time, or in order)."""
        if not self._carried_new:
            return sightings
        carried, self._carried_new = self._carried_new, {}
        return [replace(s, subject=carried[s.subject]) if s.subject in carried else s for s in sightings]

    def _remember_beacon(self, address: str, subject: str) -> None:
        if address not in self._beacon_by_address and len(self._beacon_by_address) >= MAX_TLM_ADDRESSES:
            self._beacon_by_address.pop(next(iter(self._beacon_by_address)))
        self._beacon_by_address[address] = subject

    def _member_of(self, address: str) -> str | None:
        """The member whose app phone sent from this address, while the backend still provisions the member."""
        ref = self._member_by_address.get(address)
        if ref is not None and not self._members.known(ref):
            del self._member_by_address[address]  # removed: from now on its OS adverts are an anonymous phone's
            return None
        return ref

    def _remember_member(self, address: str, ref: str, ts: float) -> None:
        known = self._member_by_address
        if known.get(address) == ref:
            return
        if address not in known and len(known) >= MAX_MEMBER_ADDRESSES:
            known.pop(next(iter(known)))
        known[address] = ref
        # Until now this address's OS adverts were an anonymous subject: that subject is this member
        # (an iPhone whose app was in the background when it came in, or after its address changed).
        self._add_link(SubjectLink(ts, self._anon(address, ts), "member:" + ref, "member"))

    def take_links(self) -> list[SubjectLink]:
        """Links found since the last call: an anonymous subject that turned out to be a member's app phone
        ("member"), or yesterday's subject of an address heard on both sides of midnight ("midnight").

        Member links are made for every address a member frame is first heard from; the later stages ignore
        a link when they never saw (or no longer track) the old subject.
        """
        links, self._links = self._links, []
        return links

    def identify(self, decoded: Sequence[tuple[Advert, Frame]]) -> list[Sighting]:
        """One Sighting per advert that belongs to a subject (TLM frames only update diagnostics)."""
        out: list[Sighting] = []
        counts = self._counts
        members: dict[int, str | None] = {}
        for i, (adv, frame) in enumerate(decoded):  # member frames first: the batch's other frames may be theirs
            if isinstance(frame, MemberFrame):
                ref = members[i] = self._members.resolve(frame, adv.ts)
                if ref is not None:
                    self._remember_member(adv.address, ref, adv.ts)
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
                ref = self._member_of(adv.address)
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
                if isinstance(frame, EddystoneEID) and self._registry is not None:
                    # The store's own EID beacon, under its plan id whichever ephemeral id it sends now.
                    known = self._registry.resolve(bytes.fromhex(frame.eid), adv.ts)
                    subject = known.id if known is not None else subject
                counts["beacon"] += 1
                self._remember_beacon(adv.address, subject)
                out.append(Sighting(adv.ts, adv.receiver, subject, adv.rssi, ref_rssi))
        return self.carry_over(out)

    def remote_subject(self, key: str, ts: float) -> str:
        """Subject of a phone a remote receiver heard (sensors/nodes.py), from its address (or `irk:<hex>`).

        The member whose app phone this address was heard from, else the same daily salted hash as
        the gateway's own radio gives that address, so one phone is one subject whoever heard it.
        """
        ref = self._member_of(key)
        if ref is not None:
            self._counts["member_device"] += 1
            return "member:" + ref
        self._counts["anonymous"] += 1
        return self._anon(key, ts)

    @property
    def store_salt(self) -> bool:
        """Whether anonymous subjects use the store secret's day salts (shared by the store's gateways)."""
        return self._day_salt is not None

    def diagnostics(self) -> dict[str, Any]:
        """Counts by kind, members known, the last battery reading per fixed beacon (mV), and which salt anonymous
        subjects use ("store": the store secret's, "gateway": this gateway's random one)."""
        return {
            **self._counts,
            "members_known": len(self._members),
            "beacon_battery_mv": dict(self._battery),
            "anon_salt": "store" if self._day_salt is not None else "gateway",
        }


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
