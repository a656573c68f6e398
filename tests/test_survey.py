"""Tests for gateway.survey (recorder, map, file), its use by the HMM, the simulated survey and `eval --survey`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest

from firmware_sim.scenario import load_scenario, scenario_plan
from firmware_sim.survey import WALL_CLEARANCE_M, survey_spots, survey_world
from firmware_sim.world import World
from gateway.cli import main
from gateway.config import (
    EstimateConfig,
    PlanConfig,
    ReceiverConfig,
    SurveyConfig,
    WallConfig,
    ZoneConfig,
)
from gateway.estimate import HmmEstimator, expected_rssi, make_estimator
from gateway.eval import SurveyRun, run_survey
from gateway.model import Sighting
from gateway.survey import SurveyError, SurveyMap, SurveyRecorder, SurveySpot, sensitivity, spot_level

TAG = "beacon:5ca1ab1e-0000-4000-8000-00000000cafe:65535:1"


def plan(rx_b: tuple[float, float] = (35.0, 10.0)) -> PlanConfig:
    """A 40 m × 20 m store on a sidewalk, two receivers, one shelf run."""
    return PlanConfig(
        zones=[
            ZoneConfig(id="sidewalk", outside=True, polygon=[(0, -6), (40, -6), (40, 0), (0, 0)]),
            ZoneConfig(id="front", polygon=[(0, 0), (20, 0), (20, 20), (0, 20)]),
            ZoneConfig(id="back", polygon=[(20, 0), (40, 0), (40, 20), (20, 20)]),
        ],
        receivers=[
            ReceiverConfig(id="rx-a", zone="front", position=(5.0, 10.0)),
            ReceiverConfig(id="rx-b", zone="back", position=rx_b),
        ],
        walls=[WallConfig(name="shelf", points=[(20, 5), (20, 15)], loss_db=4.0)],
        doors=[(10.0, 0.0)],
    )


def field(x: float, y: float) -> float:
    """A made-up static shadowing field, dB."""
    return 6.0 * math.sin(x / 3.0) * math.cos(y / 4.0)


def spots_from(p: PlanConfig, points: list[tuple[float, float]], fn: object = field, n: int = 40) -> list[SurveySpot]:
    """Spots whose every packet reads the model mean plus `fn` (rx-a) and plus nothing (rx-b)."""
    xs = np.array([q[0] for q in points], dtype=np.float32)
    ys = np.array([q[1] for q in points], dtype=np.float32)
    mu = expected_rssi(p, EstimateConfig().path_loss_exponent, xs, ys)
    out = []
    for j, (x, y) in enumerate(points):
        a = round(float(mu[0, j]) + fn(x, y))  # type: ignore[operator]
        b = round(float(mu[1, j]))
        out.append(SurveySpot(x, y, 1000.0 + 30 * j, 20.0, -59.0, {"rx-a": (a,) * n, "rx-b": (b,) * n}))
    return out


def test_a_residual_field_is_recovered_near_the_spots_and_fades_to_zero_far_away() -> None:
    p = plan()
    points = [(x, y) for x in np.arange(1.0, 16.0, 2.0).tolist() for y in np.arange(1.0, 20.0, 2.0).tolist()]
    cfg = SurveyConfig(correlation_m=4.0, sigma_db=5.0, offset_sigma_db=0.0, spot_sigma_db=0.5)
    m = SurveyMap(p, spots_from(p, points), cfg)
    near = np.array([[3.0, 5.0], [8.0, 11.0], [12.0, 16.0], [6.0, 3.0]])
    got = m.correction(near[:, 0], near[:, 1])
    want = np.array([field(x, y) for x, y in near.tolist()])
    assert np.max(np.abs(got[0] - want)) < 1.5, (got[0], want)
    assert np.max(np.abs(got[1])) < 0.7  # rx-b heard the model exactly
    far = m.correction(np.array([32.0, 38.0]), np.array([10.0, 18.0]))
    assert np.max(np.abs(far)) < 0.05
    assert m.summary()["receivers"]["rx-a"]["spots_used"] == len(points)


def test_a_receiver_offset_is_fitted_everywhere_relative_to_the_others() -> None:
    p = plan()
    points = [(x, y) for x in (4.0, 12.0, 24.0, 34.0) for y in (4.0, 10.0, 16.0)]
    spots = spots_from(p, points, lambda x, y: 4.0)  # rx-a reads 4 dB high everywhere, rx-b right
    m = SurveyMap(p, spots, SurveyConfig(offset_sigma_db=5.0))
    off = m.offsets()
    assert off["rx-a"] - off["rx-b"] == pytest.approx(4.0, abs=0.5)
    assert abs(off["rx-a"] + off["rx-b"]) < 1e-6  # a shift common to every receiver is not learned
    far = m.correction(np.array([39.0]), np.array([-5.0]))  # far from every spot: the offsets remain
    assert far[0, 0] - far[1, 0] == pytest.approx(4.0, abs=0.7)


def test_receivers_that_heard_too_few_packets_at_a_spot_are_left_out_for_it() -> None:
    p = plan()
    spot = SurveySpot(5.0, 5.0, 0.0, 20.0, -59.0, {"rx-a": (-60,) * 30, "rx-b": (-94, -93)})
    m = SurveyMap(p, [spot], SurveyConfig(min_packets=5, offset_sigma_db=0.0))
    rx = m.summary()["receivers"]
    assert rx["rx-a"]["spots_used"] == 1
    assert rx["rx-b"] == {"spots_used": 0, "spots_censored": 0, "spots_too_few": 1, "offset_db": 0.0}
    assert float(np.abs(m.correction(np.array([5.0]), np.array([5.0]))[1]).max()) == 0.0


def test_a_spot_level_heard_only_above_the_sensitivity_is_estimated_as_censored() -> None:
    # 200 packets at a true level of -93 dBm, spread 4 dB (evenly spaced quantiles); the receiver reports only
    # those at -95 dBm or more.
    packets = np.array([NormalDist(-93.0, 4.0).inv_cdf((k + 0.5) / 200) for k in range(200)])
    heard = np.round(packets[packets >= -95.0])
    assert float(np.median(heard)) >= -91.0  # what the median of the heard packets says: 2 dB too high
    got = spot_level(heard, 200 - len(heard), -95.5)
    assert got.censored and got.level == pytest.approx(-93.0, abs=0.6)
    plain = spot_level(heard, 0.05 * len(heard), -95.5)  # nothing missed: the median
    assert not plain.censored and plain.level == float(np.median(heard))
    # Far above the sensitivity, misses are scan windows and losses, not weak packets: the median stands.
    far = spot_level(np.full(30, -70.0), 10.0, -95.5)
    assert far.level == -70.0 and not far.censored


def test_a_spot_levels_variance_is_its_spread_over_repeated_spots() -> None:
    """The kriging weighs each spot by this variance: it must say how far the level wanders from spot to spot."""
    rng = np.random.default_rng(1)
    for true in (-93.0, -97.0):  # censored nearly always
        levels, variances = [], []
        for _ in range(300):
            packets = rng.normal(true, 4.0, 60)
            heard = np.round(packets[packets >= -95.0])
            got = spot_level(heard, 60 - len(heard), -95.5)
            levels.append(got.level)
            variances.append(got.variance)
        assert float(np.mean(variances)) == pytest.approx(float(np.var(levels)), rel=0.25), true


def test_the_sensitivity_is_read_from_the_weakest_packets_and_a_stray_or_two_do_not_lower_it() -> None:
    packets = [-95.0] * 40 + [-90.0] * 500 + [-70.0] * 2000
    assert sensitivity(packets) == -95.5
    assert sensitivity([*packets, -104.0, -109.0]) == -95.5  # two stray low readings
    assert sensitivity([-80.0, -82.0, -81.0]) == -82.5  # too few packets to tell a stray: the weakest
    # From 100 packets on, the two weakest are taken as possible strays; from 3,000 on, the weakest 0.1 %.
    floor = [-98.0] * 5 + [-80.0] * 92
    assert sensitivity([*floor, -100.0, -104.0]) == -104.5  # 99 packets
    assert sensitivity([*floor, -100.0, -104.0, -80.0]) == -98.5  # 100
    many = [-98.0] * 10 + [-80.0] * 2990 + [-105.0] * 3
    assert sensitivity(many) == -98.5  # 3,003 packets: 3 strays, the 0.1 % quantile passes them
    with pytest.raises(ValueError, match="no packets"):
        sensitivity([])


def test_a_simulated_survey_finds_a_receiver_reading_5_db_high() -> None:
    """The receiver's spots far from it are heard near its sensitivity; their censored levels must still show
    the offset (with the medians of the heard packets only 2.6 of the 5 dB came through on this seed)."""
    sc = load_scenario("supermarket")
    ids = [r.id for r in sc.receivers]
    i = ids.index("rx-checkout")
    means = []
    for offset in (0.0, 5.0):
        receivers = [r.model_copy(update={"offset_db": offset if r.id == "rx-checkout" else 0.0}) for r in sc.receivers]
        store = sc.model_copy(update={"receivers": receivers})
        survey, _ = run_survey(
            store, 2, store.start_ts() + 3600, scenario_plan(store), EstimateConfig(), SurveyRun(5.0, 20.0)
        )
        if not means:  # the spots where the receiver heard the tag in the first run
            used = [s for s in survey.spots if len(s.rssi.get("rx-checkout", ())) >= 5]
            xs, ys = np.array([s.x for s in used]), np.array([s.y for s in used])
        means.append(survey.correction(xs, ys).mean(axis=1))
    shift = means[1] - means[0]
    found = shift[i] - np.delete(shift, i).mean()
    # Medians: 2.6 dB; censored levels: 3.8 dB. The bound sits halfway, not at the edge of either.
    assert 3.2 < found < 6.5, dict(zip(ids, shift.round(2), strict=True))


def test_one_stray_low_packet_does_not_undo_the_censored_levels() -> None:
    """Real receivers now and then report a reading far below their usual floor. Taken as the sensitivity, it
    would put every weak spot's misses far above it, their levels back at the high medians."""
    sc = load_scenario("supermarket")
    survey, _ = run_survey(sc, 2, sc.start_ts() + 3600, scenario_plan(sc), EstimateConfig(), SurveyRun(5.0, 20.0))
    spots = list(survey.spots)
    heard = [s for s in spots if len(s.rssi.get("rx-checkout", ())) >= 5]
    xs, ys = np.array([s.x for s in heard]), np.array([s.y for s in heard])
    j = spots.index(heard[0])
    stray = dict(spots[j].rssi)
    stray["rx-checkout"] = (*stray["rx-checkout"], -109)
    spots[j] = SurveySpot(spots[j].x, spots[j].y, spots[j].start, spots[j].seconds, spots[j].ref_rssi, stray)
    with_stray = SurveyMap(survey.plan, spots, survey.cfg, survey.estimate, survey.transmitter)
    rx = survey.summary()["receivers"]["rx-checkout"]
    assert rx["spots_censored"] >= 5, rx  # the case at stake: spots whose level is a censored estimate
    # The spot with the stray heard one packet more, which may tip that one spot; the rest stand.
    assert abs(with_stray.summary()["receivers"]["rx-checkout"]["spots_censored"] - rx["spots_censored"]) <= 1
    change = np.abs(with_stray.correction(xs, ys) - survey.correction(xs, ys)).max()
    assert change < 0.5, change


def test_a_spot_outside_every_inside_zone_or_too_short_is_refused() -> None:
    rec = SurveyRecorder(plan(), TAG)
    with pytest.raises(SurveyError, match=r"spot \(10, -3\) lies in no inside zone of the plan \(front, back\)"):
        rec.start_spot(10.0, -3.0, 20.0, 100.0)
    with pytest.raises(SurveyError, match="no inside zone"):
        rec.start_spot(50.0, 10.0, 20.0, 100.0)
    with pytest.raises(SurveyError, match=r"spot seconds = 1: must be 3\.\.600 s"):
        rec.start_spot(10.0, 10.0, 1.0, 100.0)
    rec.start_spot(10.0, 10.0, 20.0, 100.0)
    with pytest.raises(SurveyError, match=r"still recording for 10\.0 s"):
        rec.start_spot(12.0, 10.0, 20.0, 110.0)
    rec.start_spot(12.0, 10.0, 20.0, 120.0)  # the first one's window has passed: it is done
    assert len(rec.spots()) == 1
    with pytest.raises(SurveyError, match="beacon subject id"):
        SurveyRecorder(plan(), "member:m00001")


def test_the_recorder_keeps_only_the_tags_sightings_inside_the_spot_window() -> None:
    rec = SurveyRecorder(plan(), TAG)
    rec.observe([Sighting(99.0, "rx-a", TAG, -60, -59)])  # before any spot
    rec.start_spot(10.0, 10.0, 10.0, 100.0)
    rec.observe(
        [
            Sighting(99.9, "rx-a", TAG, -61, -59),  # before the window
            Sighting(100.0, "rx-a", TAG, -62, -59),
            Sighting(104.0, "rx-b", TAG, -80, -59),
            Sighting(104.5, "rx-a", "beacon:other:1:1", -50, -59),  # another beacon
            Sighting(105.0, "rx-a", "anon:0123456789abcdef", -55, -59),  # a phone
            Sighting(105.5, "rx-x", TAG, -70, -59),  # a receiver not in the plan
            Sighting(109.9, "rx-a", TAG, -64, -59),
        ]
    )
    st = rec.status(105.0)
    assert st["running"] == {"x": 10.0, "y": 10.0, "seconds_left": 5.0, "packets": {"rx-a": 2, "rx-b": 1}}
    assert st["spots_done"] == 0
    rec.observe([Sighting(110.0, "rx-b", TAG, -81, -59)])  # after the window (not kept), within LATE_S: still open
    assert rec.status(111.0)["running"] is None
    (spot,) = rec.spots()
    assert spot.rssi == {"rx-a": (-62, -64), "rx-b": (-80,)} and spot.ref_rssi == -59.0
    assert spot.start == 100.0 and spot.seconds == 10.0
    assert rec.status(111.0)["ignored"] == {"outside_window": 3, "unknown_receiver": 1, "late": 0}
    rec.discard(0)
    assert rec.spots() == []
    with pytest.raises(IndexError):
        rec.discard(0)


def test_the_reference_rssi_comes_from_the_frames_unless_overridden() -> None:
    for override, want in ((None, -65.0), (-59.0, -59.0)):
        rec = SurveyRecorder(plan(), TAG, ref_rssi_1m=override)
        rec.start_spot(10.0, 10.0, 5.0, 0.0)
        rec.observe([Sighting(1.0, "rx-a", TAG, -70, -65)])
        rec.status(10.0)
        assert rec.spots()[0].ref_rssi == want


def test_save_and_load_round_trip_and_a_moved_receiver_is_refused(tmp_path: Path) -> None:
    p = plan()
    m = SurveyMap(p, spots_from(p, [(4.0, 4.0), (10.0, 12.0), (30.0, 8.0)]), transmitter=TAG)
    path = tmp_path / "survey.json"
    m.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "visita-survey" and data["version"] == 1 and data["transmitter"] == TAG
    assert len(data["spots"]) == 3 and set(data["spots"][0]["rssi"]) == {"rx-a", "rx-b"}
    back = SurveyMap.load(path, p)
    xs, ys = np.array([4.0, 20.0, 31.0]), np.array([4.0, 10.0, 9.0])
    assert np.allclose(back.correction(xs, ys), m.correction(xs, ys))
    with pytest.raises(SurveyError, match=r"receiver rx-b moved from \[35\.0, 10\.0\] to \[30\.0, 10\.0\]"):
        SurveyMap.load(path, plan(rx_b=(30.0, 10.0)))
    other = p.model_copy(update={"walls": []})
    with pytest.raises(SurveyError, match=r"walls .* differ"):
        SurveyMap.load(path, other)
    data["plan"]["receivers"]["rx-a"] = [6.0, 10.0]  # edited without its fingerprint
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SurveyError, match="does not match its fingerprint"):
        SurveyMap.load(path, p)
    m.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["spots"][1]["seconds"] = 0  # a spot's length feeds the packet rate of the censored levels
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(SurveyError, match=r"spot 1 lasts 0 s; a spot lasts 3-600 s"):
        SurveyMap.load(path, p)
    path.write_text("{}", encoding="utf-8")
    with pytest.raises(SurveyError, match="not a survey file"):
        SurveyMap.load(path, p)


class ConstantMap(SurveyMap):
    """A map whose correction is a known constant per receiver."""

    def __init__(self, p: PlanConfig, per_receiver: list[float]) -> None:
        super().__init__(p, [])
        self.per_receiver = per_receiver

    def correction(self, x: object, y: object) -> np.ndarray:  # type: ignore[override]
        n = len(np.asarray(x))
        return np.repeat(np.array(self.per_receiver, dtype=np.float32)[:, None], n, axis=1)


def test_the_estimator_adds_the_maps_correction_to_its_model_mean() -> None:
    p = plan()
    cfg = EstimateConfig(surveyed_sigma_db=3.5)
    base = HmmEstimator(p, cfg)
    est = make_estimator(p, cfg, ConstantMap(p, [6.0, 0.0]))
    assert isinstance(est, HmmEstimator)
    assert np.allclose(est._mu[0], base._mu[0] + 6.0) and np.allclose(est._mu[1], base._mu[1])
    assert np.all(est._pdet[0] >= base._pdet[0]) and np.any(est._pdet[0] > base._pdet[0])
    d = est.diagnostics()
    assert d["sigma_db"] == 3.5 and d["survey"]["spots"] == 0
    assert base.diagnostics()["sigma_db"] == 5.0 and base.diagnostics()["survey"] is None
    assert HmmEstimator(p, EstimateConfig(), ConstantMap(p, [0.0, 0.0])).diagnostics()["sigma_db"] == 4.5
    assert HmmEstimator(p, EstimateConfig(surveyed_sigma_db=None), ConstantMap(p, [0.0, 0.0]))._cfg.sigma_db == 5.0
    # A phone at (8, 10) whose rx-a readings are 6 dB above the plain model there: with the map it is placed
    # there; without it, nearer to rx-a.
    j = int(np.argmin(np.hypot(base._cx - 8.0, base._cy - 10.0)))
    a, b = round(float(base._mu[0, j]) + 6.0 + 3.0), round(float(base._mu[1, j]) + 3.0)
    out = {}
    for name, e in (("plain", base), ("survey", est)):
        got = []
        for k in range(30):
            t = 1000.0 + k
            sightings = [Sighting(t + 0.1, "rx-a", "anon:x", a, -59), Sighting(t + 0.2, "rx-b", "anon:x", b, -59)]
            got += e.update(sightings, t + 1.0)
        out[name] = got[-1]
    assert out["survey"].x is not None and out["plain"].x is not None
    assert abs(out["survey"].x - 8.0) < 1.5 < abs(out["plain"].x - 8.0)
    # Applied on a running estimator (the installer's apply): the same model, the subject's state kept.
    base.use_survey(ConstantMap(p, [6.0, 0.0]))
    assert np.array_equal(base._mu, est._mu) and np.array_equal(base._pdet, est._pdet) and base._cfg.sigma_db == 3.5
    assert base.diagnostics()["survey"]["spots"] == 0 and "anon:x" in base._rows
    base.use_survey(None)
    assert np.array_equal(base._mu, base._mu_plain) and base._cfg.sigma_db == 5.0


def test_a_map_for_another_plan_or_path_loss_model_is_refused_by_the_estimator() -> None:
    m = SurveyMap(plan(), [])
    with pytest.raises(SurveyError, match="rx-b moved"):
        HmmEstimator(plan(rx_b=(30.0, 12.0)), EstimateConfig(), m)
    with pytest.raises(SurveyError, match=r"path_loss_exponent 2\.2"):
        HmmEstimator(plan(), EstimateConfig(path_loss_exponent=2.5), m)


def test_the_simulated_survey_stands_where_people_can_in_the_same_shadowing() -> None:
    sc = load_scenario("supermarket")
    spots = survey_spots(sc, 3.0)
    assert 100 < len(spots) < 200
    inside = [z for z in sc.zones if not z.outside]
    for x, y in spots:
        assert sc.zone_of((x, y)) in {z.id for z in inside}
        for w in sc.walls:
            for (x1, y1), (x2, y2) in zip(w.points[:-1], w.points[1:], strict=True):
                dx, dy = x2 - x1, y2 - y1
                t = min(max(((x - x1) * dx + (y - y1) * dy) / (dx * dx + dy * dy), 0.0), 1.0)
                assert math.hypot(x - x1 - t * dx, y - y1 - t * dy) >= WALL_CLEARANCE_M
    end = sc.start_ts() + 7200
    world, planned, tag = survey_world(sc, 2, 5.0, 10.0, end)
    assert tag == TAG and planned[-1].start + planned[-1].seconds < end
    assert np.array_equal(world.channel.fields, World(sc, 2, end).channel.fields)
    assert world.summary()["shoppers"] == 0 and world.summary()["staff"] == 0


def test_visita_eval_with_a_survey(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "mall-unit", "--duration", "3m", "--survey", "4", "--survey-seconds", "10", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    sv = r["run"]["survey"]
    assert sv["spots"] > 5 and sv["spacing_m"] == 4.0 and sv["spot_seconds"] == 10.0
    assert sv["installer_s"] >= sv["spots"] * 10.0
    assert r["run"]["estimator"]["survey"]["spots"] == sv["spots"]
    assert 0.0 <= r["zone_accuracy"] <= 1.0 and r["baseline"]["zone_accuracy"] >= 0.0
    with pytest.raises(SystemExit) as exc:
        main(["eval", "mall-unit", "--duration", "1m", "--survey", "0.1"])
    assert exc.value.code == 2 and "must be 0.5..50 metres" in capsys.readouterr().err


def test_a_survey_in_which_no_receiver_heard_the_tag_is_not_applied(tmp_path: Path) -> None:
    """A wrong survey.transmitter id: every spot is "heard by no receiver", and the map used to be applied anyway
    (the estimator then ran with the surveyed spread on a map that measured nothing)."""
    from test_checkins import NoAdverts

    from gateway.config import Settings, SurveyConfig
    from gateway.identity import MemberDirectory
    from gateway.points import load_rules
    from gateway.runtime import Gateway, SurveyRefused
    from gateway.store import Store

    settings = Settings(survey=SurveyConfig(transmitter="beacon:no-such-tag"))
    with Store(tmp_path) as store:
        gw = Gateway(settings, store, NoAdverts(), MemberDirectory(), load_rules(None), [])
        gw.step(1_790_000_000.0)
        for x in (5.0, 15.0):
            gw.survey_spot(x, 5.0, 5)
            gw.step(gw.now + 6)
        with pytest.raises(SurveyRefused, match=r"no receiver heard the survey tag \(beacon:no-such-tag") as refused:
            gw.survey_apply()
        assert refused.value.status == 409 and not gw.survey_path.exists() and gw.survey_map is None
        gw.checkins.close()


def test_survey_status_says_why_a_survey_file_is_not_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It said only "in use: no survey map"; the reason was in /api/v1/status and the log."""
    from test_checkins import NoAdverts

    from gateway.cli import _print_survey
    from gateway.config import Settings, SurveyConfig
    from gateway.identity import MemberDirectory
    from gateway.points import load_rules
    from gateway.runtime import Gateway
    from gateway.store import Store

    (tmp_path / "survey.json").write_text("{not json")
    settings = Settings(survey=SurveyConfig(transmitter="beacon:tag"))
    with Store(tmp_path) as store:
        gw = Gateway(settings, store, NoAdverts(), MemberDirectory(), load_rules(None), [])
        status = gw.survey_status()
        gw.checkins.close()
    assert status["applied"] is None and status["problem"] and "survey.json" in status["problem"], status
    _print_survey(status)
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == ["in use: no survey map", f"not used: {status['problem']}"], out
