"""Tests for gateway.identity (and the store-local days it salts by): anonymous hashing, member tokens, beacons."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
from collections.abc import Callable
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import default_plan
from gateway.days import LocalDays
from gateway.identity import Identifier, MemberDirectory, beacon_subject, secret_id, store_day_salt
from gateway.model import (
    Advert,
    AltBeacon,
    DeviceFrame,
    EddystoneEID,
    EddystoneTLM,
    EddystoneUID,
    EddystoneURL,
    Frame,
    IBeacon,
    MemberFrame,
    Sighting,
    SubjectLink,
)

ADDRESS = "C0:FF:EE:12:34:56"
OTHER_ADDRESS = "C0:FF:EE:AB:CD:EF"
WINDOW_S = 900
# docs/frames.md, "Worked example": key bytes(range(32)) at 1764000123 gives this token in window 1960000.
DOC_KEY = bytes(range(32))
DOC_TS = 1_764_000_123.0
DOC_WINDOW = 1_960_000
DOC_TOKEN = bytes.fromhex("104de62a9dd59538")
PHONE = DeviceFrame(vendor="apple", kind="nearby-info")


def advert(ts: float, address: str = ADDRESS, rssi: int = -65, receiver: str = "rx-entrance") -> Advert:
    return Advert(ts=ts, receiver=receiver, address=address, address_random=True, rssi=rssi)


def counting_salts() -> tuple[Callable[[], bytes], list[bytes]]:
    """A salt source that hands out distinct, recognisable salts and records each one."""
    issued: list[bytes] = []
    counter = itertools.count()

    def source() -> bytes:
        salt = hashlib.sha256(f"test-salt-{next(counter)}".encode()).digest()
        issued.append(salt)
        return salt

    return source, issued


def identifier(timezone: str = "UTC", members: MemberDirectory | None = None) -> tuple[Identifier, list[bytes]]:
    source, issued = counting_salts()
    return Identifier(members or MemberDirectory(), LocalDays(timezone), salt_source=source), issued


def subject_of(ident: Identifier, ts: float, address: str = ADDRESS, frame: Frame = PHONE) -> str:
    (s,) = ident.identify([(advert(ts, address), frame)])
    return s.subject


def first_second_of_next_day(timezone: str, year: int, month: int, day: int) -> int:
    """The first UNIX second whose local date (by zoneinfo, looked up per second) is after the given date.

    Found by bisection on `datetime.fromtimestamp(...).date()` so the test does not reuse the way
    LocalDays computes midnight.
    """
    tz = ZoneInfo(timezone)
    date = datetime(year, month, day).date()
    lo = int(datetime(year, month, day, 12, tzinfo=tz).timestamp())  # local noon: no zone changes clocks then
    hi = lo + 2 * 86_400
    assert datetime.fromtimestamp(lo, tz).date() == date and datetime.fromtimestamp(hi, tz).date() > date
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).date() > date:
            hi = mid
        else:
            lo = mid
    return hi


def member_frame(key: bytes, window: int, measured_power: int = -59) -> MemberFrame:
    """What the app sends in `window`, computed here with hmac directly (not gateway.identity.member_token)."""
    token = hmac.new(key, window.to_bytes(8, "big"), hashlib.sha256).digest()[:8]
    return MemberFrame(version=1, window_lo=window & 0xFF, measured_power=measured_power, token=token)


def directory(**keys: bytes) -> MemberDirectory:
    d = MemberDirectory()
    d.set_members(keys)
    return d


# --------------------------------------------------------------------------- anonymous devices


def test_same_address_same_local_day_is_one_subject_other_addresses_are_not() -> None:
    ident, salts = identifier("Europe/Berlin")
    start = first_second_of_next_day("Europe/Berlin", 2026, 6, 14)  # 2026-06-15 00:00 local
    end = first_second_of_next_day("Europe/Berlin", 2026, 6, 15) - 1  # 2026-06-15 23:59:59 local
    subjects = {subject_of(ident, t) for t in (start, start + 3600, end - 60, end)}
    assert len(subjects) == 1
    assert subject_of(ident, end, OTHER_ADDRESS) not in subjects
    assert len(salts) == 1
    (subject,) = subjects
    assert subject.startswith("anon:") and len(subject) == len("anon:") + 16


@pytest.mark.parametrize(
    ("timezone", "date"),
    [
        ("UTC", (2026, 11, 24)),
        ("Europe/Berlin", (2026, 6, 15)),
        ("Europe/Berlin", (2026, 3, 29)),  # 23-hour day: clocks go 02:00 → 03:00
        ("Europe/Berlin", (2026, 10, 25)),  # 25-hour day: clocks go 03:00 → 02:00
        ("America/New_York", (2026, 11, 1)),  # 25-hour day, local midnight is 04:00Z / 05:00Z
        ("America/Santiago", (2025, 9, 6)),  # the next day starts at 01:00: local midnight does not exist
        ("America/Santiago", (2025, 4, 5)),  # 25-hour day ending with a repeated 23:00 hour
        ("Pacific/Kiritimati", (2026, 1, 1)),  # UTC+14: the local day is a UTC day earlier for most hours
    ],
)
def test_anon_subject_changes_exactly_at_local_midnight(timezone: str, date: tuple[int, int, int]) -> None:
    ident, salts = identifier(timezone)
    midnight = first_second_of_next_day(timezone, *date)
    before = [subject_of(ident, t) for t in (midnight - 43_200, midnight - 1)]
    after = [subject_of(ident, t) for t in (midnight, midnight + 1, midnight + 6 * 3600)]
    assert before[0] == before[1]
    assert after[0] == after[1] == after[2]
    assert before[0] != after[0]
    assert len(salts) == 2  # one salt per local day, not per sighting


def test_each_local_day_draws_a_fresh_salt_and_links_nothing_across_days() -> None:
    ident, salts = identifier("Europe/Berlin")
    first = first_second_of_next_day("Europe/Berlin", 2026, 3, 27)
    subjects = [subject_of(ident, first + day * 86_400 + 10 * 3600) for day in range(4)]  # 10:00 local, 4 days
    assert len(set(subjects)) == 4
    assert len(set(salts)) == 4


def test_late_sighting_from_yesterday_does_not_reset_todays_salt() -> None:
    # Remote receivers deliver late and batches are not sorted: a sighting from 23:59:58 that arrives
    # after today's first ones must not make today's devices change subject in the middle of the day.
    # (Each phone here is heard on one side of midnight only: one heard on both is carried over, below.)
    ident, _ = identifier("Europe/Berlin")
    midnight = first_second_of_next_day("Europe/Berlin", 2026, 6, 15)
    yesterday = subject_of(ident, midnight - 30, OTHER_ADDRESS)
    today = subject_of(ident, midnight + 5)
    assert subject_of(ident, midnight - 2, OTHER_ADDRESS) == yesterday  # late, from before midnight
    assert subject_of(ident, midnight + 10) == today
    assert subject_of(ident, midnight + 3600) == today
    # and a whole unsorted batch across midnight resolves each sighting by its own day
    batch = [(advert(t, a), PHONE) for t, a in ((midnight + 20, ADDRESS), (midnight - 1, OTHER_ADDRESS))]
    assert [s.subject for s in ident.identify(batch)] == [today, yesterday]
    assert ident.take_links() == []


def test_a_phone_heard_across_midnight_is_linked_to_its_new_subject_in_memory_only() -> None:
    ident, salts = identifier("Europe/Berlin")
    midnight = first_second_of_next_day("Europe/Berlin", 2026, 6, 15)  # 22:00 UTC
    before = subject_of(ident, midnight - 1.5)
    subject_of(ident, midnight - 7200, OTHER_ADDRESS)  # heard long before midnight, then again after it: not linked
    after = subject_of(ident, midnight + 0.5)
    assert before != after, "the salt changed: the hash alone links nothing"
    assert subject_of(ident, midnight + 2, OTHER_ADDRESS) != subject_of(ident, midnight - 7000, OTHER_ADDRESS)
    assert ident.take_links() == [SubjectLink(midnight + 0.5, before, after, "midnight")]
    assert subject_of(ident, midnight + 30) == after and ident.take_links() == [], "linked once"
    # a remote receiver's late sighting from before midnight is today's subject now: the phone goes on under it
    assert subject_of(ident, midnight - 1) == after
    assert ident.diagnostics()["midnight_links"] == 1
    assert len(salts) == 2


def test_a_batch_across_midnight_is_all_todays_subject_once_linked() -> None:
    # The sightings before the link in the batch too, so the estimator, which has carried the old subject's state on
    # under the new name, does not start the old one again from nothing.
    ident, _ = identifier("Asia/Tokyo")
    midnight = first_second_of_next_day("Asia/Tokyo", 2026, 6, 15)
    before = subject_of(ident, midnight - 20)
    got = ident.identify([(advert(t), PHONE) for t in (midnight - 1, midnight + 1, midnight - 0.5)])
    (link,) = ident.take_links()
    assert (link.old, link.reason) == (before, "midnight")
    assert [s.subject for s in got] == [link.new] * 3


def test_a_remote_sighting_carried_over_after_the_batch_is_relabelled_by_carry_over() -> None:
    ident, _ = identifier("UTC")
    midnight = first_second_of_next_day("UTC", 2026, 6, 15)
    before = ident.remote_subject(ADDRESS, midnight - 10)
    late = Sighting(midnight - 1, "node-1", ident.remote_subject(ADDRESS, midnight - 1), -70, -59)
    now = Sighting(midnight + 1, "node-1", ident.remote_subject(ADDRESS, midnight + 1), -70, -59)
    assert late.subject == before != now.subject
    assert [s.subject for s in ident.carry_over([late, now])] == [now.subject] * 2
    assert ident.carry_over([late]) == [late], "once: what came after the link is labelled anew already"


def test_the_window_is_the_carry_time_on_either_side_of_midnight() -> None:
    source, _ = counting_salts()
    ident = Identifier(MemberDirectory(), LocalDays("UTC"), salt_source=source, carry_s=60)
    midnight = first_second_of_next_day("UTC", 2026, 6, 15)
    subject_of(ident, midnight - 61)  # a minute of silence before midnight: the visit would have ended
    subject_of(ident, midnight + 1)
    subject_of(ident, midnight - 59, OTHER_ADDRESS)
    subject_of(ident, midnight + 61, OTHER_ADDRESS)  # and a minute after it
    subject_of(ident, midnight + 61, "C0:FF:EE:00:00:01")  # never heard before midnight
    assert ident.take_links() == []
    subject_of(ident, midnight + 59, OTHER_ADDRESS)
    assert [lk.reason for lk in ident.take_links()] == ["midnight"]


def test_a_constant_salt_links_nothing_at_midnight() -> None:
    ident = Identifier(MemberDirectory(), LocalDays("UTC"), salt_source=lambda: b"s" * 32)
    midnight = first_second_of_next_day("UTC", 2026, 6, 15)
    assert subject_of(ident, midnight - 1) == subject_of(ident, midnight + 1)
    assert ident.take_links() == []


def test_a_member_is_the_same_subject_across_midnight_and_nothing_is_linked() -> None:
    members = directory(**{"m-1": DOC_KEY})
    ident, _ = identifier("Europe/Berlin", members)
    midnight = first_second_of_next_day("Europe/Berlin", 2026, 6, 15)
    ts = [midnight - 2.0, midnight + 2.0]
    frames = [member_frame(DOC_KEY, int(t // WINDOW_S)) for t in ts]
    got = [ident.identify([(advert(t), f), (advert(t + 0.1), PHONE)]) for t, f in zip(ts, frames, strict=True)]
    assert {s.subject for batch in got for s in batch} == {"member:m-1"}, "the app's frame and the OS adverts alike"
    assert all(lk.reason == "member" for lk in ident.take_links())


def test_subject_is_keyed_by_the_salt_not_a_plain_hash_of_the_address() -> None:
    a, _ = identifier()
    b, _ = identifier()
    b_salted = Identifier(MemberDirectory(), LocalDays("UTC"), salt_source=lambda: b"another salt" * 3)
    ts = 1_764_000_000.0
    assert subject_of(a, ts) == subject_of(b, ts)  # same salt, same address: same subject (deterministic)
    assert subject_of(b_salted, ts) != subject_of(a, ts)
    unkeyed = {
        hashlib.sha256(v.encode()).hexdigest()[:16] for v in (ADDRESS, ADDRESS.lower(), ADDRESS.replace(":", ""))
    }
    assert subject_of(a, ts).removeprefix("anon:") not in unkeyed


def _forms(address: str) -> list[str]:
    bare = address.replace(":", "")
    return [address, address.lower(), bare, bare.lower(), address.replace(":", "-"), address.lower().replace(":", "-")]


def test_neither_address_nor_salt_appears_in_subjects_or_diagnostics() -> None:
    ident, salts = identifier("Europe/Berlin")
    members = directory(**{"m-1": DOC_KEY})
    ident_m = Identifier(members, LocalDays("Europe/Berlin"), salt_source=counting_salts()[0])
    ts = 1_764_000_000.0
    decoded: list[tuple[Advert, Frame]] = [
        (advert(ts, ADDRESS), PHONE),
        (advert(ts + 1, OTHER_ADDRESS), member_frame(b"\x01" * 32, int(ts // WINDOW_S))),  # unknown member
        (advert(ts + 2, ADDRESS), IBeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, 1, -59)),
        (advert(ts + 3, ADDRESS), EddystoneTLM(3000, 21.5, 10, 100.0)),
    ]
    sightings = ident.identify(decoded) + ident_m.identify(decoded)
    text = (
        json.dumps([repr(s) for s in sightings]) + json.dumps(ident.diagnostics()) + json.dumps(ident_m.diagnostics())
    )
    text_lower = text.lower()
    for address in (ADDRESS, OTHER_ADDRESS):
        for form in _forms(address):
            assert form.lower() not in text_lower, f"address {form} leaked"
    assert salts
    for salt in salts:
        assert salt.hex() not in text_lower and salt.hex()[:16] not in text_lower
        assert repr(salt) not in text
    assert DOC_KEY.hex() not in text_lower


# --------------------------------------------------------------------------- member tokens


def test_member_token_matches_the_worked_example_of_the_frame_spec() -> None:
    ident, _ = identifier(members=directory(**{"m-42": DOC_KEY}))
    frame = MemberFrame(version=1, window_lo=0x40, measured_power=-59, token=DOC_TOKEN)
    (s,) = ident.identify([(advert(DOC_TS), frame)])
    assert s == Sighting(DOC_TS, "rx-entrance", "member:m-42", -65, -59)


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_member_token_is_accepted_in_its_window_and_the_neighbouring_ones(offset: int) -> None:
    members = directory(**{"m-1": DOC_KEY, "m-2": b"\x02" * 32})
    frame = member_frame(DOC_KEY, DOC_WINDOW)
    heard_window = DOC_WINDOW + offset
    for ts in (heard_window * WINDOW_S, heard_window * WINDOW_S + WINDOW_S - 0.001, heard_window * WINDOW_S + 450):
        assert members.resolve(frame, ts) == "m-1", f"heard at {ts}, {offset} window(s) from the token's"


@pytest.mark.parametrize("later", [2, 3, 96, 256, 512, -2, -256])
def test_recorded_member_token_is_useless_two_windows_or_more_away(later: int) -> None:
    # 256 windows later the low byte of the window number is the same again; the token is not.
    members = directory(**{"m-1": DOC_KEY})
    ident, _ = identifier(members=members)
    frame = member_frame(DOC_KEY, DOC_WINDOW)
    replay_ts = (DOC_WINDOW + later) * WINDOW_S + 1.0
    assert members.resolve(frame, replay_ts) is None
    (s,) = ident.identify([(advert(replay_ts), frame)])
    assert s.subject.startswith("anon:")
    assert ident.diagnostics()["member_unresolved"] == 1 and ident.diagnostics()["member"] == 0


def test_fresh_token_is_accepted_when_the_replayed_one_is_not() -> None:
    members = directory(**{"m-1": DOC_KEY})
    now = (DOC_WINDOW + 5) * WINDOW_S + 100.0
    assert members.resolve(member_frame(DOC_KEY, DOC_WINDOW + 5), now) == "m-1"
    assert members.resolve(member_frame(DOC_KEY, DOC_WINDOW), now) is None


def test_token_with_a_window_lo_that_does_not_match_is_refused() -> None:
    members = directory(**{"m-1": DOC_KEY})
    good = member_frame(DOC_KEY, DOC_WINDOW)
    lying = MemberFrame(version=1, window_lo=(DOC_WINDOW + 1) & 0xFF, measured_power=-59, token=good.token)
    assert members.resolve(good, DOC_TS) == "m-1"
    assert members.resolve(lying, DOC_TS) is None


def test_unknown_member_token_becomes_the_devices_anonymous_subject_and_is_counted() -> None:
    ident, _ = identifier(members=directory(**{"m-1": DOC_KEY}))
    stranger = member_frame(b"\x99" * 32, DOC_WINDOW)
    from_token = subject_of(ident, DOC_TS, frame=stranger)
    assert from_token.startswith("anon:")
    assert from_token == subject_of(ident, DOC_TS + 1, frame=PHONE)  # the same device, the same day
    d = ident.diagnostics()
    assert (d["member"], d["member_unresolved"], d["anonymous"], d["members_known"]) == (0, 1, 1, 1)


def test_an_app_phones_own_os_adverts_are_the_member_not_a_second_shopper() -> None:
    # An iPhone with the app also sends Apple's Nearby Info from the same address (and only that
    # while iOS pauses the app): one person, one subject. Other phones stay anonymous.
    ident, _ = identifier(members=directory(**{"m-1": DOC_KEY}))
    before_token = ident.identify([(advert(DOC_TS), PHONE), (advert(DOC_TS + 0.2), member_frame(DOC_KEY, DOC_WINDOW))])
    assert [s.subject for s in before_token] == ["member:m-1", "member:m-1"], "same batch, either order"
    assert subject_of(ident, DOC_TS + 40) == "member:m-1"
    assert subject_of(ident, DOC_TS + 41, address=OTHER_ADDRESS).startswith("anon:")
    d = ident.diagnostics()
    assert (d["member"], d["member_device"], d["anonymous"]) == (1, 2, 1)


def test_a_removed_members_phone_is_anonymous_from_then_on_os_adverts_included() -> None:
    members = directory(**{"m-1": DOC_KEY})
    ident, _ = identifier(members=members)
    assert subject_of(ident, DOC_TS, frame=member_frame(DOC_KEY, DOC_WINDOW)) == "member:m-1"
    assert subject_of(ident, DOC_TS + 1) == "member:m-1"  # its Nearby Info, from the same address
    assert members.remove("m-1")
    assert subject_of(ident, DOC_TS + 2).startswith("anon:")
    assert ident.remote_subject(ADDRESS, DOC_TS + 3).startswith("anon:")


def test_replacing_members_forgets_old_keys_and_learns_new_ones() -> None:
    members = directory(**{"m-1": DOC_KEY})
    frame_1 = member_frame(DOC_KEY, DOC_WINDOW)
    assert members.resolve(frame_1, DOC_TS) == "m-1"  # builds the table
    members.set_members({"m-2": b"\x02" * 32})
    assert members.resolve(frame_1, DOC_TS) is None
    assert members.resolve(member_frame(b"\x02" * 32, DOC_WINDOW), DOC_TS) == "m-2"
    assert len(members) == 1


def test_many_members_each_resolve_to_their_own_ref_across_windows() -> None:
    keys = {f"m-{i}": hashlib.sha256(f"k{i}".encode()).digest() for i in range(300)}
    members = directory(**keys)
    for window in range(DOC_WINDOW, DOC_WINDOW + 40, 3):
        ts = window * WINDOW_S + 17.0
        for ref in ("m-0", "m-17", "m-299"):
            assert members.resolve(member_frame(keys[ref], window), ts) == ref


def test_member_sighting_carries_the_apps_measured_power() -> None:
    ident, _ = identifier(members=directory(**{"m-1": DOC_KEY}))
    (s,) = ident.identify([(advert(DOC_TS, rssi=-71), member_frame(DOC_KEY, DOC_WINDOW, measured_power=-63))])
    assert (s.subject, s.rssi, s.ref_rssi) == ("member:m-1", -71, -63)


# --------------------------------------------------------------------------- beacons


def test_beacon_subjects_and_reference_rssi_for_every_beacon_frame() -> None:
    uuid = "e2c56db5-dffb-48d2-b060-d0f5a71096e0"
    assert beacon_subject(IBeacon(uuid, 1, 258, -59)) == (f"beacon:{uuid}:1:258", -59)
    assert beacon_subject(AltBeacon(0x0118, uuid, 7, 42, -61, 0)) == (f"beacon:{uuid}:7:42", -61)
    # Eddystone states power at 0 m; 1 m is 41 dB lower (Eddystone spec)
    assert beacon_subject(EddystoneUID("a1b2c3d4e5f60718293a", "000000000001", -18)) == (
        "beacon:a1b2c3d4e5f60718293a:000000000001",
        -59,
    )
    url_subject, url_ref = beacon_subject(EddystoneURL("https://visita.example/s/1", -20))
    assert url_ref == -61 and url_subject.startswith("beacon:url-")
    assert url_subject != beacon_subject(EddystoneURL("https://visita.example/s/2", -20))[0]
    assert beacon_subject(EddystoneEID("0102030405060708", -10)) == ("beacon:eid-0102030405060708", -51)


def test_the_demo_plans_beacons_are_the_subjects_their_frames_produce() -> None:
    plan_ids = {b.id for b in default_plan().beacons}
    produced = {
        beacon_subject(IBeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, 1, -59))[0],
        beacon_subject(EddystoneUID("a1b2c3d4e5f60718293a", "000000000001", -18))[0],
        beacon_subject(AltBeacon(0xFFFF, "7a3f0c55-1e0b-4c9a-9a51-3cbd2f4e8d10", 7, 42, -59, 0))[0],
    }
    assert produced == plan_ids


def test_beacon_sightings_ignore_the_day_and_telemetry_attaches_to_the_beacon() -> None:
    ident, salts = identifier("Europe/Berlin")
    ib = IBeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, 1, -59)
    day1, day2 = 1_764_000_000.0, 1_764_000_000.0 + 86_400
    s1 = ident.identify([(advert(day1, rssi=-70), ib)])
    s2 = ident.identify([(advert(day2, rssi=-72), ib)])
    assert [s.subject for s in s1 + s2] == ["beacon:e2c56db5-dffb-48d2-b060-d0f5a71096e0:1:1"] * 2
    assert salts == []  # beacons are fixed and public: no anonymous hashing needed
    assert ident.identify([(advert(day2 + 1), EddystoneTLM(2950, 20.0, 5, 9.0))]) == []  # TLM: no sighting
    assert ident.identify([(advert(day2 + 2, OTHER_ADDRESS), EddystoneTLM(1000, 20.0, 5, 9.0))]) == []
    d = ident.diagnostics()
    assert d["beacon_battery_mv"] == {"beacon:e2c56db5-dffb-48d2-b060-d0f5a71096e0:1:1": 2950}
    assert (d["beacon"], d["telemetry"]) == (2, 2)


# --------------------------------------------------------------------------- local days


ZONES = ["UTC", "Europe/Berlin", "America/New_York", "America/Santiago", "Australia/Lord_Howe", "Asia/Kolkata"]


@settings(max_examples=150, deadline=None)
@given(
    timezone=st.sampled_from(ZONES),
    stamps=st.lists(st.integers(min_value=1_735_689_600, max_value=1_798_761_600), min_size=1, max_size=40),
    jitter=st.lists(st.integers(min_value=-2, max_value=2), min_size=40, max_size=40),
)
def test_local_day_is_zoneinfos_local_date_for_any_order_of_timestamps(
    timezone: str, stamps: list[int], jitter: list[int]
) -> None:
    # Pairs of timestamps a second or two apart, so the cache is exercised right at day edges too.
    tz = ZoneInfo(timezone)
    days = LocalDays(timezone)
    for ts, j in zip(stamps, jitter, strict=False):
        for t in (ts, ts + j):
            assert days.day(t) == datetime.fromtimestamp(t, tz).date().isoformat()


@pytest.mark.parametrize(("timezone", "date"), [("Europe/Berlin", (2026, 3, 29)), ("America/Santiago", (2025, 9, 6))])
def test_local_day_edges_on_dst_days(timezone: str, date: tuple[int, int, int]) -> None:
    days = LocalDays(timezone)
    midnight = first_second_of_next_day(timezone, *date)
    expected = datetime(*date).date().isoformat()
    assert [days.day(midnight - 1), days.day(midnight), days.day(midnight - 0.001)] == [
        expected,
        datetime.fromtimestamp(midnight, ZoneInfo(timezone)).date().isoformat(),
        expected,
    ]


def test_salts_older_than_yesterday_are_forgotten() -> None:
    ident, salts = identifier("UTC")
    day0 = 1_764_000_000.0 - 1_764_000_000.0 % 86_400 + 3600  # 01:00Z
    first = subject_of(ident, day0)
    subject_of(ident, day0 + 86_400)
    subject_of(ident, day0 + 2 * 86_400)
    # A straggler from two days ago cannot be linked to that day's device any more: its salt is gone.
    assert subject_of(ident, day0 + 60) != first
    assert len(salts) == 4


def test_an_anonymous_subject_that_sends_a_member_frame_is_linked_to_the_member_once() -> None:
    # An iPhone whose app was in the background when it came in: Nearby Info first (anonymous), then the
    # app's frame from the same address. The stages after identify are told that subject was the member.
    ident, _ = identifier(members=directory(**{"m-1": DOC_KEY}))
    before = subject_of(ident, DOC_TS)
    assert before.startswith("anon:") and ident.take_links() == []
    ident.identify([(advert(DOC_TS + 30), member_frame(DOC_KEY, DOC_WINDOW))])
    (link,) = ident.take_links()
    assert (link.ts, link.old, link.new, link.reason) == (DOC_TS + 30, before, "member:m-1", "member")
    assert subject_of(ident, DOC_TS + 31) == "member:m-1"
    ident.identify([(advert(DOC_TS + 32), member_frame(DOC_KEY, DOC_WINDOW))])
    assert ident.take_links() == [], "known address: no second link"
    assert ADDRESS not in repr(link)


def test_a_clock_step_across_midnight_keeps_each_phones_subject_and_a_member_found_after_it_takes_it_over() -> None:
    # A Pi booted on yesterday evening's saved time: at 21:50 by its clock (08:10 the next morning, really) it hears
    # an anonymous phone and an app phone whose token it cannot resolve yet (the phone's clock is right); NTP steps
    # it forward by 10 h 20 min. Shifted (gateway.runtime.Gateway.shift), the day the addresses were hashed for is
    # the day they were heard on: the same subjects after the step, and the member link finds the app phone's.
    by = 10 * 3600 + 1200.0
    wrong = first_second_of_next_day("Europe/Berlin", 2026, 6, 15) - 7800.0  # 21:50 local on the 15th
    right = wrong + by

    def app(ts: float) -> MemberFrame:
        return member_frame(DOC_KEY, int(ts // WINDOW_S))

    ident, salts = identifier("Europe/Berlin", directory(**{"m-1": DOC_KEY}))
    phone = subject_of(ident, wrong)
    unresolved = subject_of(ident, wrong + 1, OTHER_ADDRESS, frame=app(right + 1))
    assert unresolved.startswith("anon:")
    ident.shift(by)
    assert subject_of(ident, right + 5) == phone
    assert subject_of(ident, right + 6, OTHER_ADDRESS, frame=app(right + 6)) == "member:m-1"
    assert ident.take_links() == [SubjectLink(right + 6, unresolved, "member:m-1", "member")]
    assert len(salts) == 1, "one salt, serving the day the phones were really heard on"
    # Not shifted, the step is a midnight nobody was heard across: every phone a new subject.
    ident, salts = identifier("Europe/Berlin")
    assert subject_of(ident, wrong) != subject_of(ident, right + 5) and len(salts) == 2


# --------------------------------------------------------------------------- the store secret (anon_secret_file)

STORE_SECRET = bytes(range(100, 132))


def store_identifier(secret: bytes = STORE_SECRET, store: str = "s1", timezone: str = "Europe/Berlin") -> Identifier:
    """A gateway of store `store` whose anonymous salts come from the store secret; its random source must not be
    used (it fails the test)."""

    def no_random() -> bytes:
        raise AssertionError("a random salt was drawn although a store secret is set")

    return Identifier(
        MemberDirectory(), LocalDays(timezone), salt_source=no_random, day_salt=store_day_salt(secret, store)
    )


def test_the_same_store_secret_store_and_day_give_two_gateways_the_same_subject() -> None:
    main, relay = store_identifier(), store_identifier()
    ts = first_second_of_next_day("Europe/Berlin", 2026, 6, 14) + 10 * 3600  # 10:00 local on the 15th
    assert subject_of(main, ts) == subject_of(relay, ts + 7 * 3600)  # the same local day, another hour
    assert subject_of(main, ts, OTHER_ADDRESS) == subject_of(relay, ts, OTHER_ADDRESS) != subject_of(main, ts)
    # The salt is exactly HMAC-SHA256(secret, context NUL store NUL day): computed here without gateway.identity.
    salt = hmac.new(STORE_SECRET, b"visita anon salt v1\0s1\x002026-06-15", hashlib.sha256).digest()
    expected = "anon:" + hmac.new(salt, ADDRESS.encode(), hashlib.sha256).hexdigest()[:16]
    assert subject_of(main, ts) == expected
    assert main.diagnostics()["anon_salt"] == "store" and main.store_salt


def test_a_store_secret_gives_another_subject_on_another_day_store_or_secret() -> None:
    ts = first_second_of_next_day("Europe/Berlin", 2026, 6, 14) + 10 * 3600
    today = subject_of(store_identifier(), ts)
    assert subject_of(store_identifier(), ts + 86_400) != today  # the next local day
    assert subject_of(store_identifier(), ts - 86_400) != today  # the day before
    assert subject_of(store_identifier(store="s2"), ts) != today  # another store with the same secret
    assert subject_of(store_identifier(secret=bytes(32)), ts) != today  # another secret
    # Local days, not UTC days: 23:30 local on the 15th is the 15th's salt, though it is the 15th's 21:30 UTC.
    late = first_second_of_next_day("Europe/Berlin", 2026, 6, 15) - 1800
    assert subject_of(store_identifier(), late) == today


def test_without_a_store_secret_each_gateway_draws_its_own_random_salt() -> None:
    ts = 1_764_000_000.0
    a = Identifier(MemberDirectory(), LocalDays("UTC"))  # the default: secrets.token_bytes, never stored
    b = Identifier(MemberDirectory(), LocalDays("UTC"))
    assert subject_of(a, ts) != subject_of(b, ts)
    assert subject_of(a, ts) == subject_of(a, ts + 60)
    assert a.diagnostics()["anon_salt"] == "gateway" and not a.store_salt


def test_a_store_secret_clock_step_across_midnight_takes_the_new_days_salt() -> None:
    # Unlike a gateway's own random salt (moved to the day the phones were really heard on, above), the store's
    # salt of a day is what every gateway of the store derives for it: after the step this gateway must agree
    # with the others (on the right time) on the real day's subjects.
    by = 10 * 3600 + 1200.0
    wrong = first_second_of_next_day("Europe/Berlin", 2026, 6, 15) - 7800.0
    stepped, right_all_along = store_identifier(), store_identifier()
    subject_of(stepped, wrong)
    stepped.shift(by)
    assert subject_of(stepped, wrong + by + 5) == subject_of(right_all_along, wrong + by + 5)


def test_the_store_secrets_id_names_it_without_giving_it_away() -> None:
    ident = secret_id(STORE_SECRET)
    assert ident == secret_id(bytes(STORE_SECRET)) and ident != secret_id(bytes(32))
    assert len(ident) == 16 and STORE_SECRET.hex()[:16] != ident
    salt = store_day_salt(STORE_SECRET, "s1")("2026-06-15")
    assert salt.hex()[:16] != ident
