"""Tests for gateway.estimate.HmmEstimator on hand-made cases: a known walk past two receivers, batching,
silence, dead receivers, one receiver, late sightings, and the factory."""

from __future__ import annotations

import math
from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest

from gateway.config import EstimateConfig, PlanConfig
from gateway.estimate import (
    MEAN_BODY_LOSS_DB,
    REORDER_S,
    HmmEstimator,
    StrongestReceiver,
    make_estimator,
    wall_loss,
)
from gateway.model import Sighting, ZoneEstimate

T0 = 1_764_000_000.0
PHONE = "anon:0123456789abcdef"
RX = {"rx-a": (5.0, 3.0), "rx-b": (15.0, 3.0)}
GLASS_DB = 6.0


def plan(receivers: dict[str, tuple[float, float]] = RX) -> PlanConfig:
    """Two 10 x 6 m zones side by side behind a glass front at y = 0, a sidewalk in front, a door at x = 5."""
    zone_of = {"rx-a": "a", "rx-b": "b", "rx-c": "a", "rx-d": "b", "rx-e": "b"}
    return PlanConfig.model_validate(
        {
            "zones": [
                {"id": "sidewalk", "outside": True, "polygon": [[-10, -6], [30, -6], [30, 0], [-10, 0]]},
                {"id": "a", "polygon": [[0, 0], [10, 0], [10, 6], [0, 6]]},
                {"id": "b", "polygon": [[10, 0], [20, 0], [20, 6], [10, 6]]},
            ],
            "receivers": [{"id": k, "zone": zone_of[k], "position": list(v)} for k, v in receivers.items()],
            "walls": [{"points": [[0, 0], [20, 0]], "loss_db": GLASS_DB}],
            "doors": [[5, 0]],
        }
    )


def expected_rssi(x: float, y: float, rx: tuple[float, float]) -> float:
    d = max(math.hypot(x - rx[0], y - rx[1]), 1.0)
    return -59 - 22 * math.log10(d) - (GLASS_DB if y < 0 else 0.0)


def walk(
    path: list[tuple[float, float, float]],
    rng: np.random.Generator,
    receivers: dict[str, tuple[float, float]] = RX,
    sigma: float = 2.0,
    rate_hz: float = 4.0,
    subject: str = PHONE,
    offset_db: float = 0.0,
) -> list[Sighting]:
    """Sightings of a phone moving linearly between waypoints (t, x, y), every receiver hearing each packet;
    `offset_db` is added to every reading (a stronger phone, or no body between it and the receivers)."""
    out: list[Sighting] = []
    for (t0, x0, y0), (t1, x1, y1) in pairwise(path):
        for t in np.arange(t0, t1, 1 / rate_hz):
            f = (t - t0) / (t1 - t0)
            x, y = x0 + f * (x1 - x0), y0 + f * (y1 - y0)
            for rx, pos in receivers.items():
                rssi = expected_rssi(x, y, pos) + offset_db + rng.normal(0, sigma)
                if rssi >= -95:
                    out.append(Sighting(T0 + float(t), rx, subject, round(rssi), -59))
    return out


def feed(est: HmmEstimator, sightings: list[Sighting], tick_s: float, until: float) -> list[tuple[float, ZoneEstimate]]:
    """Hand sightings over in ticks of `tick_s` (data time); returns (tick time, estimate) pairs."""
    out: list[tuple[float, ZoneEstimate]] = []
    sightings = sorted(sightings, key=lambda s: s.ts)
    i = 0
    for k in range(1, math.ceil(until / tick_s) + 1):
        now = T0 + k * tick_s
        batch = []
        while i < len(sightings) and sightings[i].ts <= now:
            batch.append(sightings[i])
            i += 1
        out += [(now, e) for e in est.update(batch, now)]
    return out


def hmm(p: PlanConfig | None = None, **cfg: float) -> HmmEstimator:
    return HmmEstimator(p or plan(), EstimateConfig.model_validate({"method": "hmm", **cfg}))


# --------------------------------------------------------------------------- a known walk


@pytest.mark.parametrize("seed", range(3))
def test_a_walk_from_zone_a_to_zone_b_is_followed_with_a_short_bounded_delay(seed: int) -> None:
    # In A by its receiver for 60 s, walks to B (crossing x = 10 at t = 65), stays in B for 60 s.
    path = [(0, 4, 3), (60, 4, 3), (70, 16, 3), (130, 16, 3)]
    est = hmm()
    out = feed(est, walk(path, np.random.default_rng(seed)), 1.0, 140)
    zones = [(e.ts - T0, e.zone, now - T0) for now, e in out]
    assert all(z == "a" for t, z, _ in zones if 3 <= t < 60)
    assert all(z == "b" for t, z, _ in zones if t >= 72)
    first_b = next((t, now) for t, z, now in zones if z == "b")
    assert 60 <= first_b[0] <= 70
    lag = EstimateConfig().lag_s
    assert first_b[1] - 65 <= lag + REORDER_S + 5, "reported within the lag plus a few seconds of the crossing"
    # Issue 4 asks for zone changes reported within 5 s (median, in a noisy store); a clean walk at the
    # defaults leaves a second to spare (lag 3 s took exactly 5 s here).
    assert first_b[1] - 65 <= 4.0, "a clean zone change is reported within 4 s at the defaults"
    assert all(e.inside for _, e in out if e.ts - T0 >= 3)
    assert all(e.ts <= now - lag for now, e in out), "estimates are for a second at least lag_s ago"


def test_the_result_does_not_depend_on_how_the_sightings_are_batched() -> None:
    path = [(0, 4, 3), (40, 4, 3), (50, 16, 3), (80, 16, 3), (90, 5, -3), (100, 5, -3)]
    sightings = walk(path, np.random.default_rng(7))
    fine = [e for _, e in feed(hmm(), sightings, 0.1, 110)]
    coarse = [e for _, e in feed(hmm(), sightings, 7.0, 112)]
    assert fine == coarse and len(fine) > 90


def test_a_subject_on_the_sidewalk_is_outside_and_one_inside_is_inside() -> None:
    rng = np.random.default_rng(3)
    out = walk([(0, 25, -4), (60, 25, -4)], rng, subject="anon:walker") + walk([(0, 6, 4), (60, 6, 4)], rng)
    got = [e for _, e in feed(hmm(), out, 1.0, 70)]
    walker = [e for e in got if e.subject == "anon:walker" and e.ts - T0 > 5]
    shopper = [e for e in got if e.subject == PHONE and e.ts - T0 > 5]
    assert walker and all((e.zone, e.inside) == ("sidewalk", False) for e in walker)
    assert shopper and all(e.inside for e in shopper)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_a_strong_reading_rules_out_places_that_could_not_be_heard_so_a_shopper_is_found_inside(seed: int) -> None:
    """The supermarket's plan, a quiet channel (readings within 0.5 dB of the model, `sigma_db` 1.5): a shopper
    standing in the grocery aisles at (20, 10) is heard by the entrance receiver alone for 4 s (which the sidewalk
    explains as well), then by every receiver in range. Places on the sidewalk where most of those receivers could
    not hear the phone at all must be ruled out at once: from second 4 on every estimate is grocery. (With a flat
    cost beyond 3 sigma they were not: the sidewalk kept the shopper for 3-5 s more.)"""
    from firmware_sim.scenario import load_scenario, scenario_plan

    supermarket = scenario_plan(load_scenario("supermarket"))
    walls = [(a[0], a[1], b[0], b[1], w.loss_db) for w in supermarket.walls for a, b in pairwise(w.points)]
    x, y = np.array([20.0], np.float32), np.array([10.0], np.float32)
    rng = np.random.default_rng(seed)
    out: list[Sighting] = []
    for t in np.arange(0, 40, 0.5):
        for r in supermarket.receivers:
            assert r.position is not None
            if t < 4 and r.id != "rx-entrance":
                continue
            d = max(math.hypot(20 - r.position[0], 10 - r.position[1]), 1.0)
            loss = 22 * math.log10(d) + float(wall_loss(x, y, r.position[0], r.position[1], walls)[0])
            rssi = -59 - 3 - loss + rng.normal(0, 0.5)  # the model's 3 dB of average body loss
            if rssi >= -95:
                out.append(Sighting(T0 + float(t), r.id, PHONE, round(rssi), -59))
    est = HmmEstimator(supermarket, EstimateConfig(sigma_db=1.5))
    got = [e for _, e in feed(est, out, 1.0, 45)]
    assert len(got) >= 35
    assert [e.zone for e in got if e.ts - T0 > 4] == ["grocery"] * sum(1 for e in got if e.ts - T0 > 4)


def test_someone_standing_at_the_window_is_never_sure_inside_and_a_shopper_deep_inside_is() -> None:
    # A pedestrian walks the sidewalk to the glass beside the door and looks in for 60 s, facing the store:
    # no body between the phone and the receivers, so every reading is as strong as the glass is lossy, just
    # what someone standing a little way inside would give. Whatever the filter makes of that, none of it is sure.
    rng = np.random.default_rng(11)
    window = [(0, -8, -1), (12, 7, -1), (72, 7, -1), (90, 28, -1)]
    shopper = [(0, -8, -2), (11, 5, -1), (14, 5, 2), (22, 15, 4), (82, 15, 4), (92, 5, 1), (95, 5, -1)]
    sightings = walk(window, rng, subject="anon:window", offset_db=GLASS_DB) + walk(shopper, rng)
    got = [e for _, e in feed(hmm(), sightings, 1.0, 100)]
    at_window = [e for e in got if e.subject == "anon:window"]
    assert at_window and not any(e.sure for e in at_window)
    assert all(e.sure is False for e in at_window if not e.inside), "outside is never sure inside"
    deep = [e for e in got if e.subject == PHONE and 30 <= e.ts - T0 < 80]
    assert len(deep) >= 45 and all(e.inside and e.zone == "b" for e in deep)
    assert sum(1 for e in deep if e.sure) >= 0.9 * len(deep), "inside, 3 m from the glass but far from the door"


# --------------------------------------------------------------------------- silence and receivers


def test_no_estimates_while_silent_and_the_zone_is_kept_across_the_gap() -> None:
    rng = np.random.default_rng(4)
    sightings = [s for s in walk([(0, 16, 3), (90, 16, 3)], rng) if not 30 <= s.ts - T0 < 55]
    out = [e for _, e in feed(hmm(), sightings, 1.0, 100)]
    assert not [e for e in out if 31 <= e.ts - T0 < 54], "nothing is said about seconds nobody heard"
    assert {e.zone for e in out if e.ts - T0 >= 3} == {"b"}


@pytest.mark.parametrize("gap_s", [3 * 3600, 3 * 86400])
def test_after_a_jump_of_data_time_nothing_heard_before_it_is_dated_after_it(gap_s: float) -> None:
    # A live gateway's clock stepped forward by NTP (hours or days): data time jumps, no real time passed. Only what
    # is heard after the jump may be dated after it; a phone last heard before it must not get an estimate in the gap
    # (the visit tracker would stretch its visit over the hours or days no one was heard: dwell of days).
    rng = np.random.default_rng(5)
    old, new = "anon:00000000000000aa", "anon:00000000000000bb"
    est = hmm()
    before = walk([(0, 4, 3), (30, 4, 3)], rng, subject=old)
    feed(est, before, 0.1, 30.05)  # the jump comes right after the last tick; the lag's seconds are not yet decided
    after = walk([(gap_s + 30.1, 16, 3), (gap_s + 60, 16, 3)], rng, subject=new)
    out = feed_from(est, after, 0.1, gap_s + 30.1, gap_s + 70)
    late = [(e.subject, e.ts - T0) for e in out if e.ts - T0 > 31]
    assert late and all(subject == new and t >= gap_s + 30 for subject, t in late), "nothing dated in the gap"
    assert not [e for e in out if e.subject == old and e.ts - T0 > 31], "the phone heard before is not in it"


def test_a_jump_of_data_time_with_seconds_still_waiting_dates_nothing_heard_before_it_after_it() -> None:
    # As above, but the tick that jumps also brings the last seconds heard before the jump (a source's buffer): they
    # wait for their seconds with the ones the lag holds back, and all of them must be decided before the skip, else
    # the ring of the last seconds comes out again dated after it (a visit stretched over the hours).
    rng = np.random.default_rng(5)
    old, new = "anon:00000000000000aa", "anon:00000000000000bb"
    gap_s = 3 * 3600
    before = walk([(0, 4, 3), (30, 4, 3)], rng, subject=old)
    est = hmm()
    out = [e for _, e in feed(est, [s for s in before if s.ts <= T0 + 27.05], 0.1, 27.05)]
    after = walk([(gap_s + 30.1, 16, 3), (gap_s + 60, 16, 3)], rng, subject=new)
    late = [s for s in before if s.ts > T0 + 27.05]
    out += est.update(late + [s for s in after if s.ts <= T0 + gap_s + 31.5], T0 + gap_s + 31.5)
    out += feed_from(est, [s for s in after if s.ts > T0 + gap_s + 31.5], 0.1, gap_s + 31.6, gap_s + 70)
    assert {e.ts - T0 for e in out if e.subject == old} == {k + 0.5 for k in range(30)}, "every second, once"
    assert [e for e in out if e.subject == new] and all(e.ts - T0 >= gap_s + 30 for e in out if e.subject == new)


@pytest.mark.parametrize("by", [7201.0, 3 * 86400.0])
def test_an_estimator_shifted_by_a_clock_step_goes_on_as_if_the_seconds_before_it_were_that_much_later(
    by: float,
) -> None:
    # A live clock stepped forward mid-walk, with seconds waiting for the lag and sightings not yet decided: shifted
    # (gateway.runtime.Gateway.shift), the estimator gives exactly what it gives without a step, `by` later.
    path = [(0, 4, 3), (40, 4, 3), (50, 16, 3), (80, 16, 3)]
    sightings = walk(path, np.random.default_rng(7))
    plain = [e for _, e in feed(hmm(), sightings, 0.1, 90)]
    est = hmm()
    got = [e for _, e in feed(est, [s for s in sightings if s.ts <= T0 + 45.05], 0.1, 45.05)]
    est.shift(by)
    later = [replace(s, ts=s.ts + by) for s in sightings if s.ts > T0 + 45.05]
    got += [replace(e, ts=e.ts - by) for e in feed_from(est, later, 0.1, by + 45.15, by + 90)]
    assert len(plain) == 80 and got == plain
    with pytest.raises(ValueError, match="whole seconds"):
        est.shift(0.5)


def feed_from(
    est: HmmEstimator, sightings: list[Sighting], tick_s: float, start: float, until: float
) -> list[ZoneEstimate]:
    """`feed`, with ticks from T0 + start on (after a jump of data time)."""
    out: list[ZoneEstimate] = []
    sightings = sorted(sightings, key=lambda s: s.ts)
    i = 0
    for k in range(math.ceil((until - start) / tick_s) + 1):
        now = T0 + start + k * tick_s
        batch = []
        while i < len(sightings) and sightings[i].ts <= now:
            batch.append(sightings[i])
            i += 1
        out += est.update(batch, now)
    return out


def test_a_receiver_that_reports_nothing_at_all_is_no_evidence_but_one_that_works_and_misses_is() -> None:
    # The phone stands in B, 5 m from rx-a's zone centre; only rx-a reports it, rx-b is down (nothing at all).
    rng = np.random.default_rng(5)
    only_a = [s for s in walk([(0, 12, 3), (60, 12, 3)], rng) if s.receiver == "rx-a"]
    dead = [e for _, e in feed(hmm(), only_a, 1.0, 70)]
    # The same, but rx-b works (it hears a fixed beacon every second) and never hears the phone.
    beacon = [Sighting(T0 + t, "rx-b", "beacon:x:1:1", -60, -59) for t in range(70)]
    working = [e for _, e in feed(hmm(), only_a + beacon, 1.0, 70)]
    est = hmm()
    feed(est, only_a + beacon, 1.0, 70)
    assert est.diagnostics()["beacon_last_heard"] == {"rx-b": T0 + 69}
    # With rx-b working, its silence says the phone is not next to it: more of the estimates leave B.
    share_b = sum(e.zone == "b" for e in dead) / len(dead)
    share_b_working = sum(e.zone == "b" for e in working) / len(working)
    assert share_b_working <= share_b


def test_one_receiver_gives_inside_outside_and_distance_bands_and_says_so() -> None:
    single = plan({"rx-a": RX["rx-a"]})
    est = hmm(single)
    d = est.diagnostics()
    assert (d["estimator"], d["resolution"], d["receivers"]) == ("hmm", "inside-outside", 1)
    rng = np.random.default_rng(6)
    sightings = walk([(0, 14, 4), (60, 14, 4)], rng, {"rx-a": RX["rx-a"]})
    # 18 m away behind the glass: weaker than anywhere inside (one receiver cannot tell a nearer passer-by
    # at the window from a shopper at the back wall: both sound alike)
    sightings += walk([(0, 22, -4), (60, 22, -4)], rng, {"rx-a": RX["rx-a"]}, subject="anon:walker")
    out = [e for _, e in feed(est, sightings, 1.0, 70) if e.ts - T0 > 10]
    inside = [e for e in out if e.subject == PHONE]
    assert inside and {(e.zone, e.inside) for e in inside} == {("a", True)}, "inside: the receiver's zone"
    assert all(e.sure for e in inside), "one level cannot tell the glass's sides apart: the sure test stands aside"
    walker = [e for e in out if e.subject == "anon:walker"]
    assert sum(not e.inside for e in walker) >= 0.8 * len(walker)
    bands = est.diagnostics()["distance_bands"]
    assert bands["mid"] >= len(inside) and bands["near"] == 0  # 9 m from the receiver


def test_late_and_unknown_sightings_are_counted_not_used() -> None:
    est = hmm()
    est.update(walk([(0, 4, 3), (20, 4, 3)], np.random.default_rng(8)), T0 + 20)
    assert est.update([Sighting(T0 + 2, "rx-a", PHONE, -60, -59), Sighting(T0 + 19, "rx-x", PHONE, -60, -59)], T0 + 21)
    d = est.diagnostics()
    assert (d["late_sightings"], d["unknown_receiver_sightings"]) == (1, 1)
    assert d["unknown_receivers"] == ["rx-x"], "named, so that `visita doctor` can say which node is not mapped"


def test_subjects_not_heard_for_a_while_are_forgotten() -> None:
    est = hmm()
    rng = np.random.default_rng(9)
    many = [s for i in range(20) for s in walk([(0, 4, 3), (5, 4, 3)], rng, rate_hz=1, subject=f"anon:{i:016x}")]
    est.update(many, T0 + 10)
    assert est.diagnostics()["subjects"] == 20
    later = walk([(200, 16, 3), (210, 16, 3)], rng)
    est.update(later, T0 + 212)
    assert est.diagnostics()["subjects"] == 1
    assert {e.zone for e in est.update([], T0 + 215)} <= {"b"}


def test_a_phone_weaker_or_stronger_than_its_model_says_is_learned_where_several_receivers_hear_it_well() -> None:
    """`walk` leaves out the body loss the model assumes (MEAN_BODY_LOSS_DB), so its phones read that much above
    the model on top of their own offset; that is what is to be learned. rx-e, 20 m off, hears the phone only
    when a packet fades up: it must not teach (it would pull every offset up)."""
    receivers = {**RX, "rx-c": (2.0, 5.5), "rx-d": (18.0, 5.5), "rx-e": (10.0, 22.0)}
    path = [(0, 3, 3), (40, 17, 3), (80, 4, 3), (120, 12, 3)]

    def learn(offset_db: float) -> tuple[float, float, int]:
        est = hmm(plan(receivers))
        feed(est, walk(path, np.random.default_rng(1), receivers, offset_db=offset_db), 1.0, 122)
        belief = est.offset_belief(PHONE)
        assert belief is not None
        return belief[0], belief[1], est.diagnostics()["offset_lessons"]

    learned = []
    for offset_db in (-5.0, 0.0, 4.0):
        mean, spread, lessons = learn(offset_db)
        assert mean == pytest.approx(offset_db + MEAN_BODY_LOSS_DB, abs=1.5) and spread < 1.0, (offset_db, mean)
        assert lessons >= 100
        learned.append(mean)
    assert learned[2] - learned[0] > 6.0  # 9 dB apart
    # A phone 8 dB under the model is heard well by fewer receivers, so it learns slowly; but towards weaker.
    mean, _spread, lessons = learn(-11.0)
    assert mean < 0.0 and lessons < 60, (mean, lessons)


def test_a_learned_offset_stays_with_its_subject_when_others_are_forgotten_and_when_it_is_relabelled() -> None:
    receivers = {**RX, "rx-c": (2.0, 5.5), "rx-d": (18.0, 5.5)}
    est = hmm(plan(receivers))
    rng = np.random.default_rng(4)
    others = [s for i in range(5) for s in walk([(0, 4, 3), (5, 4, 3)], rng, receivers, subject=f"anon:{i:016x}")]
    mine = walk([(0, 3, 3), (150, 17, 3)], rng, receivers, offset_db=4.0)
    feed(est, others + mine, 1.0, 152)  # the others are forgotten on the way: rows are compacted
    assert est.diagnostics()["subjects"] == 1
    learned = est.offset_belief(PHONE)
    assert learned is not None and learned[0] > 4.0
    assert est.relabel(PHONE, "member:m-1")
    assert est.offset_belief("member:m-1") == learned and est.offset_belief(PHONE) is None


def test_with_one_receiver_hearing_well_the_offset_is_not_learned() -> None:
    """Where one receiver hears the subject well, a weaker phone and a longer distance look alike: no lesson."""
    receivers = {"rx-a": (5.0, 3.0), "rx-b": (45.0, 3.0)}  # rx-b 40 m away: expected below -90 dBm
    data = plan(receivers).model_dump()
    data["zones"][2]["polygon"] = [[10, 0], [50, 0], [50, 6], [10, 6]]
    est = hmm(PlanConfig.model_validate(data))
    feed(est, walk([(0, 4, 3), (60, 6, 4)], np.random.default_rng(2), receivers, offset_db=-5.0), 1.0, 62)
    assert est.diagnostics()["offset_lessons"] == 0
    assert est.offset_belief(PHONE) == pytest.approx((0.0, 1.5))
    assert est.offset_belief("anon:never-heard") is None


def test_the_factory_picks_the_hmm_only_where_the_plan_has_geometry() -> None:
    bare = PlanConfig.model_validate(
        {"zones": [{"id": "sidewalk", "outside": True}, {"id": "a"}], "receivers": [{"id": "rx-a", "zone": "a"}]}
    )
    assert isinstance(make_estimator(bare, EstimateConfig()), StrongestReceiver)
    assert isinstance(make_estimator(plan(), EstimateConfig()), HmmEstimator)
    assert isinstance(make_estimator(plan(), EstimateConfig(method="baseline")), StrongestReceiver)
    with pytest.raises(ValueError, match="polygon"):
        make_estimator(bare, EstimateConfig(method="hmm"))
