"""The rule kinds beyond visit / checkin / dwell bonus: zone bonus, first visit of the day or week, streaks,
time windows, tier multipliers, caps; proof of presence; explanations; and that docs/rules.md covers them."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from test_points import NOON, change, engine, local, rules, visit

from gateway.config import ConfigError
from gateway.days import LocalDays
from gateway.model import Visit, ZoneSegment
from gateway.points import RULE_KINDS, PointsEngine, dead_rule_problems, load_rules, parse_rules

DOCS = Path(__file__).parent.parent / "docs"


def zoned(visit_id: str, started: float, *zones: tuple[str, float], source: str = "ble") -> Visit:
    segs, t = [], started
    for z, d in zones:
        segs.append(ZoneSegment(z, t, t + d))
        t += d
    return Visit(visit_id, "member:m-1", started, t, tuple(segs), "visitor", source)  # type: ignore[arg-type]


def test_zone_bonus_needs_the_time_in_that_zone() -> None:
    rs = rules({"id": "promo", "kind": "zone_bonus", "zone": "promotions", "points": 7, "min_dwell_s": 60})
    e = engine(rs)
    assert e.evaluate([change("ended", zoned("v1", NOON, ("entrance", 300), ("promotions", 59)))]) == []
    v = zoned("v2", NOON, ("promotions", 30), ("produce", 10), ("promotions", 40))
    (a,) = e.evaluate([change("ended", v)])
    assert (a.rule, a.points) == ("promo", 7) and "70 s in zone promotions" in a.reason


def test_first_visit_of_the_day_and_of_the_week() -> None:
    rs = rules(
        {"id": "first-day", "kind": "first_visit", "period": "day", "points": 3, "per_day": 5},
        {"id": "first-week", "kind": "first_visit", "period": "week", "points": 20},
    )
    e = engine(rs)
    monday = local(2026, 6, 15, 12)
    got = [(a.rule, a.visit_id) for a in e.evaluate([change("started", visit("v1", monday, 10))])]
    assert got == [("first-day", "v1"), ("first-week", "v1")]
    assert e.evaluate([change("started", visit("v2", monday + 3600, 10))]) == [], "per_day 5, but first of the day"
    tuesday = [(a.rule, a.visit_id) for a in e.evaluate([change("started", visit("v3", monday + 86400, 10))])]
    assert tuesday == [("first-day", "v3")]
    next_monday = e.evaluate([change("started", visit("v4", monday + 7 * 86400, 10))])
    assert sorted(a.rule for a in next_monday) == ["first-day", "first-week"]


def test_streak_counts_rewarded_visits_in_the_ledger_and_starts_again_after_an_award() -> None:
    rs = rules(
        {"id": "visit", "kind": "visit", "points": 1},
        {"id": "streak", "kind": "streak", "visits": 3, "days": 7, "points": 50},
    )
    e = engine(rs)
    day = 86400.0
    got: list[str] = []
    for i, offset in enumerate([0, 2 * day, 3 * day, 4 * day, 5 * day, 6 * day, 20 * day]):
        got += [f"{a.rule}@{i}" for a in e.evaluate([change("started", visit(f"v{i}", NOON + offset, 10))])]
    assert [g for g in got if g.startswith("streak")] == ["streak@2", "streak@5"]
    # restarted from its ledger, the engine counts the same
    ledger = []
    e1 = engine(rs)
    for i, offset in enumerate([0, day]):
        ledger += e1.evaluate([change("started", visit(f"w{i}", NOON + offset, 10))])
    e2 = engine(rs, ledger)
    assert [a.rule for a in e2.evaluate([change("started", visit("w2", NOON + 2 * day, 10))])] == ["visit", "streak"]


def test_the_engine_holds_only_the_ledger_its_rules_look_back_on_and_judges_no_older_visit() -> None:
    from gateway.points import LEDGER_MIN_DAYS, ledger_since

    short = rules({"id": "visit", "kind": "visit", "points": 1})
    month = rules({"id": "s", "kind": "streak", "visits": 3, "days": 30, "points": 5})
    assert ledger_since(short, []) is None, "no history: nothing to leave out"
    assert ledger_since(short, ["2026-06-01", "2026-06-15"]) == f"2026-06-{15 - LEDGER_MIN_DAYS:02d}"
    assert ledger_since(month, ["2026-06-15"]) == "2026-05-14"  # 30 days and a margin of 2
    e = PointsEngine(short, LocalDays("Europe/Berlin"), [], since_day="2026-06-10")
    old = visit("v-old", local(2026, 6, 9, 12), 10)  # of a day the ledger no longer holds: never awarded again
    assert e.evaluate([change("started", old)]) == []
    assert "older than the ledger held (from 2026-06-10)" in e.explain(old, "started")[0].why
    assert [a.rule for a in e.evaluate([change("started", visit("v-new", NOON, 10))])] == ["visit"]


def test_a_streak_counts_days_so_visits_on_one_day_make_none() -> None:
    rs = rules(
        {"id": "visit", "kind": "visit", "points": 1, "per_day": 5},
        {"id": "streak", "kind": "streak", "visits": 3, "days": 7, "points": 50},
    )
    e = engine(rs)
    got = [a.rule for h in (0, 1, 2, 3) for a in e.evaluate([change("started", visit(f"v{h}", NOON + h * 3600, 10))])]
    assert got == ["visit"] * 4, "four visits in one day are one day of the streak"
    (why,) = [x.why for x in e.explain(visit("v3", NOON + 3 * 3600, 10)) if x.rule == "streak"]
    assert "visits on 1 of 3 different days" in why


def test_time_windows_are_store_local_and_judged_at_the_visit_start() -> None:
    rs = rules(
        {"id": "happy", "kind": "visit", "points": 5, "when": {"start": "16:00", "end": "18:00"}},
        {"id": "weekend", "kind": "visit", "points": 2, "when": {"days": ["sat", "sun"]}},
    )
    e = engine(rs)
    monday_1630 = local(2026, 6, 15, 16, 30)
    assert [a.rule for a in e.evaluate([change("started", visit("v1", monday_1630, 10))])] == ["happy"]
    assert e.evaluate([change("started", visit("v2", local(2026, 6, 15, 18, 0), 10))]) == []
    saturday = [a.rule for a in e.evaluate([change("started", visit("v3", local(2026, 6, 20, 17, 0), 10))])]
    assert saturday == ["happy", "weekend"]
    (x,) = engine(rs).explain(visit("v4", local(2026, 6, 16, 9, 0), 10), "started")[:1]
    assert x.awarded == 0 and "outside every day 16:00-18:00" in x.why


def test_a_tier_factor_that_rounds_an_award_to_nothing_says_so() -> None:
    rs = rules({"id": "visit", "kind": "visit", "points": 1}).model_copy(update={"tiers": {"trial": 0.4}})
    e = PointsEngine(rs, LocalDays("Europe/Berlin"), [], lambda m: "trial")
    assert e.evaluate([change("started", visit("v1", NOON, 10))]) == []
    (x,) = e.explain(visit("v1", NOON, 10), "started")
    assert x.awarded == 0 and "×0.4 for tier trial, which rounds to 0 points" in x.why


@pytest.mark.parametrize(
    ("points", "factor", "expected"),
    [(5, 1.5, 8), (3, 1.5, 5), (1, 0.5, 1), (50, 1.15, 58), (90, 0.35, 32), (267, 0.01, 3), (7, 1.1, 8), (4, 0.3, 1)],
)
def test_tier_points_round_half_up_on_the_exact_decimal_product(points: int, factor: float, expected: int) -> None:
    # 3 x 1.5 = 4.5 and round() (half to even) said 4; 50 x 1.15 is 57.4999... as floats and round() said 57.
    rs = rules({"id": "visit", "kind": "visit", "points": points}).model_copy(update={"tiers": {"t": factor}})
    e = PointsEngine(rs, LocalDays("Europe/Berlin"), [], lambda m: "t")
    (a,) = e.evaluate([change("started", visit("v1", NOON, 10))])
    assert a.points == expected, (points, factor)


def test_the_tier_rounding_rule_is_documented() -> None:
    doc = (DOCS / "rules.md").read_text(encoding="utf-8")
    assert "half up" in doc and "3 × 1.5 = 4.5 → 5" in doc


def test_tier_multiplier_and_caps() -> None:
    rs = rules(
        {"id": "visit", "kind": "visit", "points": 10, "per_day": 10, "max_points_per_day": 35},
        {"id": "checkin", "kind": "checkin", "points": 10, "per_day": 10},
    ).model_copy(update={"tiers": {"gold": 2.0}, "max_points_per_day": 70})
    from gateway.days import LocalDays

    e = PointsEngine(rs, LocalDays("Europe/Berlin"), [], lambda m: "gold" if m == "m-1" else None)
    first = e.evaluate([change("started", visit("v1", NOON, 10, source="checkin"))])
    assert [(a.rule, a.points) for a in first] == [("visit", 20), ("checkin", 20)]
    assert "×2 for tier gold" in first[0].reason
    second = e.evaluate([change("started", visit("v2", NOON + 60, 10, source="checkin"))])
    assert [(a.rule, a.points) for a in second] == [("visit", 15), ("checkin", 15)]  # rule cap 35, then 70 in all
    assert e.evaluate([change("started", visit("v3", NOON + 120, 10, source="checkin"))]) == []
    plain = e.evaluate([change("started", visit("v4", NOON, 10, subject="member:m-2", source="checkin"))])
    assert [a.points for a in plain] == [10, 10]


def test_proof_of_presence_a_check_in_or_the_rules_dwell_inside() -> None:
    rs = rules(
        {"id": "visit", "kind": "visit", "points": 10, "min_dwell_s": 120},
        {"id": "strict", "kind": "visit", "points": 1, "min_dwell_s": 120, "checkin_is_proof": False},
    )
    assert [a.rule for a in engine(rs).evaluate([change("started", visit("v1", NOON, 10, source="checkin"))])] == [
        "visit"
    ]
    assert engine(rs).evaluate([change("started", visit("v2", NOON, 119))]) == []
    pass_by = visit("v3", NOON, 0, classification="pass-by")  # heard only from the sidewalk: no inside segment
    assert engine(rs).evaluate([change("ended", pass_by)]) == []


def test_explain_says_why_each_rule_did_or_did_not_fire() -> None:
    e = engine(load_rules(None))
    v = visit("v1", NOON, 200, ended=True)
    e.evaluate([change("ended", v)])
    why = {x.rule: (x.awarded, x.why) for x in e.explain(v)}
    assert why["visit"][0] == 10 and "200 s inside" in why["visit"][1]
    assert why["dwell-bonus"] == (0, "stayed 200 s, below the first tier (600 s)")
    assert why["checkin"] == (0, "no app check-in during this visit")


def test_rules_file_errors_name_the_rule_and_field(tmp_path: Path) -> None:
    f = tmp_path / "rules.toml"
    f.write_text(
        '[[rules]]\nid = "hh"\nkind = "visit"\npoints = 1\nwhen = { start = "18:00", end = "16:00" }\n'
        '[[rules]]\nid = "s"\nkind = "streak"\nvisits = 1\ndays = 7\npoints = 5\n'
    )
    with pytest.raises(ConfigError) as e:
        load_rules(f)
    text = "\n".join(e.value.problems)
    assert "rules[0] (id 'hh').when" in text and "must be before end" in text
    assert "rules[1] (id 's').visits = 1" in text


def test_a_rule_without_a_kind_or_of_an_unknown_kind_gets_the_kinds_there_are(tmp_path: Path) -> None:
    f = tmp_path / "rules.toml"
    f.write_text('[[rules]]\nid = "a"\npoints = 1\n[[rules]]\nid = "b"\nkind = "vist"\npoints = 1\n')
    with pytest.raises(ConfigError) as e:
        load_rules(f)
    kinds = "one of: visit, checkin, dwell_bonus, zone_bonus, first_visit, streak"
    assert e.value.problems == [
        f"{f}: rules[0] (id 'a').kind: required key is missing ({kinds})",
        f"{f}: rules[1] (id 'b').kind = 'vist': unknown ({kinds})",
    ]


def test_rules_that_could_never_award_anything_are_named() -> None:
    rules = parse_rules(
        {
            "rules": [
                {"id": "never", "kind": "streak", "visits": 5, "days": 2, "points": 5},
                {"id": "promo", "kind": "zone_bonus", "zone": "nowhere", "points": 5},
                {"id": "fine", "kind": "streak", "visits": 2, "days": 2, "points": 5},
            ]
        },
        "r.toml",
    )
    assert dead_rule_problems(rules, ["entrance", "produce"], "r.toml") == [
        "r.toml: rules[0] (id 'never'): visits = 5 within days = 2 can never happen: visits count one per day "
        "(three check-ins in an afternoon are one); give days at least as many as visits",
        "r.toml: rules[1] (id 'promo').zone = 'nowhere': no such zone in the store plan (zones: entrance, produce)",
    ]


def test_every_rule_kind_and_field_is_documented() -> None:
    doc = (DOCS / "rules.md").read_text(encoding="utf-8")
    for model in RULE_KINDS:
        kind = get_args(model.model_fields["kind"].annotation)[0]
        assert f"### `{kind}`" in doc, kind
        for name in model.model_fields:
            assert f"`{name}`" in doc, (kind, name)
    assert "`tiers`" in doc and "`max_points_per_day`" in doc and "`when`" in doc


def test_local_days_are_used_for_caps() -> None:
    assert LocalDays("Europe/Berlin").tz.key == "Europe/Berlin"


def test_the_example_in_docs_rules_md_is_a_valid_rules_file(tmp_path: Path) -> None:
    import re

    doc = (DOCS / "rules.md").read_text(encoding="utf-8")
    m = re.search(r"## Example\n\n```toml\n(.*?)```", doc, re.S)
    assert m is not None
    f = tmp_path / "rules.toml"
    f.write_text(m.group(1))
    rs = load_rules(f)
    assert {type(r) for r in rs.rules} == set(RULE_KINDS)
