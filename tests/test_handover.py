"""Tests for gateway.handover (one phone across its address change) and how the visit tracker applies links."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from gateway.config import EstimateConfig, VisitsConfig, default_plan
from gateway.estimate import StrongestReceiver
from gateway.handover import GAP_S, PATTERN_S, SILENCE_S, HandoverLinker, _timing_llr
from gateway.model import Sighting, SubjectLink, VisitChange, ZoneEstimate
from gateway.visits import VisitTracker, link_subjects

T0 = 1_764_000_000.5
DOORS = [(5.0, 0.25), (45.0, 0.25)]  # the supermarket's, on its glass front (y = 0)
OLD, NEW = "anon:00000000000000a1", "anon:00000000000000b2"
OLD2, NEW2 = "anon:00000000000000c3", "anon:00000000000000d4"


def est(t: float, subject: str, x: float, y: float, inside: bool = True, zone: str = "grocery") -> ZoneEstimate:
    return ZoneEstimate(T0 + t, subject, zone if inside else "sidewalk", inside, -70.0, x, y, 2.0)


def play(
    linker: HandoverLinker, tracks: dict[str, tuple[float, float, float, float]], until: float
) -> list[SubjectLink]:
    """tracks: subject -> (first s, last s, x, y), one estimate a second; the linker sees each second's."""
    out: list[SubjectLink] = []
    for t in range(int(until) + 1):
        batch = [
            est(t, s, x, y, zone="entrance" if y < 6 and x < 10 else "grocery")
            for s, (a, b, x, y) in tracks.items()
            if a <= t <= b
        ]
        out += linker.update(batch, T0 + t)
    return out


def test_a_phone_that_changes_address_mid_store_is_linked_to_itself() -> None:
    links = play(HandoverLinker(DOORS), {OLD: (0, 100, 25.0, 18.0), NEW: (101, 160, 25.5, 18.5)}, 160)
    assert [(link.old, link.new, link.reason, link.ts) for link in links] == [(OLD, NEW, "handover", T0 + 101)]


def test_the_decision_waits_for_the_old_address_to_stay_silent() -> None:
    linker = HandoverLinker(DOORS)
    assert play(linker, {OLD: (0, 100, 25.0, 18.0), NEW: (101, 101 + GAP_S + SILENCE_S - 1, 25.5, 18.5)}, 113) == []
    assert len(linker.update([est(101 + GAP_S + SILENCE_S, NEW, 25.5, 18.5)])) == 1


def test_two_rotations_at_once_in_one_place_are_not_linked() -> None:
    # Two shoppers side by side whose phones change address in the same second: which is which cannot be
    # told, and a wrong guess would chain two people into one visit.
    tracks = {
        OLD: (0, 100, 25.0, 18.0),
        OLD2: (0, 101, 27.0, 19.0),
        NEW: (101, 160, 25.5, 18.5),
        NEW2: (102, 160, 26.5, 19.0),
    }
    linker = HandoverLinker(DOORS)
    assert play(linker, tracks, 160) == []
    assert linker.diagnostics()["ambiguous"] == 2


def test_two_rotations_at_once_far_apart_are_each_linked() -> None:
    tracks = {
        OLD: (0, 100, 10.0, 25.0),
        OLD2: (0, 101, 42.0, 25.0),
        NEW: (101, 160, 10.5, 24.0),
        NEW2: (102, 160, 41.0, 25.5),
    }
    links = play(HandoverLinker(DOORS), tracks, 160)
    assert sorted((link.old, link.new) for link in links) == [(OLD, NEW), (OLD2, NEW2)]


def test_a_new_subject_at_the_door_is_someone_coming_in_not_linked() -> None:
    # Someone leaves through the door as someone else comes in: the new one is at the door, not mid-store.
    links = play(HandoverLinker(DOORS), {OLD: (0, 100, 8.0, 5.0), NEW: (101, 160, 5.5, 1.5)}, 160)
    assert links == []
    links = play(HandoverLinker(DOORS), {OLD: (0, 100, 25.0, 18.0), NEW: (101, 160, 5.5, 1.5)}, 160)
    assert links == []


def test_an_old_subject_last_heard_at_the_door_or_outside_is_not_linked() -> None:
    linker = HandoverLinker(DOORS)
    batch: list[ZoneEstimate] = []
    for t in range(0, 101):
        batch.append(est(t, OLD, 5.0, -2.0, inside=False))  # last heard on the sidewalk: they left
    linker.update(batch)
    assert play(linker, {NEW: (101, 160, 8.0, 8.0)}, 160) == []


def test_a_pause_is_not_a_new_address_and_a_far_new_subject_is_not_linked() -> None:
    assert play(HandoverLinker(DOORS), {OLD: (0, 160, 25.0, 18.0), NEW: (101, 160, 25.5, 18.5)}, 160) == []
    assert play(HandoverLinker(DOORS), {OLD: (0, 100, 10.0, 25.0), NEW: (101, 160, 42.0, 25.0)}, 160) == []
    assert play(HandoverLinker(DOORS), {OLD: (0, 90, 25.0, 18.0), NEW: (101, 160, 25.5, 18.5)}, 160) == []


def test_without_positions_nothing_is_linked() -> None:
    linker = HandoverLinker(DOORS)
    for t in range(0, 160):
        subject = OLD if t <= 100 else NEW
        assert linker.update([ZoneEstimate(T0 + t, subject, "grocery", True, -70.0)]) == []


# --------------------------------------------------------------------------- the visit tracker applies links

CFG = VisitsConfig(absence_timeout_s=60, min_dwell_s=45)


def feed(t: VisitTracker, subject: str, a: int, b: int, zone: str = "grocery") -> list[VisitChange]:
    out: list[VisitChange] = []
    for s in range(a, b + 1):
        out += t.update([ZoneEstimate(T0 + s, subject, zone, True, -70.0)], T0 + s)
    return out


def test_a_linked_subject_continues_the_visit_one_start_one_end() -> None:
    t = VisitTracker("gw-1", CFG)
    changes = feed(t, OLD, 0, 100)
    (started,) = [c for c in changes if c.kind == "started"]
    changes = feed(t, NEW, 101, 113, zone="bakery")
    assert not [c for c in changes if c.kind == "started"], "the new address has not been inside long enough yet"
    (moved,) = t.link(SubjectLink(T0 + 101, OLD, NEW, "handover"))
    assert (moved.kind, moved.from_zone, moved.visit.visit_id) == ("zone", "grocery", started.visit.visit_id)
    changes = feed(t, NEW, 114, 200, zone="bakery") + t.update([], T0 + 400)
    assert [c.kind for c in changes] == ["ended"]
    (ended,) = changes
    v = ended.visit
    assert (v.visit_id, v.subject, v.started, v.ended) == (started.visit.visit_id, OLD, T0, T0 + 200)
    assert v.path == ("grocery", "bakery") and v.dwell_s == 200
    assert t.diagnostics()["sessions"] == 0 and t.diagnostics()["links_merged"] == 1


def test_two_halves_too_short_alone_make_one_visit_once_linked() -> None:
    t = VisitTracker("gw-1", CFG)
    assert not feed(t, OLD, 0, 30) and not feed(t, NEW, 31, 50)
    (started,) = t.link(SubjectLink(T0 + 31, OLD, NEW, "handover"))
    assert started.kind == "started" and started.visit.dwell_s == 50
    (ended,) = t.update([], T0 + 200)
    assert ended.visit.visit_id == started.visit.visit_id and ended.visit.classification == "visitor"


def test_a_member_recognised_mid_visit_takes_over_the_anonymous_visit() -> None:
    t = VisitTracker("gw-1", CFG)
    (started,) = [c for c in feed(t, OLD, 0, 100) if c.kind == "started"]
    assert t.link(SubjectLink(T0 + 101, OLD, "member:m-1", "member")) == []
    assert not feed(t, "member:m-1", 101, 150)
    (v,) = t.open_visits()
    assert (v.visit_id, v.subject, v.member, v.dwell_s) == (started.visit.visit_id, "member:m-1", "m-1", 150)
    (ended,) = t.update([], T0 + 300)
    assert ended.visit.visit_id == started.visit.visit_id and ended.visit.subject == "member:m-1"


def test_a_link_between_two_visits_already_reported_leaves_both() -> None:
    t = VisitTracker("gw-1", CFG)
    feed(t, OLD, 0, 50)
    feed(t, NEW, 51, 110)
    assert t.link(SubjectLink(T0 + 51, OLD, NEW, "handover")) == []
    assert t.diagnostics()["links_unmerged"] == 1 and len(t.open_visits()) == 2


def test_a_link_nobody_saw_is_ignored() -> None:
    t = VisitTracker("gw-1", CFG)
    assert t.link(SubjectLink(T0, OLD, "member:m-1", "member")) == []
    assert t.diagnostics()["links_ignored"] == 1 and t.diagnostics()["sessions"] == 0


def test_links_do_not_depend_on_how_estimates_are_batched() -> None:
    tracks = {OLD: (0, 100, 25.0, 18.0), NEW: (101, 160, 25.5, 18.5), OLD2: (0, 130, 10.0, 25.0)}
    per_second = play(HandoverLinker(DOORS), tracks, 160)
    batch = [est(t, s, x, y) for s, (a, b, x, y) in tracks.items() for t in range(a, int(b) + 1)]
    assert HandoverLinker(DOORS).update(batch[::-1]) == per_second != []


# --------------------------------------------------------------------------- the pattern link (sightings)

RX = ("rx-a", "rx-b", "rx-c", "rx-d", "rx-e")
SHOPPER = {"rx-a": -62, "rx-b": -71, "rx-c": -80, "rx-d": -85}  # one phone's levels across the receivers
SOMEONE_ELSE = {"rx-a": -84, "rx-b": -66, "rx-c": -90, "rx-e": -70}


def heard(t: float, subject: str, levels: dict[str, int]) -> list[Sighting]:
    """Three packets a second, 0.3 s apart from `t`, at every receiver in `levels` (1-m reference -59 dBm)."""
    return [
        Sighting(T0 + t + 0.3 * i, rx, subject, rssi + (1 if i == 1 else 0), -59)
        for i in range(3)
        for rx, rssi in levels.items()
    ]


def play_heard(
    linker: HandoverLinker,
    tracks: dict[str, tuple[float, float, float, float, bool, dict[str, int]]],
    until: int,
) -> list[SubjectLink]:
    """tracks: subject -> (first s, last s, x, y, inside, levels); sightings and an estimate (the estimator's place,
    which may be wrong) each second, handed over second by second."""
    out: list[SubjectLink] = []
    for t in range(until + 1):
        sightings: list[Sighting] = []
        batch: list[ZoneEstimate] = []
        for s, (a, b, x, y, inside, levels) in tracks.items():
            if a <= t <= b:
                sightings += heard(t, s, levels)
                batch.append(est(t, s, x, y, inside=inside))
        linker.observe(sightings)
        out += linker.update(batch, T0 + t)
    return out


def test_a_new_address_the_estimator_puts_on_the_sidewalk_is_linked_by_its_pattern_and_timing() -> None:
    # The old rule refuses this one: the new subject's first seconds are placed on the sidewalk (a new subject
    # starts from no knowledge). Its first packet comes 0.4 s after the old address's last, with the same levels.
    tracks = {
        OLD: (0, 100, 25.0, 18.0, True, SHOPPER),
        NEW: (101, 160, 25.0, -3.0, False, SHOPPER),
    }
    linker = HandoverLinker(DOORS)
    links = play_heard(linker, tracks, 160)
    assert [(link.old, link.new, link.reason) for link in links] == [(OLD, NEW, "handover")]
    assert linker.diagnostics()["linked_pattern"] == 1
    # The same without sightings: the place test alone says no.
    assert play(HandoverLinker(DOORS), {OLD: (0, 100, 25.0, 18.0), NEW: (101, 160, 25.0, -3.0)}, 160) == []


def test_someone_else_appearing_as_an_address_falls_silent_is_not_linked() -> None:
    # Same second, same (wrong) place story, but another phone: other receivers, other levels.
    tracks = {
        OLD: (0, 100, 25.0, 18.0, True, SHOPPER),
        NEW: (101, 160, 25.0, -3.0, False, SOMEONE_ELSE),
    }
    linker = HandoverLinker(DOORS)
    assert play_heard(linker, tracks, 160) == []
    assert linker.diagnostics()["linked_pattern"] == 0


def test_a_late_new_address_is_not_linked_by_its_pattern() -> None:
    # The same levels, but 4 s after the old address fell silent: a phone does not go quiet that long to rotate.
    tracks = {
        OLD: (0, 100, 25.0, 18.0, True, SHOPPER),
        NEW: (105, 160, 25.0, -3.0, False, SHOPPER),
    }
    assert play_heard(HandoverLinker(DOORS), tracks, 160) == []


def test_two_addresses_falling_silent_that_both_fit_make_no_pattern_link() -> None:
    # Two shoppers side by side (their levels within a dB) whose phones both fall silent as one new address starts:
    # which one it continues cannot be told.
    beside = {rx: v + 1 for rx, v in SHOPPER.items()}
    tracks = {
        OLD: (0, 100, 25.0, 18.0, True, SHOPPER),
        OLD2: (0, 100, 26.0, 18.0, True, beside),
        NEW: (101, 160, 25.0, -3.0, False, SHOPPER),
    }
    linker = HandoverLinker(DOORS)
    assert play_heard(linker, tracks, 160) == []
    assert linker.diagnostics()["pattern_ambiguous"] == 1


def test_two_new_addresses_that_both_fit_make_no_pattern_link() -> None:
    beside = {rx: v + 1 for rx, v in SHOPPER.items()}
    tracks = {
        OLD: (0, 100, 25.0, 18.0, True, SHOPPER),
        NEW: (101, 160, 25.0, -3.0, False, SHOPPER),
        NEW2: (101, 160, 26.0, -3.0, False, beside),
    }
    assert play_heard(HandoverLinker(DOORS), tracks, 160) == []


def test_a_pedestrian_is_no_old_end_of_a_pattern_link() -> None:
    # The old subject was never inside long (a pedestrian flickering in): it is nobody's visit to continue.
    tracks = {
        OLD: (0, 100, 25.0, -3.0, False, SHOPPER),
        NEW: (101, 160, 25.0, 18.0, True, SHOPPER),
    }
    assert play_heard(HandoverLinker(DOORS), tracks, 160) == []


def test_pattern_links_do_not_depend_on_how_sightings_are_batched() -> None:
    tracks = {
        OLD: (0, 100, 25.0, 18.0, True, SHOPPER),
        NEW: (101, 160, 25.0, -3.0, False, SHOPPER),
        OLD2: (0, 130, 10.0, 25.0, True, SOMEONE_ELSE),
    }
    per_second = play_heard(HandoverLinker(DOORS), tracks, 160)
    linker = HandoverLinker(DOORS)
    sightings = [x for s, (a, b, _x, _y, _i, lv) in tracks.items() for t in range(a, b + 1) for x in heard(t, s, lv)]
    linker.observe(sightings[::-1])
    batch = [est(t, s, x, y, inside=i) for s, (a, b, x, y, i, _lv) in tracks.items() for t in range(a, b + 1)]
    assert linker.update(batch[::-1]) == per_second != []


# --------------------------------------------------------------------------- advertising timing in the pattern test

SHIFTED = {rx: v + 4 for rx, v in SHOPPER.items()}  # the same phone turned a little: 4 dB up on every receiver


def advertising(
    subject: str, start: float, end: float, period: float, levels: dict[str, int], step: int = 0
) -> list[Sighting]:
    """A phone's advertising events from `start` (s after T0) every `period` plus a 0-10 ms advDelay, until `end`,
    heard by every receiver in `levels`; `step` numbers the events on from an earlier address's."""
    out: list[Sighting] = []
    t, i = start, step
    while t < end:
        out += [Sighting(T0 + t, rx, subject, rssi, -59) for rx, rssi in levels.items()]
        i += 1
        t += period + 0.001 * ((i * 7) % 11)  # advDelay: 0-10 ms, pseudo-random
    return out


def play_timed(
    linker: HandoverLinker, sightings: list[Sighting], places: dict[str, tuple[float, float, bool]]
) -> list[SubjectLink]:
    """Sightings handed over second by second with one estimate per subject and second it was heard."""
    out: list[SubjectLink] = []
    for t in range(170):
        now = [x for x in sightings if T0 + t <= x.ts < T0 + t + 1]
        linker.observe(now)
        subjects = sorted({x.subject for x in now})
        out += linker.update([est(t, s, *places[s]) for s in subjects], T0 + t)
    return out


def old_and_new(new_period: float, offset: float = 0.255) -> list[Sighting]:
    """The old address's events every 0.25 s, then the new one's from `offset` after its last (0.255: the next event
    on the old schedule)."""
    old = advertising(OLD, 0.0, 100.0, 0.25, SHOPPER)
    last = max(x.ts for x in old) - T0
    return old + advertising(NEW, last + offset, 160.0, new_period, SHIFTED)


PLACES = {OLD: (25.0, 18.0, True), NEW: (25.0, -3.0, False)}  # the new address put on the sidewalk at first


def test_a_weak_pattern_on_the_same_advertising_schedule_is_linked() -> None:
    sightings = old_and_new(0.25)
    linker = HandoverLinker(DOORS)
    assert [(link.old, link.new) for link in play_timed(linker, sightings, PLACES)] == [(OLD, NEW)]
    assert linker.diagnostics()["linked_pattern"] == 1


def test_a_weak_pattern_on_another_phones_interval_is_not_linked() -> None:
    sightings = old_and_new(0.4, offset=0.1)
    assert play_timed(HandoverLinker(DOORS), sightings, PLACES) == []


def test_without_timing_the_weak_pattern_alone_links_nothing() -> None:
    # The same levels with the phone's events a third of an interval off its schedule and at the same interval: the
    # interval still fits (worth at most ln(0.95/0.3)), the schedule does not, and the 4 dB say too little.
    sightings = old_and_new(0.25)
    shifted = [
        x if x.subject == OLD else Sighting(x.ts + 0.083, x.receiver, x.subject, x.rssi, x.ref_rssi) for x in sightings
    ]
    assert _timing_llr_of(shifted) < 1.5
    assert play_timed(HandoverLinker(DOORS), shifted, PLACES) == []


def _timing_llr_of(sightings: list[Sighting]) -> float:
    old: dict[str, list[float]] = {}
    new: dict[str, list[float]] = {}
    first = min(x.ts for x in sightings if x.subject == NEW)
    for x in sightings:
        if x.subject == OLD:
            old.setdefault(x.receiver, []).append(x.ts)
        elif x.ts < math.floor(first) + PATTERN_S:
            new.setdefault(x.receiver, []).append(x.ts)
    return _timing_llr(old, new)


def test_timing_evidence_for_one_phone_against_two() -> None:
    same = old_and_new(0.25)
    other = old_and_new(0.4, offset=0.1)
    assert _timing_llr_of(same) > math.log(0.95 / 0.3) + 1.0  # interval and schedule both run on
    assert _timing_llr_of(other) == pytest.approx(math.log(0.05 / 0.7), abs=0.8)  # another interval: against


def test_timing_says_nothing_when_receive_times_are_uneven_or_too_few() -> None:
    sightings = old_and_new(0.25)
    wobbly = [
        Sighting(x.ts + (0.03 if i % 3 == 0 else 0.0), x.receiver, x.subject, x.rssi, x.ref_rssi)
        for i, x in enumerate(sightings)
    ]  # a busy source stamping every third report 30 ms late
    assert _timing_llr_of(wobbly) == 0.0
    assert _timing_llr({"rx-a": [1.0, 1.25, 1.5]}, {"rx-a": [1.75, 2.0]}) == 0.0  # two gaps tell no interval


def test_the_old_end_may_be_near_a_door_if_it_stayed_inside() -> None:
    # The shopper stands 3 m inside a door (the place test's 4 m say no) for the last 20 s, then rotates; the new
    # address is put on the sidewalk. It stayed inside, not walking out: linked by its pattern.
    tracks = {OLD: (0, 100, 5.0, 3.2, True, SHOPPER), NEW: (101, 160, 5.0, -3.0, False, SHOPPER)}
    assert [(link.old, link.new) for link in play_heard(HandoverLinker(DOORS), tracks, 160)] == [(OLD, NEW)]


def test_an_old_end_that_just_came_in_from_outside_is_not_an_inside_end() -> None:
    # Inside long enough in total, but its last seconds were a walk in from the sidewalk near the door.
    linker = HandoverLinker(DOORS)
    out: list[SubjectLink] = []
    for t in range(161):
        sightings: list[Sighting] = []
        batch: list[ZoneEstimate] = []
        if t <= 100:
            inside = t < 60 or t >= 98  # in for a minute, out at the window, back in 2 s before the change
            sightings += heard(t, OLD, SHOPPER)
            batch.append(est(t, OLD, 5.0, 3.2 if inside else -2.0, inside=inside))
        if t >= 101:
            sightings += heard(t, NEW, SHOPPER)
            batch.append(est(t, NEW, 5.0, -3.0, inside=False))
        linker.observe(sightings)
        out += linker.update(batch, T0 + t)
    assert out == []


def test_a_midnight_link_carries_the_subject_on_in_the_linker_and_the_tracker() -> None:
    # The salt changed at midnight: OLD's phone goes on as NEW from 100.5 s. Another shopper's phone (OTHER) falls
    # silent close by at the same time. NEW is OLD continued, not an address change to decide: nothing is linked
    # to OTHER, no decision is made about NEW, and the visit goes on with its id, its subject and no second start.
    other = "anon:00000000000000e5"
    linker, tracker = HandoverLinker(DOORS), VisitTracker("gw-1", VisitsConfig(absence_timeout_s=60, min_dwell_s=45))
    estimator = StrongestReceiver(default_plan(), EstimateConfig())
    changes: list[VisitChange] = []
    for t in range(0, 101):
        batch = [est(t, OLD, 25.0, 18.0), est(t, other, 25.5, 18.5)]
        changes += tracker.update(batch, T0 + t)
        assert linker.update(batch, T0 + t) == []
    decided = {k: v for k, v in linker.diagnostics().items() if k != "subjects"}
    changes += link_subjects(estimator, tracker, linker, [SubjectLink(T0 + 100.5, OLD, NEW, "midnight")])
    for t in range(101, 301):
        batch = [est(t, NEW, 25.0, 18.0)]
        changes += tracker.update(batch, T0 + t)
        assert linker.update(batch, T0 + t) == []
    changes += tracker.end_all(T0 + 301)
    assert {k: v for k, v in linker.diagnostics().items() if k != "subjects"} == decided, "no decision about NEW"
    mine = [c for c in changes if c.visit.subject == OLD]
    assert [c.kind for c in mine] == ["started", "ended"]
    assert len({c.visit.visit_id for c in mine}) == 1
    assert mine[-1].visit.dwell_s == pytest.approx(300.0)
    assert all(c.visit.subject != NEW for c in changes), "today's subject is in no visit"
    assert tracker.diagnostics()["links_joined"] == 1


def test_an_address_change_across_a_clock_step_is_linked_as_if_no_time_had_passed() -> None:
    # The old address falls silent, the clock is stepped forward by 2 h, and the phone's new address is heard right
    # after: shifted with the step (gateway.runtime.Gateway.shift), the linker links them as without a step, by the
    # pattern and the advertising schedule across it; not shifted, the old address looks 2 h silent.
    by = 7200.0
    sightings = old_and_new(0.25)

    def play_stepped(shift: bool) -> list[SubjectLink]:
        linker, out = HandoverLinker(DOORS), []
        for t in range(170):
            d = by if t >= 100 else 0.0
            if t == 100 and shift:
                linker.shift(by)
            now = [replace(x, ts=x.ts + d) for x in sightings if T0 + t <= x.ts < T0 + t + 1]
            linker.observe(now)
            batch = [replace(est(t, s, *PLACES[s]), ts=T0 + t + d) for s in sorted({x.subject for x in now})]
            out += linker.update(batch, T0 + t + d)
        return out

    heard_at = {s: [x.ts for x in sightings if x.subject == s] for s in (OLD, NEW)}
    assert max(heard_at[OLD]) < T0 + 100 <= min(heard_at[NEW]), "the step falls between the two addresses"
    assert [(k.old, k.new, k.ts) for k in play_stepped(True)] == [(OLD, NEW, T0 + 100 + by)]
    assert play_stepped(False) == []
    with pytest.raises(ValueError, match="whole seconds"):
        HandoverLinker(DOORS).shift(1.5)
