"""A store in a box: people moving through zones, their phones, fixed beacons, the radio.

`World.advance(until)` plays simulated time forward in one-second steps and returns the
`Advert`s the store's receivers heard, exactly as a radio source would hand them over.
Everything random comes from one seeded generator, so a seed gives the same run.

Who is simulated:
* shoppers arrive from either end of the sidewalk, enter through the door, browse a few
  zones, pay at the checkout and leave; some carry the loyalty app (member frame), most
  phones only send anonymous presence frames, a few send nothing;
* pedestrians walk past on the sidewalk (some with the app: they must earn nothing);
* staff members stay inside all day;
* fixed beacons advertise from their mounting points.

The radio: log-distance path loss, a loss through the shop front, shadowing that drifts
per (transmitter, receiver) with a correlation time, fast fading per packet, receiver
sensitivity and random packet loss. Ground truth (who really entered, when, and where
they went) is kept for tests and evaluation.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from firmware_sim import frames
from firmware_sim.scenario import Point, Scenario
from gateway.model import Advert

ALTBEACON_COMPANY_ID = 0x0118  # Radius Networks, the AltBeacon spec's own example
STEP_S = 1.0
TLM_EVERY_S = 10  # an Eddystone beacon interleaves one TLM frame every 10 s
PHONE_REF_RSSI = -59

Kind = Literal["shopper", "pedestrian", "staff"]


def inside_polygon(x: float, y: float, polygon: list[Point]) -> bool:
    """Ray casting; points on an edge count as inside the zone to the left/bottom."""
    hit = False
    n = len(polygon)
    for i in range(n):
        x1, y1 = polygon[i]
        x2, y2 = polygon[(i + 1) % n]
        if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
            hit = not hit
    return hit


@dataclass(slots=True)
class Truth:
    """What really happened to one person (ground truth)."""

    pid: int
    kind: Kind
    member: str | None
    phone: bool
    entered: float | None
    left: float | None
    zones: list[str]


@dataclass(slots=True)
class _Person:
    pid: int
    kind: Kind
    kt: list[float]
    kx: list[float]
    ky: list[float]
    member: str | None
    key: bytes | None
    phone: bool
    phase: float
    address: str
    rotate_at: float
    shadow: np.ndarray[Any, np.dtype[np.float64]]
    truth: Truth
    frame_window: int = -1
    frame: dict[int, bytes] = field(default_factory=dict)

    @property
    def t_end(self) -> float:
        return self.kt[-1]


@dataclass(slots=True)
class _Beacon:
    position: Point
    ref_rssi: int
    manufacturer_data: dict[int, bytes]
    service_data: dict[str, bytes]
    eddystone: bool
    battery_mv: int
    address: str


class World:
    """The simulated store; deterministic for a given scenario, seed and start time."""

    def __init__(self, scenario: Scenario, seed: int, start_ts: float) -> None:
        self.scenario = scenario
        self._rng = np.random.default_rng(seed)
        self._t = float(math.floor(start_ts))
        self.start_ts = self._t
        radio = scenario.radio
        self._rho = math.exp(-STEP_S / radio.shadowing_correlation_s)
        self._rx_ids = [r.id for r in scenario.receivers]
        self._rx_pos = np.array([r.position for r in scenario.receivers], dtype=np.float64)
        self._rx_outside = np.array([self._outside(*r.position) for r in scenario.receivers])
        self._zones_inside = [z for z in scenario.zones if not z.outside]
        self._shop_zones = [z.id for z in self._zones_inside if z.id not in ("entrance", "checkout")] or [
            z.id for z in self._zones_inside
        ]
        pop = scenario.population
        self.member_keys: dict[str, bytes] = {
            f"m{i:05d}": hashlib.sha256(f"visita-sim/{seed}/member/{i}".encode()).digest() for i in range(pop.members)
        }
        self.staff_refs = [f"staff-{i + 1}" for i in range(pop.staff)]
        for ref in self.staff_refs:
            self.member_keys[ref] = hashlib.sha256(f"visita-sim/{seed}/{ref}".encode()).digest()
        self._free_members = list(self.member_keys)[: pop.members]
        self._rng.shuffle(self._free_members)
        self._people: list[_Person] = []
        self.truth: list[Truth] = []
        self._pid = 0
        self._next_shopper = self._t + self._exp(pop.shoppers_per_hour)
        self._next_pedestrian = self._t + self._exp(pop.pedestrians_per_hour)
        self._beacons = self._make_beacons()
        self._beacon_shadow = self._rng.normal(0, radio.shadowing_sigma_db, (len(self._beacons), len(self._rx_ids)))
        self.adverts = 0
        self.per_receiver = dict.fromkeys(self._rx_ids, 0)
        for ref in self.staff_refs:
            self._spawn_staff(ref)

    # ------------------------------------------------------------------ helpers

    def _exp(self, per_hour: float) -> float:
        return math.inf if per_hour <= 0 else float(self._rng.exponential(3600.0 / per_hour))

    def _outside(self, x: float, y: float) -> bool:
        return any(z.outside and inside_polygon(x, y, z.polygon) for z in self.scenario.zones)

    def zone_at(self, x: float, y: float) -> str | None:
        """The zone containing a point (ground truth), or None."""
        for z in self.scenario.zones:
            if inside_polygon(x, y, z.polygon):
                return z.id
        return None

    def _point_in(self, zone_id: str) -> Point:
        zone = next(z for z in self.scenario.zones if z.id == zone_id)
        xs = [p[0] for p in zone.polygon]
        ys = [p[1] for p in zone.polygon]
        for _ in range(100):
            x = float(self._rng.uniform(min(xs) + 1, max(xs) - 1))
            y = float(self._rng.uniform(min(ys) + 1, max(ys) - 1))
            if inside_polygon(x, y, zone.polygon):
                return x, y
        return (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2

    def _address(self) -> str:
        b = bytearray(self._rng.bytes(6))
        b[0] = (b[0] & 0x3F) | 0x40  # resolvable private address: top bits 01
        return ":".join(f"{x:02X}" for x in b)

    def _new_person(self, kind: Kind, route: list[tuple[Point, float]], t0: float, app_share: float) -> _Person:
        """A person following `route`: (point, dwell seconds) pairs, walking between them."""
        pop = self.scenario.population
        kt, kx, ky = [t0], [route[0][0][0]], [route[0][0][1]]
        for (x, y), dwell in route[1:]:
            dist = math.hypot(x - kx[-1], y - ky[-1])
            speed = pop.walking_speed_mps * float(self._rng.uniform(0.8, 1.2))
            kt.append(kt[-1] + dist / speed)
            kx.append(x)
            ky.append(y)
            if dwell > 0:
                kt.append(kt[-1] + dwell)
                kx.append(x)
                ky.append(y)
        member = None
        if kind != "staff" and self._free_members and self._rng.random() < app_share:
            member = self._free_members.pop()
        phone = kind == "staff" or member is not None or bool(self._rng.random() < pop.phone_share)
        self._pid += 1
        truth = Truth(self._pid, kind, member, phone, None, None, [])
        person = _Person(
            pid=self._pid,
            kind=kind,
            kt=kt,
            kx=kx,
            ky=ky,
            member=member,
            key=self.member_keys[member] if member else None,
            phone=phone,
            phase=float(self._rng.uniform(0, STEP_S)),
            address=self._address(),
            rotate_at=t0 + float(self._rng.uniform(0.2, 1.0)) * pop.address_rotation_s,
            shadow=self._rng.normal(0, self.scenario.radio.shadowing_sigma_db, len(self._rx_ids)),
            truth=truth,
        )
        self._people.append(person)
        self.truth.append(truth)
        return person

    def _spawn_shopper(self, t0: float) -> None:
        pop = self.scenario.population
        door = self.scenario.door
        left = bool(self._rng.random() < 0.5)
        start: Point = (-14.0 if left else 44.0, float(self._rng.uniform(-5, -1)))
        end: Point = (44.0 if not left else -14.0, float(self._rng.uniform(-5, -1)))
        n = int(self._rng.integers(pop.zones_per_visit[0], pop.zones_per_visit[1] + 1))
        zones = [str(z) for z in self._rng.choice(self._shop_zones, size=min(n, len(self._shop_zones)), replace=False)]
        route: list[tuple[Point, float]] = [(start, 0), (door.outside, 0), (door.inside, 0)]
        for z in zones:
            route.append((self._point_in(z), float(self._rng.uniform(*pop.dwell_per_zone_s))))
        if any(z.id == "checkout" for z in self._zones_inside):
            zones.append("checkout")
            route.append((self._point_in("checkout"), float(self._rng.uniform(*pop.checkout_s))))
        route += [(door.inside, 0), (door.outside, 0), (end, 0)]
        p = self._new_person("shopper", route, t0, pop.shopper_app_share)
        # Ground truth: inside from the door-inside knot on the way in to the one on the way out.
        p.truth.entered = p.kt[2]
        p.truth.left = p.kt[-3]
        p.truth.zones = zones

    def _spawn_pedestrian(self, t0: float) -> None:
        pop = self.scenario.population
        y = float(self._rng.uniform(-5.5, -0.5))
        left = bool(self._rng.random() < 0.5)
        route: list[tuple[Point, float]] = [((-14.0 if left else 44.0, y), 0), ((44.0 if left else -14.0, y), 0)]
        self._new_person("pedestrian", route, t0, pop.pedestrian_app_share)

    def _spawn_staff(self, ref: str) -> None:
        route: list[tuple[Point, float]] = [
            (self._point_in("checkout" if "checkout" in self._shop_zones else self._zones_inside[0].id), 60.0)
        ]
        inside = [z.id for z in self._zones_inside]
        total = 0.0
        while total < 86_400:
            dwell = float(self._rng.uniform(120, 900))
            route.append((self._point_in(str(self._rng.choice(inside))), dwell))
            total += dwell + 20
        p = self._new_person("staff", route, self._t, 0.0)
        p.member, p.key, p.phone = ref, self.member_keys[ref], True
        p.truth.member, p.truth.entered, p.truth.zones = ref, self._t, inside

    def _make_beacons(self) -> list[_Beacon]:
        out: list[_Beacon] = []
        for b in self.scenario.beacons:
            mfr: dict[int, bytes] = {}
            svc: dict[str, bytes] = {}
            if b.frame == "ibeacon":
                mfr, ref = frames.ibeacon(b.uuid, b.major, b.minor, b.measured_power), b.measured_power
            elif b.frame == "altbeacon":
                mfr = frames.altbeacon(ALTBEACON_COMPANY_ID, b.uuid, b.major, b.minor, b.measured_power)
                ref = b.measured_power
            else:
                svc, ref = frames.eddystone_uid(b.namespace, b.instance, b.tx_power), b.tx_power - 41
            out.append(_Beacon(b.position, ref, mfr, svc, b.frame == "eddystone-uid", b.battery_mv, self._address()))
        return out

    # ------------------------------------------------------------------ stepping

    @property
    def now(self) -> float:
        """Simulated time reached so far."""
        return self._t

    def advance(self, until: float) -> list[Advert]:
        """Play forward to `until` (whole seconds); the adverts heard on the way, in time order."""
        out: list[Advert] = []
        pop = self.scenario.population
        while self._t + STEP_S <= until:
            t = self._t = self._t + STEP_S
            while self._next_shopper <= t:
                self._spawn_shopper(self._next_shopper)
                self._next_shopper += self._exp(pop.shoppers_per_hour)
            while self._next_pedestrian <= t:
                self._spawn_pedestrian(self._next_pedestrian)
                self._next_pedestrian += self._exp(pop.pedestrians_per_hour)
            self._people = [p for p in self._people if p.t_end >= t - STEP_S]
            out += self._step(t)
        self.adverts += len(out)
        return out

    def _step(self, t: float) -> list[Advert]:
        radio = self.scenario.radio
        active = [p for p in self._people if p.phone and p.kt[0] <= t <= p.t_end]
        n_p, n_b, n_r = len(active), len(self._beacons), len(self._rx_ids)
        pos = np.empty((n_p + n_b, 2))
        ref = np.empty(n_p + n_b)
        outside = np.zeros(n_p + n_b, dtype=bool)
        for i, p in enumerate(active):
            x, y = float(np.interp(t, p.kt, p.kx)), float(np.interp(t, p.kt, p.ky))
            pos[i] = (x, y)
            ref[i] = PHONE_REF_RSSI
            outside[i] = self._outside(x, y)
            p.shadow = self._rho * p.shadow + math.sqrt(1 - self._rho**2) * self._rng.normal(
                0, radio.shadowing_sigma_db, n_r
            )
        for j, b in enumerate(self._beacons):
            pos[n_p + j] = b.position
            ref[n_p + j] = b.ref_rssi
        shadow = np.vstack([p.shadow for p in active] + [self._beacon_shadow]) if n_p else self._beacon_shadow
        dist = np.maximum(np.linalg.norm(pos[:, None, :] - self._rx_pos[None, :, :], axis=2), 0.3)
        rssi = ref[:, None] - 10 * radio.path_loss_exponent * np.log10(dist) + shadow
        rssi -= radio.front_wall_loss_db * (outside[:, None] != self._rx_outside[None, :])
        rssi += self._rng.normal(0, radio.fading_sigma_db, rssi.shape)
        heard = (rssi >= radio.sensitivity_dbm) & (self._rng.random(rssi.shape) >= radio.packet_loss)
        out: list[Advert] = []
        for e, r in zip(*np.nonzero(heard), strict=True):
            e, r = int(e), int(r)
            if e < n_p:
                p = active[e]
                ts = t - STEP_S + p.phase
                if ts >= p.rotate_at:
                    p.address = self._address()
                    p.rotate_at = ts + self.scenario.population.address_rotation_s * float(self._rng.uniform(0.8, 1.2))
                mfr = self._phone_frame(p, ts)
                out.append(Advert(ts, self._rx_ids[r], p.address, True, int(rssi[e, r]), None, mfr))
            else:
                b = self._beacons[e - n_p]
                svc = b.service_data
                if b.eddystone and int(t) % TLM_EVERY_S == 0:
                    uptime = t - self.start_ts
                    svc = frames.eddystone_tlm(b.battery_mv, 21.5, int(uptime * 10), uptime)
                out.append(
                    Advert(
                        t - STEP_S + 0.5,
                        self._rx_ids[r],
                        b.address,
                        False,
                        int(rssi[e, r]),
                        None,
                        b.manufacturer_data,
                        svc,
                    )
                )
            self.per_receiver[self._rx_ids[r]] += 1
        out.sort(key=lambda a: a.ts)
        return out

    def _phone_frame(self, p: _Person, ts: float) -> dict[int, bytes]:
        if p.key is None:
            return frames.apple_nearby_info()
        window = int(ts // 900)
        if window != p.frame_window:
            p.frame_window, p.frame = window, frames.member_frame(p.key, ts, PHONE_REF_RSSI)
        return p.frame

    def summary(self) -> dict[str, Any]:
        """Subjects, visits and pass-bys so far (ground truth), adverts, adverts per receiver."""
        kinds = [t.kind for t in self.truth]
        return {
            "simulated_s": self._t - self.start_ts,
            "shoppers": kinds.count("shopper"),
            "pedestrians": kinds.count("pedestrian"),
            "staff": kinds.count("staff"),
            "members_in_app": sum(1 for t in self.truth if t.member and t.kind != "staff"),
            "adverts": self.adverts,
            "per_receiver": dict(self.per_receiver),
        }
