"""`visita sim`: play a scenario for a while, write the advert log and the ground truth, sum it up."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware_sim.advlog import Content, LogWriter
from firmware_sim.people import Person
from firmware_sim.scenario import Scenario
from firmware_sim.truth import TruthWriter, quick_label
from firmware_sim.world import BLOCK_S, World
from gateway import __version__
from gateway.model import rfc3339

LOG_NAME = "adverts.vlog.gz"
TRUTH_NAME = "truth.jsonl"


@dataclass(frozen=True, slots=True)
class Recording:
    """What a run produced."""

    summary: dict[str, Any]
    """Subjects, visits, pass-bys, adverts, adverts per receiver (the summary line)."""
    log: Path | None
    """The advert log written, if any."""
    truth: Path | None
    """The ground truth written, if any."""
    wall_s: float
    """Seconds it took."""


def log_header(world: World, end: float) -> dict[str, Any]:
    """The advert log's header for a simulated run (docs/advert-log.md)."""
    sc = world.scenario
    return {
        "source": "firmware_sim",
        "generator": f"visita {__version__}",
        "scenario": sc.name,
        "seed": world.seed,
        "start_ms": round(world.start_ts * 1000),
        "start": world.start_ts,
        "end": end,
        "start_utc": rfc3339(world.start_ts),
        "receivers": list(world.receiver_ids),
        "members": sc.population.members,
        "staff": list(world.staff_refs),
        "scenario_data": sc.model_dump(mode="json"),
    }


def record(
    scenario: Scenario,
    seed: int,
    start: float,
    duration_s: float,
    out: Path | None,
    speed: float | None = None,
    progress: Callable[[float, int], None] | None = None,
) -> Recording:
    """Simulate `duration_s` from `start`; with `out`, write LOG_NAME and TRUTH_NAME there.

    `speed` paces the run at that many times real time (None: as fast as it goes);
    `progress(fraction done, adverts so far)` is called after every block.
    """
    wall0 = time.monotonic()
    world = World(scenario, seed, start)
    end = world.start_ts + duration_s
    writer = truth = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        writer = LogWriter(out / LOG_NAME, log_header(world, end))
        truth = TruthWriter(out / TRUTH_NAME, world, end)
    labels = {"visit": 0, "pass-by": 0, "staff": 0, "left-phone": 0}

    def leave(people: list[Person]) -> None:
        people = [p for p in people if p.t0 < end]
        for p in people:
            labels[quick_label(world, p, end)] += 1
        if truth is not None:
            truth.people(people)

    try:
        t = world.start_ts
        while t < end:
            t = min(t + BLOCK_S, end)
            batch = world.advance_batch(t)
            if writer is not None:
                n_a, n_p = writer.addresses, writer.payloads
                writer.add_addresses(list(zip(world.addresses[n_a:], world.address_random[n_a:], strict=True)))
                writer.add_payloads([Content(m, s) for m, s in world.payloads[n_p:]])
                writer.add_records(batch.t_ms, batch.rx, batch.address, batch.payload, batch.rssi)
            leave(world.pop_finished())
            if progress is not None:
                progress((t - world.start_ts) / duration_s, world.delivered)
            if speed is not None:
                ahead = (t - world.start_ts) / speed - (time.monotonic() - wall0)
                if ahead > 0:
                    time.sleep(ahead)
        leave(world.pop_finished() + world.people)
    finally:
        if writer is not None:
            writer.close()
    ws = world.summary()
    summary = {
        "scenario": scenario.name,
        "seed": seed,
        "start": world.start_ts,
        "start_utc": rfc3339(world.start_ts),
        "duration_s": duration_s,
        "subjects": sum(labels.values()) + ws["beacons"],
        "people": sum(labels.values()),
        "beacons": ws["beacons"],
        "visits": labels["visit"],
        "pass_bys": labels["pass-by"],
        "staff": labels["staff"],
        "adverts": ws["adverts"],
        "packets_sent": ws["packets_sent"],
        "addresses": ws["addresses"],
        "per_receiver": ws["per_receiver"],
    }
    if truth is not None:
        truth.close(summary)
    return Recording(
        summary,
        writer.path if writer else None,
        truth.path if truth else None,
        time.monotonic() - wall0,
    )
