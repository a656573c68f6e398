"""Ground truth of a simulated run, as JSON Lines (docs/advert-log.md, "Ground truth").

One object per line, told apart by `type`:

* `header` (first line): format, version, scenario, seed, start, end, zones, receivers;
* `beacon`: a fixed beacon: its subject id, address, position and zone;
* `person`: everyone who came by, once they left (or at the end of the run, `complete`
  false): kind, label (visit / pass-by / staff), app and member, phone platform, the
  addresses the phone used with their time ranges, the visit (start, end, zone intervals),
  every zone interval along the way (outside ones too) and the track at whole seconds;
* `summary` (last line): subjects, visits, pass-bys, adverts, adverts per receiver.

Everything here is what really happened, derived from the tracks; nothing is read back from
what the receivers heard.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from firmware_sim.people import TRUTH_DT_S, Person
from firmware_sim.scenario import beacon_subject_id
from firmware_sim.world import World

FORMAT = "visita-truth"
VERSION = 1
TRACK_STEP_S = 1.0


def _t(v: float) -> float | None:
    return None if math.isinf(v) else round(v, 3)


def label(kind: str, entered: bool) -> str:
    """The truth's label: staff, left-phone (nobody's visit, wherever it lies), visit (was inside an inside
    zone) or pass-by (never was, so far)."""
    if kind in ("staff", "left-phone"):
        return kind
    return "visit" if entered else "pass-by"


def quick_label(world: World, p: Person, end: float) -> str:
    """`label` without writing the record: shoppers who finished always went in, pedestrians never do."""
    if p.kind == "pedestrian" or (p.kind == "shopper" and p.t1 <= end):
        return label(p.kind, p.kind == "shopper")
    inside = set(world.scenario.inside_zones())
    return label(p.kind, any(z[0] in inside for z in world.zones_of(p, end)))


def person_record(world: World, p: Person, end: float) -> dict[str, Any]:
    """What really happened to one person up to `end`."""
    complete = p.t1 <= end
    zones = world.zones_of(p, end)
    inside = set(world.scenario.inside_zones())
    visit_zones = [z for z in zones if z[0] in inside]
    visit = None
    if visit_zones:
        start, stop = visit_zones[0][1], visit_zones[-1][2]
        visit = {"start": start, "end": stop, "dwell_s": round(stop - start, 3), "zones": visit_zones}
    t0 = math.ceil(p.t0)
    grid = np.arange(t0, math.floor(min(p.t1, end)) + 1, TRACK_STEP_S)
    x, y = p.position(grid)
    return {
        "type": "person",
        "pid": p.pid,
        "kind": p.kind,
        "label": label(p.kind, visit is not None),
        "has_app": p.member is not None,
        "member": p.member,
        "member_index": p.member_index,
        "phone": p.platform is not None,
        "platform": p.platform,
        "rssi_1m": round(p.rssi_1m, 2),
        "arrived": round(p.t0, 3),
        "departed": round(p.t1, 3) if complete else None,
        "complete": complete,
        "window_stop": p.window_stop,
        "visit": visit,
        "zones": zones,
        "addresses": [
            {"address": world.addresses[int(a)], "from": round(f, 3), "to": _t(t) if t <= end else None}
            for a, f, t in p.addresses
            if f <= end
        ],
        "track": {"t0": t0, "step": TRACK_STEP_S, "x": np.round(x, 2).tolist(), "y": np.round(y, 2).tolist()},
    }


class TruthWriter:
    """Writes a run's ground truth as it happens; people are written when they leave."""

    def __init__(self, path: Path, world: World, end: float) -> None:
        self.path = path
        self.world = world
        self.end = end
        self._f: IO[str] = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.labels = {"visit": 0, "pass-by": 0, "staff": 0, "left-phone": 0}
        sc = world.scenario
        self._line(
            {
                "type": "header",
                "format": FORMAT,
                "version": VERSION,
                "scenario": sc.name,
                "seed": world.seed,
                "start": world.start_ts,
                "end": end,
                "zone_step_s": TRUTH_DT_S,
                "track_step_s": TRACK_STEP_S,
                "zones": [{"id": z.id, "name": z.name, "outside": z.outside} for z in sc.zones],
                "receivers": [{"id": r.id, "position": list(r.position)} for r in sc.receivers],
            }
        )
        for i, b in enumerate(sc.beacons):
            self._line(
                {
                    "type": "beacon",
                    "subject": beacon_subject_id(b),
                    "name": b.name,
                    "frame": b.frame,
                    "address": world.addresses[world.beacon_address(i)],
                    "position": list(b.position),
                    "zone": sc.zone_of(b.position),
                }
            )

    def _line(self, obj: dict[str, Any]) -> None:
        self._f.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")

    def people(self, people: list[Person]) -> None:
        """Write people (those who arrived after the end are skipped)."""
        for p in people:
            if p.t0 >= self.end:
                continue
            rec = person_record(self.world, p, self.end)
            self.labels[rec["label"]] += 1
            self._line(rec)

    def close(self, summary: dict[str, Any]) -> None:
        """Write the summary line and close."""
        self._line({"type": "summary", **summary})
        self._f.close()


def read_truth(path: Path) -> Iterator[dict[str, Any]]:
    """The objects of a truth file in order (header first); ValueError if it is not one."""
    with open(path, encoding="utf-8") as f:
        first = json.loads(f.readline() or "null")
        if not isinstance(first, dict) or first.get("format") != FORMAT or first.get("version") != VERSION:
            raise ValueError(f"{path}: not a Visita truth file (version {VERSION})")
        yield first
        for line in f:
            yield json.loads(line)
