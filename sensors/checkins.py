"""App check-ins: verifying `POST /api/v1/checkins` bodies (docs/checkin.md).

A check-in is a small JSON object signed by the member's app with the member key:

    {"member": REF, "store": STORE, "ts": UNIX_SECONDS, "nonce": HEX, "sig": HEX, "beacon": TOKEN?}

where ``sig`` = hex HMAC-SHA256(member key, the object without ``sig`` as JSON with sorted keys and no
spaces). Every value is ASCII by construction (refs, ids and nonces have patterns), so that serialisation is
the same in every language's JSON library.

`CheckinVerifier.verify` is the whole decision. It never changes state on a refusal: the nonce and the
member's rate count are recorded only once every check has passed, and recorded *first* in the nonce journal
(a small append-only file, fsynced) so a replay after a restart is refused as long as its timestamp could
still be accepted at all. Past the ±`skew_s` window a replayed body is stale anyway, which is what keeps the
nonce memory bounded: entries are forgotten once their timestamp is out of the window.

Refusals, by reason (HTTP status):

=================  ======  ====================================================================
too_large           413    body over MAX_BODY bytes
malformed           422    not JSON, a field missing, extra, or of the wrong type or shape
wrong_store         422    signed for another store
unknown_member      401    no key for this member       } answered as `unauthorized`, in the same words and
bad_signature       401    the signature does not match } time, so refs cannot be probed; counted apart
stale               409    timestamp more than `skew_s` from the gateway's clock
replayed            409    this member's nonce was accepted before
rate_limited        429    more than `rate_n` check-ins by this member in `rate_window_s`
busy                429    the nonce memory is full (only under a flood of distinct members)
unavailable         503    the nonce could not be written to disk (full or failing): nothing changed
=================  ======  ====================================================================
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import hmac
import json
import logging
import math
import os
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.files import write_all, write_atomic

log = logging.getLogger("visita.checkins")

MAX_BODY = 1024
"""Largest body accepted, bytes (a real check-in is about 200)."""
SKEW_S = 120.0
"""A check-in's `ts` may differ from the gateway's clock by at most this much."""
RATE_N = 6
RATE_WINDOW_S = 600.0
"""At most RATE_N accepted check-ins per member per RATE_WINDOW_S."""
MAX_NONCES = 200_000
"""Nonces remembered at most (the skew window's worth); beyond it check-ins are refused as busy."""
JOURNAL_FILE = "checkin-nonces.log"

FIELDS = {"member", "store", "ts", "nonce", "sig", "beacon"}
REQUIRED = ("member", "store", "ts", "nonce", "sig")
_MEMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_STORE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_NONCE = re.compile(r"^[0-9a-f]{16,64}$")
_SIG = re.compile(r"^[0-9a-f]{64}$")
_BEACON = re.compile(r"^(?:beacon:[0-9a-z:.-]{1,120}|eid:[0-9a-f]{16})$")

_NO_KEY = bytes(32)
"""What an unknown member's check-in is verified with, only so that it costs the same time; it is refused anyway."""

REASONS = {
    "too_large": 413,
    "malformed": 422,
    "wrong_store": 422,
    "unknown_member": 401,
    "bad_signature": 401,
    "stale": 409,
    "replayed": 409,
    "rate_limited": 429,
    "busy": 429,
    "unavailable": 503,
}
"""Every refusal reason and its HTTP status."""


@dataclass(frozen=True, slots=True)
class CheckIn:
    """A verified app check-in."""

    ts: float
    """When the gateway accepted it (data time), UNIX seconds."""
    member: str
    """Member ref (the key that signed it belongs to this member)."""
    client_ts: int
    """The phone's timestamp, UNIX seconds."""
    nonce: str
    """The phone's nonce, lowercase hex."""
    beacon: str | None
    """The store beacon the phone says it heard, if any: ``eid:<hex>``, the ephemeral id of an Eddystone-EID
    beacon (which proves it, while current), or a fixed beacon's subject id ``beacon:...`` (which proves nothing:
    anyone can copy it from the air)."""


class CheckinRefused(Exception):
    """A check-in that is not accepted; `reason` is one of REASONS, `status` its HTTP status."""

    def __init__(self, reason: str, message: str, field: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = REASONS[reason]
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s
        """When the same member may try again (rate_limited, busy, unavailable), seconds; the answer's Retry-After."""

    @property
    def public_reason(self) -> str:
        """The reason the answer gives: an unknown member and a bad signature are one `unauthorized`."""
        return "unauthorized" if self.status == 401 else self.reason


def canonical(obj: dict[str, Any]) -> bytes:
    """The signed bytes: the object without `sig`, JSON with sorted keys and no spaces."""
    return json.dumps({k: v for k, v in obj.items() if k != "sig"}, sort_keys=True, separators=(",", ":")).encode()


def sign(key: bytes, obj: dict[str, Any]) -> str:
    """What the app puts in `sig` (used by the tests, the benchmark and the docs' example)."""
    return hmac.new(key, canonical(obj), hashlib.sha256).hexdigest()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise CheckinRefused("malformed", f"field {dupes[0]} appears twice", dupes[0])
    return dict(pairs)


def parse(body: bytes) -> dict[str, Any]:
    """The body's object, shape-checked; CheckinRefused('malformed' | 'too_large') names the field and why."""
    if len(body) > MAX_BODY:
        raise CheckinRefused("too_large", f"body is over {MAX_BODY} bytes, the limit; send only the documented fields")
    try:
        obj = json.loads(body, object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckinRefused("malformed", "body is not a JSON object") from None
    if not isinstance(obj, dict):
        raise CheckinRefused("malformed", "body is not a JSON object")
    extra = sorted(set(obj) - FIELDS)
    if extra:
        raise CheckinRefused("malformed", f"unknown field {extra[0]} (allowed: {', '.join(sorted(FIELDS))})", extra[0])
    for name in REQUIRED:
        if name not in obj:
            raise CheckinRefused("malformed", f"{name} is missing", name)
    checks: list[tuple[str, re.Pattern[str], str]] = [
        ("member", _MEMBER, "1-64 of A-Z a-z 0-9 _ . : -, starting with a letter or digit"),
        ("store", _STORE, "the store id: a-z 0-9 _ -"),
        ("nonce", _NONCE, "16-64 lowercase hex digits"),
        ("sig", _SIG, "64 lowercase hex digits (HMAC-SHA256)"),
    ]
    if "beacon" in obj:
        checks.append(("beacon", _BEACON, "eid:<16 hex digits> (an Eddystone-EID heard) or a beacon id, beacon:..."))
    for name, pattern, what in checks:
        value = obj[name]
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise CheckinRefused("malformed", f"{name} must be {what}", name)
    ts = obj["ts"]
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 <= ts < 2**40:
        raise CheckinRefused("malformed", "ts must be UNIX seconds as a whole number", "ts")
    return obj


class NonceJournal:
    """Accepted (member, nonce, ts) on disk, so a restart does not forget them: append-only, fsynced, compacted."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / JOURNAL_FILE
        self._fd: int | None = None
        self._lines = 0
        self._dirty = False

    def load(self, now: float, skew_s: float) -> list[tuple[str, str, int]]:
        """Entries still inside the skew window; rewrites the file with only those. A torn last line is ignored."""
        live: list[tuple[str, str, int]] = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.path.read_text(encoding="ascii", errors="replace").splitlines():
                parts = line.split(" ")
                if len(parts) == 3 and parts[0].isdigit() and _NONCE.fullmatch(parts[2]):
                    ts = int(parts[0])
                    if ts + skew_s >= now:
                        live.append((parts[1], parts[2], ts))
        self.rewrite(live)
        return live

    def rewrite(self, entries: list[tuple[str, str, int]]) -> None:
        """Replace the file with `entries` (temp file, fsync, rename, fsync of the directory)."""
        self.close()
        # The rename must survive a power cut too, or the old journal comes back.
        write_atomic(self.path, "".join(f"{ts} {m} {n}\n" for m, n, ts in entries).encode(), 0o600)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._lines = len(entries)

    def append(self, member: str, nonce: str, ts: int) -> None:
        """Record one accepted check-in; durable at the next `sync` (before the gateway answers it). OSError (a full
        disk) leaves the file as it was: what a short write got onto it is cut off again, so the next line is not
        joined to a torn one (and both lost at the next start)."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        size = os.fstat(self._fd).st_size
        try:
            write_all(self._fd, f"{ts} {member} {nonce}\n".encode())
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise
        self._lines += 1
        self._dirty = True

    def sync(self) -> None:
        """fdatasync what was appended since the last sync (one for a whole group of check-ins)."""
        pending = self.sync_later()
        if pending is not None:
            pending()

    def sync_later(self) -> Callable[[], None] | None:
        """`sync` as a function to call on another thread (None when nothing needs it): it syncs a duplicate
        of the descriptor, so a compaction closing the file meanwhile cannot pull it from under the call."""
        if not self._dirty or self._fd is None:
            self._dirty = False
            return None
        fd = os.dup(self._fd)
        self._dirty = False

        def run() -> None:
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)

        return run

    def bloated(self, live: int) -> bool:
        """True when the file holds far more lines than the `live` entries (time to `rewrite`)."""
        return self._lines > 2 * live + 1000

    def close(self) -> None:
        """Close the file (appending reopens it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class CheckinVerifier:
    """Decides on check-ins: signature, freshness, replay, rate. Time comes in as `now` (data time)."""

    def __init__(
        self,
        store_id: str,
        key_of: Callable[[str], bytes | None],
        journal: NonceJournal | None = None,
        *,
        skew_s: float = SKEW_S,
        rate_n: int = RATE_N,
        rate_window_s: float = RATE_WINDOW_S,
        max_nonces: int = MAX_NONCES,
    ) -> None:
        self._store = store_id
        self._key_of = key_of
        self._journal = journal
        self._unwritable = False  # the journal's last append failed (a full disk): said once
        self._skew = skew_s
        self._rate_n = rate_n
        self._rate_window = rate_window_s
        self._max = max_nonces
        self._nonces: dict[tuple[str, str], int] = {}
        self._expiry: list[tuple[int, str, str]] = []  # heap of (client ts, member, nonce)
        self._recent: dict[str, deque[float]] = {}
        self.accepted = 0
        self.refused = dict.fromkeys(REASONS, 0)
        self.beacon_claims = dict.fromkeys(("none", "verified", "fixed", "unknown"), 0)
        self._loaded = journal is None  # the journal is read at the first check-in, with that check-in's time

    def _load(self, now: float) -> None:
        assert self._journal is not None
        for member, nonce, ts in self._journal.load(now, self._skew):
            self._remember(member, nonce, ts)
        self._loaded = True

    def _remember(self, member: str, nonce: str, ts: int) -> None:
        if (member, nonce) not in self._nonces:
            self._nonces[(member, nonce)] = ts
            heapq.heappush(self._expiry, (ts, member, nonce))

    def _forget_old(self, now: float) -> None:
        # A nonce whose ts is out of the window can only come back stale: no need to remember it.
        while self._expiry and self._expiry[0][0] + self._skew < now:
            _, member, nonce = heapq.heappop(self._expiry)
            self._nonces.pop((member, nonce), None)

    def verify(self, body: bytes, now: float) -> CheckIn:
        """The verified check-in, recorded; or CheckinRefused (counted by reason) with nothing recorded."""
        if not self._loaded:
            self._load(now)
        try:
            c = self._verify(body, now)
        except CheckinRefused as e:
            self.refused[e.reason] += 1
            raise
        self.accepted += 1
        return c

    def _verify(self, body: bytes, now: float) -> CheckIn:
        obj = parse(body)
        member: str = obj["member"]
        if obj["store"] != self._store:
            raise CheckinRefused("wrong_store", f"store is {obj['store']}, this is store {self._store}", "store")
        key = self._key_of(member)
        # An unknown member costs the same HMAC and gets the same answer as a bad signature: neither the words
        # nor the time of the answer may tell which member refs exist.
        good = hmac.compare_digest(sign(key or _NO_KEY, obj), obj["sig"])
        if key is None or not good:
            raise CheckinRefused(
                "unknown_member" if key is None else "bad_signature",
                "unknown member or bad signature: the app must hold the member key the backend provisioned and sign "
                "the body without sig, as JSON with sorted keys and no spaces (docs/checkin.md)",
            )
        ts: int = obj["ts"]
        if abs(ts - now) > self._skew:
            raise CheckinRefused(
                "stale", f"ts is {ts - now:+.0f} s from the gateway's clock; at most ±{self._skew:.0f} s", "ts"
            )
        self._forget_old(now)
        nonce: str = obj["nonce"]
        if (member, nonce) in self._nonces:
            raise CheckinRefused("replayed", "this nonce was used before: make a new one per check-in", "nonce")
        recent = self._recent.get(member)
        if recent is not None:
            while recent and recent[0] <= now - self._rate_window:
                recent.popleft()
            if len(recent) >= self._rate_n:
                wait = math.ceil(recent[0] + self._rate_window - now)
                raise CheckinRefused(
                    "rate_limited",
                    f"more than {self._rate_n} check-ins in {self._rate_window:.0f} s; try again in {wait} s",
                    retry_after_s=wait,
                )
        if len(self._nonces) >= self._max:
            raise CheckinRefused("busy", "too many check-ins right now; try again in a minute", retry_after_s=60)
        if self._journal is not None:
            try:
                self._journal.append(member, nonce, ts)  # synced before the check-in is answered
            except OSError as e:
                if not self._unwritable:  # once while it lasts, not at every check-in
                    self._unwritable = True
                    log.error(
                        "app check-ins are refused: their nonces cannot be written to %s (%s); free disk space",
                        self._journal.path,
                        e.strerror,
                    )
                raise CheckinRefused(
                    "unavailable",
                    "the gateway cannot record check-ins right now (its disk is full or failing); "
                    "try again in a minute",
                    retry_after_s=60,
                ) from None
            if self._unwritable:
                self._unwritable = False
                log.info("app check-ins are recorded again (%s)", self._journal.path)
        self._remember(member, nonce, ts)
        if recent is None:
            recent = self._recent[member] = deque()
            if len(self._recent) > self._max:  # members with no recent check-in are dropped first
                for m in [m for m, q in self._recent.items() if not q or q[-1] <= now - self._rate_window]:
                    del self._recent[m]
        recent.append(now)
        if self._journal is not None and self._journal.bloated(len(self._nonces)):
            self._journal.rewrite([(m, n, t) for (m, n), t in self._nonces.items()])
        beacon = obj.get("beacon")
        return CheckIn(now, member, ts, nonce, beacon if isinstance(beacon, str) else None)

    def shift(self, by: float) -> None:
        """The data clock was stepped forward by `by` seconds (gateway.runtime.Gateway.shift): the members' recent
        check-ins (data times, for the rate limit) move with it. Nonces stay: they are judged by the phone's own
        `ts`, which a step of the gateway's clock does not change (a replay stays refused as replayed or stale)."""
        for recent in self._recent.values():
            for i in range(len(recent)):
                recent[i] += by

    def sync_later(self) -> Callable[[], None] | None:
        """What makes the nonces of accepted check-ins durable, to run (on any thread) before they are
        answered; None when there is nothing to sync."""
        return self._journal.sync_later() if self._journal is not None else None

    def close(self) -> None:
        """Close the journal."""
        if self._journal is not None:
            self._journal.sync()
            self._journal.close()

    def count_beacon(self, proof: str) -> None:
        """Count what an accepted check-in's beacon claim proved (gateway.identity.BeaconRegistry.claim)."""
        self.beacon_claims[proof] += 1

    def diagnostics(self) -> dict[str, Any]:
        """Accepted, refused by reason, accepted ones by what their beacon claim proved, and nonces remembered."""
        return {
            "accepted": self.accepted,
            "refused": dict(self.refused),
            "beacon_claims": dict(self.beacon_claims),
            "nonces": len(self._nonces),
        }
