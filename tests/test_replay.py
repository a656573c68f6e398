"""The advert log and sensors/replay.py: exact round trips, damaged files, `visita sim` → `visita replay`."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import VISITA

from firmware_sim.advlog import AdvertLog, Content, LogError, LogWriter, decode_content, encode_content
from firmware_sim.record import LOG_NAME, TRUTH_NAME, record
from firmware_sim.scenario import load_scenario
from firmware_sim.truth import read_truth
from firmware_sim.world import World
from gateway.model import Advert
from gateway.runtime import Clock, ClockStep
from gateway.store import Store
from sensors.replay import ReplaySource

NOON = "2025-03-03T12:00:00"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, float]:
    """20 minutes of the demo store (seed 5), recorded: (log, start, end)."""
    s = load_scenario("default")
    out = tmp_path_factory.mktemp("rec")
    rec = record(s, 5, s.start_ts(), 1200, out)
    assert rec.log is not None
    return rec.log, s.start_ts(), s.start_ts() + 1200


def replay_all(path: Path, steps: list[float]) -> list[Advert]:
    src = ReplaySource(path)
    asyncio.run(src.start())
    out: list[Advert] = []
    for now in steps:
        got = src.poll(now)
        assert all(a.ts <= now for a in got)
        out += got
    asyncio.run(src.stop())
    return out


def test_replay_gives_back_exactly_what_the_world_heard(recorded: tuple[Path, float, float]) -> None:
    log, start, end = recorded
    world = World(load_scenario("default"), 5, start).advance(end)
    steps = [start + 7.3 * k for k in range(1, int((end - start) / 7.3) + 2)]
    replayed = replay_all(log, steps)
    assert len(replayed) == len(world) > 100_000
    assert replayed == world


def test_the_log_is_compact_and_self_describing(recorded: tuple[Path, float, float]) -> None:
    log, start, end = recorded
    with AdvertLog(log) as f:
        h = f.header
        n = sum(len(c) for c in f.chunks())
        assert f.complete
    assert (h["format"], h["version"], h["scenario"], h["seed"]) == ("visita-advert-log", 1, "default", 5)
    assert (h["start"], h["end"], h["start_ms"]) == (start, end, round(start * 1000))
    assert h["receivers"] == [r.id for r in load_scenario("default").receivers]
    assert h["scenario_data"]["name"] == "default"
    assert log.stat().st_size / n < 6, "under 6 bytes per advert"
    with gzip.open(log) as f:
        first = f.readline()
    assert json.loads(first)["format"] == "visita-advert-log", "the first line is plain JSON once unzipped"


@pytest.mark.parametrize(
    "content",
    [
        Content(),
        Content({0x004C: b"\x02\x15" + bytes(21), 0xFFFF: b"V"}, {"0000feaa-0000-1000-8000-00805f9b34fb": b"\x20"}),
        Content({}, {}, ("0000180f-0000-1000-8000-00805f9b34fb",), "Beacon ✓", -4),
    ],
)
def test_payload_entries_round_trip(content: Content) -> None:
    assert decode_content(encode_content(content)) == content


def test_payload_entries_refuse_garbage() -> None:
    for raw in (b"", b"\x01", b"\x01\x01\x4c\x00\x05ab", b"\x01\x09", b"\x00\x00"):
        with pytest.raises(ValueError):
            decode_content(raw)


def test_damaged_logs_say_what_is_wrong(tmp_path: Path, recorded: tuple[Path, float, float]) -> None:
    log, _, end = recorded
    raw = gzip.decompress(log.read_bytes())
    cut = tmp_path / "cut.vlog.gz"
    cut.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    src = ReplaySource(cut)
    asyncio.run(src.start())
    got = src.poll(end)
    asyncio.run(src.stop())
    assert len(got) > 0 and src.finished
    assert src.error is not None and "cut short after" in src.error and "no end frame" in src.error
    assert src.diagnostics()["error"] == src.error

    truncated_gzip = tmp_path / "truncated.vlog.gz"
    truncated_gzip.write_bytes(log.read_bytes()[:-5000])
    src = ReplaySource(truncated_gzip)
    src.poll(end)
    asyncio.run(src.stop())
    assert src.error is not None and str(truncated_gzip) in src.error

    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(LogError, match=r"notes.txt: not a Visita advert log \(no gzip-compressed JSON header line\)"):
        AdvertLog(text)
    newer = tmp_path / "newer.vlog.gz"
    newer.write_bytes(gzip.compress(b'{"format": "visita-advert-log", "version": 2}\n'))
    with pytest.raises(LogError, match="advert log version 2; this Visita reads version 1"):
        AdvertLog(newer)
    with pytest.raises(LogError, match="cannot be read"):
        AdvertLog(tmp_path / "missing.vlog.gz")
    # Header values its readers use, each named (they were tracebacks in the replay).
    header = json.loads(raw.split(b"\n", 1)[0])
    for key, value, says in (
        ("start_ms", "x", "start_ms = 'x': must be a whole number of milliseconds"),
        ("end", None, "end = None: must be a time"),
        ("end", header["start_ms"] / 1000 - 10, f"end = {header['start_ms'] / 1000 - 10!r}: must be a time"),
        ("seed", "abc", "seed = 'abc': must be a whole number"),
        ("staff", "staff-1", "staff: must be a list of member refs"),
        ("receivers", "rx-1", "receivers: must be a list of receiver ids"),
    ):
        bad = tmp_path / f"bad-{key}.vlog.gz"
        bad.write_bytes(gzip.compress(json.dumps({**header, key: value}).encode() + b"\n" + raw.split(b"\n", 1)[1]))
        with pytest.raises(LogError) as e:
            AdvertLog(bad)
        assert f"{bad}: header: {says}" in str(e.value), str(e.value)
        r = subprocess.run([*VISITA, "replay", str(bad)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_data_driven_clock_moves_by_its_step_per_reading() -> None:
    clock = Clock(start=100.0, step_s=2.5)
    assert [clock.now(), clock.now(), clock.now()] == [102.5, 105.0, 107.5]
    paced = Clock(speed=60, start=100.0)
    assert 100.0 <= paced.now() < 101.0


def test_a_live_clock_follows_a_step_forward_of_the_system_clock_and_never_goes_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wall = [1_000_000.0]
    mono = [50.0]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    monkeypatch.setattr(time, "monotonic", lambda: mono[0])
    clock = Clock()
    mono[0] += 10
    wall[0] += 10.5  # NTP slewing: no step
    assert clock.now() == 1_000_010.0
    wall[0] += 86_400  # the Pi booted on its saved time; NTP steps it forward by a day
    # Followed in whole seconds (the half second of slewing stays), and kept for the gateway, once.
    assert clock.now() == wall[0] - 0.5 and clock.steps == 1 and clock.stepped_s == 86_400
    assert clock.take_steps() == [ClockStep(wall[0] - 0.5, 86_400.0)] and clock.take_steps() == []
    assert "stepped forward by 86400 s" in caplog.text
    mono[0] += 5
    wall[0] -= 3600  # and back by an hour: data time does not follow
    got = [clock.now(), clock.now()]
    assert got[0] == got[1] == 1_000_010.0 + 86_400 + 5 and clock.steps == 1 and clock.take_steps() == []
    assert caplog.text.count("set back by") == 1, "said once"
    # Data time runs at the system clock's rate: it stays an hour ahead, it never meets it again by itself; the log
    # says so, and what it costs (check-ins judged against data time) and does.
    mono[0] += 600
    wall[0] += 600
    assert clock.now() - wall[0] == 3604.5
    assert "stay 3604 s ahead of the system clock until Visita is restarted" in caplog.text
    assert "refused as stale" in caplog.text and "meets it again" not in caplog.text
    sim = Clock(speed=60)
    wall[0] += 1000
    assert sim.now() == sim.start, "a simulation at speed 60 keeps its own time"


def test_a_step_seen_by_two_threads_at_once_is_taken_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The runtime's loop and paho's thread (remote receivers stamp their readings) both read the clock: whichever
    # sees the step first records it, the other reads the new time, and the gateway learns the step once.
    wall, mono = [1_000_000.0], [50.0]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    monkeypatch.setattr(time, "monotonic", lambda: mono[0])
    clock = Clock()
    wall[0] += 7200
    go = threading.Barrier(4)
    seen: list[float] = []

    def read() -> None:
        go.wait()
        seen.extend(clock.now() for _ in range(2000))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(seen) == {wall[0]} and clock.steps == 1
    assert clock.take_steps() == [ClockStep(wall[0], 7200.0)] and clock.take_steps() == []


@pytest.mark.parametrize("synced_after", [3, None])
def test_a_live_run_waits_for_the_clock_to_be_synchronised_and_goes_on_without_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, synced_after: int | None
) -> None:
    """A Pi just booted runs on the time it saved at shutdown until NTP steps it; a step after the start ends every
    visit open then, so a live run waits a while for the sync, and starts on the clock as it is then."""
    import asyncio

    import gateway.runtime as rt

    polls = [0]

    def synchronised() -> bool:
        polls[0] += 1
        return synced_after is not None and polls[0] > synced_after

    async def no_sleep(_: float) -> None:
        mono[0] += 1.0

    wall, mono = [1_000_000.0], [50.0]
    monkeypatch.setattr(rt, "clock_synchronised", synchronised)
    monkeypatch.setattr(time, "time", lambda: wall[0])
    monkeypatch.setattr(time, "monotonic", lambda: mono[0])
    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    clock = Clock()
    assert clock.live and not Clock(speed=1.0, simulation=True).live and not Clock(start=5.0).live
    wall[0] += 86_400  # NTP steps the clock during the wait
    with caplog.at_level(logging.INFO, logger="visita.runtime"):
        asyncio.run(rt._wait_for_clock(clock, 10.0))
    assert "not synchronised (NTP) yet: waiting up to 10 s" in caplog.text
    if synced_after is None:
        assert "still not synchronised after 10 s: running on it as it is" in caplog.text
    else:
        assert "the system clock is synchronised (after 3 s): starting" in caplog.text
    assert clock.now() == wall[0] and clock.steps == 0, "started on the clock as it is now: no step to follow"


def test_visita_sim_writes_a_log_that_visita_replay_turns_into_visits(tmp_path: Path) -> None:
    out, data = tmp_path / "out", tmp_path / "data"
    args = ["small-shop", "--seed", "2", "--duration", "40m", "--start", NOON, "--out", str(out), "--json"]
    sim = subprocess.run(
        [*VISITA, "sim", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sim.returncode == 0, sim.stderr
    summary = json.loads(sim.stdout)
    assert summary["scenario"] == "small-shop" and summary["visits"] > 5 and summary["adverts"] > 1000
    assert summary["log"] == str(out / LOG_NAME) and summary["truth"] == str(out / TRUTH_NAME)
    truth = list(read_truth(out / TRUTH_NAME))
    assert truth[-1] == {"type": "summary", **{k: v for k, v in summary.items() if k not in ("wall_s", "log", "truth")}}

    rep = subprocess.run(
        [*VISITA, "replay", str(out / LOG_NAME), "--data-dir", str(data)], capture_output=True, text=True, timeout=180
    )
    assert rep.returncode == 0, rep.stderr
    m = re.search(r"today (\d+) visits, (\d+) pass-bys", rep.stdout)
    assert m and int(m.group(1)) > 0 and int(m.group(2)) > 0, rep.stdout
    assert f"replayed {summary['adverts']:,} adverts (0h40m00s of data)" in rep.stdout
    assert "as fast as it goes" in rep.stdout
    assert "(sent at next start)" in rep.stdout, "--mqtt off by default: the kept outbox waits for a broker"
    temp = subprocess.run([*VISITA, "replay", str(out / LOG_NAME)], capture_output=True, text=True, timeout=180)
    assert "discarded with the temporary data directory; pass --data-dir to keep them" in temp.stdout
    with Store(data) as store:
        visits = store.recent_visits(500)
    assert visits and all(v.ended is not None and v.classification in ("visitor", "staff") for v in visits)
    members = {p["member"] for p in truth if p["type"] == "person" and p["has_app"]}
    assert {v.member for v in visits if v.member} <= members | {"staff-1"}, "members resolved from the log's seed"
    # The same log again into the same directory: refused, not its visits published a second time.
    with Store(data) as store:
        seq = store.last_seq()
    again = subprocess.run(
        [*VISITA, "replay", str(out / LOG_NAME), "--data-dir", str(data)], capture_output=True, text=True, timeout=180
    )
    assert again.returncode == 1 and f"{data} already holds data up to" in again.stderr, again.stderr
    assert "Give another --data-dir" in again.stderr
    with Store(data) as store:
        assert store.last_seq() == seq


def test_replay_refuses_a_bad_log_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.vlog.gz"
    bad.write_bytes(b"not gzip at all")
    proc = subprocess.run([*VISITA, "replay", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"visita replay: {bad}: not a Visita advert log (no gzip-compressed JSON header line)"


def test_empty_frames_are_skipped_and_time_going_backwards_ends_the_replay(tmp_path: Path) -> None:
    path = tmp_path / "foreign.vlog.gz"
    start_ms = 1_764_000_000_000
    with LogWriter(path, {"start_ms": start_ms, "receivers": ["rx-1"]}) as w:
        w.add_addresses([("C0:FF:EE:00:00:01", True)])
        w.add_payloads([Content(manufacturer_data={0x004C: bytes.fromhex("1005071c2e9b07")})])

        def records(*t: int) -> None:
            n = len(t)
            ids = np.zeros(n, np.uint32)
            w.add_records(np.array(t, np.int64) + start_ms, np.zeros(n, np.uint8), ids, ids, np.full(n, -60, np.int8))

        records(1000, 2000)
        w._frame(b"R", b"")  # an empty frame: another writer could make one
        records(3000)
        records(2500)  # back in time
    src = ReplaySource(path)
    asyncio.run(src.start())
    got = src.poll(start_ms / 1000 + 10)
    assert [round(a.ts * 1000) - start_ms for a in got] == [1000, 2000, 3000]
    assert src.error is not None and "go backwards" in src.error
    assert src.finished
    asyncio.run(src.stop())
