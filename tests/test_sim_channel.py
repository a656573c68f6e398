"""firmware_sim.channel and geometry: path loss, walls, shadowing, fading, scanning, all measured."""

from __future__ import annotations

import math

import numpy as np
import pytest

from firmware_sim.channel import Channel, shadow_field
from firmware_sim.geometry import points_in_polygon, wall_loss, zone_index
from firmware_sim.scenario import Scenario, load_scenario


def channel(scenario: Scenario, seed: int = 1) -> Channel:
    field_rng, rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    return Channel(scenario, field_rng, rng)


def with_radio(name: str, **radio: float) -> Scenario:
    s = load_scenario(name)
    return Scenario.model_validate(s.model_dump() | {"radio": s.radio.model_dump() | radio})


def test_path_loss_grows_with_distance_by_the_configured_exponent() -> None:
    s = with_radio("default", path_loss_exponent=2.7)
    ch = channel(s)
    rx = s.receivers[0].position  # rx-entrance at (15, 2.5); walk away inside the entrance zone, no wall
    d = np.linspace(0.5, 2.4, 20)
    loss = ch.mean_loss(np.full_like(d, rx[0]), rx[1] - d)[:, 0]
    assert np.all(np.diff(loss) > 0), "monotone in distance"
    assert loss[-1] - loss[0] == pytest.approx(10 * 2.7 * math.log10(d[-1] / d[0]))


def test_the_glass_front_costs_its_loss_and_only_when_crossed() -> None:
    s = load_scenario("default")  # glass front along y = 0, 6 dB; rx-entrance at (15, 2.5)
    ch = channel(s)
    xs = np.array([15.0, 15.0])
    ys = np.array([-1.0, 1.0])  # just outside, just inside
    walls = ch.mean_loss(xs, ys)[:, 0] - 10 * s.radio.path_loss_exponent * np.log10(np.abs(2.5 - ys))
    assert walls.tolist() == pytest.approx([6.0, 0.0])
    # Behind the brick side wall (10 dB) as well as the glass: both count.
    far = ch.mean_loss(np.array([-5.0]), np.array([5.0]))[0, 0]
    d = math.hypot(20, 2.5)
    assert far - 10 * 2.2 * math.log10(d) == pytest.approx(10.0)


def test_wall_crossing_geometry() -> None:
    walls = np.array([[0.0, 0.0, 10.0, 0.0]])
    loss = np.array([5.0])
    ax, ay = np.array([5.0, 5.0, 5.0, 12.0]), np.array([-1.0, 1.0, 0.0, -1.0])
    bx, by = np.array([5.0, 5.0, 5.0, 12.0]), np.array([1.0, 2.0, 3.0, 1.0])
    # crosses; same side; starts on the wall (a receiver mounted on it); passes beside the wall's end
    assert wall_loss(ax, ay, bx, by, walls, loss).tolist() == [5.0, 0.0, 0.0, 0.0]


def test_zones_share_edges_without_double_counting() -> None:
    left = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    right = left + np.array([1.0, 0.0])
    x, y = np.array([1.0, 0.5, 1.5, 3.0]), np.array([0.5, 0.5, 0.5, 0.5])
    assert zone_index(x, y, [left, right]).tolist() == [1, 0, 1, -1]
    assert points_in_polygon(x, y, left).tolist() == [False, True, False, False]


def test_shadow_field_has_the_correlation_length_asked_for() -> None:
    res, corr = 0.25, 3.0
    f = shadow_field((400, 400), res, corr, np.random.default_rng(3))
    assert f.mean() == pytest.approx(0, abs=1e-9) and f.std() == pytest.approx(1)
    for dist in (1.0, 3.0, 6.0):
        lag = round(dist / res)
        rho = float(np.mean(f[:, lag:] * f[:, :-lag]))
        assert rho == pytest.approx(math.exp(-((dist / corr) ** 2)), abs=0.12), dist


@pytest.mark.parametrize("sigma", [4.0, 6.0, 8.0])
def test_shadowing_sigma_is_the_configured_one(sigma: float) -> None:
    s = with_radio("supermarket", shadowing_sigma_db=sigma, shadowing_temporal_share=0.25)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 50, 20_000), rng.uniform(0, 30, 20_000)
    # Over the store (1,500 m², 4 m correlation) one receiver's field holds few independent
    # cells, so σ is measured pooled over six receivers and four seeds.
    pooled = np.concatenate([channel(s, seed=int(sigma) * 10 + k).spatial(x, y) for k in range(4)])
    assert pooled.std() == pytest.approx(sigma * math.sqrt(0.75), rel=0.06)
    ch = channel(s, seed=int(sigma))
    spatial = ch.spatial(x, y)
    drift = ch.drift(ch.initial_drift(2000), 200)  # 2000 emitters × 201 s × 6 receivers
    assert drift.std() == pytest.approx(sigma * 0.5, rel=0.05)
    lag = round(s.radio.shadowing_correlation_s)
    rho = float(np.mean(drift[:, lag:] * drift[:, :-lag]) / drift.var())
    assert rho == pytest.approx(math.exp(-1), abs=0.05), "the drifting part decorrelates over its correlation time"
    total = spatial[:2000] + drift[:, 100, :]
    assert total.std() == pytest.approx(sigma, rel=0.1)


def test_fast_fading_is_rician_and_scanning_hears_window_over_interval() -> None:
    s = with_radio("small-shop", fading_k_db=6.0, packet_loss=0.0, airtime_us=0.0)
    ch = channel(s)
    n = 200_000
    t = np.sort(np.random.default_rng(1).uniform(0, 100, n))
    power = np.full((n, 1), -60.0)  # far above the sensitivity: only scanning decides
    heard, rssi = ch.receive(t, power, np.minimum(t.astype(np.int64), 99), 100)
    r = s.receivers[0]
    assert heard.mean() == pytest.approx(r.scan_window_ms / r.scan_interval_ms, abs=0.01)
    assert rssi.astype(float).mean() + 60 == pytest.approx(-0.96, abs=0.1), "Rician K=6 dB: mean -0.96 dB"
    assert rssi.astype(float).std() == pytest.approx(3.3, abs=0.2)
    weak = np.full((n, 1), -100.0)  # 5 dB under the sensitivity: only a rare fade up is heard
    heard, _ = ch.receive(t, weak, np.minimum(t.astype(np.int64), 99), 100)
    assert 0 < heard.mean() < 0.01


def test_collisions_thin_out_a_crowded_second() -> None:
    s = with_radio("small-shop", packet_loss=0.0, airtime_us=376.0)
    ch = channel(s)
    rng = np.random.default_rng(2)
    for per_second, seconds in ((100, 400), (2000, 20)):
        expected = math.exp(-2 * per_second * 376e-6)
        t = np.sort(rng.uniform(0, seconds, per_second * seconds))
        heard, _ = ch.receive(t, np.full((len(t), 1), -50.0), t.astype(np.int64), seconds)
        duty = s.receivers[0].scan_window_ms / s.receivers[0].scan_interval_ms
        assert heard.mean() == pytest.approx(duty * expected, rel=0.03)


def test_body_loss_is_full_with_the_back_to_the_receiver() -> None:
    s = with_radio("small-shop", body_loss_db=8.0)
    ch = channel(s)
    rx, ry = s.receivers[0].position
    x, y = np.array([rx, rx, rx]), np.array([ry - 3, ry - 3, ry - 3])
    facing = np.array([math.pi / 2, -math.pi / 2, 0.0])  # towards, away, sideways
    assert ch.body(x, y, facing)[:, 0].tolist() == pytest.approx([0.0, 8.0, 4.0])


def test_the_same_seed_gives_the_same_channel() -> None:
    s = load_scenario("supermarket")
    a, b, c = channel(s, 5), channel(s, 5), channel(s, 6)
    assert np.array_equal(a.fields, b.fields) and not np.array_equal(a.fields, c.fields)
    assert np.array_equal(a.scan_phase, b.scan_phase)
