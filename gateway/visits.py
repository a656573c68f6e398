"""Visit sessions per subject: start, zone segments, end after absence, classification.

A session opens at a subject's first estimate, inside or out. It becomes a *visit* (and
`started` is reported, dated at the first inside estimate) once the subject has spent
`min_dwell_s` inside in total; someone seen only on the sidewalk, or stepping into the entrance
for a few seconds (or flickering inside now and then from the sidewalk), never does and ends as
a pass-by. An outside estimate closes the current zone segment, so time outside never counts
toward a zone's dwell; the next inside estimate opens a new segment. A session ends when the
subject has not been heard for `absence_timeout_s`. Staff are members on the staff list.

Everything follows from the estimates' own times, never from when they were handed over, so the
runtime's tick size does not change a visit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.config import VisitsConfig
from gateway.model import Classification, Visit, VisitChange, VisitSource, ZoneEstimate, ZoneSegment


@dataclass(slots=True)
class _Seg:
    zone: str
    entered: float
    left: float
    closed: bool = False  # the subject stepped outside after it: the next inside estimate opens a new one


@dataclass(slots=True)
class _Session:
    subject: str
    first: float
    last: float
    visit_id: str
    segments: list[_Seg] = field(default_factory=list)
    qualified: bool = False
    ble: bool = True  # heard over BLE (False for a session a check-in opened, until a sighting joins it)
    checked_in: bool = False  # a verified app check-in proved presence

    def inside_s(self) -> float:
        return sum(g.left - g.entered for g in self.segments)


class VisitTracker:
    """Sessions for every subject; no I/O, time comes with the estimates and `now`."""

    def __init__(self, gateway_id: str, cfg: VisitsConfig) -> None:
        self._gateway = gateway_id
        self._cfg = cfg
        self._staff = {"member:" + ref for ref in cfg.staff}
        self._sessions: dict[str, _Session] = {}
        self._changed: set[str] = set()  # subjects whose session changed since `changed_visits`
        self._staff_not_visits = 0

    def _visit_id(self, subject: str, started: float) -> str:
        # Derived, not random: a replay of the same data yields the same ids.
        return hashlib.sha256(f"{self._gateway}|{subject}|{started:.3f}".encode()).hexdigest()[:24]

    def _snapshot(self, s: _Session, ended: float | None) -> Visit:
        segments = tuple(ZoneSegment(g.zone, g.entered, g.left) for g in s.segments)
        cls: Classification
        if s.subject in self._staff:
            cls = "staff"
        elif s.qualified:
            cls = "visitor"
        else:
            cls = "pass-by"
        started = segments[0].entered if segments else s.first
        source: VisitSource = ("both" if s.ble else "checkin") if s.checked_in else "ble"
        return Visit(s.visit_id, s.subject, started, ended, segments, cls, source)

    def update(self, estimates: Sequence[ZoneEstimate], now: float) -> list[VisitChange]:
        """Fold in estimates, then end sessions silent for the absence timeout as of `now`."""
        changes: list[VisitChange] = []
        for e in sorted(estimates, key=lambda e: e.ts):
            s = self._sessions.get(e.subject)
            if s is None:
                s = _Session(e.subject, e.ts, e.ts, self._visit_id(e.subject, e.ts))
                self._sessions[e.subject] = s
            s.last = max(s.last, e.ts)
            s.ble = True
            self._changed.add(e.subject)
            if s.segments and e.ts < s.segments[-1].left:
                # Older than the newest inside estimate (a late remote sighting): that time is already
                # accounted for, and placing it would invent moves (entrance → produce → entrance).
                continue
            if not e.inside:
                if s.segments:
                    s.segments[-1].closed = True  # stepped out: time outside is no zone's dwell
                continue
            last = s.segments[-1] if s.segments else None
            if last is None or last.closed:
                s.segments.append(_Seg(e.zone, e.ts, e.ts))
                if last is not None and s.qualified:
                    changes.append(VisitChange("zone", e.ts, self._snapshot(s, None), last.zone))
            elif last.zone != e.zone:
                last.left = max(last.left, e.ts)
                s.segments.append(_Seg(e.zone, e.ts, e.ts))
                if s.qualified:
                    changes.append(VisitChange("zone", e.ts, self._snapshot(s, None), last.zone))
            else:
                last.left = max(last.left, e.ts)
            if not s.qualified and s.inside_s() >= self._cfg.min_dwell_s:
                s.qualified = True
                changes.append(VisitChange("started", e.ts, self._snapshot(s, None)))
        deadline = now - self._cfg.absence_timeout_s
        for subject in [k for k, s in self._sessions.items() if s.last < deadline]:
            s = self._sessions.pop(subject)
            if not s.qualified and s.subject in self._staff:
                # Staff are not footfall, and a staff session that never qualified had no visit.started:
                # reporting it would publish a visit.ended for a visit that never began. Counted instead.
                self._staff_not_visits += 1
                continue
            # Sessions that never qualified end too (as pass-by), so footfall can count them.
            changes.append(VisitChange("ended", s.last, self._snapshot(s, s.last)))
        return changes

    def checkin(self, subject: str, ts: float, zone: str | None = None) -> list[VisitChange]:
        """A verified app check-in of `subject` at `ts`: proof of presence, so the session is a visit at once.

        Joins the subject's open session (its source becomes `both` with BLE sightings) or opens one
        (source `checkin`) that ends after the absence timeout like any other. `zone`, when the phone
        heard a store beacon, starts the segments of a session that has none.
        """
        s = self._sessions.get(subject)
        if s is None:
            s = _Session(subject, ts, ts, self._visit_id(subject, ts), ble=False)
            self._sessions[subject] = s
        s.last = max(s.last, ts)
        s.checked_in = True
        self._changed.add(subject)
        if zone is not None and not s.segments:
            s.segments.append(_Seg(zone, ts, ts))
        if s.qualified:
            return []
        s.qualified = True
        return [VisitChange("started", ts, self._snapshot(s, None))]

    def open_visits(self) -> list[Visit]:
        """Qualified visits still open (for occupancy and the dashboard)."""
        return [self._snapshot(s, None) for s in self._sessions.values() if s.qualified]

    def open_visit(self, subject: str) -> Visit | None:
        """The subject's visit if one is open."""
        s = self._sessions.get(subject)
        return self._snapshot(s, None) if s is not None and s.qualified else None

    def changed_visits(self) -> list[Visit]:
        """Open visits that were heard, moved or checked in since the last call (each once).

        What the rules that fire while a visit is open look at (its dwell, zones, source) changes only
        then, so a tick evaluates these and not every open visit: with thousands of check-in visits open,
        a snapshot of each at every tick is what the event loop would wait behind.
        """
        changed, self._changed = self._changed, set()
        return [self._snapshot(s, None) for k in changed if (s := self._sessions.get(k)) is not None and s.qualified]

    def mark_all_changed(self) -> None:
        """Make every open visit part of the next `changed_visits` (new rules: each is looked at again)."""
        self._changed.update(self._sessions)

    def diagnostics(self) -> dict[str, int]:
        """Open sessions, how many of them are visits, and staff sessions that ended without being one."""
        return {
            "sessions": len(self._sessions),
            "open_visits": sum(1 for s in self._sessions.values() if s.qualified),
            "staff_not_visits": self._staff_not_visits,
        }
