"""Wiring: builds the stages, owns time, and runs the pipeline, the uplink and the dashboard.

Nothing else in Visita starts tasks or threads (paho's network thread is started by the
uplink, on our call). Each tick the runtime reads the clock once, pulls the adverts that
arrived up to that time from the source, pushes them through the pure stages, and hands
everything the tick produced to the store in one commit before anything is published.
The disk part of each commit (the fsyncs) runs on one writer thread (`CommitWriter`), so
the event loop that serves the dashboard and the check-ins never waits on the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway import __version__
from gateway.config import (
    ConfigError,
    DashboardTls,
    Settings,
    load_tls,
    parse_listen,
    parse_mqtt_url,
    serving_notes,
)
from gateway.days import LocalDays
from gateway.decode import Decoder
from gateway.downlink import Downlink
from gateway.estimate import HmmEstimator, make_estimator
from gateway.events import EventFactory, topic_prefix, uuid7
from gateway.footfall import Footfall
from gateway.handover import HandoverLinker
from gateway.identity import BeaconRegistry, Identifier, MemberDirectory, secret_id, store_day_salt
from gateway.members import KeyStoreError, KeyVault, MemberKeys, load_into
from gateway.model import Advert, Award, Event, Sighting, Visit, VisitChange
from gateway.points import (
    BACKEND_RULES_FILE,
    BackendRulesDamaged,
    PointsEngine,
    RuleSet,
    dead_rule_problems,
    explain_member,
    ledger_days,
    ledger_since,
    rules_from_file,
    rules_in_force,
)
from gateway.sdnotify import Notifier
from gateway.store import PendingCommit, Store
from gateway.survey import SurveyError, SurveyMap, SurveyRecorder, SurveyRefused, inside_zone
from gateway.uplink import Uplink
from gateway.visits import VisitTracker, link_subjects
from sensors.base import Source
from sensors.checkins import SKEW_S, CheckinVerifier, NonceJournal
from sensors.nodes import NodesSource

log = logging.getLogger("visita.runtime")

RECENT_VISITS = 200
CATCH_UP_S = 5.0
"""A tick that finds data time this far ahead of the pipeline steps there in slices of this much data time."""
HOLD_BACK_S = 0.25
"""A simulation more than this many wall seconds of its --speed behind goes on from where the pipeline is
(`Clock.hold_back`): what it catches up with in one go (a stop waits for one slice of it, CATCH_UP_S) is bounded."""
SLOW_AFTER_S = 3.0
SLOW_SHARE = 0.8
"""A simulation held back (`Clock.hold_back`) that has run for SLOW_AFTER_S wall seconds at under SLOW_SHARE of its
--speed is said to be too fast for the machine (a moment's delay holds it back too, without a word)."""


CLOCK_STEP_S = 2.0
"""A live run's data time follows the system clock once the two are this far apart (an NTP step); smaller
differences are the slow slewing NTP does anyway and monotonic time carries on through them."""


REDATE_S = 60.0
"""For this long in data time after a clock step, what comes in dated before it is moved forward by it (`Gateway.
_redated`); later still, it is late, and the estimator counts and drops it as it does any late sighting."""

_Dated = TypeVar("_Dated", Advert, Sighting)


CLOCK_WAIT_S = 30.0
"""How long `visita run` on a live clock waits at start for the system clock to be synchronised (`--clock-wait`)."""
BEHIND_LAST_RUN_S = 60.0
"""A live clock this far behind the data time the data directory was written up to is said to be wrong."""
_TIME_ERROR = 5
"""adjtimex(2)'s clock state when the clock is not synchronised (what `timedatectl` shows as "synchronized: no")."""


def clock_synchronised() -> bool | None:
    """Whether the kernel holds the system clock synchronised (NTP, chrony, timesyncd set it so); None when this
    system cannot say (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        timex = ctypes.create_string_buffer(512)  # struct timex, zeroed: modes 0 reads the state, changes nothing
        state = int(libc.adjtimex(timex))
    except (OSError, AttributeError):
        return None
    return None if state < 0 else state != _TIME_ERROR


class StartupError(Exception):
    """Something outside Visita keeps it from starting; the message says what and the fix."""


@dataclass(frozen=True, slots=True)
class ClockStep:
    """A forward step of a live clock (`Clock.take_steps`)."""

    at: float
    """Data time just after the step, UNIX seconds: anything dated before `at - by` was dated by the clock before it."""
    by: float
    """How far data time jumped, whole seconds (more than CLOCK_STEP_S)."""


class Clock:
    """Data time for a live radio (speed 1, now), a simulation (any start, any speed), or a
    replay driven by the data alone (`step_s`: each reading moves data time on by that much,
    whatever the wall clock says, so a recorded log plays as fast as the pipeline goes)."""

    def __init__(
        self, speed: float = 1.0, start: float | None = None, step_s: float | None = None, simulation: bool = False
    ) -> None:
        """`simulation`: the gateway drives the data itself (`visita run --sim`), so `hold_back` may slow it down."""
        self.speed = speed
        self.simulation = simulation
        self.start = time.time() if start is None else start
        self.step_s = step_s
        self._t0 = time.monotonic()
        self._ticks = 0
        self._follows_wall = start is None and step_s is None and speed == 1.0
        self.live = self._follows_wall and not simulation
        """Data from a radio or remote receivers in real time, dated by the system clock (not a simulation, a
        replay or a rehearsal)."""
        self._behind = False
        self._lock = threading.Lock()  # `now` is called from the event loop and from paho's thread (sensors/nodes.py)
        self._pending: list[ClockStep] = []
        self.steps = 0
        """Times the system clock was stepped forward and data time followed it (live runs)."""
        self.stepped_s = 0.0
        """Seconds data time was stepped forward in all (`steps`)."""

    def now(self) -> float:
        """Current data time, UNIX seconds; it never goes back.

        Live (speed 1, no start given), data time is the wall clock kept monotonic: a Pi without a real-time clock
        starts on the time it saved at shutdown and is stepped forward once NTP syncs, and data time follows that
        step (check-ins are judged against it, days are dated by it), in whole seconds (so it stays within half a
        second of the system clock): the step is kept for `take_steps`, and the gateway moves the times it holds by
        as much (`Gateway.follow_clock`), so that the minutes of the wrong clock are not taken for time passing. A
        step back is not followed: data time holds its course until the wall clock catches up, and says so once.
        """
        if self.step_s is not None:
            self._ticks += 1
            return self.start + self._ticks * self.step_s
        if not self._follows_wall:
            return self.start + (time.monotonic() - self._t0) * self.speed
        with self._lock:  # one thread sees a step and records it once; another then reads the new time
            elapsed = time.monotonic() - self._t0
            t = self.start + elapsed
            wall = time.time()
            if wall - t > CLOCK_STEP_S:
                by = float(round(wall - t))
                log.warning(
                    "the system clock was stepped forward by %.0f s (NTP?): data time follows it, %s",
                    by,
                    "and the visits open go on as if no time passed"
                    if self.live
                    else "and the simulated store plays through the jump (time passing for its world)",
                )
                self.start += by
                self.steps += 1
                self.stepped_s += by
                t = self.start + elapsed
                if self.live:  # a simulation on the system clock plays through the jump: time passing for its world
                    self._pending.append(ClockStep(t, by))
            elif t - wall > CLOCK_STEP_S and not self._behind:
                # Data time goes on at the rate of the monotonic clock, as the system clock does: it stays this far
                # ahead until a restart (which starts it on the system clock again), it never meets it by itself.
                log.warning(
                    "the system clock was set back by %.0f s (NTP correcting a fast clock?): data time does not go "
                    "back, so event times and the dashboard stay %.0f s ahead of the system clock until Visita is "
                    "restarted%s",
                    t - wall,
                    t - wall,
                    "; app check-ins from phones on the right time are refused as stale meanwhile (more than "
                    f"{SKEW_S:.0f} s apart): restart Visita once the clock is right (systemctl restart visita; open "
                    "visits then end at their last sighting, docs/events.md#restarts)"
                    if t - wall > SKEW_S
                    else "",
                )
            self._behind = t - wall > CLOCK_STEP_S
            return t

    def take_steps(self) -> list[ClockStep]:
        """The forward steps data time took since the last call, oldest first (each is returned once, whichever
        thread's `now` saw it)."""
        with self._lock:
            steps, self._pending = self._pending, []
        return steps

    def restart(self) -> None:
        """Start again on the system clock as it is now (after waiting for it to be synchronised, before the pipeline
        holds any time: not a step)."""
        with self._lock:
            self.start, self._t0 = time.time(), time.monotonic()

    def hold_back(self, t: float) -> bool:
        """Make data time `t` now and go on from there at the same speed, when this clock runs a simulation the gateway
        drives itself (`simulation`; not a replay's steps): a simulation asked to run faster than the machine can
        process it runs as fast as it can rather than building a backlog. False, and nothing changed, for any other
        clock: data from a radio (live, or a rehearsal's emulated BlueZ, whose phones follow their own clock) comes
        when it comes and has to be caught up with."""
        if not self.simulation or self._follows_wall or self.step_s is not None:
            return False  # at speed 1 a simulation's data time is the wall clock's (Clock.now), caught up with
        self._t0 = time.monotonic() - (t - self.start) / self.speed
        return True


@dataclass(frozen=True, slots=True)
class RunOptions:
    """What `visita run` was asked to do, beyond the config file."""

    data_dir: Path | None = None
    """Overrides storage.data_dir."""
    mqtt: str | None = None
    """Overrides mqtt.url ("off" disables)."""
    dashboard: str | None = None
    """Overrides dashboard.listen ("off" disables)."""
    until_s: float | None = None
    """Stop after this much data time."""
    tick_s: float = 0.1
    """Wall-clock seconds between pipeline ticks."""
    flush_timeout_s: float = 10.0
    """How long a stop waits for the broker to acknowledge what is queued."""
    temporary_data: bool = False
    """The data directory is thrown away after the run (a replay without --data-dir)."""
    recorded: bool = False
    """The source is a recording (a replay): data the directory already holds is refused, not published again."""
    clock_wait_s: float = CLOCK_WAIT_S
    """A live clock not synchronised yet is waited for this long at start (0: not at all)."""


class Gateway:
    """The running pipeline. The dashboard reads through this object, never the database."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        source: Source,
        members: MemberDirectory,
        rules: RuleSet,
        staff: list[str],
    ) -> None:
        self.settings = settings
        self.version = __version__
        self.store = store
        self.source = source
        days = LocalDays(settings.timezone)
        self.decoder = Decoder()
        self.members = members
        self.beacons = BeaconRegistry(settings.plan.beacons)
        secret = settings.identity.anon_secret()  # ValueError naming the file: `run` makes it a config error
        self.anon_secret_id = secret_id(secret) if secret is not None else None
        """The store secret's public id (`identity.secret_id`), None without one: anonymous subjects are then this
        gateway's own and do not fuse with other gateways' (docs/nodes.md)."""
        self.identifier = Identifier(
            members,
            days,
            beacons=self.beacons,
            carry_s=settings.visits.absence_timeout_s,
            day_salt=store_day_salt(secret, settings.store) if secret is not None else None,
        )
        # The site survey (docs/survey.md): the map in use, and the installer's recorder for the survey tag.
        self.survey_path = store.path.parent / settings.survey.file
        self.survey_map: SurveyMap | None = None
        self.survey_problem: str | None = None
        """Why a survey file that is there is not used (another plan, unreadable), for /api/v1/status."""
        if self.survey_path.exists():
            try:
                self.survey_map = SurveyMap.load(self.survey_path, settings.plan, settings.survey, settings.estimate)
            except SurveyError as e:
                self.survey_problem = str(e)
                log.warning("survey map not used: %s", e)
        self.estimator = make_estimator(settings.plan, settings.estimate, self.survey_map)
        if settings.estimate.method == "auto" and (gaps := settings.plan.geometry_gaps()):
            log.warning("%s", gaps)
        self.survey_recorder: SurveyRecorder | None = None
        if settings.survey.transmitter:
            self.survey_recorder = SurveyRecorder(settings.plan, settings.survey.transmitter)
            if self.survey_map is not None:
                self.survey_recorder.restore(self.survey_map.spots)
        self.rules_source = "given at start"
        """Where the points rules in force come from, in words (`rules_in_force`; set by `run`, and by cmd/rules)."""
        self.installer_token: str | None = None
        """The installer endpoints' bearer token (set by `run` from the config); None: those endpoints are off."""
        self.support_token: str | None = None
        """Support staff's bearer token for the points explanations (set by `run`); None: that endpoint is off."""
        self.dashboard_tls: DashboardTls | None = None
        """The certificate the dashboard serves HTTPS with (set by `run`); None: plain HTTP."""
        visits_cfg = settings.visits.model_copy(update={"staff": sorted({*settings.visits.staff, *staff})})
        self.tracker = VisitTracker(settings.gateway, visits_cfg, anon_resume=secret is not None)
        self.linker = HandoverLinker(settings.plan.doors) if settings.visits.handover else None
        since = ledger_since(rules, store.history_days())
        self.points = PointsEngine(rules, days, store.awards(since), members.tier, members.known, since)
        self.footfall = Footfall(days)
        self._footfall_later: list[VisitChange] = []
        """Check-ins' visit changes, counted by footfall once the pipeline's time reaches them (in order with the
        radio's: a check-in during a catch-up is dated ahead of the data)."""
        kept = store.kept() or {}
        if isinstance(kept.get("footfall"), dict):  # today's counts and the minute in progress before a restart
            self.footfall.restore(kept["footfall"])
        as_of = kept.get("visits_as_of")
        self._visits_as_of: float | None = float(as_of) if isinstance(as_of, (int, float)) else None
        """What data time the open visits kept before a restart are as of (None: unknown); used by `resume`."""
        self._resumed = False
        until = kept.get("data_until")
        self._data_until: float | None = float(until) if isinstance(until, (int, float)) else None
        """The pipeline's data time at the last write before the restart (a replay refuses to go over it again)."""
        store.keep(self._kept_state)
        self.events = EventFactory(settings.store, settings.gateway, store.last_seq())
        self.uplink: Uplink | None = None
        self.downlink: Downlink[Gateway] | None = None
        """Downlink commands (gateway.downlink), applied on the runtime's thread by `feed_uplink`."""
        self.nodes: NodesSource | None = None
        """Remote receivers (sensors/nodes.py): their sightings join the radio's after the identify stage."""
        self._started = self._health_last = time.monotonic()
        self._health_next = self._started + settings.mqtt.health_interval_s
        self._health_adverts = self._health_acked = 0
        self.member_keys: MemberKeys | None = None
        """The live member set and its vault, for the `cmd/members` downlink (gateway.members)."""
        self._recent: deque[Visit] = deque(store.recent_visits(RECENT_VISITS), maxlen=RECENT_VISITS)
        self.checkins = CheckinVerifier(settings.store, members.key, NonceJournal(store.path.parent))
        self._checkin_events: list[Event] = []
        self._checkin_awards: list[Award] = []
        self.writer: CommitWriter | None = None
        """Set by `run`: commits go through the writer thread. Without one (tests, tools) they are synchronous."""
        self.clock: Callable[[], float] = time.time
        """Data time for check-ins between ticks (the runtime's clock; wall time by default)."""
        self.data_clock: Clock | None = None
        """The runtime's clock itself (set by `run`), for its diagnostics."""
        self._days = days
        self._retained_day = ""
        """The store-local day the history was last trimmed for (`_retain`)."""
        self.now = 0.0
        self.ticks = 0
        self.adverts = 0
        self._redate: list[ClockStep] = []
        """Forward steps of the clock in the last REDATE_S of data time: what comes in dated before one (a source's
        buffer, a remote receiver's reading) is moved forward by it (`_redated`)."""
        self.redated = 0
        """Adverts and sightings dated before a clock step that came in after it, and were moved forward by it."""

    @property
    def resolution(self) -> Literal["zones", "presence"]:
        """What the store's receivers can tell: "zones", or "presence" (inside or outside only) with one."""
        return "zones" if len(self.settings.plan.receivers) > 1 else "presence"

    def status_event(self, online: bool) -> Event:
        """The retained status message (birth or will)."""
        return self.events.status(time.time(), online, self.version, self.resolution)

    def step(self, now: float) -> list[Event]:
        """One tick: source → decode → identify → estimate → visits → points → store (one commit) → uplink."""
        self.follow_clock()
        # `now` may have been read before a step that something else saw first (paho's thread, a radio's callback or
        # a check-in during a catch-up's await), and the pipeline has moved on by the step since: data time does not
        # go back (else the next tick would "catch up" over the whole jump); the next reading takes it on from here.
        now = max(now, self.now)
        self.now = now
        if self._redate and now >= self._redate[-1].at + REDATE_S:
            self._redate = []  # anything dated before a step still coming in is late, as without one
        if self.writer is not None:
            self.writer.raise_error()  # a commit that failed on the writer thread stops the pipeline
        self.members.prepare(now)  # the next window's token table, a chunk per tick
        adverts = self._redated(self.source.poll(now))
        self.adverts += len(adverts)
        sightings = self.identifier.identify(self.decoder.decode_batch(adverts))
        if self.nodes is not None:
            remote = self.nodes.poll_sightings(now, self._remote_subject, self.members.known)
            sightings += self._redated(remote)
            sightings = self.identifier.carry_over(sightings)  # a midnight link a remote sighting made
        if self.survey_recorder is not None:
            self.survey_recorder.observe(sightings)
        self.resume(now)
        changes = link_subjects(self.estimator, self.tracker, self.linker, self.identifier.take_links())
        estimates = self.estimator.update(sightings, now)
        changes += self.tracker.update(estimates, now)
        if self.linker is not None:
            self.linker.observe(sightings)
            for link in self.linker.update(estimates, now):
                changes += self.tracker.link(link)
        return self._conclude(changes, now)

    def follow_clock(self) -> list[ClockStep]:
        """Take the forward steps of the runtime's clock (`Clock.take_steps`) and move every time the pipeline holds
        forward by each (`shift`), before anything dated by the stepped clock comes in. The runtime calls it after
        each reading of the clock, and so does a check-in; on the event loop's thread, so no stage is in the middle
        of a tick. Returns the steps taken (none without a live clock)."""
        steps = self.data_clock.take_steps() if self.data_clock is not None else []
        for st in steps:
            self.shift(st)
        return steps

    def shift(self, step: ClockStep) -> None:
        """The clock was stepped forward by `step.by` (NTP, after a boot on the time saved at shutdown): the times
        before the step were that much behind, so every time a stage holds moves forward by as much, and the
        visits open go on as if no time passed: they neither end (absence) nor count the jump as dwell, and the
        footfall minutes of the jump are neither published nor counted ("the minutes of the wrong clock never
        happened"). What was published, stored or awarded stays as it was (events, finished visits, the ledger, the
        day files, the outbox); the open visits are stored again with their new times. Whatever comes in dated
        before the step afterwards (an advert a source held, a remote receiver's reading) is moved forward too
        (`_redated`)."""
        by = step.by
        if self.now:
            self.now += by
        self.identifier.shift(by)
        self.estimator.shift(by)
        self.tracker.shift(by)
        if self.linker is not None:
            self.linker.shift(by)
        self.footfall.shift(by)
        self.checkins.shift(by)
        if self.survey_recorder is not None:
            self.survey_recorder.shift(by)
        if self.nodes is not None:
            self.nodes.shift(by, step.at)
        self._redate = [*[s for s in self._redate if s.at + REDATE_S > step.at], step]
        log.info("the open visits and every time held moved forward by %.0f s with the clock", by)

    def _redated(self, items: list[_Dated]) -> list[_Dated]:
        """`items` (adverts or sightings) with those dated before a recent clock step moved forward by it: they were
        stamped by the clock before the step (a source's buffer, a remote receiver's reading in flight)."""
        if not self._redate:
            return items
        out: list[_Dated] = []
        for x in items:
            ts = self._redate_ts(x.ts)
            if ts != x.ts:
                self.redated += 1
                x = replace(x, ts=ts)
            out.append(x)
        return out

    def _redate_ts(self, ts: float) -> float:
        """`ts` moved forward by each recent clock step it is dated before. Stamps of the clock before a step are at
        most `at - by`, of the clock after it at least `at`: the middle tells them apart."""
        for st in self._redate:
            if ts < st.at - st.by / 2:
                ts += st.by
        return ts

    def _remote_subject(self, key: str, ts: float) -> str:
        """`Identifier.remote_subject` for a remote receiver's reading, on the day of its time after `_redate_ts`."""
        return self.identifier.remote_subject(key, self._redate_ts(ts))

    def resume(self, now: float) -> None:
        """Once, at start (`run` calls it as its loop begins; a check-in, tick or stop that comes first does): take up
        the visits open before the restart (VisitTracker.restore). Members' go on (anonymous phones' too with a store
        secret), counted as open by footfall; the others end at their last sighting now, with their points, events and
        history like any other end."""
        if self._resumed:
            return
        self._resumed = True
        # A step the clock took before (`run` reads it at start) is in `now` already: the visits are taken up on the
        # clock as it is, and the step must not move them again.
        self.follow_clock()
        kept = self.store.open_visits()
        if not kept:
            return
        changes = self.tracker.restore(kept, self._visits_as_of, now)
        self.footfall.reopen(
            [v for v in self.tracker.open_visits() if v.classification == "visitor"]
            + [c.visit for c in changes if c.visit.classification == "visitor"]
        )
        resumed = self.tracker.diagnostics()["resumed"]
        log.info("visits open before the restart: %d go on, %d ended at their last sighting", resumed, len(changes))
        self._conclude(changes, now)

    def end_visits(self, now: float, *, restart: bool = False) -> list[Event]:
        """A clean stop. The data is over (`restart` false: `--until`, a replay's end): every open session ends at
        its last sighting, as the absence timeout would have, so no visit is left started-but-never-ended and dwell
        bonuses are granted. A restart will follow (a signal): members' visits are kept for it (`resume`), the
        others end now."""
        self.now = now
        self.resume(now)
        changes = self.tracker.end_for_restart(now) if restart else self.tracker.end_all(now)
        return self._conclude(changes, now, stopping=True)

    def _kept_state(self) -> dict[str, Any]:
        """What the store keeps across restarts in each write (Store.keep): footfall's counts, and what time the open
        visits (Store.put_open_visits) are as of."""
        as_of = self.tracker.now if self._resumed else self._visits_as_of  # not taken up yet: as they were
        held = max(self._data_until or 0.0, self.now) or None
        return {"footfall": self.footfall.state(), "visits_as_of": as_of, "data_until": held}

    def _retain(self, now: float) -> None:
        """Once a store-local day: the store deletes the history older than `storage.history_days`, or than the points
        rules look back if that is longer (with this tick's commit), counted back from today or from the newest day
        with history if that is older; not while a live clock is known not to be synchronised."""
        today = self._days.day(now)
        if today == self._retained_day:
            return
        if self.data_clock is not None and self.data_clock.live and clock_synchronised() is False:
            return  # a Pi's clock before NTP may be far off: a year ahead, every day of history would look old
        self._retained_day = today
        days = self.store.history_days()
        newest = min(today, days[-1]) if days else today  # a clock ahead of every day written deletes nothing more
        back = max(self.settings.storage.history_days - 1, ledger_days(self.points.rules))  # today is one of them
        self.store.retain((date.fromisoformat(newest) - timedelta(days=back)).isoformat())

    def _keep_visits(self, now: float, everything: bool = False) -> None:
        """Hand the store the open visits that changed (VisitTracker.take_kept), for the commit of their events."""
        kept, ended = self.tracker.take_kept(now, everything)
        self.store.put_open_visits(kept, ended)

    def _conclude(self, changes: list[VisitChange], now: float, stopping: bool = False) -> list[Event]:
        """Visit changes → points → footfall → events → store (one commit) → uplink."""
        changed = self.tracker.changed_visits()
        awards = self.points.evaluate(changes) + self.points.evaluate_open(changed, now)
        self.tracker.keep({a.visit_id for a in awards})
        due = [c for c in self._footfall_later if c.ts <= now or stopping]
        self._footfall_later = [c for c in self._footfall_later if c.ts > now and not stopping]
        minutes = self.footfall.update(due + changes, now)
        self.footfall.found_staff(changed)  # a visitor's visit that a member link showed to be staff's
        if due:  # counted without an event of their own: a restart must find them counted, as the tracker has them
            self.store.keep_now()
        events = [e for c in changes if (e := self.events.from_change(c)) is not None]
        events += [self.events.from_award(a) for a in awards]
        events += [self.events.make("footfall.minute", m["minute"] + 60, m) for m in minutes]
        finished = [c.visit for c in changes if c.kind == "ended" and c.visit.classification != "pass-by"]
        self._put_checkins()
        self._keep_visits(now, everything=stopping)
        self._retain(now)
        self.store.put_events(events)
        self.store.put_awards(awards)
        self.store.put_visits(finished)
        if self.uplink is not None:
            self.store.ack_events(self.uplink.take_acks())
        self._commit()  # stored before anything is offered to the broker
        self._recent.extendleft(finished)
        self.ticks += 1
        return events

    def checkin(self, body: bytes) -> dict[str, Any]:
        """Verify an app check-in and apply it at once: visit, `checkin.accepted`, awards, one commit.

        CheckinRefused (nothing changed) when it is not accepted (sensors/checkins.py, docs/checkin.md).
        """
        result = self._apply_checkin(body)
        self._commit()
        return result

    async def checkin_async(self, body: bytes) -> dict[str, Any]:
        """`checkin` for the HTTP endpoint: answered once the check-in is on disk.

        The check-in is applied at once (so a replay right behind it is refused); with the runtime's writer
        the answer waits for the next commit, which check-ins that arrive meanwhile share (group commit)
        while the event loop goes on serving.
        """
        result = self._apply_checkin(body)
        if self.writer is None:
            self._commit()
        else:
            await self.writer.commit()
        return result

    def _commit(self) -> None:
        """Commit what was put, then offer it to the uplink: on the writer thread when `run` set one up
        (nobody waits here; a failure comes back at the next tick), else at once on this thread."""
        if self.writer is not None:
            self.writer.request()
            return
        sync, pending = self.begin_commit()
        self.write_commit(sync, pending)
        self.finish_commit(pending)

    def begin_commit(self) -> tuple[Callable[[], None] | None, PendingCommit | None]:
        """On the loop: the check-ins applied since the last commit go to the store, and the commit is
        snapshot. Returns what `write_commit` needs."""
        self._put_checkins()
        return self.checkins.sync_later(), self.store.begin_commit()

    def write_commit(self, sync: Callable[[], None] | None, pending: PendingCommit | None) -> None:
        """The disk work, on any thread: the nonce journal first, then the store (docs/checkin.md)."""
        if sync is not None:
            sync()
        if pending is not None:
            self.store.write_commit(pending)

    def finish_commit(self, pending: PendingCommit | None) -> None:
        """On the loop, after `write_commit`: account for the commit, then feed the uplink what is on disk."""
        if pending is not None:
            self.store.finish_commit(pending)
        self.feed_uplink()

    def ledger(self, since_day: str | None = None) -> list[Award]:
        """The awards a new points engine starts from (`cmd/rules`): the store's ledger, and the awards of check-ins
        applied since the last commit began, which the store has not been handed yet (a check-in answered while a
        commit is written). Without those, the new engine would grant them again to the open visit."""
        awards = self.store.awards(since_day)
        known = {a.award_id for a in awards}
        late = [a for a in self._checkin_awards if a.award_id not in known and a.day >= (since_day or "")]
        return awards + late

    def _put_checkins(self) -> list[Event]:
        """Hand the store the check-ins applied since the last commit (their nonces are synced first).

        One put per group (TinyDB copies a table on every put); also called by `step` before its own
        events, so the outbox receives seqs in order and nothing is sent ahead of a check-in's events.
        """
        events, awards = self._checkin_events, self._checkin_awards
        if events:
            self.store.put_events(events)
            self.store.put_awards(awards)
            self._keep_visits(self.tracker.now)  # the visits they opened or joined, in the same write
            self._checkin_events, self._checkin_awards = [], []
        return events

    def _apply_checkin(self, body: bytes) -> dict[str, Any]:
        read = self.clock()
        self.follow_clock()  # a step this reading saw moves the pipeline's times before the check-in joins them
        now = max(read, self.now)
        c = self.checkins.verify(body, now)
        subject = "member:" + c.member
        beacon, proof = self.beacons.claim(c.beacon, now)  # only a current EID proves the phone heard it
        self.checkins.count_beacon(proof)
        zone = beacon.zone if beacon is not None else None
        self.resume(now)
        changes = self.tracker.checkin(subject, now, zone)
        # A new visit comes with its change; only a check-in that joins an open one looks it up.
        visit = changes[0].visit if changes else self.tracker.open_visit(subject)
        assert visit is not None  # a check-in always leaves its subject's visit open
        awards = self.points.evaluate(changes) + self.points.evaluate_open([visit], now)
        self._footfall_later += changes  # footfall counts a checked-in visitor like any other, at the next tick
        events = [e for ch in changes if (e := self.events.from_change(ch)) is not None]
        accepted = {
            "member": c.member,
            "visit_id": visit.visit_id,
            "source": visit.source,
            "zone": zone,
            "beacon": proof,
        }
        events.append(self.events.make("checkin.accepted", now, accepted))
        events += [self.events.from_award(a) for a in awards]
        self._checkin_events += events
        self._checkin_awards += awards
        day = self._days.day(visit.started)
        return {
            "visit_id": visit.visit_id,
            "source": visit.source,
            "beacon": proof,
            "awarded": [{"award_id": a.award_id, "rule": a.rule, "points": a.points} for a in awards],
            "points_visit": self.points.visit_points(visit.visit_id),
            "points_today": self.points.day_points(c.member, day),
        }

    def feed_uplink(self) -> None:
        """Hand the uplink what it has room for from the outbox (backlog first, committed events only),
        apply downlink commands that arrived, and publish `health` when it is due."""
        if self.uplink is None:
            return
        self.uplink.feed(self.store.sendable)
        if self.downlink is not None:
            self.downlink.apply_pending()
        mono = time.monotonic()
        if mono >= self._health_next:
            elapsed = max(1e-6, mono - self._health_last)
            acked = self.uplink.acknowledged
            store = self.store.diagnostics()
            data = {
                "uptime_s": round(mono - self._started, 1),
                "queue_depth": store["outbox_depth"],
                "adverts_per_s": round((self.adverts - self._health_adverts) / elapsed, 2),
                "publish_rate": round((acked - self._health_acked) / elapsed, 2),
                "outbox_dropped": store["outbox_dropped"],
                "disk_full": store["disk_full"],
                "last_error": self.uplink.last_error or store["last_error"],
            }
            ts = time.time()
            health = Event("health", uuid7(ts), ts, self.settings.store, self.settings.gateway, None, data)
            if self.uplink.publish_transient(health):
                self._health_last, self._health_adverts, self._health_acked = mono, self.adverts, acked
                self._health_next = mono + self.settings.mqtt.health_interval_s

    # ------------------------------------------------------------------ site survey (installer API)

    def _recorder(self) -> SurveyRecorder:
        if self.survey_recorder is None:
            raise SurveyRefused(
                404, "no survey tag is configured: set survey.transmitter to the tag's beacon id and restart"
            )
        return self.survey_recorder

    def survey_status(self) -> dict[str, Any]:
        """The spot recording now, the spots recorded (with the map's, when one is in use), the map in use."""
        rec = self._recorder()
        st = rec.status(self.now)
        plan = self.settings.plan
        running = st["running"]
        if running is not None:
            running = {**running, "zone": inside_zone(plan, running["x"], running["y"]) or ""}
        spots = [
            {"index": i, "x": sp.x, "y": sp.y, "zone": inside_zone(plan, sp.x, sp.y) or "", "packets": sp.packets()}
            for i, sp in enumerate(rec.spots())
        ]
        applied = None
        if self.survey_map is not None:
            applied = {"file": str(self.survey_path), "spots": len(self.survey_map.spots)}
        return {
            "transmitter": rec.transmitter,
            "running": running,
            "spots": spots,
            "applied": applied,
            "problem": self.survey_problem,
        }

    def survey_spot(self, x: float, y: float, seconds: float) -> dict[str, Any]:
        """Start recording the tag at (x, y) from the current data time."""
        rec = self._recorder()
        running = rec.status(self.now)["running"]
        if running is not None:
            raise SurveyRefused(
                409,
                f"the spot at ({running['x']:g}, {running['y']:g}) is still recording for "
                f"{running['seconds_left']:g} s: wait for it to end (then discard it if it went wrong)",
            )
        try:
            rec.start_spot(x, y, seconds, self.now)
        except SurveyError as e:
            raise SurveyRefused(422, str(e)) from None
        return self.survey_status()

    def survey_discard(self, index: int) -> dict[str, Any]:
        """Forget recorded spot `index`."""
        try:
            self._recorder().discard(index)
        except IndexError as e:
            raise SurveyRefused(404, str(e)) from None
        return self.survey_status()

    def survey_apply(self) -> dict[str, Any]:
        """Fit the map from every recorded spot, save it (atomically) and make the estimator use it at once."""
        rec = self._recorder()
        if rec.status(self.now)["running"] is not None:
            raise SurveyRefused(409, "a spot is still recording: wait for it to end, then apply")
        spots = rec.spots()
        if not spots:
            raise SurveyRefused(409, "no spots recorded: record spots with POST /api/v1/survey/spots first")
        if not isinstance(self.estimator, HmmEstimator):
            raise SurveyRefused(
                409, "the estimator is the baseline (estimate.method, or a plan without geometry): it uses no survey"
            )
        s = self.settings
        try:
            survey = SurveyMap(s.plan, spots, s.survey, s.estimate, rec.transmitter)
            used = {rx: int(v["spots_used"]) for rx, v in survey.summary()["receivers"].items()}
            if not any(used.values()):
                raise SurveyError(
                    f"no receiver heard the survey tag ({rec.transmitter}, survey.transmitter) at any of the "
                    f"{len(spots)} spot(s): check that this is the id the tag sends and that it is on, discard the "
                    "spots and record them again"
                )
            survey.save(self.survey_path)
        except (SurveyError, OSError) as e:
            raise SurveyRefused(409, f"survey not applied: {e}") from None
        self.estimator.use_survey(survey)
        self.survey_map, self.survey_problem = survey, None
        log.info("survey map of %d spot(s) saved to %s and in use", len(spots), self.survey_path)
        return {"file": str(self.survey_path), "spots": len(spots), "receivers": used}

    def explain_points(self, member: str, visit_id: str | None, limit: int) -> dict[str, Any]:
        """`visita points explain` answered while the gateway runs (it holds the data directory): the member's open
        visits, then its stored finished ones, newest first (only `visit_id` when given), judged by the rules in
        force with the ledger the engine holds (`ledger_since`: a visit older than that is "not judged again")."""
        subject = "member:" + member
        visits = sorted(
            (v for v in self.tracker.open_visits() if v.subject == subject), key=lambda v: v.started, reverse=True
        )
        visits += self.store.visits_of(subject, limit if visit_id is None else 1_000_000)
        if visit_id is not None:
            visits = [v for v in visits if v.visit_id == visit_id]
        out = explain_member(self.points, visits[:limit], member, self._days.tz)
        return {**out, "rules_source": self.rules_source, "tiers": "tiers from the member keys the gateway holds"}

    def visits(self, limit: int) -> list[Visit]:
        """Open visits (longest first) then finished ones (newest first), at most `limit`."""
        open_visits = sorted(self.tracker.open_visits(), key=lambda v: v.started)
        return (open_visits + list(self._recent))[:limit]

    def zone_occupancy(self) -> dict[str, int]:
        """Open visitor visits by the zone they are in now (staff excluded)."""
        counts = {z.id: 0 for z in self.settings.plan.zones if not z.outside}
        for v in self.tracker.open_visits():
            if v.classification == "visitor" and v.segments:
                counts[v.segments[-1].zone] = counts.get(v.segments[-1].zone, 0) + 1
        return counts

    def diagnostics(self) -> dict[str, Any]:
        """Every stage's diagnostics, for /api/v1/status and `visita doctor`."""
        return {
            "data_time": self.now,
            "ticks": self.ticks,
            "adverts": self.adverts,
            "source": self.source.diagnostics(),
            "decoder": self.decoder.diagnostics(),
            "identity": self.identifier.diagnostics(),
            "members": self.members.diagnostics(),
            "estimator": self.estimator.diagnostics(),
            "survey": {
                "file": str(self.survey_path),
                "in_use": self.survey_map is not None,
                "problem": self.survey_problem,
                "tag": self.survey_recorder is not None,
            },
            "visits": self.tracker.diagnostics(),
            **({"handover": self.linker.diagnostics()} if self.linker is not None else {}),
            "points": {**self.points.diagnostics(), "rules_source": self.rules_source},
            "checkins": self.checkins.diagnostics(),
            "store": self.store.diagnostics(),
            "uplink": self.uplink.diagnostics() if self.uplink else {"broker": "off"},
            "dashboard": {
                "https": self.dashboard_tls is not None,
                "certificate_until": self.dashboard_tls.not_after.isoformat() if self.dashboard_tls else None,
                "certificate_names": self.dashboard_tls.names if self.dashboard_tls else [],
            },
            **({"nodes": self.nodes.diagnostics()} if self.nodes is not None else {}),
            **({"clock": self._clock_state(self.data_clock)} if self.data_clock is not None else {}),
        }

    def _clock_state(self, clock: Clock) -> dict[str, Any]:
        """Whether data time is the system clock's (`live`), whether the kernel holds that synchronised, how often it
        was stepped forward while running and by how many seconds in all (the visits open then went on, the times the
        gateway held moved with the clock: `follow_clock`), and how many adverts and sightings dated before a step
        came in after it and were moved forward too."""
        return {
            "live": clock.live,
            "synchronised": clock_synchronised(),
            "steps": clock.steps,
            "stepped_s": clock.stepped_s,
            "redated": self.redated,
        }


class GcFreezer:
    """Keeps Python's full (generation 2) garbage collections off the request path: each walks every tracked
    object while the event loop waits, and with a day's state (member token tables, thousands of open visits,
    the outbox) one took 60-180 ms, several times a minute under check-in load: the tail of the check-in
    latency (docs/checkin.md). So the collector's own full collections are switched off; the runtime runs one
    every FULL_EVERY_S between ticks and freezes what survives (`gc.freeze`), so that the next one walks only
    what is newer. Young collections (generations 0 and 1) stay automatic.

    The price: a reference cycle that forms later among frozen objects is never reclaimed. Visita's state is
    plain records and dicts, freed by reference counting, not by the collector, so that is nothing in practice.
    """

    FULL_EVERY_S = 600.0

    def __init__(self) -> None:
        self._thresholds = gc.get_threshold()
        gc.collect()
        gc.freeze()  # start-up: modules, the member table, the store's indexes
        gc.set_threshold(self._thresholds[0], self._thresholds[1], 1 << 30)
        self._next = time.monotonic() + self.FULL_EVERY_S

    def tick(self) -> None:
        """A full collection when one is due, then freeze what it left alive."""
        if time.monotonic() >= self._next:
            gc.collect()
            gc.freeze()
            self._next = time.monotonic() + self.FULL_EVERY_S

    def close(self) -> None:
        """The collector's own thresholds again; what is frozen stays so until the process ends."""
        gc.set_threshold(*self._thresholds)


class CommitWriter:
    """Commits with the disk work on one writer thread, so the event loop never waits on an fsync.

    At most one commit is in flight; whatever the loop puts meanwhile goes into the next one, so under load
    one round of fsyncs serves many check-ins (group commit). A check-in waits for a commit that begins
    after it was applied; a tick does not wait. A failed commit fails the check-ins waiting for it (500)
    and is raised to the pipeline at its next tick.
    """

    def __init__(self, gw: Gateway) -> None:
        self._gw = gw
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="visita-writer")
        self._waiters: list[asyncio.Future[None]] = []
        self._wanted = False
        self._task: asyncio.Task[None] | None = None
        self._error: Exception | None = None

    def request(self) -> None:
        """A commit as soon as the writer is free; nobody waits for it."""
        self._wanted = True
        self._start()

    async def commit(self) -> None:
        """Return once everything put so far is on disk (or raise what kept it from it)."""
        done = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        self._start()
        await done

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._wanted or self._waiters:
                waiters, self._waiters, self._wanted = self._waiters, [], False
                try:
                    sync, pending = self._gw.begin_commit()
                    await loop.run_in_executor(self._pool, self._gw.write_commit, sync, pending)
                    self._gw.finish_commit(pending)
                except Exception as e:  # the store keeps what it could not write, for the next commit
                    self._error = e
                    for w in waiters:
                        if not w.done():
                            w.set_exception(e)
                    continue
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
        finally:
            self._task = None

    def raise_error(self) -> None:
        """Raise (once) the error of a commit that failed since the last call."""
        error, self._error = self._error, None
        if error is not None:
            raise error

    async def drain(self) -> None:
        """Wait until no commit is in flight or wanted."""
        while self._task is not None:
            await asyncio.shield(self._task)

    def close(self) -> None:
        """Stop the writer thread (after `drain`)."""
        self._pool.shutdown(wait=True)


class _QuietServer:
    """uvicorn's server without its own signal handling (the runtime owns SIGINT/SIGTERM)."""

    def __init__(self, app: Any, sock: socket.socket, tls: DashboardTls | None = None) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        self._sock = sock
        self.server = Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                ssl_certfile=tls.cert if tls else None,
                ssl_keyfile=tls.key if tls else None,
            )
        )

    async def serve(self) -> None:
        await self.server.serve(sockets=[self._sock])

    def stop(self) -> None:
        self.server.should_exit = True


def _start_serving(
    app: Callable[[], Any], sock: socket.socket | None, tls: DashboardTls | None
) -> tuple[asyncio.Event, _QuietServer | None, asyncio.Task[None] | None]:
    """SIGINT and SIGTERM set the returned event (the runtime's stop), and the dashboard serves `app()` on `sock`
    (none without a socket); `_stop_serving` undoes both."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = _QuietServer(app(), sock, tls) if sock is not None else None
    return stop, server, asyncio.create_task(server.serve()) if server else None


async def _stop_serving(server: _QuietServer | None, task: asyncio.Task[None] | None) -> None:
    """Stop what `_start_serving` started: the dashboard, then the signal handlers."""
    if server is not None and task is not None:
        server.stop()
        await task
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


TLS_RECHECK_S = 86_400.0
"""How often a running gateway looks again at its certificate's end (the start-up log says it first)."""


def recheck_certificate(listen: str, tls: DashboardTls) -> None:
    """Log what needs doing about the certificate the dashboard serves: its end near or past, or a file replaced
    since the start (the new one is served only after a restart)."""
    try:
        on_disk = load_tls((tls.cert, "dashboard.tls_cert_file"), None)
    except ValueError as e:
        on_disk = None
        log.warning("the dashboard's certificate cannot be read again (%s); it serves the one read at start", e)
    if on_disk is not None and on_disk.not_after != tls.not_after:
        log.warning(
            "%s was replaced since the start (the new certificate ends %s), but the dashboard serves the old one "
            "(ends %s) until the gateway restarts: systemctl restart visita",
            tls.cert,
            on_disk.not_after.date(),
            tls.not_after.date(),
        )
        return
    for level, message in serving_notes(listen, tls, []):
        if level >= logging.WARNING:
            log.log(level, "%s", message)


def bind(listen: str) -> socket.socket:
    """A listening socket for the dashboard; OSError names the address."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def _wait_for_clock(clock: Clock, wait_s: float) -> None:
    """Before a live run starts: a system clock not synchronised yet (a Pi just booted, on the time it saved at
    shutdown) is waited for up to `wait_s`, since until NTP steps it members' phones are not recognised, check-ins are
    refused and what is published carries the wrong time (the step itself is followed: `Gateway.follow_clock`). It
    goes on unsynchronised after that, and says so (a store without NTP must still run)."""
    if wait_s <= 0 or clock_synchronised() is not False:
        return
    log.warning(
        "the system clock is not synchronised (NTP) yet: waiting up to %.0f s for it (--clock-wait), since until it "
        "is, members' phones are not recognised, check-ins are refused and events carry the wrong time",
        wait_s,
    )
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait_s:
        await asyncio.sleep(1.0)
        if clock_synchronised():
            clock.restart()
            log.info("the system clock is synchronised (after %.0f s): starting", time.monotonic() - t0)
            return
    clock.restart()
    log.warning(
        "the system clock is still not synchronised after %.0f s: running on it as it is. If it is wrong, members' "
        "phones are not recognised and check-ins are refused; check `timedatectl` and the network's NTP "
        "(docs/install.md, Time)",
        wait_s,
    )


async def run(
    settings: Settings,
    opts: RunOptions,
    source: Source,
    clock: Clock,
    members: MemberDirectory,
    staff: list[str],
    banner: list[str],
    nodes: NodesSource | None = None,
) -> int:
    """Run until stopped (signal or `until_s`); returns the process exit code.

    `nodes`: remote receivers (sensors/nodes.py) heard alongside `source`.
    """
    from dashboard.app import create_app

    if clock.live:
        await _wait_for_clock(clock, opts.clock_wait_s)
    data_dir = settings.storage.directory(opts.data_dir)
    mqtt_url = opts.mqtt or settings.mqtt.url
    listen = opts.dashboard or settings.dashboard.listen
    store = Store(
        data_dir,
        outbox_max=settings.storage.outbox_max,
        full_disk_outbox_max=settings.storage.full_disk_outbox_max,
    )
    held = (store.kept() or {}).get("data_until")
    if clock.live and isinstance(held, (int, float)) and held - clock.now() > BEHIND_LAST_RUN_S:
        log.warning(
            "the system clock says %s, but this gateway wrote data up to %s before it stopped: the clock looks %.0f s "
            "behind. While it is wrong, members' phones are not recognised (their tokens follow the right time), "
            "app check-ins are refused as stale and what is published carries the wrong time (when NTP steps it right, "
            "the visits open then go on). Check `timedatectl` and the network's NTP (docs/install.md, Time)",
            datetime.fromtimestamp(clock.now(), UTC).isoformat(timespec="seconds"),
            datetime.fromtimestamp(held, UTC).isoformat(timespec="seconds"),
            held - clock.now(),
        )
    if opts.recorded and isinstance(held, (int, float)) and clock.start < held:
        store.close()
        at = datetime.fromtimestamp
        raise StartupError(
            f"{data_dir} already holds data up to {at(held, UTC).isoformat(timespec='seconds')}, and this recording "
            f"starts at {at(clock.start, UTC).isoformat(timespec='seconds')}: replaying it there again would publish "
            "its visits and footfall a second time. Give another --data-dir (or none: a temporary one)"
        )
    rules_file = settings.points.rules_path()
    try:  # the backend's rules (cmd/rules) if it sent any, else the rules file's; read once the directory is ours
        rules, rules_source = rules_in_force(rules_file, data_dir)
    except BackendRulesDamaged as e:
        # Not a reason to stay down (systemd would restart it forever, and the backend could not send new rules):
        # the rules file applies, the damaged copy is kept aside, and the log and the status say so.
        aside = e.path.with_name(e.path.name + ".damaged")
        try:
            rules, file_source = rules_from_file(rules_file)
            e.path.replace(aside)
        except (ConfigError, OSError) as then:
            store.close()
            why = (
                "; ".join(then.problems) if isinstance(then, ConfigError) else f"cannot move it aside: {then.strerror}"
            )
            raise StartupError(f"{'; '.join(e.problems)}; and {why}") from None
        rules_source = (
            f"{file_source}, because the backend's kept rules could not be used ({e.problems[0]}); moved to {aside}; "
            "the backend's next cmd/rules replaces them"
        )
        log.error("points rules: %s", rules_source)
    except ConfigError:
        store.close()
        raise  # a config problem (exit 2: systemd does not restart for it), not the machine's
    try:
        loaded = load_into(members, data_dir)  # the encrypted member keys (docs/checkin.md)
    except KeyStoreError as e:
        store.close()
        raise StartupError(str(e)) from None
    dead = dead_rule_problems(rules, [z.id for z in settings.plan.zones], rules_source)
    if dead and (data_dir / BACKEND_RULES_FILE).exists():
        # Accepted when the backend sent them (for another plan, or by an older version): they stay in force until it
        # sends others, and the rules that cannot award anything are said.
        log.warning("points rules: %s", "; ".join(dead))
    elif dead:
        store.close()
        raise ConfigError(dead)
    try:
        gw = Gateway(settings, store, source, members, rules, staff)
    except ValueError as e:  # the store secret file (identity.anon_secret_file)
        store.close()
        raise ConfigError([str(e)]) from None
    gw.rules_source = rules_source
    log.info("points rules: %s (%d rules)", rules_source, len(rules.rules))
    try:
        gw.installer_token = settings.dashboard.installer_token()
        gw.support_token = settings.dashboard.support_token()
        gw.dashboard_tls = tls = settings.dashboard.tls() if listen != "off" else None
    except ValueError as e:
        store.close()
        raise ConfigError([str(e)]) from None
    gw.member_keys = MemberKeys(members, KeyVault(data_dir))
    gw.nodes = nodes
    gw.writer = writer = CommitWriter(gw)
    if clock.step_s is None:  # a replay's clock moves on each reading: check-ins then use the last tick's time
        gw.clock = clock.now
        gw.data_clock = clock

    try:
        sock = bind(listen) if listen != "off" else None
    except OSError as e:
        store.close()
        raise StartupError(
            f"dashboard cannot listen on {listen}: {e.strerror}; pass --dashboard HOST:PORT or --dashboard off"
        ) from None
    lines = [*banner]
    if sock is not None:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        lines.append(f"  dashboard  {'https' if tls else 'http'}://{shown}:{port}/")
        roles = [r for r, t in (("installer", gw.installer_token), ("support", gw.support_token)) if t is not None]
        for level, message in serving_notes(listen, tls, roles):
            log.log(level, "%s", message)
    else:
        lines.append("  dashboard  off")
    if mqtt_url != "off":
        url = parse_mqtt_url(mqtt_url)
        client_id = settings.mqtt.client_id or f"visita-{settings.store}-{settings.gateway}"
        try:
            password = settings.mqtt.secrets()
        except ValueError as e:
            store.close()
            if sock is not None:
                sock.close()
            raise ConfigError([str(e)]) from None
        gw.uplink = Uplink(settings.mqtt, url, client_id, gw.status_event, password)
        gw.downlink = Downlink(gw, gw.uplink.reply)
        lines.append(f"  mqtt       {url}  topics {topic_prefix(settings.store, settings.gateway)}#")
    else:
        lines.append("  mqtt       off (events are kept in the outbox)")
    lines.append(f"  data       {data_dir}" + (f" · {loaded:,} member key(s) from the vault" if loaded else ""))
    lines.append("Ctrl-C stops; queued events are flushed first.")
    print("\n".join(lines), flush=True)

    stop, server, server_task = _start_serving(lambda: create_app(gw), sock, tls)
    pending = store.pending_events()
    if gw.uplink is not None:
        if pending:
            log.info("%d event(s) from an earlier run are waiting in the outbox", len(pending))
        gw.uplink.start(gw.downlink.receive if gw.downlink is not None else None)
    await source.start()
    if nodes is not None:
        await nodes.start()
    end = clock.start + opts.until_s if opts.until_s is not None else None
    code = 0
    systemd = Notifier()
    systemd.ready(f"running; dashboard {listen}, mqtt {mqtt_url}")
    freezer = GcFreezer()
    tls_check = time.monotonic() + TLS_RECHECK_S
    started, slow = time.monotonic(), False
    try:
        gw.resume(clock.start)  # the visits open before a restart (a check-in that comes first takes them up itself)
        while not stop.is_set():
            now = clock.now()
            gw.follow_clock()  # a step of the system clock (this reading's or another thread's): no time passed
            done = gw.now or clock.start  # as far as the pipeline got
            if now - done > max(2 * CATCH_UP_S, clock.speed * HOLD_BACK_S) and clock.hold_back(done + CATCH_UP_S):
                now = done + CATCH_UP_S  # a simulation faster than this machine: as fast as it can, no backlog
                ran = time.monotonic() - started
                if not slow and ran > SLOW_AFTER_S and done - clock.start < SLOW_SHARE * clock.speed * ran:
                    slow = True
                    log.warning(
                        "the simulation cannot run at --speed %g on this machine: it runs as fast as the pipeline "
                        "can (about %.0fx so far)",
                        clock.speed,
                        (done - clock.start) / ran,
                    )
            final = end is not None and now >= end
            now = min(now, end) if end is not None else now
            # Behind (a live gateway whose process was suspended or machine overloaded): catch up in slices of data
            # time and serve the dashboard and check-ins between them. The pipeline's result does not depend on how
            # data time is sliced. (A step of the system clock is not behind: `follow_clock` moved the pipeline on.)
            while now - (gw.now or clock.start) > CATCH_UP_S and not stop.is_set():
                gw.step((gw.now or clock.start) + CATCH_UP_S)
                await asyncio.sleep(0)
            if stop.is_set():
                break  # stopped while catching up: not the whole backlog in one step
            gw.step(now)
            freezer.tick()
            systemd.alive()
            if tls is not None and time.monotonic() >= tls_check:  # a gateway runs for months: say it again daily
                tls_check = time.monotonic() + TLS_RECHECK_S
                recheck_certificate(listen, tls)
            if final:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), opts.tick_s)
        # Stored and queued before the outbox is flushed below. Stopped by a signal, a restart will follow (members'
        # visits are kept for it, unless visits.resume_within_s is 0). Stopped before the first tick: the start's time.
        keep = stop.is_set() and settings.visits.resume_within_s > 0
        gw.end_visits(gw.now or gw.tracker.now or clock.start, restart=keep)
        await writer.drain()
        writer.raise_error()
    except Exception:
        log.exception("pipeline failed")
        code = 1
    finally:
        systemd.stopping()
        with contextlib.suppress(Exception):
            await writer.drain()  # from here on the store is used from this thread alone
        writer.close()
        gw.writer = None
        freezer.close()
        await source.stop()
        if nodes is not None:
            await nodes.stop()
        if gw.uplink is not None:
            flush_end = time.monotonic() + opts.flush_timeout_s
            # Send what the outbox still holds (a backlog too), within the flush timeout.
            while gw.uplink.connected and store.diagnostics()["outbox_depth"] and time.monotonic() < flush_end:
                store.ack_events(gw.uplink.take_acks())
                gw.uplink.feed(store.sendable)
                await asyncio.sleep(0.005)
            await asyncio.to_thread(gw.uplink.stop, max(0.0, flush_end - time.monotonic()))
            store.ack_events(gw.uplink.take_acks())
        queued, lost = store.close()  # events a full disk kept from being written are lost with the process
        gw.checkins.close()
        await _stop_serving(server, server_task)
        snap = gw.footfall.snapshot()
        print(
            f"stopped: last event seq {gw.events.last_seq}, {queued} still queued in the outbox"
            + (
                (" (discarded with the temporary data directory; pass --data-dir to keep them)")
                if queued and opts.temporary_data
                else (" (sent at next start)" if queued else "")
            )
            + (f", {lost} not written (disk full) and lost" if lost else "")
            + f"; today {snap['visitors_today']} visits, {snap['passbys_today']} pass-bys",
            flush=True,
        )
    return code


async def run_relay(
    settings: Settings,
    opts: RunOptions,
    source: Source,
    clock: Clock,
    members: MemberDirectory,
    banner: list[str],
) -> int:
    """`visita run --relay`: source → decode → identify → sighting batches on the store's broker (gateway/relay.py),
    with the retained status (role "relay"), the ``members`` downlink command and, if on, a dashboard serving
    /healthz and /api/v1/status. No store, estimator, visits, points or outbox. Runs until stopped (a signal or
    `until_s`); returns the process exit code."""
    import os

    from dashboard.app import create_relay_app
    from gateway.downlink import members_command
    from gateway.relay import BatchPublisher, Relay
    from gateway.store import lock_data_dir

    mqtt_url = opts.mqtt or settings.mqtt.url
    if mqtt_url == "off":
        raise ConfigError(["--relay publishes to the store's broker: give it (--mqtt URL or mqtt.url), not off"])
    try:
        secret = settings.identity.anon_secret()
        password = settings.mqtt.secrets()
        tls = settings.dashboard.tls() if (opts.dashboard or settings.dashboard.listen) != "off" else None
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    if clock.live:
        await _wait_for_clock(clock, opts.clock_wait_s)
    data_dir = settings.storage.directory(opts.data_dir)
    lock = lock_data_dir(data_dir)  # the member keys' vault is the directory's, as a gateway's
    sock: socket.socket | None = None
    try:
        try:
            loaded = load_into(members, data_dir)
        except KeyStoreError as e:
            raise StartupError(str(e)) from None
        days = LocalDays(settings.timezone)
        identifier = Identifier(
            members,
            days,
            beacons=BeaconRegistry(settings.plan.beacons),
            carry_s=settings.visits.absence_timeout_s,
            day_salt=store_day_salt(secret, settings.store) if secret is not None else None,
        )
        events = EventFactory(settings.store, settings.gateway, 0)
        url = parse_mqtt_url(mqtt_url)
        client_id = settings.mqtt.client_id or f"visita-{settings.store}-{settings.gateway}"

        def status(online: bool) -> Event:
            return events.status(time.time(), online, __version__, role="relay")

        uplink = Uplink(settings.mqtt, url, client_id, status, password, outbox=False)
        publisher = BatchPublisher(
            settings.gateway,
            lambda payload: uplink.publish_live("sightings", payload),
            secret_id(secret) if secret is not None else None,
        )
        relay = Relay(settings.store, settings.gateway, __version__, source, members, identifier, publisher)
        relay.uplink = uplink
        relay.member_keys = MemberKeys(members, KeyVault(data_dir))
        relay.downlink = downlink = Downlink(relay, uplink.reply, {"members": members_command})
        relay.clock_state = lambda: {"live": clock.live, "synchronised": clock_synchronised(), "steps": clock.steps}
        listen = opts.dashboard or settings.dashboard.listen
        try:
            sock = bind(listen) if listen != "off" else None
        except OSError as e:
            raise StartupError(
                f"dashboard cannot listen on {listen}: {e.strerror}; pass --dashboard HOST:PORT or --dashboard off"
            ) from None
        if secret is None:
            log.warning(
                "relay without a store secret (identity.anon_secret_file): an anonymous phone that this relay and the "
                "main gateway both hear is two subjects there, counted twice in footfall; copy the main gateway's "
                "secret file here (docs/nodes.md)"
            )
        lines = [*banner]
        lines.append(
            f"  relay      sighting batches every {publisher.interval_s:g} s to {url} "
            f"{topic_prefix(settings.store, settings.gateway)}sightings (no visits, points or outbox here)"
        )
        lines.append(
            "  identity   anonymous subjects "
            + (
                "with the store secret's salt (fused with the store's other gateways)"
                if secret
                else "NOT fused: no store secret"
            )
            + f" · {len(members):,} member key(s)"
            + (" from the vault" if loaded else "")
        )
        if sock is not None:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            lines.append(f"  dashboard  {'https' if tls else 'http'}://{shown}:{port}/api/v1/status (status only)")
        else:
            lines.append("  dashboard  off")
        lines.append("Ctrl-C stops.")
        print("\n".join(lines), flush=True)

        stop, server, server_task = _start_serving(lambda: create_relay_app(relay), sock, tls)
        uplink.start(downlink.receive)
        await source.start()
        end = clock.start + opts.until_s if opts.until_s is not None else None
        code = 0
        systemd = Notifier()
        systemd.ready(f"relaying; mqtt {url}")
        try:
            while not stop.is_set():
                now = clock.now()
                for st in clock.take_steps():
                    relay.shift(st.by)
                final = end is not None and now >= end
                relay.step(min(now, end) if end is not None else now)
                systemd.alive()
                if final:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), opts.tick_s)
            publisher.flush(relay.now, force=True)  # what the last tick heard
        except Exception:
            log.exception("relay failed")
            code = 1
        finally:
            systemd.stopping()
            await source.stop()
            await asyncio.to_thread(uplink.stop, min(opts.flush_timeout_s, 2.0))  # the "offline" status
            await _stop_serving(server, server_task)
            c = publisher.counts
            print(
                f"stopped: {c['batches']} batch(es), {c['sightings']} sighting(s) published; "
                f"{c['dropped_sightings']} sighting(s) dropped while the broker was away",
                flush=True,
            )
        return code
    finally:
        if sock is not None:
            sock.close()
        os.close(lock)
