"""Tests for gateway.points: every rule kind, per-day caps by store-local day, exactly-once awards."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError
from gateway.days import LocalDays
from gateway.model import Award, Classification, Visit, VisitChange, VisitChangeKind, VisitSource, ZoneSegment
from gateway.points import PointsEngine, RuleSet, award_id, load_rules

TZ = "Europe/Berlin"


def local(y: int, mo: int, d: int, h: int, mi: int = 0) -> float:
    """UNIX seconds of a Berlin wall-clock time (never inside a DST gap in these tests)."""
    return datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(TZ)).timestamp()


def rules(*specs: Mapping[str, object]) -> RuleSet:
    return RuleSet.model_validate({"rules": list(specs)})


def visit(
    visit_id: str,
    started: float,
    dwell_s: float,
    *,
    subject: str = "member:m-1",
    classification: Classification = "visitor",
    source: VisitSource = "ble",
    ended: bool = False,
    moved_m: float | None = 25.0,
) -> Visit:
    """A visit in produce; by default the phone walked 25 m in the store (a shopper, not a phone left behind)."""
    seg = (ZoneSegment("produce", started, started + dwell_s),)
    end = started + dwell_s if ended else None
    return Visit(visit_id, subject, started, end, seg, classification, source, moved_m)


def change(kind: VisitChangeKind, v: Visit) -> VisitChange:
    return VisitChange(kind, v.started + v.dwell_s, v)


def engine(rs: RuleSet, ledger: list[Award] | None = None, tz: str = TZ) -> PointsEngine:
    return PointsEngine(rs, LocalDays(tz), ledger or [])


VISIT_RULE: dict[str, object] = {"id": "visit", "kind": "visit", "points": 10, "min_dwell_s": 120}
CHECKIN_RULE: dict[str, object] = {"id": "checkin", "kind": "checkin", "points": 5}
BONUS_RULE: dict[str, object] = {
    "id": "dwell-bonus",
    "kind": "dwell_bonus",
    "tiers": [{"min_dwell_s": 600, "points": 5}, {"min_dwell_s": 1200, "points": 15}],
}
ZONE_RULE: dict[str, object] = {"id": "promo", "kind": "zone_bonus", "zone": "produce", "points": 5, "min_dwell_s": 60}
NOON = local(2026, 6, 15, 12)


# --------------------------------------------------------------------------- rule kinds


def test_visit_rule_fires_once_the_visit_has_lasted_min_dwell() -> None:
    e = engine(rules(VISIT_RULE))
    assert e.evaluate([change("started", visit("v1", NOON, 45))]) == []
    assert e.evaluate([change("zone", visit("v1", NOON, 119))]) == []
    (a,) = e.evaluate([change("zone", visit("v1", NOON, 125))])
    assert (a.member, a.rule, a.points, a.visit_id, a.ts, a.day) == ("m-1", "visit", 10, "v1", NOON + 125, "2026-06-15")
    assert "125" in a.reason
    assert e.evaluate([change("ended", visit("v1", NOON, 400, ended=True))]) == []  # never twice for one visit


def test_open_visits_earn_while_the_shopper_stays_in_one_zone() -> None:
    # No change is reported while a shopper stays put; points must still come before they leave.
    e = engine(rules(VISIT_RULE, BONUS_RULE))
    anon = visit("v2", NOON, 300, subject="anon:0123456789abcdef")
    assert e.evaluate_open([visit("v1", NOON, 100), anon], NOON + 100) == []
    (a,) = e.evaluate_open([visit("v1", NOON, 130), anon], NOON + 130)
    assert (a.rule, a.points, a.visit_id, a.ts) == ("visit", 10, "v1", NOON + 130)
    assert e.evaluate_open([visit("v1", NOON, 1300)], NOON + 1300) == [], "a dwell bonus waits for the end"
    assert e.evaluate([change("ended", visit("v1", NOON, 1300, ended=True))])[0].rule == "dwell-bonus"


# --------------------------------------------------------------------------- presence guard: a phone left lying


def test_a_phone_that_has_not_moved_earns_nothing_while_its_visit_is_open_and_is_judged_when_it_ends() -> None:
    e = engine(rules(VISIT_RULE, ZONE_RULE))
    still = visit("v1", NOON, 600, moved_m=4.0)  # ten minutes inside, within 4 m of where it settled
    assert e.evaluate_open([still], NOON + 600) == []
    (why,) = [x.why for x in e.explain(still, "open") if x.rule == "visit"]
    assert "moved 4 m inside so far" in why and "presence.min_movement_m" in why
    assert e.evaluate_open([visit("v1", NOON, 600, moved_m=None)], NOON + 600) == [], "no position: no proof yet"
    # It went away within the visit limit, as a shopper who barely moved would: judged like any visit.
    got = e.evaluate([change("ended", visit("v1", NOON, 700, moved_m=4.0, ended=True))])
    assert sorted(a.rule for a in got) == ["promo", "visit"]


def test_a_phone_that_moved_earns_while_it_is_still_inside() -> None:
    e = engine(rules(VISIT_RULE))
    assert e.evaluate_open([visit("v1", NOON, 200, moved_m=9.9)], NOON + 200) == []
    (a,) = e.evaluate_open([visit("v1", NOON, 210, moved_m=10.0)], NOON + 210)
    assert (a.rule, a.ts) == ("visit", NOON + 210)


def test_a_visit_heard_longer_than_max_visit_s_proves_nothing_by_its_sightings_a_checkin_only_presence() -> None:
    e = engine(rules(VISIT_RULE, BONUS_RULE, CHECKIN_RULE))
    left = visit("v1", NOON, 3 * 3600, ended=True)  # three hours in the store, moving or not
    assert e.evaluate([change("ended", left)]) == []
    assert all("presence.max_visit_s" in x.why for x in e.explain(left) if x.rule != "checkin")
    # Still open at 2 h 1 min: nothing either.
    assert e.evaluate_open([visit("v2", NOON, 7260)], NOON + 7260) == []
    # A check-in proves the member was there, not that the phone by the door was a shopper for three hours:
    # the rules that measure dwell keep the guard (a left phone checking in every morning earns no top tier).
    checked_in = visit("v3", NOON, 3 * 3600, ended=True, source="both")
    assert {a.rule for a in e.evaluate([change("ended", checked_in)])} == {"visit", "checkin"}
    (why,) = [x.why for x in e.explain(checked_in) if x.rule == "dwell-bonus"]
    assert "presence.max_visit_s" in why
    z = engine(rules(ZONE_RULE))
    still = visit("v4", NOON, 600, moved_m=1.0, source="both")
    assert z.evaluate_open([still], NOON + 600) == [], "zone time of a phone that never moved waits for the end"


def test_a_member_the_backend_removed_earns_nothing_more_even_on_an_open_visit() -> None:
    provisioned = {"m-1"}
    e = PointsEngine(rules(VISIT_RULE, CHECKIN_RULE), LocalDays(TZ), [], known=lambda m: m in provisioned)
    assert [a.rule for a in e.evaluate_open([visit("v1", NOON, 200)], NOON + 200)] == ["visit"]
    provisioned.clear()
    assert e.evaluate([change("ended", visit("v1", NOON, 300, ended=True, source="both"))]) == []
    assert e.evaluate_open([visit("v2", NOON + 3600, 200, source="both")], NOON + 3800) == []
    assert all("not provisioned" in x.why for x in e.explain(visit("v2", NOON + 3600, 200)))


def test_the_presence_guard_is_configurable_and_checked() -> None:
    relaxed = RuleSet.model_validate({"rules": [VISIT_RULE], "presence": {"min_movement_m": 0, "max_visit_s": 86400}})
    e = engine(relaxed)
    (a,) = e.evaluate_open([visit("v1", NOON, 4 * 3600, moved_m=None)], NOON + 4 * 3600)
    assert a.rule == "visit"
    with pytest.raises(ValueError, match="max_visit_s"):
        RuleSet.model_validate({"rules": [VISIT_RULE], "presence": {"max_visit_s": 60}})
    with pytest.raises(ValueError, match="unknown_key"):
        RuleSet.model_validate({"rules": [VISIT_RULE], "presence": {"unknown_key": 1}})


def test_visit_rule_without_min_dwell_fires_at_start() -> None:
    e = engine(rules({"id": "hello", "kind": "visit", "points": 1}))
    (a,) = e.evaluate([change("started", visit("v1", NOON, 45))])
    assert a.rule == "hello"


def test_checkin_rule_needs_a_checkin_source() -> None:
    e = engine(rules(CHECKIN_RULE))
    assert e.evaluate([change("started", visit("v1", NOON, 60, source="ble"))]) == []
    assert [a.points for a in e.evaluate([change("started", visit("v2", NOON, 60, source="checkin"))])] == [5]
    e = engine(rules(CHECKIN_RULE))
    assert [a.points for a in e.evaluate([change("ended", visit("v3", NOON, 60, source="both", ended=True))])] == [5]


@pytest.mark.parametrize(("dwell", "points"), [(599, None), (600, 5), (1199, 5), (1200, 15), (5000, 15)])
def test_dwell_bonus_pays_the_highest_tier_reached_when_the_visit_ends(dwell: float, points: int | None) -> None:
    e = engine(rules(BONUS_RULE))
    v = visit("v1", NOON, dwell)
    assert e.evaluate([change("started", v), change("zone", v)]) == []  # not while the visit goes on
    got = e.evaluate([change("ended", visit("v1", NOON, dwell, ended=True))])
    assert [a.points for a in got] == ([] if points is None else [points])


@pytest.mark.parametrize(
    ("subject", "classification"),
    [("anon:0011223344556677", "visitor"), ("member:m-1", "pass-by"), ("member:s-1", "staff")],
)
def test_only_member_visitors_earn_points(subject: str, classification: Classification) -> None:
    e = engine(rules(VISIT_RULE, CHECKIN_RULE, BONUS_RULE))
    v = visit("v1", NOON, 3000, subject=subject, classification=classification, source="both", ended=True)
    assert e.evaluate([change("started", v), change("zone", v), change("ended", v)]) == []


def test_built_in_rules_match_docs_rules_md() -> None:
    # docs/rules.md: 10 points for a visit of at least 2 minutes, a dwell bonus of 5 points from
    # 10 minutes and 15 from 20 minutes, and 5 points for a visit proven by an app check-in.
    e = engine(load_rules(None))
    v = visit("v1", NOON, 25 * 60, source="checkin", ended=True)
    got = {a.rule: a.points for a in e.evaluate([change("ended", v)])}
    assert got == {"visit": 10, "dwell-bonus": 15, "checkin": 5}
    e = engine(load_rules(None))
    assert {a.rule: a.points for a in e.evaluate([change("ended", visit("v2", NOON, 100, ended=True))])} == {}


def test_rules_file_problems_name_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(
        '[[rules]]\nid = "a"\nkind = "visit"\npoints = 1\n\n'
        '[[rules]]\nid = "bonus"\nkind = "dwell_bonus"\ntiers = [{ min_dwell_s = 600, points = 5 }, '
        "{ min_dwell_s = 300, points = 9 }]\n"
    )
    with pytest.raises(ConfigError) as err:
        load_rules(path)
    assert "rules[1] (id 'bonus')" in str(err.value) and "rising" in str(err.value)
    path.write_text(
        '[[rules]]\nid = "a"\nkind = "visit"\npoints = 1\n\n[[rules]]\nid = "a"\nkind = "checkin"\npoints = 2\n'
    )
    with pytest.raises(ConfigError, match="duplicate rule id"):
        load_rules(path)
    path.write_text('[[rules]]\nid = "a"\nkind = "visit"\npoints = 0\n')
    with pytest.raises(ConfigError, match=r"rules\[0\] \(id 'a'\)\.points"):
        load_rules(path)


# --------------------------------------------------------------------------- per-day limits


def test_per_day_cap_counts_by_the_stores_local_day_not_the_utc_day() -> None:
    # Berlin in June is UTC+2: 00:30 local is 22:30 UTC of the day before.
    e = engine(rules(VISIT_RULE))
    late = visit("v-late", local(2026, 6, 15, 23, 30), 300)  # 21:30Z on the 15th
    early = visit("v-early", local(2026, 6, 16, 0, 30), 300)  # 22:30Z on the 15th, local 16th
    assert [a.day for a in e.evaluate([change("zone", late), change("zone", early)])] == ["2026-06-15", "2026-06-16"]

    e = engine(rules(VISIT_RULE))
    morning = visit("v-morning", local(2026, 6, 16, 0, 30), 300)  # 22:30Z on the 15th
    evening = visit("v-evening", local(2026, 6, 16, 23, 30), 300)  # 21:30Z on the 16th
    got = e.evaluate([change("zone", morning), change("zone", evening)])
    assert [(a.visit_id, a.day) for a in got] == [("v-morning", "2026-06-16")]


def test_a_visit_across_midnight_counts_on_the_day_it_started() -> None:
    e = engine(rules(VISIT_RULE))
    night = visit("v-night", local(2026, 6, 15, 23, 55), 900)  # ends 00:10 on the 16th
    (a,) = e.evaluate([change("ended", visit("v-night", night.started, 900, ended=True))])
    assert a.day == "2026-06-15"
    (b,) = e.evaluate([change("zone", visit("v-next", local(2026, 6, 16, 9), 300))])
    assert b.day == "2026-06-16"


def test_per_day_allows_that_many_awards_per_member_per_rule() -> None:
    e = engine(rules({**VISIT_RULE, "per_day": 2}, CHECKIN_RULE))
    vs = [visit(f"v{i}", NOON + i * 3600, 300, source="checkin") for i in range(4)]
    got = e.evaluate([change("zone", v) for v in vs])
    assert Counter(a.rule for a in got) == {"visit": 2, "checkin": 1}
    other = visit("w1", NOON, 300, subject="member:m-2")
    assert [a.member for a in e.evaluate([change("zone", other)])] == ["m-2"]  # the cap is per member


def test_per_day_cap_holds_across_dst_change_day() -> None:
    # 2026-10-25 has 25 hours in Berlin; 00:30 and 23:30 local are one day, 00:30 the next is another.
    e = engine(rules(VISIT_RULE))
    vs = [
        visit("a", local(2026, 10, 25, 0, 30), 300),
        visit("b", local(2026, 10, 25, 23, 30), 300),
        visit("c", local(2026, 10, 26, 0, 30), 300),
    ]
    assert [(a.visit_id, a.day) for a in e.evaluate([change("zone", v) for v in vs])] == [
        ("a", "2026-10-25"),
        ("c", "2026-10-26"),
    ]


# --------------------------------------------------------------------------- idempotency and restarts


def test_award_id_is_a_stable_hash_of_member_visit_and_rule() -> None:
    ids = {award_id(m, v, r) for m in ("m-1", "m-2") for v in ("v1", "v2") for r in ("visit", "checkin")}
    assert len(ids) == 8
    assert award_id("m-1", "v1", "visit") == award_id("m-1", "v1", "visit")
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_an_engine_restarted_from_its_ledger_grants_nothing_twice() -> None:
    rs = rules(VISIT_RULE, BONUS_RULE)
    first = engine(rs)
    v = visit("v1", NOON, 1300, ended=True)
    granted = first.evaluate([change("zone", visit("v1", NOON, 200))])
    assert [a.rule for a in granted] == ["visit"]
    second = engine(rs, granted)
    more = second.evaluate([change("zone", visit("v1", NOON, 250)), change("ended", v)])
    assert [(a.rule, a.points) for a in more] == [("dwell-bonus", 15)]
    third = engine(rs, granted + more)
    assert third.evaluate([change("zone", visit("v1", NOON, 250)), change("ended", v)]) == []
    assert third.diagnostics() == {"awards": 2}


def test_a_ledger_that_lists_an_award_twice_counts_it_once() -> None:
    # A ledger merged from two sources (or re-imported) may repeat an award: it is still one award.
    rs = rules({**VISIT_RULE, "per_day": 2})
    (a,) = engine(rs).evaluate([change("zone", visit("v1", NOON, 300))])
    e = engine(rs, [a, a])
    assert [b.visit_id for b in e.evaluate([change("zone", visit("v2", NOON + 3600, 300))])] == ["v2"]


# --------------------------------------------------------------------------- property: exactly once


PROPERTY_RULES = rules(
    {**VISIT_RULE, "per_day": 1},
    {"id": "visit-twice", "kind": "visit", "points": 3, "min_dwell_s": 0, "per_day": 2},
    {**CHECKIN_RULE, "per_day": 1},
    {**BONUS_RULE, "per_day": 1},
)
DAY_STARTS = [local(2026, 10, 24, 0, 5), local(2026, 10, 25, 0, 5), local(2026, 10, 26, 0, 5)]


@st.composite
def visit_histories(draw: st.DrawFn) -> list[VisitChange]:
    """Every change of a few visits by a few members over three local days (one of them 25 h long)."""
    out: list[VisitChange] = []
    n = draw(st.integers(min_value=1, max_value=8))
    for i in range(n):
        member = draw(st.sampled_from(["member:m-1", "member:m-2", "member:s-1", "anon:00ff00ff00ff00ff"]))
        cls: Classification = "staff" if member == "member:s-1" else draw(st.sampled_from(["visitor", "pass-by"]))
        source: VisitSource = draw(st.sampled_from(["ble", "checkin", "both"]))
        started = draw(st.sampled_from(DAY_STARTS)) + draw(st.integers(min_value=0, max_value=86_000))
        dwells = sorted(draw(st.lists(st.integers(min_value=0, max_value=2000), min_size=1, max_size=4)))
        visit_id = f"v{i}"
        zone: VisitChangeKind = "zone"
        kinds: list[VisitChangeKind] = ["started", *([zone] * (len(dwells) - 1))]
        for kind, dwell in zip(kinds, dwells, strict=True):
            out.append(change(kind, visit(visit_id, started, dwell, subject=member, classification=cls, source=source)))
        if draw(st.booleans()):
            final = visit(visit_id, started, dwells[-1], subject=member, classification=cls, source=source, ended=True)
            out.append(change("ended", final))
    return out


def expected_eligible(history: list[VisitChange], days: LocalDays) -> dict[tuple[str, str, str], set[str]]:
    """(member, rule, day) → visits that satisfy the rule, worked out from the rule texts, not the engine."""
    out: dict[tuple[str, str, str], set[str]] = {}
    for c in history:
        v = c.visit
        if not v.subject.startswith("member:") or v.classification != "visitor":
            continue
        member, day = v.subject.removeprefix("member:"), days.day(v.started)
        fired = []
        if v.dwell_s >= 120 or v.source != "ble":  # a verified check-in proves presence (docs/rules.md)
            fired.append("visit")
        fired.append("visit-twice")
        if v.source != "ble":
            fired.append("checkin")
        if c.kind == "ended" and v.dwell_s >= 600:
            fired.append("dwell-bonus")
        for rule in fired:
            out.setdefault((member, rule, day), set()).add(v.visit_id)
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=visit_histories(), seed=st.integers(min_value=0, max_value=2**32 - 1), data=st.data())
def test_any_order_duplicates_and_restarts_grant_each_award_exactly_once(
    history: list[VisitChange], seed: int, data: st.DataObject
) -> None:
    rng = random.Random(seed)
    replay = history + [rng.choice(history) for _ in range(rng.randint(0, len(history)))]
    rng.shuffle(replay)
    restarts = set(data.draw(st.lists(st.integers(min_value=0, max_value=len(replay)), max_size=4)))
    days = LocalDays(TZ)

    ledger: list[Award] = []
    e = PointsEngine(PROPERTY_RULES, days, ledger)
    for i, c in enumerate(replay):
        if i in restarts:
            e = PointsEngine(PROPERTY_RULES, LocalDays(TZ), list(ledger))  # a restart: only the ledger survives
        batch = [c] if rng.random() < 0.5 else [c, c]  # a change seen twice in one batch, too
        ledger += e.evaluate(batch)

    ids = [a.award_id for a in ledger]
    assert len(ids) == len(set(ids)), "an award was granted twice"
    for a in ledger:
        assert a.award_id == award_id(a.member, a.visit_id, a.rule)
    per_day = {r.id: r.per_day for r in PROPERTY_RULES.rules}
    counts = Counter((a.member, a.rule, a.day) for a in ledger)
    eligible = expected_eligible(history, days)
    assert set(counts) <= set(eligible), "an award for a rule the visit did not satisfy"
    for key, visits in eligible.items():
        # the cap holds, and nothing earned is lost: as many as the cap allows, whatever the order
        assert counts[key] == min(per_day[key[1]], len(visits)), key
    for a in ledger:
        assert a.visit_id in eligible[(a.member, a.rule, a.day)]
        if a.rule == "dwell-bonus":
            final = next(c.visit for c in history if c.kind == "ended" and c.visit.visit_id == a.visit_id)
            assert a.points == (15 if final.dwell_s >= 1200 else 5)
