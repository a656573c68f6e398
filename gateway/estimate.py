"""Zone estimation: the hidden-Markov estimator (`HmmEstimator`) and the first one it replaced.

`make_estimator` picks one from the config: the HMM when the plan has geometry (zone polygons and
receiver positions; docs/estimation.md), else the baseline described next.

Baseline: strongest receiver with hysteresis.

Per (subject, receiver) the RSSI is smoothed with an exponential moving average whose
weight follows the time between sightings (a time constant, not a sample count, so a
phone advertising at 100 ms and one at 1 s are smoothed alike). The subject is placed in
the zone of the receiver with the strongest smoothed signal; another receiver takes over
only when it is stronger by the hysteresis margin, or when the current one has gone
silent. A subject whose best signal, normalised to a -59 dBm-at-1-m transmitter, is below
`inside_min_rssi` is put in the plan's outside zone.

How fast a move is followed: when a subject moves so that the new receiver leads the old one by
D dB where it trailed by D dB before, the smoothed difference crosses the hysteresis margin h
after smoothing_s * ln(2D / (D - h)), give or take one advertising interval. For any move with
D >= 2h that is at most smoothing_s * ln 4, about 5.5 s with the defaults (4 s, 4 dB); noise on
the readings adds a little. A receiver that stops hearing the subject is dropped after stale_s.

This is the baseline the hidden-Markov estimator of a later issue has to beat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from gateway.config import EstimateConfig, PlanConfig, points_in_polygon
from gateway.model import Sighting, ZoneEstimate

if TYPE_CHECKING:
    from gateway.survey import SurveyMap

REFERENCE_RSSI_1M = -59.0
"""The transmitter strength `inside_min_rssi` is expressed for (dBm at 1 m)."""

FORGET_AFTER_S = 300.0
"""A subject not heard for this long is forgotten (bounds memory under address rotation)."""


@dataclass(slots=True)
class _Link:
    rssi: float
    last: float


@dataclass(slots=True)
class _Subject:
    links: dict[str, _Link] = field(default_factory=dict)
    current: str | None = None
    last: float = 0.0


UNKNOWN_RECEIVERS_LISTED = 8
"""Receivers not in the plan named in the diagnostics, at most (their sightings are counted, not used)."""


def _note_unknown(names: list[str], receiver: str) -> None:
    """Remember a receiver id that is not in the plan (an ESPresense room nobody mapped), for the diagnostics."""
    if receiver not in names and len(names) < UNKNOWN_RECEIVERS_LISTED:
        names.append(receiver[:64])


class StrongestReceiver:
    """Strongest receiver with hysteresis; no I/O, time comes from the sightings."""

    def __init__(self, plan: PlanConfig, cfg: EstimateConfig) -> None:
        self._cfg = cfg
        self._zone_of = {r.id: r.zone for r in plan.receivers}
        self._gain = {r.id: r.gain_db for r in plan.receivers}
        outside = [z.id for z in plan.zones if z.outside]
        self._outside_zone = outside[0] if outside else "outside"
        self._outside_ids = set(outside)
        self._subjects: dict[str, _Subject] = {}
        self._beacon_heard: dict[str, float] = {}
        self._unknown_receiver = 0
        self._unknown_names: list[str] = []
        self._last_prune = 0.0

    def update(self, sightings: Sequence[Sighting], now: float | None = None) -> list[ZoneEstimate]:
        """Fold in a batch of sightings; one estimate per non-beacon subject heard in it (`now` unused)."""
        touched: dict[str, float] = {}
        tau = self._cfg.smoothing_s
        for s in sightings:
            gain = self._gain.get(s.receiver)
            if gain is None:
                self._unknown_receiver += 1
                _note_unknown(self._unknown_names, s.receiver)
                continue
            if s.subject.startswith("beacon:"):
                self._beacon_heard[s.receiver] = max(s.ts, self._beacon_heard.get(s.receiver, 0.0))
                continue
            rssi = s.rssi + gain + (REFERENCE_RSSI_1M - s.ref_rssi)
            subj = self._subjects.get(s.subject)
            if subj is None:
                subj = self._subjects[s.subject] = _Subject()
            link = subj.links.get(s.receiver)
            if link is None:
                subj.links[s.receiver] = _Link(rssi, s.ts)
            else:
                dt = max(0.0, s.ts - link.last)
                if dt > self._cfg.stale_s:
                    link.rssi = rssi
                else:
                    alpha = 1.0 - math.exp(-dt / tau) if dt > 0 else 0.2
                    link.rssi += alpha * (rssi - link.rssi)
                link.last = max(link.last, s.ts)
            subj.last = max(subj.last, s.ts)
            touched[s.subject] = subj.last
        out = [self._decide(subject, ts) for subject, ts in touched.items()]
        if touched:
            self._prune(max(touched.values()))
        return out

    def _decide(self, subject: str, ts: float) -> ZoneEstimate:
        subj = self._subjects[subject]
        fresh = {rx: ln for rx, ln in subj.links.items() if ts - ln.last <= self._cfg.stale_s}
        best_rx = max(fresh, key=lambda rx: fresh[rx].rssi)
        current = subj.current
        if (
            current is None
            or current not in fresh
            or fresh[best_rx].rssi > fresh[current].rssi + self._cfg.hysteresis_db
        ):
            subj.current = current = best_rx
        # Inside or out is decided by the best signal, as documented: hysteresis may keep a weaker
        # current receiver, but that must not put a subject outside while another hears it well.
        best = fresh[best_rx].rssi
        if best < self._cfg.inside_min_rssi:
            return ZoneEstimate(ts, subject, self._outside_zone, False, best)
        zone = self._zone_of[current]
        return ZoneEstimate(ts, subject, zone, zone not in self._outside_ids, fresh[current].rssi)

    def relabel(self, old: str, new: str) -> bool:
        """Carry `old`'s smoothed levels on as `new`, if `new` is not tracked yet (see HmmEstimator.relabel)."""
        subj = self._subjects.get(old)
        if subj is None or new in self._subjects:
            return False
        self._subjects[new] = self._subjects.pop(old)
        return True

    def shift(self, by: float) -> None:
        """Move every time held forward by `by` seconds (a clock step, `Gateway.shift`): smoothed levels go on."""
        for subj in self._subjects.values():
            subj.last += by
            for link in subj.links.values():
                link.last += by
        self._beacon_heard = {rx: t + by for rx, t in self._beacon_heard.items()}
        self._last_prune += by

    def _prune(self, now: float) -> None:
        if now - self._last_prune < 30.0:
            return
        self._last_prune = now
        for subject in [k for k, v in self._subjects.items() if now - v.last > FORGET_AFTER_S]:
            del self._subjects[subject]

    def diagnostics(self) -> dict[str, Any]:
        """Subjects tracked, sightings from receivers not in the plan, last beacon heard per receiver."""
        return {
            "estimator": "strongest-receiver",
            "resolution": "receiver-zones",
            "subjects": len(self._subjects),
            "unknown_receiver_sightings": self._unknown_receiver,
            "unknown_receivers": list(self._unknown_names),
            "beacon_last_heard": dict(self._beacon_heard),
        }


# =========================================================================== the HMM estimator

F32 = npt.NDArray[np.float32]

MEAN_BODY_LOSS_DB = 3.0
"""A carrier's body costs 0-6 dB by heading; on average about 3 (docs/estimation.md)."""
OFFSET_SIGMA_DB = 1.5
"""Spread of a subject's common offset (phone model, body, pocket), marginalised in the emissions each second, around
what the subject's earlier seconds taught of it (`_learn_offsets`; before any lesson, around 0).

Narrower than the ±3 dB between phone models: the offset is integrated out anew every second, so a wider
prior lets a uniform drop of every reading (a glass front) pass as a weak phone second after second; 1.5 dB
was measured best on the supermarket (inside/outside 91.5 -> 93 %, zone accuracy +1 point; 4 dB: 83 %)."""
OFFSET_TEACH_MARGIN_DB = 10.0
"""A receiver teaches a subject's offset at a cell only where the model expects it this far above the sensitivity:
there it hears nearly every packet, so what it reports is not just the strong tail of a weak level (learning from
every receiver heard, the offsets ran away upwards by 4-17 dB; docs/estimation.md)."""
OFFSET_TEACH_MIN_RX = 2.0
"""A second teaches the offset only from cells where this many teaching receivers heard the subject, and only when
most of the posterior is on such cells and this many teach on average over it: with fewer, where it is and how
strong its phone is cannot be told apart (six receivers on 1,500 m² rarely qualify)."""
OFFSET_LESSON_WEIGHT = 0.2
"""A second's lesson counts for this share of its nominal precision: the static shadowing, the heading and the
drifting shadow of a place repeat second after second, so the seconds are not independent evidence."""
OFFSET_FLOOR_DB = 0.7
"""The belief about a subject's offset never narrows below this spread, dB."""
OFFSET_MEMORY_S = 600.0
"""Time constant with which an offset belief's mean returns to the prior's 0 in seconds without a lesson (its spread
returns to OFFSET_SIGMA_DB with half of it), s."""
TELEPORT = 1e-6
"""Share of probability spread evenly every second, so a wrong belief can recover from any start
(1e-6 rather than 1e-9: zone changes are reported about 0.15 s sooner for 0.2 points of zone accuracy)."""
REORDER_S = 1.0
"""A second is decided once data time is this far past its end (late remote sightings still count)."""
FORGET_S = 90.0
"""An HMM subject not heard for this long is dropped (the visit tracker has ended it by then)."""
PRUNE_EVERY_S = 30.0
DOOR_RADIUS_M = 2.5
"""Cells this close to one of the plan's doors may pass between inside and outside zones."""
SENSITIVITY_DBM = -95.0
"""Typical receiver sensitivity: weaker packets are never reported (censoring, docs/estimation.md)."""
PACKET_SIGMA_DB = 5.0
"""Spread of one packet's RSSI around the model (fading and shadowing), for the chance it is heard at all."""
MAX_MISS_PACKETS = 2.0
"""Non-detection evidence is capped at this many packets' worth per second (not overconfident)."""
RECEIVER_SILENT_S = 10.0
"""A receiver that reported nothing at all (not even a beacon) for this long is down: its silence says nothing."""
SURE_OFFSET_SIGMA_DB = 3.0
"""Spread of a subject's common offset when asking whether a place outside could explain its signals: the
±3 dB between phone models, wider than OFFSET_SIGMA_DB (the HMM's, whose per-second choice is documented there)."""
SURE_SIGMA_DB = 4.0
"""Spread of a receiver's smoothed level (`smoothing_s`) around the path-loss model: fading is mostly averaged
out over a few seconds, the shadowing of the place (5-6 dB, static for a still subject) is not."""
SURE_MARGIN = 5.0
"""An inside estimate is *sure* when the best inside place explains the smoothed levels better than the best
outside place by this much (natural log of the likelihood ratio, about 150:1). Measured (mall unit seeds 1-3,
supermarket seed 1; seconds per reported visit above the margin): with 5, pedestrians at the window that the HMM
put inside had at most 6 such seconds, shoppers at least 14 (4: 17 and 25; 6: 5 and 1; docs/estimation.md)."""
SURE_FRESH_S = 10.0
"""Only receivers that heard the subject in the last this many seconds count toward the sure margin: an old
level says where the subject was, not where it is."""
SWITCH_MARGIN = 0.1
"""The reported zone changes when another zone's probability exceeds the current one's by this much.
Measured on the supermarket (seeds 1-3, median zone-change delay / path edit distance): 0: 4.8 s / 17.0;
0.1: 4.8 s / 13.3; 0.2: 5.0 s / 11.4; 0.3: 5.2 s / 9.9, zone accuracy within 0.2 points of each other."""


def wall_loss(ax: F32, ay: F32, bx: float, by: float, walls: Sequence[tuple[float, float, float, float, float]]) -> F32:
    """Summed loss (dB) of the wall segments each straight path a→b crosses."""
    total = np.zeros(np.shape(ax), dtype=np.float32)
    dx, dy = bx - ax, by - ay
    for x1, y1, x2, y2, loss in walls:
        wx, wy = x2 - x1, y2 - y1
        s1 = wx * (ay - y1) - wy * (ax - x1)
        s2 = wx * (by - y1) - wy * (bx - x1)
        s3 = dx * (y1 - ay) - dy * (x1 - ax)
        s4 = dx * (y2 - ay) - dy * (x2 - ax)
        total += np.where((s1 * s2 < 0) & (s3 * s4 < 0), np.float32(loss), np.float32(0))
    return total


def plan_walls(plan: PlanConfig) -> list[tuple[float, float, float, float, float]]:
    """The plan's walls as segments (x1, y1, x2, y2, loss dB)."""
    pairs = [(a, b, w.loss_db) for w in plan.walls for a, b in zip(w.points, w.points[1:], strict=False)]
    return [(a[0], a[1], b[0], b[1], loss) for a, b, loss in pairs]


def expected_rssi(plan: PlanConfig, path_loss_exponent: float, x: F32, y: F32) -> F32:
    """The HMM's model mean: expected RSSI (dBm) at every receiver of a -59 dBm-at-1-m transmitter carried at
    (x, y), shape (receivers, points): log-distance path loss (distance at least 1 m), minus the walls the
    straight path crosses, minus the average body loss. gateway/survey.py measures residuals against this."""
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.float32)
    walls = plan_walls(plan)
    mu = np.empty((len(plan.receivers), len(x)), dtype=np.float32)
    for i, r in enumerate(plan.receivers):
        assert r.position is not None
        d = np.maximum(np.hypot(x - r.position[0], y - r.position[1]), 1.0)
        loss = 10 * path_loss_exponent * np.log10(d) + wall_loss(x, y, r.position[0], r.position[1], walls)
        mu[i] = REFERENCE_RSSI_1M - MEAN_BODY_LOSS_DB - loss
    return mu


class HmmEstimator:
    """Zones from a hidden Markov model over a grid on the store plan, for all subjects at once.

    No I/O; time comes from the sightings and `now`. See docs/estimation.md for the model, and the
    module docstring of the baseline above for the estimator it replaces.
    """

    def __init__(self, plan: PlanConfig, cfg: EstimateConfig, survey: SurveyMap | None = None) -> None:
        if not plan.has_geometry():
            raise ValueError("the HMM estimator needs a polygon for every zone and a position for every receiver")
        self._plan = plan
        self._plain_cfg = self._cfg = cfg
        self._lag = cfg.lag_s
        self._rx_index = {r.id: i for i, r in enumerate(plan.receivers)}
        self._gain = np.array([r.gain_db for r in plan.receivers], dtype=np.float32)
        self._rx_zone = [r.zone for r in plan.receivers]
        self.zone_ids = [z.id for z in plan.zones]
        self._zone_inside = np.array([not z.outside for z in plan.zones])
        self.receivers = len(plan.receivers)
        self.resolution = "zones" if self.receivers > 1 else "inside-outside"
        # The grid: cell centres over the plan's bounding box, each in the first zone that holds it.
        pts = [c for z in plan.zones for c in z.polygon]
        x0, y0 = min(p[0] for p in pts), min(p[1] for p in pts)
        x1, y1 = max(p[0] for p in pts), max(p[1] for p in pts)
        h = max(1, math.ceil((y1 - y0) / cfg.cell_m))
        w = max(1, math.ceil((x1 - x0) / cfg.cell_m))
        self._shape = (h, w)
        gy, gx = np.meshgrid(
            y0 + (np.arange(h, dtype=np.float32) + 0.5) * cfg.cell_m,
            x0 + (np.arange(w, dtype=np.float32) + 0.5) * cfg.cell_m,
            indexing="ij",
        )
        cx, cy = gx.reshape(-1), gy.reshape(-1)
        zone = np.full(h * w, -1, dtype=np.int64)
        for i, z in enumerate(plan.zones):
            hit = (zone < 0) & points_in_polygon(cx, cy, z.polygon)
            zone[hit] = i
        for i, z in enumerate(plan.zones):  # a zone narrower than a cell still gets the cell nearest its centre
            if not np.any(zone == i):
                zx = sum(p[0] for p in z.polygon) / len(z.polygon)
                zy = sum(p[1] for p in z.polygon) / len(z.polygon)
                zone[int(np.argmin((cx - zx) ** 2 + (cy - zy) ** 2))] = i
        # From here on only the cells inside some zone are kept: every array is (…, cells).
        grid = np.full(h * w, -1, dtype=np.int64)
        valid = np.nonzero(zone >= 0)[0]
        grid[valid] = np.arange(len(valid))
        cx, cy, zone = cx[valid], cy[valid], zone[valid]
        self._cell_zone = zone
        self.cells = len(valid)
        onehot = np.zeros((self.cells, len(plan.zones)), dtype=np.float32)
        onehot[np.arange(self.cells), zone] = 1.0
        self._onehot = onehot
        self._cx, self._cy = cx, cy
        self._nb, self._kernel = self._motion(plan, cfg, grid, valid, h, w)
        self._norm = self._kernel.sum(axis=1).astype(np.float32)
        # Expected RSSI per receiver and cell, for a -59 dBm-at-1-m transmitter (path loss, walls, body), plus
        # what a site survey learned of the store's static shadowing and the receivers' offsets (gateway/survey.py).
        # The sure-inside test keeps the plain model: a survey maps the inside only, so with its correction inside
        # cells would fit any pattern better than outside cells, which it does not reach (docs/survey.md).
        self._mu_plain = expected_rssi(plan, cfg.path_loss_exponent, cx, cy)
        self._survey: SurveyMap | None = None
        self.use_survey(survey)  # sets _mu, _pdet and _cfg
        self._rx_pos = [r.position for r in plan.receivers]
        self._prior = np.full(self.cells, 1.0 / self.cells, dtype=np.float32)
        # Per subject (rows 0..n-1 are live).
        self._rows: dict[str, int] = {}
        self._names: list[str] = []
        cap = 64
        self._alpha = np.zeros((cap, self.cells), dtype=np.float32)
        self._ring_alpha = np.zeros((self._lag + 1, cap, self.cells), dtype=np.float32)
        self._ring_emit = np.ones((self._lag + 1, cap, self.cells), dtype=np.float32)
        self._ring_heard: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]] = [
            (np.zeros(0, np.int64), np.zeros(0)) for _ in range(self._lag + 1)
        ]
        self._level = np.full((cap, self.receivers), np.nan, dtype=np.float32)
        self._last = np.zeros(cap, dtype=np.float64)
        self._zone_now = np.full(cap, -1, dtype=np.int64)
        self._heard_at = np.full((cap, self.receivers), -np.inf, dtype=np.float64)  # second each level was last fed
        # Each subject's common offset as learned so far (`_learn_offsets`): mean and variance, dB and dB².
        self._off_mean = np.zeros(cap, dtype=np.float32)
        self._off_var = np.full(cap, OFFSET_SIGMA_DB**2, dtype=np.float32)
        self._cell_inside = self._zone_inside[self._cell_zone]
        self._rx_last = np.full(self.receivers, -np.inf)
        # Sightings waiting for their second to be decided: second, row, receiver, normalised RSSI, ts.
        self._pending: list[tuple[int, int, int, float, float]] = []
        self._next_sec: int | None = None
        self._last_prune = -math.inf
        self._counts = {
            "sightings": 0,
            "late": 0,
            "unknown_receiver": 0,
            "outliers_clipped": 0,
            "seconds": 0,
            "offset_lessons": 0,
        }
        self._unknown_names: list[str] = []
        self._beacon_heard: dict[str, float] = {}
        self._bands: dict[str, int] = {"near": 0, "mid": 0, "far": 0}

    # ------------------------------------------------------------------ model pieces

    def use_survey(self, survey: SurveyMap | None) -> None:
        """Use a site survey's map from the next second on (None: the plain model); subjects keep their state.

        SurveyError when the map was fitted for another plan or path-loss exponent."""
        cfg = self._plain_cfg
        mu = self._mu_plain
        if survey is not None:
            survey.check_compatible(self._plan, cfg)
            mu = (mu + survey.correction(self._cx, self._cy)).astype(np.float32)
            if cfg.surveyed_sigma_db is not None:
                # With the static shadowing learned, less of a second's spread is left unexplained (docs/survey.md).
                cfg = cfg.model_copy(update={"sigma_db": cfg.surveyed_sigma_db})
        # Chance that one packet from a cell reaches each receiver above its sensitivity (for non-detection).
        margin = (mu - SENSITIVITY_DBM) / np.float32(PACKET_SIGMA_DB)
        self._pdet = (1.0 - 0.5 * erfc(margin / math.sqrt(2.0))).astype(np.float32)
        # Packets below a receiver's sensitivity are never reported. The likelihood of what was reported is
        # still the plain model density (censored data), and the packets that were not reported are the
        # non-detection term in _emission; using the mean of the truncated distribution instead made far
        # cells fit weak readings too well (measured: supermarket inside/outside 87 -> 91 % without it).
        self._mu = mu
        # Which receivers teach a subject's offset at which cell (1.0) and which do not (0.0), (receivers, cells);
        # a plan where no cell has enough of them never learns one (`_learn_offsets`).
        self._teach_w = (mu >= np.float32(SENSITIVITY_DBM + OFFSET_TEACH_MARGIN_DB)).astype(np.float32)
        self._can_teach = bool(self._teach_w.sum(axis=0).max() >= OFFSET_TEACH_MIN_RX)
        self._cfg = cfg
        self._survey = survey

    def _motion(
        self,
        plan: PlanConfig,
        cfg: EstimateConfig,
        grid: npt.NDArray[np.int64],
        valid: npt.NDArray[np.int64],
        h: int,
        w: int,
    ) -> tuple[npt.NDArray[np.int64], F32]:
        """Neighbours of every cell within one second's walk and their Gaussian weights (symmetric).

        Moves between an inside and an outside zone are allowed only between cells near a door when the
        plan lists doors: people cross a shop front at its doors, not through the glass.
        """
        reach = max(1, math.ceil(cfg.walk_mps / cfg.cell_m))
        s = max(cfg.walk_mps * 0.67, 0.3)
        offsets = [(dj, di) for dj in range(-reach, reach + 1) for di in range(-reach, reach + 1)]
        gj, gi = valid // w, valid % w
        inside = self._zone_inside[self._cell_zone]
        door = np.zeros(self.cells, dtype=np.bool_)
        for dx, dy in plan.doors:
            door |= np.hypot(self._cx - dx, self._cy - dy) <= DOOR_RADIUS_M
        if not plan.doors:
            door[:] = True
        nb = np.zeros((self.cells, len(offsets)), dtype=np.int64)
        kernel = np.zeros((self.cells, len(offsets)), dtype=np.float32)
        for k, (dj, di) in enumerate(offsets):
            j, i = gj + dj, gi + di
            ok = (j >= 0) & (j < h) & (i >= 0) & (i < w)
            other = np.where(ok, grid[np.clip(j, 0, h - 1) * w + np.clip(i, 0, w - 1)], -1)
            ok &= other >= 0
            o = np.maximum(other, 0)
            ok &= (inside == inside[o]) | (door & door[o])
            nb[:, k] = np.where(ok, o, np.arange(self.cells))
            kernel[:, k] = np.where(ok, math.exp(-((dj * dj + di * di) * cfg.cell_m**2) / (2 * s * s)), 0.0)
        return nb, kernel

    def _forward(self, a: F32) -> F32:
        """Predict one second ahead: row-normalised motion plus a little teleport."""
        out: F32 = np.einsum("ncj,cj->nc", (a / self._norm)[:, self._nb], self._kernel)
        out *= np.float32(1 - TELEPORT)
        out += np.float32(TELEPORT) * self._prior * a.sum(axis=1, keepdims=True)
        return out

    def _backward(self, b: F32) -> F32:
        """The transposed motion step, for the backward pass of fixed-lag smoothing."""
        out: F32 = np.einsum("ncj,cj->nc", b[:, self._nb], self._kernel) / self._norm
        out *= np.float32(1 - TELEPORT)
        out += np.float32(TELEPORT) * (b * self._prior).sum(axis=1, keepdims=True)
        return out

    def _emission(
        self,
        rows: npt.NDArray[np.int64],
        obs: F32,
        heard: npt.NDArray[np.bool_],
        packets: F32,
        alive: npt.NDArray[np.bool_],
    ) -> tuple[F32, tuple[F32, F32] | None]:
        """Likelihood of each cell given one second's RSSI per receiver (rows, receivers), scaled to max 1.

        A residual costs its Gaussian square up to 3 sigma and grows linearly beyond (Huber): robust to a deep
        fade or a reflection, yet a place from which a receiver could not hear the subject at all is not
        excused for a strong reading there. (A flat cost beyond 3 sigma, as before, did excuse it, and the
        common offset then absorbed the clipped residuals: on the supermarket with every channel impairment off,
        a sidewalk cell 15 m from the door, where every receiver expects -102 to -139 dBm, explained readings
        of -80/-89/-82 dBm within 2 nats of the shopper's true cell, and shoppers who came in at the side door
        stayed "outside" for minutes: zone accuracy 82.8 % with sigma_db 1.5, 95.0 % with the linear tail.)
        A common offset per subject (its phone's power, its body) is integrated out over the clipped residuals,
        so the pattern across receivers counts more than the absolute level; receivers that did not hear the
        subject that second add nothing to this part. The offset's prior is what the subject's earlier seconds
        taught (`_learn_offsets`). Also returns, per (row, cell), the teaching receivers' summed residuals and
        their count, for that.
        """
        spread = np.sqrt(self._off_var[rows])
        ll, teach = self._offset_ll(
            obs, heard, self._cfg.sigma_db, spread, huber=True, centre=self._off_mean[rows], teach=True
        )
        # A working receiver that heard none of the packets others heard this second: unlikely near it.
        # (Poisson: P(0 of m packets) = exp(-m p), p the chance one packet from the cell reaches it.)
        m = np.minimum(packets, np.float32(MAX_MISS_PACKETS))
        for r in range(self.receivers):
            if not alive[r]:
                continue
            deaf = np.nonzero(~heard[:, r])[0]
            if len(deaf):
                ll[deaf] -= m[deaf, None] * self._pdet[r][None, :]
        ll -= ll.max(axis=1, keepdims=True)
        out: F32 = np.exp(ll).astype(np.float32)
        return out, teach

    def _learn_offsets(self, rows: npt.NDArray[np.int64], post: F32, teach: tuple[F32, F32]) -> None:
        """Fold one second into each row's belief about its offset (a Gaussian, mean and variance).

        `teach` holds per (row, cell) the summed residuals (against the belief's mean) of the receivers that
        teach there (`OFFSET_TEACH_MARGIN_DB`) and their count. Only cells with at least OFFSET_TEACH_MIN_RX
        teachers count, and a row learns only when most of its filtered posterior `post` is on them and it has
        that many teachers on average over the posterior: with fewer, a weaker phone and a longer distance look
        alike (either condition alone let a pedestrian's offset be learned into a visit: supermarket seed 2).
        Weighted by `post` over those cells, the lesson is the mean residual, its variance that of a mean of that
        many readings plus how much the cells disagree, divided by OFFSET_LESSON_WEIGHT; it is folded in by
        precision. A row heard without a lesson relaxes towards the prior instead (an Ornstein-Uhlenbeck step: the
        mean with OFFSET_MEMORY_S, the variance with half of it); no belief narrows below OFFSET_FLOOR_DB.
        """
        total, count = teach
        weight = post * (count >= np.float32(OFFSET_TEACH_MIN_RX))
        mass = weight.sum(axis=1)
        taught = (mass >= np.float32(0.5)) & ((post * count).sum(axis=1) >= np.float32(OFFSET_TEACH_MIN_RX))
        mean_v = self._off_mean[rows]
        var_v = self._off_var[rows]
        if taught.any():
            w = weight[taught] / mass[taught, None]
            n = np.maximum(count[taught], 1.0)
            shift = total[taught] / n
            lesson = (w * shift).sum(axis=1)
            lesson_var = (w * (np.float32(self._cfg.sigma_db**2) / n + shift * shift)).sum(axis=1) - lesson**2
            lesson_var = np.maximum(lesson_var, np.float32(1e-3)) / np.float32(OFFSET_LESSON_WEIGHT)
            gain = var_v[taught] / (var_v[taught] + lesson_var)
            mean_v[taught] += gain * lesson
            var_v[taught] *= 1 - gain
            self._counts["offset_lessons"] += int(taught.sum())
        rho = np.float32(math.exp(-1.0 / OFFSET_MEMORY_S))
        idle = ~taught
        mean_v[idle] *= rho
        var_v[idle] = rho * rho * var_v[idle] + (1 - rho * rho) * np.float32(OFFSET_SIGMA_DB**2)
        self._off_mean[rows] = mean_v
        self._off_var[rows] = np.maximum(var_v, np.float32(OFFSET_FLOOR_DB**2))

    # ------------------------------------------------------------------ rows

    def _grow(self) -> None:
        cap = self._alpha.shape[0] * 2
        self._alpha = _resize(self._alpha, cap, 0.0)
        self._ring_alpha = np.stack([_resize(a, cap, 0.0) for a in self._ring_alpha])
        self._ring_emit = np.stack([_resize(a, cap, 1.0) for a in self._ring_emit])
        self._level = _resize(self._level, cap, np.nan)
        self._last = _resize(self._last, cap, 0.0)
        self._zone_now = _resize(self._zone_now, cap, -1)
        self._heard_at = _resize(self._heard_at, cap, -np.inf)
        self._off_mean = _resize(self._off_mean, cap, 0.0)
        self._off_var = _resize(self._off_var, cap, OFFSET_SIGMA_DB**2)

    def _row(self, subject: str) -> int:
        row = self._rows.get(subject)
        if row is None:
            row = len(self._names)
            if row >= self._alpha.shape[0]:
                self._grow()
            self._rows[subject] = row
            self._names.append(subject)
            self._alpha[row] = self._prior
            self._level[row] = np.nan
            self._last[row] = -math.inf
            self._zone_now[row] = -1
            self._heard_at[row] = -np.inf
            self._off_mean[row] = 0.0
            self._off_var[row] = OFFSET_SIGMA_DB**2
        return row

    def _prune(self, now: float) -> None:
        """Drop subjects not heard for FORGET_S; live rows are compacted to the front."""
        if now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        n = len(self._names)
        keep = np.nonzero(self._last[:n] >= now - FORGET_S)[0]
        if len(keep) == n:
            return
        new_of = np.full(n, -1, dtype=np.int64)
        new_of[keep] = np.arange(len(keep))
        for arr in (
            self._alpha,
            self._level,
            self._last,
            self._zone_now,
            self._heard_at,
            self._off_mean,
            self._off_var,
        ):
            arr[: len(keep)] = arr[keep]
        for ring in (self._ring_alpha, self._ring_emit):
            ring[:, : len(keep)] = ring[:, keep]
            ring[:, len(keep) : n] = 1.0 if ring is self._ring_emit else 0.0
        self._names = [self._names[i] for i in keep.tolist()]
        self._rows = {name: i for i, name in enumerate(self._names)}
        self._ring_heard = [(new_of[rows][new_of[rows] >= 0], ts[new_of[rows] >= 0]) for rows, ts in self._ring_heard]
        self._pending = [(k, int(new_of[r]), rx, v, t) for k, r, rx, v, t in self._pending if new_of[r] >= 0]

    # ------------------------------------------------------------------ the stage

    def update(self, sightings: Sequence[Sighting], now: float | None = None) -> list[ZoneEstimate]:
        """Fold in sightings; return the estimates of every second decided by `now` (each `lag_s` late).

        One estimate per subject and second in which it was heard, dated in that second. A second is
        decided once data time passes its end by REORDER_S, so the result does not depend on how the
        sightings were batched.
        """
        idx, gain = self._rx_index, self._gain
        newest = -math.inf
        for s in sightings:
            r = idx.get(s.receiver)
            if r is None:
                self._counts["unknown_receiver"] += 1
                _note_unknown(self._unknown_names, s.receiver)
                continue
            k = math.floor(s.ts)
            if s.ts > self._rx_last[r]:
                self._rx_last[r] = s.ts
            if s.subject.startswith("beacon:"):
                self._beacon_heard[s.receiver] = max(s.ts, self._beacon_heard.get(s.receiver, 0.0))
                continue
            newest = max(newest, s.ts)
            if self._next_sec is not None and k < self._next_sec:
                self._counts["late"] += 1
                continue
            value = s.rssi + float(gain[r]) + (REFERENCE_RSSI_1M - s.ref_rssi)
            row = self._row(s.subject)
            if s.ts > self._last[row]:
                self._last[row] = s.ts  # heard: not to be pruned before its second is decided
            self._pending.append((k, row, r, value, s.ts))
        self._counts["sightings"] += len(sightings)
        if now is None:
            now = newest
        if not math.isfinite(now):
            return []
        if self._next_sec is None:
            if not self._pending:
                return []
            self._next_sec = min(p[0] for p in self._pending)
        out: list[ZoneEstimate] = []
        decide_to = math.floor(now - REORDER_S)  # seconds < decide_to are complete
        if decide_to > self._next_sec + 3600:  # a long silence: skip ahead instead of stepping through it
            # First decide every second heard before it, then lag + 1 quiet seconds after the last of them, so the
            # ring of the last lag seconds holds nothing of them when the steps go on after the skip: else they would
            # come out again dated after it, and the visit tracker would stretch a visit over the hours no one was
            # heard. (A live clock's step does not come here: the gateway moves the estimator's times with it,
            # `shift`; data that itself jumps by an hour or more, as a recording with a gap, does.)
            gap_from = decide_to - 3600
            heard_to = max((p[0] for p in self._pending if p[0] < gap_from), default=self._next_sec - 1)
            while self._next_sec <= heard_to + self._lag + 1:
                out += self._step(self._next_sec)
                self._next_sec += 1
            self._next_sec = max(self._next_sec, decide_to - self._lag - 1)
            stray = [p for p in self._pending if p[0] < self._next_sec]  # dated in the silence itself: late
            if stray:
                self._counts["late"] += len(stray)
                self._pending = [p for p in self._pending if p[0] >= self._next_sec]
        while self._next_sec < decide_to:
            out += self._step(self._next_sec)
            self._next_sec += 1
        self._prune(now)
        return out

    def _step(self, k: int) -> list[ZoneEstimate]:
        n = len(self._names)
        self._counts["seconds"] += 1
        due = [p for p in self._pending if p[0] == k]
        if due:
            self._pending = [p for p in self._pending if p[0] != k]
        slot = k % (self._lag + 1)
        alpha = self._alpha[:n]
        if n:
            alpha[:] = self._forward(alpha)
        emit = self._ring_emit[slot]
        emit[:n] = 1.0
        rows = np.zeros(0, dtype=np.int64)
        last_ts = np.zeros(0)
        if due:
            arr = np.array([(r, rx, v, t) for _, r, rx, v, t in due], dtype=np.float64)
            key = arr[:, 0].astype(np.int64) * self.receivers + arr[:, 1].astype(np.int64)
            keys, inv = np.unique(key, return_inverse=True)
            mean = (np.bincount(inv, arr[:, 2]) / np.bincount(inv)).astype(np.float32)
            krow, krx = keys // self.receivers, keys % self.receivers
            rows, rinv = np.unique(krow, return_inverse=True)
            last_ts = np.full(len(rows), -np.inf)
            np.maximum.at(last_ts, np.searchsorted(rows, arr[:, 0].astype(np.int64)), arr[:, 3])
            obs = np.zeros((len(rows), self.receivers), dtype=np.float32)
            heard = np.zeros((len(rows), self.receivers), dtype=np.bool_)
            # Outlier rejection per (subject, receiver): clip the second's mean to the smoothed level ± outlier_db.
            level = self._level[krow, krx]
            lim = np.float32(self._cfg.outlier_db)
            known = ~np.isnan(level)
            clipped = np.where(known, np.clip(mean, level - lim, level + lim), mean)
            self._counts["outliers_clipped"] += int(np.count_nonzero(clipped != mean))
            obs[rinv, krx] = clipped
            heard[rinv, krx] = True
            a = np.float32(1 - math.exp(-1.0 / self._cfg.smoothing_s))
            self._level[krow, krx] = np.where(known, level + a * (clipped - level), clipped)
            self._heard_at[krow, krx] = k
            counts = np.bincount(inv).astype(np.float32)
            packets = np.zeros(len(rows), dtype=np.float32)
            np.maximum.at(packets, rinv, counts)
            alive = self._rx_last >= k - RECEIVER_SILENT_S
            e, teach = self._emission(rows, obs, heard, packets, alive)
            emit[rows] = e
            alpha[rows] *= e
            alpha[rows] /= np.maximum(alpha[rows].sum(axis=1, keepdims=True), np.float32(1e-30))
            if teach is not None:
                self._learn_offsets(rows, alpha[rows], teach)
            self._last[rows] = np.maximum(self._last[rows], last_ts)
        self._ring_alpha[slot, :n] = alpha
        self._ring_heard[slot] = (rows, last_ts)
        # Fixed-lag smoothing: the second k - lag, seen with the evidence up to k.
        out_slot = (k - self._lag) % (self._lag + 1)
        out_rows, out_ts = self._ring_heard[out_slot]
        if not len(out_rows) or k - self._lag < 0:
            return []
        beta = np.ones((len(out_rows), alpha.shape[1]), dtype=np.float32)
        for j in range(k, k - self._lag, -1):
            beta = self._backward(self._ring_emit[j % (self._lag + 1)][out_rows] * beta)
            beta /= np.maximum(beta.max(axis=1, keepdims=True), np.float32(1e-30))
        gamma = self._ring_alpha[out_slot][out_rows] * beta
        zp = gamma @ self._onehot
        zp /= np.maximum(zp.sum(axis=1, keepdims=True), np.float32(1e-30))
        return self._decide(k - self._lag, out_rows, out_ts, zp, gamma)

    def _decide(
        self, sec: int, rows: npt.NDArray[np.int64], ts: npt.NDArray[np.float64], zp: F32, gamma: F32
    ) -> list[ZoneEstimate]:
        inside_p = zp[:, self._zone_inside].sum(axis=1)
        inside = inside_p >= 0.5
        masked = np.where(self._zone_inside[None, :] == inside[:, None], zp, -1.0)
        zone = masked.argmax(axis=1)
        # Hysteresis on the decision: keep the current zone unless another is clearly more likely.
        cur = self._zone_now[rows]
        has = cur >= 0
        keep = has & (self._zone_inside[np.maximum(cur, 0)] == inside)
        keep &= zp[np.arange(len(rows)), np.maximum(cur, 0)] + SWITCH_MARGIN > zp[np.arange(len(rows)), zone]
        zone = np.where(keep, cur, zone)
        self._zone_now[rows] = zone
        best = np.nanmax(self._level[rows], axis=1)
        sure = (inside & self._outside_explains_less(rows, sec + self._lag)).tolist()
        out: list[ZoneEstimate] = []
        single = self.receivers == 1
        post = gamma / np.maximum(gamma.sum(axis=1, keepdims=True), np.float32(1e-30))
        mx, my = post @ self._cx, post @ self._cy  # posterior mean position and its spread
        sd = np.sqrt(np.maximum(post @ (self._cx**2 + self._cy**2) - mx * mx - my * my, 0.0))
        px, py, psd = mx.tolist(), my.tolist(), sd.tolist()
        if single:
            pos = self._rx_pos[0]
            assert pos is not None
            dist = post @ np.hypot(self._cx - pos[0], self._cy - pos[1])
        for i, row in enumerate(rows.tolist()):
            name = self._names[row]
            zid = self.zone_ids[int(zone[i])]
            if single and inside[i]:
                zid = self._rx_zone[0]  # one receiver tells inside from outside and distance, not zones
                band = "near" if dist[i] < 3 else ("mid" if dist[i] < 8 else "far")
                self._bands[band] += 1
            x, y = round(px[i], 2), round(py[i], 2)
            out.append(
                ZoneEstimate(
                    float(sec) + 0.5, name, zid, bool(inside[i]), float(best[i]), x, y, round(psd[i], 2), sure[i]
                )
            )
        return out

    def _outside_explains_less(self, rows: npt.NDArray[np.int64], now: int) -> npt.NDArray[np.bool_]:
        """Per row: no outside place explains the smoothed levels nearly as well as the best inside place.

        The forward filter adds each second's evidence as if it were new, but a subject standing still keeps
        the same shadowing and the same body loss second after second: a pedestrian facing the shop window
        (no body between phone and receivers, +3 dB on every one) in a spot a few dB up looks like someone
        just inside, and the filter grows certain of it (mall unit: about half of the window stoppers were put
        inside, 1.2 % of all pedestrians became visits, a third of all visits). This test looks at one
        moment only, the levels smoothed over `smoothing_s` from receivers that heard the subject in the last
        SURE_FRESH_S, with a phone-model-wide offset prior, and asks whether the best inside cell beats the
        best outside cell by SURE_MARGIN. Without outside zones in the plan every inside estimate is sure, and
        so is every one with a single receiver: one level against a phone-model-wide offset fits a place on
        either side of the glass almost equally (small-shop, seed 2: visit recall 1.0 -> 0.53 with the test).
        The plain path-loss model is used, without a site survey's correction: the survey maps the inside only, so
        corrected inside cells would fit any pattern better than outside cells (pedestrians at the supermarket's
        window became visits: seed 1, 3-m survey, 0.9 % of pass-bys, 0 with the plain model; docs/survey.md).
        """
        out = np.ones(len(rows), dtype=np.bool_)
        outside = ~self._cell_inside
        if not len(rows) or not outside.any() or outside.all() or self.receivers < 2:
            return out
        level = self._level[rows]
        fresh = (self._heard_at[rows] >= now - SURE_FRESH_S) & ~np.isnan(level)
        ll, _ = self._offset_ll(level, fresh, SURE_SIGMA_DB, SURE_OFFSET_SIGMA_DB, huber=False, mu=self._mu_plain)
        margin = ll[:, ~outside].max(axis=1) - ll[:, outside].max(axis=1)
        sure: npt.NDArray[np.bool_] = (margin >= np.float32(SURE_MARGIN)) & fresh.any(axis=1)
        return sure

    def _offset_ll(
        self,
        values: F32,
        used: npt.NDArray[np.bool_],
        sigma_db: float,
        offset_db: float | F32,
        huber: bool,
        centre: F32 | None = None,
        mu: F32 | None = None,
        teach: bool = False,
    ) -> tuple[F32, tuple[F32, F32] | None]:
        """Log-likelihood of every cell for levels per (row, receiver), the `used` ones, against the path-loss
        model, with the row's common offset integrated out (prior mean `centre` per row, default 0; spread
        `offset_db`, one or one per row); residuals Gaussian with `sigma_db`, and with `huber` linear beyond
        3 sigma (see `_emission`). With `teach`, and where some cell has OFFSET_TEACH_MIN_RX teaching receivers,
        also per (row, cell) the summed residuals of the receivers that teach the offset there and their count
        (`_learn_offsets`); else None."""
        sigma2 = np.float32(sigma_db**2)
        tau2 = (np.asarray(offset_db, dtype=np.float32) ** 2).reshape(-1, 1)
        clip = np.float32(3 * sigma_db)
        teach = teach and self._can_teach
        taught = np.zeros((values.shape[0], self.cells), dtype=np.float32) if teach else None
        s1 = np.zeros((values.shape[0], self.cells), dtype=np.float32)
        s2 = np.zeros_like(s1)
        tail = np.zeros_like(s1)
        for r in range(self.receivers):
            rows = np.nonzero(used[:, r])[0]
            if not len(rows):
                continue
            e = values[rows, r, None] - (self._mu if mu is None else mu)[r][None, :]
            if centre is not None:
                e -= centre[rows, None]
            if huber:
                clipped = np.clip(e, -clip, clip)
                tail[rows] += np.abs(e - clipped)
                e = clipped
            s1[rows] += e
            s2[rows] += e * e
            if taught is not None:
                e *= self._teach_w[r]
                taught[rows] += e
        k = used.sum(axis=1).astype(np.float32)[:, None]
        ll: F32 = -(s2 - s1 * s1 * (tau2 / (sigma2 + k * tau2))) / (2 * sigma2)
        if huber:
            ll -= tail * (clip / sigma2)
        if taught is None:
            return ll, None
        return ll, (taught, used.astype(np.float32) @ self._teach_w)

    def offset_belief(self, subject: str) -> tuple[float, float] | None:
        """What the estimator has learned of a tracked subject's common offset (`_learn_offsets`): mean and spread,
        dB (0 and OFFSET_SIGMA_DB before any lesson); None for a subject it does not track."""
        row = self._rows.get(subject)
        if row is None:
            return None
        return float(self._off_mean[row]), math.sqrt(float(self._off_var[row]))

    def shift(self, by: float) -> None:
        """Move every time held forward by `by` whole seconds (a clock step, `Gateway.shift`), as if the seconds
        before it had been dated that much later: the seconds still to be decided, the sightings waiting for them,
        the lag's ring (rotated, so each second keeps its slot), last-heard times and levels' ages. Every subject's
        belief goes on where it was; no second of the jump is ever stepped through."""
        n = round(by)
        if n != by:
            raise ValueError(f"the HMM moves by whole seconds, not {by!r}")
        if self._next_sec is not None:
            self._next_sec += n
        self._pending = [(k + n, row, r, v, t + by) for k, row, r, v, t in self._pending]
        turn = n % (self._lag + 1)  # second k's slot is k % (lag + 1)
        self._ring_alpha = np.roll(self._ring_alpha, turn, axis=0)
        self._ring_emit = np.roll(self._ring_emit, turn, axis=0)
        heard = self._ring_heard[-turn:] + self._ring_heard[:-turn] if turn else list(self._ring_heard)
        self._ring_heard = [(rows, ts + by) for rows, ts in heard]
        self._last += by  # -inf (never heard) stays so
        self._heard_at += n
        self._rx_last += by
        self._beacon_heard = {rx: t + by for rx, t in self._beacon_heard.items()}
        self._last_prune += by

    def relabel(self, old: str, new: str) -> bool:
        """Carry `old`'s state on as `new` (a member recognised on an address that was anonymous until now).

        Only when `new` is not tracked yet; its sightings still waiting for their second go with it. True
        when relabelled.
        """
        row = self._rows.get(old)
        if row is None or new in self._rows:
            return False
        del self._rows[old]
        self._rows[new] = row
        self._names[row] = new
        return True

    def diagnostics(self) -> dict[str, Any]:
        """Estimator, resolution, grid, subjects tracked, counts, last beacon heard per receiver."""
        d: dict[str, Any] = {
            "estimator": "hmm",
            "resolution": self.resolution,
            "receivers": self.receivers,
            "cells": self.cells,
            "lag_s": self._lag,
            "subjects": len(self._names),
            "unknown_receiver_sightings": self._counts["unknown_receiver"],
            "unknown_receivers": list(self._unknown_names),
            "late_sightings": self._counts["late"],
            "outliers_clipped": self._counts["outliers_clipped"],
            "offset_lessons": self._counts["offset_lessons"],
            "seconds_decided": self._counts["seconds"],
            "beacon_last_heard": dict(self._beacon_heard),
            "sigma_db": self._cfg.sigma_db,
            "survey": None if self._survey is None else self._survey.summary(),
        }
        if self.resolution == "inside-outside":
            d["distance_bands"] = dict(self._bands)
        return d


def _resize(a: Any, cap: int, fill: float) -> Any:
    out = np.full((cap, *a.shape[1:]), fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


Estimator = StrongestReceiver | HmmEstimator


def make_estimator(plan: PlanConfig, cfg: EstimateConfig, survey: SurveyMap | None = None) -> Estimator:
    """The estimator the config asks for: the HMM where the plan has geometry (method auto), else the baseline.

    A site survey map (gateway/survey.py) corrects the HMM's model mean; the baseline has no use for it."""
    if cfg.method == "baseline" or (cfg.method == "auto" and not plan.has_geometry()):
        return StrongestReceiver(plan, cfg)
    return HmmEstimator(plan, cfg, survey)


def erfc(x: Any) -> Any:
    """Complementary error function on arrays (Abramowitz and Stegun 7.1.26, error below 1.5e-7)."""
    z = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    y = poly * np.exp(-z * z)
    return np.where(x >= 0, y, 2.0 - y)
