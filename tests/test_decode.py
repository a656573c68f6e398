"""Tests for gateway.decode: spec byte strings, round trips through firmware_sim.frames, fuzzing."""

from __future__ import annotations

import ast
import hashlib
import hmac
import inspect
import math
import uuid as uuidlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_sim import frames
from gateway.decode import (
    APPLE_COMPANY_ID,
    EDDYSTONE_SERVICE_UUID,
    OUTCOMES,
    SAMSUNG_COMPANY_ID,
    VISITA_COMPANY_ID,
    Decoder,
    decode,
    frame_kind,
)
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
)

EDDY = "0000feaa-0000-1000-8000-00805f9b34fb"  # written out again on purpose, not imported
FUZZ = settings(max_examples=300, deadline=None)


def advert(manufacturer_data: dict[int, bytes] | None = None, service_data: dict[str, bytes] | None = None) -> Advert:
    return Advert(
        ts=1_764_000_000.0,
        receiver="r1",
        address="AA:BB:CC:DD:EE:FF",
        address_random=True,
        rssi=-60,
        manufacturer_data=manufacturer_data or {},
        service_data=service_data or {},
    )


def mfg(company_id: int, hex_value: str) -> Advert:
    return advert(manufacturer_data={company_id: bytes.fromhex(hex_value)})


def eddy(hex_value: str) -> Advert:
    return advert(service_data={EDDY: bytes.fromhex(hex_value)})


# --------------------------------------------------------------------------- (a) spec byte strings


def test_constants() -> None:
    assert (APPLE_COMPANY_ID, SAMSUNG_COMPANY_ID, VISITA_COMPANY_ID) == (0x004C, 0x0075, 0xFFFF)
    assert EDDYSTONE_SERVICE_UUID == EDDY


def test_ibeacon_spec_bytes() -> None:
    # Apple Proximity Beacon layout: 02 15 | uuid | major | minor | measured power (0xC5 = -59 dBm)
    value = "0215 e2c56db5dffb48d2b060d0f5a71096e0 0001 0102 c5"
    expected = IBeacon(uuid="e2c56db5-dffb-48d2-b060-d0f5a71096e0", major=1, minor=258, measured_power=-59)
    assert decode(mfg(0x004C, value)) == expected
    # a trailing vendor byte after the 23 bytes of the spec is ignored
    assert decode(mfg(0x004C, value + "ab")) == expected


@pytest.mark.parametrize(
    "value",
    [
        "0214 e2c56db5dffb48d2b060d0f5a71096e0 0001 0102 c5",  # wrong length byte
        "0215 e2c56db5dffb48d2b060d0f5a71096e0 0001 0102",  # 22 bytes
        "",
        "02",
    ],
)
def test_ibeacon_malformed(value: str) -> None:
    assert decode(mfg(0x004C, value)) is None


def test_ibeacon_only_under_apple() -> None:
    value = "0215 e2c56db5dffb48d2b060d0f5a71096e0 0001 0102 c5"
    assert decode(mfg(0x0059, value)) is None


def test_altbeacon_spec_bytes() -> None:
    # altbeacon.org: BEAC | id1 (16) | id2 | id3 | ref RSSI (0xBF = -65) | mfg reserved
    value = "beac 2f234454cf6d4a0fadf2f4911ba9ffa6 0001 0002 bf 2a"
    assert decode(mfg(0x0118, value)) == AltBeacon(
        company_id=0x0118,
        id1="2f234454-cf6d-4a0f-adf2-f4911ba9ffa6",
        id2=1,
        id3=2,
        ref_rssi=-65,
        reserved=0x2A,
    )
    # any company id, including the ones with their own formats
    for company_id in (0x004C, 0x0075, 0xFFFF):
        frame = decode(mfg(company_id, value))
        assert isinstance(frame, AltBeacon)
        assert frame.company_id == company_id
    assert decode(mfg(0x0118, value[:-2])) is None
    assert decode(mfg(0x0118, value + "00")) is None


def test_eddystone_uid_spec_bytes() -> None:
    # 00 | tx power (0xE7 = -25) | namespace (10) | instance (6) | RFU (2, optional)
    value = "00 e7 edd1ebeac04e5defa017 0123456789ab"
    expected = EddystoneUID(namespace="edd1ebeac04e5defa017", instance="0123456789ab", tx_power=-25)
    assert decode(eddy(value + "0000")) == expected
    assert decode(eddy(value)) == expected
    assert decode(eddy(value + "00")) is None
    assert decode(eddy(value + "000000")) is None


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("10 ec 01 6578616d706c65 00", "https://www.example.com/"),  # example + 0x00 ".com/"
        ("10 ec 03 676f6f2e676c2f417131387a46", "https://goo.gl/Aq18zF"),
        ("10 ec 00 7669736974610b2f3f613d31", "http://www.visita.info/?a=1"),  # 0x0B ".info"
        ("10 ec 02 61 07 2f 62 0d", "http://a.com/b.gov"),
        ("10 ec 03", "https://"),  # the encoded URL may be empty (0..17 bytes)
    ],
)
def test_eddystone_url_spec_bytes(value: str, url: str) -> None:
    assert decode(eddy(value)) == EddystoneURL(url=url, tx_power=-20)


@pytest.mark.parametrize(
    "value",
    [
        "10ec04 61",  # scheme 0x04 is not defined
        "10ec03 0e",  # 0x0E..0x20 are reserved
        "10ec03 20",  # space
        "10ec03 7f",  # DEL
        "10ec03 ff",
        "10ec03" + "61" * 18,  # 18 encoded bytes, max is 17
        "10ec",
    ],
)
def test_eddystone_url_malformed(value: str) -> None:
    assert decode(eddy(value)) is None


def test_eddystone_url_max_length() -> None:
    frame = decode(eddy("10ec03" + "61" * 17))
    assert frame == EddystoneURL(url="https://" + "a" * 17, tx_power=-20)


def test_eddystone_tlm_spec_bytes() -> None:
    # 20 00 | vbatt 0x0BB8 = 3000 mV | temp 0x1780 = 23.5 °C | adv 100 | sec 1234 = 123.4 s
    assert decode(eddy("2000 0bb8 1780 00000064 000004d2")) == EddystoneTLM(
        battery_mv=3000, temperature_c=23.5, adv_count=100, uptime_s=123.4
    )
    # temp 0xFF80 = -0.5 °C (signed 8.8)
    frame = decode(eddy("2000 0c1c ff80 ffffffff ffffffff"))
    assert frame == EddystoneTLM(battery_mv=3100, temperature_c=-0.5, adv_count=0xFFFFFFFF, uptime_s=0xFFFFFFFF / 10)
    # 0 mV and 0x8000: not supported
    assert decode(eddy("2000 0000 8000 00000001 00000002")) == EddystoneTLM(
        battery_mv=None, temperature_c=None, adv_count=1, uptime_s=0.2
    )


@pytest.mark.parametrize(
    "value",
    [
        "2001 0bb8 1780 00000064 000004d2",  # version 0x01 is encrypted TLM
        "2000 0bb8 1780 00000064 000004",  # 13 bytes
        "2000 0bb8 1780 00000064 000004d2 00",  # 15 bytes
    ],
)
def test_eddystone_tlm_malformed(value: str) -> None:
    assert decode(eddy(value)) is None


def test_eddystone_eid_spec_bytes() -> None:
    assert decode(eddy("30 f0 0123456789abcdef")) == EddystoneEID(eid="0123456789abcdef", tx_power=-16)
    assert decode(eddy("30f0 0123456789abcd")) is None
    assert decode(eddy("30f0 0123456789abcdef00")) is None


def test_eddystone_unknown_frame_type() -> None:
    assert decode(eddy("40 0123456789")) is None
    assert decode(eddy("")) is None


def test_member_frame_worked_example() -> None:
    # docs/frames.md: key 00..1f, ts 1764000123 -> window 1960000 (0x1DE840), window_lo 0x40
    key = bytes(range(32))
    window = 1_764_000_123 // 900
    token = hmac.new(key, window.to_bytes(8, "big"), hashlib.sha256).digest()[:8]
    assert token.hex() == "104de62a9dd59538"
    assert decode(mfg(0xFFFF, "56 01 40 c5 104de62a9dd59538")) == MemberFrame(
        version=1, window_lo=0x40, measured_power=-59, token=token
    )
    assert frames.member_frame(key, 1_764_000_123, -59) == {0xFFFF: bytes.fromhex("560140c5104de62a9dd59538")}
    # the next window starts at 16:15:00Z
    assert frames.member_frame(key, 1_764_000_900, -59) == {0xFFFF: bytes.fromhex("560141c51e4b68e47153f2bb")}
    assert frames.member_frame(key, 1_764_000_899.999, -59) == frames.member_frame(key, 1_764_000_123, -59)


@pytest.mark.parametrize(
    "value",
    [
        "56 02 40 c5 104de62a9dd59538",  # version 2 is unknown
        "57 01 40 c5 104de62a9dd59538",  # not "V"
        "56 01 40 c5 104de62a9dd595",  # 11 bytes
        "56 01 40 c5 104de62a9dd59538 00",  # 13 bytes
    ],
)
def test_member_frame_malformed(value: str) -> None:
    assert decode(mfg(0xFFFF, value)) is None


def test_member_frame_only_under_visita_id() -> None:
    assert decode(mfg(0x0059, "560140c5104de62a9dd59538")) is None


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("10 05 07 1c2e9b07", "nearby-info"),
        ("10 02 0b 1c", "nearby-info"),
        ("0c 0e 00 0001 a0a1a2a3a4a5a6a7a8a9aa", "handoff"),
        # handoff followed by nearby info in one value: the first TLV decides
        ("0c 0e 00 0001 a0a1a2a3a4a5a6a7a8a9aa 10 05 07 1c2e9b07", "handoff"),
    ],
)
def test_apple_continuity(value: str, kind: str) -> None:
    assert decode(mfg(0x004C, value)) == DeviceFrame(vendor="apple", kind=kind)


@pytest.mark.parametrize(
    "value",
    [
        "10 06 07 1c2e9b07",  # TLV length runs past the value
        "10 05 07 1c2e9b07 0c",  # a second TLV without its length byte
        "10 05 07 1c2e9b07 0c 03 00",  # a second TLV that does not fit
        "07 19" + "00" * 25,  # AirPods proximity pairing: an accessory
        "12 19" + "00" * 25,  # Find My: trackers and lost devices
        "05 12" + "00" * 18,  # AirDrop
        "10",
    ],
)
def test_apple_continuity_rejected(value: str) -> None:
    assert decode(mfg(0x004C, value)) is None


def test_samsung() -> None:
    assert decode(mfg(0x0075, "42098102")) == DeviceFrame(vendor="samsung", kind="smartthings")
    assert decode(mfg(0x0075, "420981")) is None


def test_irrelevant_adverts() -> None:
    assert decode(advert()) is None
    assert decode(mfg(0x0006, "0109200212345678")) is None  # Microsoft
    assert decode(advert(service_data={"0000fe9f-0000-1000-8000-00805f9b34fb": b"\x00" * 20})) is None
    # an Eddystone frame under another service UUID is not Eddystone
    assert decode(advert(service_data={"0000feab-0000-1000-8000-00805f9b34fb": bytes.fromhex("30f0" * 5)})) is None


def test_first_matching_frame_wins() -> None:
    ibeacon = bytes.fromhex("0215 e2c56db5dffb48d2b060d0f5a71096e0 0001 0102 c5")
    a = advert(
        manufacturer_data={0x0006: b"\x01\x09", 0x004C: ibeacon},
        service_data={EDDY: bytes.fromhex("30f00123456789abcdef")},
    )
    assert isinstance(decode(a), IBeacon)
    # a malformed manufacturer value does not hide a valid Eddystone frame
    a = advert(manufacturer_data={0x004C: b"\x02\x15"}, service_data={EDDY: bytes.fromhex("30f00123456789abcdef")})
    assert isinstance(decode(a), EddystoneEID)


# --------------------------------------------------------------------------- (b) round trips


def test_simulator_does_not_borrow_the_decoder() -> None:
    tree = ast.parse(inspect.getsource(frames))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.startswith("gateway") for name in imported), imported


def test_round_trip_every_frame_type() -> None:
    key = b"k" * 32
    cases: list[tuple[Advert, Frame]] = [
        (
            advert(frames.ibeacon("E2C56DB5-DFFB-48D2-B060-D0F5A71096E0", 65535, 0, -128)),
            IBeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 65535, 0, -128),
        ),
        (
            advert(frames.altbeacon(0x0118, "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6", 7, 65535, 127, 255)),
            AltBeacon(0x0118, "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6", 7, 65535, 127, 255),
        ),
        (
            advert(service_data=frames.eddystone_uid("00112233445566778899", "aabbccddeeff", 4)),
            EddystoneUID("00112233445566778899", "aabbccddeeff", 4),
        ),
        (
            advert(service_data=frames.eddystone_url("https://www.example.com/", -20)),
            EddystoneURL("https://www.example.com/", -20),
        ),
        (
            advert(service_data=frames.eddystone_tlm(2950, -12.25, 123456, 86400.5)),
            EddystoneTLM(2950, -12.25, 123456, 86400.5),
        ),
        (
            advert(service_data=frames.eddystone_tlm(None, None, 0, 0)),
            EddystoneTLM(None, None, 0, 0.0),
        ),
        (
            advert(service_data=frames.eddystone_eid("0123456789abcdef", -16)),
            EddystoneEID("0123456789abcdef", -16),
        ),
        (
            advert(frames.member_frame(key, 900.0 * 300 + 899.9, -61)),
            MemberFrame(1, 300 & 0xFF, -61, frames.member_token(key, 300)),
        ),
        (advert(frames.apple_nearby_info()), DeviceFrame("apple", "nearby-info")),
        (advert(frames.apple_nearby_info(0x1B, b"")), DeviceFrame("apple", "nearby-info")),
        (advert(frames.apple_handoff(sequence=513)), DeviceFrame("apple", "handoff")),
        (advert(frames.samsung()), DeviceFrame("samsung", "smartthings")),
        (advert(frames.samsung(b"\x00" * 4)), DeviceFrame("samsung", "smartthings")),
    ]
    decoder = Decoder()
    got = decoder.decode_batch([a for a, _ in cases])
    assert got == cases
    kinds = {frame_kind(f) for _, f in cases}
    assert kinds == set(OUTCOMES) - {"unknown"}


@FUZZ
@given(
    uuid=st.uuids(),
    major=st.integers(0, 0xFFFF),
    minor=st.integers(0, 0xFFFF),
    power=st.integers(-128, 127),
)
def test_round_trip_ibeacon(uuid: uuidlib.UUID, major: int, minor: int, power: int) -> None:
    assert decode(advert(frames.ibeacon(str(uuid), major, minor, power))) == IBeacon(str(uuid), major, minor, power)


@FUZZ
@given(
    company_id=st.integers(0, 0xFFFF),
    id1=st.uuids(),
    id2=st.integers(0, 0xFFFF),
    id3=st.integers(0, 0xFFFF),
    rssi=st.integers(-128, 127),
    reserved=st.integers(0, 255),
)
def test_round_trip_altbeacon(company_id: int, id1: uuidlib.UUID, id2: int, id3: int, rssi: int, reserved: int) -> None:
    encoded = frames.altbeacon(company_id, str(id1), id2, id3, rssi, reserved)
    assert decode(advert(encoded)) == AltBeacon(company_id, str(id1), id2, id3, rssi, reserved)


_PRINTABLE = [chr(c) for c in range(0x21, 0x7F)]
_EXPANSIONS = [".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/", ".gov/", ".com", ".org", ".info", ".gov"]


@FUZZ
@given(
    scheme=st.sampled_from(["http://www.", "https://www.", "http://", "https://"]),
    # at most 17 pieces, each encoding to at most one byte, so every URL drawn fits the frame
    pieces=st.lists(st.sampled_from(_PRINTABLE) | st.sampled_from(_EXPANSIONS), max_size=17),
    tx_power=st.integers(-128, 127),
)
def test_round_trip_eddystone_url(scheme: str, pieces: list[str], tx_power: int) -> None:
    url = scheme + "".join(pieces)
    encoded = frames.eddystone_url(url, tx_power)
    assert len(encoded[EDDY]) <= 20
    assert decode(advert(service_data=encoded)) == EddystoneURL(url, tx_power)


@FUZZ
@given(
    battery=st.none() | st.integers(1, 0xFFFF),
    temp_raw=st.none() | st.integers(-0x7FFF, 0x7FFF),
    adv_count=st.integers(0, 0xFFFFFFFF),
    sec_count=st.integers(0, 0xFFFFFFFF),
)
def test_round_trip_eddystone_tlm(battery: int | None, temp_raw: int | None, adv_count: int, sec_count: int) -> None:
    temperature = None if temp_raw is None else temp_raw / 256
    encoded = frames.eddystone_tlm(battery, temperature, adv_count, sec_count / 10)
    frame = decode(advert(service_data=encoded))
    assert frame == EddystoneTLM(battery, temperature, adv_count, sec_count / 10)


@FUZZ
@given(
    namespace=st.binary(min_size=10, max_size=10),
    instance=st.binary(min_size=6, max_size=6),
    eid=st.binary(min_size=8, max_size=8),
    tx_power=st.integers(-128, 127),
)
def test_round_trip_eddystone_uid_eid(namespace: bytes, instance: bytes, eid: bytes, tx_power: int) -> None:
    uid = frames.eddystone_uid(namespace.hex(), instance.hex(), tx_power)
    assert decode(advert(service_data=uid)) == EddystoneUID(namespace.hex(), instance.hex(), tx_power)
    encoded = frames.eddystone_eid(eid.hex(), tx_power)
    assert decode(advert(service_data=encoded)) == EddystoneEID(eid.hex(), tx_power)


@FUZZ
@given(
    key=st.binary(min_size=1, max_size=64),
    ts=st.floats(0, 4e9, allow_nan=False),
    power=st.integers(-128, 127),
)
def test_round_trip_member_frame(key: bytes, ts: float, power: int) -> None:
    window = math.floor(ts / 900)
    token = hmac.new(key, window.to_bytes(8, "big"), hashlib.sha256).digest()[:8]
    frame = decode(advert(frames.member_frame(key, ts, power)))
    assert frame == MemberFrame(version=1, window_lo=window & 0xFF, measured_power=power, token=token)


# --------------------------------------------------------------------------- encoder validation


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: frames.ibeacon("not-a-uuid", 1, 2, -59), "uuid"),
        (lambda: frames.ibeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 65536, 2, -59), "major"),
        (lambda: frames.ibeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, -1, -59), "minor"),
        (lambda: frames.ibeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, 2, -129), "measured_power"),
        (lambda: frames.altbeacon(0x10000, "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6", 1, 2, -59), "company_id"),
        (lambda: frames.altbeacon(1, "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6", 1, 2, -59, 256), "reserved"),
        (lambda: frames.eddystone_uid("0011", "aabbccddeeff", 0), "namespace_hex"),
        (lambda: frames.eddystone_uid("00112233445566778899", "zz", 0), "instance_hex"),
        (lambda: frames.eddystone_url("ftp://example.com", 0), "http:// or https://"),
        (lambda: frames.eddystone_url("https://example.com/a b", 0), "printable"),
        (lambda: frames.eddystone_url("https://www.a-much-too-long-name.com/", 0), "at most 17"),
        (lambda: frames.eddystone_url("https://example.com", 128), "tx_power"),
        (lambda: frames.eddystone_tlm(0, 20.0, 0, 0), "battery_mv"),
        (lambda: frames.eddystone_tlm(3000, 128.0, 0, 0), "temperature_c"),
        (lambda: frames.eddystone_tlm(3000, float("nan"), 0, 0), "temperature_c"),
        (lambda: frames.eddystone_tlm(3000, 20.0, -1, 0), "adv_count"),
        (lambda: frames.eddystone_tlm(3000, 20.0, 0, -1.0), "uptime_s"),
        (lambda: frames.eddystone_eid("0123", 0), "eid_hex"),
        (lambda: frames.member_token(b"", 1), "key"),
        (lambda: frames.member_token(b"k", -1), "window"),
        (lambda: frames.member_frame(b"k", -1.0, -59), "ts"),
        (lambda: frames.member_frame(b"k", 0.0, -59, window_s=0), "window_s"),
        (lambda: frames.apple_nearby_info(status=256), "status"),
        (lambda: frames.apple_handoff(payload=b"short"), "payload"),
        (lambda: frames.samsung(b"abc"), "payload"),
    ],
)
def test_encoder_rejects_bad_input(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_encoder_url_compresses_longest_match() -> None:
    assert frames.eddystone_url("https://www.example.com/", -20)[EDDY] == bytes.fromhex("10ec01 6578616d706c65 00")
    assert frames.eddystone_url("http://a.info", 0)[EDDY] == bytes.fromhex("1000 02 61 0b")
    # exactly 17 encoded bytes fit, 18 do not
    frames.eddystone_url("https://" + "a" * 17, 0)
    with pytest.raises(ValueError, match="18 bytes"):
        frames.eddystone_url("https://" + "a" * 18, 0)


# --------------------------------------------------------------------------- (c) fuzzing

_company_ids = st.sampled_from([0x004C, 0x0075, 0xFFFF]) | st.integers(0, 0xFFFF)
# Values that start like a real frame reach the deeper checks more often than uniform bytes do.
_mfg_prefixes = st.sampled_from([b"", b"\x02\x15", b"\xbe\xac", b"V\x01", b"\x10\x05", b"\x0c\x0e", b"\x10"])
_mfg_values = st.builds(lambda p, b: p + b, _mfg_prefixes, st.binary(max_size=30))
_service_uuids = st.sampled_from([EDDY]) | st.uuids().map(str)
_eddy_prefixes = st.sampled_from([b"", b"\x00", b"\x10", b"\x20\x00", b"\x20\x01", b"\x30"])
_service_values = st.builds(lambda p, b: p + b, _eddy_prefixes, st.binary(max_size=24))

_adverts = st.builds(
    advert,
    manufacturer_data=st.dictionaries(_company_ids, _mfg_values, max_size=3),
    service_data=st.dictionaries(_service_uuids, _service_values, max_size=3),
)


@FUZZ
@given(a=_adverts)
def test_decode_never_raises(a: Advert) -> None:
    frame = decode(a)
    assert frame is None or frame_kind(frame) in OUTCOMES


@FUZZ
@given(batch=st.lists(_adverts, max_size=20))
def test_decoder_counts_every_advert_once(batch: list[Advert]) -> None:
    decoder = Decoder()
    decoded = decoder.decode_batch(batch)
    single = Decoder()
    for a in batch:
        single.decode(a)
    counts = decoder.diagnostics()
    total = counts.pop("total")
    assert total == len(batch) == sum(counts.values())
    assert counts["unknown"] == len(batch) - len(decoded)
    assert set(counts) == set(OUTCOMES)
    assert single.diagnostics() == decoder.diagnostics()
    assert [(a, decode(a)) for a in batch if decode(a) is not None] == decoded


# --------------------------------------------------------------------------- (d) truncation and mutation


def _valid_adverts() -> list[Advert]:
    return [
        advert(frames.ibeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, 2, -59)),
        advert(frames.altbeacon(0x0118, "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6", 1, 2, -59)),
        advert(service_data=frames.eddystone_uid("00112233445566778899", "aabbccddeeff", -20)),
        advert(service_data=frames.eddystone_url("https://www.example.com/abc", -20)),
        advert(service_data=frames.eddystone_tlm(3000, 21.5, 10, 100.0)),
        advert(service_data=frames.eddystone_eid("0123456789abcdef", -20)),
        advert(frames.member_frame(b"k" * 32, 1_764_000_000.0, -59)),
        advert(frames.apple_nearby_info()),
        advert(frames.apple_handoff()),
        advert(frames.samsung()),
    ]


def _replace_value(a: Advert, value: bytes) -> Advert:
    if a.manufacturer_data:
        (company_id,) = a.manufacturer_data
        return advert(manufacturer_data={company_id: value})
    (service,) = a.service_data
    return advert(service_data={service: value})


def _value(a: Advert) -> bytes:
    (value,) = list(a.manufacturer_data.values()) + list(a.service_data.values())
    return value


_VALID_IDS = ["ibeacon", "altbeacon", "uid", "url", "tlm", "eid", "member", "nearby-info", "handoff", "samsung"]


@pytest.mark.parametrize("a", _valid_adverts(), ids=_VALID_IDS)
def test_every_prefix_is_safe(a: Advert) -> None:
    full = decode(a)
    assert full is not None
    value = _value(a)
    for n in range(len(value)):
        frame = decode(_replace_value(a, value[:n]))
        # Prefixes may still be valid (an 18-byte Eddystone-UID, a shorter URL, a Samsung payload),
        # but never of another kind.
        assert frame is None or type(frame) is type(full)


@FUZZ
@given(data=st.data())
def test_mutated_frames_never_raise(data: st.DataObject) -> None:
    a = data.draw(st.sampled_from(_valid_adverts()))
    value = bytearray(_value(a))
    for _ in range(data.draw(st.integers(1, 4))):
        if value:
            value[data.draw(st.integers(0, len(value) - 1))] = data.draw(st.integers(0, 255))
    value += data.draw(st.binary(max_size=3))
    decode(_replace_value(a, bytes(value)))


# --------------------------------------------------------------------------- (e) unknown adverts


def test_malformed_and_unknown_adverts_count_as_unknown() -> None:
    batch = [
        advert(),
        mfg(0x0006, "0109200212345678"),  # Microsoft
        mfg(0x004C, "0215" + "00" * 20),  # truncated iBeacon
        mfg(0x004C, "071900"),  # AirPods
        mfg(0x0075, "42"),  # Samsung runt
        mfg(0xFFFF, "5602" + "00" * 10),  # member frame version 2
        mfg(0x0118, "beac" + "00" * 21),  # short AltBeacon
        eddy("2001" + "00" * 12),  # encrypted TLM
        eddy("10ec0420"),  # bad URL scheme
        eddy(""),
        advert(service_data={"0000180f-0000-1000-8000-00805f9b34fb": b"\x64"}),  # battery service
    ]
    decoder = Decoder()
    assert decoder.decode_batch(batch) == []
    diagnostics = decoder.diagnostics()
    assert diagnostics["unknown"] == len(batch) == diagnostics["total"]
    assert all(diagnostics[k] == 0 for k in OUTCOMES if k != "unknown")


def test_diagnostics_is_a_copy() -> None:
    decoder = Decoder()
    decoder.decode_batch(_valid_adverts())
    snapshot = decoder.diagnostics()
    snapshot["ibeacon"] = 1000
    assert decoder.diagnostics()["ibeacon"] == 1
    assert decoder.diagnostics()["total"] == len(_valid_adverts())
    assert decoder.diagnostics()["device"] == 3


@pytest.mark.parametrize("os_frame", [frames.apple_nearby_info(), frames.samsung()])
def test_member_frame_wins_over_the_os_adverts_bluez_merged_before_it(os_frame: dict[int, bytes]) -> None:
    # BlueZ keeps a device's manufacturer data merged, in the order company ids were first heard:
    # an app phone first heard with its OS's own advert carries both, and is still the member.
    member = frames.member_frame(bytes(range(32)), 1_764_000_123, -59)
    merged = advert({**os_frame, **member})
    assert next(iter(merged.manufacturer_data)) != VISITA_COMPANY_ID
    assert isinstance(decode(merged), MemberFrame)
    beacon = frames.ibeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, 1, -59)
    assert isinstance(decode(advert({**frames.samsung(), **beacon})), IBeacon)
    assert isinstance(decode(advert(os_frame)), DeviceFrame), "alone, it is still a device"
