"""Tests for gateway.store: real files under tmp_path; the file system is faked only where stated."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import gateway.store as store_mod
from gateway.model import Award, Event, Visit, ZoneSegment
from gateway.store import Store, StoreError

REPO = Path(__file__).resolve().parents[1]


def event(seq: int | None, *, event_id: str | None = None, data: dict[str, object] | None = None) -> Event:
    return Event(
        type="visit.started",
        id=event_id or f"evt-{seq}",
        ts=1_700_000_000.0 + (seq or 0),
        store="store-1",
        gateway="gw-1",
        seq=seq,
        data={"visit_id": f"v{seq}", "zones": ["entrance"]} if data is None else data,
    )


def award(n: int, day: str = "2026-11-24") -> Award:
    return Award(
        award_id=f"award-{n}",
        member="m-42",
        rule="visit",
        points=10,
        visit_id=f"v{n}",
        ts=1_700_000_000.0 + n,
        day=day,
        reason="visited the store",
    )


def visit(n: int, ended: float | None) -> Visit:
    start = 1_700_000_000.0 + n
    return Visit(
        visit_id=f"v{n}",
        subject=f"member:m-{n}",
        started=start,
        ended=ended,
        segments=(ZoneSegment("entrance", start, start + 10.0), ZoneSegment("dairy", start + 10.0, start + 60.0)),
        classification="visitor",
        source="ble",
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def open_store(data_dir: Path) -> Iterator[Callable[..., Store]]:
    """Opens stores on data_dir and closes whatever a test leaves open."""
    opened: list[Store] = []

    def _open(**kwargs: int) -> Store:
        s = Store(data_dir, **kwargs)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close()


@pytest.fixture
def replace_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Counts os.replace calls (then calls through): each one is a committed file write."""
    calls: list[tuple[str, str]] = []
    real = os.replace

    def spy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append((os.fspath(src), os.fspath(dst)))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    return calls


# --------------------------------------------------------------------------- events


def test_events_round_trip_in_seq_order(open_store: Callable[..., Store]) -> None:
    s = open_store()
    assert s.last_seq() == 0
    assert s.pending_events() == []
    events = [event(3), event(1), event(2)]
    s.put_events(events)
    # Buffered changes are visible before the commit.
    assert [e.seq for e in s.pending_events()] == [1, 2, 3]
    s.commit()
    s.close()

    s = open_store()
    assert s.pending_events() == sorted(events, key=lambda e: e.seq or 0)
    assert s.last_seq() == 3


def test_ack_removes_and_last_seq_survives_an_empty_outbox(open_store: Callable[..., Store]) -> None:
    s = open_store()
    s.put_events([event(1), event(2), event(3)])
    s.commit()
    assert s.ack_events(["evt-2", "unknown"]) == 1
    assert [e.seq for e in s.pending_events()] == [1, 3]
    assert s.ack_events(iter(["evt-1", "evt-3", "evt-3"])) == 2
    assert s.ack_events(["evt-1"]) == 0
    assert s.pending_events() == []
    s.close()

    s = open_store()
    assert s.pending_events() == []
    assert s.last_seq() == 3
    s.put_events([event(4)])
    assert s.last_seq() == 4


def test_last_seq_never_goes_down(open_store: Callable[..., Store]) -> None:
    s = open_store()
    s.put_events([event(10)])
    s.ack_events(["evt-10"])
    s.put_events([event(5)])
    assert s.last_seq() == 10


def test_put_events_checks_the_whole_batch_before_applying(open_store: Callable[..., Store]) -> None:
    s = open_store()
    with pytest.raises(ValueError, match="seq None"):
        s.put_events([event(1), event(None, event_id="status-1")])
    with pytest.raises(ValueError, match="JSON-safe"):
        s.put_events([event(1), event(2, data={"bad": {1, 2}})])
    assert s.pending_events() == []
    assert s.last_seq() == 0
    assert s.diagnostics()["uncommitted"] == 0


def test_put_events_is_idempotent_and_rejects_a_reused_seq(open_store: Callable[..., Store]) -> None:
    s = open_store()
    s.put_events([event(1)])
    s.put_events([event(1)])
    assert len(s.pending_events()) == 1
    with pytest.raises(ValueError, match="already pending"):
        s.put_events([event(1, event_id="other")])
    with pytest.raises(ValueError, match="already pending"):
        s.put_events([event(2, event_id="evt-1")])


def test_stored_event_is_a_copy(open_store: Callable[..., Store]) -> None:
    data: dict[str, object] = {"n": 1}
    s = open_store()
    s.put_events([event(1, data=data)])
    data["n"] = 2  # the caller changing its dict later must not change the outbox
    assert s.pending_events()[0].data == {"n": 1}


def test_returned_event_is_a_copy(open_store: Callable[..., Store]) -> None:
    s = open_store()
    s.put_events([event(1, data={"zones": ["entrance"]})])
    s.pending_events()[0].data["zones"].append("dairy")
    assert s.pending_events()[0].data == {"zones": ["entrance"]}


# --------------------------------------------------------------------------- awards


def test_awards_dedupe_by_award_id_across_reopen(open_store: Callable[..., Store]) -> None:
    s = open_store()
    assert s.put_awards([award(1), award(2), award(1)]) == 2
    s.close()

    s = open_store()
    assert s.put_awards([award(2), award(3)]) == 1
    assert s.put_awards([award(3)]) == 0
    assert [a.award_id for a in s.awards()] == ["award-1", "award-2", "award-3"]
    assert s.awards()[0] == award(1)


def test_awards_since_day(open_store: Callable[..., Store]) -> None:
    s = open_store()
    s.put_awards([award(1, "2026-11-22"), award(2, "2026-11-24"), award(3, "2026-11-23"), award(4, "2026-12-01")])
    assert [a.award_id for a in s.awards(since_day="2026-11-23")] == ["award-2", "award-3", "award-4"]
    assert s.awards(since_day="2027-01-01") == []
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        s.awards(since_day="24.11.2026")


# --------------------------------------------------------------------------- visits


def test_visits_bounded_to_the_limit_newest_first(open_store: Callable[..., Store]) -> None:
    s = open_store(recent_visits_limit=3)
    # Not in `ended` order on purpose.
    s.put_visits([visit(1, 500.0), visit(2, 100.0), visit(3, 400.0)])
    s.put_visits([visit(4, 300.0), visit(5, 200.0)])
    assert [v.visit_id for v in s.recent_visits()] == ["v1", "v3", "v4"]
    assert [v.visit_id for v in s.recent_visits(limit=2)] == ["v1", "v3"]
    assert s.diagnostics()["visits_trimmed"] == 2
    assert s.recent_visits()[0] == visit(1, 500.0)
    s.close()

    s = open_store(recent_visits_limit=3)
    assert [v.visit_id for v in s.recent_visits()] == ["v1", "v3", "v4"]
    # Same visit_id again replaces the stored visit rather than adding a second one.
    s.put_visits([visit(4, 900.0)])
    assert [v.visit_id for v in s.recent_visits()] == ["v4", "v1", "v3"]
    s.close()

    # A smaller limit than last run trims at open.
    s = open_store(recent_visits_limit=1)
    assert [v.visit_id for v in s.recent_visits()] == ["v4"]


def test_open_visit_is_rejected(open_store: Callable[..., Store]) -> None:
    s = open_store()
    with pytest.raises(ValueError, match="still open"):
        s.put_visits([visit(1, 100.0), visit(2, None)])
    assert s.recent_visits() == []


# --------------------------------------------------------------------------- group commit


def test_one_file_write_per_commit(open_store: Callable[..., Store], replace_spy: list[tuple[str, str]]) -> None:
    s = open_store()
    s.put_events([event(i) for i in range(1, 201)])
    s.put_awards([award(i) for i in range(100)])
    s.put_visits([visit(i, 1000.0 + i) for i in range(50)])
    s.ack_events([f"evt-{i}" for i in range(1, 51)])
    assert replace_spy == []  # nothing reaches the disk before commit()
    assert not s.path.exists()
    s.commit()
    assert replace_spy == [(str(s.path) + ".tmp", str(s.path))]
    assert s.diagnostics()["commits"] == 1

    for tick in range(3):
        s.put_events([event(1000 + tick * 10 + i) for i in range(10)])
        s.put_awards([award(1000 + tick)])
        s.commit()
    assert len(replace_spy) == 4
    assert s.diagnostics()["commits"] == 4


def test_commit_without_change_writes_nothing(
    open_store: Callable[..., Store], replace_spy: list[tuple[str, str]]
) -> None:
    s = open_store()
    s.commit()  # a new, empty store
    assert replace_spy == []
    assert not s.path.exists()

    s.put_awards([award(1)])
    s.put_events([event(1)])
    s.commit()
    assert len(replace_spy) == 1
    mtime = s.path.stat().st_mtime_ns

    # Calls that change nothing must not count as changes.
    s.commit()
    assert s.ack_events(["nope"]) == 0
    assert s.put_awards([award(1)]) == 0
    s.put_events([event(1)])
    s.put_visits([])
    s.commit()
    assert len(replace_spy) == 1
    assert s.path.stat().st_mtime_ns == mtime
    s.close()
    # Closing appended the journal (the award) to its day file, then cleared it from the hot file.
    assert len(replace_spy) == 2
    s = open_store()
    s.close()
    assert len(replace_spy) == 2, "opening and closing an unchanged store writes nothing"


def test_commits_touching_some_tables_write_the_whole_state(open_store: Callable[..., Store], data_dir: Path) -> None:
    # The storage reuses the JSON text of tables that did not change; the file must
    # still hold every table exactly as a fresh open sees it.
    s = open_store()
    s.put_events([event(1), event(2)])
    s.put_awards([award(1)])
    s.put_visits([visit(1, 100.0)])
    s.commit()
    s.ack_events(["evt-1"])  # outbox only
    s.commit()
    s.put_awards([award(2)])  # ledger only
    s.commit()
    s.put_visits([visit(2, 200.0)])  # visits only
    s.commit()
    s.put_events([event(3)])  # outbox and meta
    s.commit()
    expected = (s.pending_events(), s.awards(), s.recent_visits(), s.last_seq())
    s.close()
    s = open_store()
    assert (s.pending_events(), s.awards(), s.recent_visits(), s.last_seq()) == expected
    assert expected[0] == [event(2), event(3)]
    assert expected[1] == [award(1), award(2)]
    assert expected[2] == [visit(2, 200.0), visit(1, 100.0)]
    assert expected[3] == 3


def test_modes_and_file_shape(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"
    with Store(data_dir) as s:
        s.put_events([event(1)])
        s.put_awards([award(1)])
        s.put_visits([visit(1, 100.0)])
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(s.path.stat().st_mode) == 0o600
    assert sorted(os.listdir(data_dir)) == ["history", "visita.json"]
    doc = json.loads(s.path.read_bytes())
    assert set(doc) == {"outbox.0", "journal", "meta"}
    assert doc["meta"] == {"1": {"last_seq": 1}}
    assert doc["outbox.0"]["1"] == event(1).to_record()
    assert doc["journal"] == {}, "close rolls the journal into the day files"
    assert sorted(os.listdir(data_dir / "history")) == ["1970-01-01.jsonl", "2026-11-24.jsonl"]
    assert stat.S_IMODE((data_dir / "history" / "2026-11-24.jsonl").stat().st_mode) == 0o600
    lines = (data_dir / "history" / "2026-11-24.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["award"]


def test_diagnostics(open_store: Callable[..., Store]) -> None:
    s = open_store()
    s.put_events([event(1), event(2)])
    s.put_awards([award(1)])
    s.commit()
    d = s.diagnostics()
    assert d["outbox_depth"] == 2
    assert d["ledger_size"] == 1
    assert d["commits"] == 1
    assert d["file_size_bytes"] == s.path.stat().st_size
    assert d["last_commit_ms"] > 0
    assert d["uncommitted"] == 0


# --------------------------------------------------------------------------- opening and errors


def test_second_open_of_the_same_directory_is_refused(open_store: Callable[..., Store], data_dir: Path) -> None:
    open_store()
    with pytest.raises(StoreError, match="in use by another Visita process"):
        Store(data_dir)


def test_data_dir_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=r"cannot be created: .*; pass --data-dir DIR or fix its permissions"):
        Store(blocker / "data")
    with pytest.raises(StoreError, match="not a directory"):
        Store(blocker)


def test_data_dir_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Permissions cannot stop root (CI runs as root), so the refusal the kernel would give is injected.
    real_open = os.open

    def refuse(path: str | os.PathLike[str], flags: int, mode: int = 0o777, **kw: object) -> int:
        if str(path).startswith(str(tmp_path / "ro")) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, mode)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(StoreError, match=r"data directory .*ro is not writable: Permission denied; pass --data-dir"):
        Store(tmp_path / "ro")


def test_closed_store_refuses_work(open_store: Callable[..., Store]) -> None:
    s = open_store()
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.put_events([event(1)])


# --------------------------------------------------------------------------- crash safety


def test_leftover_tmp_is_removed_and_data_intact(
    open_store: Callable[..., Store], data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = open_store()
    s.put_events([event(1)])
    s.put_awards([award(1)])
    s.close()
    tmp = data_dir / "visita.json.tmp"
    tmp.write_bytes(b'{"outbox": {"1": {"type": "visit.sta')  # a commit that died mid-write

    with caplog.at_level(logging.INFO, logger="visita.store"):
        s = open_store()
    assert not tmp.exists()
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert str(tmp) in caplog.records[0].getMessage()
    assert s.pending_events() == [event(1)]
    assert s.awards() == [award(1)]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b'{"outbox": {"1": {"type": "visit.started", "id": "ev', id="truncated"),
        pytest.param(bytes(range(256)), id="garbage"),
        pytest.param(b"[1, 2, 3]", id="list"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"ledger": {"1": {"award_id": "x"}}}', id="bad-record"),
        pytest.param(b'{"outbox": {"1": {"type": "t", "id": "e", "ts": 1, "store": "s", '
                     b'"gateway": "g", "seq": 7, "data": {}}}}', id="seq-mismatch"),
    ],
)  # fmt: skip
def test_corrupt_target_is_moved_aside(
    open_store: Callable[..., Store], data_dir: Path, caplog: pytest.LogCaptureFixture, content: bytes
) -> None:
    data_dir.mkdir(mode=0o700)
    target = data_dir / "visita.json"
    target.write_bytes(content)

    with caplog.at_level(logging.INFO, logger="visita.store"):
        s = open_store()
    aside = list(data_dir.glob("visita.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == content
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2
    assert str(target) in warnings[0].getMessage()
    assert str(aside[0]) in warnings[0].getMessage()
    # Never a seq used twice: the sequence goes on past the highest one still readable, by as many as the outbox
    # holds; with none readable it starts again at 1, and says so.
    if b'"seq"' in content:
        assert s.last_seq() == 7 + 20_000 and "events go on from seq 20008" in warnings[1].getMessage()
    else:
        assert s.last_seq() == 0 and warnings[1].levelno == logging.ERROR and "start at 1 again" in caplog.text
    assert s.pending_events() == []
    assert s.awards() == []
    s.put_events([event(1)])
    s.close()
    s = open_store()
    assert s.pending_events() == [event(1)]
    assert s.last_seq() == (20_007 if b'"seq"' in content else 1), "kept across the next restart"


def test_nul_bytes_after_a_whole_hot_file_cost_nothing(
    open_store: Callable[..., Store], data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A power cut can leave a file longer than its data, the rest zeros (ext4); a complete commit before them is used.
    s = open_store()
    s.put_events([event(1), event(2)])
    s.put_awards([award(1)])
    s.close()
    with open(data_dir / "visita.json", "ab") as f:
        f.write(b"\0" * 3000)
    with caplog.at_level(logging.WARNING, logger="visita.store"):
        s = open_store()
    assert not list(data_dir.glob("visita.json.corrupt-*")), caplog.text
    assert [e.seq for e in s.pending_events()] == [1, 2] and s.last_seq() == 2 and s.awards() == [award(1)]
    assert "ends in 3000 NUL byte(s)" in caplog.text
    s.put_events([event(3)])
    s.close()
    assert not (data_dir / "visita.json").read_bytes().endswith(b"\0"), "the next commit writes it without them"
    # Zeros over the end of the document itself are damage: moved aside as before.
    raw = (data_dir / "visita.json").read_bytes()
    (data_dir / "visita.json").write_bytes(raw[:-20] + b"\0" * 20)
    s = open_store()
    assert len(list(data_dir.glob("visita.json.corrupt-*"))) == 1
    assert s.last_seq() == 3 + 20_000


def test_crash_mid_write_leaves_the_previous_commit(
    open_store: Callable[..., Store], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = open_store()
    s.put_events([event(1)])
    s.put_awards([award(1)])
    s.commit()
    before = s.path.read_bytes()

    real_write_all = store_mod.write_all

    def half_then_fail(fd: int, data: bytes) -> None:
        real_write_all(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "write_all", half_then_fail)
    s.put_events([event(2)])
    s.put_awards([award(i) for i in range(2, 200)])
    # A full disk is not fatal: commit says False, keeps the changes, and says so once.
    assert s.commit() is False
    assert s.commit() is False
    assert s.path.read_bytes() == before
    assert not (data_dir / "visita.json.tmp").exists()
    assert s.diagnostics()["uncommitted"] == 1
    assert s.diagnostics()["disk_full"] is True
    assert s.sendable(0, 10) == [event(1)], "an event not on disk is not handed to the uplink"

    # The changes were kept in memory: the next commit that can write, writes them.
    monkeypatch.setattr(store_mod, "write_all", real_write_all)
    s.commit()
    s.close()
    s = open_store()
    assert s.last_seq() == 2
    assert len(s.awards()) == 199


_CHILD = """
import sys
from pathlib import Path
from gateway.model import Award, Event
from gateway.store import Store

store = Store(Path(sys.argv[1]))
seq = store.last_seq()
print("ready", seq, flush=True)
while True:
    seq += 1
    store.put_events([Event("visit.started", f"e{seq}", float(seq), "st", "gw", seq, {"n": seq})])
    store.ack_events([f"e{seq - 1}"])
    store.put_awards(
        Award(f"a{seq}-{i}", "m", "visit", 1, f"v{seq}", float(seq), "2026-11-24", "r" * 40) for i in range(10)
    )
    store.commit()
    print(seq, flush=True)
"""


def test_sigkill_during_commits_never_corrupts(data_dir: Path) -> None:
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    progressed = 0
    for attempt in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(data_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline().split()
            assert ready[:1] == ["ready"], proc.communicate(timeout=5)
            committed = int(ready[1])
            time.sleep(rng.uniform(0.005, 0.05))
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == -signal.SIGKILL, err
        reported = [int(line) for line in out.split()]
        progressed += bool(reported)
        committed = max(reported, default=committed)

        with Store(data_dir) as s:
            context = f"seed {seed}, attempt {attempt}, last reported commit {committed}"
            assert s.last_seq() in (committed, committed + 1), context
            # Every commit acked the previous event, so exactly the newest one is pending.
            if s.last_seq():
                assert [e.seq for e in s.pending_events()] == [s.last_seq()], context
            assert len(s.awards()) == 10 * s.last_seq(), context
        assert sorted(os.listdir(data_dir)) in ([], ["visita.json"], ["history", "visita.json"]), context
    assert progressed > 0, f"seed {seed}: the child never committed before being killed"


# --------------------------------------------------------------------------- history files, bound, disk full


def typed(seq: int, kind: str) -> Event:
    return Event(kind, f"evt-{seq}", 1_700_000_000.0 + seq, "store-1", "gw-1", seq, {"n": seq})


def test_history_keeps_the_hot_file_small(open_store: Callable[..., Store], data_dir: Path) -> None:
    s = open_store()
    for n in range(1, 3 * store_mod.ROLL_EVERY):
        s.put_awards([award(n)])
        s.put_visits([visit(n, 1_700_000_100.0 + n)])
        s.commit()
    assert s.diagnostics()["journal"] < store_mod.ROLL_EVERY
    assert s.diagnostics()["history_rolls"] >= 2
    assert s.path.stat().st_size < 256 * 1000
    s.close()
    s = open_store(recent_visits_limit=10)
    assert len(s.awards()) == 3 * store_mod.ROLL_EVERY - 1
    assert [v.visit_id for v in s.recent_visits(3)] == [f"v{3 * store_mod.ROLL_EVERY - i}" for i in (1, 2, 3)]
    assert s.put_awards([award(5)]) == 0, "award ids in the day files still dedupe"


def test_legacy_single_file_is_moved_to_the_history(open_store: Callable[..., Store], data_dir: Path) -> None:
    from gateway.model import award_to_record, visit_to_record

    data_dir.mkdir(mode=0o700)
    legacy = {
        "outbox": {"1": event(1).to_record()},
        "ledger": {"1": award_to_record(award(1))},
        "visits": {"1": visit_to_record(visit(1, 100.0))},
        "meta": {"1": {"last_seq": 1}},
    }
    (data_dir / "visita.json").write_text(json.dumps(legacy))
    s = open_store()
    assert s.awards() == [award(1)] and s.recent_visits() == [visit(1, 100.0)]
    assert s.pending_events() == [event(1)]
    s.close()
    assert set(json.loads((data_dir / "visita.json").read_text())) == {"outbox.0", "journal", "meta"}
    s = open_store()
    assert s.awards() == [award(1)] and s.recent_visits() == [visit(1, 100.0)]


def test_torn_history_tail_and_a_crash_before_the_journal_clear(
    open_store: Callable[..., Store], data_dir: Path
) -> None:
    s = open_store()
    s.put_awards([award(1), award(2)])
    s.commit()
    hot = s.path.read_bytes()  # journal holds both awards
    s.close()  # rolled: the day file holds both, the journal is empty
    day = data_dir / "history" / "2026-11-24.jsonl"
    # Power lost after the append, before the commit that clears the journal, with a torn tail.
    s.path.write_bytes(hot)
    day.write_bytes(day.read_bytes()[:-7])
    s = open_store()
    assert s.awards() == [award(1), award(2)], "nothing lost, nothing counted twice"
    s.close()
    assert len(day.read_text().splitlines()) == 2


DAY_S = 86_400.0


def history_of_days(data_dir: Path, days: int, per_day: int = 3) -> list[str]:
    """Day files of `days` consecutive UTC days, each with `per_day` awards and visits, the way the store writes them;
    the day names, oldest first."""
    from gateway.model import award_to_record, visit_to_record

    hist = data_dir / "history"
    hist.mkdir(parents=True, mode=0o700)
    names = []
    for d in range(days):
        ended = 1_700_000_000.0 + d * DAY_S
        name = datetime.fromtimestamp(ended, UTC).strftime("%Y-%m-%d")
        lines = []
        for k in range(per_day):
            n = d * per_day + k
            lines.append({"kind": "award", "rec": award_to_record(award(n, name))})
            lines.append({"kind": "visit", "rec": visit_to_record(visit(n, ended + k))})
        (hist / f"{name}.jsonl").write_text("".join(json.dumps(x, separators=(",", ":")) + "\n" for x in lines))
        names.append(name)
    return names


def test_opening_reads_the_recent_history_only(open_store: Callable[..., Store], data_dir: Path) -> None:
    """Start-up does not grow with the history: a year of day files costs what INDEX_DAYS of them do."""
    days = history_of_days(data_dir, 365)
    s = open_store(recent_visits_limit=10)
    d = s.diagnostics()
    assert d["history_records"] == 2 * 3 * (store_mod.INDEX_DAYS + 1), "the last INDEX_DAYS days and the newest"
    assert [v.visit_id for v in s.recent_visits(2)] == ["v1094", "v1093"]
    assert s.put_awards([award(1090, days[-1])]) == 0, "a recent award id still dedupes"
    assert len(s.awards()) == 365 * 3, "the ledger on disk is all there for whoever reads it"
    assert len(s.awards(days[-10])) == 10 * 3


def test_opening_reads_older_days_for_the_recent_visits_and_the_journal(
    open_store: Callable[..., Store], data_dir: Path
) -> None:
    days = history_of_days(data_dir, 100)
    s = open_store(recent_visits_limit=200)
    assert len(s.recent_visits(1000)) == 200, "older days are read as far as the recent visits need"
    s.close()
    # A crash after a roll's append, before the commit that clears the journal, for a day long past (a replay):
    # that day's file is read at open although it is old, so the record is not appended a second time.
    first = data_dir / "history" / f"{days[0]}.jsonl"
    s = open_store(recent_visits_limit=10)
    s.put_visits([visit(1, 1_700_000_001.0)])  # as it is on disk already
    s.commit()
    hot = s.path.read_bytes()  # the journal holds it
    s.close()  # rolled: appended
    copies = first.read_text().count('"visit_id":"v1"')
    s.path.write_bytes(hot)
    s = open_store(recent_visits_limit=10)
    s.close()
    assert first.read_text().count('"visit_id":"v1"') == copies


def test_a_torn_day_file_not_read_at_open_is_mended(open_store: Callable[..., Store], data_dir: Path) -> None:
    days = history_of_days(data_dir, 100)
    first = data_dir / "history" / f"{days[0]}.jsonl"
    whole = first.read_bytes()
    first.write_bytes(whole + b'{"kind":"visit","rec')  # power lost during an append
    open_store(recent_visits_limit=10).close()
    assert first.read_bytes() == whole, "the next append to it would have joined the torn line"


def test_retain_deletes_old_days_with_the_next_commit(
    open_store: Callable[..., Store], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    days = history_of_days(data_dir, 30)
    s = open_store()
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        s.retain("30 days ago")
    s.retain(days[20])
    assert len(os.listdir(data_dir / "history")) == 30, "nothing goes before the commit"

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    s.put_events([typed(1, "visit.ended")])  # something for the hot file
    with monkeypatch.context() as m:
        m.setattr(store_mod, "write_all", full)
        assert s.commit() is False
    assert len(os.listdir(data_dir / "history")) == 30, "a commit that was not written deletes nothing"
    assert s.commit()
    assert sorted(os.listdir(data_dir / "history")) == [f"{d}.jsonl" for d in days[20:]]
    assert min(v.ended or 0 for v in s.recent_visits(1000)) >= 1_700_000_000.0 + 20 * DAY_S, "their visits are gone"
    assert s.diagnostics()["history_days_deleted"] == 20
    assert [a.day for a in s.awards()][:1] == [days[20]]


def test_outbox_bound_drops_aggregates_first_and_never_visits_or_awards(
    open_store: Callable[..., Store], caplog: pytest.LogCaptureFixture
) -> None:
    s = open_store(outbox_max=4)
    with caplog.at_level(logging.WARNING, logger="visita.store"):
        s.put_events([typed(1, "footfall.minute"), typed(2, "zone.changed"), typed(3, "visit.started")])
        s.put_events([typed(4, "footfall.minute"), typed(5, "points.awarded"), typed(6, "visit.ended")])
        s.put_events([typed(7, "visit.started"), typed(8, "points.awarded")])
    kept = [(e.seq, e.type) for e in s.pending_events()]
    assert kept == [(3, "visit.started"), (5, "points.awarded"), (6, "visit.ended"), (7, "visit.started"),
                    (8, "points.awarded")]  # fmt: skip
    assert s.diagnostics()["outbox_dropped"] == {"footfall.minute": 2, "zone.changed": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "footfall.minute then zone.changed" in warnings[0]
    assert [e.seq for e in s.sendable(0, 100)] == [], "nothing is sent before it is committed"
    s.commit()
    assert [e.seq for e in s.sendable(3, 2)] == [5, 6]


def test_disk_full_keeps_running_drops_by_policy_and_recovers(
    open_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = open_store(full_disk_outbox_max=3)
    s.put_events([typed(1, "visit.started")])
    assert s.commit() is True
    real = store_mod.write_all

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "write_all", full)
    with caplog.at_level(logging.WARNING, logger="visita.store"):
        for seq in range(2, 12):
            s.put_events([typed(seq, "footfall.minute" if seq % 2 else "visit.ended")])
            assert s.commit() is False
        monkeypatch.setattr(store_mod, "write_all", real)
        assert s.commit() is True
    msgs = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("disk full") for m in msgs) == 1
    assert sum("disk space is back" in m for m in msgs) == 1
    kinds = [e.type for e in s.pending_events()]
    assert kinds.count("visit.ended") == 5 and kinds.count("visit.started") == 1
    assert s.diagnostics()["outbox_dropped"] == {"footfall.minute": 5}
    assert len(s.sendable(0, 100)) == 6


def test_a_close_on_a_full_disk_counts_what_waits_on_disk_and_what_is_lost(
    open_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = open_store(full_disk_outbox_max=10)
    s.put_events([typed(seq, "footfall.minute") for seq in range(1, 6)])
    assert s.commit() is True  # five events on disk

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "write_all", full)
    for seq in range(6, 36):  # thirty more while full: the bound drops the oldest minutes, those on disk too
        s.put_events([typed(seq, "footfall.minute" if seq % 3 else "visit.ended")])
        assert s.commit() is False
    in_memory = {e.seq for e in s.pending_events()}
    assert s.close() == (5, len({q for q in in_memory if q is not None and q > 5}))
    s = open_store()
    assert len(s.pending_events()) == 5, "what the stop said waits is what waits"


def test_acks_alone_are_written_at_most_every_ack_commit_s(
    open_store: Callable[..., Store], data_dir: Path, replace_spy: list[tuple[str, str]]
) -> None:
    s = open_store()
    s.put_events([event(1), event(2)])
    s.commit()
    assert len(replace_spy) == 1
    s.ack_events(["evt-1"])
    assert s.commit() is True
    assert len(replace_spy) == 1, "an ack alone waits for the next write (a crash costs a duplicate, not an event)"
    s.put_events([event(3)])
    s.commit()
    assert len(replace_spy) == 2, "new events are written at once, the pending ack with them"
    s.ack_events(["evt-2"])
    s.close()  # close writes whatever is left
    s = open_store()
    assert s.pending_events() == [event(3)]


def test_outbox_chunks_keep_a_commit_cheap_with_a_long_backlog(open_store: Callable[..., Store]) -> None:
    s = open_store()
    s.put_events([event(seq) for seq in range(1, 3 * store_mod.CHUNK + 1)])
    s.commit()
    doc = json.loads(s.path.read_bytes())
    assert sorted(k for k in doc if k.startswith("outbox")) == ["outbox.0", "outbox.1", "outbox.2", "outbox.3"]
    # Acking the whole first chunk drops its table; the others keep their place.
    s.ack_events([f"evt-{seq}" for seq in range(1, store_mod.CHUNK)])
    s.put_events([event(3 * store_mod.CHUNK + 1)])
    s.commit()
    doc = json.loads(s.path.read_bytes())
    assert sorted(k for k in doc if k.startswith("outbox")) == ["outbox.1", "outbox.2", "outbox.3"]
    expected = [e.seq for e in s.pending_events()]
    assert expected == list(range(store_mod.CHUNK, 3 * store_mod.CHUNK + 2))
    assert [e.seq for e in s.sendable(2 * store_mod.CHUNK - 2, 3)] == [
        2 * store_mod.CHUNK - 1,
        2 * store_mod.CHUNK,
        2 * store_mod.CHUNK + 1,
    ]
    s.close()
    s = open_store()
    assert [e.seq for e in s.pending_events()] == expected


# --------------------------------------------------------------------------- a commit in three steps


def test_changes_made_while_a_commit_is_written_belong_to_the_next(
    open_store: Callable[..., Store], data_dir: Path
) -> None:
    s = open_store()
    s.put_events([event(1), event(2)])
    pending = s.begin_commit()
    assert pending is not None and pending.seq == 2
    s.put_events([event(3)])  # the loop goes on while the writer thread writes
    s.write_commit(pending)
    assert s.finish_commit(pending) is True
    assert [e.seq for e in s.sendable(0, 10)] == [1, 2]  # 3 is not on disk yet: not offered
    on_disk = json.loads((data_dir / "visita.json").read_text())
    assert sorted(on_disk["outbox.0"]) == ["1", "2"]
    assert s.commit() is True
    assert [e.seq for e in s.sendable(0, 10)] == [1, 2, 3]
    assert s.begin_commit() is None  # nothing changed: nothing to write (as good as done)


def test_a_failed_write_keeps_everything_for_the_next_commit(
    open_store: Callable[..., Store], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = open_store()
    s.put_events([event(1)])
    s.commit()
    s.put_events([event(2)])
    pending = s.begin_commit()
    assert pending is not None
    real = os.fsync

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    s.write_commit(pending)  # the error is kept for finish_commit, not raised on the writer thread
    assert isinstance(pending.error, OSError)
    with pytest.raises(StoreError, match=r"cannot write .*Input/output error"):
        s.finish_commit(pending)
    assert [e.seq for e in s.sendable(0, 10)] == [1]
    monkeypatch.setattr(os, "fsync", real)
    assert s.commit() is True
    assert [e.seq for e in s.sendable(0, 10)] == [1, 2]
    assert sorted(json.loads((data_dir / "visita.json").read_text())["outbox.0"]) == ["1", "2"]


def test_a_roll_in_a_split_commit_moves_only_the_records_of_that_write(open_store: Callable[..., Store]) -> None:
    s = open_store()
    s.put_awards([award(n) for n in range(store_mod.ROLL_EVERY)])
    pending = s.begin_commit()
    assert pending is not None and len(pending.roll_ids) == store_mod.ROLL_EVERY
    s.put_awards([award(10_000)])  # arrives while the writer appends to the day file
    s.write_commit(pending)
    s.finish_commit(pending)
    d = s.diagnostics()
    assert (d["journal"], d["history_records"], d["history_rolls"]) == (1, store_mod.ROLL_EVERY, 1)
    assert len(s.awards()) == store_mod.ROLL_EVERY + 1


def test_the_reused_text_of_tables_and_documents_is_what_a_full_serialisation_writes(
    open_store: Callable[..., Store], data_dir: Path
) -> None:
    s = open_store()
    rng = random.Random(5)
    seq = 0
    for _ in range(60):
        new = [event(seq + i + 1) for i in range(rng.randrange(0, 40))]
        seq += len(new)
        s.put_events(new)
        pending = [e.id for e in s.pending_events()]
        s.ack_events(rng.sample(pending, k=min(len(pending), rng.randrange(0, 30))))
        s.put_awards([award(rng.randrange(10_000)) for _ in range(rng.randrange(0, 8))])
        s.commit(force=True)
        data = s._disk.read()
        assert (data_dir / "visita.json").read_bytes() == json.dumps(data, separators=(",", ":")).encode()


def test_kept_state_rides_along_with_writes_and_a_bad_one_costs_nothing_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s = Store(tmp_path)
    state: dict[str, Any] = {"footfall": {"day": "2026-06-15", "n": 1}, "visits": {"sessions": []}}
    asked: list[int] = []

    def provider() -> dict[str, Any]:
        asked.append(1)
        return state

    s.keep(provider)
    s.put_events([event(1)])
    assert s.commit() and s.kept() == state and len(asked) == 1  # asked for the write the event made
    writes = s.diagnostics()["commits"]
    # A changed state alone (a pass-by, no event) does not write the hot file, however long ago the last write was;
    # the provider is not even asked.
    state["footfall"]["n"] = 2
    monkeypatch.setattr(store_mod, "ACK_COMMIT_S", 0.0)
    assert s.commit() and s.diagnostics()["commits"] == writes and len(asked) == 1
    # The next write takes it along, a copy (a change after it is not on disk); so does the last one at close.
    s.put_events([event(2)])
    assert s.commit() and s.diagnostics()["commits"] == writes + 1 and s.kept() == state
    state["footfall"]["n"] = 3
    assert s.kept() != state
    s.close()
    again = Store(tmp_path)
    assert again.kept() == {"footfall": {"day": "2026-06-15", "n": 3}, "visits": {"sessions": []}}
    again.close()
    # A malformed kept document is ignored with a warning; the outbox and the rest stay.
    hot = tmp_path / store_mod.HOT_FILE
    data = json.loads(hot.read_text())
    data["kept"] = {"1": {"state": "nonsense"}}
    hot.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        third = Store(tmp_path)
    assert third.kept() is None and third.last_seq() == 2 and len(third.pending_events()) == 2
    assert any("state kept" in r.getMessage() and "malformed" in r.getMessage() for r in caplog.records)
    third.close()


def test_the_footfall_state_of_the_earlier_layout_is_read_and_replaced(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.put_events([event(1)])
    s.close()
    hot = tmp_path / store_mod.HOT_FILE
    data = json.loads(hot.read_text())
    data.pop("kept", None)
    data["footfall"] = {"1": {"state": {"day": "2026-06-15", "n": 7}}}
    hot.write_text(json.dumps(data))
    again = Store(tmp_path)
    assert again.kept() == {"footfall": {"day": "2026-06-15", "n": 7}}
    again.keep(lambda: {"footfall": {"day": "2026-06-15", "n": 8}})
    again.put_events([event(2)])
    again.close()
    written = json.loads(hot.read_text())
    assert "footfall" not in written and written["kept"]["1"]["state"]["footfall"]["n"] == 8


def test_open_visits_are_replaced_by_id_forgotten_with_their_end_and_read_back_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = Store(tmp_path)
    s.put_open_visits([{"visit_id": "a", "last": 1}, {"visit_id": "b", "last": 1}], [])
    s.put_open_visits([{"visit_id": "a", "last": 2}], ["b"])
    assert s.open_visits() == [{"visit_id": "a", "last": 2}]
    assert s.commit()  # written though no event came with them
    s.put_open_visits([{"visit_id": "c", "last": 3}], [])
    s.close()
    again = Store(tmp_path)
    assert sorted(v["visit_id"] for v in again.open_visits()) == ["a", "c"]
    again.put_open_visits([], ["a", "never-kept"])
    again.close()
    # A malformed document is left out with a warning; the rest stays.
    hot = tmp_path / store_mod.HOT_FILE
    data = json.loads(hot.read_text())
    data["open_visits"]["99"] = {"visit": "nonsense"}
    hot.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        third = Store(tmp_path)
    assert [v["visit_id"] for v in third.open_visits()] == ["c"] and "malformed" in caplog.text
    third.close()
    assert "99" not in json.loads(hot.read_text())["open_visits"], "dropped, not warned about at every start"


def test_only_plausible_seqs_are_read_from_an_unusable_file(tmp_path: Path) -> None:
    f = tmp_path / "visita.json"
    f.write_bytes(b'{"meta":{"1":{"last_seq":41}},"outbox.0":{"40":{"seq":40,"x":"\x00\x00')
    assert store_mod._seqs_in(f) == 41
    f.write_bytes(b'{"outbox.0":{"7":{"seq": 7}, "8": {"seq": 1234567890123456789012345, "y": 9007199254740993')
    assert store_mod._seqs_in(f) == 7, "garbage digits are no seq"
    f.write_bytes(b'{"seq": 12.5e3, "seq": 3')
    assert store_mod._seqs_in(f) == 3


def gateway_on(data_dir: Path, now: float, history_days: int = 90, rules: str = "") -> Any:
    """A Gateway on the default store with its data in `data_dir`, `storage.history_days` and points `rules` (TOML;
    empty: one visit rule), its simulated world starting at `now`."""
    from firmware_sim.scenario import load_scenario, scenario_plan
    from firmware_sim.world import World
    from gateway.config import Settings
    from gateway.identity import MemberDirectory
    from gateway.points import load_rules
    from gateway.runtime import Gateway
    from sensors.sim import SimSource

    rules_file = data_dir.parent / "rules.toml"
    rules_file.write_text('[[rules]]\nid = "visit"\nkind = "visit"\npoints = 10\n' + rules)
    scenario = load_scenario("default")
    settings = Settings().model_copy(update={"plan": scenario_plan(scenario), "timezone": "UTC"})
    storage = settings.storage.model_copy(update={"history_days": history_days})
    settings = settings.model_copy(update={"storage": storage})
    return Gateway(settings, Store(data_dir), SimSource(World(scenario, 1, now)), MemberDirectory(),
                   load_rules(rules_file), [])  # fmt: skip


@pytest.mark.parametrize(("history_days", "streak_days", "kept"), [(90, None, 90), (30, None, 30), (30, 120, 123)])
def test_the_gateway_keeps_storage_history_days_or_what_its_rules_look_back_on(
    tmp_path: Path, history_days: int, streak_days: int | None, kept: int
) -> None:
    """Once a store-local day the gateway deletes older history: it keeps `storage.history_days` (today included),
    never fewer days than the points rules look back on (a streak's `days` plus 2, before today)."""
    data_dir = tmp_path / "data"
    days = history_of_days(data_dir, 200)
    streak = f'[[rules]]\nid = "streak"\nkind = "streak"\nvisits = 3\ndays = {streak_days}\npoints = 5\n'
    now = datetime.fromisoformat(days[-1] + "T12:00:00+00:00").timestamp()
    gw = gateway_on(data_dir, now, history_days, streak if streak_days else "")
    try:
        gw.step(now)
        assert sorted(os.listdir(data_dir / "history")) == [f"{d}.jsonl" for d in days[-kept:]]
        gw.step(now + 60)  # the same day: nothing more to do
        assert gw.store.diagnostics()["history_days_deleted"] == 200 - kept
    finally:
        gw.store.close()


def test_a_clock_far_ahead_or_not_synchronised_does_not_delete_the_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Pi's clock before NTP may be a year off: days of history are counted back from the newest one written, not
    from a "today" ahead of all of them, and nothing is deleted while a live clock is known not to be synchronised."""
    import gateway.runtime as rt

    data_dir = tmp_path / "data"
    days = history_of_days(data_dir, 60)
    year_on = datetime.fromisoformat(days[-1] + "T12:00:00+00:00").timestamp() + 365 * DAY_S
    gw = gateway_on(data_dir, year_on)
    try:
        gw.step(year_on)
        assert len(os.listdir(data_dir / "history")) == 60, "counted back from the newest day written: none is old"
    finally:
        gw.store.close()
    monkeypatch.setattr(rt, "clock_synchronised", lambda: False)
    gw = gateway_on(data_dir, year_on + 2 * DAY_S, history_days=30)
    gw.data_clock = rt.Clock()  # live: the system clock's
    try:
        gw.step(year_on + 2 * DAY_S)
        assert len(os.listdir(data_dir / "history")) == 60, "not while the clock is not synchronised"
        monkeypatch.setattr(rt, "clock_synchronised", lambda: True)
        gw.step(year_on + 2 * DAY_S + 1)
        assert len(os.listdir(data_dir / "history")) == 30, "once it is"
    finally:
        gw.store.close()


def test_a_day_file_that_cannot_be_deleted_does_not_stop_the_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleting old history is housekeeping: a day file that cannot be deleted is logged and kept. Raising stopped
    the pipeline, and the first tick of every restart (systemd's Restart=on-failure) stopped it again."""
    from firmware_sim.scenario import load_scenario, scenario_plan
    from firmware_sim.world import World
    from gateway.config import Settings
    from gateway.identity import MemberDirectory
    from gateway.points import load_rules
    from gateway.runtime import Gateway
    from sensors.sim import SimSource

    data_dir = tmp_path / "data"
    days = history_of_days(data_dir, 100)
    stuck = data_dir / "history" / f"{days[0]}.jsonl"
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path) == stuck:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text('[[rules]]\nid = "visit"\nkind = "visit"\npoints = 10\n')
    scenario = load_scenario("default")
    settings = Settings().model_copy(update={"plan": scenario_plan(scenario), "timezone": "UTC"})
    now = datetime.fromisoformat(days[-1] + "T12:00:00+00:00").timestamp()
    store = Store(data_dir)
    gw = Gateway(settings, store, SimSource(World(scenario, 1, now)), MemberDirectory(), load_rules(rules_file), [])
    try:
        gw.step(now)
        gw.step(now + 1)
    finally:
        store.close()
    assert f"cannot delete the history before {days[10]}" in caplog.text
    assert stuck.exists()


def test_a_day_file_deleted_while_the_ledger_is_read_is_skipped(
    open_store: Callable[..., Store], data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deletes day files on the writer thread; a `cmd/rules` reading the ledger on the loop may have listed
    one of them just before: it is gone, not unreadable."""
    days = history_of_days(data_dir, 3)
    s = open_store()
    listed = s._day_files()
    (data_dir / "history" / f"{days[0]}.jsonl").unlink()
    monkeypatch.setattr(s, "_day_files", lambda: listed)
    assert [a.day for a in s.awards()] == [days[1]] * 3 + [days[2]] * 3
