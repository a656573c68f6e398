"""What zone accuracy a given position accuracy allows on a scenario's plan, as its shoppers use it.

Zone accuracy (`visita eval`) is the share of subject-seconds placed in the right zone. Any estimator places
a subject by where it believes the subject is; a subject standing 0.5 m from the edge of its zone is put in
the next zone by any error of 0.5 m across that edge. So the accuracy an estimator can reach is bounded by
how much of the time people spend near zone edges, and by how far off its positions are.

This script runs the simulator (no gateway) over the same window as `visita eval` (2 h after opening, 30 min)
and prints, for the seconds people with a phone spend inside:

* the share within d metres of another zone (a point d m away in some direction lies in another zone);
* the zone accuracy of positions off by an isotropic Gaussian error of σ metres per axis (every second an
  independent draw; correlated errors give the same share, only in runs), and the largest σ that reaches 95 %.

For comparison, `visita eval` prints its own estimator's position error (`position_error_median_m`). A 2-D
Gaussian error of σ per axis has a median of 1.18 σ.

    .venv/bin/python benchmarks/zone_resolution.py [--scenario supermarket] [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import numpy.typing as npt

from firmware_sim.people import Person
from firmware_sim.scenario import Scenario, load_scenario
from firmware_sim.world import World
from gateway.config import points_in_polygon

F32 = npt.NDArray[np.float32]
SIGMAS_M = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
EDGE_M = (0.5, 1.0, 2.0, 3.0)
DIRECTIONS = 16
DRAWS = 5


def zone_of(sc: Scenario, x: F32, y: F32) -> npt.NDArray[np.int64]:
    """Index of the first zone holding each point (the estimator's rule), -1 for none."""
    out = np.full(len(x), -1, dtype=np.int64)
    for i, z in enumerate(sc.zones):
        out[(out < 0) & points_in_polygon(x, y, z.polygon)] = i
    return out


def people_of(world: World, start: float, duration_s: float) -> list[Person]:
    """Run the simulator over the window; everyone who was in it (gone since, or still there)."""
    end = start + duration_s
    people: list[Person] = []
    t = start
    while t < end:
        t = min(t + 60.0, end)
        world.advance(t)
        people += world.pop_finished()
    return people + world.people


def inside_positions(sc: Scenario, seed: int, start: float, duration_s: float) -> tuple[F32, F32]:
    """Positions, at whole seconds, of everyone with an advertising phone while inside a zone."""
    end = start + duration_s
    xs, ys = [], []
    for p in people_of(World(sc, seed, start), start, duration_s):
        if p.platform is None or p.t0 >= end:
            continue
        secs = np.arange(math.ceil(max(p.t0, start)), math.floor(min(p.t1, end)) + 1e-9)
        x, y = p.position(secs)
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.float32)
    zone = zone_of(sc, x, y)
    inside = np.array([not z.outside for z in sc.zones])
    keep = (zone >= 0) & inside[np.maximum(zone, 0)]
    return x[keep], y[keep]


def report(sc: Scenario, seed: int, start: float, duration_s: float) -> float:
    """Print one seed's figures; return the largest σ in SIGMAS_M that reaches 95 %."""
    x, y = inside_positions(sc, seed, start, duration_s)
    true = zone_of(sc, x, y)
    print(f"{sc.name} seed {seed}: {len(x):,} inside subject-seconds")
    for d in EDGE_M:
        near = np.zeros(len(x), dtype=np.bool_)
        for k in range(DIRECTIONS):
            a = 2 * math.pi * k / DIRECTIONS
            other = zone_of(sc, x + np.float32(d * math.cos(a)), y + np.float32(d * math.sin(a)))
            near |= (other >= 0) & (other != true)
        print(f"  within {d:3.1f} m of another zone: {near.mean():6.1%}")
    rng = np.random.default_rng(seed)
    best = 0.0
    for s in SIGMAS_M:
        acc = []
        for _ in range(DRAWS):
            ex = rng.normal(0.0, s, len(x)).astype(np.float32)
            ey = rng.normal(0.0, s, len(x)).astype(np.float32)
            acc.append(float((zone_of(sc, x + ex, y + ey) == true).mean()))
        a = float(np.mean(acc))
        if a >= 0.95:
            best = s
        print(f"  position error σ {s:4.2f} m per axis (median {1.1774 * s:4.2f} m): zone accuracy {a:6.1%}")
    return best


def window_parser(doc: str | None) -> argparse.ArgumentParser:
    """Options of scripts that look at a scenario's window like `visita eval`: scenario, seeds, skip, duration."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="supermarket", help="shipped scenario name or file (default supermarket)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--skip", type=float, default=7200.0, help="seconds after the scenario's start (default 2 h)")
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds to look at (default 30 min)")
    return ap


def main() -> None:
    args = window_parser(__doc__).parse_args()
    sc = load_scenario(args.scenario)
    t0 = time.monotonic()
    best = [report(sc, seed, sc.start_ts() + args.skip, args.duration) for seed in args.seeds]
    print(f"largest position error (σ per axis) that reaches 95 % zone accuracy: {min(best):.2f} m")
    print(f"({time.monotonic() - t0:.0f} s)")


if __name__ == "__main__":
    main()
