"""A simulated site survey: an installer walks the store with a survey tag and stands at spots on a grid.

`survey_spots` lays a grid of `spacing_m` over the scenario's inside zones and keeps the points a person can
stand on (inside an inside zone, as the simulator's shoppers are, and at least WALL_CLEARANCE_M from every wall
or shelf run), ordered row by row in a serpentine. `survey_world` builds a World of the same scenario and seed
(so the same static shadowing fields, scan phases and receiver offsets) without shoppers, pedestrians or staff:
the store before opening. The installer carries an iBeacon (`SURVEY_TAG`) from spot to spot at walking pace and
turns slowly at each one (a full turn per spot), so its packets go through the same channel as everybody's:
fading, the drifting shadow, scan windows, collisions and the installer's own body.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from firmware_sim.geometry import as_polygon, points_in_polygon
from firmware_sim.scenario import Beacon, Scenario, beacon_subject_id
from firmware_sim.world import World

F64 = npt.NDArray[np.float64]

SURVEY_TAG = Beacon(
    name="Survey tag",
    frame="ibeacon",
    uuid="5ca1ab1e-0000-4000-8000-00000000cafe",
    major=65535,
    minor=1,
    position=(0.0, 0.0),
    interval_ms=100.0,
    tx_power_dbm=0.0,
)
"""The installer's tag: an iBeacon at 0 dBm (-59 dBm at 1 m, as its frame says), 10 frames a second."""
WALL_CLEARANCE_M = 0.6
"""Spots closer than this to a wall or shelf run are left out: nobody stands in the shelving."""
WALK_MPS = 1.0
"""The installer's pace between spots."""
LEAD_IN_S = 30.0
"""Time from the survey world's start to the first spot (the installer walks to it)."""


@dataclass(frozen=True, slots=True)
class PlannedSpot:
    """A spot of the survey walk: where, and when the installer stands there."""

    x: float
    y: float
    start: float
    """UNIX s."""
    seconds: float


def _segment_distance(px: F64, py: F64, x1: float, y1: float, x2: float, y2: float) -> F64:
    dx, dy = x2 - x1, y2 - y1
    ll = dx * dx + dy * dy
    t = np.clip(((px - x1) * dx + (py - y1) * dy) / ll, 0.0, 1.0) if ll > 0 else np.zeros_like(px)
    out: F64 = np.hypot(px - (x1 + t * dx), py - (y1 + t * dy))
    return out


def survey_spots(scenario: Scenario, spacing_m: float) -> list[tuple[float, float]]:
    """Grid points `spacing_m` apart where a person can stand inside the store, in serpentine order."""
    if not (0.5 <= spacing_m <= 50):
        raise ValueError(f"survey spacing {spacing_m:g} m: must be 0.5..50 m")
    polys = [as_polygon(z.polygon) for z in scenario.zones if not z.outside]
    pts = np.vstack(polys)
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    xs = np.arange(x0 + spacing_m / 2, x1, spacing_m)
    ys = np.arange(y0 + spacing_m / 2, y1, spacing_m)
    out: list[tuple[float, float]] = []
    for row, y in enumerate(ys.tolist()):
        px = xs if row % 2 == 0 else xs[::-1]
        py = np.full(len(px), y)
        ok = np.zeros(len(px), dtype=np.bool_)
        for poly in polys:
            ok |= points_in_polygon(px, py, poly)
        for w in scenario.walls:
            for a, b in zip(w.points[:-1], w.points[1:], strict=True):
                ok &= _segment_distance(px, py, a[0], a[1], b[0], b[1]) >= WALL_CLEARANCE_M
        out += [(float(x), float(y)) for x in px[ok].tolist()]
    return out


def survey_walk(
    spots: list[tuple[float, float]], start: float, seconds: float, rng: np.random.Generator
) -> tuple[list[PlannedSpot], tuple[F64, F64, F64, F64]]:
    """The installer's schedule and track (knot times, x, y, headings): walk, stand turning, walk on."""
    t = start + LEAD_IN_S
    kt: list[float] = [start]
    kx: list[float] = [spots[0][0]]
    ky: list[float] = [spots[0][1]]
    kh: list[float] = [0.0]
    planned: list[PlannedSpot] = []
    here = spots[0]
    for x, y in spots:
        walk = math.hypot(x - here[0], y - here[1]) / WALK_MPS
        if walk > 0:
            kh[-1] = math.atan2(y - here[1], x - here[0])
            t += walk
            kt.append(t)
            kx.append(x)
            ky.append(y)
            kh.append(kh[-1])
        else:
            kt.append(t)
            kx.append(x)
            ky.append(y)
            kh.append(kh[-1])
        planned.append(PlannedSpot(x, y, t, seconds))
        # Turning slowly: a full turn over the spot, a knot every second (headings hold per leg).
        h0 = float(rng.uniform(-math.pi, math.pi))
        steps = max(1, math.ceil(seconds))
        for k in range(steps):
            kh[-1] = h0 + 2 * math.pi * k / steps
            t += seconds / steps
            kt.append(t)
            kx.append(x)
            ky.append(y)
            kh.append(h0 + 2 * math.pi * (k + 1) / steps)
        here = (x, y)
    return planned, (np.array(kt), np.array(kx), np.array(ky), np.array(kh))


def survey_world(
    scenario: Scenario, seed: int, spacing_m: float, seconds: float, end: float
) -> tuple[World, list[PlannedSpot], str]:
    """The store before opening (same scenario and seed: same static shadowing) with the installer walking the
    survey so that the last spot ends before `end`; returns the world, the planned spots and the tag's subject
    id. The world starts when the installer does (LEAD_IN_S before the first spot)."""
    spots = survey_spots(scenario, spacing_m)
    if not spots:
        raise ValueError(f"no survey spot at {spacing_m:g} m spacing: every grid point is outside or in a wall")
    draft, _track = survey_walk(spots, 0.0, seconds, np.random.default_rng(0))
    start = math.floor(end - (draft[-1].start + draft[-1].seconds) - 1.0)
    pop = scenario.population.model_copy(
        update={"shoppers_per_hour": [0.0] * 24, "pedestrians_per_hour": [0.0] * 24, "staff": 0, "left_phones": []}
    )
    world = World(scenario.model_copy(update={"population": pop}), seed, start)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A17]))
    planned, (t, x, y, h) = survey_walk(spots, world.start_ts, seconds, rng)
    world.carry_beacon(SURVEY_TAG, t, x, y, h)
    return world, planned, beacon_subject_id(SURVEY_TAG)
