"""A live gateway's system clock stepped forward while it runs (gateway/runtime.py, `Clock.now`, `Gateway.shift`):
the visits open go on, the jump is neither absence nor dwell, and footfall publishes no minute of it.

The end-to-end test runs the real runtime (`gateway.runtime.run`) on a faked system clock that is hours behind and is
stepped right in the middle of the run, over the simulated store heard by a radio that stamps what it hears with the
gateway's data clock, as `sensors/ble.py` does; and compares what it stored with the same store run with no step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

import gateway.runtime as rt
from firmware_sim.scenario import load_scenario
from firmware_sim.world import World
from gateway.config import Settings
from gateway.days import LocalDays
from gateway.identity import MemberDirectory
from gateway.model import Advert, Sighting, Visit
from gateway.points import load_rules
from gateway.runtime import Clock, ClockStep, Gateway
from gateway.store import Store
from sensors.checkins import sign
from sensors.nodes import NodesOptions, NodesSource
from sensors.sim import SimSource

NOW = 1_780_000_000.0
NEARBY = {0x004C: bytes([0x10, 0x05, 0x01, 0x18, 0x00, 0x00, 0x00])}  # Apple Nearby Info: an anonymous phone
KEY = bytes(range(32))


class Heard:
    """A source that hands over what the test queues (a radio's buffer)."""

    name = "heard"

    def __init__(self) -> None:
        self.queue: list[Advert] = []

    async def start(self) -> None:
        pass

    def poll(self, now: float) -> list[Advert]:
        out = [a for a in self.queue if a.ts <= now]
        self.queue = [a for a in self.queue if a.ts > now]
        return out

    async def stop(self) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {}


class WallClock:
    """Stands in for the `time` module inside gateway.runtime: a system clock `behind` seconds slow until `step_at`
    seconds after the start, then right; both it and the monotonic clock run `speed` times faster than real time."""

    def __init__(self, right: float, behind: float, step_at: float, speed: float) -> None:
        self.right, self.behind, self.step_at, self.speed = right, behind, step_at, speed
        self._real0 = time.monotonic()

    def _elapsed(self) -> float:
        return (time.monotonic() - self._real0) * self.speed

    def monotonic(self) -> float:
        return 1000.0 + self._elapsed()

    def time(self) -> float:
        e = self._elapsed()
        return self.right + e - (self.behind if e < self.step_at else 0.0)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class SteppedRadio:
    """The simulated store heard by a radio that stamps each advert with the gateway's data clock when it hears it
    (as sensors/ble.py does): `behind` seconds early until the true time `step`, right from then on. What it heard
    before the step and hands over after it keeps its early stamp, as a radio's buffer does."""

    name = "stepped-radio"

    def __init__(self, world: World, step: float, behind: float) -> None:
        self.world, self.step, self.behind = world, step, behind

    async def start(self) -> None:
        pass

    def poll(self, now: float) -> list[Advert]:
        true_now = now if now >= self.step - self.behind / 2 else now + self.behind
        return [a if a.ts >= self.step else Advert(a.ts - self.behind, *_rest(a)) for a in self.world.advance(true_now)]

    async def stop(self) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {"source": self.name}


def _rest(a: Advert) -> tuple[Any, ...]:
    return (a.receiver, a.address, a.address_random, a.rssi, a.tx_power, a.manufacturer_data, a.service_data,
            a.service_uuids, a.local_name)  # fmt: skip


def _gateway(data: Path, source: Any, members: MemberDirectory | None = None) -> Gateway:
    return Gateway(Settings(), Store(data), source, members or MemberDirectory(), load_rules(None), [])


def _fake_wall(monkeypatch: pytest.MonkeyPatch, start: float) -> list[float]:
    wall, mono = [start], [50.0]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    monkeypatch.setattr(time, "monotonic", lambda: mono[0])
    return wall


# --------------------------------------------------------------------------- the gateway's part


def test_adverts_stamped_before_a_step_that_come_in_after_it_are_moved_forward_by_it(tmp_path: Path) -> None:
    heard = Heard()
    gw = _gateway(tmp_path / "data", heard)
    phone = [Advert(NOW + t / 4, "rx-entrance", "C0:FF:EE:00:00:01", True, -60, None, NEARBY) for t in range(40)]
    heard.queue += phone[:20]
    gw.step(NOW + 5.1)
    by = 3600.0
    gw.shift(ClockStep(NOW + 5.1 + by, by))
    # The radio still held one advert it stamped before the step; the rest it stamps after it.
    heard.queue += [Advert(NOW + 5.05, *_rest(phone[20]))] + [Advert(a.ts + by, *_rest(a)) for a in phone[21:]]
    gw.step(NOW + by + 12.0)
    assert gw.redated == 1 and gw.estimator.diagnostics()["late_sightings"] == 0
    gw.step(NOW + 5.1 + by + rt.REDATE_S)
    heard.queue += [Advert(NOW + 5.3, *_rest(phone[0]))]  # a minute after the step: late, as without one
    gw.step(NOW + 5.1 + by + rt.REDATE_S + 1)
    assert gw.redated == 1 and gw.estimator.diagnostics()["late_sightings"] == 1
    gw.store.close()


def test_a_remote_reading_stamped_before_a_step_across_midnight_is_the_same_phone_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A node's report arrives at 23:59:50 by the wrong clock and waits in the buffer while NTP steps the clock 2 h
    # forward, past midnight: taken after the step, it is dated and hashed on the day it was really heard, so it is
    # the same subject as the phone's next report, and as its report before it.
    gw = _gateway(tmp_path / "data", Heard())
    midnight = LocalDays(gw.settings.timezone).bounds(NOW)[1]
    stamp = [midnight - 60.0]
    gw.nodes = NodesSource(NodesOptions(store="demo-store", gateway="gw-1", rooms={"entrance": "rx-entrance"}),
                           lambda: stamp[0])  # fmt: skip
    heard: list[Sighting] = []
    update = gw.estimator.update
    monkeypatch.setattr(gw.estimator, "update", lambda s, now: heard.extend(s) or update(s, now))

    def report() -> None:
        assert gw.nodes is not None
        gw.nodes.receive("espresense/devices/apple:1005:9-26/entrance", b'{"mac": "c0ffee123456", "rssi": -70}')

    report()
    gw.step(midnight - 59.0)
    stamp[0] = midnight - 10.0
    report()
    by = 7200.0
    gw.shift(ClockStep(midnight - 9.0 + by, by))
    stamp[0] = midnight - 8.0 + by
    report()
    gw.step(midnight - 7.0 + by)
    assert [s.ts for s in heard] == [midnight - 60.0, midnight - 10.0 + by, midnight - 8.0 + by]
    assert len({s.subject for s in heard}) == 1 and gw.redated == 1
    gw.store.close()


def test_a_check_in_that_reads_the_stepped_clock_first_joins_the_members_visit_moved_by_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check-in's reading of the clock is the one that sees the step: the pipeline's times move before the
    # check-in joins the visit, so it is one visit, started an hour later than the wrong clock said, not stretched.
    wall = _fake_wall(monkeypatch, NOW)
    clock = Clock()
    members = MemberDirectory()
    members.set_members({"m-1": KEY})
    gw = _gateway(tmp_path / "data", Heard(), members)
    gw.clock, gw.data_clock = clock.now, clock

    def check_in(ts: float) -> dict[str, Any]:
        obj: dict[str, Any] = {"member": "m-1", "store": "demo-store", "ts": int(ts), "nonce": f"{int(ts):032x}"}
        obj["sig"] = sign(KEY, obj)
        return gw.checkin(json.dumps(obj).encode())

    first = check_in(NOW)
    gw.step(clock.now())
    wall[0] += 3600
    second = check_in(wall[0])
    assert second["visit_id"] == first["visit_id"] and clock.steps == 1 and clock.take_steps() == []
    (v,) = gw.tracker.open_visits()
    assert v.started == NOW + 3600 and v.dwell_s == 0
    kinds = Counter(e.type for e in gw.store.pending_events())
    assert kinds["visit.started"] == 1 and kinds["checkin.accepted"] == 2
    assert gw.diagnostics()["clock"] == {
        "live": True,
        "synchronised": rt.clock_synchronised(),
        "steps": 1,
        "stepped_s": 3600.0,
        "redated": 0,
    }
    gw.store.close()


# --------------------------------------------------------------------------- end to end


BEHIND_S = 10 * 3600.0
"""The system clock is 10 h slow (a Pi that booted at 08:00 on yesterday evening's saved time, 22:00) ..."""
STEP_AT_S = 240.0
"""... until NTP steps it right 4 minutes into the run ..."""
RUN_S = 480.0
"""... which goes on 4 minutes more."""
SPEED = 30.0


def _baseline(data: Path, world: World, end: float) -> list[Visit]:
    """The same store with no step: the pipeline stepped by hand, second by second, to `end`."""
    gw = _gateway(data, SimSource(world))
    t = world.start_ts
    while t < end:
        t = min(end, t + 1.0)
        gw.step(t)
    gw.end_visits(end)
    visits = gw.store.recent_visits(10_000)
    gw.store.close()
    return visits


def _key(v: Visit, t0: float) -> tuple[Any, ...]:
    assert v.ended is not None
    return round(v.started - t0, 3), round(v.ended - t0, 3), round(v.dwell_s, 3), v.classification, v.path


def test_a_live_run_whose_clock_is_stepped_forward_while_phones_are_heard_goes_on_as_if_it_had_been_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    scenario = load_scenario("default")  # 08:00 UTC: the store opens, shoppers come and go
    wall = WallClock(scenario.start_ts(), BEHIND_S, STEP_AT_S, SPEED)
    monkeypatch.setattr(rt, "time", wall)
    clock = Clock()
    assert clock.live
    world = World(scenario, 1, clock.start + BEHIND_S)
    true_step = world.start_ts + STEP_AT_S
    opts = rt.RunOptions(
        data_dir=tmp_path / "data", mqtt="off", dashboard="off", until_s=BEHIND_S + RUN_S, tick_s=0.05, clock_wait_s=0
    )
    with caplog.at_level(logging.INFO, logger="visita.runtime"):
        code = asyncio.run(rt.run(Settings(), opts, SteppedRadio(world, true_step, BEHIND_S), clock, MemberDirectory(),
                                  world.staff_refs, []))  # fmt: skip
    monkeypatch.undo()
    assert code == 0 and clock.steps == 1 and "stepped forward by 36000 s" in caplog.text
    with Store(tmp_path / "data") as store:
        events = store.pending_events()
        visits = store.recent_visits(10_000)
    t0 = world.start_ts

    # One visit per shopper: the visits open at the step neither ended there nor were stretched over the 10 hours;
    # each is dated by the right clock, and is what the same store gives with no step at all.
    across = [v for v in visits if v.classification == "visitor" and v.started < true_step < (v.ended or 0)]
    assert len(across) >= 4, "shoppers were inside at the step"
    assert all(v.dwell_s <= (v.ended or 0) - v.started <= RUN_S for v in visits)
    end = clock.start - BEHIND_S + BEHIND_S + RUN_S  # `until`, on the clock after the step
    baseline = _baseline(tmp_path / "baseline", World(scenario, 1, clock.start), end)
    assert sorted(_key(v, t0) for v in visits) == sorted(_key(v, t0) for v in baseline)

    # The event stream: gapless, each visit started and ended once.
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    started = Counter(e.data["visit_id"] for e in events if e.type == "visit.started")
    ended = Counter(e.data["visit_id"] for e in events if e.type == "visit.ended")
    assert set(started.values()) == set(ended.values()) == {1} and started.keys() == ended.keys()
    # Footfall: a minute a minute, none for the 10 hours of the jump: the minutes before the step went out on the
    # wrong clock (as published, they stay), the minute in progress then goes on as the right one's.
    minutes = [e.data["minute"] for e in events if e.type == "footfall.minute"]
    assert len(minutes) == RUN_S / 60
    before = [m for m in minutes if m < true_step - BEHIND_S]
    after = [m for m in minutes if m >= true_step - 60]
    assert len(before) + len(after) == len(minutes) and len(before) == STEP_AT_S / 60 - 1
    assert all(b - a == 60 for part in (before, after) for a, b in pairwise(part))
    assert clock.stepped_s == BEHIND_S and "moved forward by 36000 s" in caplog.text


# --------------------------------------------------------------------------- who sees the step, and when


@pytest.mark.parametrize("seen_by", ["another thread", "a check-in"])
def test_a_tick_with_a_time_read_before_a_step_something_else_saw_does_not_send_data_time_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seen_by: str
) -> None:
    # The runtime reads the clock for a tick; before the tick runs, NTP steps the clock and something else reads it
    # first: paho's thread (a remote receiver's reading), a radio's callback or a check-in in a catch-up's await.
    # The pipeline moves on by the step (`follow_clock`, by the tick itself or by the check-in), and the tick's time,
    # read before the step, must not take data time back by as much: else the next tick "catches up" over the whole
    # jump, CATCH_UP_S at a time (720 ticks for an hour), with the dashboard an hour behind meanwhile.
    wall = _fake_wall(monkeypatch, NOW)
    clock = Clock()
    members = MemberDirectory()
    members.set_members({"m-1": KEY})
    gw = _gateway(tmp_path / "data", Heard(), members)
    gw.clock, gw.data_clock = clock.now, clock
    gw.step(clock.now())
    now = clock.now()  # the runtime's reading for the next tick
    wall[0] += 3600
    if seen_by == "a check-in":
        obj: dict[str, Any] = {"member": "m-1", "store": "demo-store", "ts": int(wall[0]), "nonce": "ab" * 16}
        obj["sig"] = sign(KEY, obj)
        gw.checkin(json.dumps(obj).encode())
    else:
        clock.now()
    gw.step(now)
    assert clock.steps == 1 and gw.now == NOW + 3600
    assert clock.now() - gw.now <= rt.CATCH_UP_S, "nothing to catch up: the step is not time passing"
    gw.store.close()


def test_a_simulation_on_the_system_clock_takes_no_step_for_the_gateway_to_follow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `visita run --sim` at its default --speed 1 runs on the system clock too. A step of it (a laptop's NTP) is time
    # passing for the simulated store, which plays through it: the gateway moves nothing, or the world's visits and
    # the gateway's would no longer be the same people at the same times. Only a live clock's steps are followed.
    wall = _fake_wall(monkeypatch, NOW)
    clock = Clock(simulation=True)
    assert not clock.live
    gw = _gateway(tmp_path / "data", Heard())
    gw.clock, gw.data_clock = clock.now, clock
    gw.step(clock.now())
    wall[0] += 3600
    assert clock.now() == NOW + 3600 and clock.steps == 1, "data time follows the system clock still"
    assert gw.follow_clock() == [] and gw.now == NOW
    gw.store.close()


def test_a_step_the_clock_took_before_the_open_visits_were_taken_up_moves_none_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `run` reads the clock at start (is it behind the data directory?), before the gateway takes up the visits open
    # before the restart (`resume`, at the clock's start). A step seen then is already in that start: taking the
    # visits up at it and then moving them by the step put the tracker's time an hour ahead, and with it the time
    # the kept visits are said to be as of (a restart within the hour would end the members' visits it should resume).
    wall = _fake_wall(monkeypatch, NOW)
    members = MemberDirectory()
    members.set_members({"m-1": KEY})
    gw = _gateway(tmp_path / "data", Heard(), members)
    obj: dict[str, Any] = {"member": "m-1", "store": "demo-store", "ts": int(NOW), "nonce": "cd" * 16}
    obj["sig"] = sign(KEY, obj)
    gw.clock = lambda: NOW
    visit_id = gw.checkin(json.dumps(obj).encode())["visit_id"]
    gw.end_visits(NOW + 10, restart=True)
    gw.store.close()
    wall[0] = NOW + 20 - 3600  # restarted 10 s later on a clock an hour slow ...
    clock = Clock()
    wall[0] += 3600  # ... which NTP steps right as `run` first reads it
    clock.now()
    gw = _gateway(tmp_path / "data", Heard(), members)
    gw.clock, gw.data_clock = clock.now, clock
    gw.resume(clock.start)
    gw.step(clock.now())
    assert clock.start == NOW + 20 and gw.tracker.now == NOW + 20
    assert gw._kept_state()["visits_as_of"] == NOW + 20
    (v,) = gw.tracker.open_visits()
    assert v.visit_id == visit_id and v.started == NOW, "taken up as it was: dated by the run before's clock"
    gw.store.close()
