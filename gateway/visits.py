"""Visit sessions per subject: start, zone segments, end after absence, classification.

A session opens at a subject's first estimate, inside or out. It becomes a *visit* (and
`started` is reported, dated at the first inside estimate) once the subject has spent
`min_dwell_s` inside in total, `min_sure_s` of it sure (ZoneEstimate.sure: no place outside
explains the signals nearly as well); someone seen only on the sidewalk, stepping into the
entrance for a few seconds, flickering inside now and then from the sidewalk, or standing at the
window where the estimator put them just inside, never does and ends as a pass-by. An outside
estimate closes the current zone segment, so time outside never counts toward a zone's dwell;
the next inside estimate opens a new segment. A session ends when the subject has not been
heard for `absence_timeout_s`. Staff are members on the staff list.

Visits outlive the process (`take_kept`, `restore`): a member's visit open when the gateway stopped or lost power
goes on after a restart within `resume_within_s`, with the same visit id; every other open visit ends at its last
sighting then (an anonymous subject's hash changes with the restart: nothing would ever join it again), unless the
store has a secret (`identity.anon_secret_file`): then an anonymous phone hashes to the same subject after the restart
that day, and its visit goes on as a member's does (`anon_resume`).

Everything follows from the estimates' own times, never from when they were handed over, so the
runtime's tick size does not change a visit.
"""

from __future__ import annotations

import hashlib
import logging
import math
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.config import VisitsConfig
from gateway.model import Classification, SubjectLink, Visit, VisitChange, VisitSource, ZoneEstimate, ZoneSegment

log = logging.getLogger("visita.visits")


@dataclass(slots=True)
class _Seg:
    zone: str
    entered: float
    left: float
    closed: bool = False  # the subject stepped outside after it: the next inside estimate opens a new one


KEEP_REFRESH_S = 60.0
"""An open visit is handed to the store at its start, whenever it enters a zone, and about this often while it is heard
(its dwell so far), so that a power loss costs a visit little more than this of its dwell."""

MOVE_SMOOTHING_S = 30.0
"""Time constant of the smoothed position that `moved_m` is measured on: a phone lying still wanders a few
metres in the estimate from second to second (drifting shadowing), but its 30-s average stays within about 8 m
of where it settled over hours (measured on the demo store, docs/rules.md "Presence")."""


@dataclass(slots=True)
class _Movement:
    """How far a subject moved inside the store: its smoothed position's largest distance from where it settled
    in its first MOVE_SMOOTHING_S inside. Only estimates with a position (the HMM's) count."""

    x: float = 0.0
    y: float = 0.0
    first: float | None = None  # time of the first inside position
    last: float = 0.0
    anchor: tuple[float, float] | None = None
    moved: float = 0.0

    def add(self, ts: float, x: float, y: float) -> None:
        if self.first is None:
            self.first, self.last, self.x, self.y = ts, ts, x, y
            return
        a = 1.0 - math.exp(-max(0.0, ts - self.last) / MOVE_SMOOTHING_S)
        self.last = max(self.last, ts)
        self.x += a * (x - self.x)
        self.y += a * (y - self.y)
        if self.anchor is None:
            if ts - self.first >= MOVE_SMOOTHING_S:
                self.anchor = (self.x, self.y)
            return
        self.moved = max(self.moved, math.hypot(self.x - self.anchor[0], self.y - self.anchor[1]))

    @property
    def moved_m(self) -> float | None:
        return None if self.first is None else round(self.moved, 1)


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
    aliases: list[str] = field(default_factory=list)  # other subjects linked into this session
    movement: _Movement = field(default_factory=_Movement)
    sure_s: float = 0.0  # the part of inside_s() ended by a sure estimate (ZoneEstimate.sure; None counts as sure)
    resumed: float = 0.0  # when a restart took it up: absence counts from then (the gateway heard nothing while down)
    kept_at: float = 0.0  # data time it was last handed to the store (`take_kept`)
    kept_last: float = 0.0  # its last sighting then

    def state(self) -> dict[str, Any]:
        """This session as `_Session.from_state` reads it (JSON types)."""
        return {
            "subject": self.subject,
            "visit_id": self.visit_id,
            "first": self.first,
            "last": self.last,
            "segments": [[g.zone, g.entered, g.left, g.closed] for g in self.segments],
            "qualified": self.qualified,
            "ble": self.ble,
            "checked_in": self.checked_in,
            "sure_s": self.sure_s,
            "moved_m": self.movement.moved,
            "aliases": list(self.aliases),
        }

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> _Session:
        """A session kept by `state`; KeyError, TypeError or ValueError when `d` is not what `state` writes."""
        number = (int, float)
        ok = (
            isinstance(d["subject"], str)
            and isinstance(d["visit_id"], str)
            and all(isinstance(d[k], number) and math.isfinite(d[k]) for k in ("first", "last", "sure_s", "moved_m"))
            and all(type(d[k]) is bool for k in ("qualified", "ble", "checked_in"))
            and all(
                isinstance(z, str) and isinstance(a, number) and isinstance(b, number) and type(c) is bool
                for z, a, b, c in d["segments"]
            )
        )
        if not ok:
            raise ValueError(f"session {str(d.get('visit_id'))[:24]!r} has values of the wrong type")
        s = cls(d["subject"], float(d["first"]), float(d["last"]), d["visit_id"])
        s.segments = [_Seg(z, float(a), float(b), c) for z, a, b, c in d["segments"]]
        s.qualified, s.ble, s.checked_in = d["qualified"], d["ble"], d["checked_in"]
        s.sure_s, s.movement.moved = float(d["sure_s"]), float(d["moved_m"])
        aliases = d.get("aliases", [])  # kept since the store secret; older kept visits have none
        if not (isinstance(aliases, list) and all(isinstance(a, str) for a in aliases)):
            raise ValueError(f"session {str(d.get('visit_id'))[:24]!r} has aliases of the wrong type")
        s.aliases = list(aliases)
        return s

    def resumable(self, anon: bool = False) -> bool:
        """Whether a restart can go on with it: a member's visit (the same subject after the restart); an anonymous
        one's too with `anon` (a store secret: the same hash after the restart that day; else it changes)."""
        return self.qualified and (self.subject.startswith("member:") or (anon and self.subject.startswith("anon:")))

    def inside_s(self) -> float:
        return sum(g.left - g.entered for g in self.segments)

    def qualifies(self, cfg: VisitsConfig) -> bool:
        """Inside long enough, and long enough where no place outside explains the signals (the window)."""
        return self.inside_s() >= cfg.min_dwell_s and self.sure_s >= min(cfg.min_sure_s, cfg.min_dwell_s)


class VisitTracker:
    """Sessions for every subject; no I/O, time comes with the estimates and `now`."""

    def __init__(self, gateway_id: str, cfg: VisitsConfig, *, anon_resume: bool = False) -> None:
        """`anon_resume`: anonymous subjects hash the same after a restart (a store secret), so their visits go on
        after one as members' do."""
        self._gateway = gateway_id
        self._cfg = cfg
        self._anon_resume = anon_resume
        self._staff = {"member:" + ref for ref in cfg.staff}
        self._sessions: dict[str, _Session] = {}
        self._changed: set[str] = set()  # session keys whose session changed since `changed_visits`
        self._alias: dict[str, str] = {}  # a subject linked into another's session -> that session's key
        self._staff_not_visits = 0
        self._links = {"merged": 0, "joined": 0, "unmerged": 0, "ignored": 0, "ended_stale": 0}
        self._now = 0.0  # the newest time an update, check-in or link brought
        self._resumed = 0  # sessions a restart went on with
        self._keep: set[str] = set()  # session keys of visits the store should have anew (`take_kept`)
        self._gone: list[str] = []  # visit ids of visits ended since `take_kept`
        self._refresh_next = 0.0
        self._restored_as_of: float | None = None  # what the visits `restore` took up were as of (`shift`)
        self._expired: dict[str, None] = {}  # keys of sessions `shift` found a restart should have ended (`update`)

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
        return Visit(s.visit_id, s.subject, started, ended, segments, cls, source, s.movement.moved_m)

    def update(self, estimates: Sequence[ZoneEstimate], now: float) -> list[VisitChange]:
        """Fold in estimates, then end sessions silent for the absence timeout as of `now`."""
        # First the visits a restart took up that a clock step showed were not to go on (`shift`): no estimate of
        # this tick joins them.
        changes = self._end([k for k in self._expired if k in self._sessions])
        self._expired = {}
        for e in sorted(estimates, key=lambda e: e.ts):
            key = self._alias.get(e.subject, e.subject)
            s = self._sessions.get(key)
            if s is None:
                s = _Session(e.subject, e.ts, e.ts, self._visit_id(e.subject, e.ts))
                self._sessions[key] = s
            s.last = max(s.last, e.ts)
            s.ble = True
            self._changed.add(key)
            if s.segments and e.ts < s.segments[-1].left:
                # Older than the newest inside estimate (a late remote sighting): that time is already
                # accounted for, and placing it would invent moves (entrance → produce → entrance).
                continue
            if not e.inside:
                if s.segments:
                    s.segments[-1].closed = True  # stepped out: time outside is no zone's dwell
                continue
            if e.x is not None and e.y is not None:
                s.movement.add(e.ts, e.x, e.y)
            last = s.segments[-1] if s.segments else None
            if last is not None and not last.closed and e.sure is not False:
                s.sure_s += max(0.0, e.ts - last.left)  # the inside time this estimate adds, when it is sure
            if last is None or last.closed:
                s.segments.append(_Seg(e.zone, e.ts, e.ts))
                if last is not None and s.qualified and last.zone != e.zone:  # back in the zone it left: no move
                    changes.append(VisitChange("zone", e.ts, self._snapshot(s, None), last.zone))
                    self._keep.add(key)
            elif last.zone != e.zone:
                last.left = max(last.left, e.ts)
                s.segments.append(_Seg(e.zone, e.ts, e.ts))
                if s.qualified:
                    changes.append(VisitChange("zone", e.ts, self._snapshot(s, None), last.zone))
                    self._keep.add(key)
            else:
                last.left = max(last.left, e.ts)
            if not s.qualified and s.qualifies(self._cfg):
                s.qualified = True
                changes.append(VisitChange("started", e.ts, self._snapshot(s, None)))
                self._keep.add(key)
        self._now = max(self._now, now)
        deadline = now - self._cfg.absence_timeout_s
        changes += self._end([k for k, s in self._sessions.items() if max(s.last, s.resumed) < deadline])
        return changes

    def _end(self, keys: Sequence[str]) -> list[VisitChange]:
        """End these sessions at their last sighting."""
        changes: list[VisitChange] = []
        for key in keys:
            s = self._sessions.pop(key)
            self._changed.discard(key)
            self._keep.discard(key)
            if s.qualified:
                self._gone.append(s.visit_id)
            for alias in s.aliases:
                self._alias.pop(alias, None)
            if not s.qualified and s.subject in self._staff:
                # Staff are not footfall, and a staff session that never qualified had no visit.started:
                # reporting it would publish a visit.ended for a visit that never began. Counted instead.
                self._staff_not_visits += 1
                continue
            # Sessions that never qualified end too (as pass-by), so footfall can count them.
            changes.append(VisitChange("ended", s.last, self._snapshot(s, s.last)))
        return changes

    def end_all(self, now: float) -> list[VisitChange]:
        """End every session at its last sighting, as the absence timeout would have (the data is over)."""
        self._now = max(self._now, now)
        return self._end(list(self._sessions))

    def end_for_restart(self, now: float) -> list[VisitChange]:
        """A stop that a restart will follow: end the sessions a restart could not go on with (all but members'
        visits, `_Session.resumable`); the others are kept (`take_kept`)."""
        self._now = max(self._now, now)
        return self._end(
            [k for k, s in self._sessions.items() if not s.resumable(self._anon_resume) or k in self._expired]
        )

    def shift(self, by: float) -> None:
        """Move every time held forward by `by` seconds (the clock was stepped forward: `Gateway.shift`). The open
        sessions go on as if the times before the step had been that much later: their start, zone segments and last
        sighting move, so the step is neither absence (they do not end) nor dwell (their segments do not reach over
        it). Visit ids stay (made at the start, and published). Every open visit is handed to the store again
        (`take_kept`), with its new times, so a restart resumes it as it is now.

        But a visit a restart took up (`restore`) and not heard since holds the times of the run before, dated by the
        clock then (a Pi that rebooted ran on a clock that was right, and came back on the time it saved at
        shutdown): those stay, and only the restart's time, of the clock stepped now, moves. The restart is then
        judged again as `restore` would have on the right clock: after more than `resume_within_s` the visit ends at
        its last sighting (at the next `update`, before anything joins it), else it goes on."""
        for key, s in list(self._sessions.items()):
            if s.resumed and s.last < s.resumed:
                s.resumed += by
                s.kept_at += by
                as_of = self._restored_as_of
                if as_of is None or s.resumed - as_of > self._cfg.resume_within_s:
                    del self._sessions[key]  # under its visit id, as `restore` keeps an ending one: nobody joins it
                    self._sessions[s.visit_id] = s
                    self._expired[s.visit_id] = None  # once, however many steps come before the next update
                continue
            s.first += by
            s.last += by
            for g in s.segments:
                g.entered += by
                g.left += by
            m = s.movement
            if m.first is not None:
                m.first += by
                m.last += by
            if s.resumed:
                s.resumed += by
            s.kept_at += by
            s.kept_last += by
            self._keep.add(key)
        if self._now:
            self._now += by
        self._refresh_next += by

    @property
    def now(self) -> float:
        """The newest data time an update, check-in or link brought: what the kept visits are as of."""
        return self._now

    def keep(self, visit_ids: Collection[str]) -> None:
        """Have `take_kept` give these open visits as they are now: an award for one is stored in the same write as
        the visit with the dwell that earned it (a power loss must not leave an award its visit contradicts)."""
        if visit_ids:
            self._keep.update(k for k, s in self._sessions.items() if s.visit_id in visit_ids)

    def take_kept(self, now: float, everything: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
        """What the store should keep of the open visits since the last call (`restore` reads it after a restart or
        a power loss): each visit at its start, when it enters a zone or a link or check-in changes it, and at least
        every KEEP_REFRESH_S (`everything`: each one now); and the ids of the visits that ended. Stored in the same
        write as the events of those starts and ends, so a restart neither repeats a `started` nor loses an
        `ended`."""
        if everything or now >= self._refresh_next:
            self._refresh_next = now + KEEP_REFRESH_S / 6
            self._keep.update(
                k
                for k, s in self._sessions.items()
                if everything or (now - s.kept_at >= KEEP_REFRESH_S and s.last > s.kept_last)  # heard since
            )
        kept: list[dict[str, Any]] = []
        for key in self._keep:
            s = self._sessions.get(key)
            if s is not None and s.qualified:
                s.kept_at, s.kept_last = now, s.last
                kept.append(s.state())
        gone, self._gone, self._keep = self._gone, [], set()
        return kept, gone

    def restore(self, kept: Sequence[dict[str, Any]], as_of: float | None, now: float) -> list[VisitChange]:
        """Take up the visits `take_kept` gave before a restart (as of data time `as_of`; None: unknown), at `now`,
        before any estimate after the restart.

        A member's visit goes on when `as_of` is at most `resume_within_s` before `now`: its visit id stays,
        absence is counted from `now` (the gateway heard nothing while it was down) and, heard again, the time in
        between is the dwell of the zone it was in; so does an anonymous one with `anon_resume` (a store secret), on its
        subject or on any address it was linked to (its aliases). Every other ends at its last sighting (returned):
        anonymous subjects get new hashes after a restart without a store secret, and after a longer outage nobody
        can tell whether the shopper stayed. A kept visit that is not what `take_kept` writes is logged, left out and
        forgotten.
        """
        sessions: list[_Session] = []
        unusable: list[str] = []
        for d in kept:
            try:
                sessions.append(_Session.from_state(d))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                log.warning("an open visit kept before the restart is not usable (%s: %s)", type(e).__name__, e)
                if isinstance(d, dict) and isinstance(d.get("visit_id"), str):
                    unusable.append(d["visit_id"])
        usable = {s.visit_id for s in sessions}
        self._gone += [v for v in unusable if v not in usable]  # the store forgets them: not warned about every start
        fresh = as_of is not None and 0 <= now - as_of <= self._cfg.resume_within_s
        self._restored_as_of = as_of
        ending: list[str] = []
        for s in sessions:
            go_on = fresh and s.resumable(self._anon_resume) and s.subject not in self._sessions  # one session each
            key = s.subject if go_on else s.visit_id  # an ending one's key only has to be unique
            if key in self._sessions:
                continue  # the same visit is open already (restored twice)
            self._sessions[key] = s
            if go_on:
                for alias in s.aliases:  # the addresses it was heard on since (the handover): heard on them again
                    self._alias.setdefault(alias, key)
                s.resumed, s.kept_last = now, s.last
                s.kept_at = now - KEEP_REFRESH_S * (zlib.crc32(s.visit_id.encode()) % 64) / 64  # staggered refreshes
                self._resumed += 1
                self._changed.add(key)
            else:
                ending.append(key)
        self._now = max(self._now, now)
        return self._end(ending)

    def checkin(self, subject: str, ts: float, zone: str | None = None) -> list[VisitChange]:
        """A verified app check-in of `subject` at `ts`: proof of presence, so the session is a visit at once.

        Joins the subject's open session (its source becomes `both` with BLE sightings) or opens one
        (source `checkin`) that ends after the absence timeout like any other. `zone`, when the phone
        heard a store beacon, starts the segments of a session that has none.
        """
        key = self._alias.get(subject, subject)
        s = self._sessions.get(key)
        if s is None:
            s = _Session(subject, ts, ts, self._visit_id(subject, ts), ble=False)
            self._sessions[key] = s
        s.last = max(s.last, ts)
        s.checked_in = True
        self._now = max(self._now, ts)
        self._changed.add(key)
        if zone is not None and not s.segments:
            s.segments.append(_Seg(zone, ts, ts))
        self._keep.add(key)
        if s.qualified:
            return []
        s.qualified = True
        return [VisitChange("started", ts, self._snapshot(s, None))]

    def link(self, link: SubjectLink) -> list[VisitChange]:
        """`link.new` is the same phone as `link.old`: from now on their estimates make one session.

        When both have a session, the two become one: the one that is already a visit (or else the older
        one) keeps its visit id, takes the other's zone segments, and reports what that changes (a zone
        change, or `started` when together they reach the minimum dwell); the other ends without a trace,
        as it never was a visit. Two sessions that are both visits already are left apart (counted as
        `unmerged`): their starts have been reported. The session's subject becomes the member when
        either side is one, else stays the old subject.
        """
        ko = self._alias.get(link.old, link.old)
        kn = self._alias.get(link.new, link.new)
        so, sn = self._sessions.get(ko), self._sessions.get(kn)
        if ko == kn or (so is None and sn is None):
            self._links["ignored"] += 1
            return []
        if so is None or sn is None:  # one side has a session: the other's estimates join it from now on
            key, s = (ko, so) if so is not None else (kn, sn)
            assert s is not None
            other = link.new if so is not None else link.old
            self._alias_into(other, key, s)
            if other.startswith("member:"):
                s.subject = other
                self._changed.add(key)  # now a member's visit: the rules look at it again
                self._keep.add(key)
            self._links["joined"] += 1
            return []
        if so.qualified and sn.qualified:
            stale = next((k for k, x in ((ko, so), (kn, sn)) if x.resumed and x.last < x.resumed), None)
            if stale is None:
                self._links["unmerged"] += 1
                return []
            # A visit a restart took up, not heard since, while the phone's new address made a visit of its own
            # before its member frame came (the address-to-member map does not outlive the process): the old one
            # ends where it was last heard, the new one goes on as the member's.
            live_key, live = (kn, sn) if stale == ko else (ko, so)
            gone = self._sessions[stale]
            ended = self._end([stale])
            if gone.subject.startswith("member:"):
                live.subject = gone.subject
            self._alias_into(stale, live_key, live)
            self._changed.add(live_key)
            self._keep.add(live_key)
            self._links["ended_stale"] += 1
            return ended
        keep_key, keep, gone_key, gone = (kn, sn, ko, so) if sn.qualified else (ko, so, kn, sn)
        was_zone = keep.segments[-1].zone if keep.segments else None
        del self._sessions[gone_key]
        for alias in gone.aliases:
            self._alias_into(alias, keep_key, keep)
        self._alias_into(gone_key, keep_key, keep)
        if gone.subject.startswith("member:") and not keep.subject.startswith("member:"):
            keep.subject = gone.subject
        keep.segments = _merge_segments(keep.segments, gone.segments)
        keep.first, keep.last = min(keep.first, gone.first), max(keep.last, gone.last)
        keep.sure_s += gone.sure_s
        keep.ble |= gone.ble
        keep.checked_in |= gone.checked_in
        if gone.movement.moved > keep.movement.moved:  # each address's own track; the larger says the phone moved
            keep.movement.moved = gone.movement.moved
        self._changed.add(keep_key)
        self._keep.add(keep_key)
        self._links["merged"] += 1
        ts = max(link.ts, keep.last)
        if keep.qualified:
            now_zone = keep.segments[-1].zone if keep.segments else None
            if now_zone is not None and was_zone is not None and now_zone != was_zone:
                return [VisitChange("zone", ts, self._snapshot(keep, None), was_zone)]
            return []
        if keep.qualifies(self._cfg) or keep.checked_in:
            keep.qualified = True
            return [VisitChange("started", ts, self._snapshot(keep, None))]
        return []

    def _alias_into(self, subject: str, key: str, s: _Session) -> None:
        if subject != key:
            self._alias[subject] = key
            s.aliases.append(subject)

    def open_visits(self) -> list[Visit]:
        """Qualified visits still open (for occupancy and the dashboard)."""
        return [self._snapshot(s, None) for s in self._sessions.values() if s.qualified]

    def open_visit(self, subject: str) -> Visit | None:
        """The subject's visit if one is open (a subject linked into another's session: that one)."""
        s = self._sessions.get(self._alias.get(subject, subject))
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
        """Open sessions, how many are visits, staff sessions that ended without being one, links applied."""
        return {
            "sessions": len(self._sessions),
            "open_visits": sum(1 for s in self._sessions.values() if s.qualified),
            "staff_not_visits": self._staff_not_visits,
            "resumed": self._resumed,
            **{f"links_{k}": v for k, v in self._links.items()},
        }


class Relabels(Protocol):
    """An estimator that can carry one subject's state on under another name."""

    def relabel(self, old: str, new: str) -> bool: ...


class Notes(Protocol):
    """A handover linker, told which anonymous subjects turned out to be members."""

    def note(self, links: Sequence[SubjectLink]) -> None: ...


def link_subjects(
    estimator: Relabels, tracker: VisitTracker, linker: Notes | None, links: Sequence[SubjectLink]
) -> list[VisitChange]:
    """Apply the identifier's links before the tick's sightings are estimated: the estimator carries the old
    subject's state on under the new name, the tracker makes the old subject's session the new one's too, and the
    handover linker knows the old subject fell silent because it became a member (a member link) or goes on
    under today's name (a midnight link), not because its address changed."""
    changes: list[VisitChange] = []
    for link in links:
        estimator.relabel(link.old, link.new)
        changes += tracker.link(link)
    if linker is not None:
        linker.note(links)
    return changes


def _merge_segments(a: list[_Seg], b: list[_Seg]) -> list[_Seg]:
    """Two sessions' zone segments as one, in time order, as if one subject had been heard throughout.

    Time covered by an earlier segment is not counted twice; a segment that was still open runs on to
    where the next one starts (the few seconds between an address's last sighting and the next one's
    first), and joins it when it is in the same zone.
    """
    out: list[_Seg] = []
    for g in sorted((_Seg(g.zone, g.entered, g.left, g.closed) for g in (*a, *b)), key=lambda g: g.entered):
        prev = out[-1] if out else None
        if prev is None:
            out.append(g)
            continue
        if g.left <= prev.left:
            continue  # within time already accounted for
        g.entered = max(g.entered, prev.left)
        if not prev.closed and prev.zone == g.zone:
            prev.left, prev.closed = max(prev.left, g.left), g.closed
            continue
        if not prev.closed:
            prev.left = max(prev.left, g.entered)
        out.append(g)
    return out
