"""Measure how fast the simulator generates adverts, and what a 12-hour supermarket day costs.

Printed, each the median of `--runs` runs (wall time, and the process's CPU time beside it,
since other work on the machine inflates wall time but not CPU time):

- per shipped scenario, half an hour of its busiest hour generated as columns
  (`World.advance_batch`), after ten unmeasured minutes that fill the store: adverts per second;
- the same for the demo store as `Advert` objects (`World.advance`, what `visita run --sim` uses);
- a whole day of the supermarket, `--hours` long from its opening, written to disk exactly as
  `visita sim supermarket --duration 12h --out DIR` writes it (advert log and ground truth).

Run from the repository root: ``.venv/bin/python benchmarks/sim_bench.py`` (``--runs 1 --hours 1``
for a quick look).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from firmware_sim.record import record
from firmware_sim.scenario import load_scenario, shipped
from firmware_sim.world import World

Measure = tuple[float, float, int]
"""(wall s, CPU s, adverts)."""


def timed(fn: Callable[[], int]) -> Measure:
    """Wall time, CPU time and result of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    return time.perf_counter() - w0, time.process_time() - c0, n


def median_of(runs: int, measure: Callable[[], Measure]) -> Measure:
    """Medians of wall and CPU time over `runs` measurements (the advert count of the first)."""
    results = [measure() for _ in range(runs)]
    return statistics.median(r[0] for r in results), statistics.median(r[1] for r in results), results[0][2]


def busiest(name: str) -> float:
    """Start of the busiest hour (shoppers plus pedestrians) on the scenario's start day, from its start."""
    s = load_scenario(name)
    rates = [a + b for a, b in zip(s.population.shoppers_per_hour, s.population.pedestrians_per_hour, strict=True)]
    first = int(s.start[11:13])
    hour = max(range(first, 24), key=lambda h: rates[h])
    return s.start_ts() + (hour - first) * 3600


def busy_half_hour(name: str) -> Measure:
    """Half an hour of the busiest hour as columns, after ten unmeasured minutes."""
    start = busiest(name)
    w = World(load_scenario(name), 1, start - 600)
    w.advance_batch(start)
    return timed(lambda: len(w.advance_batch(start + 1800)))


def demo_objects() -> Measure:
    """Half an hour of the demo store as Advert objects, after ten unmeasured minutes."""
    s = load_scenario("default")
    w = World(s, 1, s.start_ts())
    w.advance(s.start_ts() + 600)
    return timed(lambda: len(w.advance(s.start_ts() + 2400)))


def main() -> int:
    """Print the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs per figure; medians are printed (default 3)")
    ap.add_argument("--hours", type=float, default=12.0, help="length of the supermarket day (default 12)")
    ap.add_argument("--skip-day", action="store_true", help="only the per-scenario rates")
    args = ap.parse_args()

    head = f"{'scenario':<12} {'adverts':>10} {'wall s':>8} {'CPU s':>8} {'adverts/s':>12}"
    print(head + "  (30 min of the busiest hour, as columns)", flush=True)
    for name in shipped():
        wall, cpu, n = median_of(args.runs, lambda name=name: busy_half_hour(name))  # type: ignore[misc]
        print(f"{name:<12} {n:>10,} {wall:>8.2f} {cpu:>8.2f} {n / wall:>12,.0f}", flush=True)
    wall, cpu, n = median_of(args.runs, demo_objects)
    print(f"{'default':<12} {n:>10,} {wall:>8.2f} {cpu:>8.2f} {n / wall:>12,.0f}  as Advert objects", flush=True)
    if args.skip_day:
        return 0

    market = load_scenario("supermarket")
    sizes: list[tuple[int, int]] = []

    def day() -> int:
        with tempfile.TemporaryDirectory() as tmp:
            rec = record(market, 1, market.start_ts(), args.hours * 3600, Path(tmp))
            assert rec.log is not None and rec.truth is not None
            sizes.append((rec.log.stat().st_size, rec.truth.stat().st_size))
            return int(rec.summary["adverts"])

    wall, cpu, n = median_of(args.runs, lambda: timed(day))
    print(
        f"\nsupermarket, {args.hours:g} h from {market.start} ({market.timezone}), seed 1, advert log and truth "
        f"written: {n:,} adverts in {wall:.1f} s wall ({cpu:.1f} s CPU), {n / wall:,.0f} adverts/s; "
        f"log {sizes[0][0] / 1e6:.0f} MB ({sizes[0][0] / max(n, 1):.2f} bytes/advert), "
        f"truth {sizes[0][1] / 1e6:.0f} MB; median of {args.runs}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
