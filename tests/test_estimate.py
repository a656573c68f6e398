"""Tests for gateway.estimate: smoothing, hysteresis, the documented switching delay, stale links, outside."""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest

from gateway.config import EstimateConfig, PlanConfig
from gateway.estimate import StrongestReceiver
from gateway.model import Sighting, ZoneEstimate

T0 = 1_764_000_000.0
PHONE = "anon:0123456789abcdef"


def plan(*, sidewalk_receiver: bool = False, gain_b: float = 0.0) -> PlanConfig:
    receivers = [
        {"id": "rx-a", "zone": "entrance"},
        {"id": "rx-b", "zone": "produce", "gain_db": gain_b},
    ]
    if sidewalk_receiver:
        receivers.append({"id": "rx-street", "zone": "sidewalk"})
    return PlanConfig.model_validate(
        {
            "zones": [{"id": "sidewalk", "outside": True}, {"id": "entrance"}, {"id": "produce"}],
            "receivers": receivers,
        }
    )


def estimator(p: PlanConfig | None = None, **cfg: float) -> StrongestReceiver:
    return StrongestReceiver(p or plan(), EstimateConfig.model_validate(cfg))


def heard(ts: float, receiver: str, rssi: float, subject: str = PHONE, ref: int = -59) -> Sighting:
    return Sighting(ts, receiver, subject, round(rssi), ref)


def walk(
    est: StrongestReceiver,
    duration_s: float,
    interval_s: float,
    mean: Callable[[float], dict[str, float]],
    rng: np.random.Generator | None = None,
    sigma: float = 0.0,
) -> list[ZoneEstimate]:
    """Feed one batch per advertising interval: every receiver in `mean(t)` hears the phone, with noise."""
    out: list[ZoneEstimate] = []
    for i in range(round(duration_s / interval_s)):
        t = i * interval_s
        batch = []
        for rx, m in mean(t).items():
            noise = float(rng.normal(0.0, sigma)) if rng is not None else 0.0
            batch.append(heard(T0 + t, rx, m + noise))
        (e,) = est.update(batch)
        out.append(e)
    return out


def changes(estimates: list[ZoneEstimate]) -> int:
    return sum(1 for a, b in pairwise(estimates) if a.zone != b.zone)


# --------------------------------------------------------------------------- hysteresis


@pytest.mark.parametrize("seed", range(6))
def test_hysteresis_stops_flapping_between_two_receivers_with_noisy_rssi(seed: int) -> None:
    # A shopper standing between two receivers, a little nearer A; each reading has 4 dB of noise,
    # so the raw strongest receiver changes many times a minute.
    def between(t: float) -> dict[str, float]:
        return {"rx-a": -70.0, "rx-b": -72.0}

    steady = walk(estimator(), 600, 1.0, between, np.random.default_rng(seed), sigma=4.0)
    flappy = walk(estimator(hysteresis_db=0.0), 600, 1.0, between, np.random.default_rng(seed), sigma=4.0)
    assert changes(flappy) > 30, "control: without hysteresis the noise must make the estimate flap"
    assert changes(steady) <= 5
    assert sum(e.zone == "entrance" for e in steady) >= 0.7 * len(steady)
    assert all(e.inside for e in steady)


def test_hysteresis_keeps_the_current_receiver_until_another_is_stronger_by_the_margin() -> None:
    est = estimator(hysteresis_db=6.0, smoothing_s=1.0)
    # Readings 30 s apart are past stale_s, so each is taken as it is (no smoothing to wait for).
    assert est.update([heard(T0, "rx-a", -60), heard(T0, "rx-b", -70)])[0].zone == "entrance"
    e = est.update([heard(T0 + 60, "rx-a", -60), heard(T0 + 60, "rx-b", -55)])[0]
    assert e.zone == "entrance", "5 dB stronger is within a 6 dB margin"
    e = est.update([heard(T0 + 90, "rx-a", -60), heard(T0 + 90, "rx-b", -53)])[0]
    assert e.zone == "produce", "7 dB stronger beats a 6 dB margin"
    assert e.rssi == pytest.approx(-53, abs=0.1)


# --------------------------------------------------------------------------- a real move


def documented_delay(swing_db: float, cfg: EstimateConfig) -> float:
    """The switching delay estimate.py's docstring promises for a move by `swing_db` each way."""
    return cfg.smoothing_s * math.log(2 * swing_db / (swing_db - cfg.hysteresis_db))


def move_at(t_move: float, near: float, far: float) -> Callable[[float], dict[str, float]]:
    def mean(t: float) -> dict[str, float]:
        return {"rx-a": near, "rx-b": far} if t < t_move else {"rx-a": far, "rx-b": near}

    return mean


def switch_delay(estimates: list[ZoneEstimate], t_move: float) -> float:
    before = [e for e in estimates if e.ts - T0 < t_move]
    after = [e for e in estimates if e.ts - T0 >= t_move]
    assert all(e.zone == "entrance" for e in before[5:]), "switched before the shopper moved"
    first = next(e for e in after if e.zone == "produce")
    assert all(e.zone == "produce" for e in after if e.ts >= first.ts), "switched back after the move"
    return first.ts - T0 - t_move


@pytest.mark.parametrize(("swing_db", "smoothing_s"), [(8.0, 4.0), (12.0, 4.0), (20.0, 4.0), (12.0, 10.0)])
def test_a_clean_move_is_followed_after_the_documented_delay(swing_db: float, smoothing_s: float) -> None:
    cfg = EstimateConfig(smoothing_s=smoothing_s)
    interval = 0.25
    est = StrongestReceiver(plan(), cfg)
    estimates = walk(est, 120, interval, move_at(60.0, -65 + swing_db / 2, -65 - swing_db / 2))
    delay = switch_delay(estimates, 60.0)
    expected = documented_delay(swing_db, cfg)
    assert abs(delay - expected) <= interval + 1e-9  # sampled every `interval`, so within one of it
    assert delay <= math.log(4) * smoothing_s + interval  # the docstring's bound for swings of 2 x hysteresis


@pytest.mark.parametrize("seed", range(6))
def test_a_noisy_move_is_followed_within_the_documented_bound(seed: int) -> None:
    cfg = EstimateConfig()
    rng = np.random.default_rng(seed)
    estimates = walk(StrongestReceiver(plan(), cfg), 120, 0.5, move_at(60.0, -60, -72), rng, sigma=2.0)
    delay = switch_delay(estimates, 60.0)
    assert 0 < delay <= math.log(4) * cfg.smoothing_s + 0.5 + 1.0  # a second of slack for the noise


# --------------------------------------------------------------------------- stale links


def test_a_receiver_that_stops_hearing_the_subject_expires_after_stale_s() -> None:
    est = estimator(stale_s=12.0)
    for i in range(20):
        (e,) = est.update([heard(T0 + i, "rx-a", -55), heard(T0 + i, "rx-b", -75)])
    assert e.zone == "entrance"
    last_a = T0 + 19
    zones = {}
    for i in range(20, 40):  # rx-a no longer hears the phone (a shelf in between, or the node is down)
        zones[T0 + i] = est.update([heard(T0 + i, "rx-b", -75)])[0].zone
    assert {z for t, z in zones.items() if t - last_a <= 12.0} == {"entrance"}
    assert {z for t, z in zones.items() if t - last_a > 12.0} == {"produce"}


def test_a_link_heard_again_after_being_stale_starts_from_the_new_reading() -> None:
    est = estimator(stale_s=12.0, smoothing_s=4.0)
    for i in range(10):
        est.update([heard(T0 + i, "rx-a", -50), heard(T0 + i, "rx-b", -80)])
    # 30 s later both are heard again: the old -50 must not linger in A's smoothed value.
    (e,) = est.update([heard(T0 + 39, "rx-a", -85), heard(T0 + 39, "rx-b", -70)])
    assert (e.zone, e.rssi) == ("produce", -70)


def test_smoothing_follows_time_not_sample_count() -> None:
    # The same 10 s of signal sampled every 100 ms and every 1 s ends at about the same value.
    fast, slow = estimator(), estimator()
    for i in range(100):
        (ef,) = fast.update([heard(T0 + i * 0.1, "rx-a", -60 if i == 0 else -80)])
    for i in range(10):
        (es,) = slow.update([heard(T0 + i * 1.0, "rx-a", -60 if i == 0 else -80)])
    assert ef.rssi == pytest.approx(es.rssi, abs=1.0)
    # and after 10 s with a 4 s time constant, a 20 dB step has decayed to about 20 * exp(-9.9/4) dB
    assert es.rssi == pytest.approx(-80 + 20 * math.exp(-9 / 4), abs=0.5)


# --------------------------------------------------------------------------- inside / outside


def test_weak_signal_heard_only_at_the_door_is_outside_on_the_sidewalk() -> None:
    est = estimator(inside_min_rssi=-90.0)
    (e,) = est.update([heard(T0, "rx-a", -96)])
    assert (e.zone, e.inside) == ("sidewalk", False)
    for i in range(1, 11):  # then it walks in: once the smoothed signal is above the threshold it is inside
        (e,) = est.update([heard(T0 + i, "rx-a", -60)])
    assert (e.zone, e.inside) == ("entrance", True)


def test_signal_heard_only_by_a_sidewalk_receiver_is_outside() -> None:
    est = estimator(plan(sidewalk_receiver=True))
    for i in range(5):
        (e,) = est.update([heard(T0 + i, "rx-street", -62)])
    assert (e.zone, e.inside) == ("sidewalk", False)


def test_inside_threshold_uses_the_signal_normalised_to_a_1m_reference_and_receiver_gain() -> None:
    # A weak transmitter (-75 dBm at 1 m) heard at -95 is as close as a phone heard at -79.
    est = estimator(inside_min_rssi=-90.0)
    (e,) = est.update([heard(T0, "rx-a", -95, ref=-75)])
    assert (e.zone, e.inside, e.rssi) == ("entrance", True, -79)
    # A receiver that reads 8 dB low is calibrated with gain_db = 8.
    est = estimator(plan(gain_b=8.0), inside_min_rssi=-90.0)
    (e,) = est.update([heard(T0, "rx-b", -95)])
    assert (e.zone, e.inside, e.rssi) == ("produce", True, -87)


def test_inside_is_decided_by_the_best_signal_even_while_hysteresis_keeps_the_weaker_receiver() -> None:
    # docs/config.md: "Best smoothed RSSI ... below this puts the subject in the nearest outside zone".
    est = estimator(inside_min_rssi=-90.0, hysteresis_db=4.0, smoothing_s=1.0)
    (e,) = est.update([heard(T0, "rx-a", -85), heard(T0, "rx-b", -95)])
    assert e.zone == "entrance"
    (e,) = est.update([heard(T0 + 30, "rx-a", -92), heard(T0 + 30, "rx-b", -89)])
    # A (current) is at -92 and B at -89: within the margin, so A stays; but -89 is above the threshold.
    assert (e.zone, e.inside) == ("entrance", True)


# --------------------------------------------------------------------------- batches and bookkeeping


def test_one_estimate_per_subject_per_batch_dated_at_its_newest_sighting_beacons_excluded() -> None:
    est = estimator()
    batch = [
        heard(T0 + 2, "rx-a", -60, "anon:1111111111111111"),
        heard(T0 + 1, "rx-b", -80, "anon:1111111111111111"),
        heard(T0 + 1.5, "rx-b", -60, "member:m-1"),
        heard(T0 + 1, "rx-a", -50, "beacon:e2c56db5-dffb-48d2-b060-d0f5a71096e0:1:1"),
        heard(T0 + 1, "rx-unknown", -40, "anon:2222222222222222"),
    ]
    out = {e.subject: e for e in est.update(batch)}
    assert set(out) == {"anon:1111111111111111", "member:m-1"}
    assert out["anon:1111111111111111"].ts == T0 + 2 and out["anon:1111111111111111"].zone == "entrance"
    assert out["member:m-1"].zone == "produce"
    d = est.diagnostics()
    assert d["unknown_receiver_sightings"] == 1
    assert d["unknown_receivers"] == ["rx-unknown"]
    assert d["beacon_last_heard"] == {"rx-a": T0 + 1}
    assert est.update([]) == []


def test_out_of_order_and_duplicate_sightings_do_not_move_time_backwards() -> None:
    est = estimator()
    (e1,) = est.update([heard(T0 + 10, "rx-a", -60)])
    (e2,) = est.update([heard(T0 + 5, "rx-a", -62), heard(T0 + 10, "rx-a", -60)])
    assert e2.ts == e1.ts == T0 + 10
    assert e2.zone == "entrance" and -62 <= e2.rssi <= -60


def test_subjects_not_heard_for_five_minutes_are_forgotten() -> None:
    est = estimator()
    est.update([heard(T0, "rx-a", -60, f"anon:{i:016x}") for i in range(50)])
    assert est.diagnostics()["subjects"] == 50
    est.update([heard(T0 + 200, "rx-a", -60, "anon:ffffffffffffffff")])
    assert est.diagnostics()["subjects"] == 51
    est.update([heard(T0 + 400, "rx-a", -60, "anon:ffffffffffffffff")])
    assert est.diagnostics()["subjects"] == 1
