"""Site survey: what a known transmitter measured at spots of the store, as a correction of the HMM's model.

The installer carries a survey tag (a beacon with a fixed id, `survey.transmitter`) to spots of the plan and
stands at each for some seconds, turning slowly. `SurveyRecorder` keeps, per spot and receiver, the RSSI of
the tag's packets heard during the spot's window. `SurveyMap` fits, per receiver, the residual of every spot
(its median level minus the estimator's own model mean there, `gateway.estimate.expected_rssi`) and
interpolates the residuals onto any point by Gaussian-process regression (simple kriging) with a
squared-exponential kernel: near spots the correction is what was measured, far from every spot it falls back
to 0. A constant per receiver (its calibration offset) is part of the same regression. A receiver far from a
spot reports only the packets that faded up above its sensitivity, so the median of what it heard there reads
high; such a spot's level is the censored-normal (Tobit) estimate instead, from the packets heard and the
number it missed (`spot_level`). docs/survey.md has the procedure, the file format and what a survey can and
cannot fix.

No clocks: time comes in as arguments and with the sightings. The only I/O is `SurveyMap.save` / `load`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.config import EstimateConfig, PlanConfig, SurveyConfig, points_in_polygon
from gateway.estimate import REFERENCE_RSSI_1M, erfc, expected_rssi
from gateway.files import write_atomic
from gateway.model import Sighting

F64 = npt.NDArray[np.float64]
F32 = npt.NDArray[np.float32]

FORMAT = "visita-survey"
"""The `format` field of a survey file."""
VERSION = 1
"""The `version` field of a survey file; files of another version are refused."""
MIN_SPOT_S = 3.0
MAX_SPOT_S = 600.0
"""A spot lasts this long at least / at most, s."""
LATE_S = 2.0
"""A spot's window is closed once a sighting this much past its end arrives (late remote sightings still count)."""
PACKET_SIGMA_DB = 4.0
"""Spread of one packet's RSSI around a spot's level while the installer turns (fast fading, body), dB."""
FULL_RATE_QUANTILE = 90.0
"""A receiver's packets per second when nothing is lost to its sensitivity: this percentile of its rates over the
spots where it heard the tag (the spots near it, where every packet it listened for arrives)."""
CENSORED_REACH_DB = 3 * PACKET_SIGMA_DB
"""Only a spot whose median is within this of the receiver's sensitivity can have lost packets to it; further up,
misses are scan windows, collisions and losses, and taking them as below the sensitivity would pull a strong
level down (mall unit, 3-m survey, without this: dwell error 18.5 -> 25.9 % on seed 3)."""
STRAY_SHARE = 0.001
"""Share of a receiver's weakest survey packets taken as strays when its sensitivity is read (`sensitivity`)."""
STRAY_MIN_PACKETS = 100
"""Fewer survey packets than this from a receiver: its weakest is its sensitivity (too few to tell a stray)."""
CURVATURE_STEP_DB = 0.5
"""Step of the three-point second difference that measures a censored level's likelihood curvature: wide against
the 0.05-dB search grid, narrow against the 4-dB packet spread (the curve is near quadratic across it)."""
CENSORED_SHARE = 0.1
"""A spot's level is estimated as censored when the receiver missed more packets there (against its full rate)
than this share of the packets it heard."""


@dataclass(frozen=True, slots=True)
class SpotLevel:
    """What `spot_level` makes of a receiver's packets at one spot."""

    level: float
    """The receiver's level there, dBm."""
    variance: float
    """The variance of that estimate, dB²: how far it would wander over repeated spots (the kriging's noise)."""
    censored: bool
    """True when the level is the censored (Tobit) estimate, False when it is the median of the heard packets."""


def spot_level(values: npt.NDArray[np.float64], missed: float, threshold: float) -> SpotLevel:
    """A receiver's level at a spot from the packets it heard there and how many it missed.

    With nothing missed (beyond CENSORED_SHARE), or a median further than CENSORED_REACH_DB above `threshold`,
    the median of the packets heard, whose variance is pi/2 PACKET_SIGMA_DB² / n. Otherwise the packets below
    `threshold` (the receiver's sensitivity, `sensitivity`) were never reported, and the median of the rest reads
    high: the maximum-likelihood level of packets spread normally by PACKET_SIGMA_DB, the heard ones by their
    values and the `missed` ones by the chance of being below the threshold (Tobit), searched on a 0.05 dB grid;
    its variance is the inverse curvature of that likelihood at the maximum (CURVATURE_STEP_DB either side). That
    is smaller than a median's of the same packets (the fit is mean-like and the misses add information), so a
    spot weighs more in the kriging once its level is censored; it holds as far as packets spread normally in
    dB, which the fading's long lower tail does not quite.

    Measured with a simulated survey of the supermarket (5-m spots, seed 2) and a receiver reading 5 dB high: its
    spots' median levels rose by only 2.8 dB on average, since the weak spots heard 1-38 packets at 0 dB and
    47-81 at +5 dB."""
    median = float(np.median(values))
    if missed <= CENSORED_SHARE * len(values) or median - threshold > CENSORED_REACH_DB:
        return SpotLevel(median, math.pi / 2 * PACKET_SIGMA_DB**2 / len(values), False)

    def ll(mu: F64) -> F64:
        below = 0.5 * erfc((mu - threshold) / (PACKET_SIGMA_DB * math.sqrt(2.0)))
        out: F64 = -((values[None, :] - mu[:, None]) ** 2).sum(axis=1) / (2 * PACKET_SIGMA_DB**2)
        out += missed * np.log(np.maximum(below, 1e-300))
        return out

    grid = np.arange(min(threshold, float(values.min())) - 25.0, float(values.max()) + 10.0, 0.05)
    best = float(grid[int(np.argmax(ll(grid)))])
    h = CURVATURE_STEP_DB
    around = ll(np.array([best - h, best, best + h]))
    curvature = float(2 * around[1] - around[0] - around[2]) / h**2
    return SpotLevel(best, 1.0 / max(curvature, 1e-6), True)


def sensitivity(values: Sequence[float]) -> float:
    """A receiver's sensitivity as the packets it reported over a survey show it, dBm: just under its weakest
    packets. From STRAY_MIN_PACKETS on, read at the STRAY_SHARE quantile and never below the third weakest, so
    that a stray low reading or two does not lower it (too low, misses near the true sensitivity would not be
    taken as censored); with fewer, under the weakest. ValueError without packets."""
    if not len(values):
        raise ValueError("no packets: a receiver's sensitivity is read from the packets it reported")
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    k = max(2, int(STRAY_SHARE * len(ordered))) if len(ordered) >= STRAY_MIN_PACKETS else 0
    return float(ordered[k]) - 0.5  # reported values are whole dBm


class SurveyError(ValueError):
    """A survey file or a spot that cannot be used; the message says what and the fix."""


class SurveyRefused(Exception):
    """An installer request on the running gateway that is not carried out: HTTP `status` and a one-line
    `message` (what is wrong and what to do). Nothing changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class SurveySpot:
    """One spot the installer stood at, and what every receiver heard of the tag meanwhile."""

    x: float
    """Where, metres on the plan."""
    y: float
    start: float
    """Start of the window, UNIX s."""
    seconds: float
    """Length of the window, s."""
    ref_rssi: float
    """The tag's RSSI at 1 m, dBm (from its frames, or the recorder's override)."""
    rssi: Mapping[str, tuple[int, ...]]
    """Per receiver id: the RSSI of every packet of the tag heard in the window, dBm, as reported."""

    def packets(self) -> dict[str, int]:
        """Packets heard per receiver."""
        return {rx: len(v) for rx, v in self.rssi.items()}


@dataclass(slots=True)
class _Running:
    x: float
    y: float
    start: float
    seconds: float
    rssi: dict[str, list[int]] = field(default_factory=dict)
    refs: list[int] = field(default_factory=list)

    @property
    def end(self) -> float:
        return self.start + self.seconds


def inside_zone(plan: PlanConfig, x: float, y: float) -> str | None:
    """The first inside zone of the plan that holds (x, y), or None."""
    px, py = np.array([x], dtype=np.float32), np.array([y], dtype=np.float32)
    for z in plan.zones:
        if not z.outside and z.polygon and bool(points_in_polygon(px, py, z.polygon)[0]):
            return z.id
    return None


class SurveyRecorder:
    """Collects the survey tag's sightings spot by spot; no I/O, time comes from `now` and the sightings."""

    def __init__(self, plan: PlanConfig, transmitter: str, ref_rssi_1m: float | None = None) -> None:
        if not transmitter.startswith("beacon:"):
            raise SurveyError(f"survey transmitter {transmitter!r}: must be a beacon subject id (beacon:...)")
        self._plan = plan
        self.transmitter = transmitter
        self._ref_override = ref_rssi_1m
        self._receivers = {r.id for r in plan.receivers}
        self._running: _Running | None = None
        self._done: list[SurveySpot] = []
        self._counts = {"outside_window": 0, "unknown_receiver": 0, "late": 0}

    def start_spot(self, x: float, y: float, seconds: float, now: float) -> None:
        """Start recording a spot at (x, y) for `seconds` from `now`.

        ValueError when (x, y) is in no inside zone of the plan, `seconds` is out of range, or a spot is
        still recording (its window has not passed by `now`)."""
        if not (math.isfinite(x) and math.isfinite(y)):
            raise SurveyError(f"spot ({x}, {y}): coordinates must be finite metres on the plan")
        if inside_zone(self._plan, x, y) is None:
            inside = ", ".join(z.id for z in self._plan.zones if not z.outside)
            raise SurveyError(
                f"spot ({x:g}, {y:g}) lies in no inside zone of the plan ({inside}); survey spots must be inside "
                "the store, where people are placed"
            )
        if not (MIN_SPOT_S <= seconds <= MAX_SPOT_S):
            raise SurveyError(f"spot seconds = {seconds:g}: must be {MIN_SPOT_S:g}..{MAX_SPOT_S:g} s")
        self._finish_due(now)
        if self._running is not None:
            r = self._running
            raise SurveyError(
                f"the spot at ({r.x:g}, {r.y:g}) is still recording for {r.end - now:.1f} s; wait for it to "
                "end or discard it"
            )
        self._running = _Running(x, y, now, seconds)

    def shift(self, by: float) -> None:
        """The clock was stepped forward by `by` seconds (gateway.runtime.Gateway.shift): the spot recording now keeps
        the rest of its window. Spots recorded stay as they were."""
        if self._running is not None:
            self._running.start += by

    def observe(self, sightings: Sequence[Sighting]) -> None:
        """Fold in sightings; only the tag's, inside the running spot's window, count."""
        newest = -math.inf
        for s in sightings:
            if s.subject != self.transmitter:
                continue
            newest = max(newest, s.ts)
            r = self._running
            if r is None or not (r.start <= s.ts < r.end):
                self._counts["outside_window"] += 1
                continue
            if s.receiver not in self._receivers:
                self._counts["unknown_receiver"] += 1
                continue
            r.rssi.setdefault(s.receiver, []).append(int(s.rssi))
            r.refs.append(int(s.ref_rssi))
        if math.isfinite(newest):
            self._finish_due(newest - LATE_S)

    def _finish_due(self, now: float) -> None:
        r = self._running
        if r is None or now < r.end:
            return
        self._running = None
        if self._ref_override is not None:
            ref = float(self._ref_override)
        elif r.refs:
            ref = float(np.median(r.refs))
        else:
            ref = REFERENCE_RSSI_1M
        self._done.append(SurveySpot(r.x, r.y, r.start, r.seconds, ref, {k: tuple(v) for k, v in r.rssi.items()}))

    def status(self, now: float) -> dict[str, Any]:
        """The running spot (position, seconds left, packets per receiver so far) and the spots done."""
        self._finish_due(now)
        r = self._running
        running = None
        if r is not None:
            running = {
                "x": r.x,
                "y": r.y,
                "seconds_left": round(max(0.0, r.end - now), 1),
                "packets": {rx: len(v) for rx, v in sorted(r.rssi.items())},
            }
        return {
            "transmitter": self.transmitter,
            "running": running,
            "spots_done": len(self._done),
            "ignored": dict(self._counts),
        }

    def spots(self) -> list[SurveySpot]:
        """The finished spots, in the order recorded."""
        return list(self._done)

    def restore(self, spots: Sequence[SurveySpot]) -> None:
        """Start from spots recorded before (a saved map's), so more can be added to them and applied again."""
        self._done = [*spots, *self._done]

    def discard(self, index: int) -> None:
        """Forget finished spot `index` (IndexError when there is none)."""
        if not (0 <= index < len(self._done)):
            raise IndexError(f"no survey spot {index} (spots 0..{len(self._done) - 1})")
        del self._done[index]


# =========================================================================== the map


def plan_geometry(plan: PlanConfig) -> dict[str, Any]:
    """What a survey depends on: zone polygons, receiver positions and the walls, in a canonical form."""
    return {
        "zones": {z.id: [list(p) for p in z.polygon] for z in plan.zones},
        "receivers": {r.id: None if r.position is None else list(r.position) for r in plan.receivers},
        "walls": sorted([[list(p) for p in w.points] + [[w.loss_db]] for w in plan.walls]),
    }


def fingerprint(geometry: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of `plan_geometry`."""
    text = json.dumps(geometry, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def geometry_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two `plan_geometry` results, for people (empty: the same)."""
    out: list[str] = []
    for kind, key in (("receiver", "receivers"), ("zone", "zones")):
        o, n = old.get(key, {}), new.get(key, {})
        for k in sorted(set(o) | set(n)):
            if k not in n:
                out.append(f"{kind} {k} is no longer in the plan")
            elif k not in o:
                out.append(f"{kind} {k} was added")
            elif o[k] != n[k]:
                out.append(f"{kind} {k} moved from {o[k]} to {n[k]}" if kind == "receiver" else f"zone {k} was redrawn")
    if old.get("walls") != new.get("walls"):
        out.append("the walls (shelf runs, glass, fittings) differ")
    return out


@dataclass(frozen=True, slots=True)
class _ReceiverFit:
    x: F64
    y: F64
    alpha: F64
    """K⁻¹ · residuals, for the posterior mean."""
    offset: float
    """Posterior mean of the receiver's constant offset, before the common part is removed."""
    used: int
    too_few: int
    """Spots left out: the receiver heard fewer than `min_packets` there."""
    censored: int
    """Spots used whose level is a censored estimate (`spot_level`)."""


class SurveyMap:
    """The survey's correction of the HMM's model mean, per receiver and point (dB).

    Fitted from spots when constructed (or read with `load`, which refits from the stored readings); `correction`
    gives the dB to add to `expected_rssi` at any points.
    """

    def __init__(
        self,
        plan: PlanConfig,
        spots: Sequence[SurveySpot],
        cfg: SurveyConfig | None = None,
        estimate: EstimateConfig | None = None,
        transmitter: str = "",
    ) -> None:
        self.cfg = cfg or SurveyConfig()
        self.estimate = estimate or EstimateConfig()
        if not plan.has_geometry():
            raise SurveyError("a survey needs the plan's geometry: every zone's polygon and every receiver's position")
        self.plan = plan
        self.spots = list(spots)
        self.transmitter = transmitter or self.cfg.transmitter
        self.geometry = plan_geometry(plan)
        self._fits = self._fit()
        offsets = [f.offset for f in self._fits]
        # Only the receivers' offsets relative to each other are learned: a shift common to all of them is what
        # the tag's own power (as its frame states it) or the installer's body would cause.
        self._common = float(np.mean(offsets)) if offsets else 0.0

    # ------------------------------------------------------------------ fit

    def _fit(self) -> list[_ReceiverFit]:
        cfg = self.cfg
        if self.spots:
            sx = np.array([s.x for s in self.spots], dtype=np.float64)
            sy = np.array([s.y for s in self.spots], dtype=np.float64)
            exponent = self.estimate.path_loss_exponent
            model = expected_rssi(self.plan, exponent, sx.astype(np.float32), sy.astype(np.float32))
        fits: list[_ReceiverFit] = []
        s2, c2 = cfg.sigma_db**2, cfg.offset_sigma_db**2
        for i, r in enumerate(self.plan.receivers):
            xs: list[float] = []
            ys: list[float] = []
            res: list[float] = []
            noise: list[float] = []
            too_few = censored = 0
            rates = [len(v) / sp.seconds for sp in self.spots if (v := sp.rssi.get(r.id, ()))]
            full_rate = float(np.percentile(rates, FULL_RATE_QUANTILE)) if rates else 0.0
            packets = [v for sp in self.spots for v in sp.rssi.get(r.id, ())]
            threshold = sensitivity(packets) if packets else 0.0
            for j, spot in enumerate(self.spots):
                values = spot.rssi.get(r.id, ())
                if len(values) < cfg.min_packets:
                    too_few += int(len(values) > 0)
                    continue
                missed = full_rate * spot.seconds - len(values)
                got = spot_level(np.asarray(values, dtype=np.float64), missed, threshold)
                censored += int(got.censored)
                level = got.level + r.gain_db + (REFERENCE_RSSI_1M - spot.ref_rssi)
                xs.append(spot.x)
                ys.append(spot.y)
                res.append(level - float(model[i, j]))
                noise.append(got.variance + cfg.spot_sigma_db**2)  # plus what averaging at a spot does not remove
            x, y = np.array(xs), np.array(ys)
            if not res:
                fits.append(_ReceiverFit(x, y, np.zeros(0), 0.0, 0, too_few, censored))
                continue
            k = self._kernel(x, y, x, y) * s2 + c2 + np.diag(noise)
            alpha = np.linalg.solve(k, np.array(res))
            fits.append(_ReceiverFit(x, y, alpha, float(c2 * alpha.sum()), len(res), too_few, censored))
        return fits

    def _kernel(self, ax: F64, ay: F64, bx: F64, by: F64) -> F64:
        d2 = (ax[:, None] - bx[None, :]) ** 2 + (ay[:, None] - by[None, :]) ** 2
        out: F64 = np.exp(-d2 / self.cfg.correlation_m**2)
        return out

    # ------------------------------------------------------------------ use

    def correction(self, x: F32 | F64, y: F32 | F64) -> F32:
        """dB to add to the model mean at points (x, y), shape (receivers, points)."""
        px, py = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        out = np.zeros((len(self._fits), len(px)), dtype=np.float32)
        s2 = self.cfg.sigma_db**2
        for i, f in enumerate(self._fits):
            if not len(f.alpha):
                continue
            field_part = s2 * (self._kernel(px, py, f.x, f.y) @ f.alpha)
            out[i] = (field_part + f.offset - self._common).astype(np.float32)
        return out

    def offsets(self) -> dict[str, float]:
        """Each receiver's fitted offset relative to the others, dB."""
        return {r.id: round(f.offset - self._common, 2) for r, f in zip(self.plan.receivers, self._fits, strict=True)}

    def check_compatible(self, plan: PlanConfig, estimate: EstimateConfig) -> None:
        """SurveyError unless this map was fitted for this plan's geometry and this path-loss model."""
        changes = geometry_changes(self.geometry, plan_geometry(plan))
        if changes:
            raise SurveyError("the survey map was recorded for another plan: " + "; ".join(changes) + "; redo it")
        if estimate.path_loss_exponent != self.estimate.path_loss_exponent:
            raise SurveyError(
                f"the survey map was fitted against path_loss_exponent {self.estimate.path_loss_exponent:g}, the "
                f"estimator uses {estimate.path_loss_exponent:g}; load it with the estimator's [estimate] settings"
            )

    def summary(self) -> dict[str, Any]:
        """Spots; per receiver the spots used, those of them with a censored level, those left out for too few
        packets; the offsets (for diagnostics)."""
        return {
            "spots": len(self.spots),
            "transmitter": self.transmitter,
            "correlation_m": self.cfg.correlation_m,
            "sigma_db": self.cfg.sigma_db,
            "receivers": {
                r.id: {"spots_used": f.used, "spots_censored": f.censored, "spots_too_few": f.too_few, "offset_db": off}
                for r, f, off in zip(self.plan.receivers, self._fits, self.offsets().values(), strict=True)
            },
        }

    # ------------------------------------------------------------------ file

    def to_json(self) -> dict[str, Any]:
        """The file's content: format, version, the plan geometry and its fingerprint, the spots' readings."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "transmitter": self.transmitter,
            "plan_fingerprint": fingerprint(self.geometry),
            "plan": self.geometry,
            "spots": [
                {
                    "x": s.x,
                    "y": s.y,
                    "start": s.start,
                    "seconds": s.seconds,
                    "ref_rssi": s.ref_rssi,
                    "rssi": {rx: list(v) for rx, v in sorted(s.rssi.items())},
                }
                for s in self.spots
            ],
        }

    def save(self, path: Path) -> None:
        """Write the map as JSON (atomically: a power cut leaves the old map or the new one)."""
        write_atomic(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())

    @classmethod
    def load(
        cls, path: Path, plan: PlanConfig, cfg: SurveyConfig | None = None, estimate: EstimateConfig | None = None
    ) -> SurveyMap:
        """Read a map saved by `save` and refit it for `plan`; SurveyError naming what is wrong or what changed."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise SurveyError(f"{path}: cannot be read ({e.strerror}); record a survey or fix survey.file") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise SurveyError(f"{path}: not a survey file (not JSON)") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise SurveyError(f"{path}: not a survey file (format is not {FORMAT!r})")
        if data.get("version") != VERSION:
            raise SurveyError(f"{path}: survey file version {data.get('version')!r}, this gateway reads {VERSION}")
        geometry = data.get("plan")
        if not isinstance(geometry, dict) or fingerprint(geometry) != data.get("plan_fingerprint"):
            raise SurveyError(f"{path}: the plan geometry does not match its fingerprint (file edited or damaged)")
        changes = geometry_changes(geometry, plan_geometry(plan))
        if changes:
            raise SurveyError(
                f"{path}: recorded for another plan: " + "; ".join(changes) + "; redo the survey for this plan"
            )
        try:
            spots = [
                SurveySpot(
                    float(s["x"]),
                    float(s["y"]),
                    float(s["start"]),
                    float(s["seconds"]),
                    float(s["ref_rssi"]),
                    {str(rx): tuple(int(v) for v in values) for rx, values in s["rssi"].items()},
                )
                for s in data["spots"]
            ]
        except (KeyError, TypeError, ValueError, AttributeError):
            raise SurveyError(f"{path}: a spot is malformed (x, y, start, seconds, ref_rssi, rssi)") from None
        for i, spot in enumerate(spots):
            if not MIN_SPOT_S <= spot.seconds <= MAX_SPOT_S:  # also refuses NaN
                raise SurveyError(
                    f"{path}: spot {i} lasts {spot.seconds:g} s; a spot lasts {MIN_SPOT_S:g}-{MAX_SPOT_S:g} s "
                    "(file edited or damaged): record the survey again"
                )
        return cls(plan, spots, cfg, estimate, str(data.get("transmitter", "")))
