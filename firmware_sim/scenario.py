"""Scenario files: a store plan with geometry, receivers, beacons, population and radio.

A scenario is TOML; `load_scenario` takes a shipped name (a file in firmware_sim/scenarios)
or a path, and refuses unknown keys and bad values with the key named.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from gateway.config import ID_PATTERN, ConfigError, Strict, read_toml, validate

# TOML has arrays, not tuples: these fields take a list in lax mode inside otherwise strict models.
Point = Annotated[tuple[float, float], Field(strict=False)]
Range = Annotated[tuple[float, float], Field(strict=False)]
IntRange = Annotated[tuple[int, int], Field(strict=False)]
Id = Annotated[str, Field(pattern=ID_PATTERN)]


class Radio(Strict):
    """The radio channel."""

    path_loss_exponent: float = Field(default=2.2, ge=1.5, le=5.0, description="Log-distance exponent n.")
    shadowing_sigma_db: float = Field(default=4.0, ge=0, le=12, description="Shadowing σ, dB.")
    shadowing_correlation_s: float = Field(default=10.0, gt=0, le=600, description="Shadowing correlation time, s.")
    fading_sigma_db: float = Field(default=2.0, ge=0, le=10, description="Fast fading σ per packet, dB.")
    sensitivity_dbm: float = Field(default=-95.0, ge=-110, le=-60, description="Weakest receivable signal, dBm.")
    packet_loss: float = Field(default=0.1, ge=0, lt=1, description="Share of packets lost regardless of signal.")
    front_wall_loss_db: float = Field(default=6.0, ge=0, le=40, description="Loss through the shop front, dB.")


class Door(Strict):
    """Where shoppers cross the shop front."""

    outside: Point = Field(description="A point on the sidewalk in front of the door.")
    inside: Point = Field(description="A point just inside the door.")


class Zone(Strict):
    """A zone as a polygon in metres."""

    id: Id
    outside: bool = False
    polygon: list[Point] = Field(min_length=3, description="Corners, in order.")


class Receiver(Strict):
    """A receiver and where it is mounted."""

    id: Id
    position: Point


class Beacon(Strict):
    """A fixed beacon."""

    frame: Literal["ibeacon", "altbeacon", "eddystone-uid"]
    position: Point
    uuid: str = Field(default="", description="iBeacon/AltBeacon UUID (id1).")
    major: int = Field(default=0, ge=0, le=65535)
    minor: int = Field(default=0, ge=0, le=65535)
    measured_power: int = Field(default=-59, ge=-100, le=0, description="RSSI at 1 m, dBm.")
    namespace: str = Field(default="", description="Eddystone namespace, 20 hex digits.")
    instance: str = Field(default="", description="Eddystone instance, 12 hex digits.")
    tx_power: int = Field(default=-18, ge=-100, le=20, description="Eddystone TX power at 0 m, dBm.")
    battery_mv: int = Field(default=3000, ge=0, le=5000, description="Battery voltage reported in TLM, mV.")


class Population(Strict):
    """Who comes by."""

    shoppers_per_hour: float = Field(default=180, ge=0, le=10_000)
    pedestrians_per_hour: float = Field(default=450, ge=0, le=50_000)
    shopper_app_share: float = Field(default=0.4, ge=0, le=1)
    pedestrian_app_share: float = Field(default=0.2, ge=0, le=1)
    phone_share: float = Field(default=0.9, ge=0, le=1, description="Share of people whose phone advertises.")
    staff: int = Field(default=2, ge=0, le=100)
    members: int = Field(default=400, ge=1, le=1_000_000)
    zones_per_visit: IntRange = (2, 4)
    dwell_per_zone_s: Range = (30.0, 240.0)
    checkout_s: Range = (40.0, 150.0)
    walking_speed_mps: float = Field(default=1.2, gt=0.2, le=3)
    address_rotation_s: float = Field(default=900, ge=60, le=86_400)


class Scenario(Strict):
    """A whole scenario file."""

    name: str
    description: str = ""
    radio: Radio = Field(default_factory=Radio)
    door: Door
    zones: list[Zone] = Field(min_length=2)
    receivers: list[Receiver] = Field(min_length=1)
    beacons: list[Beacon] = Field(default_factory=list)
    population: Population = Field(default_factory=Population)

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        if not any(z.outside for z in self.zones) or all(z.outside for z in self.zones):
            raise ValueError("zones: need at least one outside zone (the sidewalk) and one inside zone")
        return self


def shipped() -> list[str]:
    """Names of the scenarios that ship with Visita."""
    folder = resources.files("firmware_sim").joinpath("scenarios")
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name, or a scenario file by path; ConfigError names what is wrong."""
    if name_or_path in shipped():
        ref = resources.files("firmware_sim").joinpath(f"scenarios/{name_or_path}.toml")
        with resources.as_file(ref) as path:
            data, source = read_toml(path), f"scenario {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.exists():
            raise ConfigError([f"{name_or_path}: no such scenario file (shipped scenarios: {', '.join(shipped())})"])
        data, source = read_toml(path), str(path)
    scenario: Scenario = validate(Scenario, data, source)
    return scenario
