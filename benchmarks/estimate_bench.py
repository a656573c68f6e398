"""Measure the zone estimator alone: subjects × receivers updated per second, for 100, 1,000 and 5,000 subjects.

Each simulated second every subject is heard by three receivers, twice each (a phone advertising
every 500 ms), at RSSIs drawn around a random position on the supermarket's plan. The estimator
(`HmmEstimator`, the supermarket plan from its scenario, default settings) decides one second per
`update` call, fixed-lag smoothing included; the baseline (`StrongestReceiver`) gets the same
sightings. Printed: wall time per simulated second (median of the measured seconds, after warm-up)
and subject × receiver updates per second of wall time, with the process's CPU time beside it.

Run from the repository root: ``.venv/bin/python benchmarks/estimate_bench.py`` (``--seconds 5`` for
a quick look; ``--subjects 100 1000`` to choose).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from firmware_sim.scenario import load_scenario, scenario_plan
from gateway.config import EstimateConfig, PlanConfig
from gateway.estimate import HmmEstimator, StrongestReceiver
from gateway.model import Sighting

T0 = 1_764_000_000.0


def sightings_for(plan: PlanConfig, n: int, second: int, rng: np.random.Generator) -> list[Sighting]:
    """Every subject heard by three receivers, two packets each, in this second."""
    rx = [r.id for r in plan.receivers]
    out: list[Sighting] = []
    picks = rng.integers(0, len(rx), size=(n, 3))
    rssi = rng.normal(-75, 8, size=(n, 3, 2)).round().astype(int).tolist()
    ts = (T0 + second + rng.random((n, 3, 2))).tolist()
    for i in range(n):
        subject = f"anon:{i:016x}"
        for j in range(3):
            receiver = rx[int(picks[i, j])]
            for k in range(2):
                out.append(Sighting(ts[i][j][k], receiver, subject, rssi[i][j][k], -59))
    return out


def bench(n: int, seconds: int, warmup: int, cfg: EstimateConfig) -> dict[str, float]:
    plan = scenario_plan(load_scenario("supermarket"))
    rng = np.random.default_rng(n)
    batches = [sightings_for(plan, n, s, rng) for s in range(seconds + warmup)]
    out: dict[str, float] = {}
    for name, est in (("hmm", HmmEstimator(plan, cfg)), ("baseline", StrongestReceiver(plan, cfg))):
        walls: list[float] = []
        cpu0 = time.process_time()
        for s, batch in enumerate(batches):
            t0 = time.perf_counter()
            est.update(batch, T0 + s + 1.0 + 1.0)
            if s >= warmup:
                walls.append(time.perf_counter() - t0)
        cpu = (time.process_time() - cpu0) / len(batches)
        per_s = statistics.median(walls)
        out[f"{name}_ms_per_s"] = per_s * 1000
        out[f"{name}_cpu_ms_per_s"] = cpu * 1000
        out[f"{name}_updates_per_s"] = n * 3 / per_s
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, nargs="+", default=[100, 1000, 5000])
    p.add_argument("--seconds", type=int, default=20, help="measured simulated seconds (default: 20)")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured seconds first (default: 5)")
    p.add_argument("--cell", type=float, default=None, help="HMM grid cell size, m (default: the config's default)")
    args = p.parse_args()
    cfg = EstimateConfig() if args.cell is None else EstimateConfig(cell_m=args.cell)
    cells = HmmEstimator(scenario_plan(load_scenario("supermarket")), cfg).cells
    print(
        f"supermarket plan, {cells} cells of {cfg.cell_m:g} m, 6 receivers, lag {cfg.lag_s} s; "
        "3 receivers x 2 packets per subject-second"
    )
    print(f"{'subjects':>9} {'hmm ms/s':>10} {'(cpu)':>8} {'subj×rx/s':>12} {'baseline ms/s':>14} {'subj×rx/s':>12}")
    for n in args.subjects:
        r = bench(n, args.seconds, args.warmup, cfg)
        print(
            f"{n:>9,} {r['hmm_ms_per_s']:>10.1f} {r['hmm_cpu_ms_per_s']:>8.1f} {r['hmm_updates_per_s']:>12,.0f} "
            f"{r['baseline_ms_per_s']:>14.1f} {r['baseline_updates_per_s']:>12,.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
