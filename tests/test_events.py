"""Tests for gateway.events: envelope, gapless seq across restarts, UUIDv7 ids, topics, and privacy of payloads."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Callable
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import EstimateConfig, VisitsConfig, default_plan
from gateway.days import LocalDays
from gateway.estimate import StrongestReceiver
from gateway.events import EventFactory, topic, topic_prefix, uuid7
from gateway.identity import Identifier, MemberDirectory
from gateway.model import (
    EVENT_TYPES,
    Advert,
    Award,
    DeviceFrame,
    Event,
    Frame,
    MemberFrame,
    Visit,
    VisitChange,
    ZoneSegment,
)
from gateway.points import PointsEngine, load_rules
from gateway.visits import VisitTracker

T0 = 1_764_000_000.0
RFC3339_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
ENVELOPE_KEYS = {"schema", "id", "ts", "store", "gateway", "seq", "data"}


def a_visit(kind: str = "visitor", ended: float | None = None) -> Visit:
    segs = (ZoneSegment("entrance", T0, T0 + 30), ZoneSegment("produce", T0 + 30, T0 + 200))
    return Visit("0123456789abcdef01234567", "member:m-1", T0, ended, segs, kind, "ble")  # type: ignore[arg-type]


def an_award() -> Award:
    return Award("a" * 32, "m-1", "visit", 10, "0123456789abcdef01234567", T0 + 200, "2025-11-24", "visit with 200 s")


# --------------------------------------------------------------------------- seq


def test_seq_is_gapless_across_factory_restarts_from_last_seq() -> None:
    seqs: list[int | None] = []
    last = 0
    for run in range(4):  # four gateway runs, each continuing from the stored last seq
        f = EventFactory("store-1", "gw-1", last)
        for i in range(run + 2):
            seqs.append(f.make("footfall.minute", T0 + i, {"minute": T0}).seq)
        seqs.append(f.from_award(an_award()).seq)
        last = f.last_seq
    assert seqs == list(range(1, len(seqs) + 1))


def test_status_pass_bys_and_bad_types_do_not_use_a_seq() -> None:
    f = EventFactory("store-1", "gw-1", 41)
    assert f.status(T0, True, "1.0").seq is None
    assert f.from_change(VisitChange("ended", T0 + 60, a_visit("pass-by", ended=T0 + 60))) is None
    with pytest.raises(ValueError):
        f.make("visit.teleported", T0, {})
    assert f.last_seq == 41
    assert f.make("health", T0, {}).seq == 42


def test_events_from_visit_changes_and_awards() -> None:
    f = EventFactory("store-1", "gw-1", 0)
    started = f.from_change(VisitChange("started", T0 + 45, a_visit()))
    moved = f.from_change(VisitChange("zone", T0 + 30, a_visit(), from_zone="entrance"))
    ended = f.from_change(VisitChange("ended", T0 + 200, a_visit(ended=T0 + 200)))
    staff = f.from_change(VisitChange("ended", T0 + 200, a_visit("staff", ended=T0 + 200)))
    awarded = f.from_award(an_award())
    assert started is not None and moved is not None and ended is not None and staff is not None
    assert [e.type for e in (started, moved, ended, staff, awarded)] == [
        "visit.started",
        "zone.changed",
        "visit.ended",
        "visit.ended",
        "points.awarded",
    ]
    assert moved.data == {
        "visit_id": "0123456789abcdef01234567",
        "subject": "member:m-1",
        "from": "entrance",
        "to": "produce",
    }
    d = ended.data
    assert (d["dwell_s"], d["path"], d["ended"], d["member"], d["subject_kind"]) == (
        200.0,
        ["entrance", "produce"],
        T0 + 200,
        "m-1",
        "member",
    )
    assert d["zones"] == [{"zone": "entrance", "dwell_s": 30.0}, {"zone": "produce", "dwell_s": 170.0}]
    assert awarded.data["award_id"] == "a" * 32 and awarded.ts == T0 + 200


# --------------------------------------------------------------------------- uuid7


def fixed(value: bytes) -> Callable[[int], bytes]:
    return lambda n: value[:n]


def test_uuid7_layout_version_variant_and_timestamp() -> None:
    for rand in (b"\x00" * 10, b"\xff" * 10, bytes(range(10))):
        u = uuid.UUID(uuid7(T0 + 0.123, rand=fixed(rand)))
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert u.int >> 80 == 1_764_000_000_123
    # all 74 random bits are used: two random inputs that differ only in their last byte give different ids
    a = uuid7(T0, rand=lambda n: b"\x00" * (n - 1) + b"\x01")
    b = uuid7(T0, rand=lambda n: b"\x00" * (n - 1) + b"\x02")
    c = uuid7(T0, rand=lambda n: b"\x10" + b"\x00" * (n - 1))  # top random bits land in rand_a
    assert len({a, b, c}) == 3


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1_600_000_000_000, max_value=2_500_000_000_000), min_size=2, max_size=50))
def test_uuid7_ids_sort_by_event_time_in_milliseconds(stamps_ms: list[int]) -> None:
    f = EventFactory("store-1", "gw-1", 0)
    events = [f.make("health", ms / 1000, {}) for ms in stamps_ms]
    by_id = sorted(events, key=lambda e: e.id)
    assert [round(e.ts * 1000) for e in by_id] == sorted(stamps_ms)
    for e in events:  # and the id's timestamp is the envelope's ts
        shown = datetime.fromisoformat(e.envelope()["ts"].replace("Z", "+00:00"))
        assert uuid.UUID(e.id).int >> 80 == round(shown.timestamp() * 1000)


def test_uuid7_ids_are_unique_within_one_millisecond() -> None:
    f = EventFactory("store-1", "gw-1", 0)
    ids = {f.make("health", T0, {}).id for _ in range(20_000)}
    assert len(ids) == 20_000


# --------------------------------------------------------------------------- envelope


def test_envelope_json_has_the_documented_shape() -> None:
    f = EventFactory("berlin-042", "gw-front", 38)
    e = f.from_change(VisitChange("ended", T0 + 125.3651, a_visit(ended=T0 + 125.3651)))
    assert e is not None
    env = json.loads(e.payload().decode("utf-8"))
    assert set(env) == ENVELOPE_KEYS
    assert env["schema"] == "visita.visit.ended/1"
    assert uuid.UUID(env["id"]).version == 7 and env["id"] == str(uuid.UUID(env["id"]))
    assert env["ts"] == "2025-11-24T16:02:05.365Z" and RFC3339_MS.match(env["ts"])
    assert (env["store"], env["gateway"], env["seq"]) == ("berlin-042", "gw-front", 39)
    assert env["data"]["visit_id"] == "0123456789abcdef01234567"
    status = json.loads(f.status(T0, False, "0.1.0").payload())
    assert status["seq"] is None and status["schema"] == "visita.status/1" and status["data"]["state"] == "offline"
    assert b" " not in e.payload().split(b'"data"')[0]  # compact


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_record_round_trips_through_json_for_every_type(event_type: str) -> None:
    f = EventFactory("s", "g", 0)
    data = {"n": 1, "x": 0.1 + 0.2, "s": "zone ü", "none": None, "list": [1, "a"], "nested": {"k": [T0]}}
    e = f.status(T0 + 0.001, True, "1") if event_type == "status" else f.make(event_type, T0 + 0.001, data)
    back = Event.from_record(json.loads(json.dumps(e.to_record())))
    assert back == e
    assert back.payload() == e.payload()


# --------------------------------------------------------------------------- topics


def test_topic_is_built_from_validated_parts() -> None:
    assert topic("berlin-042", "gw_front", "visit.started") == "visita/v1/berlin-042/gw_front/visit.started"
    assert topic_prefix("s", "g") == "visita/v1/s/g/"


@pytest.mark.parametrize(
    ("store", "gateway", "event_type"),
    [
        ("s", "g", "visit.teleported"),
        ("s", "g", "visit/started"),
        ("s", "g", "#"),
        ("a/b", "g", "status"),
        ("+", "g", "status"),
        ("s", "#", "status"),
        ("s", "g/+", "status"),
        ("", "g", "status"),
        ("s", "", "status"),
        ("Store", "g", "status"),
        ("s", "g\x00", "status"),
        ("s", "g h", "status"),
        ("s", "-g", "status"),
        ("s" * 65, "g", "status"),
    ],
)
def test_topic_rejects_invalid_parts(store: str, gateway: str, event_type: str) -> None:
    with pytest.raises(ValueError):
        topic(store, gateway, event_type)


def test_factory_refuses_ids_that_cannot_be_in_a_topic() -> None:
    with pytest.raises(ValueError):
        EventFactory("store/1", "gw-1", 0)
    with pytest.raises(ValueError):
        topic_prefix("store", "gw+")


# --------------------------------------------------------------------------- privacy


ADDRESSES = ["D4:1E:77:0A:9B:3C", "6F:22:41:C9:08:E7", "5A:11:22:33:44:55"]
MEMBER_KEYS = {"m-1": hashlib.sha256(b"member one").digest(), "s-9": hashlib.sha256(b"staff nine").digest()}


def _forms(value: bytes | str) -> list[str]:
    """The ways a secret or address could show up in JSON text."""
    if isinstance(value, str):
        bare = value.replace(":", "")
        return [value, bare, value.replace(":", "-"), value.replace(":", "_")]
    return [value.hex(), base64.b64encode(value).decode(), base64.urlsafe_b64encode(value).decode().rstrip("=")]


def test_no_address_member_key_token_or_salt_in_any_payload() -> None:
    salts: list[bytes] = []

    def salt() -> bytes:
        salts.append(hashlib.sha256(f"salt {len(salts)}".encode()).digest())
        return salts[-1]

    members = MemberDirectory()
    members.set_members(MEMBER_KEYS)
    days = LocalDays("Europe/Berlin")
    ident = Identifier(members, days, salt_source=salt)
    est = StrongestReceiver(default_plan(), EstimateConfig())
    tracker = VisitTracker("gw-1", VisitsConfig(absence_timeout_s=60, min_dwell_s=45, staff=["s-9"]))
    engine = PointsEngine(load_rules(None), days)
    factory = EventFactory("store-1", "gw-1", 0)

    tokens: list[bytes] = []
    events: list[Event] = []
    route = ["rx-entrance"] * 30 + ["rx-produce"] * 300 + ["rx-bakery"] * 400 + ["rx-checkout"] * 100
    for i, rx in enumerate(route + [None] * 100):
        ts = T0 + i
        decoded: list[tuple[Advert, Frame]] = []
        if rx is not None:
            window = int(ts // 900)
            for n, key in enumerate(MEMBER_KEYS.values()):
                token = hmac.new(key, window.to_bytes(8, "big"), hashlib.sha256).digest()[:8]
                tokens.append(token)
                frame = MemberFrame(version=1, window_lo=window & 0xFF, measured_power=-59, token=token)
                decoded.append((Advert(ts, rx, ADDRESSES[n], True, -60), frame))
            decoded.append((Advert(ts, rx, ADDRESSES[2], True, -62), DeviceFrame("apple", "nearby-info")))
        changes = tracker.update(est.update(ident.identify(decoded)), ts)
        events += [e for c in changes if (e := factory.from_change(c)) is not None]
        events += [factory.from_award(a) for a in engine.evaluate(changes)]
        if i % 200 == 0:
            events.append(factory.status(ts, True, "0.1.0"))

    types = {e.type for e in events}
    assert {"visit.started", "zone.changed", "visit.ended", "points.awarded", "status"} <= types
    assert any(e.data.get("classification") == "staff" for e in events)
    text = "\n".join(e.payload().decode() for e in events) + json.dumps([e.to_record() for e in events])
    low = text.lower()
    for address in ADDRESSES:
        for form in _forms(address):
            assert form.lower() not in low, f"address {address} leaked as {form}"
    for secret in [*MEMBER_KEYS.values(), *set(tokens), *salts]:
        for form in _forms(secret):
            assert form.lower() not in low, "a key, token or salt leaked"
    assert "member:m-1" in text  # the pseudonymous member ref is what identifies a member


def test_status_says_what_the_receivers_can_tell_when_given() -> None:
    f = EventFactory("s", "g", 0)
    assert "resolution" not in f.status(T0, True, "1").data
    assert f.status(T0, True, "1", "presence").data == {
        "state": "online",
        "version": "1",
        "role": "gateway",
        "resolution": "presence",
    }
    assert f.status(T0, False, "1", role="relay").data == {"state": "offline", "version": "1", "role": "relay"}
