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

Where that place test says no, a **pattern test** (`observe` gives the linker the tick's sightings) may
still link: the estimator starts a new subject from no knowledge and often places its first seconds on
the sidewalk or across the store, and sometimes places an old one's last second there, but the phone's
signal does not move. A phone changes address between two advertising events, so the new address's first
packet comes within `PATTERN_GAP_S` of the old one's last; at the same spot a second later it has nearly
the same RSSI on every receiver (same shadowing, phone offset, body); and it keeps its advertising interval,
often its very schedule. The new subject continues an old one when:

- the old one (anonymous, estimated inside for at least `PATTERN_INSIDE_S` in total) was last heard at
  most `PATTERN_GAP_S` before the new one's first sighting (and not after it);
- the log likelihood ratio, one phone against two, of the old one's last `PATTERN_S` seconds against the
  new one's first is at least `PATTERN_LLR`: that of the RSSI per receiver (`_pattern_llr`) plus that of
  the advertising events' timing (`_timing_llr`: the old address's interval, fitted per receiver, and its
  schedule, against another phone's);
- at least one end is inside: the new one's settled place inside, away from the doors, or the old one
  estimated inside for all of its last `STAYED_S` (or last estimated inside, away from the doors): a
  shopper leaving as a pedestrian appears at the door is not a handover;
- no rival comes within `PATTERN_MARGIN` of it: no other such old subject against the new one's pattern,
  no other new anonymous subject that started in that window against the old one's.

Measured against the simulator's truth (supermarket at 09:00 seeds 1-3, at 17:00 seeds 1-2, mall unit
seeds 1-3): it adds 1-16 links a run, none wrong, and takes the supermarket's split visits from 5/7/6 to
0/1/1 (17:00: 15 -> 3, 16 -> 2); the RSSI alone took them to 4/2/1 (8 and 7). A one-phone RSSI
pattern is weaker evidence than it sounds: the patterns of true address changes that the place test
already linked had LLRs from -17 to +5 (a phone heard at one or two receivers near their sensitivity, a
turn of the body), so a poor match never vetoes the place test, and a threshold of 0 instead of 1 made
one wrong link in four of those eight runs (two shoppers chained into one visit three times, two
pedestrians once).

Decisions are taken `GAP_S + SILENCE_S` after the new subject's first estimate, long before its own
session could become a visit (`visits.min_dwell_s`). Only the data's own times are used: estimates', and
sightings of the seconds the estimator has already decided, so how the runtime batches them does not
change a link. No raw address ever reaches this stage; what it keeps is pseudonymous (subjects, positions,
per-second RSSI sums per receiver for `SIGNAL_KEEP_S`), in memory only, bounded and forgotten after
`FORGET_S`. It needs positions (the HMM estimator's); with the baseline it links nothing.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby, pairwise
from typing import Any, TypeVar

from gateway.model import Sighting, SubjectLink, ZoneEstimate

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
PATTERN_GAP_S = 2.0
"""Pattern link: the new address's first sighting comes at most this long after the old one's last. Phones change
address between two advertising events (0.1-1 s apart); two missed packets make 2 s."""
PATTERN_OVERLAP_S = 0.25
"""... and the old address is not heard after it (the phone sends one address at a time), give or take clock jitter
between receivers."""
PATTERN_S = 5
"""Whole seconds of sightings compared: the old address's last ones and the new one's first ones."""
PATTERN_LLR = 1.0
"""The RSSI patterns must be at least e^1 times more likely as one phone than as two (`_pattern_llr`) ... (0 made
wrong links in the simulator, module docstring)"""
PATTERN_MARGIN = 2.0
"""... and every rival (another address that fell silent, or another one that started, in the same window) at least
e^2 times less likely than the match."""
STAYED_S = 5.0
"""Pattern test: an old address estimated inside for all of its last this many seconds is an inside end, near a
door too; someone leaving is estimated at the door and outside before their address falls silent (supermarket
seed 2: a shopper 3.7 m from the door, split, now linked; no wrong link in the eight replayed runs)."""
PATTERN_INSIDE_S = 30.0
"""The old subject was estimated inside at least this long (in total): it was somebody in the store, not a
pedestrian whose phone happened to change address as someone else's first appeared."""
SAME_SIGMA_DB = 2.0
"""One phone a second apart: the same shadowing, phone offset and body loss; what differs is the few metres it may
have walked and its orientation."""
PACKET_SIGMA_DB = 3.0
"""Fast fading of one packet around its local mean (measured in the simulator: 2.5 dB median within 3 s)."""
OTHER_SIGMA_DB = 8.0
"""Two phones: a different place, phone model and body on top (6 dB shadowing, +-3 dB between phone models)."""
ONE_SIDED_LLR = 2.0
"""A receiver that heard one side at least twice well above its sensitivity (`ONE_SIDED_DB`) but never the other."""
ONE_SIDED_DB = -26.0
"""RSSI relative to the phone's 1-m reference (-59 dBm): -85 dBm, 10 dB above a -95 dBm receiver sensitivity."""
EVENT_MERGE_S = 0.02
"""Packets one receiver reports within this of each other are one advertising event (a scanner listens on one
channel at a time, but a source may repeat a report): the shortest advertising interval Bluetooth LE allows is 20 ms.
Events are kept per receiver, so each series is on one clock and receivers' clock offsets or delays do not mix."""
TIMING_MIN_DIFFS = 4
"""The old address's advertising interval is estimated only from at least this many gaps between its events."""
TIMING_MAX_K = 10
"""Gaps longer than this many intervals (packets missed in a row) are not used: the advDelay jitter adds up."""
TIMING_SIGMA_MIN_S = 0.002
"""Floor of the per-event timing jitter, measured on the old address itself (advDelay, 0-10 ms per event by the
Core specification, is 2.9 ms standard deviation; receive-time jitter of the source adds to it)."""
TIMING_SIGMA_MAX_S = 0.008
"""... and the timing test says nothing when that jitter is above this: receive times stamped late and unevenly (a
busy event loop, a remote node batching its reports) would read as a different phone. Replayed with Gaussian jitter
added to every receive time (supermarket 09:00 seeds 1-3 / 17:00 seeds 1-2, split visits): none 0/1/1 / 3/2; 5 ms
2/1/1 / 5/2; 20 ms 4/2/1 / 8/6, as without the timing test; 20 ms without this limit 3/1/4 / 9/5 and a wrong link."""
SAME_INTERVAL_SHARE = 0.3
"""Share of other phones assumed to advertise at the same interval: operating systems use a few fixed settings, so a
matching interval alone is worth at most ln(1/0.3) = 1.2."""
INTERVAL_KEPT_SHARE = 0.95
"""Chance a phone keeps its advertising interval across an address change (a change of app or screen state may
coincide with it): a clear mismatch counts at most ln(0.05 / 0.7) = -2.6 against."""
PHASE_KEPT_SHARE = 0.5
"""Chance the advertising events run on across the change at the same schedule (a controller resolving its own
private address keeps the advertising set running; a host that stops advertising to set a new address does not)."""
SIGNAL_KEEP_S = 60
"""Seconds of sightings kept per subject: a decision looks back at most `GAP_S + SILENCE_S + PATTERN_S` plus the
estimator's lag."""
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
    inside_since: float = math.inf  # first estimate of the run of inside estimates that ends with the last one


@dataclass(slots=True)
class _Signal:
    """What one subject's sightings looked like, binned by whole second: second -> receiver -> [sum, packets]."""

    first: float  # the very first sighting's time
    bins: dict[int, dict[str, list[float]]]
    last_in: dict[int, float]  # second -> the last sighting's time in it
    events: dict[str, list[float]] = field(default_factory=dict)  # per receiver: events' times, sorted


_V = TypeVar("_V")


def _rename(table: dict[str, _V], old: str, new: str) -> None:
    if old in table and new not in table:
        table[new] = table.pop(old)


class HandoverLinker:
    """Links a new anonymous subject to the one whose address it replaced; no I/O, time from the estimates."""

    def __init__(self, doors: Sequence[tuple[float, float]]) -> None:
        self._doors = list(doors)
        self._subjects: dict[str, _Subject] = {}
        self._signals: dict[str, _Signal] = {}
        self._inside_s: dict[str, float] = {}
        self._watermark = -math.inf
        self._last_prune = -math.inf
        self._counts = {
            "linked": 0,
            "linked_pattern": 0,
            "no_candidate": 0,
            "ambiguous": 0,
            "not_eligible": 0,
            "pattern_ambiguous": 0,
        }

    def _door_m(self, xy: tuple[float, float]) -> float:
        return min((math.hypot(xy[0] - dx, xy[1] - dy) for dx, dy in self._doors), default=math.inf)

    def note(self, links: Sequence[SubjectLink]) -> None:
        """Links from the identifier. Member: that anonymous subject went quiet because it became a member.
        Midnight: the subject goes on under today's name (its estimates do: the estimator relabels it), so what
        the linker knows of it goes on too, and neither name looks like an address change to link."""
        for link in links:
            if link.reason == "midnight":
                self._rename(link.old, link.new)
                continue
            s = self._subjects.get(link.old)
            if s is not None:
                s.member = True

    def _rename(self, old: str, new: str) -> None:
        _rename(self._subjects, old, new)
        _rename(self._signals, old, new)
        _rename(self._inside_s, old, new)

    def shift(self, by: float) -> None:
        """Move every time held forward by `by` whole seconds (the clock was stepped forward: `Gateway.shift`): the
        subjects' first and last estimates, the sightings kept per whole second, the advertising events. A phone that
        changes its address across the step is linked as if no time had passed; a subject heard on both sides is
        not new."""
        n = round(by)
        if n != by:
            raise ValueError(f"the handover linker moves by whole seconds, not {by!r}")
        for s in self._subjects.values():
            s.first += by
            s.last += by
            s.inside_since += by  # inf (not inside) stays so
        for sig in self._signals.values():
            sig.first += by
            sig.bins = {sec + n: b for sec, b in sig.bins.items()}
            sig.last_in = {sec + n: t + by for sec, t in sig.last_in.items()}
            sig.events = {rx: [t + by for t in ev] for rx, ev in sig.events.items()}
        self._watermark += by
        self._last_prune += by

    def observe(self, sightings: Sequence[Sighting]) -> None:
        """Fold in the tick's sightings (before `update` with its estimates): the RSSI pattern each address had."""
        signals = self._signals
        for x in sightings:
            if x.subject.startswith("beacon:"):
                continue
            sig = signals.get(x.subject)
            if sig is None:
                if len(signals) >= MAX_SUBJECTS:
                    signals.pop(next(iter(signals)))
                sig = signals[x.subject] = _Signal(x.ts, {}, {})
            sec = math.floor(x.ts)
            acc = sig.bins.setdefault(sec, {}).setdefault(x.receiver, [0.0, 0.0])
            acc[0] += x.rssi - x.ref_rssi
            acc[1] += 1.0
            if x.ts > sig.last_in.get(sec, -math.inf):
                sig.last_in[sec] = x.ts
            if x.ts < sig.first:
                sig.first = x.ts
            ev = sig.events.setdefault(x.receiver, [])
            i = bisect.bisect_left(ev, x.ts)
            if (i == 0 or x.ts - ev[i - 1] > EVENT_MERGE_S) and (i == len(ev) or ev[i] - x.ts > EVENT_MERGE_S):
                ev.insert(i, x.ts)

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
        if e.ts == s.last:
            s.inside_since = min(s.inside_since, e.ts) if e.inside else math.inf
        if e.inside:
            self._inside_s[e.subject] = self._inside_s.get(e.subject, 0.0) + 1.0
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
        link, why = self._decide_place(name, new)
        if link is not None:
            self._counts["linked"] += 1
            return link
        link, why_pattern = self._decide_pattern(name, new)
        if link is not None:
            self._counts["linked_pattern"] += 1
            return link
        self._counts[why] += 1
        if why_pattern:
            self._counts[why_pattern] += 1
        return None

    def _decide_place(self, name: str, new: _Subject) -> tuple[SubjectLink | None, str]:
        """The place test; without a link, why not ("not_eligible", "no_candidate" or "ambiguous")."""
        if not self._starts_inside(new):
            return None, "not_eligible"
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
            return None, "no_candidate"
        if len(ended) > 1:
            return None, "ambiguous"
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
            return None, "ambiguous"
        old.continued = True
        return SubjectLink(new.first, old_name, name, "handover"), "linked"

    def _decide_pattern(self, name: str, new: _Subject) -> tuple[SubjectLink | None, str]:
        """The pattern test; without a link, "pattern_ambiguous" when rivals were too close, else ""."""
        done = math.floor(self._watermark)  # sightings of seconds up to here are all in, however ticks batched them
        sig_new = self._signals.get(name)
        if sig_new is None or sig_new.first >= done:
            return None, ""
        f = sig_new.first
        head = _window(sig_new, math.floor(f), math.floor(f) + PATTERN_S - 1, done)
        head_ev = _head_events(sig_new, done)

        def last_before(sig: _Signal) -> float:
            return max((t for sec, t in sig.last_in.items() if sec <= done), default=-math.inf)

        olds: list[tuple[float, str, _Subject]] = []
        for k, s in self._subjects.items():
            sig = self._signals.get(k)
            if s is new or not s.anonymous or s.member or s.continued or sig is None or sig.first >= f:
                continue
            last = last_before(sig)
            if not -PATTERN_OVERLAP_S <= f - last <= PATTERN_GAP_S or self._inside_s.get(k, 0.0) < PATTERN_INSIDE_S:
                continue
            tail = _window(sig, math.floor(last) - PATTERN_S + 1, math.floor(last), done)
            olds.append((_pattern_llr(tail, head) + _timing_llr(_tail_events(sig, done), head_ev), k, s))
        if not olds:
            return None, ""
        olds.sort(key=lambda o: -o[0])
        llr, old_name, old = olds[0]
        if llr < PATTERN_LLR or not (self._starts_inside(new) or self._stayed_inside(old)):
            return None, ""
        if len(olds) > 1 and olds[1][0] > llr - PATTERN_MARGIN:
            return None, "pattern_ambiguous"
        # ... and no other new address that started as the old one fell silent looks as much like it.
        sig_old = self._signals[old_name]
        last = last_before(sig_old)
        tail = _window(sig_old, math.floor(last) - PATTERN_S + 1, math.floor(last), done)
        tail_ev = _tail_events(sig_old, done)
        for k, sig in self._signals.items():
            if k in (name, old_name) or not k.startswith("anon:"):
                continue
            if not -PATTERN_OVERLAP_S <= sig.first - last <= PATTERN_GAP_S:
                continue
            rival = _window(sig, math.floor(sig.first), math.floor(sig.first) + PATTERN_S - 1, done)
            if _pattern_llr(tail, rival) + _timing_llr(tail_ev, _head_events(sig, done)) > llr - PATTERN_MARGIN:
                return None, "pattern_ambiguous"
        old.continued = True
        return SubjectLink(new.first, old_name, name, "handover"), "linked_pattern"

    def _ends_inside(self, s: _Subject) -> bool:
        """The subject was last estimated inside, away from every door."""
        return s.last_inside and self._door_m(s.last_xy) >= DOOR_M

    def _stayed_inside(self, s: _Subject) -> bool:
        """The subject was estimated inside for all of its last `STAYED_S` seconds (or is `_ends_inside`)."""
        return self._ends_inside(s) or s.last - s.inside_since >= STAYED_S

    def _starts_inside(self, s: _Subject) -> bool:
        """Where the subject settled `SETTLE_S` after it was first heard is inside, away from every door."""
        return s.settled_xy is not None and s.settled_inside and self._door_m(s.settled_xy) >= DOOR_M

    def _prune(self, now: float) -> None:
        if now - self._last_prune < 30.0:
            return
        self._last_prune = now
        for k in [k for k, s in self._subjects.items() if s.last < now - FORGET_S]:
            del self._subjects[k]
            self._inside_s.pop(k, None)
        if not math.isfinite(now):
            return
        keep = math.floor(now) - SIGNAL_KEEP_S
        for k in [k for k, sig in self._signals.items() if max(sig.bins, default=-math.inf) < keep]:
            del self._signals[k]
        for sig in self._signals.values():
            for sec in [sec for sec in sig.bins if sec < keep]:
                del sig.bins[sec]
                sig.last_in.pop(sec, None)
            for ev in sig.events.values():
                del ev[: bisect.bisect_left(ev, keep)]

    def diagnostics(self) -> dict[str, Any]:
        """Subjects remembered and how the handover decisions went."""
        return {"subjects": len(self._subjects), **self._counts}


def _radius(sd_a: float, sd_b: float) -> float:
    """How far apart two estimates of one place may be, given their spreads."""
    return min(PLACE_M + SPREAD_K * (sd_a + sd_b), PLACE_MAX_M)


def _window(sig: _Signal, a: int, b: int, done: int) -> dict[str, tuple[float, float]]:
    """Mean RSSI and packets per receiver over the whole seconds a..b (none after `done`)."""
    acc: dict[str, list[float]] = {}
    for sec in range(a, min(b, done) + 1):
        for rx, (total, n) in sig.bins.get(sec, {}).items():
            v = acc.setdefault(rx, [0.0, 0.0])
            v[0] += total
            v[1] += n
    return {rx: (total / n, n) for rx, (total, n) in acc.items()}


def _pattern_llr(a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]) -> float:
    """Log likelihood ratio, one phone against two, of two RSSI patterns (mean and packets per receiver).

    Per receiver both heard, the difference of the means is Gaussian: for one phone with `SAME_SIGMA_DB` plus each
    mean's packet noise, for two with `OTHER_SIGMA_DB` on top. A receiver that heard one side well and the other not
    at all counts against.
    """
    llr = 0.0
    for rx in a.keys() | b.keys():
        if rx in a and rx in b:
            (ma, na), (mb, nb) = a[rx], b[rx]
            var = SAME_SIGMA_DB**2 + PACKET_SIGMA_DB**2 * (1.0 / na + 1.0 / nb)
            other = var + OTHER_SIGMA_DB**2
            d2 = (ma - mb) ** 2
            llr += 0.5 * math.log(other / var) - 0.5 * d2 * (1.0 / var - 1.0 / other)
        else:
            m, n = a[rx] if rx in a else b[rx]
            if m >= ONE_SIDED_DB and n >= 2:
                llr -= ONE_SIDED_LLR
    return llr


Events = dict[str, list[float]]


def _tail_events(sig: _Signal, done: int) -> Events:
    """An old address's advertising events per receiver of the seconds up to `done` (the last `SIGNAL_KEEP_S`)."""
    return {rx: ev[: bisect.bisect_left(ev, done + 1)] for rx, ev in sig.events.items()}


def _head_events(sig: _Signal, done: int) -> Events:
    """A new address's advertising events per receiver of its first `PATTERN_S` whole seconds (none after `done`)."""
    end = min(math.floor(sig.first) + PATTERN_S, done + 1)
    return {rx: ev[: bisect.bisect_left(ev, end)] for rx, ev in sig.events.items()}


def _interval(events: Events) -> tuple[float, float] | None:
    """An address's advertising interval and per-event timing jitter (s) from its events, or None if too few.

    Gaps between the events one receiver heard are whole multiples of the interval (plus advDelay): the shortest
    gap gives a first guess, then the interval is the least-squares fit over gaps of up to `TIMING_MAX_K` intervals,
    and the jitter the spread of what is left, per event.
    """
    gaps = [b - a for ev in events.values() for a, b in pairwise(ev)]
    if len(gaps) < TIMING_MIN_DIFFS:
        return None
    period = min(gaps)
    for _ in range(2):
        used = [(g, k) for g in gaps if 1 <= (k := round(g / period)) <= TIMING_MAX_K]
        if len(used) < TIMING_MIN_DIFFS:
            return None
        period = sum(g for g, _ in used) / sum(k for _, k in used)
    var = sum((g - k * period) ** 2 / k for g, k in used) / len(used)
    return period, max(math.sqrt(var), TIMING_SIGMA_MIN_S)


def _timing_llr(old: Events, new: Events) -> float:
    """Log likelihood ratio, one phone against two, of the new address's advertising events given the old one's.

    A phone keeps its advertising interval across an address change (`INTERVAL_KEPT_SHARE`), so the gaps between
    the new address's events are whole multiples of the old one's interval, each within the jitter that builds up
    over its intervals; another phone's gaps fall anywhere in the interval, unless it advertises at the same
    interval (`SAME_INTERVAL_SHARE`). And if the advertising events run on at their schedule (`PHASE_KEPT_SHARE`),
    the gap from the old address's last event to the new one's first is such a multiple too; for another phone,
    or a restarted schedule, it falls anywhere. 0 when the old address's interval cannot be estimated.
    """
    fit = _interval(old)
    if fit is None or fit[1] > TIMING_SIGMA_MAX_S:
        return 0.0
    period, sigma = fit

    def fits(gap: float) -> float | None:
        """Log density of `gap` as whole intervals plus jitter, against uniform over one interval (None: no info)."""
        k = max(1, round(gap / period))
        var = k * sigma * sigma
        if k > TIMING_MAX_K or math.sqrt(var) > period / 4:
            return None
        r = gap - k * period
        return -0.5 * r * r / var - 0.5 * math.log(2 * math.pi * var) + math.log(period)

    same = [v for ev in new.values() for a, b in pairwise(ev) if (v := fits(b - a)) is not None]
    llr = 0.0
    if same:
        one = sum(same)  # the new gaps' log density under the old interval, against uniform (two unrelated phones)
        llr += _logaddexp(math.log(INTERVAL_KEPT_SHARE) + one, math.log(1 - INTERVAL_KEPT_SHARE))
        llr -= _logaddexp(math.log(SAME_INTERVAL_SHARE) + one, math.log(1 - SAME_INTERVAL_SHARE))
    # The schedule across the change, on the receiver that heard both sides closest together (one schedule: the
    # other receivers add no independent evidence).
    spans = [new[rx][0] - ev[-1] for rx, ev in old.items() if ev and new.get(rx)]
    phase = fits(min(spans)) if spans else None
    if phase is not None:
        llr += _logaddexp(math.log(PHASE_KEPT_SHARE) + phase, math.log(1 - PHASE_KEPT_SHARE))
    return llr


def _logaddexp(a: float, b: float) -> float:
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))
