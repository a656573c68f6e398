"""App check-ins end to end through `POST /api/v1/checkins` on a real Gateway and Store: every answer code,
refusals that change nothing, replays across restarts, the merge with BLE sightings, and the property that no
sequence of check-ins, replays and restarts awards a rule twice for a visit."""

from __future__ import annotations

import asyncio
import errno
import json
import secrets
import shutil
import threading
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

from dashboard.app import create_app
from gateway.config import Settings
from gateway.identity import MemberDirectory
from gateway.model import Advert, ZoneEstimate
from gateway.points import load_rules
from gateway.runtime import CommitWriter, Gateway
from gateway.store import Store, StoreError
from sensors.checkins import MAX_BODY, REASONS, sign

NOW = 1_780_000_000.0
KEYS = {"m-1": bytes(range(32)), "m-2": b"\x02" * 32}


class NoAdverts:
    """A source that hears nothing: these tests drive the gateway through check-ins."""

    name = "none"

    async def start(self) -> None:
        pass

    def poll(self, now: float) -> list[Advert]:
        return []

    async def stop(self) -> None:
        pass

    def diagnostics(self) -> dict[str, Any]:
        return {}


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def gateway(data_dir: Path, clock: Clock) -> Gateway:
    members = MemberDirectory()
    members.set_members(KEYS)
    gw = Gateway(Settings(), Store(data_dir), NoAdverts(), members, load_rules(None), [])
    gw.clock = clock
    return gw


def body(member: str = "m-1", *, ts: float = NOW, key: bytes | None = None, **over: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {"member": member, "store": "demo-store", "ts": int(ts), "nonce": secrets.token_hex(16)}
    obj.update(over)
    obj["sig"] = sign(key or KEYS.get(member, b"\x00" * 32), obj)
    return obj


def post(client: TestClient, obj: dict[str, Any] | bytes) -> Any:
    content = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return client.post("/api/v1/checkins", content=content, headers={"content-type": "application/json"})


def state(gw: Gateway) -> tuple[int, int, int]:
    return gw.store.last_seq(), len(gw.store.awards()), len(gw.tracker.open_visits())


@pytest.fixture
def gw(tmp_path: Path) -> Any:
    g = gateway(tmp_path / "data", Clock(NOW))
    yield g
    g.store.close()
    g.checkins.close()


def test_accepted_check_in_opens_a_visit_awards_and_publishes_in_order(gw: Gateway) -> None:
    with TestClient(create_app(gw)) as client:
        r = post(client, body())
        assert r.status_code == 201, r.text
        got = r.json()
    assert got["source"] == "checkin" and got["points_visit"] == got["points_today"] > 0
    assert {a["rule"] for a in got["awarded"]} == {"checkin", "visit"}  # a verified check-in proves presence
    types = [e.type for e in gw.store.pending_events()]
    assert types == ["visit.started", "checkin.accepted", "points.awarded", "points.awarded"]
    accepted = gw.store.pending_events()[1].data
    assert accepted["visit_id"] == got["visit_id"] and accepted["member"] == "m-1"
    for e in gw.store.pending_events():  # no key, no nonce, no signature upward
        text = json.dumps(e.envelope())
        assert KEYS["m-1"].hex() not in text and "sig" not in e.data and "nonce" not in e.data


def test_a_checked_in_visitor_counts_in_footfall_and_the_counts_survive_a_restart(tmp_path: Path) -> None:
    clock = Clock(NOW)
    gw = gateway(tmp_path / "data", clock)
    gw.step(NOW - 600)  # the pipeline's data time, ten minutes behind the wall clock (a catch-up after a suspend)
    with TestClient(create_app(gw)) as client:
        assert post(client, body()).status_code == 201
        gw.step(NOW - 300)
        # Counted once the pipeline reaches its time, in order with the radio's: no minute before it closes early.
        assert client.get("/api/v1/footfall").json()["visitors_today"] == 0
        closed = [e.data["minute"] for e in gw.store.pending_events() if e.type == "footfall.minute"]
        assert max(closed) < NOW - 300, closed
        gw.step(NOW + 1)
        snap = client.get("/api/v1/footfall").json()
    assert (snap["occupancy"], snap["entries_last_hour"], snap["visitors_today"]) == (1, 1, 1), snap
    gw.step(NOW + 61)  # the check-in's minute closes: its entry is in it
    gw.end_visits(NOW + 61)  # a clean stop ends the visit
    gw.store.close()
    gw.checkins.close()
    minutes = {e["data"]["minute"]: e["data"] for e in _pending_event_records(tmp_path / "data", "footfall.minute")}
    assert minutes[NOW - NOW % 60]["entries"] == 1, minutes

    # Restarted the same minute: today's visitor is still counted, and no minute is published twice.
    clock.t = NOW + 62
    again = gateway(tmp_path / "data", clock)
    try:
        again.step(NOW + 62)
        assert again.footfall.snapshot()["visitors_today"] == 1
        again.step(NOW + 200)
        published = [e.data["minute"] for e in again.store.pending_events() if e.type == "footfall.minute"]
        assert len(published) == len(set(published)), f"a minute published twice: {published}"
        exits = {e.data["minute"]: e.data["exits"] for e in again.store.pending_events() if e.type == "footfall.minute"}
        assert sum(exits.values()) == 1, exits
    finally:
        again.store.close()
        again.checkins.close()


def _visit_events(data: Path) -> list[tuple[str, str]]:
    """(type, visit id) of every visit event in a stopped gateway's outbox, in order."""
    return [(r["type"], r["data"]["visit_id"]) for kind in ("visit.started", "visit.ended") for r in
            _pending_event_records(data, kind)]  # fmt: skip


@pytest.mark.parametrize("how", ["stop", "power loss"])
def test_a_members_visit_goes_on_across_a_restart_once_started_once_ended_once_awarded(
    tmp_path: Path, how: str
) -> None:
    clock = Clock(NOW)
    data = tmp_path / "data"
    gw = gateway(data, clock)
    with TestClient(create_app(gw)) as client:
        visit_id = post(client, body()).json()["visit_id"]
    if how == "stop":  # SIGTERM: a restart follows, the member's visit is kept for it
        gw.step(NOW + 1)
        assert gw.footfall.snapshot()["occupancy"] == 1
        gw.end_visits(NOW + 2, restart=True)
        gw.store.close()
    else:  # the power goes right after the check-in's write, before footfall counted it at a tick
        data = tmp_path / "after-power-loss"
        shutil.copytree(tmp_path / "data", data)
        gw.store.close()
    gw.checkins.close()
    assert _visit_events(data) == [("visit.started", visit_id)]

    clock.t = NOW + 30  # back 28 s later
    again = gateway(data, clock)
    try:
        again.step(NOW + 30)
        assert [v.visit_id for v in again.tracker.open_visits()] == [visit_id]
        snap = again.footfall.snapshot()
        assert (snap["occupancy"], snap["visitors_today"]) == (1, 1), snap
        with TestClient(create_app(again)) as client:  # checking in again joins the same visit: no new points
            got = post(client, body(ts=clock.t)).json()
        assert (got["visit_id"], got["awarded"]) == (visit_id, [])
        again.step(NOW + 200)  # not heard since: it ends, once, where it was last heard
        assert again.footfall.snapshot()["occupancy"] == 0
    finally:
        again.store.close()
        again.checkins.close()
    assert _visit_events(data) == [("visit.started", visit_id), ("visit.ended", visit_id)]
    (ended,) = _pending_event_records(data, "visit.ended")
    assert ended["data"]["ended"] == ended["data"]["started"] + 30, ended  # the check-ins at NOW and NOW + 30
    with Store(data) as store:
        per_rule = Counter(a.rule for a in store.awards() if a.visit_id == visit_id)
    assert set(per_rule.values()) == {1}, per_rule


def test_visits_a_late_restart_ends_are_stored_and_no_check_in_is_told_their_points(tmp_path: Path) -> None:
    clock = Clock(NOW)
    gw = gateway(tmp_path / "data", clock)
    with TestClient(create_app(gw)) as client:
        first = post(client, body("m-2")).json()
    gw.step(NOW + 700)  # m-2 checked in 11 minutes ago and was not heard since: still open (check-ins' timeout)
    gw.end_visits(NOW + 700, restart=True)
    gw.store.close()
    gw.checkins.close()

    clock.t = NOW + 700 + Settings().visits.resume_within_s + 60  # back too late: m-2's visit ends at the start
    again = gateway(tmp_path / "data", clock)
    try:
        with TestClient(create_app(again)) as client:
            got = post(client, body("m-1", ts=clock.t)).json()
        assert {a["rule"] for a in got["awarded"]} == {"checkin", "visit"}, "only m-1's own points"
        assert got["points_today"] == sum(a["points"] for a in got["awarded"])
        ended = [v.visit_id for v in again.store.visits_of("member:m-2")]
        assert ended == [first["visit_id"]], "the ended visit is in the history, for points explain and the dashboard"
    finally:
        again.store.close()
        again.checkins.close()


def _pending_event_records(data: Path, kind: str) -> list[dict[str, Any]]:
    store = Store(data)
    try:
        return [e.to_record() for e in store.pending_events() if e.type == kind]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("make", "status", "reason", "field"),
    [
        (lambda: body(key=b"\x09" * 32), 401, "bad_signature", None),  # forged: signed with another key
        (lambda: {**body(), "ts": int(NOW) + 1}, 401, "bad_signature", None),  # changed after signing
        (lambda: body("m-9"), 401, "unknown_member", None),
        (lambda: body(ts=NOW - 121), 409, "stale", "ts"),
        (lambda: body(ts=NOW + 121), 409, "stale", "ts"),
        (lambda: json.dumps(body(beacon="beacon:" + "a" * 120)).encode() + b" " * MAX_BODY, 413, "too_large", None),
        (lambda: b"{not json", 422, "malformed", None),
        (lambda: b"[1, 2]", 422, "malformed", None),
        (lambda: {k: v for k, v in body().items() if k != "nonce"}, 422, "malformed", "nonce"),
        (lambda: body(nonce="abc"), 422, "malformed", "nonce"),
        (lambda: body(nonce="ZZ" * 10), 422, "malformed", "nonce"),
        (lambda: {**body(), "ts": NOW}, 422, "malformed", "ts"),  # a float
        (lambda: {**body(), "ts": True}, 422, "malformed", "ts"),
        (lambda: body(points=1000), 422, "malformed", "points"),
        (lambda: body(store="other-store"), 422, "wrong_store", "store"),
        (lambda: b'{"member": "m-1", "member": "m-2"}', 422, "malformed", "member"),
    ],
)
def test_each_refusal_has_its_code_reason_and_field_is_counted_and_changes_nothing(
    gw: Gateway, make: Any, status: int, reason: str, field: str | None
) -> None:
    with TestClient(create_app(gw)) as client:
        before = state(gw)
        r = post(client, make())
        answered = "unauthorized" if status == 401 else reason  # which refs exist is not told (counted apart)
        assert (r.status_code, r.json()["reason"], r.json().get("field")) == (status, answered, field), r.text
        assert REASONS[reason] == status
        assert state(gw) == before
        counts = client.get("/api/v1/status").json()["checkins"]
    assert counts["refused"][reason] == 1 and sum(counts["refused"].values()) == 1
    assert counts["accepted"] == 0 and counts["nonces"] == 0


@pytest.mark.parametrize("ref", ["-m1", ".m1", "_m1", ":m1", "m" * 65, ""])
def test_a_member_ref_must_start_with_a_letter_or_digit_and_the_refusal_says_so(gw: Gateway, ref: str) -> None:
    with TestClient(create_app(gw)) as client:
        r = post(client, body(ref))
    assert (r.status_code, r.json()["reason"], r.json()["field"]) == (422, "malformed", "member"), r.text
    assert "starting with a letter or digit" in r.text


def test_an_unknown_member_and_a_bad_signature_get_the_same_answer(gw: Gateway) -> None:
    with TestClient(create_app(gw)) as client:
        unknown, forged = post(client, body("m-9")), post(client, body(key=b"\x09" * 32))
    assert unknown.status_code == forged.status_code == 401
    assert unknown.json() == forged.json() and "sorted keys" in unknown.json()["message"]


def test_replay_and_rate_limit(gw: Gateway) -> None:
    with TestClient(create_app(gw)) as client:
        first = body()
        assert post(client, first).status_code == 201
        before = state(gw)
        r = post(client, first)
        assert (r.status_code, r.json()["reason"]) == (409, "replayed")
        assert state(gw) == before
        for _ in range(5):
            assert post(client, body()).status_code == 201  # 6 in all: the limit
        r = post(client, body())
        assert (r.status_code, r.json()["reason"]) == (429, "rate_limited")
        assert 0 < int(r.headers["Retry-After"]) <= 600 and f"try again in {r.headers['Retry-After']} s" in r.text
        assert post(client, body("m-2")).status_code == 201, "the limit is per member"
        counts = client.get("/api/v1/status").json()["checkins"]
        metrics = client.get("/metrics").text
    assert counts["accepted"] == 7 and counts["refused"]["replayed"] == 1 and counts["refused"]["rate_limited"] == 1
    assert "visita_checkins_accepted_total 7\n" in metrics
    assert 'visita_checkins_refused_total{reason="replayed"} 1\n' in metrics
    assert 'visita_checkins_refused_total{reason="bad_signature"} 0\n' in metrics


def test_a_replay_after_a_restart_is_refused_until_it_is_stale(tmp_path: Path) -> None:
    clock = Clock(NOW)
    gw = gateway(tmp_path, clock)
    first = body()
    with TestClient(create_app(gw)) as client:
        assert post(client, first).status_code == 201
    gw.store.close()
    gw.checkins.close()
    clock.t = NOW + 30
    gw = gateway(tmp_path, clock)
    with TestClient(create_app(gw)) as client:
        r = post(client, first)
        assert (r.status_code, r.json()["reason"]) == (409, "replayed")
        clock.t = NOW + 121
        r = post(client, first)
        assert (r.status_code, r.json()["reason"]) == (409, "stale")
    gw.store.close()
    gw.checkins.close()


def test_a_check_in_joins_the_members_ble_visit_as_source_both(gw: Gateway) -> None:
    subject = "member:m-1"
    estimates = [ZoneEstimate(NOW - 60 + i * 5, subject, "entrance", True, -60.0) for i in range(12)]
    started = gw.tracker.update(estimates, NOW)
    assert [c.kind for c in started] == ["started"]
    with TestClient(create_app(gw)) as client:
        r = post(client, body())
    assert r.status_code == 201
    assert r.json()["visit_id"] == started[0].visit.visit_id and r.json()["source"] == "both"
    (v,) = gw.tracker.open_visits()
    assert v.source == "both"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["new", "replay", "restart", "tick"]), st.integers(0, 1)), max_size=25))
def test_no_sequence_of_check_ins_replays_and_restarts_awards_a_rule_twice_for_a_visit(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]
) -> None:
    data = tmp_path_factory.mktemp("prop")
    clock = Clock(NOW)
    gw = gateway(data, clock)
    client = TestClient(create_app(gw))
    sent: list[dict[str, Any]] = []
    try:
        for op, who in ops:
            member = f"m-{who + 1}"
            if op == "new":
                obj = body(member, ts=clock.t)
                sent.append(obj)
                assert post(client, obj).status_code in (201, 429)
            elif op == "replay" and sent:
                assert post(client, sent[-1]).status_code in (409,)
            elif op == "restart":
                client.close()
                gw.store.close()
                gw.checkins.close()
                gw = gateway(data, clock)
                client = TestClient(create_app(gw))
            elif op == "tick":
                clock.t += 20
                gw.step(clock.t)
        ledger = gw.store.awards()
        per_visit_rule = Counter((a.visit_id, a.rule) for a in ledger)
        assert all(n == 1 for n in per_visit_rule.values()), per_visit_rule
        per_day_rule = Counter((a.member, a.rule, a.day) for a in ledger)
        assert all(n == 1 for n in per_day_rule.values()), "built-in rules fire once per member and day"
        published = [e.data["award_id"] for e in gw.store.pending_events() if e.type == "points.awarded"]
        assert len(published) == len(set(published))
    finally:
        client.close()
        gw.store.close()
        gw.checkins.close()


def test_ble_sightings_after_a_check_in_join_its_visit_as_source_both(gw: Gateway) -> None:
    with TestClient(create_app(gw)) as client:
        r = post(client, body())
    assert r.status_code == 201 and r.json()["source"] == "checkin"
    subject = "member:m-1"
    estimates = [ZoneEstimate(NOW + 5 + i * 5, subject, "entrance", True, -60.0) for i in range(6)]
    assert [c.kind for c in gw.tracker.update(estimates, NOW + 35)] == [], "the same visit, not a second one"
    (v,) = gw.tracker.open_visits()
    assert (v.visit_id, v.source) == (r.json()["visit_id"], "both")
    ended = gw.tracker.update([], NOW + 35 + 3600)
    assert [(c.kind, c.visit.visit_id, c.visit.source) for c in ended] == [("ended", v.visit_id, "both")]


def test_no_key_or_signature_reaches_the_data_directory(tmp_path: Path) -> None:
    gw = gateway(tmp_path, Clock(NOW))
    sent = [body(), body("m-2")]
    with TestClient(create_app(gw)) as client:
        assert [post(client, b).status_code for b in sent] == [201, 201]
    gw.store.close()
    gw.checkins.close()
    blob = b"".join(f.read_bytes() for f in tmp_path.rglob("*") if f.is_file())
    assert b"checkin.accepted" in blob and b"m-2" in blob  # what was stored is there
    for k in KEYS.values():
        assert k.hex().encode() not in blob
    for b in sent:
        assert b["sig"].encode() not in blob


# --------------------------------------------------------------------------- the runtime's writer thread


def test_check_ins_through_the_writer_thread_are_on_disk_when_answered_and_share_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = {f"w-{i}": secrets.token_bytes(32) for i in range(20)}
    members = MemberDirectory()
    members.set_members(keys)
    data = tmp_path / "data"
    gw = Gateway(Settings(), Store(data), NoAdverts(), members, load_rules(None), [])
    gw.clock = Clock(NOW)
    real_write = gw.store.write_commit
    threads: set[str] = set()

    def slow_disk(pending: Any) -> None:  # 50 ms a commit: the loop must not wait for it
        threads.add(threading.current_thread().name)
        time.sleep(0.05)
        real_write(pending)

    monkeypatch.setattr(gw.store, "write_commit", slow_disk)
    answered_on_disk: list[bool] = []
    loop_turns = 0

    async def one(ref: str) -> None:
        got = await gw.checkin_async(json.dumps(body(ref, key=keys[ref])).encode())
        hot = (data / "visita.json").read_text()
        answered_on_disk.append(got["visit_id"] in hot and all(a["award_id"] in hot for a in got["awarded"]))

    async def turns() -> None:
        nonlocal loop_turns
        while True:
            loop_turns += 1
            await asyncio.sleep(0.002)

    async def main() -> None:
        gw.writer = CommitWriter(gw)
        ticker = asyncio.create_task(turns())
        try:
            await asyncio.gather(*(one(ref) for ref in keys))
        finally:
            ticker.cancel()
            await gw.writer.drain()
            gw.writer.close()

    try:
        asyncio.run(main())
        assert answered_on_disk == [True] * len(keys)
        assert threads == {"visita-writer_0"}  # the disk work ran on the writer thread only
        assert gw.store.diagnostics()["commits"] <= 3  # 20 check-ins, one or two group commits
        assert loop_turns >= 5  # the loop went on turning during the writes (blocked by them, it would turn once)
    finally:
        gw.store.close()
        gw.checkins.close()


def test_a_failed_commit_on_the_writer_fails_its_check_ins_and_the_next_tick_but_loses_nothing(
    gw: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = gw.store.write_commit

    def broken(pending: Any) -> None:
        pending.error = OSError(errno.EIO, "Input/output error")

    async def main() -> None:
        gw.writer = CommitWriter(gw)
        monkeypatch.setattr(gw.store, "write_commit", broken)
        with pytest.raises(StoreError, match="Input/output error"):
            await gw.checkin_async(json.dumps(body()).encode())
        with pytest.raises(StoreError):  # raised to the pipeline at its next tick
            gw.step(NOW + 1)
        monkeypatch.setattr(gw.store, "write_commit", real_write)
        gw.step(NOW + 2)
        await gw.writer.drain()
        gw.writer.close()
        gw.writer = None

    asyncio.run(main())
    types = [e.type for e in gw.store.sendable(0, 100)]  # on disk now, the accepted check-in included
    assert types == ["visit.started", "checkin.accepted", "points.awarded", "points.awarded"]


def test_a_clock_step_moves_the_rate_limits_window_with_it_and_a_replay_stays_refused() -> None:
    # A member checked in 3 times (the limit here) in the minute before the gateway's clock was stepped forward by an
    # hour: a fourth check-in a second after the step is still one too many, and a replay of an earlier one is stale.
    from sensors.checkins import CheckinRefused, CheckinVerifier

    by = 3600.0

    def verifier(shift: bool) -> tuple[CheckinVerifier, list[bytes]]:
        v = CheckinVerifier("demo-store", KEYS.get, rate_n=3, rate_window_s=60)
        sent = [json.dumps(body(ts=NOW + i)).encode() for i in range(3)]
        for i, b in enumerate(sent):
            v.verify(b, NOW + i)
        if shift:
            v.shift(by)
        return v, sent

    v, sent = verifier(True)
    for again, reason in ((json.dumps(body(ts=NOW + by + 3)).encode(), "rate_limited"), (sent[0], "stale")):
        with pytest.raises(CheckinRefused) as refused:
            v.verify(again, NOW + by + 4)
        assert refused.value.reason == reason
    v, _ = verifier(False)
    assert v.verify(json.dumps(body(ts=NOW + by + 3)).encode(), NOW + by + 4).member == "m-1", "the window had passed"
