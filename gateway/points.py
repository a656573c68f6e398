"""Visit-based loyalty points: the rules file and the engine that applies it exactly once.

Rules are read from TOML (docs/rules.md) and validated with errors that name the rule and
the field. The engine looks at visit changes and grants `Award`s:

* only members, only visits classified `visitor` (inside the store for the visit's
  minimum dwell: a token heard only on the sidewalk never qualifies), never staff;
* each rule at most `per_day` times per member per store-local day;
* an award id is hash(member, visit, rule), so a restart or a re-run of the rules over the
  same visit can never grant it twice: the ledger the engine starts from already holds it.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from gateway.config import ID_PATTERN, ConfigError, Strict, read_toml, validate
from gateway.days import LocalDays
from gateway.model import Award, Visit, VisitChange

RuleId = Annotated[str, Field(pattern=ID_PATTERN)]


class _RuleBase(Strict):
    id: RuleId = Field(description="Rule id (in awards and events).")
    description: str = Field(default="", max_length=200, description="Shown to support staff and members.")
    per_day: int = Field(default=1, ge=1, le=100, description="Awards per member per local day, at most.")


class VisitRule(_RuleBase):
    """Points for a visit once it has lasted `min_dwell_s` inside the store."""

    kind: Literal["visit"]
    points: int = Field(ge=1, le=100_000, description="Points granted.")
    min_dwell_s: float = Field(default=0, ge=0, le=86_400, description="Dwell inside before it counts, s.")


class CheckinRule(_RuleBase):
    """Points for a visit proven by an app check-in (source checkin or both)."""

    kind: Literal["checkin"]
    points: int = Field(ge=1, le=100_000, description="Points granted.")


class DwellTier(Strict):
    """One step of a dwell bonus."""

    min_dwell_s: float = Field(ge=0, le=86_400, description="Dwell inside needed, s.")
    points: int = Field(ge=1, le=100_000, description="Points for reaching it.")


class DwellBonusRule(_RuleBase):
    """Points by the highest dwell tier a visit reached, granted when the visit ends."""

    kind: Literal["dwell_bonus"]
    tiers: list[DwellTier] = Field(min_length=1, max_length=20, description="Tiers, by rising min_dwell_s.")

    @model_validator(mode="after")
    def _rising(self) -> DwellBonusRule:
        dwell = [t.min_dwell_s for t in self.tiers]
        if dwell != sorted(set(dwell)):
            raise ValueError(f"tiers must have strictly rising min_dwell_s, got {dwell}")
        return self


Rule = Annotated[VisitRule | CheckinRule | DwellBonusRule, Field(discriminator="kind")]


class RuleSet(Strict):
    """A rules file."""

    rules: list[Rule] = Field(min_length=1, description="The rules, applied in order.")

    @model_validator(mode="after")
    def _unique(self) -> RuleSet:
        ids = [r.id for r in self.rules]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate rule id(s) {', '.join(dupes)}: every rule id must be unique")
        return self


def load_rules(path: Path | None) -> RuleSet:
    """Rules from a TOML file, or the built-in rules; ConfigError names the rule and field."""
    if path is None:
        text = resources.files("gateway").joinpath("defaults/rules.toml").read_text(encoding="utf-8")
        data, source = tomllib.loads(text), "built-in rules"
    else:
        data, source = read_toml(path), str(path)
    try:
        rules: RuleSet = validate(RuleSet, data, source)
    except ConfigError as e:
        raise ConfigError([_name_rule(line, data) for line in e.problems]) from None
    return rules


def _name_rule(line: str, data: dict[str, object]) -> str:
    """Add the rule's id to 'rules[2].points' so a long file's problem is easy to find."""
    rules = data.get("rules")
    if not isinstance(rules, list):
        return line
    for i, rule in enumerate(rules):
        marker = f"rules[{i}]"
        if marker in line and isinstance(rule, dict) and isinstance(rule.get("id"), str):
            return line.replace(marker, f"{marker} (id {rule['id']!r})", 1)
    return line


def award_id(member: str, visit_id: str, rule: str) -> str:
    """The idempotency key of an award."""
    return hashlib.sha256(f"{member}|{visit_id}|{rule}".encode()).hexdigest()[:32]


class PointsEngine:
    """Applies a RuleSet to visit changes; pure, starting from the ledger it is given."""

    def __init__(self, rules: RuleSet, days: LocalDays, ledger: Iterable[Award] = ()) -> None:
        self._rules = rules.rules
        self._days = days
        self._granted: set[str] = set()
        self._per_day: dict[tuple[str, str, str], int] = {}
        for a in ledger:
            self._record(a)

    def _record(self, a: Award) -> None:
        if a.award_id in self._granted:
            return  # a ledger that lists an award twice still holds one award against the day's limit
        self._granted.add(a.award_id)
        key = (a.member, a.rule, a.day)
        self._per_day[key] = self._per_day.get(key, 0) + 1

    def evaluate(self, changes: Sequence[VisitChange]) -> list[Award]:
        """Awards earned by these changes that were not granted before."""
        return [a for c in changes for a in self._grant(c.kind, c.ts, c.visit)]

    def evaluate_open(self, visits: Iterable[Visit], now: float) -> list[Award]:
        """Awards open visits have earned by `now` (a visit rule's dwell reached while the shopper is
        still in one zone), so members see their points before they leave, not one timeout after."""
        return [a for v in visits if v.member is not None for a in self._grant("open", now, v)]

    def _grant(self, kind: str, ts: float, visit: Visit) -> list[Award]:
        member = visit.member
        if member is None or visit.classification != "visitor":
            return []
        out: list[Award] = []
        day = self._days.day(visit.started)
        for rule in self._rules:
            got = self._fires(rule, kind, visit)
            if got is None:
                continue
            points, reason = got
            aid = award_id(member, visit.visit_id, rule.id)
            if aid in self._granted or self._per_day.get((member, rule.id, day), 0) >= rule.per_day:
                continue
            award = Award(aid, member, rule.id, points, visit.visit_id, ts, day, reason)
            self._record(award)
            out.append(award)
        return out

    @staticmethod
    def _fires(rule: VisitRule | CheckinRule | DwellBonusRule, kind: str, visit: Visit) -> tuple[int, str] | None:
        """(points, reason) if `rule` grants something for this visit at this change, else None."""
        if isinstance(rule, VisitRule):
            if visit.dwell_s >= rule.min_dwell_s:
                return rule.points, f"visit with {visit.dwell_s:.0f} s inside (needs {rule.min_dwell_s:.0f} s)"
            return None
        if isinstance(rule, CheckinRule):
            if visit.source in ("checkin", "both"):
                return rule.points, "visit confirmed by an app check-in"
            return None
        if kind != "ended":
            return None
        reached = [t for t in rule.tiers if visit.dwell_s >= t.min_dwell_s]
        if not reached:
            return None
        tier = reached[-1]
        return tier.points, f"stayed {visit.dwell_s:.0f} s (tier {tier.min_dwell_s:.0f} s)"

    def diagnostics(self) -> dict[str, int]:
        """Awards known to the engine (from the ledger and granted since start)."""
        return {"awards": len(self._granted)}
