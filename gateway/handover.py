"""One phone across its own address change: the handover link (docs/estimation.md, "Visits").

A phone without the app takes a new random address every ~15 minutes, and each address is a new
anonymous subject, so a shopper in the middle of the store would become two visits. Nothing in the
frames says the two addresses are one phone (that is the point of random addresses), but the place
and the time do: the old address falls silent somewhere inside the store, away from the doors, and
within a few seconds a new one starts there, without having been heard coming in. People who really
arrive are heard on the sidewalk and at a door first; people who really leave are last heard there.

`HandoverLinker` watches the estimates and links a new anonymous subject to the subject it continues
only when all of these hold:

- the old subject's last estimate is inside, at least `DOOR_M` from every door, and it has stayed
  silent for `SILENCE_S` since (estimate time);
- the new subject's first estimate is at most `GAP_S` after the old one's last (or `OVERLAP_S`
  before: estimates are whole seconds), and it has not been heard before;
- where the new subject is `SETTLE_S` after its first estimate (the estimator starts a subject from no
  knowledge, so its very first seconds say little) is inside, at least `DOOR_M` from every door, and
  within `PLACE_M` plus `SPREAD_K` times the two positions' spreads (at most `PLACE_MAX_M`) of where
  the old one was last;
- the match is unique both ways: no other subject that could be an end (inside, away from the doors)
  fell silent within `RIVAL_K` times that radius of the new one in that window, and no other subject
  that could be a start began that close to the old one. Ambiguous means no link: a visit counted
  twice is a smaller error than two people's visits chained into one.

Decisions are taken `GAP_S + SILENCE_S` after the new subject's first estimate, long before its own
session could become a visit (`visits.min_dwell_s`). Only the estimates' own times are used. No raw
address ever reaches this stage; what it keeps is pseudonymous, in memory only, bounded and forgotten
after `FORGET_S`. It needs positions (the HMM estimator's); with the baseline it links nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from gateway.model import SubjectLink, ZoneEstimate

GAP_S = 5.0
"""The new subject's first estimate comes at most this long after the old one's last (advertising intervals
are 0.1-1 s, so a rotated phone is normally heard again within a second or two; packet loss adds a little)."""
OVERLAP_S = 1.0
"""... or at most this long before it (both are dated in the middle of whole seconds)."""
SILENCE_S = 8.0
"""The old subject must stay unheard this long after its last estimate: a pause is not a new address."""
SETTLE_S = 3.0
"""The new subject's place is read this long after its first estimate."""
DOOR_M = 4.0
"""Neither end of a handover may be this close to a door: people come and go there."""
PLACE_M = 6.0
"""The old subject's last position and the new one's settled position are at most this far apart, plus
`SPREAD_K` times the two positions' spreads (the estimator says how sure it is)."""
SPREAD_K = 1.5
PLACE_MAX_M = 20.0
"""... but never more than this."""
RIVAL_K = 1.5
"""Another subject starting or falling silent within this many times the place radius in the same window
makes a handover ambiguous."""
FORGET_S = 120.0
"""Subjects unheard this long are forgotten."""
MAX_SUBJECTS = 20_000
"""Memory bound: the oldest subjects are dropped first beyond this."""


@dataclass(slots=True)
class _Subject:
    first: float
    last: float
    last_inside: bool
    last_xy: tuple[float, float]
    last_sd: float
    anonymous: bool
    settled_xy: tuple[float, float] | None = None
    settled_sd: float = 0.0
    settled_inside: bool = False
    decided: bool = False  # as a new subject: linked or not, never looked at again
    continued: bool = False  # as an old subject: a new one took over
    member: bool = False  # an anonymous subject that turned out to be a member's phone: it did not rotate


class HandoverLinker:
    """Links a new anonymous subject to the one whose address it replaced; no I/O, time from the estimates."""

    def __init__(self, doors: Sequence[tuple[float, float]]) -> None:
        self._doors = list(doors)
        self._subjects: dict[str, _Subject] = {}
        self._watermark = -math.inf
        self._last_prune = -math.inf
        self._counts = {"linked": 0, "no_candidate": 0, "ambiguous": 0, "not_eligible": 0}

    def _door_m(self, xy: tuple[float, float]) -> float:
        return min((math.hypot(xy[0] - dx, xy[1] - dy) for dx, dy in self._doors), default=math.inf)

    def note(self, links: Sequence[SubjectLink]) -> None:
        """Member links from the identifier: that anonymous subject went quiet because it became a member."""
        for link in links:
            s = self._subjects.get(link.old)
            if s is not None:
                s.member = True

    def update(self, estimates: Sequence[ZoneEstimate], now: float | None = None) -> list[SubjectLink]:
        """Fold in estimates; return the handovers decided by the newest estimate time (`now` unused).

        Estimates are taken in time order and decisions made as each second passes, so how the runtime
        batches them does not change a link.
        """
        out: list[SubjectLink] = []
        for ts, group in groupby(sorted(estimates, key=lambda e: e.ts), key=lambda e: e.ts):
            for e in group:
                self._fold(e)
            if ts > self._watermark:
                self._watermark = ts
                out += self._decide_due(ts)
        self._prune(self._watermark)
        return out

    def _fold(self, e: ZoneEstimate) -> None:
        if e.x is None or e.y is None:
            return
        subjects = self._subjects
        xy, sd = (e.x, e.y), e.spread_m or 0.0
        s = subjects.get(e.subject)
        if s is None:
            if len(subjects) >= MAX_SUBJECTS:
                subjects.pop(next(iter(subjects)))
            s = subjects[e.subject] = _Subject(e.ts, e.ts, e.inside, xy, sd, e.subject.startswith("anon:"))
        elif e.ts > s.last:
            s.last, s.last_inside, s.last_xy, s.last_sd = e.ts, e.inside, xy, sd
        if s.settled_xy is None and e.ts >= s.first + SETTLE_S:
            s.settled_xy, s.settled_inside, s.settled_sd = xy, e.inside, sd

    def _decide_due(self, w: float) -> list[SubjectLink]:
        out: list[SubjectLink] = []
        for name, s in self._subjects.items():
            if s.anonymous and not s.decided and w >= s.first + GAP_S + SILENCE_S:
                s.decided = True
                link = self._decide(name, s)
                if link is not None:
                    out.append(link)
        return out

    def _decide(self, name: str, new: _Subject) -> SubjectLink | None:
        if not self._starts_inside(new):
            self._counts["not_eligible"] += 1
            return None
        at = new.settled_xy
        assert at is not None
        # Subjects that fell silent inside, away from the doors, in the window: the new one's possible pasts.
        ended = [
            (k, s)
            for k, s in self._subjects.items()
            if s is not new
            and not s.member
            and not s.continued
            and s.first < new.first
            and new.first - GAP_S <= s.last <= new.first + OVERLAP_S
            and s.last_inside
            and self._door_m(s.last_xy) >= DOOR_M
            and math.dist(s.last_xy, at) <= RIVAL_K * _radius(s.last_sd, new.settled_sd)
        ]
        match = [(k, s) for k, s in ended if math.dist(s.last_xy, at) <= _radius(s.last_sd, new.settled_sd)]
        if not match:
            self._counts["no_candidate"] += 1
            return None
        if len(ended) > 1:
            self._counts["ambiguous"] += 1
            return None
        old_name, old = match[0]
        # ... and the old one's possible futures: other new subjects that started inside, away from the doors.
        rivals = [
            s
            for s in self._subjects.values()
            if s is not new
            and s is not old
            and s.anonymous
            and old.last - OVERLAP_S <= s.first <= old.last + GAP_S
            and self._starts_inside(s)
            and s.settled_xy is not None
            and math.dist(s.settled_xy, old.last_xy) <= RIVAL_K * _radius(old.last_sd, s.settled_sd)
        ]
        if rivals:
            self._counts["ambiguous"] += 1
            return None
        old.continued = True
        self._counts["linked"] += 1
        return SubjectLink(new.first, old_name, name, "handover")

    def _starts_inside(self, s: _Subject) -> bool:
        """Where the subject settled `SETTLE_S` after it was first heard is inside, away from every door."""
        return s.settled_xy is not None and s.settled_inside and self._door_m(s.settled_xy) >= DOOR_M

    def _prune(self, now: float) -> None:
        if now - self._last_prune < 30.0:
            return
        self._last_prune = now
        for k in [k for k, s in self._subjects.items() if s.last < now - FORGET_S]:
            del self._subjects[k]

    def diagnostics(self) -> dict[str, Any]:
        """Subjects remembered and how the handover decisions went."""
        return {"subjects": len(self._subjects), **self._counts}


def _radius(sd_a: float, sd_b: float) -> float:
    """How far apart two estimates of one place may be, given their spreads."""
    return min(PLACE_M + SPREAD_K * (sd_a + sd_b), PLACE_MAX_M)
