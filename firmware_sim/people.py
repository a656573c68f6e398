"""People in the simulated store: where they walk, what they carry, and what really happened.

Every person follows a track of knots (time, x, y) joined by straight walks at constant speed,
with the heading they face on each leg (the walking direction, or a random one while they
stand at a shelf). Shoppers come along the sidewalk from either end, go in by an entrance,
browse the zones of a typical route (or random ones), pay, and leave; pedestrians walk past,
some stopping at the window; staff work inside all day.

Ground truth is derived from the tracks alone: zones at 0.5 s resolution, visit start and end
(the first and last moment inside an inside zone), the addresses the phone used and when.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from firmware_sim.geometry import as_polygon, zone_index
from firmware_sim.scenario import Scenario

F64 = npt.NDArray[np.float64]

Kind = Literal["shopper", "pedestrian", "staff", "left-phone"]
Platform = Literal["ios", "android"]

TRUTH_DT_S = 0.5
"""Resolution of zone intervals in the ground truth, s."""
BROWSE_RADIUS_M = 4.0
"""How far the next spot at a shelf is from the last one, at most."""
STAFF_HORIZON_S = 6 * 3600.0
"""Staff tracks are planned this far ahead, and extended as time goes on."""


@dataclass(slots=True, eq=False)
class Stream:
    """One advertising stream: a phone's app or OS frames, or a fixed beacon."""

    sid: int
    """Global stream number (creation order)."""
    kind: int
    """One of the KIND_* codes in firmware_sim.world."""
    interval_s: float
    """Nominal advertising interval, s (each event adds a 0-10 ms advDelay)."""
    next_tx: float
    """Time of the next advertising event, UNIX s."""
    gaps: bool = False
    """True for an iOS app's frame: it pauses while the app is in the background."""
    on: bool = True
    """Gap state (True: advertising)."""
    owner: Person | None = None
    """The phone's carrier; None for a beacon."""
    beacon: int = -1
    """Beacon index for a beacon stream."""


@dataclass(slots=True, eq=False)
class Person:
    """Someone the simulator moves; tracks are numpy arrays of knots."""

    pid: int
    kind: Kind
    kt: F64
    """Knot times, UNIX s, non-decreasing."""
    kx: F64
    ky: F64
    kh: F64
    """Heading (radians) on the leg that starts at each knot; the last repeats the one before."""
    member: str | None = None
    """Member ref when the phone runs the app."""
    member_index: int | None = None
    """Index of the member key (the seed's key list: members first, then staff)."""
    platform: Platform | None = None
    """Phone platform, None when the phone does not advertise."""
    rssi_1m: float = -59.0
    """True RSSI of this phone at 1 m, dBm."""
    streams: list[Stream] = field(default_factory=list)
    addresses: list[list[float]] = field(default_factory=list)
    """[address id, from, to] for every address used, `to` = inf while in use."""
    addr_next: int = -1
    """Address id taken at `rotate_at` (-1 until allocated)."""
    rotate_at: float = math.inf
    drift: F64 = field(default_factory=lambda: np.zeros(0))
    """Drifting shadow state per receiver."""
    window_stop: bool = False
    """A pedestrian who stopped at the shop window."""
    open_ended: bool = False
    """Staff: the track is extended as the run goes on."""

    @property
    def t0(self) -> float:
        """First moment of the track."""
        return float(self.kt[0])

    @property
    def t1(self) -> float:
        """Last moment of the track."""
        return float(self.kt[-1])

    @property
    def address(self) -> int:
        """Address id in use since the last rotation."""
        return int(self.addresses[-1][0])

    def position(self, t: F64) -> tuple[F64, F64]:
        """Positions at times `t` (clamped to the track)."""
        return np.interp(t, self.kt, self.kx), np.interp(t, self.kt, self.ky)


def _edge_list(polygon: Sequence[tuple[float, float]]) -> list[tuple[float, float, float, float]]:
    n = len(polygon)
    return [(*polygon[i], *polygon[(i + 1) % n]) for i in range(n) if polygon[i][1] != polygon[(i + 1) % n][1]]


def _inside(x: float, y: float, edges: list[tuple[float, float, float, float]]) -> bool:
    """Scalar ray casting, the same rule as gateway.config.points_in_polygon (faster for one point)."""
    hit = False
    for x1, y1, x2, y2 in edges:
        if (y1 > y) != (y2 > y) and x < (x2 - x1) * (y - y1) / (y2 - y1) + x1:
            hit = not hit
    return hit


class _Track:
    """Knots under construction."""

    def __init__(self, t: float, p: tuple[float, float]) -> None:
        self.t, self.x, self.y, self.h = [t], [p[0]], [p[1]], [0.0]

    @property
    def now(self) -> float:
        return self.t[-1]

    @property
    def here(self) -> tuple[float, float]:
        return self.x[-1], self.y[-1]

    def walk(self, p: tuple[float, float], speed: float) -> None:
        dx, dy = p[0] - self.x[-1], p[1] - self.y[-1]
        dist = math.hypot(dx, dy)
        if dist < 1e-6:
            return
        self.h[-1] = math.atan2(dy, dx)
        self.t.append(self.t[-1] + dist / speed)
        self.x.append(p[0])
        self.y.append(p[1])
        self.h.append(self.h[-1])

    def stay(self, seconds: float, heading: float) -> None:
        if seconds <= 0:
            return
        self.h[-1] = heading
        self.t.append(self.t[-1] + seconds)
        self.x.append(self.x[-1])
        self.y.append(self.y[-1])
        self.h.append(heading)

    def arrays(self) -> tuple[F64, F64, F64, F64]:
        return np.array(self.t), np.array(self.x), np.array(self.y), np.array(self.h)


class _Polyline:
    """The sidewalk's centre line, for walking along it at a lateral offset."""

    def __init__(self, points: Sequence[tuple[float, float]]) -> None:
        self.p = np.asarray(points, dtype=np.float64)
        seg = np.diff(self.p, axis=0)
        self.seg_len = np.maximum(np.hypot(seg[:, 0], seg[:, 1]), 1e-9)
        self.s = np.concatenate([[0.0], np.cumsum(self.seg_len)])
        self.tangent = seg / self.seg_len[:, None]
        normal = np.stack([-self.tangent[:, 1], self.tangent[:, 0]], axis=1)
        vertex_normal = np.vstack([normal[:1], (normal[:-1] + normal[1:]) / 2, normal[-1:]])
        norm = np.maximum(np.hypot(vertex_normal[:, 0], vertex_normal[:, 1]), 1e-9)
        self.vertex_normal = vertex_normal / norm[:, None]
        self.length = float(self.s[-1])

    def at(self, s: float, offset: float) -> tuple[float, float]:
        s = min(max(s, 0.0), self.length)
        i = min(int(np.searchsorted(self.s, s, side="right")) - 1, len(self.seg_len) - 1)
        a = (s - self.s[i]) / self.seg_len[i]
        base = self.p[i] + a * (self.p[i + 1] - self.p[i])
        n = self.vertex_normal[i] * (1 - a) + self.vertex_normal[i + 1] * a
        return float(base[0] + offset * n[0]), float(base[1] + offset * n[1])

    def project(self, q: tuple[float, float]) -> float:
        """Arc length of the point of the line nearest to q."""
        best, best_s = math.inf, 0.0
        for i in range(len(self.seg_len)):
            d = np.asarray(q) - self.p[i]
            a = min(max(float(d @ self.tangent[i]), 0.0), float(self.seg_len[i]))
            foot = self.p[i] + a * self.tangent[i]
            dist = math.hypot(q[0] - foot[0], q[1] - foot[1])
            if dist < best:
                best, best_s = dist, float(self.s[i] + a)
        return best_s

    def path(self, s_from: float, s_to: float, offset: float) -> list[tuple[float, float]]:
        """Points from s_from to s_to along the line (vertices in between included)."""
        inner = [float(s) for s in self.s[1:-1] if min(s_from, s_to) < s < max(s_from, s_to)]
        if s_to < s_from:
            inner.reverse()
        return [self.at(s, offset) for s in (s_from, *inner, s_to)]


class Mover:
    """Plans tracks for a scenario, drawing from one generator (deterministic per seed)."""

    def __init__(self, scenario: Scenario, rng: np.random.Generator) -> None:
        self.sc = scenario
        self.rng = rng
        self.pop = scenario.population
        self.polys = {z.id: as_polygon(z.polygon) for z in scenario.zones}
        self._edges = {z.id: _edge_list(z.polygon) for z in scenario.zones}
        self.inside = scenario.inside_zones()
        self.side = _Polyline(scenario.sidewalk.points)
        entrance_zones = {scenario.zone_of(e.inside) for e in scenario.entrances}
        browse = [z for z in self.inside if z not in entrance_zones and z != self.pop.checkout_zone]
        self.browse_zones = browse or list(self.inside)
        self.staff_zones = list(self.pop.staff_zones) or list(self.inside)
        w = np.array([e.weight for e in scenario.entrances])
        self.entrance_p = w / w.sum()
        if self.pop.routes:
            rw = np.array([r.weight for r in self.pop.routes])
            self.route_p = rw / rw.sum()

    # ------------------------------------------------------------------ points

    def point_in(self, zone: str, near: tuple[float, float] | None = None) -> tuple[float, float]:
        """A random point in a zone (within BROWSE_RADIUS_M of `near` when possible)."""
        poly = self.polys[zone]
        edges = self._edges[zone]
        lo, hi = poly.min(axis=0), poly.max(axis=0)
        for attempt in range(8):
            if near is not None and attempt < 4:
                c = np.asarray(near) + self.rng.uniform(-BROWSE_RADIUS_M, BROWSE_RADIUS_M, (16, 2))
            else:
                c = self.rng.uniform(lo, hi, (16, 2))
            for x, y in c.tolist():
                if _inside(x, y, edges):
                    return x, y
        centre = poly.mean(axis=0)
        return float(centre[0]), float(centre[1])

    def _heading(self) -> float:
        return float(self.rng.uniform(-math.pi, math.pi))

    def _browse(self, tr: _Track, zone: str, dwell: float, speed: float) -> None:
        """Walk into a zone and spend `dwell` seconds there, moving between spots."""
        tr.walk(self.point_in(zone), speed)
        end = tr.now + dwell
        while tr.now < end - 0.5:
            tr.stay(min(float(self.rng.exponential(self.pop.browse_stop_s)), end - tr.now), self._heading())
            if tr.now >= end - 0.5:
                break
            nxt = self.point_in(zone, tr.here)
            if math.hypot(nxt[0] - tr.here[0], nxt[1] - tr.here[1]) / self.pop.browse_speed_mps < end - tr.now:
                tr.walk(nxt, self.pop.browse_speed_mps)

    # ------------------------------------------------------------------ people

    def shopper(self, t0: float) -> tuple[_Track, list[str]]:
        """A shopper's track from a sidewalk end, through the store, to a sidewalk end; and the zones planned."""
        pop = self.pop
        speed = float(self.rng.uniform(*pop.walking_speed_mps))
        offset = float(self.rng.uniform(-0.5, 0.5)) * self.sc.sidewalk.width_m
        door_in = self.sc.entrances[int(self.rng.choice(len(self.entrance_p), p=self.entrance_p))]
        door_out = self.sc.entrances[int(self.rng.choice(len(self.entrance_p), p=self.entrance_p))]
        start_end = float(self.rng.choice([0.0, self.side.length]))
        leave_end = float(self.rng.choice([0.0, self.side.length]))
        if pop.routes and self.rng.random() < pop.route_share:
            zones = list(pop.routes[int(self.rng.choice(len(self.route_p), p=self.route_p))].zones)
        else:
            lo, hi = pop.zones_per_visit
            n = min(int(self.rng.integers(lo, hi + 1)), len(self.browse_zones))
            zones = [str(z) for z in self.rng.choice(self.browse_zones, size=n, replace=False)]
            if pop.checkout_zone is not None:
                zones.append(pop.checkout_zone)
        path_in = self.side.path(start_end, self.side.project(door_in.outside), offset)
        tr = _Track(t0, path_in[0])
        for p in path_in[1:]:
            tr.walk(p, speed)
        tr.walk(door_in.outside, speed)
        tr.walk(door_in.inside, speed)
        for z in zones:
            lo_s, hi_s = pop.zone_dwell_s.get(z, pop.dwell_s)
            self._browse(tr, z, float(self.rng.uniform(lo_s, hi_s)), speed)
        tr.walk(door_out.inside, speed)
        tr.walk(door_out.outside, speed)
        for p in self.side.path(self.side.project(door_out.outside), leave_end, offset):
            tr.walk(p, speed)
        return tr, zones

    def pedestrian(self, t0: float) -> tuple[_Track, bool]:
        """A pedestrian walking the sidewalk end to end; some stop at the window. Returns (track, stopped)."""
        pop = self.pop
        speed = float(self.rng.uniform(*pop.walking_speed_mps))
        offset = float(self.rng.uniform(-0.5, 0.5)) * self.sc.sidewalk.width_m
        forward = bool(self.rng.random() < 0.5)
        a, b = (0.0, self.side.length) if forward else (self.side.length, 0.0)
        stops = bool(self.rng.random() < pop.window_share)
        if not stops:
            pts = self.side.path(a, b, offset)
            tr = _Track(t0, pts[0])
            for p in pts[1:]:
                tr.walk(p, speed)
            return tr, False
        door = self.sc.entrances[int(self.rng.choice(len(self.entrance_p), p=self.entrance_p))]
        s_door = self.side.project(door.outside)
        s_stop = min(max(s_door + float(self.rng.uniform(-6, 6)), 0.0), self.side.length)
        # Stand at the glass: in line with the door's outside point, shifted along the sidewalk.
        i = min(int(np.searchsorted(self.side.s, s_door, side="right")) - 1, len(self.side.seg_len) - 1)
        shift = self.side.tangent[i] * (s_stop - s_door)
        window = (door.outside[0] + float(shift[0]), door.outside[1] + float(shift[1]))
        toward = np.asarray(door.inside) - np.asarray(door.outside)
        facing = math.atan2(float(toward[1]), float(toward[0]))
        pts = self.side.path(a, s_stop, offset)
        tr = _Track(t0, pts[0])
        for p in pts[1:]:
            tr.walk(p, speed)
        tr.walk(window, speed)
        tr.stay(float(self.rng.uniform(*pop.window_stop_s)), facing)
        for p in self.side.path(s_stop, b, offset):
            tr.walk(p, speed)
        return tr, True

    def staff_track(self, t0: float, until: float, here: tuple[float, float] | None = None) -> _Track:
        """Staff moving between their zones from t0 to at least `until`."""
        zone = str(self.rng.choice(self.staff_zones))
        tr = _Track(t0, here if here is not None else self.point_in(zone))
        while tr.now < until:
            self._browse(tr, zone, float(self.rng.uniform(120, 900)), self.pop.browse_speed_mps * 2)
            zone = str(self.rng.choice(self.staff_zones))
        return tr


def still_track(t0: float, until: float, here: tuple[float, float]) -> _Track:
    """A phone lying at `here` from t0 to `until` (a left phone: nobody walks it anywhere)."""
    tr = _Track(t0, here)
    tr.stay(until - t0, 0.0)
    return tr


def extend(person: Person, tr: _Track) -> None:
    """Append a continuation track (whose first knot is the person's last) to a person."""
    t, x, y, h = tr.arrays()
    person.kh[-1] = h[0]
    person.kt = np.concatenate([person.kt, t[1:]])
    person.kx = np.concatenate([person.kx, x[1:]])
    person.ky = np.concatenate([person.ky, y[1:]])
    person.kh = np.concatenate([person.kh, h[1:]])


# --------------------------------------------------------------------------- ground truth


def zone_intervals(person: Person, until: float, polys: Sequence[F64], ids: Sequence[str]) -> list[list[Any]]:
    """[zone id or None, from, to] runs along the track up to `until`, at TRUTH_DT_S resolution."""
    t1 = min(person.t1, until)
    if t1 <= person.t0:
        return []
    t = np.append(np.arange(person.t0, t1, TRUTH_DT_S), t1)
    x, y = person.position(t)
    z = zone_index(x, y, polys)
    change = np.flatnonzero(np.diff(z)) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(t) - 1]])
    return [
        [None if z[a] < 0 else ids[int(z[a])], round(float(t[a]), 3), round(float(t[b]), 3)]
        for a, b in zip(starts.tolist(), ends.tolist(), strict=True)
    ]
