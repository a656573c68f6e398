"""Footfall counts for the dashboard and the `footfall.minute` aggregates.

Counts follow the visit tracker's changes: an entry is a visit that started, an exit one that
ended, a pass-by a session that ended without ever qualifying. Staff are counted apart and
never in occupancy or entries.

Today's counts are per store-local day, and a visit belongs to the day it began (`Visit.started`): "came in
today" and "staff visits today" count the visits that started today, once, however long they last. A visit
still open at midnight (a shopper, or staff on a late shift, inside across it: one visit, gateway/identity.py)
stays in occupancy but is not counted again in the new day, so right after midnight the day's counts are 0 while
people are inside. A visit that began just before midnight and was reported (reached `min_dwell_s`) just after it
came in yesterday: it is not today's; yesterday's counts had closed, so no day's counts hold it (the
`footfall.minute` of its report does). Pass-bys count on the day their session closed.

Today's counts, the last hour's entries and the minute in progress are kept in the store (`state`, `restore`):
a restart goes on counting where it stopped, and the minute it stopped in is published once, when it closes (or
at the first update after a restart in a later minute, without filling the minutes the gateway was down with
zeros it did not count). The open visits a restart takes up (gateway/visits.py) are counted as open again
(`reopen`), so occupancy goes on and their ends count as exits.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from gateway.days import LocalDays
from gateway.model import Visit, VisitChange

log = logging.getLogger("visita.footfall")

QUIET_GAP_S = 3600.0
"""A run of quiet minutes (nothing entered, left or passed) longer than this is not filled minute by minute: the
clock stepped forward (NTP after a boot without a real-time clock) or the data jumped. Only its last hour is
published, so a step of days is not thousands of empty events in the outbox (docs/events.md)."""


@dataclass(slots=True)
class _Minute:
    start: float
    entries: int = 0
    exits: int = 0
    passbys: int = 0
    dwell_sum_s: float = 0.0


_TODAY_BEFORE = {"visitors", "passbys", "staff"}
"""Today's counts an earlier version kept across a restart (`restore` takes them, the others from zero)."""


class Footfall:
    """Live counts and per-minute aggregates; no I/O, time from the data."""

    def __init__(self, days: LocalDays) -> None:
        self._days = days
        self._open: set[str] = set()
        self._entries: deque[float] = deque()  # start times of visits, for "last hour"
        self._day = ""
        # "left" and "dwell_s": visitors' visits that ended today and their dwell summed (whole seconds), for the
        # average visit of the day
        self._today = {"visitors": 0, "passbys": 0, "staff": 0, "left": 0, "dwell_s": 0}
        self._minute: _Minute | None = None
        self._now = 0.0
        self._restored: dict[str, Any] | None = None
        self._reopened: list[Visit] = []  # visits a restart took up, for the restored state to count (`reopen`)
        # What a restored state brought, which the run before dated by its own clock (`shift` leaves it): the data time
        # it applied at (entries up to it are that run's) and today's counts it brought (None once that day is over).
        self._restored_at = -math.inf
        self._brought: dict[str, int] | None = None

    def state(self) -> dict[str, Any]:
        """What `restore` needs after a restart (JSON types): the last hour's entries as [minute, count] pairs (at
        most 60, however busy the store), and the occupancy the minute in progress would close with now. A state
        restored and not applied yet is returned as it came."""
        if self._restored is not None:
            return self._restored
        per_minute: dict[float, int] = {}
        for t in self._entries:
            per_minute[t - t % 60] = per_minute.get(t - t % 60, 0) + 1
        return {
            "day": self._day,
            "today": dict(self._today),
            "entries": [[m, n] for m, n in per_minute.items()],
            "minute": None if self._minute is None else asdict(self._minute),
            "occupancy": len(self._open),
            "open": sorted(self._open),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take up a `state` kept before a restart; it applies at the first `update` (whose time says whether it is
        still the same day and minute). A state that is not the shape `state` writes is logged and ignored."""
        number = (int, float)
        try:
            minute = state["minute"]
            ok = (
                isinstance(state["day"], str)
                and _TODAY_BEFORE <= set(state["today"]) <= set(self._today)  # an older version kept fewer
                and all(type(n) is int for n in state["today"].values())
                and all(isinstance(m, number) and type(n) is int for m, n in state["entries"])
                and type(state["occupancy"]) is int
                and (state.get("open") is None or all(isinstance(v, str) for v in state["open"]))
                and (
                    minute is None
                    or (
                        set(minute) == {f.name for f in fields(_Minute)}
                        and all(isinstance(minute[k], number) for k in ("start", "dwell_sum_s"))
                        and all(type(minute[k]) is int for k in ("entries", "exits", "passbys"))
                    )
                )
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            ok, why = False, f"{type(e).__name__} {e}"
        else:
            why = "unexpected values"
        if not ok:
            log.warning("footfall counts kept before the restart are not usable (%s): counting from zero", why)
            return
        self._restored = state

    def reopen(self, visits: Sequence[Visit]) -> None:
        """Visits open before a restart that the visit tracker took up again (including those it ends at once): open,
        as they were, so their end counts as an exit. One whose start the kept counts do not hold (a power loss came
        between its start and the write of the counts) is counted as an entry when the restored state applies."""
        if self._restored is None:
            self._open.update(v.visit_id for v in visits)
        else:
            self._reopened += visits

    def _take_restored(self, now: float) -> list[dict[str, Any]]:
        """Apply a restored state at the first update: today's counts when it is still that day, the minute in
        progress when it is still that minute (or later), else that minute closed now (returned) and counting from
        `now`."""
        state, self._restored = self._restored, None
        assert state is not None
        self._day = self._days.day(now)
        if state["day"] == self._day:
            self._today = {**dict.fromkeys(self._today, 0), **{k: int(v) for k, v in state["today"].items()}}
        # The last hour's entries whatever the day (a restart just after midnight still had them); none dated after
        # `now` (a clock that went back across the restart): the last hour cannot hold them.
        self._entries = deque(m for m, n in sorted(state["entries"]) for _ in range(n) if now - 3600 <= m <= now)
        minute = state["minute"]
        m = None if minute is None else _Minute(**minute)
        here = now - now % 60
        out: list[dict[str, Any]] = []
        if m is not None and here <= m.start <= here + 60:  # the same minute (a clock a little behind): it goes on
            self._minute = m
        else:
            # Another minute: published now, with the occupancy it had; counting goes on from this minute (ends dated
            # before it, as a restart's are, count in it: the minute kept is never opened again). Where the clock
            # went back further (a Pi without a real-time clock), a later minute of the same value may come again.
            if m is not None and (m.entries or m.exits or m.passbys):
                out.append({**self._aggregate(m), "occupancy": int(state["occupancy"])})
            self._minute = _Minute(here)
        counted = None if state.get("open") is None else set(state["open"])
        for v in self._reopened:
            if counted is not None and v.visit_id not in counted:
                self._entries.append(v.started)
                self._today["visitors"] += int(self._days.day(v.started) >= self._day)  # its first day's, as in update
                self._minute.entries += 1
            self._open.add(v.visit_id)
        self._reopened = []
        self._entries = deque(sorted(self._entries))  # in time order, as `update` trims them
        self._restored_at, self._brought = now, dict(self._today)
        return out

    def update(self, changes: Sequence[VisitChange], now: float) -> list[dict[str, Any]]:
        """Fold in changes; returns the aggregates of every minute that closed before `now`."""
        closed: list[dict[str, Any]] = self._take_restored(now) if self._restored is not None else []
        self._now = max(self._now, now)
        for c in sorted(changes, key=lambda c: c.ts):
            # Not past `now`: an end dated ahead of it (a restart on a clock that went back) must not publish the
            # minutes in between.
            closed += self._roll(min(c.ts, now))
            v = c.visit
            m = self._minute
            assert m is not None
            today = int(self._days.day(v.started) >= self._day)  # a visit is its first day's (module docstring)
            if c.kind == "started" and v.classification == "visitor":
                self._open.add(v.visit_id)
                self._entries.append(v.started)
                self._today["visitors"] += today
                m.entries += 1
            elif c.kind == "started" and v.classification == "staff":
                self._today["staff"] += today
            elif c.kind == "ended" and v.classification == "pass-by":
                self._today["passbys"] += 1
                m.passbys += 1
            elif c.kind == "ended" and v.visit_id in self._open:
                self._open.discard(v.visit_id)
                m.exits += 1
                m.dwell_sum_s += v.dwell_s
                self._today["left"] += 1  # on the day it ended: the average visit of the visits that ended today
                self._today["dwell_s"] += round(v.dwell_s)
            if v.classification == "staff" and v.visit_id in self._open:
                self._staff_found(v)
        closed += self._roll(now)
        while self._entries and self._entries[0] < self._now - 3600:
            self._entries.popleft()
        return closed

    def shift(self, by: float) -> None:
        """The clock was stepped forward by `by` seconds (`Gateway.shift`): the minutes of the wrong clock never
        happened. The minute in progress goes on, with its counts, as the minute its start moves into (whole minutes
        stay whole), so the minutes of the jump are neither published nor counted; the last hour's entries and
        today's counts move with it (when the step crosses midnight, today's counts are the new day's: the visits
        they count were, by the corrected clock). Minutes already published stay as they were.

        But what a restart brought (`restore`) was counted by the run before, on its own clock (a Pi that rebooted
        ran on a clock that was right): those entries keep their times, and when the step crosses midnight the counts
        it brought stay with their day rather than open the new one."""
        if self._now:
            self._now += by
        self._entries = deque(t + by if t > self._restored_at else t for t in self._entries)  # still in time order
        if self._minute is not None:
            start = self._minute.start + by
            self._minute.start = start - start % 60
            if self._day:
                day = self._days.day(self._minute.start)
                if day > self._day and self._brought is not None:
                    self._today = {k: n - self._brought.get(k, 0) for k, n in self._today.items()}
                    self._brought = None
                self._day = max(self._day, day)

    def found_staff(self, visits: Sequence[Visit]) -> None:
        """Open visits that changed (VisitTracker.changed_visits): one counted as a visitor's that turns out to be a
        member of staff's (an iPhone's new address is heard without the app's frame for the minimum dwell, then the
        frame links it to the staff member) leaves occupancy, as an exit of this minute: staff are never in it."""
        for v in visits:
            if v.classification == "staff" and v.visit_id in self._open:
                self._staff_found(v)

    def _staff_found(self, v: Visit) -> None:
        # Its entry is in a minute already counted (and published), so it leaves as an exit: occupancy stays the
        # entries minus the exits. Today's visitors keep it, as today's minutes do.
        self._open.discard(v.visit_id)
        if self._minute is not None:
            self._minute.exits += 1
            self._minute.dwell_sum_s += v.dwell_s

    def _roll(self, ts: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        start = ts - ts % 60
        day = self._days.day(ts)
        # Only forward (ISO dates sort as strings): an end reported a timeout after the last sighting
        # can be dated before midnight, and going back to yesterday would wipe today's counts.
        if day > self._day:
            self._day = day
            self._today = dict.fromkeys(self._today, 0)
            self._brought = None
        if self._minute is None:
            self._minute = _Minute(start)
        while self._minute.start < start:
            m = self._minute
            if start - m.start > QUIET_GAP_S and not (m.entries or m.exits or m.passbys):
                self._minute = _Minute(start - QUIET_GAP_S)
                continue
            out.append(self._aggregate(m))
            self._minute = _Minute(m.start + 60)
        return out

    def _aggregate(self, m: _Minute) -> dict[str, Any]:
        """A closed minute, as `footfall.minute` carries it."""
        return {
            "minute": m.start,
            "entries": m.entries,
            "exits": m.exits,
            "passbys": m.passbys,
            "occupancy": len(self._open),
            "mean_dwell_s": round(m.dwell_sum_s / m.exits, 1) if m.exits else None,
        }

    def snapshot(self) -> dict[str, Any]:
        """Occupancy now, entries in the last hour, today's visitors / pass-bys / staff, and the visitors' visits that
        ended today with their mean dwell (None before the first)."""
        return {
            "as_of": self._now,
            "occupancy": len(self._open),
            "entries_last_hour": sum(1 for t in self._entries if t >= self._now - 3600),
            "day": self._day,
            "visitors_today": self._today["visitors"],
            "passbys_today": self._today["passbys"],
            "staff_today": self._today["staff"],
            "left_today": self._today["left"],
            "mean_dwell_today_s": round(self._today["dwell_s"] / self._today["left"]) if self._today["left"] else None,
        }
