"""The radio channel: what a receiver hears of a transmitter, computed for many pairs at once.

Received power, in dB, for a transmitter at p heard by receiver r:

    rssi = rssi_1m - 10 n log10(d) - walls(p, r) + S_r(p) + s_r(t) - body + fading + offset_r

* `rssi_1m`: the transmitter's true power at 1 m (beacon TX power, or the phone model's);
* log-distance path loss with exponent n (`radio.path_loss_exponent`), d at least 0.5 m;
* `walls`: the summed loss of every wall segment the straight path crosses;
* `S_r(p)`: spatially correlated shadowing, a Gaussian random field per receiver over the
  plan (white noise smoothed with a Gaussian kernel on a grid, correlation length
  `shadowing_correlation_m`), so a transmitter standing still sees a fixed offset and one
  walking sees it drift as real shelves and fittings would make it;
* `s_r(t)`: a drifting part, AR(1) in time with `shadowing_correlation_s` (people, trolleys,
  doors); the two parts share `shadowing_sigma_db`² by `shadowing_temporal_share`;
* `body`: the carrier's body when it is between the phone and the receiver:
  `body_loss_db · (1 - cos θ) / 2`, θ the angle between where the person faces and the receiver;
* `fading`: Rician fast fading per packet and receiver (K = `fading_k_db`), independent
  between packets because each advertising event hops over three channels;
* `offset_r`: the receiver's RSSI calibration error.

A packet is received when the result reaches the receiver's sensitivity, the receiver was
scanning at that instant (scan window within scan interval, phase fixed per receiver), no
other packet on air at the receiver overlapped it (pure ALOHA over the packets each receiver
can hear, per second: success exp(-2 λ airtime)), and the residual packet loss spares it.
The slow parts are evaluated once per second per transmitter and interpolated to each packet.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from firmware_sim.geometry import wall_loss
from firmware_sim.scenario import Scenario

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]

MIN_DISTANCE_M = 0.5
FIELD_MARGIN_M = 5.0
RSSI_FLOOR = -127
RSSI_CEIL = 20
FADE_HEADROOM_DB = 10.0


def shadow_field(shape: tuple[int, int], res_m: float, corr_m: float, rng: np.random.Generator) -> F64:
    """A zero-mean, unit-σ Gaussian random field on a grid with correlation ρ(d) = exp(-(d/corr_m)²).

    White noise filtered by a Gaussian kernel of σ = corr_m/2 in the frequency domain; the grid
    is padded by two correlation lengths on each side so the FFT's wrap-around does not
    correlate opposite edges. The sample is normalised to exactly zero mean and unit σ.
    """
    pad = math.ceil(2 * corr_m / res_m)
    ny, nx = shape[0] + 2 * pad, shape[1] + 2 * pad
    noise = rng.standard_normal((ny, nx))
    fy = np.fft.fftfreq(ny, d=res_m)[:, None]
    fx = np.fft.rfftfreq(nx, d=res_m)[None, :]
    s = corr_m / 2.0
    transfer = np.exp(-2.0 * math.pi**2 * s**2 * (fx**2 + fy**2))
    field = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=(ny, nx))[pad : pad + shape[0], pad : pad + shape[1]]
    std = float(field.std())
    out: F64 = (field - field.mean()) / (std if std > 0 else 1.0)
    return out


class Channel:
    """Receivers, walls and shadowing fields of one scenario; deterministic for its generators."""

    def __init__(self, scenario: Scenario, field_rng: np.random.Generator, rng: np.random.Generator) -> None:
        radio = scenario.radio
        self.radio = radio
        self._rng = rng
        rx = scenario.receivers
        self.n_rx = len(rx)
        self.rx_x = np.array([r.position[0] for r in rx], dtype=np.float64)
        self.rx_y = np.array([r.position[1] for r in rx], dtype=np.float64)
        self.sensitivity = np.array([r.sensitivity_dbm for r in rx], dtype=np.float64)
        self.offset = np.array([r.offset_db for r in rx], dtype=np.float64)
        self.scan_interval = np.array([r.scan_interval_ms / 1000 for r in rx], dtype=np.float64)
        self.scan_window = np.array([r.scan_window_ms / 1000 for r in rx], dtype=np.float64)
        self.scan_phase = rng.uniform(0, 1, self.n_rx) * self.scan_interval
        segments = [
            (*a, *b, w.loss_db) for w in scenario.walls for a, b in zip(w.points[:-1], w.points[1:], strict=True)
        ]
        table = np.array(segments, dtype=np.float64).reshape(-1, 5)
        self.walls, self.wall_db = table[:, :4], table[:, 4]
        var = radio.shadowing_sigma_db**2
        self.sigma_spatial = math.sqrt(var * (1 - radio.shadowing_temporal_share))
        self.sigma_temporal = math.sqrt(var * radio.shadowing_temporal_share)
        # The field covers everything in the plan plus a margin; outside it the edge value holds.
        xs = [p[0] for z in scenario.zones for p in z.polygon] + [*self.rx_x.tolist()]
        ys = [p[1] for z in scenario.zones for p in z.polygon] + [*self.rx_y.tolist()]
        self.res = min(0.5, radio.shadowing_correlation_m / 3)
        self.x0 = min(xs) - FIELD_MARGIN_M
        self.y0 = min(ys) - FIELD_MARGIN_M
        self.nx = math.ceil((max(xs) + FIELD_MARGIN_M - self.x0) / self.res) + 1
        self.ny = math.ceil((max(ys) + FIELD_MARGIN_M - self.y0) / self.res) + 1
        fields = [
            shadow_field((self.ny, self.nx), self.res, radio.shadowing_correlation_m, field_rng) * self.sigma_spatial
            for _ in range(self.n_rx)
        ]
        self.fields = np.stack(fields) if fields else np.zeros((0, self.ny, self.nx))
        k = 10 ** (radio.fading_k_db / 10)
        self._los = math.sqrt(k / (k + 1))
        self._scatter = math.sqrt(1 / (2 * (k + 1)))

    # ------------------------------------------------------------------ slow parts

    def spatial(self, x: F64, y: F64) -> F64:
        """S_r(p) for every receiver: shape x.shape + (receivers,), bilinear on the grid."""
        fx = np.clip((x - self.x0) / self.res, 0, self.nx - 1.000001)
        fy = np.clip((y - self.y0) / self.res, 0, self.ny - 1.000001)
        ix, iy = fx.astype(np.int64), fy.astype(np.int64)
        ax, ay = (fx - ix)[..., None], (fy - iy)[..., None]
        plane = self.ny * self.nx
        base = (iy * self.nx + ix)[..., None] + (np.arange(self.n_rx) * plane)
        flat = self.fields.reshape(-1)
        v00, v01 = flat[base], flat[base + 1]
        v10, v11 = flat[base + self.nx], flat[base + self.nx + 1]
        out: F64 = (v00 * (1 - ax) + v01 * ax) * (1 - ay) + (v10 * (1 - ax) + v11 * ax) * ay
        return out

    def mean_loss(self, x: F64, y: F64) -> F64:
        """Path loss plus walls, dB (positive), for every receiver: shape x.shape + (receivers,)."""
        xe, ye = x[..., None], y[..., None]
        d = np.maximum(np.hypot(xe - self.rx_x, ye - self.rx_y), MIN_DISTANCE_M)
        loss: F64 = 10 * self.radio.path_loss_exponent * np.log10(d)
        if len(self.walls):
            loss = loss + wall_loss(xe, ye, self.rx_x, self.rx_y, self.walls, self.wall_db)
        return loss

    def body(self, x: F64, y: F64, heading: F64) -> F64:
        """Body loss for carriers facing `heading` (radians), dB: shape x.shape + (receivers,)."""
        dx, dy = self.rx_x - x[..., None], self.rx_y - y[..., None]
        d = np.maximum(np.hypot(dx, dy), 1e-6)
        cos = (np.cos(heading)[..., None] * dx + np.sin(heading)[..., None] * dy) / d
        out: F64 = self.radio.body_loss_db * (1 - cos) / 2
        return out

    def slow(self, x: F64, y: F64, heading: F64 | None) -> F64:
        """Everything but rssi_1m, the drifting shadow, fading and offsets: shape x.shape + (receivers,)."""
        out = self.spatial(x, y) - self.mean_loss(x, y)
        if heading is not None:
            out -= self.body(x, y, heading)
        return out

    def drift(self, state: F64, steps: int, step_s: float = 1.0) -> F64:
        """The drifting shadow at `steps` + 1 samples from `state` (emitters × receivers), AR(1).

        Returns (emitters, steps + 1, receivers); sample 0 is `state`. The caller keeps the last one.
        """
        rho = math.exp(-step_s / self.radio.shadowing_correlation_s)
        innov = self._rng.standard_normal((steps, *state.shape)) * (self.sigma_temporal * math.sqrt(1 - rho**2))
        out = np.empty((steps + 1, *state.shape))
        out[0] = state
        for k in range(steps):
            out[k + 1] = rho * out[k] + innov[k]
        return np.moveaxis(out, 0, -2)

    def initial_drift(self, n: int) -> F64:
        """Drift state for `n` new emitters (stationary distribution)."""
        out: F64 = self._rng.standard_normal((n, self.n_rx)) * self.sigma_temporal
        return out

    # ------------------------------------------------------------------ per packet

    def receive(self, t: F64, power: F64, step: I64, steps: int) -> tuple[Bool, npt.NDArray[np.int16]]:
        """Which receivers get each packet, and the RSSI they report.

        `t` (packets) are the send times, `power` (packets × receivers) the mean received power
        before fading and offsets, `step` the whole second of the block each packet falls in.
        """
        n = len(t)
        rssi = np.full((n, self.n_rx), float(RSSI_FLOOR))
        # Fading is drawn only where it could lift a packet to the sensitivity (its upper tail
        # beyond FADE_HEADROOM_DB has a probability below 1e-4 for any K allowed).
        near = power + self.offset + FADE_HEADROOM_DB >= self.sensitivity
        m = int(near.sum())
        re = self._rng.standard_normal(m)
        im = self._rng.standard_normal(m)
        fading = 10 * np.log10(np.maximum((self._los + self._scatter * re) ** 2 + (self._scatter * im) ** 2, 1e-12))
        rssi[near] = power[near] + fading + np.broadcast_to(self.offset, near.shape)[near]
        audible = rssi >= self.sensitivity
        heard = audible & (np.mod(t[:, None] - self.scan_phase, self.scan_interval) < self.scan_window)
        u = self._rng.random((n, self.n_rx))
        keep = np.full((n, self.n_rx), 1.0 - self.radio.packet_loss)
        airtime = self.radio.airtime_us * 1e-6
        if airtime > 0 and n:
            cells = step[:, None] * self.n_rx + np.arange(self.n_rx)
            per_second = np.bincount(cells[audible], minlength=steps * self.n_rx).astype(np.float64)
            keep *= np.exp(-2.0 * per_second[cells] * airtime)
        heard &= u < keep
        return heard, np.clip(np.rint(rssi), RSSI_FLOOR, RSSI_CEIL).astype(np.int16)
