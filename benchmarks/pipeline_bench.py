"""What each pipeline stage costs per advert, on the default store's own traffic.

Generates `--minutes` of the demo store with the simulator (not timed), then times each stage
on that input, `--runs` times, and prints medians: decode (adverts/s), identify (adverts/s),
estimate + visits (sightings/s), and the whole Gateway.step without storage or uplink cost
split out. Peers' decode, measured on this kind of machine (FIELD-NOTES): Theengs ≈ 1,200/s,
Home Assistant ≈ 385,000/s (iBeacon only), a plain struct decode ≈ 2,500,000/s.

Run from the repository root: ``.venv/bin/python benchmarks/pipeline_bench.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from firmware_sim.scenario import load_scenario
from firmware_sim.world import World
from gateway.config import load_settings
from gateway.days import LocalDays
from gateway.decode import Decoder
from gateway.estimate import StrongestReceiver
from gateway.identity import Identifier, MemberDirectory
from gateway.model import Advert, Sighting
from gateway.points import load_rules
from gateway.runtime import Gateway
from gateway.store import Store
from gateway.visits import VisitTracker
from sensors.base import Source

T0 = 1_790_000_000.0


class Batches(Source):
    """Replays prepared per-second batches (so the simulator's own cost is not timed)."""

    name = "bench"

    def __init__(self, batches: list[list[Advert]]) -> None:
        self._batches = iter(batches)

    async def start(self) -> None:
        """Nothing to open."""

    def poll(self, now: float) -> list[Advert]:
        """The next batch."""
        return next(self._batches, [])

    async def stop(self) -> None:
        """Nothing to close."""

    def diagnostics(self) -> dict[str, object]:
        """None."""
        return {}


def median_rate(n: int, fn: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return n / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    settings = load_settings(None)
    world = World(load_scenario("default"), 1, T0)
    seconds = int(args.minutes * 60)
    batches = [world.advance(T0 + s + 1) for s in range(seconds)]
    adverts = [a for b in batches for a in b]
    members = MemberDirectory()
    members.set_members(world.member_keys)
    days = LocalDays(settings.timezone)
    print(f"input: {len(adverts):,} adverts from {args.minutes:g} simulated minutes of the demo store")

    decoded = Decoder().decode_batch(adverts)
    rate = median_rate(len(adverts), lambda: Decoder().decode_batch(adverts), args.runs)
    print(f"decode              {rate:>12,.0f} adverts/s")
    ident = Identifier(members, days)
    sightings = ident.identify(decoded)
    rate = median_rate(len(decoded), lambda: Identifier(members, days).identify(decoded), args.runs)
    print(f"identify            {rate:>12,.0f} adverts/s")

    per_second: list[list[Sighting]] = [[] for _ in range(seconds)]
    for x in sightings:
        per_second[min(seconds - 1, int(x.ts - T0))].append(x)

    def estimate_and_visits() -> None:
        est = StrongestReceiver(settings.plan, settings.estimate)
        tracker = VisitTracker(settings.gateway, settings.visits)
        for s, batch in enumerate(per_second):
            tracker.update(est.update(batch), T0 + s + 1)

    rate = median_rate(len(sightings), estimate_and_visits, args.runs)
    print(f"estimate + visits   {rate:>12,.0f} sightings/s")

    def whole_step() -> None:
        with tempfile.TemporaryDirectory() as d, Store(Path(d)) as store:
            gw = Gateway(settings, store, Batches(batches), members, load_rules(None), world.staff_refs)
            for s in range(seconds):
                gw.step(T0 + s + 1)

    rate = median_rate(len(adverts), whole_step, max(1, args.runs // 2))
    print(f"Gateway.step        {rate:>12,.0f} adverts/s (1-s ticks, storage included, uplink off)")
    print(f"                    {rate / (len(adverts) / seconds):>12,.0f}x real time for this store")


if __name__ == "__main__":
    main()
