"""Tests for gateway.visits on hand-built estimate sequences: start, zones, end, dwell, path, classification; and one
visit across store-local midnight through the whole gateway."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from firmware_sim.scenario import load_scenario
from firmware_sim.world import World
from gateway.config import Settings, VisitsConfig
from gateway.identity import MemberDirectory
from gateway.model import Event, SubjectLink, VisitChange, ZoneEstimate
from gateway.points import load_rules
from gateway.runtime import Gateway
from gateway.store import Store
from gateway.visits import VisitTracker
from sensors.sim import SimSource

T0 = 1_764_000_000.0
SHOPPER = "anon:5a5a5a5a5a5a5a5a"
WALKER = "anon:0b0b0b0b0b0b0b0b"
CFG = VisitsConfig(absence_timeout_s=60, min_dwell_s=45, staff=["s-7"])


def inside(t: float, zone: str, subject: str = SHOPPER, sure: bool | None = None) -> ZoneEstimate:
    return ZoneEstimate(T0 + t, subject, zone, True, -65.0, sure=sure)


def outside(t: float, subject: str = SHOPPER) -> ZoneEstimate:
    return ZoneEstimate(T0 + t, subject, "sidewalk", False, -93.0)


def tracker(cfg: VisitsConfig = CFG, gateway: str = "gw-1") -> VisitTracker:
    return VisitTracker(gateway, cfg)


def run(t: VisitTracker, script: dict[float, list[ZoneEstimate]], until: float, step: float = 1.0) -> list[VisitChange]:
    """Tick every `step` seconds from 0 to `until`, handing over the estimates scripted for that tick."""
    out: list[VisitChange] = []
    n = round(until / step)
    for i in range(n + 1):
        now = i * step
        out += t.update(script.get(now, []), T0 + now)
    return out


def shopper_script() -> dict[float, list[ZoneEstimate]]:
    """Sidewalk 0-8 s, entrance 10-38, produce 40-158, bakery 160-248, produce 250-278, checkout 280-310,
    sidewalk 312-320, then gone. An estimate every 2 s."""
    plan = [(0, 10, None), (10, 40, "entrance"), (40, 160, "produce"), (160, 250, "bakery")]
    plan += [(250, 280, "produce"), (280, 312, "checkout"), (312, 322, None)]
    script: dict[float, list[ZoneEstimate]] = {}
    for start, end, zone in plan:
        for t in range(start, end, 2):
            script[float(t)] = [outside(t) if zone is None else inside(t, zone)]
    return script


# --------------------------------------------------------------------------- a shopper


def test_a_five_minute_shopper_starts_moves_and_ends_with_dwell_path_and_zone_dwell() -> None:
    changes = run(tracker(), shopper_script(), until=500)
    kinds = [(c.kind, c.ts - T0) for c in changes]
    # started once inside for 45 s: first inside at 10, so at the first estimate at or after 55 (56)
    # zone changes reported only once it is a visit (entrance → produce at 40 came before that)
    # ended when nothing was heard for 60 s after the last sighting at 320 (on the sidewalk)
    assert kinds == [("started", 56), ("zone", 160), ("zone", 250), ("zone", 280), ("ended", 320)]
    started, *zone_changes, ended = changes
    assert started.visit.started == T0 + 10 and started.visit.ended is None
    assert started.visit.classification == "visitor" and started.visit.source == "ble"
    assert started.visit.path == ("entrance", "produce")
    assert [(c.from_zone, c.visit.zone) for c in zone_changes] == [
        ("produce", "bakery"),
        ("bakery", "produce"),
        ("produce", "checkout"),
    ]
    v = ended.visit
    assert v.ended == T0 + 320
    assert v.dwell_s == pytest.approx(300.0)  # first inside 10 → last inside 310
    assert v.path == ("entrance", "produce", "bakery", "produce", "checkout")
    assert v.zone_dwell() == pytest.approx({"entrance": 30, "produce": 120 + 30, "bakery": 90, "checkout": 30})
    assert sum(v.zone_dwell().values()) == pytest.approx(v.dwell_s)
    assert v.visit_id == started.visit.visit_id == zone_changes[0].visit.visit_id


def test_a_moment_put_outside_and_back_in_the_same_zone_is_no_zone_change() -> None:
    """The estimator puts a shopper in the bakery outside for a second (or two): back in the bakery is no move, so
    no zone.changed from bakery to bakery (a run of the demo store at 20x for 3 h published 373 such events)."""
    script = {float(s): [inside(s, "entrance" if s < 60 else "bakery")] for s in range(0, 120, 2)}
    script[90.0] = [outside(90)]
    script[150.0] = [outside(150)]
    script.update({float(s): [inside(s, "produce")] for s in (152, 154, 156)})  # out, then into another zone
    changes = run(tracker(), script, until=300)
    moves = [(c.from_zone, c.visit.zone) for c in changes if c.kind == "zone"]
    assert moves == [("entrance", "bakery"), ("bakery", "produce")], moves


def test_the_visit_ends_exactly_after_the_absence_timeout_as_of_now() -> None:
    t = tracker()
    for s in range(0, 100, 5):
        assert not [c for c in t.update([inside(s, "produce")], T0 + s) if c.kind == "ended"]
    # last heard at 95: still open at 155 (60 s later), ended once now is past 155
    assert t.update([], T0 + 155) == []
    assert len(t.open_visits()) == 1
    (ended,) = t.update([], T0 + 155.5)
    assert (ended.kind, ended.ts, ended.visit.dwell_s) == ("ended", T0 + 95, 95)
    d = t.diagnostics()
    assert t.open_visits() == [] and (d["sessions"], d["open_visits"], d["staff_not_visits"]) == (0, 0, 0)


def test_the_path_lists_stays_not_seconds_flickering_across_a_zone_edge() -> None:
    script = {float(s): [inside(s, "produce")] for s in range(0, 60, 2)}
    script.update({float(s): [inside(s, "bakery")] for s in (30, 32, 34)})  # 6 s across the edge and back
    script.update({float(s): [inside(s, "checkout")] for s in range(60, 90, 2)})
    script[90.0] = [inside(90, "grocery")]  # heard there once on the way out
    (ended,) = [c for c in run(tracker(), script, until=300) if c.kind == "ended"]
    v = ended.visit
    assert v.path == ("produce", "checkout")  # the two produce stays are one: bakery was no stop
    assert v.zone_dwell() == pytest.approx({"produce": 54, "bakery": 6, "checkout": 30, "grocery": 0})
    assert v.zone == "grocery"
    short = {float(s): [inside(s, "entrance" if s < 4 else "produce")] for s in range(0, 14, 2)}
    (ended,) = run(tracker(), short, until=100)  # 12 s inside: a pass-by, whose path is its longest zone
    assert (ended.visit.classification, ended.visit.path) == ("pass-by", ("produce",))


def test_open_visits_show_only_qualified_sessions() -> None:
    t = tracker()
    t.update([inside(0, "entrance"), inside(0, "entrance", WALKER)], T0)
    t.update([inside(50, "produce")], T0 + 50)
    (v,) = t.open_visits()
    assert (v.subject, v.ended, v.path, v.zone) == (SHOPPER, None, ("entrance",), "produce")
    assert t.diagnostics() | {"sessions": 2, "open_visits": 1, "staff_not_visits": 0} == t.diagnostics()


# --------------------------------------------------------------------------- pass-by


def test_a_pedestrian_on_the_sidewalk_for_20_s_is_a_pass_by_and_never_starts() -> None:
    script = {float(s): [outside(s, WALKER)] for s in range(0, 21, 2)}
    changes = run(tracker(), script, until=200)
    assert [c.kind for c in changes] == ["ended"]
    v = changes[0].visit
    assert v.classification == "pass-by"
    assert (v.segments, v.path, v.dwell_s) == ((), (), 0.0)
    assert (v.started, v.ended) == (T0, T0 + 20)


def test_stepping_into_the_entrance_for_less_than_min_dwell_is_still_a_pass_by() -> None:
    script = {float(s): [outside(s, WALKER)] for s in range(0, 60, 2)}
    for s in range(20, 40, 2):  # 18 s at the door, after 20 s on the sidewalk and before 20 more
        script[float(s)] = [inside(s, "entrance", WALKER)]
    changes = run(tracker(), script, until=200)
    assert [(c.kind, c.visit.classification) for c in changes] == [("ended", "pass-by")]
    assert changes[0].visit.path == ("entrance",)


def test_min_dwell_zero_starts_at_the_first_inside_estimate() -> None:
    t = tracker(VisitsConfig(absence_timeout_s=60, min_dwell_s=0))
    assert t.update([outside(0)], T0) == []
    (c,) = t.update([inside(1, "entrance")], T0 + 1)
    assert (c.kind, c.ts, c.visit.started) == ("started", T0 + 1, T0 + 1)


def test_standing_at_the_window_put_inside_but_never_sure_is_no_visit_however_long() -> None:
    # The HMM put a pedestrian at the shop window just inside for two minutes, but no second of it was sure:
    # a place outside explained the signals about as well. A pass-by, not a visit.
    script = {float(s): [outside(s, WALKER)] for s in range(0, 200)}
    for s in range(30, 150):
        script[float(s)] = [inside(s, "entrance", WALKER, sure=False)]
    changes = run(tracker(), script, until=300)
    assert [(c.kind, c.visit.classification) for c in changes] == [("ended", "pass-by")]
    assert changes[0].visit.dwell_s == 119.0, "the inside time is still kept, for footfall"


def test_a_visit_starts_once_min_dwell_inside_and_min_sure_of_it_sure() -> None:
    # In the entrance 0-59 s, unsure (the glass front could explain it); then in produce, sure. Inside for
    # 45 s at 45, but only at 69 has it been sure for 10 s (each second counts as what ends it: 59-60 is sure).
    script = {float(s): [inside(s, "entrance", sure=False)] for s in range(0, 60)}
    script.update({float(s): [inside(s, "produce", sure=True)] for s in range(60, 120)})
    changes = run(tracker(), script, until=119)
    assert [(c.kind, c.ts - T0) for c in changes] == [("started", 69)]
    assert changes[0].visit.started == T0, "dated at the first inside estimate, sure or not"
    # min_sure_s 0: inside time alone decides, as with the baseline, whose estimates say nothing (None)
    loose = tracker(VisitsConfig(absence_timeout_s=60, min_dwell_s=45, min_sure_s=0))
    assert [(c.kind, c.ts - T0) for c in run(loose, script, until=119)] == [("started", 45), ("zone", 60)]
    unknown = {float(s): [inside(s, "entrance")] for s in range(0, 60)}
    assert [(c.kind, c.ts - T0) for c in run(tracker(), unknown, until=59)] == [("started", 45)]


def test_sure_time_of_two_linked_addresses_adds_up() -> None:
    old, new = "anon:1111111111111111", "anon:2222222222222222"
    t = tracker()
    script = {float(s): [inside(s, "produce", old, sure=s >= 24)] for s in range(0, 30)}  # 6 s sure
    script.update({float(s): [inside(s, "produce", new, sure=s >= 56)] for s in range(35, 60)})  # 4 s sure
    assert [c for c in run(t, script, until=59) if c.kind == "started"] == []
    (c,) = t.link(SubjectLink(T0 + 60, old, new, "handover"))
    assert c.kind == "started", "together 53 s inside, 10 s of it sure"


# --------------------------------------------------------------------------- staff


def test_a_staff_member_is_classified_staff_from_start_to_end() -> None:
    staff = "member:s-7"
    script = {float(s): [inside(s, "checkout", staff)] for s in range(0, 120, 5)}
    changes = run(tracker(), script, until=300)
    assert [(c.kind, c.visit.classification) for c in changes] == [("started", "staff"), ("ended", "staff")]
    assert changes[1].visit.member == "s-7"


def test_a_member_not_on_the_staff_list_is_a_visitor() -> None:
    script = {float(s): [inside(s, "checkout", "member:s-8")] for s in range(0, 120, 5)}
    assert {c.visit.classification for c in run(tracker(), script, until=300)} == {"visitor"}


def test_a_staff_member_passing_by_ends_no_visit() -> None:
    # Staff are not in footfall and have no visit that started: a staff session that never qualified
    # must not come out as an ended visit (visit.ended without visit.started).
    staff = "member:s-7"
    t = tracker()
    script = {float(s): [outside(s, staff)] for s in range(0, 20, 2)}
    changes = run(t, script, until=200)
    assert changes == []
    assert t.diagnostics() | {"sessions": 0, "open_visits": 0, "staff_not_visits": 1} == t.diagnostics()


# --------------------------------------------------------------------------- ids


def test_visit_ids_are_deterministic_and_differ_by_gateway_subject_and_session() -> None:
    def ids(gateway: str, script: dict[float, list[ZoneEstimate]]) -> list[str]:
        return [c.visit.visit_id for c in run(tracker(gateway=gateway), script, until=500)]

    first = ids("gw-1", shopper_script())
    assert len(set(first)) == 1 and len(first[0]) == 24 and int(first[0], 16) >= 0
    assert ids("gw-1", shopper_script()) == first  # a replay of the same data gives the same id
    assert set(ids("gw-2", shopper_script())).isdisjoint(first)
    other = {
        t: [ZoneEstimate(e.ts, WALKER, e.zone, e.inside, e.rssi) for e in es] for t, es in shopper_script().items()
    }
    assert set(ids("gw-1", other)).isdisjoint(first)

    # the same subject coming back after the absence timeout is a new visit
    t = tracker()
    back = {**shopper_script(), **{float(s): [inside(s, "produce")] for s in range(400, 480, 2)}}
    changes = run(t, back, until=700)
    ended = [c.visit for c in changes if c.kind == "ended"]
    assert len(ended) == 2 and ended[0].visit_id != ended[1].visit_id
    assert ended[0].visit_id == first[0]


# --------------------------------------------------------------------------- order and duplicates


def _batched(script: dict[float, list[ZoneEstimate]], every: int) -> dict[float, list[ZoneEstimate]]:
    """The same estimates delivered `every` seconds at a time, newest first, each one twice."""
    out: dict[float, list[ZoneEstimate]] = {}
    for t, es in script.items():
        due = float((int(t) // every + 1) * every)
        out.setdefault(due, []).extend(es + es)
    return {t: sorted(es, key=lambda e: -e.ts) for t, es in out.items()}


def test_unsorted_batches_with_duplicates_give_the_same_visit() -> None:
    reference = next(c for c in run(tracker(), shopper_script(), until=500) if c.kind == "ended").visit
    shuffled = run(tracker(), _batched(shopper_script(), every=10), until=500)
    assert [c.kind for c in shuffled].count("started") == 1
    assert [c.kind for c in shuffled].count("ended") == 1
    got = shuffled[-1].visit
    assert (got.visit_id, got.started, got.ended, got.segments) == (
        reference.visit_id,
        reference.started,
        reference.ended,
        reference.segments,
    )


def test_a_late_estimate_from_an_earlier_zone_does_not_split_the_path() -> None:
    # A remote receiver's sighting that arrives a tick late and says "entrance" must not add
    # entrance → produce → entrance → produce to the path, nor report zone changes that never happened.
    t = tracker()
    changes: list[VisitChange] = []
    for s in range(0, 60, 2):
        changes += t.update([inside(s, "entrance")], T0 + s)
    for s in range(60, 120, 2):
        changes += t.update([inside(s, "produce")], T0 + s)
        if s == 70:
            changes += t.update([inside(58, "entrance")], T0 + s)  # late
    changes += t.update([], T0 + 300)
    assert [(c.kind, c.from_zone) for c in changes] == [("started", None), ("zone", "entrance"), ("ended", None)]
    v = changes[-1].visit
    assert v.path == ("entrance", "produce")
    assert all(a.left <= b.entered for a, b in zip(v.segments, v.segments[1:], strict=False))


def test_equal_timestamps_in_one_zone_do_not_create_segments() -> None:
    t = tracker()
    t.update([inside(0, "produce"), inside(0, "produce"), inside(10, "produce"), inside(10, "produce")], T0 + 10)
    (v,) = [c.visit for c in t.update([inside(50, "produce")], T0 + 50)]
    assert (v.path, v.dwell_s) == (("produce",), 50)


# --------------------------------------------------------------------------- time outside, rotation, tick size


def test_time_outside_mid_visit_counts_toward_no_zone_and_not_toward_dwell() -> None:
    script = {float(s): [inside(s, "produce")] for s in range(0, 60, 2)}
    script |= {float(s): [outside(s)] for s in range(60, 90, 2)}  # out on the sidewalk for 30 s
    script |= {float(s): [inside(s, "produce")] for s in range(90, 150, 2)}
    v = next(c for c in run(tracker(), script, until=400) if c.kind == "ended").visit
    assert v.zone_dwell() == pytest.approx({"produce": 58 + 58})
    assert v.dwell_s == pytest.approx(116) and v.path == ("produce",)


def test_flickering_inside_from_the_sidewalk_does_not_make_a_visit() -> None:
    # A pedestrian at the window: outside, with an inside estimate every 20 s. The span from the first to the
    # last inside estimate is long, but the time inside is not.
    script = {float(s): [outside(s, WALKER)] for s in range(0, 120, 2)}
    script |= {float(s): [inside(s, "entrance", WALKER)] for s in range(0, 120, 20)}
    assert [(c.kind, c.visit.classification) for c in run(tracker(), script, until=300)] == [("ended", "pass-by")]


@pytest.mark.parametrize("step", [0.25, 1.0, 5.0])
def test_the_tick_size_does_not_change_the_visit(step: float) -> None:
    reference = next(c for c in run(tracker(), shopper_script(), until=500) if c.kind == "ended").visit
    due: dict[float, list[ZoneEstimate]] = {}
    for t, es in shopper_script().items():  # the same estimates, handed over at the next tick of `step`
        due.setdefault(round((int(t / step) + 1) * step, 6), []).extend(es)
    got = next(c for c in run(tracker(), due, until=500, step=step) if c.kind == "ended").visit
    assert (got.started, got.ended, got.segments, got.classification) == (
        reference.started,
        reference.ended,
        reference.segments,
        reference.classification,
    )


def test_changed_visits_lists_each_open_visit_once_after_it_was_heard_or_checked_in() -> None:
    t = tracker()
    t.update([inside(s, "produce") for s in range(0, 50, 2)] + [inside(0, "entrance", WALKER)], T0 + 50)
    (v,) = t.changed_visits()  # the walker's session is no visit: not listed
    assert v.subject == SHOPPER and v.dwell_s == pytest.approx(48)
    assert t.changed_visits() == []  # nothing new since
    t.update([], T0 + 51)
    assert t.changed_visits() == []  # a tick without its estimates changes nothing the rules look at
    t.update([inside(52, "bakery")], T0 + 52)
    assert [(v.path, v.zone) for v in t.changed_visits()] == [(("produce",), "bakery")]
    t.checkin("member:m-1", T0 + 53)
    assert [v.subject for v in t.changed_visits()] == ["member:m-1"]
    t.mark_all_changed()
    assert sorted(v.subject for v in t.changed_visits()) == [SHOPPER, "member:m-1"]
    assert t.open_visit(SHOPPER) is not None and t.open_visit(WALKER) is None and t.open_visit("member:x") is None
    t.update([], T0 + 500)  # both ended: an ended visit is never listed as open
    t.mark_all_changed()
    assert t.changed_visits() == []


def at(
    t: float, x: float, y: float, zone: str = "produce", subject: str = SHOPPER, inside_: bool = True
) -> ZoneEstimate:
    return ZoneEstimate(T0 + t, subject, zone, inside_, -65.0, x, y, 1.0)


def test_moved_m_is_how_far_the_smoothed_position_got_from_where_the_phone_settled() -> None:
    t = tracker(VisitsConfig(absence_timeout_s=60, min_dwell_s=0))
    # Still for a minute at (5, 5), with the estimate wandering ±2 m each second, then a walk of 20 m east.
    jitter = [(2.0, 0.0), (-2.0, 1.5), (0.5, -2.0), (-1.0, 2.0), (1.5, -1.5)]
    script = {float(s): [at(s, 5 + jitter[s % 5][0], 5 + jitter[s % 5][1])] for s in range(60)}
    run(t, script, 59)
    (still,) = t.open_visits()
    assert still.moved_m is not None and still.moved_m < 2.0, still.moved_m
    walk = {float(s): [at(s, 5 + (s - 60) * 1.0, 5)] for s in range(60, 80)}  # 1 m/s for 20 s
    walk.update({float(s): [at(s, 25, 5)] for s in range(80, 200)})
    out = t.update([e for s in sorted(walk) for e in walk[s]], T0 + 199)
    assert out == []
    (moved,) = t.open_visits()
    assert moved.moved_m is not None and 18.0 < moved.moved_m <= 20.5, moved.moved_m


def test_moved_m_counts_inside_positions_only_and_is_none_without_any() -> None:
    t = tracker(VisitsConfig(absence_timeout_s=60, min_dwell_s=0))
    run(t, {0.0: [inside(0, "produce")], 1.0: [inside(1, "produce")]}, 1)
    (v,) = t.open_visits()
    assert v.moved_m is None, "the baseline's estimates carry no position"
    t2 = tracker(VisitsConfig(absence_timeout_s=60, min_dwell_s=0))
    script = {float(s): [at(s, 5, 5)] for s in range(40)}
    script.update({float(s): [at(s, 5 + s, -3, "sidewalk", inside_=False)] for s in range(40, 80)})  # walks off outside
    run(t2, script, 79)
    (v2,) = t2.open_visits()
    assert v2.moved_m == 0.0


def test_a_merged_session_keeps_the_larger_movement_of_its_two_addresses() -> None:
    t = tracker(VisitsConfig(absence_timeout_s=60, min_dwell_s=300))
    old, new = "anon:1111111111111111", "anon:2222222222222222"
    script = {float(s): [at(s, 5 + s * 0.5, 5, subject=old)] for s in range(100)}  # walks 50 m over 100 s
    script.update({float(s): [at(s, 55, 5, subject=new)] for s in range(101, 160)})  # the next address, still
    run(t, script, 159)
    assert t.link(SubjectLink(T0 + 160, old, new, "handover")) == []  # together 159 s inside: no visit yet
    out = t.update([at(200, 55, 5, subject=new)] + [at(s, 55, 5, subject=new) for s in range(201, 420)], T0 + 420)
    started = [c.visit for c in out if c.kind == "started"]
    assert started and started[0].moved_m is not None and started[0].moved_m > 30, started


# --------------------------------------------------------------------------- restarts (take_kept, restore)

MEMBER = "member:m-00017"


class Kept:
    """What a store holds of a tracker's open visits (`take_kept` applied call after call), and as of when."""

    def __init__(self) -> None:
        self.visits: dict[str, dict[str, object]] = {}
        self.as_of = 0.0

    def take(self, t: VisitTracker, now: float, everything: bool = False) -> None:
        kept, ended = t.take_kept(now, everything)
        self.visits.update((str(v["visit_id"]), v) for v in kept)
        for visit_id in ended:
            self.visits.pop(visit_id, None)
        self.as_of = t.now


def run_kept(
    t: VisitTracker, kept: Kept, script: dict[float, list[ZoneEstimate]], start: float, until: float
) -> list[VisitChange]:
    """`run` from `start`, the store taking what the tracker keeps after every tick."""
    out: list[VisitChange] = []
    for i in range(round(start), round(until) + 1):
        out += t.update(script.get(float(i), []), T0 + i)
        kept.take(t, T0 + i)
    return out


def _member_visit_then_stop(until: float = 120) -> tuple[Kept, list[VisitChange]]:
    """A member inside the produce zone from 10 s on, heard every 2 s until `until`, and an anonymous visitor in the
    bakery; then a stop that a restart will follow."""
    t, kept = tracker(), Kept()
    script: dict[float, list[ZoneEstimate]] = {}
    for s in range(10, int(until) + 1, 2):
        script[float(s)] = [inside(s, "produce", MEMBER), inside(s, "bakery")]
    changes = run_kept(t, kept, script, 0, until)
    changes += t.end_for_restart(T0 + until)
    kept.take(t, T0 + until, everything=True)
    return kept, changes


def test_a_members_visit_goes_on_across_a_restart_with_its_id_and_ends_once() -> None:
    kept, changes = _member_visit_then_stop()
    started = {c.visit.subject: c.visit.visit_id for c in changes if c.kind == "started"}
    # The anonymous visitor ends at the stop (its hash is new after a restart); the member's visit does not.
    assert [(c.kind, c.visit.subject, c.ts - T0) for c in changes if c.kind == "ended"] == [("ended", SHOPPER, 120)]
    assert [v["subject"] for v in kept.visits.values()] == [MEMBER] and kept.as_of == T0 + 120

    after = tracker()
    assert after.restore(list(kept.visits.values()), kept.as_of, T0 + 150) == []  # down for 30 s
    assert after.diagnostics()["resumed"] == 1
    (visit,) = after.open_visits()
    assert visit.visit_id == started[MEMBER] and visit.dwell_s == 110
    # Absence counts from the restart: nothing heard by 150 + 60 would end it; heard at 170 in the same zone, the
    # 50 s the gateway was not listening are the zone's dwell, and no second start is reported.
    assert after.update([], T0 + 209) == []
    script = {float(s): [inside(s, "produce", MEMBER)] for s in range(170, 200, 2)}
    changes = run(after, script, until=300)
    assert [(c.kind, c.visit.visit_id, c.ts - T0) for c in changes] == [("ended", started[MEMBER], 198)]
    assert changes[0].visit.zone_dwell() == {"produce": 188} and changes[0].visit.started == T0 + 10
    assert after.take_kept(T0 + 300) == ([], [started[MEMBER]])  # the store forgets it with its end


def test_a_kept_visit_ends_at_its_last_sighting_when_the_restart_comes_too_late_or_the_clock_went_back() -> None:
    kept, _ = _member_visit_then_stop()
    for now, as_of in ((120 + CFG.resume_within_s + 1, kept.as_of), (100, kept.as_of), (130, None)):
        after = tracker()
        (change,) = after.restore(list(kept.visits.values()), as_of, T0 + now)
        assert (change.kind, change.ts, change.visit.subject, change.visit.classification) == (
            "ended",
            T0 + 120,
            MEMBER,
            "visitor",
        )
        assert after.open_visits() == [] and after.diagnostics()["resumed"] == 0


def test_after_a_power_loss_an_anonymous_visit_ends_at_its_last_sighting_and_a_member_goes_on() -> None:
    t, kept = tracker(), Kept()
    script = {float(s): [inside(s, "produce", MEMBER), inside(s, "bakery")] for s in range(10, 111, 2)}
    run_kept(t, kept, script, 0, 110)  # then the power goes: no stop ended anything
    assert sorted(str(v["subject"]) for v in kept.visits.values()) == sorted([MEMBER, SHOPPER])
    # Kept at their start (56 s), not every second: a power loss costs at most KEEP_REFRESH_S of dwell.
    assert {v["last"] for v in kept.visits.values()} == {T0 + 56}
    after = tracker()
    changes = after.restore(list(kept.visits.values()), kept.as_of, T0 + 140)
    assert [(c.kind, c.visit.subject, c.ts - T0) for c in changes] == [("ended", SHOPPER, 56)]
    assert [v.subject for v in after.open_visits()] == [MEMBER]


def test_with_a_store_secret_an_anonymous_visit_goes_on_across_a_restart_on_its_latest_address_too() -> None:
    # A store secret (identity.anon_secret_file) hashes a phone to the same subject after a restart that day: its
    # visit goes on as a member's does, also on the address it moved to before the stop (the handover's alias).
    moved = "anon:7c7c7c7c7c7c7c7c"
    t, kept = VisitTracker("gw-1", CFG, anon_resume=True), Kept()
    script = {float(s): [inside(s, "bakery")] for s in range(10, 81, 2)}
    script |= {float(s): [inside(s, "bakery", moved)] for s in range(82, 121, 2)}
    changes = run_kept(t, kept, {k: v for k, v in script.items() if k < 82}, 0, 81)
    changes += t.link(SubjectLink(T0 + 82, SHOPPER, moved, "handover"))
    changes += run_kept(t, kept, {k: v for k, v in script.items() if k >= 82}, 82, 120)
    changes += t.end_for_restart(T0 + 120)
    kept.take(t, T0 + 120, everything=True)
    (started,) = [c.visit.visit_id for c in changes if c.kind == "started"]
    assert [c.kind for c in changes if c.kind == "ended"] == [], "a restart will go on with it: not ended at the stop"

    after = VisitTracker("gw-1", CFG, anon_resume=True)
    assert after.restore(list(kept.visits.values()), kept.as_of, T0 + 150) == []
    changes = run(after, {float(s): [inside(s, "bakery", moved)] for s in range(160, 200, 2)}, until=300)
    assert [(c.kind, c.visit.visit_id, c.ts - T0) for c in changes] == [("ended", started, 198)]
    assert changes[0].visit.zone_dwell() == {"bakery": 188}

    # Without a secret the same kept visit ends at its last sighting: the phone's hash is new after the restart.
    plain = tracker()
    (ended,) = plain.restore(list(kept.visits.values()), kept.as_of, T0 + 150)
    assert (ended.kind, ended.visit.visit_id, ended.ts - T0) == ("ended", started, 120)


def test_open_visits_are_kept_at_their_start_each_zone_they_enter_and_every_minute() -> None:
    t = tracker()
    taken: list[tuple[float, float]] = []  # (tick, the kept visit's last sighting) whenever the tracker hands it over
    script = {float(s): [inside(s, "produce" if s < 150 else "bakery", MEMBER)] for s in range(10, 300, 2)}
    for i in range(300):
        t.update(script.get(float(i), []), T0 + i)
        visits, ended = t.take_kept(T0 + i)
        taken += [(i, float(v["last"]) - T0) for v in visits]  # type: ignore[arg-type]
        assert ended == []
    assert [i for i, _ in taken] == [56, 120, 150, 210, 270], taken  # started, a minute on, bakery, each minute
    assert all(last == i for i, last in taken)


def test_a_kept_visit_that_is_not_what_take_kept_writes_is_left_out_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    kept, _ = _member_visit_then_stop()
    (good,) = kept.visits.values()
    bad = [{"subject": MEMBER}, {**good, "segments": [["a", 1]]}, {**good, "qualified": 1}, {**good, "last": "x"}]
    after = tracker()
    with caplog.at_level("WARNING", logger="visita.visits"):
        assert after.restore([*bad, good], kept.as_of, T0 + 130) == []
    assert len(after.open_visits()) == 1 and caplog.text.count("not usable") == len(bad)
    assert after.take_kept(T0 + 130)[1] == [], "an unusable one under a usable one's id does not make it forgotten"
    other = tracker()
    other.restore([{**good, "visit_id": "f" * 24, "qualified": 1}, {"visit_id": 7}], kept.as_of, T0 + 130)
    assert other.take_kept(T0 + 130)[1] == ["f" * 24], "unusable ones with an id of their own are forgotten"


def test_a_member_with_two_kept_visits_goes_on_with_one_and_the_other_ends() -> None:
    kept, _ = _member_visit_then_stop()
    (good,) = kept.visits.values()
    after = tracker()
    (ended,) = after.restore([good, {**good, "visit_id": "another-visit"}], kept.as_of, T0 + 130)
    assert ended.kind == "ended" and ended.visit.visit_id == "another-visit"
    assert [v.visit_id for v in after.open_visits()] == [good["visit_id"]]


def test_a_member_heard_first_under_a_new_address_after_a_restart_keeps_one_visit_going() -> None:
    """After a restart the address-to-member map is gone: the phone's adverts are anonymous until a member frame
    comes, and that anonymous session may be a visit already. The kept visit, not heard since, ends where it was last
    heard; the new one goes on as the member's. One person, one open visit."""
    kept, _ = _member_visit_then_stop()
    after = tracker()
    after.restore(list(kept.visits.values()), kept.as_of, T0 + 130)
    script = {float(s): [inside(s, "produce", WALKER)] for s in range(130, 181, 2)}
    started = [c for s in range(130, 181) for c in after.update(script.get(float(s), []), T0 + s)]
    assert [c.kind for c in started] == ["started"] and started[0].visit.subject == WALKER
    changes = after.link(SubjectLink(T0 + 180, WALKER, MEMBER, "member"))
    assert [(c.kind, c.visit.subject, c.ts - T0) for c in changes] == [("ended", MEMBER, 120)]
    (visit,) = after.open_visits()
    assert visit.subject == MEMBER and visit.visit_id == started[0].visit.visit_id
    after.update([inside(182, "bakery", MEMBER)], T0 + 182)  # the member's own frames now join that visit
    assert [[g.zone for g in v.segments] for v in after.open_visits()] == [["produce", "bakery"]]
    assert after.diagnostics()["links_ended_stale"] == 1


def test_an_award_has_its_visit_kept_as_it_is_in_the_same_write() -> None:
    """A visit is kept at its start and about every minute; the points it earns in between are stored at once. A power
    loss then left an award for 120 s inside beside a visit that ended, from what was kept, after 91 s. So the runtime
    has the tracker keep a visit in the write of its award (`keep`)."""
    t, kept = tracker(), Kept()
    script = {float(s): [inside(s, "produce", MEMBER)] for s in range(10, 101, 2)}
    run_kept(t, kept, script, 0, 99)
    (visit_id,) = kept.visits
    assert kept.visits[visit_id]["last"] < T0 + 90  # as of its start: not refreshed yet
    t.update(script[100.0], T0 + 100)
    assert t.take_kept(T0 + 100) == ([], [])  # nothing due
    t.update([], T0 + 101)
    t.keep({visit_id, "not-a-visit"})
    (now,) = t.take_kept(T0 + 101)[0]
    assert (now["visit_id"], now["last"]) == (visit_id, T0 + 100)


# --------------------------------------------------------------------------- across store-local midnight, whole gateway


def test_a_shopper_inside_at_store_local_midnight_keeps_one_visit_through_the_gateway(tmp_path: Path) -> None:
    # The simulated store, the real pipeline (Gateway.step, as `visita run --sim` wires it), across a midnight in a
    # zone that is not UTC's: the anonymous phones' salt changes at 00:00 Kathmandu time (18:15 UTC), their subjects
    # with it. Each shopper inside then must keep one visit: one id, one start, one end, not counted again.
    tz = "Asia/Kathmandu"
    midnight = datetime(2026, 6, 16, tzinfo=ZoneInfo(tz)).timestamp()
    world = World(load_scenario("default"), 1, midnight - 300)
    members = MemberDirectory()
    members.set_members(world.member_keys)
    settings = Settings().model_copy(update={"timezone": tz})
    gw = Gateway(settings, Store(tmp_path), SimSource(world), members, load_rules(None), world.staff_refs)
    events: list[Event] = []
    t = midnight - 300
    while t < midnight + 150:
        t += 5.0
        events += gw.step(t)
        if t == midnight - 5:
            before = {v.visit_id: v for v in gw.tracker.open_visits()}
    footfall = gw.footfall.snapshot()
    gw.store.close()
    gw.checkins.close()

    assert gw.identifier.diagnostics()["midnight_links"] > 0
    anonymous_before = [v for v in before.values() if v.subject.startswith("anon:")]
    assert len(anonymous_before) >= 3, "shoppers with anonymous phones were inside at midnight"
    visits: dict[str, list[Event]] = {}
    for e in events:
        if e.type in ("visit.started", "visit.ended", "zone.changed"):
            visits.setdefault(str(e.data["visit_id"]), []).append(e)
    for vid, evs in visits.items():
        kinds = [e.type for e in evs]
        assert kinds.count("visit.started") <= 1 and kinds.count("visit.ended") <= 1, vid
        if vid in before:
            # the same pseudonym throughout (yesterday's): today's subject of the phone is in nothing sent
            assert {e.data["subject"] for e in evs} == {before[vid].subject}, vid
    ended = {str(e.data["visit_id"]): e.data for e in events if e.type == "visit.ended"}
    for vid, v in before.items():
        # nobody inside at 23:59:55 left within those last 5 s: every visit open then was heard after midnight
        assert vid not in ended or float(ended[vid]["ended"]) > midnight, (vid, v.subject)
    started = [e.data for e in events if e.type == "visit.started" and e.data["classification"] == "visitor"]
    assert not [v for v in started if midnight <= float(v["started"]) < midnight + 5], "no entry at midnight"
    open_now = {v.visit_id for v in gw.tracker.open_visits()}
    assert sum(1 for vid in before if vid in open_now) >= len(before) - 2, "still inside after midnight"
    # counted once, on the day they came in: today's entries are the visits that started after midnight
    assert footfall["day"] == "2026-06-16"
    assert footfall["visitors_today"] == sum(1 for v in started if float(v["started"]) >= midnight)


# --------------------------------------------------------------------------- a step of the clock


def test_a_clock_step_moves_the_open_visit_on_the_jump_is_neither_absence_nor_dwell() -> None:
    # In the produce zone for 2 minutes, then the clock is stepped forward by 2 h (NTP after a boot on the saved
    # time), then 2 more minutes in the bakery and gone: one visit of 4 minutes, dated by the corrected clock.
    by = 7200.0
    before = {float(s): [inside(s, "produce")] for s in range(0, 120, 2)}
    after = {float(s): [inside(s + by, "bakery")] for s in range(120, 240, 2)}
    t = tracker()
    assert [c.kind for c in run(t, before, 119)] == ["started"]
    t.take_kept(T0 + 119)
    (was,) = t.open_visits()
    t.shift(by)
    (moved,) = t.open_visits()
    assert (moved.visit_id, moved.started, moved.dwell_s) == (was.visit_id, was.started + by, was.dwell_s)
    kept, gone = t.take_kept(T0 + by + 119)
    assert [(k["visit_id"], k["first"], k["last"]) for k in kept] == [(was.visit_id, T0 + by, T0 + by + 118)]
    assert gone == [] and t.now == T0 + by + 119, "stored again with its new times, as of the new clock"
    changes: list[VisitChange] = []
    for s in range(120, 400):
        changes += t.update(after.get(float(s), []), T0 + by + s)
    assert [(c.kind, c.visit.visit_id) for c in changes] == [("zone", was.visit_id), ("ended", was.visit_id)]
    end = changes[-1].visit
    assert (end.started, end.ended, end.path) == (T0 + by, T0 + by + 238, ("produce", "bakery"))
    assert end.dwell_s == pytest.approx(238, abs=2), "the 2 hours of the step are not dwell"
    # The same without the shift: the jump is 2 h of absence (the shopper makes a second visit) when the first tick
    # after it brings no estimate (the estimator's lag), else 2 h of dwell.
    t = tracker()
    run(t, before, 119)
    split = t.update([], T0 + by + 119) + [c for s in range(120, 400) for c in t.update(after.get(s, []), T0 + by + s)]
    assert [c.kind for c in split] == ["ended", "started", "ended"]
    t = tracker()
    run(t, before, 119)
    (stretched,) = [
        c.visit for s in range(120, 400) for c in t.update(after.get(s, []), T0 + by + s) if c.kind != "zone"
    ]
    assert stretched.dwell_s == pytest.approx(by + 238, abs=2)


@pytest.mark.parametrize("steps", [[60.0], [36_000.0], [18_000.0, 18_000.0]])
def test_a_clock_step_just_after_a_restart_leaves_the_visits_taken_up_as_the_run_before_dated_them(
    steps: list[float],
) -> None:
    # The gateway stopped at 120 s (a clean reboot, a clock that was right) and the Pi came back on the time it saved
    # at shutdown: it takes the member's visit up 30 s later by that clock, and NTP then steps the clock forward by
    # what the reboot really took beyond. The visit's times were dated by the run before's clock, which was right:
    # they stay; only the restart's own time moves, and the restart is judged again as `restore` would have on the
    # right clock. Down 90 s: it goes on (heard again, the time between is dwell, as across any restart). Down 10 h:
    # it ends at its last sighting, and the member coming in then makes a new visit, not last night's stretched (also
    # when NTP gets there in two steps).
    by = sum(steps)
    kept, changes = _member_visit_then_stop()
    (visit_id,) = [c.visit.visit_id for c in changes if c.kind == "started" and c.visit.subject == MEMBER]
    t = tracker()
    assert t.restore(list(kept.visits.values()), kept.as_of, T0 + 150) == []
    for step in steps:
        t.shift(step)
    (v,) = t.open_visits()
    assert (v.visit_id, v.started, v.dwell_s) == (visit_id, T0 + 10, 110), "dated as the run before dated it"
    script = {float(s): [inside(s, "produce", MEMBER)] for s in range(int(150 + by) + 10, int(150 + by) + 80, 2)}
    out = run(t, script, until=150 + by + 200)
    ends = [(c.visit.visit_id, c.visit.started, c.visit.ended, c.visit.dwell_s) for c in out if c.kind == "ended"]
    if by < CFG.resume_within_s:
        assert [c.kind for c in out] == ["ended"] and ends == [(visit_id, T0 + 10, T0 + by + 228, by + 218)]
    else:
        assert ends[0] == (visit_id, T0 + 10, T0 + 120, 110), "ended where it was last heard, last night"
        assert [c.kind for c in out[1:]] == ["started", "ended"] and out[1].visit.visit_id != visit_id
