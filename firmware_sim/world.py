"""A store in a box: people and their phones, fixed beacons, receivers and the radio between them.

`World.advance(until)` plays simulated time forward and returns the `Advert`s the store's
receivers heard, in time order, exactly as a radio source would hand them over;
`World.advance_batch(until)` returns the same as columns (numpy arrays plus the world's address
and payload tables) for writers that never need one object per advert.

The world is computed in blocks of BLOCK_S seconds from its start, whatever the calls to
`advance` look like, so a scenario, seed and start time always give the same adverts. All of
one block's transmitters and receivers are handled at once with numpy:

1. arrivals by the hour-of-day rates start new people (firmware_sim.people plans their tracks);
2. positions and headings of everyone present at each whole second; the slow part of the
   channel (path loss, walls, spatial and drifting shadowing, body loss) for every
   (person or beacon) × receiver × second (firmware_sim.channel);
3. advertising events of every stream: interval plus a 0-10 ms advDelay per event (Core
   spec: advDelay), iOS app frames paused in background gaps;
4. per event and receiver: fading, sensitivity, scan window, collisions and packet loss;
5. every received packet gets its receive time (ms), receiver, address id, payload id, RSSI.

Phones use resolvable private addresses that rotate every `address_rotation_s` ± jitter; a
phone with the app sends the Visita member frame (a new token every 15-min window), an iPhone
also sends Apple Nearby Info unless `phones.ios_continuity` is off, phones without the app
send Apple Nearby Info (iPhones) or Samsung frames (the others) or nothing. Beacons keep one
address and interleave Eddystone-TLM frames (battery, temperature, advertising count, uptime).
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from firmware_sim import frames
from firmware_sim.channel import Channel
from firmware_sim.geometry import as_polygon
from firmware_sim.people import STAFF_HORIZON_S, Kind, Mover, Person, Stream, extend, still_track, zone_intervals
from firmware_sim.scenario import Beacon, Scenario
from gateway.model import Advert

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

BLOCK_S = 30
"""Seconds computed at once; the world is the same however `advance` is called."""
MAX_FINISHED = 5000
"""People who left kept for `pop_finished` at most (older ones are counted in `finished_dropped`)."""
ADV_DELAY_S = 0.010
"""Largest pseudo-random advDelay the link layer adds to each advertising event (Core spec)."""

KIND_MEMBER, KIND_NEARBY, KIND_SAMSUNG, KIND_BEACON, KIND_TLM = 0, 1, 2, 3, 4
"""Stream kinds (and payload key kinds: a beacon stream's TLM events use KIND_TLM)."""
_K1, _K2 = 1 << 32, 1 << 60


def member_keys(seed: int, members: int, staff: int) -> dict[str, bytes]:
    """The simulated app users' keys for a seed: `m00000`… then `staff-1`…, as the backend would provision them."""
    keys = {f"m{i:05d}": hashlib.sha256(f"visita-sim/{seed}/member/{i}".encode()).digest() for i in range(members)}
    for i in range(staff):
        keys[f"staff-{i + 1}"] = hashlib.sha256(f"visita-sim/{seed}/staff-{i + 1}".encode()).digest()
    return keys


@dataclass(frozen=True, slots=True)
class Batch:
    """Received packets as columns, in time order; ids index the world's `addresses` and `payloads`."""

    t_ms: I64
    """Receive time, UNIX milliseconds."""
    rx: npt.NDArray[np.uint8]
    """Receiver index (scenario order)."""
    address: npt.NDArray[np.uint32]
    """Address id."""
    payload: npt.NDArray[np.uint32]
    """Payload id."""
    rssi: npt.NDArray[np.int8]
    """RSSI, dBm."""

    def __len__(self) -> int:
        return len(self.t_ms)

    def take(self, sl: slice) -> Batch:
        """Rows `sl`."""
        return Batch(self.t_ms[sl], self.rx[sl], self.address[sl], self.payload[sl], self.rssi[sl])

    @staticmethod
    def concat(parts: list[Batch]) -> Batch:
        """One batch of several, in order."""
        if not parts:
            return EMPTY
        if len(parts) == 1:
            return parts[0]
        return Batch(
            np.concatenate([p.t_ms for p in parts]),
            np.concatenate([p.rx for p in parts]),
            np.concatenate([p.address for p in parts]),
            np.concatenate([p.payload for p in parts]),
            np.concatenate([p.rssi for p in parts]),
        )


EMPTY = Batch(
    np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.uint32), np.zeros(0, np.uint32), np.zeros(0, np.int8)
)

Payload = tuple[dict[int, bytes], dict[str, bytes]]
"""(manufacturer_data, service_data) of an advert."""


@dataclass(slots=True, eq=False)
class _BeaconState:
    cfg: Beacon
    address: int
    payload: int
    seq: int
    boot_ts: float
    slow: F64
    drift: F64
    carrier: Person | None = None
    """Someone carrying the beacon (a survey tag): its slow channel then follows their track and body."""


class World:
    """The simulated store; deterministic for a given scenario, seed and start time."""

    def __init__(self, scenario: Scenario, seed: int, start_ts: float) -> None:
        self.scenario = scenario
        self.seed = seed
        self.start_ts = float(math.floor(start_ts))
        pop, phones = scenario.population, scenario.phones
        people_rng, device_rng, channel_rng, field_rng, address_rng = (
            np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
        )
        self._rng = people_rng
        self._dev = device_rng
        self._addr_rng = address_rng
        self._mover = Mover(scenario, people_rng)
        self.channel = Channel(scenario, field_rng, channel_rng)
        self.receiver_ids = [r.id for r in scenario.receivers]
        self.zone_ids = [z.id for z in scenario.zones]
        self.zone_polys = [as_polygon(z.polygon) for z in scenario.zones]
        self._tz = ZoneInfo(scenario.timezone)
        self.member_keys = member_keys(seed, pop.members, pop.staff)
        self.staff_refs = [f"staff-{i + 1}" for i in range(pop.staff)]
        self._keys = list(self.member_keys.values())
        order = list(range(pop.members))
        self._rng.shuffle(order)
        self._free_members: deque[int] = deque(order)
        # Tables the batches refer to by id.
        self.addresses: list[str] = []
        self.address_random: list[bool] = []
        self.payloads: list[Payload] = []
        self._payload_ids: dict[int, int] = {}
        self._sid = 0
        self._pid = 0
        self.people: list[Person] = []
        # People who left, until `pop_finished` takes them (the recorder does every block); a live
        # `visita run --sim` never does, so only the newest are kept and the rest counted.
        self.finished: deque[Person] = deque(maxlen=MAX_FINISHED)
        self.finished_dropped = 0
        self._gen_until = self.start_ts
        self._next_shopper = self.start_ts + self._first_gap(pop.shoppers_per_hour)
        self._next_pedestrian = self.start_ts + self._first_gap(pop.pedestrians_per_hour)
        self._buffer: deque[Batch] = deque()
        self._now = self.start_ts
        self.counts = {
            "shopper": 0,
            "pedestrian": 0,
            "staff": 0,
            "left-phone": 0,
            "window_stops": 0,
            "with_app": 0,
            "phones": 0,
        }
        self.sent = 0
        self.delivered = 0
        self.per_receiver = np.zeros(len(self.receiver_ids), dtype=np.int64)
        self._ios_off = 1 - math.exp(-1 / phones.ios_active_mean_s)
        self._ios_on = 1 - math.exp(-1 / phones.ios_gap_mean_s) if phones.ios_gap_mean_s > 0 else 1.0
        self._beacons = [self._make_beacon(i, b) for i, b in enumerate(scenario.beacons)]
        self._beacon_streams = [
            Stream(self._new_sid(), KIND_BEACON, iv, self.start_ts + float(self._dev.uniform(0, iv)), beacon=i)
            for i, iv in enumerate(b.interval_ms / 1000 for b in scenario.beacons)
        ]
        for i in range(pop.staff):
            self._spawn_staff(i)
        for spot in pop.left_phones:
            still = still_track(self.start_ts, self.start_ts + STAFF_HORIZON_S, spot)
            self._add("left-phone", still, 1.0).open_ended = True

    # ------------------------------------------------------------------ tables

    def _new_sid(self) -> int:
        self._sid += 1
        return self._sid

    def _new_address(self, random: bool) -> int:
        b = bytearray(self._addr_rng.bytes(6))
        if random:
            b[0] = (b[0] & 0x3F) | 0x40  # resolvable private address: the two top bits are 01
        else:
            b[0] &= 0xFC  # a public (IEEE) address: unicast, globally administered
        self.addresses.append(":".join(f"{x:02X}" for x in b))
        self.address_random.append(random)
        return len(self.addresses) - 1

    def _payload(self, code: int, make: Any) -> int:
        pid = self._payload_ids.get(code)
        if pid is None:
            pid = self._payload_ids[code] = len(self.payloads)
            self.payloads.append(make())
        return pid

    def _make_beacon(self, i: int, b: Beacon) -> _BeaconState:
        if b.frame == "ibeacon":
            main: Payload = (frames.ibeacon(b.uuid, b.major, b.minor, b.frame_power), {})
        elif b.frame == "altbeacon":
            main = (frames.altbeacon(b.company_id, b.uuid, b.major, b.minor, b.frame_power), {})
        elif b.frame == "eddystone-uid":
            main = ({}, frames.eddystone_uid(b.namespace, b.instance, b.frame_power + 41))
        elif b.frame == "eddystone-eid":  # its id rotates: `_maker` builds one frame per period (never this one)
            main = ({}, frames.eddystone_eid(frames.eid_value(bytes.fromhex(b.eid_key), 0, 0), b.frame_power + 41))
        else:
            main = ({}, frames.eddystone_url(b.url, b.frame_power + 41))
        x, y = np.array([b.position[0]]), np.array([b.position[1]])
        uptime = b.uptime_days * 86_400
        return _BeaconState(
            cfg=b,
            address=self._new_address(random=False),
            payload=self._payload(KIND_BEACON * _K2 + i * _K1, lambda: main),
            seq=int(uptime * 1000 / b.interval_ms),
            boot_ts=self.start_ts - uptime,
            slow=self.channel.slow(x, y, None)[0],
            drift=self.channel.initial_drift(1)[0],
        )

    def carry_beacon(self, beacon: Beacon, t: F64, x: F64, y: F64, heading: F64) -> int:
        """Add a beacon carried along a track (knot times, positions, headings): a survey tag in an
        installer's hand, heard through the same channel as everything else (body loss included). Call before
        the first `advance`. Returns its address id."""
        if self._gen_until > self.start_ts:
            raise RuntimeError("carry_beacon must be called before the world is advanced")
        i = len(self._beacons)
        state = self._make_beacon(i, beacon)
        self._pid += 1
        state.carrier = Person(self._pid, "staff", t, x, y, heading)
        self._beacons.append(state)
        iv = beacon.interval_ms / 1000
        self._beacon_streams.append(
            Stream(self._new_sid(), KIND_BEACON, iv, self.start_ts + float(self._dev.uniform(0, iv)), beacon=i)
        )
        return state.address

    # ------------------------------------------------------------------ people

    def _give_phone(self, p: Person, app_share: float, t0: float) -> None:
        pop, phones = self.scenario.population, self.scenario.phones
        dev = self._dev
        app = p.member is not None or (bool(dev.random() < app_share) and bool(self._free_members))
        if app and p.member is None:
            idx = self._free_members.popleft()
            p.member, p.member_index = f"m{idx:05d}", idx
        advertises = app or bool(dev.random() < pop.phone_share)
        ios = bool(dev.random() < phones.ios_share)
        p.rssi_1m = float(dev.normal(phones.rssi_1m_dbm, phones.rssi_1m_spread_db))
        p.drift = self.channel.initial_drift(1)[0]
        if not advertises:
            return
        p.platform = "ios" if ios else "android"
        kinds: list[tuple[int, bool]] = []
        if app:
            kinds.append((KIND_MEMBER, ios and phones.ios_gap_mean_s > 0))
        if ios and (phones.ios_continuity or not app):
            kinds.append((KIND_NEARBY, False))
        if not ios and not app:
            kinds.append((KIND_SAMSUNG, False))
        lo, hi = (v / 1000 for v in phones.interval_ms)
        active = phones.ios_active_mean_s / (phones.ios_active_mean_s + phones.ios_gap_mean_s)
        for kind, gaps in kinds:
            interval = float(math.exp(dev.uniform(math.log(lo), math.log(hi))))
            on = not gaps or bool(dev.random() < active)
            p.streams.append(Stream(self._new_sid(), kind, interval, t0 + float(dev.uniform(0, interval)), gaps, on, p))
        period = phones.address_rotation_s
        p.addresses.append([self._new_address(random=True), t0, math.inf])
        p.rotate_at = t0 + float(dev.uniform(0, 1)) * period
        self.counts["phones"] += 1
        self.counts["with_app"] += int(app)

    def _add(self, kind: Kind, track: Any, app_share: float, member: tuple[str, int] | None = None) -> Person:
        t, x, y, h = track.arrays()
        self._pid += 1
        p = Person(self._pid, kind, t, x, y, h)
        if member is not None:
            p.member, p.member_index = member
        self._give_phone(p, app_share, p.t0)
        self.people.append(p)
        self.counts[kind] += 1
        return p

    def _spawn_staff(self, i: int) -> None:
        tr = self._mover.staff_track(self.start_ts, self.start_ts + STAFF_HORIZON_S)
        p = self._add("staff", tr, 1.0, (self.staff_refs[i], self.scenario.population.members + i))
        p.open_ended = True

    def _first_gap(self, per_hour: list[float]) -> float:
        peak = max(per_hour)
        return float(self._rng.exponential(3600.0 / peak)) if peak > 0 else math.inf

    def _rate(self, per_hour: list[float], t: float) -> float:
        return per_hour[datetime.fromtimestamp(t, self._tz).hour]

    def _arrivals(self, cand: float, per_hour: list[float], b1: float) -> tuple[list[float], float]:
        """Arrivals before b1 of a Poisson process whose rate follows the hour of day, by thinning.

        `cand` is the next candidate time (already drawn); returns the arrivals and the next candidate.
        """
        out: list[float] = []
        peak = max(per_hour)
        if peak <= 0:
            return out, math.inf
        t = cand
        while t < b1:
            if self._rng.random() * peak < self._rate(per_hour, t):
                out.append(t)
            t += float(self._rng.exponential(3600.0 / peak))
        return out, t

    def _spawn(self, b1: float) -> None:
        pop = self.scenario.population
        shoppers, self._next_shopper = self._arrivals(self._next_shopper, pop.shoppers_per_hour, b1)
        walkers, self._next_pedestrian = self._arrivals(self._next_pedestrian, pop.pedestrians_per_hour, b1)
        for t in shoppers:
            track, _zones = self._mover.shopper(t)
            self._add("shopper", track, pop.app_share)
        for t in walkers:
            track, stopped = self._mover.pedestrian(t)
            p = self._add("pedestrian", track, pop.pedestrian_app_share)
            p.window_stop = stopped
            self.counts["window_stops"] += int(stopped)

    def _retire(self, b0: float) -> None:
        keep: list[Person] = []
        for p in self.people:
            if p.open_ended and p.t1 < b0 + BLOCK_S + 60:
                here = (float(p.kx[-1]), float(p.ky[-1]))
                more = still_track if p.kind == "left-phone" else self._mover.staff_track
                extend(p, more(p.t1, p.t1 + STAFF_HORIZON_S, here))
            if p.t1 <= b0:
                if p.addresses:
                    p.addresses[-1][2] = p.t1
                if p.member_index is not None and p.kind != "staff":
                    self._free_members.append(p.member_index)  # the member may come back later
                self.finished_dropped += int(len(self.finished) == MAX_FINISHED)
                self.finished.append(p)
            else:
                keep.append(p)
        self.people = keep

    # ------------------------------------------------------------------ one block

    def _samples(self, people: list[Person], b0: float, n: int) -> tuple[F64, F64, F64]:
        """Positions and headings of `people` at b0, b0+1, …, b0+n-1: arrays (people, n)."""
        lens = np.array([len(p.kt) for p in people], dtype=np.int64)
        offs = np.cumsum(lens) - lens
        kt = np.concatenate([p.kt for p in people])
        kx = np.concatenate([p.kx for p in people])
        ky = np.concatenate([p.ky for p in people])
        kh = np.concatenate([p.kh for p in people])
        span = 1e7
        rows = np.repeat(np.arange(len(people)), lens)
        key = rows * span + np.clip(kt - b0, -span / 4, span / 4)
        q = (np.arange(len(people))[:, None] * span + np.arange(n)[None, :]).ravel()
        idx = np.searchsorted(key, q, side="right") - 1
        lo = np.repeat(offs, n)
        hi = np.repeat(offs + np.maximum(lens - 2, 0), n)
        idx = np.clip(idx, lo, hi)
        nxt = np.minimum(idx + 1, np.repeat(offs + lens - 1, n))
        qt = b0 + np.tile(np.arange(n, dtype=np.float64), len(people))
        ta, tb = kt[idx], kt[nxt]
        frac = np.clip(np.where(tb > ta, (qt - ta) / np.where(tb > ta, tb - ta, 1.0), 0.0), 0.0, 1.0)
        x = kx[idx] + frac * (kx[nxt] - kx[idx])
        y = ky[idx] + frac * (ky[nxt] - ky[idx])
        h = np.where(qt < ta, kh[np.maximum(idx, lo)], kh[idx])
        shape = (len(people), n)
        return x.reshape(shape), y.reshape(shape), h.reshape(shape)

    def _events(self, streams: list[Stream], b1: float) -> tuple[I64, F64, I64]:
        """Advertising events before b1: (stream index, time, rank within the stream); updates next_tx."""
        nt = np.array([s.next_tx for s in streams])
        iv = np.array([s.interval_s for s in streams])
        counts = np.maximum(np.ceil((b1 - nt) / iv), 0).astype(np.int64) + 1
        starts = np.cumsum(counts) - counts
        total = int(counts.sum())
        rows = np.repeat(np.arange(len(streams)), counts)
        rank = np.arange(total) - np.repeat(starts, counts)
        delay = self._dev.uniform(0, ADV_DELAY_S, total)
        delay[starts] = 0.0
        cum = np.cumsum(delay)
        t = nt[rows] + rank * iv[rows] + (cum - np.repeat(cum[starts], counts))
        inside = t < b1
        new_nt = np.minimum.reduceat(np.where(inside, np.inf, t), starts)
        for s, v in zip(streams, new_nt.tolist(), strict=True):
            s.next_tx = v
        return rows[inside], t[inside], rank[inside]

    def _gap_mask(self, streams: list[Stream], b0: float, n: int) -> npt.NDArray[np.bool_]:
        """On/off state of every stream for each whole second of the block: (streams, n)."""
        on = np.ones((len(streams), n), dtype=np.bool_)
        gi = [i for i, s in enumerate(streams) if s.gaps]
        if not gi:
            return on
        state = np.array([streams[i].on for i in gi])
        u = self._dev.random((n, len(gi)))
        cols = np.empty((len(gi), n), dtype=np.bool_)
        for k in range(n):
            cols[:, k] = state
            state = np.where(state, u[k] >= self._ios_off, u[k] < self._ios_on)
        on[gi] = cols
        for i, v in zip(gi, state.tolist(), strict=True):
            streams[i].on = bool(v)
        return on

    def _block(self, b0: float) -> Batch:
        n = BLOCK_S
        b1 = b0 + n
        self._spawn(b1)
        self._retire(b0)
        people = [p for p in self.people if p.t0 < b1]
        n_p, n_b = len(people), len(self._beacons)
        # The slow channel of everyone present, at every whole second b0..b1 (n + 1 samples).
        slow_parts = []
        if n_p:
            x, y, h = self._samples(people, b0, n + 1)
            drift = self.channel.drift(np.stack([p.drift for p in people]), n)
            for p, d in zip(people, drift[:, -1], strict=True):
                p.drift = d
            slow_parts.append(self.channel.slow(x, y, h) + drift)
        if n_b:
            drift = self.channel.drift(np.stack([b.drift for b in self._beacons]), n)
            for b, d in zip(self._beacons, drift[:, -1], strict=True):
                b.drift = d
            static = np.stack([b.slow for b in self._beacons])[:, None, :] + np.zeros((1, n + 1, 1))
            for i, b in enumerate(self._beacons):
                if b.carrier is not None:
                    bx, by, bh = self._samples([b.carrier], b0, n + 1)
                    static[i] = self.channel.slow(bx, by, bh)[0]
            slow_parts.append(static + drift)
        streams = [s for p in people for s in p.streams] + self._beacon_streams
        if not streams:
            return EMPTY
        slow = np.concatenate(slow_parts)
        row_of = {id(p): i for i, p in enumerate(people)}
        emitter = np.array([row_of[id(s.owner)] if s.owner is not None else n_p + s.beacon for s in streams])
        power_1m = np.array(
            [s.owner.rssi_1m if s.owner is not None else self._beacons[s.beacon].cfg.rssi_1m for s in streams]
        )
        life = np.array([(s.owner.t0, s.owner.t1) if s.owner is not None else (-np.inf, np.inf) for s in streams])
        idx, t, rank = self._events(streams, b1)
        sent_by_stream = np.bincount(idx, minlength=len(streams))
        step = np.clip((t - b0).astype(np.int64), 0, n - 1)
        on = self._gap_mask(streams, b0, n)[idx, step] & (t >= life[idx, 0]) & (t < life[idx, 1])
        idx, t, rank, step = idx[on], t[on], rank[on], step[on]
        self.sent += len(t)
        e = emitter[idx]
        frac = (t - b0 - step)[:, None]
        power = slow[e, step] * (1 - frac) + slow[e, step + 1] * frac + power_1m[idx][:, None]
        heard, rssi = self.channel.receive(t, power, step, n)
        ev, rx = np.nonzero(heard)
        out_t, out_idx, out_rank = t[ev], idx[ev], rank[ev]
        t_ms = np.rint(out_t * 1000).astype(np.int64)
        address, payload = self._ids(streams, out_idx, out_t, out_rank, b1)
        for s in self._beacon_streams:  # TLM counts every frame sent, heard or not
            self._beacons[s.beacon].seq += int(sent_by_stream[len(streams) - len(self._beacon_streams) + s.beacon])
        order = np.lexsort((rx, t_ms))
        return Batch(
            t_ms[order],
            rx[order].astype(np.uint8),
            address[order].astype(np.uint32),
            payload[order].astype(np.uint32),
            rssi[ev, rx][order].astype(np.int8),
        )

    def _ids(self, streams: list[Stream], idx: I64, t: F64, rank: I64, b1: float) -> tuple[I64, I64]:
        """Address and payload ids of received packets; rotates addresses due in this block."""
        phones = self.scenario.phones
        m = len(streams)
        # Per stream: the address before and after a rotation in this block.
        cur = np.empty(m, dtype=np.int64)
        nxt = np.empty(m, dtype=np.int64)
        rot = np.full(m, np.inf)
        kind = np.array([s.kind for s in streams], dtype=np.int64)
        k1 = np.zeros(m, dtype=np.int64)
        seq0 = np.zeros(m, dtype=np.int64)
        tlm_every = np.zeros(m, dtype=np.int64)
        eid_k = np.full(m, -1, dtype=np.int64)  # an Eddystone-EID beacon's rotation exponent, -1 for the rest
        owners = {id(s.owner): s.owner for s in streams if s.owner is not None}
        for p in owners.values():
            if p.rotate_at < min(b1, p.t1) and p.addr_next < 0:
                p.addr_next = self._new_address(random=True)
        for i, s in enumerate(streams):
            if s.owner is not None:
                p = s.owner
                cur[i] = p.address
                nxt[i] = p.addr_next if p.addr_next >= 0 else cur[i]
                rot[i] = p.rotate_at
                k1[i] = p.member_index if s.kind == KIND_MEMBER and p.member_index is not None else 0
            else:
                bs = self._beacons[s.beacon]
                cur[i] = nxt[i] = bs.address
                k1[i] = s.beacon
                seq0[i] = bs.seq
                tlm_every[i] = bs.cfg.tlm_every
                if bs.cfg.frame == "eddystone-eid":
                    eid_k[i] = bs.cfg.rotation_exponent
        address = np.where(t < rot[idx], cur[idx], nxt[idx])
        # Payload keys: kind, then member index / address / beacon, then window / TLM sequence number.
        ek = kind[idx]
        seq = seq0[idx] + rank + 1
        is_tlm = (ek == KIND_BEACON) & (tlm_every[idx] > 0) & (seq % np.maximum(tlm_every[idx], 1) == 0)
        ek = np.where(is_tlm, KIND_TLM, ek)
        a = np.where((ek == KIND_NEARBY) | (ek == KIND_SAMSUNG), address, k1[idx])
        window = np.floor(t / frames.MEMBER_WINDOW_S).astype(np.int64)
        period = np.floor(t).astype(np.int64) >> np.maximum(eid_k[idx], 0)  # EID beacons count UNIX seconds
        is_eid = (ek == KIND_BEACON) & (eid_k[idx] >= 0)
        b = np.select([ek == KIND_MEMBER, ek == KIND_TLM, is_eid], [window, seq & 0xFFFFFFFF, period + 1], 0)
        codes = ek * _K2 + a * _K1 + b
        uniq, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
        lut = np.array(
            [
                self._payload(int(c), self._maker(int(c), float(t[f])))
                for c, f in zip(uniq.tolist(), first.tolist(), strict=True)
            ],
            dtype=np.int64,
        )
        # Phones due for a new address take it.
        for p in owners.values():
            if p.rotate_at < b1 and p.rotate_at < p.t1:
                p.addresses[-1][2] = p.rotate_at
                p.addresses.append([p.addr_next, p.rotate_at, math.inf])
                p.addr_next = -1
                j = phones.address_rotation_jitter
                p.rotate_at += phones.address_rotation_s * float(self._dev.uniform(1 - j, 1 + j))
        return address, lut[inverse.reshape(-1)]

    def _maker(self, code: int, t: float) -> Any:
        kind, a, b = code // _K2, (code % _K2) // _K1, code % _K1
        phones = self.scenario.phones
        if kind == KIND_MEMBER:
            key, ts = self._keys[a], b * frames.MEMBER_WINDOW_S
            return lambda: (frames.member_frame(key, ts, phones.app_measured_power), {})
        if kind in (KIND_NEARBY, KIND_SAMSUNG):
            h = hashlib.sha256(f"visita-sim/{self.seed}/payload/{a}".encode()).digest()
            if kind == KIND_NEARBY:
                return lambda: (frames.apple_nearby_info(0x07, bytes([0x1C]) + h[:3]), {})
            return lambda: (frames.samsung(bytes.fromhex("4209810214") + h[:5]), {})
        beacon = self._beacons[a]
        cfg = beacon.cfg
        if kind == KIND_BEACON:  # an Eddystone-EID beacon's frame of period b - 1 (b = 0: the fixed main frame)
            counter = (b - 1) << cfg.rotation_exponent
            return lambda: (
                {},
                frames.eddystone_eid(
                    frames.eid_value(bytes.fromhex(cfg.eid_key), cfg.rotation_exponent, counter), cfg.frame_power + 41
                ),
            )
        uptime = t - beacon.boot_ts
        battery = max(1, round(cfg.battery_mv - cfg.battery_drain_mv_per_day * uptime / 86_400))
        temp = cfg.temperature_c + 1.5 * math.sin(2 * math.pi * (t % 86_400) / 86_400)
        return lambda: ({}, frames.eddystone_tlm(battery, round(temp, 2), b, uptime))

    # ------------------------------------------------------------------ stepping

    @property
    def now(self) -> float:
        """Simulated time reached so far."""
        return self._now

    def advance_batch(self, until: float) -> Batch:
        """Play forward to `until`; the packets received on the way, in time order, as columns."""
        while self._gen_until <= until:
            batch = self._block(self._gen_until)
            self._gen_until += BLOCK_S
            if len(batch):
                self._buffer.append(batch)
        limit = math.floor(until * 1000 + 1e-6)
        parts: list[Batch] = []
        while self._buffer:
            head = self._buffer[0]
            if head.t_ms[-1] <= limit:
                parts.append(self._buffer.popleft())
                continue
            cut = int(np.searchsorted(head.t_ms, limit, side="right"))
            if cut:
                parts.append(head.take(slice(0, cut)))
                self._buffer[0] = head.take(slice(cut, None))
            break
        self._now = max(self._now, until)
        out = Batch.concat(parts)
        self.delivered += len(out)
        if len(out):
            self.per_receiver += np.bincount(out.rx, minlength=len(self.receiver_ids))
        return out

    def adverts(self, batch: Batch) -> list[Advert]:
        """The batch as Adverts, the record every source hands the pipeline."""
        rx_ids, addrs, rnd, pl = self.receiver_ids, self.addresses, self.address_random, self.payloads
        return [
            Advert(t / 1000, rx_ids[r], addrs[a], rnd[a], s, None, pl[p][0], pl[p][1])
            for t, r, a, p, s in zip(
                batch.t_ms.tolist(),
                batch.rx.tolist(),
                batch.address.tolist(),
                batch.payload.tolist(),
                batch.rssi.tolist(),
                strict=True,
            )
        ]

    def advance(self, until: float) -> list[Advert]:
        """Play forward to `until`; the adverts heard on the way, in time order."""
        return self.adverts(self.advance_batch(until))

    # ------------------------------------------------------------------ truth

    def pop_finished(self) -> list[Person]:
        """People whose track ended so far (each returned once)."""
        out = list(self.finished)
        self.finished.clear()
        return out

    def beacon_address(self, i: int) -> int:
        """Address id of beacon `i` (scenario order)."""
        return self._beacons[i].address

    def zones_of(self, p: Person, until: float) -> list[list[Any]]:
        """Ground-truth zone runs of a person up to `until`."""
        return zone_intervals(p, until, self.zone_polys, self.zone_ids)

    def summary(self) -> dict[str, Any]:
        """Subjects, visits and pass-bys so far (ground truth), adverts, adverts per receiver."""
        c = self.counts
        return {
            "simulated_s": self._now - self.start_ts,
            "subjects": c["shopper"] + c["pedestrian"] + c["staff"] + c["left-phone"] + len(self._beacons),
            "shoppers": c["shopper"],
            "pedestrians": c["pedestrian"],
            "staff": c["staff"],
            "left_phones": c["left-phone"],
            "beacons": len(self._beacons),
            "visits": c["shopper"],
            "pass_bys": c["pedestrian"],
            "window_stops": c["window_stops"],
            "phones": c["phones"],
            "with_app": c["with_app"],
            "addresses": len(self.addresses),
            "finished_not_collected": self.finished_dropped,
            "packets_sent": self.sent,
            "adverts": self.delivered,
            "per_receiver": dict(zip(self.receiver_ids, self.per_receiver.tolist(), strict=True)),
        }
