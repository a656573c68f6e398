"""The one config file (TOML), validated on load into typed settings.

Every field has a default, a description and bounds; unknown keys are refused. A bad file
fails before anything starts, with one line per problem naming the key, the bad value
and what is allowed, e.g. ``site.toml: mqtt.keepalive_s = 0: must be at least 5``.

Nothing is loaded at import time: call `load_settings`.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import ssl
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import numpy.typing as npt
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

PATTERN_HINTS: dict[str, str] = {}
"""What `format_errors` tells someone whose value does not match a field's pattern, by pattern (`pattern`)."""


def pattern(regex: str, hint: str) -> str:
    """`regex`, for a field's `pattern`, with what to say of a value that does not match it."""
    PATTERN_HINTS[regex] = hint
    return regex


ID_PATTERN = pattern(
    r"^[a-z0-9][a-z0-9_-]{0,63}$",
    "must be lowercase letters, digits, '-' or '_' (at most 64), starting with a letter or digit",
)
"""Store, gateway, zone and receiver ids: lowercase, digits, '-' and '_'; safe in MQTT topics and URLs."""
BEACON_HINT = (
    "beacon: and then lowercase letters, digits, ':', '.' or '-' (at most 120), the id as the gateway derives it, "
    "e.g. beacon:<uuid>:<major>:<minor> with the UUID in lowercase"
)

Id = Annotated[str, Field(pattern=ID_PATTERN)]


def _finite(p: tuple[float, float]) -> tuple[float, float]:
    if not all(math.isfinite(v) for v in p):
        raise ValueError("coordinates must be finite numbers (metres), not nan or inf")
    return p


Point = Annotated[tuple[float, float], Field(strict=False), AfterValidator(_finite)]
"""[x, y] in metres on the store plan (a TOML array of two finite numbers)."""


class ConfigError(Exception):
    """A config (or rules) file that cannot be used; one line per problem in `problems`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Strict(BaseModel):
    """Base of every config model: unknown keys refused, no silent type coercion, frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --------------------------------------------------------------------------- store plan


class ZoneConfig(Strict):
    """One zone of the store plan."""

    id: Id = Field(description="Zone id, used in events and on the dashboard.")
    name: str = Field(default="", max_length=80, description="Human name for the dashboard.")
    outside: bool = Field(default=False, description="True for zones outside the store (sidewalk).")
    polygon: list[Point] = Field(
        default_factory=list,
        max_length=256,
        description="Corners [x, y] in metres, in order (3 or more); with receiver positions it lets the "
        "estimator place subjects on the plan (docs/estimation.md). Empty: no geometry.",
    )


class WallConfig(Strict):
    """Something that attenuates radio between subject and receiver: glass front, outer walls, shelf runs."""

    name: str = Field(default="", max_length=80, description="For people.")
    points: list[Point] = Field(min_length=2, max_length=256, description="Polyline corners [x, y], m.")
    loss_db: float = Field(ge=0, le=60, description="Loss of one crossing, dB.")


class ReceiverConfig(Strict):
    """A radio that hears adverts: the gateway's own adapter or a remote node."""

    id: Id = Field(description="Receiver id, as the source reports it.")
    zone: Id = Field(description="Zone the receiver is mounted in.")
    gain_db: float = Field(
        default=0.0, ge=-30, le=30, description="Calibration added to every RSSI this receiver reports, dB."
    )
    position: Point | None = Field(
        default=None, description="Where it is mounted, [x, y] in metres in the zones' frame; None: unknown."
    )


class EidConfig(Strict):
    """An Eddystone-EID beacon's registration: what the gateway needs to compute the ephemeral ids it sends
    (docs/checkin.md "Beacons the phone heard"). The identity key is a secret: whoever has it can forge them."""

    key: str = Field(
        default="",
        repr=False,
        pattern=pattern(r"^(?:[0-9a-f]{32})?$", "must be 32 lowercase hex digits (a 16-byte key)"),
        description="The beacon's identity key, 32 lowercase hex digits (16 bytes); prefer key_file.",
    )
    key_file: str = Field(
        default="",
        max_length=4096,
        description="A file holding the identity key (32 hex digits); relative: next to the config file. "
        "Refused when others may read it.",
    )
    exponent: int = Field(default=10, ge=0, le=15, description="Rotation exponent K: a new id every 2^K s.")
    epoch: int = Field(
        default=0,
        ge=0,
        le=2**32 - 1,
        description="UNIX time at which the beacon's own seconds counter read 0 (0: the counter is UNIX time).",
    )

    @model_validator(mode="after")
    def _one_key(self) -> EidConfig:
        if bool(self.key) == bool(self.key_file):
            raise ValueError("give the identity key as key_file (or, for a test, key), exactly one of them")
        return self

    def identity_key(self, where: str) -> bytes:
        """The 16-byte identity key; ConfigError (naming `where` and the file) when it cannot be used."""
        if self.key:
            return bytes.fromhex(self.key)
        path = Path(self.key_file)
        try:
            check_private(self.key_file, f"{where}.key_file")
            text = path.read_text(encoding="ascii").strip().lower()
        except ValueError as e:
            raise ConfigError([str(e)]) from None
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not text"
            problem = f"{where}.key_file = {self.key_file}: cannot be read ({reason}); fix the path"
            raise ConfigError([problem]) from None
        if not re.fullmatch(r"[0-9a-f]{32}", text):
            raise ConfigError([f"{where}.key_file = {self.key_file}: must hold 32 hex digits (a 16-byte key)"])
        return bytes.fromhex(text)


class BeaconConfig(Strict):
    """A fixed beacon of the store, known by its subject id."""

    id: str = Field(
        pattern=pattern(r"^beacon:[0-9a-z:.-]{1,120}$", f"must be {BEACON_HINT}"),
        description="Subject id as the gateway derives it, e.g. beacon:<uuid>:<major>:<minor>.",
    )
    name: str = Field(default="", max_length=80, description="Human name.")
    zone: Id = Field(description="Zone the beacon is mounted in.")
    eid: EidConfig | None = Field(
        default=None,
        description="For an Eddystone-EID beacon: its registration, so the gateway recognises its rotating ids "
        "(over the radio, and in check-ins as proof the phone heard it). None: a beacon with a fixed id.",
    )


STRAY_RECEIVER_M = 10.0
"""A receiver further than this outside every zone is reported by `visita config check` (PlanConfig.stray_receivers)."""
OVERLAP_STEP_M = 0.25
OVERLAP_SAMPLES_MAX = 250_000
OVERLAP_NOTE_M2 = 1.0
"""Zones sharing at least this much area are named by `visita config check` (PlanConfig.overlap_notes)."""
SHADOWED_SHARE = 0.5
"""A zone with this share of its area in zones listed before it is refused: the first zone listed takes a place in
both (the estimator's grid), so it would get almost nothing."""


class PlanConfig(Strict):
    """Zones, receivers and fixed beacons of the store."""

    zones: list[ZoneConfig] = Field(min_length=1, description="Zones, inside and outside.")
    receivers: list[ReceiverConfig] = Field(min_length=1, description="Receivers.")
    beacons: list[BeaconConfig] = Field(default_factory=list, description="Fixed beacons.")
    walls: list[WallConfig] = Field(
        default_factory=list, max_length=1000, description="Walls, windows and shelf runs (radio loss)."
    )
    doors: list[Point] = Field(
        default_factory=list,
        max_length=64,
        description="Where people cross between outside and inside zones, [x, y] m; the HMM lets them cross "
        "only near a door. Empty: anywhere.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PlanConfig:
        problems = _id_problems(
            [z.id for z in self.zones], [r.id for r in self.receivers], [r.zone for r in self.receivers],
            [b.zone for b in self.beacons],
        )  # fmt: skip
        for i, z in enumerate(self.zones):
            if z.polygon and len(z.polygon) < 3:
                problems.append(f"zones[{i}].polygon: give at least three corners (or none)")
            elif z.polygon and _area(z.polygon) < 0.01:
                problems.append(
                    f"zones[{i}].polygon: its corners enclose no area (all on one line or one point); give the "
                    "zone's outline, corner by corner"
                )
            elif z.polygon and (cross := _self_crossing(z.polygon)) is not None:
                e1, e2 = cross
                n = len(z.polygon)
                problems.append(
                    f"zones[{i}].polygon: its outline crosses itself (the edge from corner {e1} to {(e1 + 1) % n} "
                    f"crosses the edge from corner {e2} to {(e2 + 1) % n}, counting from 0); give the corners in "
                    "order around the zone"
                )
        if all(z.outside for z in self.zones):
            problems.append("zones: every zone is outside; at least one zone must be inside the store")
        if not problems:
            for i, lost, earlier in self._overlaps():
                if lost >= SHADOWED_SHARE:
                    z = self.zones[i]
                    problems.append(
                        f"zones[{i}] ({z.id}): {100 * lost:.0f} % of it lies in {', '.join(e for e, _ in earlier)}, "
                        f"listed before it; a place in two zones counts for the first listed, so {z.id} would get "
                        "almost none of it: list it first, or correct the outlines"
                    )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _overlaps(self) -> list[tuple[int, float, list[tuple[str, float]]]]:
        """For each zone that overlaps zones listed before it: its index, the share of its area they hold, and
        each of them with the area (m²) it shares (sampled every OVERLAP_STEP_M)."""
        out: list[tuple[int, float, list[tuple[str, float]]]] = []
        for i, z in enumerate(self.zones):
            if not z.polygon or not any(e.polygon for e in self.zones[:i]):
                continue
            xs, ys = [p[0] for p in z.polygon], [p[1] for p in z.polygon]
            box = (max(xs) - min(xs)) * (max(ys) - min(ys))
            step = max(OVERLAP_STEP_M, math.sqrt(box / OVERLAP_SAMPLES_MAX))  # a huge zone (a typo) sampled coarser
            gx, gy = np.meshgrid(
                np.arange(min(xs) + step / 2, max(xs), step, dtype=np.float32),
                np.arange(min(ys) + step / 2, max(ys), step, dtype=np.float32),
            )
            x, y = gx.reshape(-1), gy.reshape(-1)
            mine = points_in_polygon(x, y, z.polygon)
            x, y = x[mine], y[mine]
            if not len(x):
                continue
            taken = np.zeros(len(x), dtype=np.bool_)
            earlier: list[tuple[str, float]] = []
            for e in self.zones[:i]:
                if e.polygon:
                    shared = points_in_polygon(x, y, e.polygon)
                    if shared.sum() * step * step >= OVERLAP_NOTE_M2:
                        earlier.append((e.id, float(shared.sum()) * step * step))
                    taken |= shared
            if earlier:
                out.append((i, float(taken.mean()), earlier))
        return out

    def overlap_notes(self) -> list[str]:
        """Zones overlapping zones listed before them, with less than SHADOWED_SHARE of their area (more is refused)."""
        return [
            f"zone {self.zones[i].id} overlaps {', '.join(f'{e} (about {a:.0f} m²)' for e, a in earlier)}, listed "
            f"before it: places in both count for the zone listed first"
            for i, lost, earlier in self._overlaps()
            if lost < SHADOWED_SHARE
        ]

    def zone(self, zone_id: str) -> ZoneConfig:
        """The zone with this id (KeyError if none)."""
        for z in self.zones:
            if z.id == zone_id:
                return z
        raise KeyError(zone_id)

    def unserved_zones(self) -> list[str]:
        """Inside zones that no receiver serves (`receivers[].zone`): told from their neighbours only by receivers
        elsewhere, so their dwell is the least accurate (docs/estimation.md, "What it takes")."""
        served = {r.zone for r in self.receivers}
        return [z.id for z in self.zones if not z.outside and z.id not in served]

    def stray_receivers(self, margin_m: float = STRAY_RECEIVER_M) -> list[tuple[str, float]]:
        """Receivers placed more than `margin_m` outside every zone polygon's box, with how far: most likely a typo
        in `position` (metres, not centimetres; x and y swapped), which would mislead the estimator everywhere."""
        boxes = [
            (min(x for x, _ in z.polygon), min(y for _, y in z.polygon), max(x for x, _ in z.polygon),
             max(y for _, y in z.polygon))
            for z in self.zones
            if z.polygon
        ]  # fmt: skip
        out: list[tuple[str, float]] = []
        for r in self.receivers:
            if r.position is None or not boxes:
                continue
            x, y = r.position
            d = min(math.hypot(max(x0 - x, 0.0, x - x1), max(y0 - y, 0.0, y - y1)) for x0, y0, x1, y1 in boxes)
            if d > margin_m:
                out.append((r.id, round(d, 1)))
        return out

    def geometry_gaps(self) -> str | None:
        """What a plan that gives some geometry but not all lacks (most likely an oversight: without all of it the
        estimator is the strongest-receiver baseline, and a site survey cannot be used), or None."""
        zones = [z.id for z in self.zones if not z.polygon]
        receivers = [r.id for r in self.receivers if r.position is None]
        none_given = len(zones) == len(self.zones) and len(receivers) == len(self.receivers)
        if none_given or not (zones or receivers):
            return None
        lacking = ([f"zone(s) {', '.join(zones)} have no polygon"] if zones else []) + (
            [f"receiver(s) {', '.join(receivers)} have no position"] if receivers else []
        )
        return (
            f"{' and '.join(lacking)}: without a polygon for every zone and a position for every receiver the "
            "estimator is the strongest-receiver baseline (no positions, paths or site survey); give them "
            "(docs/config.md, [plan])"
        )

    def has_geometry(self) -> bool:
        """True when every zone has a polygon and every receiver a position (the HMM estimator needs both)."""
        return all(z.polygon for z in self.zones) and all(r.position is not None for r in self.receivers)


def _id_problems(
    zone_ids: list[Any], receiver_ids: list[Any], receiver_zones: list[Any], beacon_zones: list[Any]
) -> list[str]:
    """Duplicate ids, and receivers or beacons in zones that are not in the plan (None: a value that is missing,
    reported on its own)."""
    problems: list[str] = []
    for kind, ids in (("zone", zone_ids), ("receiver", receiver_ids)):
        dupes = sorted({str(i) for i in ids if i is not None and ids.count(i) > 1})
        if dupes:
            problems.append(f"duplicate {kind} id(s) {', '.join(dupes)}: every {kind} id must be unique")
    names = ", ".join(str(z) for z in zone_ids if z is not None)
    for kind, zones in (("receivers", receiver_zones), ("beacons", beacon_zones)):
        problems += [
            f"{kind}[{i}].zone = {zone!r}: no such zone (zones: {names})" for i, zone in enumerate(zones)
            if zone is not None and zone not in zone_ids
        ]  # fmt: skip
    return problems


def points_in_polygon(
    x: npt.NDArray[np.floating[Any]],
    y: npt.NDArray[np.floating[Any]],
    polygon: Sequence[tuple[float, float]] | npt.NDArray[np.float64],
) -> npt.NDArray[np.bool_]:
    """Ray casting for many points at once (the shape of x and y), for the gateway and the simulator alike.

    A point on the polygon's lower or left edge counts as inside, one on its upper or right edge as outside, so
    adjacent zones sharing an edge never both claim a point.
    """
    inside = np.zeros(np.shape(x), dtype=np.bool_)
    n = len(polygon)
    for i in range(n):
        x1, y1 = polygon[i]
        x2, y2 = polygon[(i + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > y) != (y2 > y)
        x_at = (x2 - x1) * (y - y1) / (y2 - y1) + x1
        inside ^= crosses & (x < x_at)
    return inside


def _self_crossing(polygon: list[tuple[float, float]]) -> tuple[int, int] | None:
    """The first two edges of a polygon that cross or touch away from a shared corner (edge i runs from corner i to
    the next), or None. A corner repeated at once (or the first one repeated at the end) is no edge; edges along one
    line that do not overlap are fine. Orientations within a relative 1e-9 count as collinear (float noise)."""
    idx = [i for i in range(len(polygon)) if polygon[i] != polygon[i - 1]] or [0]
    pts = [polygon[i] for i in idx]
    n = len(pts)
    scale = max(max(abs(x), abs(y)) for x, y in pts) or 1.0
    eps = 1e-9 * scale * scale

    def side(p: tuple[float, float], q: tuple[float, float], r: tuple[float, float]) -> int:
        v = (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])
        return 0 if abs(v) <= eps else (1 if v > 0 else -1)

    def within(p: tuple[float, float], q: tuple[float, float], r: tuple[float, float]) -> bool:
        """r, on the line through p and q, lies on the segment p-q."""
        t = 1e-9 * scale
        return min(p[0], q[0]) - t <= r[0] <= max(p[0], q[0]) + t and min(p[1], q[1]) - t <= r[1] <= max(p[1], q[1]) + t

    for i in range(n):
        for j in range(i + 2, n):
            if i == 0 and j == n - 1:
                continue  # the first and the last edge share corner 0
            p1, p2, q1, q2 = pts[i], pts[(i + 1) % n], pts[j], pts[(j + 1) % n]
            d1, d2, d3, d4 = side(q1, q2, p1), side(q1, q2, p2), side(p1, p2, q1), side(p1, p2, q2)
            crossing = d1 * d2 < 0 and d3 * d4 < 0
            touching = (
                (d1 == 0 and within(q1, q2, p1))
                or (d2 == 0 and within(q1, q2, p2))
                or (d3 == 0 and within(p1, p2, q1))
                or (d4 == 0 and within(p1, p2, q2))
            )
            if crossing or touching:
                return idx[i], idx[j]
    return None


def _area(polygon: list[tuple[float, float]]) -> float:
    """The area a polygon's corners enclose, m² (shoelace)."""
    edges = zip(polygon, polygon[1:] + polygon[:1], strict=True)
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in edges)) / 2


# --------------------------------------------------------------------------- sections


class MqttConfig(Strict):
    """The uplink to the loyalty backend's broker."""

    url: str = Field(
        default="mqtt://127.0.0.1:1883",
        description='Broker URL, mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; "off" disables the uplink.',
    )
    client_id: str = Field(
        default="",
        max_length=128,
        description="MQTT client id; empty means visita-<store>-<gateway> (stable, so the session survives).",
    )
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive, seconds.")
    max_inflight: int = Field(
        default=100, ge=1, le=65535, description="Events handed to the broker and not yet acknowledged, at most."
    )
    protocol: Literal["5", "3.1.1"] = Field(default="5", description='MQTT protocol version: "5" or "3.1.1".')
    session_expiry_s: int = Field(
        default=3600, ge=0, le=4_294_967_295, description="MQTT 5 session expiry: how long the broker keeps it, s."
    )
    ca: str = Field(default="", description="CA certificate file (PEM) for mqtts://; empty means the system CAs.")
    cert: str = Field(default="", description="Client certificate file (PEM) for mqtts://, when the broker wants one.")
    key: str = Field(default="", description="Private key file (PEM) of the client certificate.")
    username: str = Field(default="", max_length=256, description="MQTT user name; empty means none.")
    password_file: str = Field(
        default="",
        description="File holding the MQTT password (first line); empty means $CREDENTIALS_DIRECTORY/mqtt-password "
        "when systemd provides it, else none.",
    )
    max_rate: int = Field(
        default=2000, ge=1, le=1_000_000, description="Events published per second at most (backlog replay), /s."
    )
    backoff_min_s: float = Field(default=0.5, gt=0, le=60, description="First reconnect delay, s (doubles, jittered).")
    backoff_max_s: float = Field(default=60.0, gt=0, le=3600, description="Longest reconnect delay, s.")
    health_interval_s: float = Field(default=60.0, ge=1, le=3600, description="Seconds between `health` events.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v == "off":
            return v
        parse_mqtt_url(v)
        return v

    @model_validator(mode="after")
    def _tls_files(self) -> MqttConfig:
        if bool(self.cert) != bool(self.key):
            raise ValueError("mqtt.cert and mqtt.key go together: give both or neither")
        if self.backoff_min_s > self.backoff_max_s:
            raise ValueError("mqtt.backoff_min_s must not be above mqtt.backoff_max_s")
        return self

    def secrets(self) -> str | None:
        """`password`, once the client key is known to be private too and the TLS files can be loaded as the uplink
        will load them (ValueError naming the setting and file)."""
        if self.key:
            check_private(self.key, "mqtt.key")
        password = self.password()
        self.check_tls_files()
        return password

    def check_tls_files(self) -> None:
        """ValueError naming the setting and file when `ca`, or `cert` with `key`, cannot be loaded: the uplink
        would fail on them at start (a missing CA file used to pass `visita config check` and then crash `run`)."""
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca:
            try:
                ctx.load_verify_locations(self.ca)
            except (OSError, ssl.SSLError) as e:
                raise ValueError(
                    f"mqtt.ca {self.ca}: cannot be loaded as a CA certificate (PEM): {_tls_reason(e)}; fix the path "
                    "or the file"
                ) from None
        if self.cert:

            def no_passphrase() -> bytes:
                raise ValueError("encrypted")  # the gateway starts unattended: nobody types a passphrase

            try:
                ctx.load_cert_chain(self.cert, self.key or None, password=no_passphrase)
            except (OSError, ssl.SSLError, ValueError) as e:
                reason = "encrypted" if isinstance(e, ValueError) else _tls_reason(e)
                reason = {
                    "encrypted": "the key is encrypted (the gateway starts unattended: give it unencrypted)",
                    "KEY_VALUES_MISMATCH": "the key is not the certificate's",
                }.get(reason, reason)
                raise ValueError(
                    f"mqtt.cert {self.cert} with mqtt.key {self.key}: cannot be loaded: {reason}; fix the paths or "
                    "the files (the certificate and its private key, PEM)"
                ) from None

    def password(self) -> str | None:
        """The password from `password_file`, or systemd's credential ``mqtt-password``; None when neither.

        Raises ValueError naming the file when it cannot be read.
        """
        return read_secret(self.password_file, "mqtt-password", "mqtt.password_file")


def _tls_reason(e: Exception) -> str:
    """An OSError's or SSLError's reason, short."""
    if isinstance(e, OSError) and e.strerror and not getattr(e, "reason", None):
        return e.strerror
    return str(getattr(e, "reason", None) or e)


def check_private(path: str, setting: str) -> None:
    """ValueError when others than the file's owner and group may read the secret at `path` (a key, a token, a
    password): anyone with a login on the Pi could use it."""
    try:
        mode = Path(path).stat().st_mode & 0o777
    except OSError:
        return  # reading it says why
    if mode & 0o007:
        raise ValueError(f"{setting} {path}: mode {mode:04o} lets anyone on this machine read it; chmod 640 it")


def read_secret(path: str, credential: str, setting: str) -> str | None:
    """The first line of the file `path`, or of systemd's credential `credential` when `path` is empty;
    None when neither is there. Raises ValueError naming the file and the setting when it cannot be read."""
    if not path:
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not creds or not os.path.exists(os.path.join(creds, credential)):
            return None
        path = os.path.join(creds, credential)
    check_private(path, setting)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{setting} {path}: cannot be read: {e}; fix the path or its mode") from None
    lines = text.splitlines()
    return lines[0] if lines else ""


@dataclass(frozen=True)
class DashboardTls:
    """A certificate and key the dashboard can serve HTTPS with (`load_tls`)."""

    cert: str
    key: str | None
    """None: the certificate was checked without its key (`config check` outside the unit that has the key)."""
    not_after: datetime
    """When the certificate expires (UTC); browsers and `visita survey` refuse it after that."""
    names: list[str]
    """The host names and addresses it is for (subjectAltName, else its common name)."""


def load_tls(cert: tuple[str, str], key: tuple[str, str] | None) -> DashboardTls:
    """Check a (path, setting) certificate and key pair the way the server will load it (without `key`, the
    certificate alone). ValueError naming the setting, the file and what to do when the file cannot be read, is not
    PEM, the key is encrypted or is not the certificate's."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

    def read(path: str, setting: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"{setting} {path}: cannot be read: {e.strerror}; fix the path or its mode") from None

    cert_path, cert_setting = cert
    cert_pem = read(cert_path, cert_setting)
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError(
            f"{cert_setting} {cert_path}: not a PEM certificate (a '-----BEGIN CERTIFICATE-----' block)"
        ) from None
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    if key is None:
        return DashboardTls(cert_path, None, certificate.not_valid_after_utc, names)
    key_path, key_setting = key
    check_private(key_path, key_setting)
    key_pem = read(key_path, key_setting)
    try:
        private = load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError(
            f"{key_setting} {key_path}: the key is encrypted; the gateway starts unattended, so give it the key "
            "without a passphrase (openssl pkey -in KEY -out KEY.plain) and keep the file at mode 0600"
        ) from None
    except ValueError:
        raise ValueError(
            f"{key_setting} {key_path}: not a PEM private key (a '-----BEGIN … PRIVATE KEY-----' block)"
        ) from None
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise ValueError(
            f"{key_setting} {key_path}: not the key of the certificate {cert_path} ({cert_setting}); where that file "
            "holds a chain, the gateway's own certificate comes first"
        )
    try:  # what uvicorn will do with them
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"{cert_setting} {cert_path}, {key_setting} {key_path}: cannot be served: {e}") from None
    return DashboardTls(cert_path, key_path, certificate.not_valid_after_utc, names)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address, or a name this machine resolves, such as a Pi's own name in /etc/hosts) is this
    machine only: what is sent there does not cross a network."""
    import ipaddress
    import socket

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in found)


TLS_EXPIRY_WARNING_DAYS = 30
"""A dashboard certificate this close to its end is warned about at every start and by `config check`."""


def serving_notes(listen: str, tls: DashboardTls | None, tokens: list[str]) -> list[tuple[int, str]]:
    """What an operator should know about how the dashboard is served, as (logging level, message): the certificate
    and its end, or `tokens` (the roles that have one) that would cross the network in clear."""
    import logging

    if listen == "off":
        return []
    if tls is not None:
        left = tls.not_after - datetime.now(UTC)
        until = f"{tls.cert}, for {', '.join(tls.names)}, until {tls.not_after.date()}"
        if left.total_seconds() <= 0:
            return [
                (
                    logging.ERROR,
                    f"the dashboard's certificate {tls.cert} expired on {tls.not_after.date()}: browsers and "
                    "visita survey refuse it; replace it (docs/install.md, HTTPS)",
                )
            ]
        if left.days < TLS_EXPIRY_WARNING_DAYS:
            return [(logging.WARNING, f"the dashboard serves HTTPS with {until}: {left.days} day(s) left; replace it")]
        return [(logging.INFO, f"the dashboard serves HTTPS with {until}")]
    if tokens and not is_loopback(parse_listen(listen)[0]):
        return [
            (
                logging.WARNING,
                f"the dashboard listens on {listen} over plain HTTP: the {' and '.join(tokens)} token(s) cross the "
                "network in clear; set dashboard.tls_cert_file and tls_key_file (docs/install.md, HTTPS)",
            )
        ]
    return []


INSTALLER_TOKEN_MIN = 16
"""Shortest installer or support token accepted, characters."""


def _token(path: str, role: str) -> str | None:
    """The `role` token (installer, support) from its file or systemd credential; None when neither is there."""
    key = f"dashboard.{role}_token_file"
    token = read_secret(path, f"visita-{role}-token", key)
    if token is not None and len(token.strip()) < INSTALLER_TOKEN_MIN:
        where = path or f"(systemd credential visita-{role}-token)"
        raise ValueError(
            f"{key} {where}: the {role} token must be at least {INSTALLER_TOKEN_MIN} characters; make one with: "
            "openssl rand -hex 24"
        )
    return None if token is None else token.strip()


class DashboardConfig(Strict):
    """The footfall dashboard and API."""

    listen: str = Field(default="127.0.0.1:8080", description='HOST:PORT to serve on, or "off".')
    installer_token_file: str = Field(
        default="",
        description="File holding the installer token (first line, at least 16 characters), which the installer "
        "endpoints (/api/v1/survey…) and `visita survey` need; empty means $CREDENTIALS_DIRECTORY/"
        "visita-installer-token when systemd provides it, else the installer endpoints are off.",
    )
    support_token_file: str = Field(
        default="",
        description="File holding the support token (first line, at least 16 characters), for support staff: it "
        "opens the members' points explanations (/api/v1/members/…/points, `visita points explain`) and nothing "
        "of the installer's, whose token does not open them; empty means $CREDENTIALS_DIRECTORY/visita-support-token "
        "when systemd provides it, else those endpoints are off.",
    )
    tls_cert_file: str = Field(
        default="",
        description="PEM certificate (its chain after it) to serve the dashboard and API over HTTPS, so that the "
        "installer and support tokens do not cross the shop's network in clear; `visita survey` and `visita points "
        "explain` on this machine then expect exactly it (its first certificate). Empty: plain HTTP.",
    )
    tls_key_file: str = Field(
        default="",
        description="The certificate's private key, PEM and not encrypted (mode 0600); empty means "
        "$CREDENTIALS_DIRECTORY/visita-dashboard-key, the way to hand it to the unit (docs/install.md, HTTPS).",
    )

    def tls_key(self) -> tuple[str, str] | None:
        """(path, where it was configured) of the dashboard's TLS key: the setting's file, else systemd's credential
        visita-dashboard-key when the unit provides it; None when neither."""
        if self.tls_key_file:
            return self.tls_key_file, "dashboard.tls_key_file"
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if creds and os.path.exists(os.path.join(creds, "visita-dashboard-key")):
            return os.path.join(creds, "visita-dashboard-key"), "systemd credential visita-dashboard-key"
        return None

    def tls(self) -> DashboardTls | None:
        """The HTTPS certificate and key, checked; None for plain HTTP. ValueError naming the setting (or systemd
        credential) and the file when they cannot be served."""
        key = self.tls_key()
        if not self.tls_cert_file:
            if key is not None:
                raise ValueError(
                    f"{key[1]} is set but dashboard.tls_cert_file is not: name the key's certificate there (the CLI "
                    "on this machine reads it from the config), or drop the key"
                )
            return None
        if key is None:
            raise ValueError(
                f"dashboard.tls_cert_file {self.tls_cert_file} has no key: set dashboard.tls_key_file, or give the "
                "unit the credential visita-dashboard-key "
                "(LoadCredential=visita-dashboard-key:/etc/visita/dashboard.key)"
            )
        return load_tls((self.tls_cert_file, "dashboard.tls_cert_file"), key)

    def installer_token(self) -> str | None:
        """The installer token, or None when none is configured. ValueError when it is unreadable or too short."""
        return _token(self.installer_token_file, "installer")

    def support_token(self) -> str | None:
        """The support token, or None when none is configured. ValueError when it is unreadable or too short."""
        return _token(self.support_token_file, "support")

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v != "off":
            parse_listen(v)
        return v


class StorageConfig(Strict):
    """Where the gateway keeps its database."""

    data_dir: str = Field(
        default="",
        description="Data directory; relative: next to the config file; empty means $XDG_STATE_HOME/visita "
        "(~/.local/state/visita).",
    )
    outbox_max: int = Field(
        default=20_000,
        ge=10,
        le=1_000_000,
        description="Events the outbox holds before footfall.minute, then zone.changed events are dropped "
        "(counted; visits and awards are never dropped).",
    )
    full_disk_outbox_max: int = Field(
        default=2_000, ge=10, le=1_000_000, description="The same bound while the disk is full (events in memory)."
    )
    history_days: int = Field(
        default=90,
        ge=1,
        le=36_500,
        description="Days of finished visits and awards kept in the data directory (history/), today included; "
        "older days are deleted once a store-local day. Never fewer than the points rules look back on.",
    )

    def directory(self, given: Path | None = None) -> Path:
        """The data directory: `given` (--data-dir), else `data_dir`, else the default."""
        return given or Path(self.data_dir or default_data_dir())


class EstimateConfig(Strict):
    """The zone estimator (docs/estimation.md): an HMM over the plan when it has geometry, else the
    strongest receiver with hysteresis (whose settings are smoothing_s, hysteresis_db, stale_s, inside_min_rssi)."""

    method: Literal["auto", "hmm", "baseline"] = Field(
        default="auto",
        description="auto: the HMM when the plan has zone polygons and receiver positions, else baseline; "
        "hmm: require the geometry; baseline: strongest receiver with hysteresis.",
    )
    lag_s: int = Field(
        default=2, ge=0, le=30, description="HMM: fixed-lag smoothing; a zone is reported this many seconds late, s."
    )
    cell_m: float = Field(default=1.5, ge=0.5, le=10, description="HMM: grid cell size over the plan, m.")
    path_loss_exponent: float = Field(
        default=2.2, ge=1.5, le=5, description="HMM: log-distance path-loss exponent of the store."
    )
    sigma_db: float = Field(
        default=5.0, ge=1, le=20, description="HMM: spread of one second's RSSI around the path-loss model, dB."
    )
    surveyed_sigma_db: float | None = Field(
        default=4.5,
        ge=1,
        le=20,
        description="HMM: sigma_db to use instead when a site survey map is loaded: the survey explains part of "
        "the static shadowing, so less spread is left (docs/survey.md); None: sigma_db either way.",
    )
    walk_mps: float = Field(default=1.5, gt=0, le=5, description="HMM: fastest walking speed assumed, m/s.")
    outlier_db: float = Field(
        default=12.0,
        ge=3,
        le=40,
        description="HMM: a second's RSSI further than this from the smoothed level is clipped to it, dB.",
    )

    smoothing_s: float = Field(
        default=4.0, gt=0, le=120, description="Time constant of RSSI smoothing per subject and receiver, s."
    )
    hysteresis_db: float = Field(
        default=4.0, ge=0, le=30, description="A new receiver must beat the current one by this much, dB."
    )
    stale_s: float = Field(
        default=12.0, gt=0, le=600, description="A receiver not hearing a subject for this long is ignored, s."
    )
    inside_min_rssi: float = Field(
        default=-90.0,
        ge=-120,
        le=0,
        description="Best smoothed RSSI below this puts the subject outside (in the plan's first outside zone), dBm.",
    )


class SurveyConfig(Strict):
    """The site survey (docs/survey.md): an installer carries a known transmitter to spots of the plan; the
    estimator's model mean is corrected by what was measured there (static shadowing, receiver offsets)."""

    transmitter: str = Field(
        default="",
        pattern=pattern(r"^(?:beacon:[0-9a-z:.-]{1,120})?$", f"must be empty or a beacon id: {BEACON_HINT}"),
        description="Subject id of the survey tag, e.g. beacon:<uuid>:<major>:<minor>; empty: none chosen yet.",
    )
    file: str = Field(
        default="survey.json",
        max_length=4096,
        description="The survey map file; relative: in the data directory (storage.data_dir).",
    )
    correlation_m: float = Field(
        default=4.0,
        ge=0.5,
        le=50,
        description="Distance over which the store's static shadowing decorrelates (to 1/e), m: how far a spot's "
        "correction reaches. Shelving and fittings: 3-5 m.",
    )
    sigma_db: float = Field(
        default=5.0,
        ge=0.5,
        le=20,
        description="Prior spread of the static shadowing, dB; far from every spot the correction falls back to 0.",
    )
    offset_sigma_db: float = Field(
        default=3.0,
        ge=0,
        le=20,
        description="Prior spread of a receiver's RSSI offset (calibration) fitted first, dB; 0: none fitted.",
    )
    spot_sigma_db: float = Field(
        default=2.5,
        ge=0,
        le=20,
        description="What a spot's level varies by that averaging its packets does not remove (people, doors, "
        "drifting shadow), dB; added to each spot's packet noise.",
    )
    min_packets: int = Field(
        default=5,
        ge=1,
        le=10_000,
        description="A receiver that heard fewer of the tag's packets at a spot is left out for that spot "
        "(too few to read a level from; counted as spots_too_few in the map's summary).",
    )


class VisitsConfig(Strict):
    """Visit sessions and their classification."""

    absence_timeout_s: float = Field(
        default=60.0, ge=5, le=3600, description="A visit ends after this long without a sighting, s."
    )
    min_dwell_s: float = Field(
        default=45.0, ge=0, le=3600, description="Inside for this long before a session counts as a visit, s."
    )
    min_sure_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="Of the inside time, this much must be sure (no place outside explains the signals), s.",
    )
    resume_within_s: float = Field(
        default=300.0,
        ge=0,
        le=3600,
        description="A member's visit open when the gateway stopped or lost power goes on after a restart within "
        "this long; otherwise it ends at its last sighting, s (docs/events.md, 'Restarts').",
    )
    staff: list[str] = Field(default_factory=list, description="Member refs of staff; their visits are 'staff'.")
    handover: bool = Field(
        default=True,
        description="Continue a visit across the phone's address change (gateway/handover.py; needs the HMM).",
    )


class PointsConfig(Strict):
    """Loyalty points."""

    rules: str = Field(default="", description="Rules file (TOML, docs/rules.md); empty means built-in rules.")

    def rules_path(self) -> Path | None:
        """The rules file, or None for the built-in rules."""
        return Path(self.rules) if self.rules else None


STORE_SECRET_MIN = 32
"""Fewest bytes a store secret file (`identity.anon_secret_file`) may hold: 256 bits, as many as the salt it keys."""


class IdentityConfig(Strict):
    """How anonymous phones are pseudonymised (gateway/identity.py, docs/events.md#privacy)."""

    anon_secret_file: str = Field(
        default="",
        description="Store secret file shared by the store's gateways (a relay and its main gateway): the day's salt "
        "of anonymous subjects is then HMAC-SHA256(secret, store id and local day), the same on every Pi of the "
        "store, so one phone heard by two of them is one subject that day. Empty (the default): a random salt per "
        "gateway and day, never stored. Make one with `visita keys new-store-secret FILE`.",
    )

    def anon_secret(self) -> bytes | None:
        """The store secret's bytes, or None when `anon_secret_file` is empty. ValueError naming the setting and
        the file when it cannot be read, others than its owner and group may read it, or it is too short."""
        if not self.anon_secret_file:
            return None
        path = self.anon_secret_file
        check_private(path, "identity.anon_secret_file")
        try:
            secret = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(
                f"identity.anon_secret_file {path}: cannot be read: {e.strerror}; fix the path or its mode"
            ) from None
        if len(secret) < STORE_SECRET_MIN:
            raise ValueError(
                f"identity.anon_secret_file {path}: holds {len(secret)} bytes, fewer than {STORE_SECRET_MIN}; make "
                "one with `visita keys new-store-secret FILE` and copy the same file to every gateway of the store"
            )
        return secret


class Settings(Strict):
    """Everything `visita run` needs."""

    store: Id = Field(default="demo-store", description="Store id (in topics and events).")
    gateway: Id = Field(default="gw-1", description="Gateway id, unique within the store.")
    timezone: str = Field(default="UTC", description="Store's IANA time zone; days for points are local days.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    plan: PlanConfig = Field(default_factory=lambda: default_plan())
    estimate: EstimateConfig = Field(default_factory=EstimateConfig)
    visits: VisitsConfig = Field(default_factory=VisitsConfig)
    survey: SurveyConfig = Field(default_factory=SurveyConfig)
    points: PointsConfig = Field(default_factory=PointsConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)

    @model_validator(mode="after")
    def _estimator_needs(self) -> Settings:
        if self.estimate.method == "hmm" and not self.plan.has_geometry():
            raise ValueError(
                'estimate.method = "hmm" needs the plan\'s geometry: a polygon for every zone and a position for every '
                'receiver; give them, or use "auto" (the baseline without them)'
            )
        return self

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown time zone; use an IANA name such as Europe/Berlin or UTC") from None
        return v


# --------------------------------------------------------------------------- parsing helpers


@dataclass(frozen=True, slots=True)
class MqttUrl:
    """A parsed broker URL."""

    tls: bool
    host: str
    port: int

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def redact_url(text: str) -> str:
    """`text` with the user name and password of any URL in it replaced by *** (for messages and logs)."""
    text = re.sub(r"//[^/\s]*@", "//***@", text)  # up to the last @ of the address, as urlsplit reads it
    # user:password@host without a scheme, up to the last @ too (a password may hold one)
    return re.sub(r"(?<![\w.%+:/-])[\w.%+-]+:[^\s/]*@", "***@", text)


def parse_mqtt_url(url: str) -> MqttUrl:
    """Parse mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError("must be mqtt://HOST[:PORT], mqtts://HOST[:PORT] or off")
    if parts.username or parts.password:
        raise ValueError("must not hold a user name or password (they would end up in logs)")
    if not parts.hostname:
        raise ValueError("has no host; use mqtt://HOST[:PORT]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must not have a path, query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("port must be 1..65535") from None
    if port == 0:
        raise ValueError("port must be 1..65535")
    tls = parts.scheme == "mqtts"
    return MqttUrl(tls=tls, host=parts.hostname, port=port or (8883 if tls else 1883))


def parse_listen(value: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [::1]:8080); ValueError says what is wrong."""
    if "://" in value:
        raise ValueError(
            "must be HOST:PORT without a scheme, e.g. 0.0.0.0:8080 (HTTPS or HTTP follows dashboard.tls_cert_file)"
        )
    m = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+(?:%[\w.-]+)?)\]|([A-Za-z0-9.-]+)):(\d{1,5})", value)
    if not m:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080 (a name or an address), or off")
    port = int(m.group(3))
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1..65535")
    return m.group(1) or m.group(2), port


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'90s', '10m', '1h30m', '2h', or plain seconds → seconds; ValueError on anything else."""
    t = text.strip().lower()
    try:
        value = float(t)
    except ValueError:
        pos, total = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _UNIT_S[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise ValueError(f"{text!r} is not a duration; use e.g. 90s, 10m, 1h30m or 2h") from None
        value = total
    if value <= 0:
        raise ValueError(f"{text!r}: a duration must be positive")
    return value


# --------------------------------------------------------------------------- loading


def _walk(model: type[BaseModel], loc: tuple[str | int, ...]) -> tuple[Any, FieldInfo | None]:
    """The model (or type) found at `loc`, and the field that holds it (None: not a field of a model)."""
    current: Any = model
    fld: FieldInfo | None = None
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None, None
        fld = current.model_fields.get(part)
        if fld is None:
            return None, None
        current = fld.annotation
        args = getattr(current, "__args__", None)
        if args:  # list[X] / X | None
            current = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), current)
    return current, fld


def _holds_secret(current: Any) -> bool:
    """Whether a model has a secret field (repr=False), itself or in a model it holds."""
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return False
    for fld in current.model_fields.values():
        if fld.repr is False:
            return True
        inner = fld.annotation
        if any(_holds_secret(t) for t in (inner, *getattr(inner, "__args__", ()))):
            return True
    return False


def _field_names(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str] | None:
    """Names of the fields of the model found at `loc` (for 'unknown key' messages)."""
    current, _ = _walk(model, loc)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _union_tags(model: type[BaseModel], loc: tuple[str | int, ...], tag: str) -> list[str]:
    """The values `tag` may take in the tagged union of items found at `loc` (a rule's kinds), or []."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fld = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if fld is None:
            return []
        current = fld.annotation
    while get_origin(current) in (list, Annotated):  # list[Annotated[A | B | ..., Field(discriminator=tag)]]
        current = get_args(current)[0]
    out: list[str] = []
    for member in get_args(current):
        fld = member.model_fields.get(tag) if isinstance(member, type) and issubclass(member, BaseModel) else None
        out += [str(v) for v in get_args(fld.annotation)] if fld is not None else []
    return out


def dotted(loc: tuple[str | int, ...]) -> str:
    """('plan', 'zones', 2, 'id') → 'plan.zones[2].id'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _data_loc(loc: tuple[Any, ...], data: object) -> tuple[str | int, ...]:
    """The error's location in the user's file: drop the tags pydantic inserts for tagged unions
    (`rules[0].visit.points` → `rules[0].points`, where `visit` is that rule's `kind`)."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if not isinstance(part, (str, int)):
            continue
        if isinstance(node, dict) and isinstance(part, str) and part not in node and part in node.values():
            continue
        out.append(part)
        if isinstance(node, dict) and isinstance(part, str):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def format_errors(source: str, err: ValidationError, model: type[BaseModel], data: object = None) -> list[str]:
    """One clear line per problem: `source: key = value: what is allowed`."""
    lines = []
    for e in err.errors(include_url=False):
        loc = _data_loc(e["loc"], data)
        key = dotted(loc)
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            # Without its value: a secret under a misspelt key (`mqtt.password = ...`) is still a secret.
            allowed = _field_names(model, loc[:-1])
            here = f" (allowed here: {', '.join(allowed)})" if allowed else ""
            lines.append(f"{source}: {key}: unknown key{here}")
            continue
        elif e["type"] == "missing" and loc and isinstance(loc[-1], int):
            lines.append(f"{source}: {dotted(loc[:-1])}: too few items (no item [{loc[-1]}]; a point is [x, y])")
            continue
        elif e["type"] == "missing":
            lines.append(f"{source}: {key}: required key is missing")
            continue
        elif e["type"] == "string_pattern_mismatch":
            regex = str(e.get("ctx", {}).get("pattern", ""))
            msg = PATTERN_HINTS.get(regex, f"must match the pattern {regex}")
        elif e["type"] in ("union_tag_not_found", "union_tag_invalid"):  # a tagged union's tag (a rule's kind)
            tag = str(e.get("ctx", {}).get("discriminator", "kind")).strip("'")
            where = f"{source}: {dotted((*loc, tag))}"
            if e["type"] == "union_tag_not_found":
                tags = _union_tags(model, loc, tag)
                lines.append(f"{where}: required key is missing" + (f" (one of: {', '.join(tags)})" if tags else ""))
            else:
                expected = str(e.get("ctx", {}).get("expected_tags", "")).replace("'", "")
                given = e["input"].get(tag) if isinstance(e.get("input"), dict) else e["ctx"]["tag"]
                lines.append(f"{where} = {given!r}: unknown (one of: {expected})")
            continue
        value = e.get("input")
        if isinstance(value, str):
            value = redact_url(value)
        held, fld = _walk(model, loc)
        if (fld is not None and fld.repr is False) or (not isinstance(value, (dict, list)) and _holds_secret(held)):
            # A secret (an EID beacon's key), or a plain value where a table with a secret in it belongs (`eid = "…"`):
            # never echoed. (A table's own problems are shown without its value, below.)
            lines.append(f"{source}: {key} = (hidden): {msg}")
            continue
        if isinstance(value, dt.time) and not value.second and not value.microsecond:
            value = value.isoformat(timespec="minutes")  # HH:MM, as the rules' times are written
        elif isinstance(value, (dt.date, dt.time)):  # TOML's own dates and times (datetime is a date)
            value = value.isoformat()
        if isinstance(value, str) and isinstance(e.get("input"), (dt.date, dt.time)):
            if e["type"] == "string_type":
                written = f'{loc[-1]} = "{value}"' if isinstance(loc[-1], str) else f'"{value}"'
                msg = f"a TOML date or time where text is expected: put it in quotes, {written}"
            lines.append(f"{source}: {key} = {value}: {msg}")
            continue
        if isinstance(value, (dict, list)) or key == "":
            lines.append(f"{source}: {key or '(top level)'}: {msg}")
        else:
            shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML spells it
            lines.append(f"{source}: {key} = {shown}: {msg}")
    return lines


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; ConfigError names the file and what is wrong with it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot be read: {e}"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None


def validate(model: type[Strict], data: dict[str, Any], source: str) -> Any:
    """Validate `data` against `model`; ConfigError with one line per problem."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(source, e, model, data)) from None


def default_plan() -> PlanConfig:
    """The demo store's plan (matches firmware_sim's default scenario)."""
    text = resources.files("gateway").joinpath("defaults/plan.toml").read_text(encoding="utf-8")
    data = tomllib.loads(text)
    plan: PlanConfig = validate(PlanConfig, data, "built-in plan")
    return plan


def load_settings(path: Path | None) -> Settings:
    """Settings from a TOML file, or the built-in defaults (the demo store) when `path` is None."""
    if path is None:
        return Settings()
    return _beside(validate(Settings, read_toml(path), str(path)), path)


def load_sections(path: Path) -> tuple[Settings, set[str], list[str]]:
    """For a file `load_settings` refuses: the settings with each section of it that is valid on its own, the
    names of the sections left at their defaults because they are not, and the problems `load_settings` could not
    reach (`plan_id_problems`). So `visita config check` reports them and checks the files the valid sections name
    (rules, certificates) in the same round."""
    data = read_toml(path)
    bad: set[str] = set()
    for name in data:
        try:
            Settings.model_validate({name: data[name]})
        except ValidationError:
            bad.add(name)
    try:
        settings = Settings.model_validate({k: v for k, v in data.items() if k not in bad})
    except ValidationError:  # valid one by one, not together (the estimator against the plan)
        bad |= {"estimate", "plan"}
        settings = Settings.model_validate({k: v for k, v in data.items() if k not in bad})
    return _beside(settings, path), bad, plan_id_problems(data, str(path))


def plan_id_problems(data: dict[str, Any], source: str) -> list[str]:
    """The plan's duplicate ids and unknown zones, from the file's raw `data`, when a field of the plan is invalid
    (pydantic then leaves out the plan-wide checks); [] otherwise, as `load_settings` reported them already."""
    plan = data.get("plan")
    if not isinstance(plan, dict):
        return []
    try:
        PlanConfig.model_validate(plan)
        return []
    except ValidationError as e:
        if any(not err["loc"] for err in e.errors()):
            return []  # the plan-wide checks ran

    def values(key: str, name: str) -> list[Any]:
        """Each item's `name` (None where it has none, or is no table)."""
        found = plan.get(key)
        return [x.get(name) if isinstance(x, dict) else None for x in found] if isinstance(found, list) else []

    problems = _id_problems(
        values("zones", "id"), values("receivers", "id"), values("receivers", "zone"), values("beacons", "zone")
    )
    return [f"{source}: plan: {p}" for p in problems]


def _beside(settings: Settings, path: Path) -> Settings:
    """`settings` with the relative file paths in it resolved next to the config file at `path`."""
    rules = settings.points.rules
    if rules and not Path(rules).is_absolute():
        # A relative rules path means "next to the config file", wherever visita was started.
        points = settings.points.model_copy(update={"rules": str(path.parent / rules)})
        settings = settings.model_copy(update={"points": points})

    def near(section: BaseModel, *names: str) -> Any:
        """`section` with its relative file settings `names` resolved next to the config file."""
        found = {n: str(path.parent / v) for n in names if (v := getattr(section, n)) and not Path(v).is_absolute()}
        return section.model_copy(update=found) if found else section

    settings = settings.model_copy(
        update={
            "dashboard": near(
                settings.dashboard, "installer_token_file", "support_token_file", "tls_cert_file", "tls_key_file"
            ),
            "mqtt": near(settings.mqtt, "ca", "cert", "key", "password_file"),
            "storage": near(settings.storage, "data_dir"),
            "identity": near(settings.identity, "anon_secret_file"),
        }
    )
    beacons = [
        b.model_copy(update={"eid": b.eid.model_copy(update={"key_file": str(path.parent / b.eid.key_file)})})
        if b.eid is not None and b.eid.key_file and not Path(b.eid.key_file).is_absolute()
        else b
        for b in settings.plan.beacons
    ]
    if beacons != settings.plan.beacons:  # key files, like the rules, are found next to the config file
        settings = settings.model_copy(update={"plan": settings.plan.model_copy(update={"beacons": beacons})})
    return settings


def default_data_dir() -> Path:
    """$XDG_STATE_HOME/visita, or ~/.local/state/visita."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "visita"
