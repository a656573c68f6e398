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
import json
import math
import tomllib
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from gateway.config import ID_PATTERN, ConfigError, Strict, pattern, read_toml, validate
from gateway.days import LocalDays
from gateway.files import remove_durably, write_atomic
from gateway.model import Award, Visit, VisitChange

RuleId = Annotated[str, Field(pattern=ID_PATTERN)]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = pattern(r"^(?:[01]\d|2[0-3]):[0-5]\d$|^24:00$", "must be a local time HH:MM, from 00:00 to 24:00")


class TimeWindow(Strict):
    """When a rule applies, in the store's local time, judged at the visit's start (happy hours, weekends)."""

    days: list[Weekday] = Field(
        default_factory=lambda: list(WEEKDAYS), min_length=1, max_length=7, description="Weekdays it applies on."
    )
    start: str = Field(default="00:00", pattern=_HHMM, description="From this local time (HH:MM), inclusive.")
    end: str = Field(default="24:00", pattern=_HHMM, description="Until this local time (HH:MM), exclusive.")

    @model_validator(mode="after")
    def _order(self) -> TimeWindow:
        if self.start >= self.end:
            raise ValueError(f"start {self.start} must be before end {self.end} (split a window across midnight)")
        return self

    def contains(self, ts: float, tz: tzinfo) -> bool:
        """True when `ts` falls in the window, in local time."""
        local = datetime.fromtimestamp(ts, tz)
        hhmm = f"{local.hour:02d}:{local.minute:02d}"
        return WEEKDAYS[local.weekday()] in self.days and self.start <= hhmm < self.end

    def describe(self) -> str:
        """e.g. 'mon-fri 16:00-18:00'."""
        days = "every day" if len(self.days) == 7 else ",".join(self.days)
        return f"{days} {self.start}-{self.end}"


class _RuleBase(Strict):
    id: RuleId = Field(description="Rule id (in awards and events).")
    description: str = Field(default="", max_length=200, description="Shown to support staff and members.")
    per_day: int = Field(default=1, ge=1, le=100, description="Awards per member per local day, at most.")
    max_points_per_day: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Points per member per local day from this rule, at most."
    )
    when: TimeWindow | None = Field(default=None, description="Only for visits that start in this window.")
    checkin_is_proof: bool = Field(
        default=True, description="A verified check-in proves presence in place of the rule's min_dwell_s."
    )


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


class ZoneBonusRule(_RuleBase):
    """Points for spending `min_dwell_s` in one zone (e.g. the promotions zone) during a visit."""

    kind: Literal["zone_bonus"]
    zone: RuleId = Field(description="Zone id from the store plan.")
    points: int = Field(ge=1, le=100_000, description="Points granted.")
    min_dwell_s: float = Field(default=0, ge=0, le=86_400, description="Seconds in the zone, summed over the visit.")


class FirstVisitRule(_RuleBase):
    """Points for the member's first rewarded visit of the local day or week (weeks start on Monday)."""

    kind: Literal["first_visit"]
    period: Literal["day", "week"] = Field(description="day or week.")
    points: int = Field(ge=1, le=100_000, description="Points granted.")
    min_dwell_s: float = Field(default=0, ge=0, le=86_400, description="Dwell inside before it counts, s.")


class StreakRule(_RuleBase):
    """Points when this visit makes `visits` visits within `days` local days, from the member's ledger.

    A visit counts when it earned points under any rule. After a streak award the count starts again,
    so a member earns it once per `visits` visits, not on every visit after reaching it.
    """

    kind: Literal["streak"]
    visits: int = Field(ge=2, le=100, description="Visits needed, this one included.")
    days: int = Field(ge=1, le=366, description="Within this many local days, today included.")
    points: int = Field(ge=1, le=100_000, description="Points granted.")
    min_dwell_s: float = Field(default=0, ge=0, le=86_400, description="Dwell inside before this visit counts, s.")


Rule = Annotated[
    VisitRule | CheckinRule | DwellBonusRule | ZoneBonusRule | FirstVisitRule | StreakRule,
    Field(discriminator="kind"),
]
AnyRule = VisitRule | CheckinRule | DwellBonusRule | ZoneBonusRule | FirstVisitRule | StreakRule
RULE_KINDS = (VisitRule, CheckinRule, DwellBonusRule, ZoneBonusRule, FirstVisitRule, StreakRule)
"""Every rule kind (docs/rules.md documents each)."""


class Presence(Strict):
    """What BLE sightings must also show before they prove a member's presence: the guard against a phone left
    in the store (by the door, on a shelf) to collect visits. An app check-in proves presence on its own."""

    min_movement_m: float = Field(
        default=10.0,
        ge=0,
        le=200,
        description="While a visit is open, its sightings prove presence only once the phone has moved this far "
        "inside (Visit.moved_m); a visit that never did is judged when it ends. 0: no such wait.",
    )
    max_visit_s: float = Field(
        default=7200.0,
        ge=600,
        le=86_400,
        description="A visit heard for longer than this proves nothing by its sightings: shoppers do not stay "
        "that long, a phone left in the store or staff not on the staff list do.",
    )


MAX_RULES = 100
"""Rules in one set: every visit is judged by each of them, on the loop that also serves the dashboard (20,000
rules from `cmd/rules` stalled a gateway)."""


class RuleSet(Strict):
    """A rules file."""

    rules: list[Rule] = Field(
        min_length=1, max_length=MAX_RULES, description=f"The rules, applied in order (at most {MAX_RULES})."
    )
    tiers: dict[str, float] = Field(
        default_factory=dict, description="Points multiplier by member tier (from the backend), e.g. gold = 2.0."
    )
    max_points_per_day: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Points per member per local day over all rules, at most."
    )
    presence: Presence = Field(
        default_factory=Presence, description="What BLE sightings must show to prove presence (docs/rules.md)."
    )

    @model_validator(mode="after")
    def _unique(self) -> RuleSet:
        ids = [r.id for r in self.rules]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate rule id(s) {', '.join(dupes)}: every rule id must be unique")
        for tier, factor in self.tiers.items():
            if not 0 <= factor <= 10:
                raise ValueError(f"tiers.{tier} = {factor}: a multiplier must be 0..10")
        return self


def tier_points(points: int, factor: float) -> int:
    """`points` times a tier multiplier, rounded half up (docs/rules.md, "Tier multipliers").

    Computed in decimal with the multiplier as written (its shortest decimal form: ``1.15`` is 1.15, not the binary
    float just below it), so a backend can recompute the same integer: 3 × 1.5 = 4.5 → 5, 50 × 1.15 = 57.5 → 58.
    Python's ``round`` would round half to even (4.5 → 4) and the float product 50 * 1.15 = 57.4999… down to 57.
    """
    exact = Decimal(points) * Decimal(repr(float(factor)))
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


LEDGER_MIN_DAYS = 9
"""Days of ledger a points engine holds at least: a week rule looks back to Monday (6 days), a visit may cross
midnight, and a day file may be a day behind the journal."""


def ledger_since(rules: RuleSet, history_days: Sequence[str]) -> str | None:
    """The first day of ledger the engine needs, counted back from the newest day with history, or None (all).

    Caps, first visits and streaks look back at most the longest streak's `days` (a week rule 7): loading
    only that keeps a gateway's memory and start-up flat after a year of awards. Visits older than that are
    not judged again (`PointsEngine`), so exactly-once holds without the older ledger.
    """
    if not history_days:
        return None
    return (date.fromisoformat(max(history_days)) - timedelta(days=ledger_days(rules))).isoformat()


def ledger_days(rules: RuleSet) -> int:
    """How many days of ledger the rules look back on (`ledger_since`): the longest streak's `days` plus 2, at least
    LEDGER_MIN_DAYS. The history kept (`storage.history_days`) is never shorter."""
    return max([LEDGER_MIN_DAYS, *(r.days + 2 for r in rules.rules if isinstance(r, StreakRule))])


def load_rules(path: Path | None) -> RuleSet:
    """Rules from a TOML file, or the built-in rules; ConfigError names the rule and field."""
    if path is None:
        text = resources.files("gateway").joinpath("defaults/rules.toml").read_text(encoding="utf-8")
        data, source = tomllib.loads(text), "built-in rules"
    elif not path.exists():
        raise ConfigError([f"{path}: no such file (points.rules names it; a relative path is next to the config file)"])
    else:
        data, source = read_toml(path), str(path)
    return parse_rules(data, source)


def parse_rules(data: dict[str, Any], source: str) -> RuleSet:
    """A rules file's content (as parsed TOML or JSON) validated; ConfigError names `source`, the rule and field."""
    try:
        rules: RuleSet = validate(RuleSet, data, source)
    except ConfigError as e:
        raise ConfigError([_name_rule(line, data) for line in e.problems]) from None
    return rules


def dead_rule_problems(rules: RuleSet, zone_ids: Collection[str], source: str) -> list[str]:
    """One line per rule that could never award anything: a zone bonus for a zone the store plan does not have, a
    streak of more visits than days. Not refused by `parse_rules` itself, so that rules the backend sent before a
    plan change or by an older version still load (`visita run` warns about them; config check and cmd/rules
    refuse them)."""
    out: list[str] = []
    for i, r in enumerate(rules.rules):
        where = f"{source}: rules[{i}] (id {r.id!r})"
        if isinstance(r, ZoneBonusRule) and r.zone not in zone_ids:
            out.append(f"{where}.zone = {r.zone!r}: no such zone in the store plan (zones: {', '.join(zone_ids)})")
        if isinstance(r, StreakRule) and r.visits > r.days:
            out.append(
                f"{where}: visits = {r.visits} within days = {r.days} can never happen: visits count one per day "
                "(three check-ins in an afternoon are one); give days at least as many as visits"
            )
    return out


BACKEND_RULES_FILE = "rules-from-backend.json"
"""In the data directory: the rules the backend last sent (downlink `cmd/rules`). They are in force, across restarts
and power cuts, instead of the config's rules file until the backend sends others or `{"from_file": true}`."""


def save_backend_rules(data_dir: Path, data: dict[str, Any], received_at: float, command_id: str | None) -> bool:
    """Keep rules the backend sent (already validated: `parse_rules`) so that a restart applies them again. OSError
    when they could not be kept; False when they are kept but their directory could not be synced (`write_atomic`)."""
    record = {"received_at": received_at, "command_id": command_id, "ruleset": data}
    return write_atomic(data_dir / BACKEND_RULES_FILE, (json.dumps(record, indent=1) + "\n").encode())


def backend_rules_source(data_dir: Path, received_at: float, command_id: str | None) -> str:
    """Where rules kept by `save_backend_rules` come from, in words (as `rules_in_force` says after a restart)."""
    return _backend_source(data_dir / BACKEND_RULES_FILE, received_at, command_id)


def _backend_source(path: Path, received_at: float, command_id: str | None) -> str:
    when = datetime.fromtimestamp(received_at, UTC).isoformat(timespec="seconds")
    cmd = f"cmd/rules id {command_id!r}" if command_id else "cmd/rules"
    return f"sent by the backend at {when} ({cmd}), kept in {path}"


def rules_from_file(rules_file: Path | None) -> tuple[RuleSet, str]:
    """The rules file's rules (the built-in ones without a file), and where they come from in words."""
    return load_rules(rules_file), str(rules_file) if rules_file else "built-in rules"


def drop_backend_rules(data_dir: Path) -> bool:
    """Forget the backend's rules (the rules file is in force again); True when there were any. OSError when they
    could not be deleted."""
    return remove_durably(data_dir / BACKEND_RULES_FILE)


class BackendRulesDamaged(ConfigError):
    """The kept copy of the backend's rules cannot be read or is not a valid rules set."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        super().__init__([*problems, f"{path}: {_BACKEND_RULES_FIX}"])
        self.path = path


def rules_in_force(rules_file: Path | None, data_dir: Path) -> tuple[RuleSet, str]:
    """The rules a gateway with this data directory applies, and where they come from in words: the backend's
    (`BACKEND_RULES_FILE`) if it sent any, else the rules file's, else the built-in ones. BackendRulesDamaged when
    the kept backend rules cannot be used (the problem, and how to get going again); ConfigError from the rules
    file."""
    path = data_dir / BACKEND_RULES_FILE
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return rules_from_file(rules_file)
    except OSError as e:
        raise BackendRulesDamaged(path, [f"{path}: cannot be read ({e.strerror})"]) from None
    except ValueError as e:  # not UTF-8
        raise BackendRulesDamaged(path, [f"{path}: not text ({e})"]) from None
    try:
        record = json.loads(raw)
        data, received_at = record["ruleset"], float(record["received_at"])
        command_id = record.get("command_id")
        if not math.isfinite(received_at) or not isinstance(command_id, str | None):
            raise ValueError("received_at or command_id is not what was written")
        source = _backend_source(path, received_at, command_id)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, OSError, RecursionError) as e:
        raise BackendRulesDamaged(path, [f"{path}: not the rules the backend sent ({e!r})"]) from None
    if not isinstance(data, dict):
        raise BackendRulesDamaged(path, [f"{path}: its ruleset is not an object"])
    try:  # valid when kept, so this means a newer rules format or an edit by hand
        rules = parse_rules(data, str(path))
    except ConfigError as e:
        raise BackendRulesDamaged(path, e.problems) from None
    return rules, source


_BACKEND_RULES_FIX = "delete it to apply the config's rules file until the backend sends its rules again (cmd/rules)"


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


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why one rule did or did not award a visit (for `visita points explain`)."""

    rule: str
    """Rule id."""
    awarded: int
    """Points awarded (0 when it did not fire)."""
    why: str
    """The reason, in words support staff can read out."""


class PointsEngine:
    """Applies a RuleSet to visit changes; pure, starting from the ledger it is given."""

    def __init__(
        self,
        rules: RuleSet,
        days: LocalDays,
        ledger: Iterable[Award] = (),
        tier_of: Callable[[str], str | None] = lambda member: None,
        known: Callable[[str], bool] = lambda member: True,
        since_day: str | None = None,
    ) -> None:
        """`tier_of` and `known` come from the member directory: a member's tier, and whether the backend still
        provisions the member (one it removed earns nothing more, even on a visit that is still open).
        `since_day`: the ledger holds the awards of that day on (`ledger_since`); older visits are not judged."""
        self._since = since_day
        self._set = rules
        self._rules = rules.rules
        self._days = days
        self._tier_of = tier_of
        self._known = known
        self._granted: dict[str, Award] = {}
        self._rules_by_visit: dict[str, dict[str, int]] = {}  # visit_id -> rule -> points: no hashing every tick
        # Rules that can fire while a visit is open (a dwell bonus waits for the end): an open visit that has
        # all of them is skipped at once, since every tick looks at every open visit.
        self._open_rules = [r.id for r in self._rules if not isinstance(r, DwellBonusRule)]
        self._per_day: dict[tuple[str, str, str], int] = {}
        self._per_week: dict[tuple[str, str, str], int] = {}
        self._rule_day_points: dict[tuple[str, str, str], int] = {}
        self._visit_points: dict[str, int] = {}
        self._day_points: dict[tuple[str, str], int] = {}
        self._member_visits: dict[str, dict[str, str]] = {}  # member -> visit_id -> day of its first award
        self._streak_day: dict[tuple[str, str], str] = {}  # (member, rule) -> day of its last award
        for a in ledger:
            self._record(a)

    def _week(self, day: str) -> str:
        iso = date.fromisoformat(day).isocalendar()
        return f"{iso.year}-W{iso.week:02d}"

    def _record(self, a: Award) -> None:
        if a.award_id in self._granted:
            return  # a ledger that lists an award twice still holds one award against the day's limit
        self._granted[a.award_id] = a
        self._rules_by_visit.setdefault(a.visit_id, {})[a.rule] = a.points
        key = (a.member, a.rule, a.day)
        self._per_day[key] = self._per_day.get(key, 0) + 1
        wkey = (a.member, a.rule, self._week(a.day))
        self._per_week[wkey] = self._per_week.get(wkey, 0) + 1
        self._rule_day_points[key] = self._rule_day_points.get(key, 0) + a.points
        self._visit_points[a.visit_id] = self._visit_points.get(a.visit_id, 0) + a.points
        self._day_points[(a.member, a.day)] = self._day_points.get((a.member, a.day), 0) + a.points
        self._member_visits.setdefault(a.member, {}).setdefault(a.visit_id, a.day)
        if a.rule in {r.id for r in self._rules if isinstance(r, StreakRule)}:
            last = self._streak_day.get((a.member, a.rule))
            if last is None or a.day > last:
                self._streak_day[(a.member, a.rule)] = a.day

    def visit_points(self, visit_id: str) -> int:
        """Points awarded for this visit so far."""
        return self._visit_points.get(visit_id, 0)

    def day_points(self, member: str, day: str) -> int:
        """Points awarded to this member on this store-local day so far."""
        return self._day_points.get((member, day), 0)

    @property
    def rules(self) -> RuleSet:
        """The rules this engine judges by."""
        return self._set

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
        if kind == "open":
            done = self._rules_by_visit.get(visit.visit_id)
            if done is not None and all(r in done for r in self._open_rules):
                return []
        out: list[Award] = []
        for rule in self._rules:
            points, reason = self._decide(rule, kind, ts, visit, member)
            if points <= 0:
                continue
            aid = award_id(member, visit.visit_id, rule.id)
            award = Award(aid, member, rule.id, points, visit.visit_id, ts, self._days.day(visit.started), reason)
            self._record(award)
            out.append(award)
        return out

    def _decide(self, rule: AnyRule, kind: str, ts: float, visit: Visit, member: str) -> tuple[int, str]:
        """(points, reason) this rule grants at `ts` (`kind`: open, started, zone, ended), or (0, why not).
        Limits and caps included."""
        if member is None or visit.classification != "visitor":
            return 0, f"not a member's visit (classified {visit.classification})"
        done = self._rules_by_visit.get(visit.visit_id)
        if done is not None and rule.id in done:
            return 0, f"already awarded {done[rule.id]} for this visit"
        if not self._known(member):
            return 0, "the member is not provisioned on this gateway (removed by the backend, or never imported)"
        day = self._days.day(visit.started)
        if self._since is not None and day < self._since:
            return 0, f"the visit is of {day}, older than the ledger held (from {self._since}): not judged again"
        if rule.when is not None and not rule.when.contains(visit.started, self._days.tz):
            return 0, f"the visit started outside {rule.when.describe()}"
        # A check-in proves the shopper was there, not how long: rules whose amount is measured from the
        # sightings (dwell, time in a zone) keep the presence guard, or a phone left by the door that checks
        # in every morning would collect the top dwell tier.
        measured = isinstance(rule, (DwellBonusRule, ZoneBonusRule))
        checked_in = rule.checkin_is_proof and visit.source in ("checkin", "both")
        if not isinstance(rule, CheckinRule) and (measured or not checked_in):
            unproven = self._ble_unproven(kind, ts, visit)
            if unproven is not None:
                return 0, unproven
        points, reason = self._fires(rule, kind, visit, member, day)
        if points <= 0:
            return 0, reason
        if self._per_day.get((member, rule.id, day), 0) >= rule.per_day:
            return 0, f"{reason}, but the rule's {rule.per_day} award(s) for {day} were already made"
        tier = self._tier_of(member)
        factor = self._set.tiers.get(tier, 1.0) if tier is not None else 1.0
        if factor != 1.0:
            points = tier_points(points, factor)
            reason += f", ×{factor:g} for tier {tier}"
            if points <= 0:
                return 0, reason + ", which rounds to 0 points: nothing awarded"
        if rule.max_points_per_day is not None:
            left = rule.max_points_per_day - self._rule_day_points.get((member, rule.id, day), 0)
            if left < points:
                points, reason = left, reason + f", capped at {rule.max_points_per_day} a day for this rule"
        if self._set.max_points_per_day is not None:
            left = self._set.max_points_per_day - self._day_points.get((member, day), 0)
            if left < points:
                points, reason = left, reason + f", capped at {self._set.max_points_per_day} a day in all"
        if points <= 0:
            return 0, reason.replace(", capped at", "; nothing left: capped at", 1)
        return points, reason

    def _ble_unproven(self, kind: str, ts: float, visit: Visit) -> str | None:
        """Why the visit's sightings do not prove presence (yet), or None when they can (docs/rules.md).

        A phone left in the store is heard inside for as long as anyone likes, so sightings must also show a
        shopper: a phone that moves, or a visit that ends within `max_visit_s`.
        """
        guard = self._set.presence
        lasted = (visit.ended if visit.ended is not None else ts) - visit.started
        if lasted > guard.max_visit_s:
            return (
                f"the phone was heard inside for {lasted / 60:.0f} min, longer than presence.max_visit_s "
                f"({guard.max_visit_s / 60:.0f} min): a phone left in the store, or staff; a check-in still proves "
                "presence for the rules that do not measure dwell"
            )
        moved = visit.moved_m
        if kind != "ended" and guard.min_movement_m > 0 and (moved is None or moved < guard.min_movement_m):
            so_far = "no position yet" if moved is None else f"moved {moved:.0f} m inside so far"
            return (
                f"{so_far}: points come once the phone has moved {guard.min_movement_m:.0f} m "
                "(presence.min_movement_m) or when the visit ends (a phone lying still is no shopper)"
            )
        return None

    def _present(self, rule: AnyRule, visit: Visit, min_dwell_s: float) -> tuple[bool, str]:
        """Proof of presence: a verified check-in (if the rule takes one) or `min_dwell_s` inside the store."""
        if rule.checkin_is_proof and visit.source in ("checkin", "both"):
            return True, "visit proven by an app check-in"
        if visit.dwell_s >= min_dwell_s:
            return True, f"visit with {visit.dwell_s:.0f} s inside (needs {min_dwell_s:.0f} s)"
        return False, f"only {visit.dwell_s:.0f} s inside so far (needs {min_dwell_s:.0f} s) and no check-in"

    def _fires(self, rule: AnyRule, kind: str, visit: Visit, member: str, day: str) -> tuple[int, str]:
        """(points, reason) if `rule`'s own condition holds for this visit at this change, else (0, why not)."""
        if isinstance(rule, VisitRule):
            ok, why = self._present(rule, visit, rule.min_dwell_s)
            return (rule.points if ok else 0), why
        if isinstance(rule, CheckinRule):
            if visit.source in ("checkin", "both"):
                return rule.points, "visit confirmed by an app check-in"
            return 0, "no app check-in during this visit"
        if isinstance(rule, DwellBonusRule):
            if kind != "ended":
                return 0, "a dwell bonus is granted when the visit ends"
            reached = [t for t in rule.tiers if visit.dwell_s >= t.min_dwell_s]
            if not reached:
                return 0, f"stayed {visit.dwell_s:.0f} s, below the first tier ({rule.tiers[0].min_dwell_s:.0f} s)"
            tier = reached[-1]
            return tier.points, f"stayed {visit.dwell_s:.0f} s (tier {tier.min_dwell_s:.0f} s)"
        if isinstance(rule, ZoneBonusRule):
            spent = visit.zone_dwell().get(rule.zone)
            if spent is None:
                return 0, f"never in zone {rule.zone}"
            if spent < rule.min_dwell_s:
                return 0, f"{spent:.0f} s in zone {rule.zone} (needs {rule.min_dwell_s:.0f} s)"
            return rule.points, f"{spent:.0f} s in zone {rule.zone} (needs {rule.min_dwell_s:.0f} s)"
        ok, why = self._present(rule, visit, rule.min_dwell_s)
        if not ok:
            return 0, why
        if isinstance(rule, FirstVisitRule):
            if rule.period == "day":
                done = self._per_day.get((member, rule.id, day), 0)
            else:
                done = self._per_week.get((member, rule.id, self._week(day)), 0)
            if done:
                return 0, f"not the first rewarded visit of the {rule.period}"
            return rule.points, f"first visit of the {rule.period} ({why})"
        since = (date.fromisoformat(day) - timedelta(days=rule.days - 1)).isoformat()
        last = self._streak_day.get((member, rule.id))
        if last is not None:  # the count starts again the day after the last streak award
            since = max(since, (date.fromisoformat(last) + timedelta(days=1)).isoformat())
        # Days with a rewarded visit, not visits: three check-ins in one afternoon are no three-visit streak.
        visits = self._member_visits.get(member, {})
        count = len({day} | {d for v, d in visits.items() if v != visit.visit_id and since <= d <= day})
        if count < rule.visits:
            return 0, f"visits on {count} of {rule.visits} different days within {rule.days} days"
        return rule.points, f"visits on {count} different days within {rule.days} days ({why})"

    def explain(self, visit: Visit, kind: str = "ended") -> list[Explanation]:
        """For each rule: the points it awarded this visit, or why it did not (support staff's question)."""
        member = visit.member or ""
        out = []
        for rule in self._rules:
            granted = self._granted.get(award_id(member, visit.visit_id, rule.id))
            if granted is not None:
                out.append(Explanation(rule.id, granted.points, granted.reason))
                continue
            ts = visit.ended if visit.ended is not None else visit.started
            _, why = self._decide(rule, kind, ts, visit, member) if visit.member else (0, "not a member's visit")
            out.append(Explanation(rule.id, 0, why))
        return out

    def awards_of(self, member: str) -> list[Award]:
        """The member's awards the engine knows (its ledger and those granted since), oldest first."""
        return [a for a in self._granted.values() if a.member == member]

    def diagnostics(self) -> dict[str, int]:
        """Awards known to the engine (from the ledger and granted since start)."""
        return {"awards": len(self._granted)}


def explain_member(engine: PointsEngine, visits: Sequence[Visit], member: str, tz: tzinfo) -> dict[str, Any]:
    """Support staff's answer to "where are my points?": for each of the member's `visits` (in the order given; an
    open one judged as it stands now) every rule with the points it awarded or why it did not, and the member's
    other awards the engine knows. One JSON-ready object: `visita points explain` and the support API print it."""
    out: list[dict[str, Any]] = []
    for v in visits:
        why = engine.explain(v, "ended" if v.ended is not None else "open")
        out.append(
            {
                "visit_id": v.visit_id,
                "started": datetime.fromtimestamp(v.started, tz).isoformat(timespec="seconds"),
                "open": v.ended is None,
                "dwell_s": round(v.dwell_s),
                "source": v.source,
                "classification": v.classification,
                "path": list(v.path),
                "points": sum(x.awarded for x in why),
                "rules": [{"rule": x.rule, "points": x.awarded, "why": x.why} for x in why],
            }
        )
    shown = {v.visit_id for v in visits}
    others = [
        {"visit_id": a.visit_id, "rule": a.rule, "points": a.points, "reason": a.reason}
        for a in engine.awards_of(member)
        if a.visit_id not in shown
    ]
    return {"member": member, "visits": out, "other_awards": others}
