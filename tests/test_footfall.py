"""Tests for gateway.footfall on a hand-built day: minute aggregates, the live snapshot, the local-day reset."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from gateway.days import LocalDays
from gateway.footfall import Footfall
from gateway.model import Classification, Visit, VisitChange, VisitChangeKind, ZoneSegment

TZ = ZoneInfo("Europe/Berlin")


def at(h: int, m: int, s: int = 0, day: int = 15) -> float:
    """UNIX seconds of a Berlin wall-clock time in June 2026 (UTC+2)."""
    return datetime(2026, 6, day, h, m, s, tzinfo=TZ).timestamp()


def visit(vid: str, started: float, last_inside: float, cls: Classification, ended: float | None = None) -> Visit:
    subject = "member:s-1" if cls == "staff" else f"anon:{vid:0>16}"
    return Visit(vid, subject, started, ended, (ZoneSegment("produce", started, last_inside),), cls, "ble")


def chg(kind: VisitChangeKind, ts: float, v: Visit) -> VisitChange:
    return VisitChange(kind, ts, v)


def run(
    f: Footfall, deliveries: dict[float, list[VisitChange]], start: float, end: float, tick: float = 10.0
) -> list[dict[str, Any]]:
    """Tick like the runtime does, handing each change over at the tick it is due (its detection time)."""
    out: list[dict[str, Any]] = []
    due = sorted(deliveries)
    now = start
    while now <= end:
        batch = [c for t in due if now - tick < t <= now for c in deliveries[t]]
        out += f.update(batch, now)
        now += tick
    return out


def hand_built_morning() -> dict[float, list[VisitChange]]:
    """10:00-10:20 on 2026-06-15. Changes keyed by when the tracker reports them (ended: a minute after last seen)."""
    v1 = visit("v1", at(10, 0, 5), at(10, 14, 20), "visitor")
    v2 = visit("v2", at(10, 0, 55), at(10, 5, 5), "visitor")
    v3 = visit("v3", at(10, 9, 30), at(10, 10, 15), "visitor")
    s1 = visit("s1", at(10, 0, 0), at(10, 0, 20), "staff")
    return {
        at(10, 0, 20): [chg("started", at(10, 0, 20), s1)],
        at(10, 0, 50): [chg("started", at(10, 0, 50), v1)],
        at(10, 1, 40): [chg("started", at(10, 1, 40), v2)],
        at(10, 2, 10): [
            chg("ended", at(10, 1, 10), visit("p1", at(10, 0, 40), at(10, 0, 40), "pass-by", at(10, 1, 10)))
        ],
        at(10, 3, 10): [chg("zone", at(10, 3, 10), v1)],
        at(10, 3, 30): [chg("ended", at(10, 2, 30), visit("p2", at(10, 2, 0), at(10, 2, 0), "pass-by", at(10, 2, 30)))],
        at(10, 6, 20): [
            chg("ended", at(10, 5, 20), visit("v2", at(10, 0, 55), at(10, 5, 5), "visitor", at(10, 5, 20)))
        ],
        at(10, 10, 20): [chg("started", at(10, 10, 15), v3)],
        at(10, 15, 30): [
            chg("ended", at(10, 14, 30), visit("v1", at(10, 0, 5), at(10, 14, 20), "visitor", at(10, 14, 30)))
        ],
    }


def test_minute_aggregates_of_a_hand_built_morning() -> None:
    f = Footfall(LocalDays("Europe/Berlin"))
    minutes = run(f, hand_built_morning(), at(10, 0), at(10, 20))
    assert [m["minute"] for m in minutes] == [at(10, i) for i in range(20)]  # every closed minute, quiet ones too
    by_minute = {round((m["minute"] - at(10, 0)) / 60): m for m in minutes}

    def row(i: int) -> tuple[int, int, int, int, float | None]:
        m = by_minute[i]
        return (m["entries"], m["exits"], m["passbys"], m["occupancy"], m["mean_dwell_s"])

    # (entries, exits, passbys, occupancy at the end of the minute, mean dwell of the exits)
    assert row(0) == (1, 0, 0, 1, None)  # v1 starts; staff s1 is not an entry
    assert row(1) == (1, 0, 0, 2, None)  # v2 starts
    assert row(2) == (0, 0, 1, 2, None)  # p1 reported
    assert row(3) == (0, 0, 1, 2, None)  # p2 reported; v1's zone change counts nothing
    assert row(6) == (0, 1, 0, 1, 250.0)  # v2 reported ended: 10:00:55 → 10:05:05
    assert row(10) == (1, 0, 0, 2, None)  # v3 starts
    assert row(15) == (0, 1, 0, 1, 855.0)  # v1 reported ended: 10:00:05 → 10:14:20
    quiet = [4, 5, 7, 8, 9, 11, 12, 13, 14, 16, 17, 18, 19]
    assert all(row(i)[:3] == (0, 0, 0) for i in quiet)
    assert [row(i)[3] for i in quiet] == [2, 2, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1]
    assert sum(m["entries"] for m in minutes) == 3 and sum(m["exits"] for m in minutes) == 2


def test_snapshot_of_a_hand_built_morning_and_an_hour_later() -> None:
    f = Footfall(LocalDays("Europe/Berlin"))
    run(f, hand_built_morning(), at(10, 0), at(10, 20))
    assert f.snapshot() == {
        "as_of": at(10, 20),
        "occupancy": 1,  # v3 (staff are never occupancy)
        "entries_last_hour": 3,
        "day": "2026-06-15",
        "visitors_today": 3,
        "passbys_today": 2,
        "staff_today": 1,
        "left_today": 2,  # v2 (250 s) and v1 (855 s) ended
        "mean_dwell_today_s": 552,  # the average visit of the day: (250 + 855) / 2, rounded half to even
    }
    f.update([], at(11, 5))  # v1 (10:00:05) and v2 (10:00:55) entered more than an hour ago, v3 (10:09:30) not
    snap = f.snapshot()
    assert (snap["entries_last_hour"], snap["visitors_today"], snap["occupancy"]) == (1, 3, 1)
    f.update([], at(11, 9, 31))
    assert f.snapshot()["entries_last_hour"] == 0


def test_only_minutes_closed_before_now_are_returned() -> None:
    f = Footfall(LocalDays("UTC"))
    t0 = 1_764_000_000.0  # a whole minute
    assert f.update([], t0 + 5) == []
    assert f.update([], t0 + 59.9) == []
    (m,) = f.update([], t0 + 60)
    assert m["minute"] == t0
    assert [m["minute"] for m in f.update([], t0 + 60 + 3 * 60 + 1)] == [t0 + 60, t0 + 120, t0 + 180]


def test_a_clock_step_of_days_publishes_only_the_last_hour_of_quiet_minutes() -> None:
    f = Footfall(LocalDays("UTC"))
    t0 = 1_764_000_000.0
    v = visit("v1", t0 + 5, t0 + 50, "visitor")
    f.update([chg("started", t0 + 10, v)], t0 + 30)
    # an exit in the first minute after the step keeps that minute: only the quiet run before it is cut
    got = f.update([], t0 + 3 * 86400 + 1)
    assert len(got) == 61 and got[0]["minute"] == t0 and got[0]["entries"] == 1, "the minute with news is kept"
    assert [m["minute"] for m in got[1:]] == [t0 + 3 * 86400 - 3600 + 60 * i for i in range(60)]
    assert all(m["occupancy"] == 1 for m in got), "the visit is still open: occupancy carries on"
    assert len(f.update([], t0 + 3 * 86400 + 120)) == 2


def test_todays_counts_reset_at_local_midnight_but_occupancy_does_not() -> None:
    f = Footfall(LocalDays("Europe/Berlin"))
    evening = visit("late", at(23, 40), at(23, 50), "visitor")
    f.update([chg("started", at(23, 41), evening)], at(23, 41))
    f.update([chg("ended", at(23, 30), visit("p", at(23, 29), at(23, 29), "pass-by", at(23, 30)))], at(23, 31))
    assert (f.snapshot()["visitors_today"], f.snapshot()["passbys_today"], f.snapshot()["day"]) == (1, 1, "2026-06-15")
    # Berlin midnight is 22:00 UTC: the UTC date does not change, the local one does
    f.update([], at(23, 59, 59))
    assert f.snapshot()["day"] == "2026-06-15"
    f.update([], at(0, 0, 0, day=16))
    snap = f.snapshot()
    assert (snap["day"], snap["visitors_today"], snap["passbys_today"], snap["occupancy"]) == ("2026-06-16", 0, 0, 1)
    assert snap["entries_last_hour"] == 1  # the last hour reaches back over midnight


def test_a_change_from_before_midnight_reported_after_it_does_not_wipe_today() -> None:
    # The tracker reports an end a timeout after the last sighting, so a pass-by last seen at 23:59:50
    # arrives at 00:00:50: that must not send the counters back to yesterday and wipe today's.
    f = Footfall(LocalDays("Europe/Berlin"))
    f.update([], at(23, 59, 0))
    morning = visit("early", at(0, 0, 5, day=16), at(0, 0, 30, day=16), "visitor")
    out = f.update([chg("started", at(0, 0, 30, day=16), morning)], at(0, 0, 30, day=16))
    late = visit("p", at(23, 59, 40), at(23, 59, 40), "pass-by", at(23, 59, 50))
    out += f.update([chg("ended", at(23, 59, 50), late)], at(0, 0, 50, day=16))
    out += f.update([], at(0, 1, 0, day=16))
    snap = f.snapshot()
    assert (snap["day"], snap["visitors_today"]) == ("2026-06-16", 1)
    # counted when it became known, like the minute aggregates: today's totals equal today's minutes
    todays = [m for m in out if m["minute"] >= at(0, 0, 0, day=16)]
    assert snap["passbys_today"] == sum(m["passbys"] for m in todays) == 1
    assert snap["visitors_today"] == sum(m["entries"] for m in todays)


def test_staff_are_counted_apart_and_never_in_occupancy_or_entries() -> None:
    f = Footfall(LocalDays("UTC"))
    t0 = 1_764_000_000.0
    s = visit("s", t0, t0 + 300, "staff")
    f.update([chg("started", t0 + 45, s)], t0 + 45)
    out = f.update([chg("ended", t0 + 300, visit("s", t0, t0 + 300, "staff", t0 + 300))], t0 + 360)
    assert sum(m["entries"] + m["exits"] + m["occupancy"] + m["passbys"] for m in out) == 0
    snap = f.snapshot()
    assert (snap["staff_today"], snap["visitors_today"], snap["occupancy"], snap["entries_last_hour"]) == (1, 0, 0, 0)


def test_an_end_without_a_start_seen_is_not_an_exit() -> None:
    # After a restart the footfall counts start empty: a visit that started before it must not drive
    # occupancy negative or count an exit.
    f = Footfall(LocalDays("UTC"))
    t0 = 1_764_000_000.0
    out = f.update([chg("ended", t0 + 10, visit("old", t0 - 600, t0, "visitor", t0 + 10))], t0 + 70)
    assert sum(m["exits"] for m in out) == 0 and f.snapshot()["occupancy"] == 0


def test_a_restart_in_the_same_minute_goes_on_counting_and_publishes_that_minute_once() -> None:
    days = LocalDays("Europe/Berlin")
    f = Footfall(days)
    before = run(f, hand_built_morning(), at(10, 0, 0), at(10, 6, 30))
    kept = f.state()
    # A new process, the same day and minute: today's counts go on, the minute in progress closes once.
    g = Footfall(days)
    g.restore(kept)
    assert g.update([], at(10, 6, 40)) == []
    snap = g.snapshot()
    assert (snap["visitors_today"], snap["passbys_today"], snap["staff_today"]) == (2, 2, 1)
    assert snap["entries_last_hour"] == 2 and snap["occupancy"] == 0, "open visits come back only through reopen"
    after = g.update([], at(10, 7, 0))
    assert [m["minute"] for m in after] == [at(10, 6)]
    assert after[0]["exits"] == 1, "v2's exit (10:06:20) was counted before the restart, published with its minute"
    assert at(10, 6) not in [m["minute"] for m in before]


def test_a_restart_in_a_later_minute_publishes_the_stopped_minute_at_once_and_no_zeros_for_the_gap() -> None:
    days = LocalDays("Europe/Berlin")
    f = Footfall(days)
    run(f, hand_built_morning(), at(10, 0, 0), at(10, 6, 30))
    g = Footfall(days)
    g.restore(f.state())
    out = g.update([], at(10, 40, 5))
    assert [(m["minute"], m["exits"]) for m in out] == [(at(10, 6), 1)], out
    assert [m["minute"] for m in g.update([], at(10, 42, 0))] == [at(10, 40), at(10, 41)]
    # A clock that went back across the restart: the kept minute goes on and is published once, when it closes.
    back = Footfall(days)
    back.restore(f.state())
    assert back.update([], at(10, 5, 0)) == []
    assert [m["minute"] for m in back.update([], at(10, 7, 0))] == [at(10, 6)]
    # A clock far behind (a Pi without a real-time clock after a power cut): the kept minute is published at once,
    # not left open to swallow every minute until the clock gets there.
    far = Footfall(days)
    far.restore(f.state())
    assert [m["minute"] for m in far.update([], at(9, 20, 0))] == [at(10, 6)]
    assert [m["minute"] for m in far.update([], at(9, 22, 0))] == [at(9, 20), at(9, 21)]
    # The next day: today's counts start from zero.
    h = Footfall(days)
    h.restore(g.state())
    h.update([], at(9, 0, 0, day=16))
    assert h.snapshot()["visitors_today"] == 0 and h.snapshot()["day"] == "2026-06-16"


def test_visits_a_restart_takes_up_stay_open_and_their_end_dated_before_it_never_reopens_the_kept_minute() -> None:
    days = LocalDays("Europe/Berlin")
    f = Footfall(days)
    v = visit("a", at(10, 5, 0), at(10, 6, 10), "visitor")
    f.update([chg("started", at(10, 5, 45), v)], at(10, 6, 15))
    kept = f.state()  # the power goes at 10:06:15 with visit a open; the gateway is back at 10:08:30
    uncounted = visit("b", at(10, 6, 0), at(10, 6, 12), "visitor")  # started, but its count was not written
    g = Footfall(days)
    g.restore(kept)
    g.reopen([v, uncounted])
    # The tracker ends a where it was last heard (10:06:10, in the kept minute, which had nothing and is not
    # published): its exit counts in the minute the gateway is back in; 10:06 and 10:07 stay a gap.
    out = g.update([chg("ended", at(10, 6, 10), visit("a", at(10, 5, 0), at(10, 6, 10), "visitor", at(10, 6, 10)))],
                   at(10, 8, 30))  # fmt: skip
    assert out == [], out
    later = g.update([], at(10, 10, 0))
    assert [(m["minute"], m["entries"], m["exits"], m["occupancy"]) for m in later] == [
        (at(10, 8), 1, 1, 1),  # b's entry, counted when it came back; a's exit; b still inside
        (at(10, 9), 0, 0, 1),
    ], later
    snap = g.snapshot()
    assert (snap["visitors_today"], snap["occupancy"]) == (2, 1), snap


def test_a_kept_state_that_is_not_footfalls_is_ignored_with_a_warning(caplog: Any) -> None:
    for bad in ({"day": 3}, {"day": "2026-06-15", "today": [], "entries": [], "minute": None}, []):
        f = Footfall(LocalDays("Europe/Berlin"))
        f.restore(bad)  # type: ignore[arg-type]
        assert f.update([], at(10, 0, 30)) == [] and f.snapshot()["visitors_today"] == 0
    assert sum("not usable" in r.getMessage() for r in caplog.records) == 3


def test_an_end_dated_ahead_of_the_clock_publishes_no_minutes_in_between() -> None:
    """A restart on a clock that went back (a Pi without a real-time clock): the visits kept before it end at their
    last sighting, which is ahead of the clock now. No minute between now and then is published."""
    days = LocalDays("Europe/Berlin")
    f = Footfall(days)
    v = visit("a", at(10, 20, 0), at(10, 30, 0), "visitor")
    f.update([chg("started", at(10, 20, 45), v)], at(10, 30, 5))
    g = Footfall(days)
    g.restore(f.state())
    g.reopen([v])
    ended = visit("a", at(10, 20, 0), at(10, 30, 0), "visitor", at(10, 30, 0))
    out = g.update([chg("ended", at(10, 30, 0), ended)], at(10, 10, 0))  # back 20 minutes
    assert out == [], "no minute from 10:10 to 10:29 (the kept one had nothing to publish)"
    assert g.snapshot()["occupancy"] == 0
    assert [m["minute"] for m in g.update([], at(10, 12, 0))] == [at(10, 10), at(10, 11)]
    # Nor does the last hour count an entry from the future: 10:20 is not within 09:10..10:10.
    assert g.snapshot()["entries_last_hour"] == 0


def test_a_visit_counts_on_the_day_it_began_and_not_again_after_midnight() -> None:
    # Today's counts are the visits that started today: staff on a late shift and shoppers inside at midnight stay in
    # occupancy (shoppers) but the new day's counts start at 0; one that began at 23:59:30 and reached the minimum
    # dwell after midnight came in yesterday and is not today's either (its minute's `entries` has it).
    f = Footfall(LocalDays("Europe/Berlin"))
    shift = visit("shift", at(22, 0), at(23, 59), "staff")
    shopper = visit("shop", at(23, 50), at(23, 59), "visitor")
    f.update([chg("started", at(22, 1), shift), chg("started", at(23, 51), shopper)], at(23, 52))
    assert (f.snapshot()["visitors_today"], f.snapshot()["staff_today"]) == (1, 1)
    late = visit("late", at(23, 59, 30), at(0, 0, 20, day=16), "visitor")
    out = f.update([chg("started", at(0, 0, 15, day=16), late)], at(0, 0, 20, day=16))
    out += f.update([], at(0, 1, 0, day=16))
    snap = f.snapshot()
    assert (snap["day"], snap["visitors_today"], snap["staff_today"], snap["occupancy"]) == ("2026-06-16", 0, 0, 2)
    assert [m["entries"] for m in out if m["minute"] == at(0, 0, day=16)] == [1]
    early = visit("early", at(0, 2, day=16), at(0, 3, day=16), "visitor")
    f.update([chg("started", at(0, 3, day=16), early)], at(0, 3, day=16))
    assert (f.snapshot()["visitors_today"], f.snapshot()["occupancy"]) == (1, 3)


def test_a_visit_whose_entry_a_power_loss_kept_from_being_written_counts_on_the_day_it_began() -> None:
    """The restore path counts such an entry at the restart; like `update`, not in the new day's visitors."""
    days = LocalDays("Europe/Berlin")
    f = Footfall(days)
    f.update([], at(23, 56))
    v = visit("late", at(23, 57), at(23, 58), "visitor")  # started, but the power went before the counts were written
    g = Footfall(days)
    g.restore(f.state())
    g.reopen([v])
    g.update([], at(0, 1, 0, day=16))
    snap = g.snapshot()
    assert (snap["day"], snap["visitors_today"], snap["occupancy"]) == ("2026-06-16", 0, 1), snap


def test_a_visitor_visit_a_member_link_shows_to_be_staff_leaves_occupancy() -> None:
    # An iPhone's new address is heard without the app's frame for the minimum dwell (a visitor's visit starts), then
    # the frame links it to a member of staff. Wired as the runtime does: it must not stay in "Inside now" (all day,
    # and at night with the store closed) while the zones and the visits list call it staff.
    from gateway.config import VisitsConfig
    from gateway.model import SubjectLink, ZoneEstimate
    from gateway.visits import VisitTracker, link_subjects

    class NoRelabel:
        def relabel(self, old: str, new: str) -> None:
            pass

    tracker = VisitTracker("gw-1", VisitsConfig(absence_timeout_s=60, min_dwell_s=45, staff=["staff-4"]))
    f = Footfall(LocalDays("Europe/Berlin"))
    anon, staff = "anon:00000000000000aa", "member:staff-4"
    t0 = at(8, 40)
    minutes: list[dict[str, Any]] = []
    for i in range(300):
        t = t0 + i
        changes = link_subjects(NoRelabel(), tracker, None, [SubjectLink(t, anon, staff, "member")]) if i == 60 else []
        changes += tracker.update([ZoneEstimate(t, anon if i < 60 else staff, "grocery", True, -60.0, sure=True)], t)
        minutes += f.update(changes, t)
        f.found_staff(tracker.changed_visits())
        if i == 50:
            assert f.snapshot()["occupancy"] == 1, "a visitor, as far as anyone could tell"
    assert [v.classification for v in tracker.open_visits()] == ["staff"]
    assert f.snapshot()["occupancy"] == 0
    assert sum(m["entries"] for m in minutes) - sum(m["exits"] for m in minutes) == minutes[-1]["occupancy"] == 0


def test_the_average_visit_of_the_day_goes_on_across_a_restart_and_starts_afresh_at_midnight() -> None:
    days = LocalDays("Europe/Berlin")
    f = Footfall(days)
    run(f, hand_built_morning(), at(10, 0), at(10, 20))
    g = Footfall(days)
    g.restore(f.state())
    g.update([], at(10, 21))
    assert (g.snapshot()["left_today"], g.snapshot()["mean_dwell_today_s"]) == (2, 552)
    # A state kept by a version that did not count it yet is taken (its counts), the average from zero.
    old = f.state()
    old["today"] = {k: old["today"][k] for k in ("visitors", "passbys", "staff")}
    h = Footfall(days)
    h.restore(old)
    h.update([], at(10, 21))
    snap = h.snapshot()
    assert (snap["visitors_today"], snap["left_today"], snap["mean_dwell_today_s"]) == (3, 0, None)
    g.update([], at(0, 0, 5, day=16))
    assert (g.snapshot()["left_today"], g.snapshot()["mean_dwell_today_s"]) == (0, None)


def test_a_clock_step_goes_on_with_the_minute_in_progress_and_todays_counts_and_publishes_none_of_the_jump() -> None:
    # A Pi booted on yesterday evening's saved time (22:10 on the 14th); NTP steps it to 08:30:05 on the 15th.
    by = at(8, 30, 5) - at(22, 11, 35, day=14)
    f = Footfall(LocalDays("Europe/Berlin"))
    v = visit("v1", at(22, 10, 5, day=14), at(22, 11, 30, day=14), "visitor")
    out = f.update([chg("started", at(22, 10, 50, day=14), v)], at(22, 11, 0, day=14))
    p = visit("p1", at(22, 11, 0, day=14), at(22, 11, 0, day=14), "pass-by", at(22, 11, 20, day=14))
    out += f.update([chg("ended", at(22, 11, 20, day=14), p)], at(22, 11, 35, day=14))
    assert [(m["minute"], m["entries"]) for m in out] == [(at(22, 10, day=14), 1)]
    f.shift(by)
    snap = f.snapshot()
    assert (snap["day"], snap["visitors_today"], snap["passbys_today"], snap["occupancy"]) == ("2026-06-15", 1, 1, 1)
    assert snap["entries_last_hour"] == 1 and snap["as_of"] == at(8, 30, 5)
    # The minute in progress (22:11) goes on as 08:29 (its start, 22:11:00, moved by the step), with its pass-by;
    # the next minutes follow; none of the jump's.
    out = f.update([], at(8, 31, 1)) + f.update([], at(8, 32, 1))
    assert [(m["minute"], m["passbys"], m["occupancy"]) for m in out] == [
        (at(8, 29), 1, 1),
        (at(8, 30), 0, 1),
        (at(8, 31), 0, 1),
    ]
    # Not shifted, the jump is 10 hours of quiet: its last hour published as empty minutes, today's counts reset.
    f = Footfall(LocalDays("Europe/Berlin"))
    f.update([chg("started", at(22, 10, 50, day=14), v)], at(22, 11, 0, day=14))
    assert len(f.update([], at(8, 31, 1))) == 60 and f.snapshot()["visitors_today"] == 0


def test_a_step_across_midnight_after_a_restart_leaves_the_run_befores_counts_on_their_own_day() -> None:
    # The gateway counted the evening of the 14th on a clock that was right and stopped at 22:10; the Pi came back
    # next morning on the time it saved (22:10:30 by its clock), took its counts up, counted one shopper more, and NTP
    # then stepped the clock to 08:30 on the 15th. The counts this run made on the wrong clock were the 15th's; those
    # the restart brought are the 14th's: the 15th starts with the one visitor, and its last hour holds one entry.
    days = LocalDays("Europe/Berlin")
    f = Footfall(days)
    evening = [visit(f"v{i}", at(21, 40 + 5 * i, day=14), at(22, 5, day=14), "visitor") for i in range(3)]
    f.update([chg("started", v.started + 50, v) for v in evening], at(22, 10, day=14))
    assert f.snapshot()["visitors_today"] == 3
    g = Footfall(days)
    g.restore(f.state())
    g.update([], at(22, 10, 30, day=14))
    assert (g.snapshot()["visitors_today"], g.snapshot()["entries_last_hour"]) == (3, 3), "the same evening, it seems"
    v = visit("v9", at(22, 10, 35, day=14), at(22, 11, 30, day=14), "visitor")
    g.update([chg("started", at(22, 11, 25, day=14), v)], at(22, 11, 35, day=14))
    g.shift(at(8, 30, 5) - at(22, 11, 35, day=14))
    snap = g.snapshot()
    assert (snap["day"], snap["visitors_today"], snap["entries_last_hour"]) == ("2026-06-15", 1, 1)
    assert g.state()["today"]["visitors"] == 1, "and so it is kept"
