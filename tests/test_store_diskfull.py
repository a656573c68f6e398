"""Disk full, for real: the data directory on a small tmpfs that a filler file fills up.

`visita run --sim` must keep running, say "disk full" once, keep (and not publish) new events in
memory, say "disk space is back" once the filler is removed, and in the end have delivered
every event. Mounting needs root (CAP_SYS_ADMIN); the test fails, never skips, without it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import VISITA, Broker, Subscriber
from test_checkins import NOW, body

from gateway.model import Award
from gateway.store import ROLL_EVERY, Store
from sensors.checkins import SKEW_S, CheckinRefused, CheckinVerifier, NonceJournal

pytestmark = pytest.mark.broker


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (run the tests as root): {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    """Write zeros to `path` until the file system is full."""
    block = b"\0" * 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)


def _wait(pred: object, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_disk_full_keeps_running_says_so_once_and_recovers(small_disk: Path, broker: Broker, tmp_path: Path) -> None:
    data = small_disk / "data"
    log = tmp_path / "stderr.log"
    sub = Subscriber(broker, client_id="diskfull-subscriber")
    args = [
        *VISITA, "run", "--sim", "--scenario", "small-shop", "--speed", "600", "--until", "2h",
        "--mqtt", broker.url, "--dashboard", "off", "--data-dir", str(data),
    ]  # fmt: skip
    filler = small_disk / "filler"
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert _wait(lambda: len(sub.snapshot()) >= 5, 30), "no events before the disk filled"
        _fill(filler)
        assert _wait(lambda: "disk full" in log.read_text(), 20), log.read_text()
        during = len(sub.snapshot())
        time.sleep(3)  # half an hour of store time with a full disk
        published_while_full = len(sub.snapshot()) - during
        filler.unlink()
        assert _wait(lambda: "disk space is back" in log.read_text(), 20), log.read_text()
        out, _ = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text
    assert text.count("disk full: cannot write") == 1, text
    assert text.count("disk space is back") == 1, text
    assert "Traceback" not in text, text
    # At most what was already committed and in flight when the disk filled went out meanwhile.
    assert published_while_full <= 300, published_while_full

    with Store(data) as s:
        n = s.last_seq()
        assert s.pending_events() == []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seqs = {int(str(p["seq"])) for _, p, _ in sub.snapshot() if p.get("seq") is not None}
        if len(seqs) >= n:
            break
        time.sleep(0.1)
    sub.close()
    assert seqs == set(range(1, n + 1)), f"missing: {sorted(set(range(1, n + 1)) - seqs)[:20]}"
    assert ", 0 still queued" in out


def test_a_stop_on_a_full_disk_says_which_events_are_lost_and_which_wait(small_disk: Path, tmp_path: Path) -> None:
    data = small_disk / "data"
    args = [
        *VISITA, "run", "--sim", "--scenario", "small-shop", "--speed", "600", "--until", "2h",
        "--mqtt", "off", "--dashboard", "off", "--data-dir", str(data),
    ]  # fmt: skip
    log = tmp_path / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert _wait(lambda: (data / "visita.json").exists(), 30), log.read_text()
        time.sleep(1)
        _fill(small_disk / "filler")
        assert _wait(lambda: "disk full" in log.read_text(), 20), log.read_text()
        time.sleep(1)  # events made meanwhile are held in memory only
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    m = re.search(
        r"(\d+) still queued in the outbox \(sent at next start\), (\d+) not written \(disk full\) and lost", out
    )
    assert m, out + log.read_text()
    (small_disk / "filler").unlink()
    with Store(data) as s:
        assert len(s.pending_events()) == int(m.group(1))  # what the summary says waits is what waits


def _award(n: int, reason: str = "visited the store") -> Award:
    return Award(f"award-{n}", "m-42", "visit", 10, f"v{n}", 1_764_000_000.0 + n, "2026-11-24", reason)


def _journal_to_roll(s: Store) -> None:
    """A journal that the next commit appends to the day file, its first record longer than a page of tmpfs."""
    s.put_awards([_award(0, "x" * 12_000)] + [_award(n) for n in range(1, ROLL_EVERY)])


def test_an_append_the_disk_cuts_short_is_undone_and_its_retry_loses_no_record(
    small_disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The commit below writes the hot file and then appends its journal to the day file. The disk has room for the
    # hot file only: the append gets the page the old hot file frees and the rest of the day file's last page, and
    # stops in the middle of its first record.
    with Store(tmp_path / "measure") as m:  # the size of that hot file, measured on a roomy disk
        m.put_awards([_award(-1)])
        m.close()
    with Store(tmp_path / "measure") as m:
        _journal_to_roll(m)
        assert m.commit()
        hot_pages = -(-(tmp_path / "measure" / "visita.json").stat().st_size // 4096)
    data = small_disk / "data"
    with Store(data) as s:
        s.put_awards([_award(-1)])  # the day file exists, with room left in its last page
    day = data / "history" / "2026-11-24.jsonl"
    s = Store(data)
    _journal_to_roll(s)
    before = day.stat().st_size
    filler = small_disk / "filler"
    _fill(filler)
    os.truncate(filler, filler.stat().st_size - hot_pages * 4096)
    with caplog.at_level(logging.INFO, logger="visita.store"):
        assert s.commit() is True, "the hot file is written"
        assert s.diagnostics()["journal"] == ROLL_EVERY, "the append did not get through: the records stay"
        assert day.stat().st_size == before, "what the disk took of the append is cut off again"
        assert s.diagnostics()["disk_full"] is True
        filler.unlink()
        assert s.commit(force=True) and s.commit(force=True)
        assert s.diagnostics()["journal"] == 0
        s.close()
        with Store(data) as s:
            assert len(s.awards()) == ROLL_EVERY + 1
    msgs = [r.getMessage() for r in caplog.records]
    assert not [m for m in msgs if "not a valid record" in m], msgs
    # Said in the order it happened: full (the append), then back (the next write).
    said = [m.split(":")[0] for m in msgs if m.startswith(("disk full", "disk space is back"))]
    assert said == ["disk full", "disk space is back"], msgs


def test_a_checkin_nonce_the_disk_cuts_short_is_refused_and_no_accepted_nonce_is_lost(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The nonce journal on a full disk: the line that meets the end of its last page gets part-way on. It must be
    # cut off again and the check-in refused as `unavailable` (nothing changed: the app may send it again), or the
    # next line joins the torn one and both nonces are forgotten at the next start (a replay accepted then).
    caplog.set_level(logging.INFO, logger="visita.checkins")
    key = b"\x07" * 32
    journal = NonceJournal(small_disk)
    v = CheckinVerifier("demo-store", lambda member: key, journal)
    v.verify(json.dumps(body("m-0", key=key)).encode(), NOW)  # the journal exists, its last page part-full
    _fill(small_disk / "filler")
    accepted = ["m-0"]
    refused, refused_at = None, 0
    for i in range(1, 200):
        if refused is not None and i > refused_at + 3:
            break  # a few more refused while the disk stays full
        try:
            v.verify(json.dumps(body(f"member-with-a-long-ref-{i:04d}", key=key)).encode(), NOW)
            accepted.append(f"member-with-a-long-ref-{i:04d}")
        except CheckinRefused as e:
            refused_at = i if refused is None else refused_at
            refused = e
    assert refused is not None and refused.reason == "unavailable" and refused.status == 503, refused
    assert refused.retry_after_s == 60 and v.refused["unavailable"] == 4
    assert journal.path.read_bytes().endswith(b"\n"), "no torn line is left at the end of the journal"
    said = [r.getMessage() for r in caplog.records if "check-ins are" in r.getMessage()]
    assert len(said) == 1 and "cannot be written" in said[0], said  # once, not at every refused check-in
    (small_disk / "filler").unlink()
    v.verify(json.dumps(body("m-after", key=key)).encode(), NOW)
    assert "app check-ins are recorded again" in caplog.text
    accepted.append("m-after")
    journal.close()
    remembered = {member for member, _nonce, _ts in NonceJournal(small_disk).load(NOW, SKEW_S)}
    assert remembered == set(accepted), sorted(set(accepted) - remembered)
