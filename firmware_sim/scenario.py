"""Scenario files: a store plan with geometry, receivers, beacons, phones, population and radio.

A scenario is TOML (docs/scenarios.md). `load_scenario` takes a shipped name (a file in
firmware_sim/scenarios) or a path, refuses unknown keys and bad values with one line per
problem (`file: key = value: what is allowed`), then checks what only the whole file can
tell: ids are unique, entrances join an outside zone to an inside one, receivers and beacons
stand in a zone, routes name inside zones.

`scenario_plan` derives the gateway's store plan (zones, receivers with their zones, beacons
with their subject ids) from a scenario, so the gateway can run any scenario without a
hand-written plan; for the shipped `default` it equals gateway/defaults/plan.toml.
"""

from __future__ import annotations

import math
import re
import uuid as uuidlib
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
from pydantic import AfterValidator, BeforeValidator, Field, field_validator

from firmware_sim import frames
from firmware_sim.geometry import as_polygon, points_in_polygon, polygon_area
from gateway.config import (
    ID_PATTERN,
    BeaconConfig,
    ConfigError,
    EidConfig,
    PlanConfig,
    ReceiverConfig,
    Strict,
    WallConfig,
    ZoneConfig,
    read_toml,
    validate,
)
from gateway.identity import beacon_subject
from gateway.model import AltBeacon, EddystoneUID, EddystoneURL, IBeacon

# TOML has arrays, not tuples: these fields take a list in lax mode inside otherwise strict models.
Point = Annotated[tuple[float, float], Field(strict=False)]
Id = Annotated[str, Field(pattern=ID_PATTERN)]

ONE_METRE_DB = -59.0
"""RSSI at 1 m from a 0 dBm transmitter: 40 dB free-space loss at 2.44 GHz plus typical antenna losses."""
MAX_EXTENT_M = 2000.0
"""No coordinate may be further than this from the origin."""


def _ordered(lo: float, hi: float) -> Any:
    def check(v: tuple[float, float]) -> tuple[float, float]:
        if not (lo <= v[0] <= v[1] <= hi):
            raise ValueError(f"must be [low, high] with {lo:g} <= low <= high <= {hi:g}")
        return v

    return AfterValidator(check)


Speeds = Annotated[tuple[float, float], Field(strict=False), _ordered(0.3, 3.0)]
"""[low, high] walking speeds, m/s."""
Seconds = Annotated[tuple[float, float], Field(strict=False), _ordered(0, 86_400)]
"""[low, high] durations, s."""
Intervals = Annotated[tuple[float, float], Field(strict=False), _ordered(20, 10_240)]
"""[low, high] advertising intervals, ms."""
Counts = Annotated[tuple[int, int], Field(strict=False), _ordered(1, 50)]
"""[low, high] counts."""


def _hourly(v: object) -> object:
    if isinstance(v, bool):
        raise ValueError("must be a number or a list of 24 numbers (one per hour of the day, from midnight)")
    if isinstance(v, int | float):
        v = [float(v)] * 24
    if not isinstance(v, list) or len(v) != 24 or not all(isinstance(x, int | float) and x >= 0 for x in v):
        raise ValueError("must be a number >= 0 or a list of 24 numbers >= 0 (one per hour of the day, from midnight)")
    if max(v) > 50_000:
        raise ValueError("must be at most 50000 per hour")
    return [float(x) for x in v]


Hourly = Annotated[list[float], BeforeValidator(_hourly)]
"""People per hour: one number for every hour, or 24 numbers by local hour of the day (index 0 = midnight)."""


class Radio(Strict):
    """The radio channel between every transmitter and every receiver."""

    path_loss_exponent: float = Field(default=2.2, ge=1.5, le=5.0, description="Log-distance exponent n.")
    shadowing_sigma_db: float = Field(default=4.0, ge=0, le=12, description="Total shadowing σ, dB.")
    shadowing_correlation_m: float = Field(
        default=3.0, ge=0.5, le=50, description="Distance over which the spatial shadowing decorrelates (to 1/e), m."
    )
    shadowing_temporal_share: float = Field(
        default=0.25, ge=0, le=1, description="Share of the shadowing variance that drifts in time (people, doors)."
    )
    shadowing_correlation_s: float = Field(
        default=10.0, gt=0, le=600, description="Correlation time of the drifting part, s."
    )
    fading_k_db: float = Field(
        default=6.0, ge=-20, le=30, description="Rician K factor of fast fading per packet, dB (-20 ≈ Rayleigh)."
    )
    body_loss_db: float = Field(
        default=6.0, ge=0, le=30, description="Loss when the carrier's body is between phone and receiver, dB."
    )
    packet_loss: float = Field(default=0.05, ge=0, lt=1, description="Share of packets lost whatever the signal.")
    airtime_us: float = Field(
        default=376.0, ge=0, le=5000, description="Air time of one advertising PDU, µs (collisions; 0 disables)."
    )


class Zone(Strict):
    """A zone as a polygon in metres."""

    id: Id
    name: str = Field(default="", max_length=80, description="Human name (the derived plan's zone name).")
    outside: bool = Field(default=False, description="True for zones outside the store (sidewalk, mall corridor).")
    polygon: list[Point] = Field(min_length=3, description="Corners, in order.")


class Wall(Strict):
    """A wall, window or shelf run: a polyline that attenuates every radio path crossing it."""

    name: str = Field(default="", max_length=80)
    points: list[Point] = Field(min_length=2, description="Polyline corners, m.")
    loss_db: float = Field(ge=0, le=60, description="Loss of one crossing, dB (glass 2-6, brick 8-15, concrete 15+).")


class Entrance(Strict):
    """Where shoppers cross the shop front."""

    id: Id = "main"
    outside: Point = Field(description="A point on the sidewalk in front of the door (in an outside zone).")
    inside: Point = Field(description="A point just inside the door (in an inside zone).")
    weight: float = Field(default=1.0, gt=0, le=1000, description="Relative share of shoppers using it.")


class Sidewalk(Strict):
    """The path pedestrians walk along outside, and arriving shoppers come from."""

    points: list[Point] = Field(min_length=2, description="Centre line from one end to the other, m.")
    width_m: float = Field(default=3.0, gt=0, le=50, description="Walkable width; people spread across it.")


class Receiver(Strict):
    """A receiver and where it is mounted."""

    id: Id
    position: Point
    kind: Literal["gateway", "node"] = Field(default="node", description="The gateway's own radio or a remote node.")
    zone: Id | None = Field(default=None, description="Zone it serves in the plan; default: the zone it stands in.")
    sensitivity_dbm: float = Field(default=-95.0, ge=-110, le=-60, description="Weakest receivable signal, dBm.")
    scan_interval_ms: float = Field(default=60.0, ge=2.5, le=10_240, description="Scan interval, ms.")
    scan_window_ms: float = Field(default=30.0, ge=2.5, le=10_240, description="Listening time per interval, ms.")
    offset_db: float = Field(default=0.0, ge=-20, le=20, description="This radio's RSSI calibration error, dB.")


class Beacon(Strict):
    """A fixed beacon."""

    name: str = Field(default="", max_length=80)
    frame: Literal["ibeacon", "altbeacon", "eddystone-uid", "eddystone-url", "eddystone-eid"]
    position: Point
    interval_ms: float = Field(default=1000.0, ge=20, le=10_240, description="Advertising interval, ms.")
    tx_power_dbm: float = Field(default=0.0, ge=-40, le=10, description="Radiated power, dBm.")
    measured_power: int | None = Field(
        default=None, ge=-100, le=0, description="1-m RSSI written in the frame, dBm; default: the true one."
    )
    uuid: str = Field(default="", description="iBeacon proximity UUID or AltBeacon id1.")
    major: int = Field(default=0, ge=0, le=65535)
    minor: int = Field(default=0, ge=0, le=65535)
    company_id: int = Field(default=0x0118, ge=0, le=0xFFFF, description="AltBeacon manufacturer id.")
    namespace: str = Field(default="", description="Eddystone-UID namespace, 20 hex digits.")
    instance: str = Field(default="", description="Eddystone-UID instance, 12 hex digits.")
    url: str = Field(default="", description="Eddystone-URL URL.")
    eid_key: str = Field(default="", description="Eddystone-EID identity key, 32 hex digits.")
    rotation_exponent: int = Field(default=10, ge=0, le=15, description="Eddystone-EID: a new id every 2^K s.")
    tlm_every: int = Field(default=0, ge=0, le=100, description="Eddystone: every n-th frame is a TLM (0: none).")
    battery_mv: int = Field(default=3000, ge=1, le=5000, description="Battery at the start of the run, mV.")
    battery_drain_mv_per_day: float = Field(default=2.0, ge=0, le=1000)
    uptime_days: float = Field(default=30.0, ge=0, le=3650, description="Days since power-up at the start of the run.")
    temperature_c: float = Field(default=21.0, ge=-40, le=85)

    @property
    def rssi_1m(self) -> float:
        """True RSSI at 1 m, dBm."""
        return self.tx_power_dbm + ONE_METRE_DB

    @property
    def frame_power(self) -> int:
        """1-m RSSI as the frame states it."""
        return self.measured_power if self.measured_power is not None else round(self.rssi_1m)


class Phones(Strict):
    """How people's phones advertise."""

    interval_ms: Intervals = Field(
        default=(100.0, 1000.0), description="Advertising interval range; each phone picks one (log-uniform), ms."
    )
    rssi_1m_dbm: float = Field(default=-59.0, ge=-90, le=-30, description="Typical true RSSI at 1 m, dBm.")
    rssi_1m_spread_db: float = Field(default=3.0, ge=0, le=15, description="σ of that between phone models, dB.")
    app_measured_power: int = Field(default=-59, ge=-100, le=0, description="1-m RSSI the app writes in its frame.")
    address_rotation_s: float = Field(default=900.0, ge=120, le=86_400, description="Address lifetime, s.")
    address_rotation_jitter: float = Field(default=0.2, ge=0, le=0.5, description="± share randomising it.")
    ios_share: float = Field(default=0.5, ge=0, le=1, description="Share of phones that are iPhones.")
    ios_active_mean_s: float = Field(default=40.0, ge=1, le=3600, description="iOS app: mean advertising stretch, s.")
    ios_gap_mean_s: float = Field(default=20.0, ge=0, le=3600, description="iOS app: mean background gap, s (0: none).")
    ios_continuity: bool = Field(default=True, description="iPhones also send Apple Nearby Info, app or not.")


class Route(Strict):
    """A typical path through the store."""

    zones: list[Id] = Field(min_length=1, description="Inside zones in the order visited.")
    weight: float = Field(default=1.0, gt=0, le=1000, description="Relative share of shoppers taking it.")


class Population(Strict):
    """Who comes by, and how they move."""

    shoppers_per_hour: Hourly = Field(default_factory=lambda: [180.0] * 24)
    pedestrians_per_hour: Hourly = Field(default_factory=lambda: [450.0] * 24)
    app_share: float = Field(default=0.4, ge=0, le=1, description="Share of shoppers with the loyalty app.")
    pedestrian_app_share: float = Field(default=0.2, ge=0, le=1)
    phone_share: float = Field(
        default=0.9, ge=0, le=1, description="Share of people without the app whose phone advertises."
    )
    staff: int = Field(default=2, ge=0, le=100, description="Staff members (with the app) inside all day.")
    staff_zones: list[Id] = Field(default_factory=list, description="Zones staff work in; default: every inside zone.")
    members: int = Field(default=400, ge=1, le=1_000_000, description="App members provisioned to the gateway.")
    walking_speed_mps: Speeds = (1.0, 1.5)
    browse_speed_mps: float = Field(default=0.5, gt=0.05, le=2, description="Speed between stops within a zone.")
    browse_stop_s: float = Field(default=40.0, gt=1, le=3600, description="Mean time at one spot before moving on.")
    zones_per_visit: Counts = (2, 4)
    dwell_s: Seconds = (30.0, 240.0)
    zone_dwell_s: dict[str, Seconds] = Field(default_factory=dict, description="Dwell range by zone id.")
    checkout_zone: Id | None = Field(default=None, description="Every visit without a route ends here.")
    routes: list[Route] = Field(default_factory=list, description="Typical routes; empty: random zones.")
    route_share: float = Field(default=0.7, ge=0, le=1, description="Share of shoppers on a typical route.")
    window_share: float = Field(default=0.0, ge=0, le=1, description="Share of pedestrians stopping at the window.")
    window_stop_s: Seconds = (5.0, 40.0)
    left_phones: list[Point] = Field(
        default_factory=list,
        max_length=100,
        description="Spots where an app phone lies still all run long, carried by nobody: a phone left by the "
        "door or on a shelf to collect visits (what docs/rules.md's presence guard must not pay).",
    )


class Scenario(Strict):
    """A whole scenario file."""

    name: str = Field(default="", max_length=80, description="Default: the file name.")
    description: str = ""
    timezone: str = Field(default="UTC", description="IANA zone; people-per-hour lists are in its local hours.")
    start: str = Field(default="2025-03-03T08:00:00", description="Local date and time `visita sim` starts at.")
    radio: Radio = Field(default_factory=Radio)
    zones: list[Zone] = Field(min_length=2)
    walls: list[Wall] = Field(default_factory=list)
    entrances: list[Entrance] = Field(min_length=1)
    sidewalk: Sidewalk
    receivers: list[Receiver] = Field(min_length=1, max_length=255)
    beacons: list[Beacon] = Field(default_factory=list)
    phones: Phones = Field(default_factory=Phones)
    population: Population = Field(default_factory=Population)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone; use an IANA name such as Europe/Berlin or UTC") from None
        return v

    @field_validator("start")
    @classmethod
    def _start(cls, v: str) -> str:
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise ValueError("must be a local date and time such as 2025-03-03T08:00:00") from None
        if dt.tzinfo is not None:
            raise ValueError("must be a local time without an offset (the scenario's timezone applies)")
        return v

    def start_ts(self) -> float:
        """`start` as UNIX seconds."""
        return datetime.fromisoformat(self.start).replace(tzinfo=ZoneInfo(self.timezone)).timestamp()

    def zone_of(self, point: tuple[float, float]) -> str | None:
        """Id of the first zone containing the point, or None."""
        x, y = np.array([point[0]]), np.array([point[1]])
        for z in self.zones:
            if points_in_polygon(x, y, as_polygon(z.polygon))[0]:
                return z.id
        return None

    def inside_zones(self) -> list[str]:
        """Ids of the zones inside the store."""
        return [z.id for z in self.zones if not z.outside]


# --------------------------------------------------------------------------- whole-file checks


def _fmt(p: tuple[float, float] | list[tuple[float, float]]) -> str:
    if isinstance(p, list):
        return "[" + ", ".join(_fmt(q) for q in p) + "]"
    return f"[{p[0]:g}, {p[1]:g}]"


def _beacon_problems(i: int, b: Beacon) -> list[str]:
    key = f"beacons[{i}]"
    out: list[str] = []
    if b.frame in ("ibeacon", "altbeacon"):
        try:
            uuidlib.UUID(b.uuid)
        except ValueError:
            example = "'e2c56db5-dffb-48d2-b060-d0f5a71096e0'"
            out.append(f"{key}.uuid = {b.uuid!r}: {b.frame} beacons need a UUID such as {example}")
    if b.frame == "eddystone-uid":
        for name, value, size in (("namespace", b.namespace, 10), ("instance", b.instance, 6)):
            try:
                ok = len(bytes.fromhex(value)) == size
            except ValueError:
                ok = False
            if not ok:
                out.append(f"{key}.{name} = {value!r}: eddystone-uid beacons need {2 * size} hex digits")
    if b.frame == "eddystone-eid":
        try:
            ok = len(bytes.fromhex(b.eid_key)) == 16
        except ValueError:
            ok = False
        if not ok:
            out.append(f"{key}.eid_key = {b.eid_key!r}: eddystone-eid beacons need an identity key of 32 hex digits")
        if not eid_slug(b.name):
            out.append(f"{key}.name = {b.name!r}: eddystone-eid beacons need a name (their plan id is made from it)")
    if b.frame == "eddystone-url":
        try:
            frames.eddystone_url(b.url, 0)
        except ValueError as e:
            out.append(f"{key}.url = {b.url!r}: {str(e).split(': ', 2)[-1]}")
    if b.tlm_every and not b.frame.startswith("eddystone"):
        out.append(f"{key}.tlm_every = {b.tlm_every}: TLM frames are Eddystone's; use 0 for {b.frame} beacons")
    return out


def check_scenario(s: Scenario) -> list[str]:
    """Problems only the whole file shows, one line each as `key = value: what is wrong` (empty: fine)."""
    problems: list[str] = []
    ids = [z.id for z in s.zones]
    inside = set(s.inside_zones())
    for kind, found in (("zone", ids), ("receiver", [r.id for r in s.receivers])):
        for dupe in sorted({i for i in found if found.count(i) > 1}):
            problems.append(f"{kind}s: id {dupe!r} is used twice: every {kind} id must be unique")
    if not inside or len(inside) == len(ids):
        problems.append("zones: need at least one outside zone (outside = true: the sidewalk) and one inside zone")
    points: list[tuple[str, list[tuple[float, float]]]] = [
        (f"zones[{i}].polygon", z.polygon) for i, z in enumerate(s.zones)
    ]
    points += [(f"walls[{i}].points", w.points) for i, w in enumerate(s.walls)]
    points += [("sidewalk.points", s.sidewalk.points)]
    points += [(f"receivers[{i}].position", [r.position]) for i, r in enumerate(s.receivers)]
    points += [(f"beacons[{i}].position", [b.position]) for i, b in enumerate(s.beacons)]
    points += [(f"population.left_phones[{i}]", [q]) for i, q in enumerate(s.population.left_phones)]
    bad_points = [
        f"{key} = {_fmt(pts)}: coordinates must be finite metres within ±{MAX_EXTENT_M:g}"
        for key, pts in points
        if any(not (math.isfinite(c) and abs(c) <= MAX_EXTENT_M) for p in pts for c in p)
    ]
    if bad_points:  # the geometry checks below need usable coordinates
        return problems + bad_points
    for i, z in enumerate(s.zones):
        if polygon_area(as_polygon(z.polygon)) < 0.01:
            problems.append(
                f"zones[{i}].polygon = {_fmt(z.polygon)}: encloses no area (corners in order, not in a line)"
            )
    for i, w in enumerate(s.walls):
        if all(p == w.points[0] for p in w.points):
            problems.append(f"walls[{i}].points = {_fmt(w.points)}: a wall needs two different points")
    if all(p == s.sidewalk.points[0] for p in s.sidewalk.points):
        problems.append(f"sidewalk.points = {_fmt(s.sidewalk.points)}: a sidewalk needs two different points")
    for i, e in enumerate(s.entrances):
        zo, zi = s.zone_of(e.outside), s.zone_of(e.inside)
        if zo is None or zo in inside:
            problems.append(f"entrances[{i}].outside = {_fmt(e.outside)}: must lie in an outside zone (found {zo})")
        if zi not in inside:
            problems.append(f"entrances[{i}].inside = {_fmt(e.inside)}: must lie in an inside zone (found {zi})")
    for j, p in enumerate(s.sidewalk.points):
        on = s.zone_of(p)
        if on is None or on in inside:
            problems.append(f"sidewalk.points[{j}] = {_fmt(p)}: must lie in an outside zone (found {on})")
    for i, r in enumerate(s.receivers):
        if r.zone is not None and r.zone not in ids:
            problems.append(f"receivers[{i}].zone = {r.zone!r}: no such zone (zones: {', '.join(ids)})")
        elif r.zone is None and s.zone_of(r.position) is None:
            problems.append(f"receivers[{i}].position = {_fmt(r.position)}: in no zone; move it or give its zone")
        if r.scan_window_ms > r.scan_interval_ms:
            problems.append(
                f"receivers[{i}].scan_window_ms = {r.scan_window_ms:g}: must be at most scan_interval_ms "
                f"({r.scan_interval_ms:g})"
            )
    for i, b in enumerate(s.beacons):
        problems += _beacon_problems(i, b)
        if s.zone_of(b.position) is None:
            problems.append(f"beacons[{i}].position = {_fmt(b.position)}: in no zone")
    pop = s.population

    def need_inside(key: str, zone: str) -> None:
        if zone not in inside:
            problems.append(f"{key} = {zone!r}: not an inside zone (inside zones: {', '.join(sorted(inside))})")

    for i, route in enumerate(pop.routes):
        for j, zid in enumerate(route.zones):
            need_inside(f"population.routes[{i}].zones[{j}]", zid)
    for zid in pop.zone_dwell_s:
        need_inside(f"population.zone_dwell_s.{zid}", zid)
    for j, zid in enumerate(pop.staff_zones):
        need_inside(f"population.staff_zones[{j}]", zid)
    if pop.checkout_zone is not None:
        need_inside("population.checkout_zone", pop.checkout_zone)
    return problems


# --------------------------------------------------------------------------- loading


def shipped() -> list[str]:
    """Names of the scenarios that ship with Visita."""
    folder = resources.files("firmware_sim").joinpath("scenarios")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def scenario_from_data(data: dict[str, Any], source: str, default_name: str = "") -> Scenario:
    """Validate already-parsed scenario data (a file's, or one embedded in an advert log)."""
    scenario: Scenario = validate(Scenario, data, source)
    problems = check_scenario(scenario)
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    if not scenario.name:
        scenario = scenario.model_copy(update={"name": default_name or "scenario"})
    return scenario


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name, or a scenario file by path; ConfigError names what is wrong."""
    if name_or_path in shipped():
        ref = resources.files("firmware_sim").joinpath(f"scenarios/{name_or_path}.toml")
        with resources.as_file(ref) as path:
            data, source = read_toml(path), f"scenario {name_or_path}"
        return scenario_from_data(data, source, name_or_path)
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError([f"{name_or_path}: no such scenario file (shipped scenarios: {', '.join(shipped())})"])
    data = read_toml(path)
    config_keys = sorted(set(data) & GATEWAY_CONFIG_KEYS)
    if config_keys and "zones" not in data:  # the store's gateway config given where a scenario is asked for
        raise ConfigError(
            [
                f"{path}: a gateway config file ({', '.join(config_keys)}), not a scenario: a scenario describes a "
                "simulated store, its receivers and its people (docs/scenarios.md; copy a shipped one from "
                "firmware_sim/scenarios/); `visita eval` and `visita run` take a config with --config"
            ]
        )
    return scenario_from_data(data, str(path), path.stem)


GATEWAY_CONFIG_KEYS = frozenset(
    {"store", "gateway", "mqtt", "dashboard", "storage", "plan", "estimate", "visits", "survey", "points"}
)
"""Top-level keys of a gateway config file (docs/config.md) that no scenario has."""


# --------------------------------------------------------------------------- the gateway's plan


def eid_slug(name: str) -> str:
    """`name` as it goes into an EID beacon's plan id: lowercase letters and digits, '-' between words."""
    return re.sub(r"[^0-9a-z]+", "-", name.lower()).strip("-")[:60]


def beacon_subject_id(b: Beacon) -> str:
    """The subject id the gateway derives from this beacon's frames (for an EID beacon: the plan id it is
    registered under, since its frames' ids rotate)."""
    if b.frame == "eddystone-eid":
        return "beacon:eid:" + eid_slug(b.name)
    if b.frame == "ibeacon":
        frame: IBeacon | AltBeacon | EddystoneUID | EddystoneURL = IBeacon(
            str(uuidlib.UUID(b.uuid)), b.major, b.minor, b.frame_power
        )
    elif b.frame == "altbeacon":
        frame = AltBeacon(b.company_id, str(uuidlib.UUID(b.uuid)), b.major, b.minor, b.frame_power, 0)
    elif b.frame == "eddystone-uid":
        frame = EddystoneUID(b.namespace.lower(), b.instance.lower(), b.frame_power + 41)
    else:
        frame = EddystoneURL(b.url, b.frame_power + 41)
    return beacon_subject(frame)[0]


def scenario_plan(s: Scenario) -> PlanConfig:
    """The gateway's store plan for a scenario: the same zone, receiver and beacon ids."""
    zones = [ZoneConfig(id=z.id, name=z.name, outside=z.outside, polygon=list(z.polygon)) for z in s.zones]
    receivers = [
        ReceiverConfig(id=r.id, zone=r.zone or s.zone_of(r.position) or "", position=r.position) for r in s.receivers
    ]
    beacons = [
        BeaconConfig(
            id=beacon_subject_id(b),
            name=b.name,
            zone=s.zone_of(b.position) or "",
            eid=EidConfig(key=b.eid_key.lower(), exponent=b.rotation_exponent) if b.frame == "eddystone-eid" else None,
        )
        for b in s.beacons
    ]
    # The geometry (zone polygons, receiver positions, walls) lets the gateway's HMM estimator place people.
    walls = [WallConfig(name=w.name, points=list(w.points), loss_db=w.loss_db) for w in s.walls]
    doors = [((e.outside[0] + e.inside[0]) / 2, (e.outside[1] + e.inside[1]) / 2) for e in s.entrances]
    return PlanConfig(zones=zones, receivers=receivers, beacons=beacons, walls=walls, doors=doors)
