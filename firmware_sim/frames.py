"""Encoders: build the advertisement payloads the simulator's beacons and phones send.

Written from the published specifications, independently of `gateway.decode`: this module
neither imports the decoder nor shares its constants, so a misreading of a spec that made it
into one side cannot pass a round trip through both.

Every function returns the piece of an `Advert` it fills, keyed as bleak reports it:
`manufacturer_data` ({company id: value without the id}) or `service_data`
({128-bit lowercase service UUID: value}). Inputs are checked and a bad one raises
ValueError (TypeError for a wrong type) naming the argument, the value and the allowed range:
these are developer-facing, and a silently wrong frame would be far harder to find.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import uuid as uuidlib
from typing import Final

__all__ = [
    "APPLE",
    "EDDYSTONE",
    "MEMBER_WINDOW_S",
    "SAMSUNG",
    "VISITA",
    "altbeacon",
    "apple_handoff",
    "apple_nearby_info",
    "eddystone_eid",
    "eddystone_tlm",
    "eddystone_uid",
    "eddystone_url",
    "eid_value",
    "ibeacon",
    "member_frame",
    "member_token",
    "samsung",
]

APPLE: Final = 0x004C
"""Apple Inc., Bluetooth SIG assigned company identifier."""
SAMSUNG: Final = 0x0075
"""Samsung Electronics Co. Ltd., Bluetooth SIG assigned company identifier."""
VISITA: Final = 0xFFFF
"""Company id of the Visita member frame: the SIG's id for tests and internal use (placeholder)."""
EDDYSTONE: Final = "0000feaa-0000-1000-8000-00805f9b34fb"
"""Eddystone service UUID 0xFEAA expanded onto the Bluetooth base UUID."""
MEMBER_WINDOW_S: Final = 900
"""Seconds per member token window (docs/frames.md)."""

# A legacy advertisement carries 31 bytes; the manufacturer-data AD structure spends 2 on its
# length and type and 2 on the company id, so no value can be longer than this on air.
_MAX_MANUFACTURER_VALUE: Final = 27
_MAX_URL_BYTES: Final = 17

# Eddystone-URL scheme prefixes, longest first so "http://www." wins over "http://".
_URL_SCHEME_CODES: Final = (("https://www.", 0x01), ("http://www.", 0x00), ("https://", 0x03), ("http://", 0x02))
# Eddystone-URL text expansions (codes 0x00..0x0D), longest first for a greedy longest match.
# Every expansion starts with "." and contains no other ".", so greedy is also the shortest encoding.
_URL_EXPANSION_CODES: Final = tuple(
    sorted(
        {
            ".com/": 0x00, ".org/": 0x01, ".edu/": 0x02, ".net/": 0x03, ".info/": 0x04, ".biz/": 0x05,
            ".gov/": 0x06, ".com": 0x07, ".org": 0x08, ".edu": 0x09, ".net": 0x0A, ".info": 0x0B,
            ".biz": 0x0C, ".gov": 0x0D,
        }.items(),
        key=lambda item: -len(item[0]),
    )
)  # fmt: skip


# --------------------------------------------------------------------------- checks


def _int(where: str, name: str, value: int, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} = {value!r}: must be an int")
    if not lo <= value <= hi:
        raise ValueError(f"{where}: {name} = {value}: must be {lo}..{hi}")
    return value


def _int8(where: str, name: str, value: int) -> bytes:
    return _int(where, name, value, -128, 127).to_bytes(1, "big", signed=True)


def _hex(where: str, name: str, value: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(value)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != size:
        raise ValueError(f"{where}: {name} = {value!r}: must be {2 * size} hex digits ({size} bytes)")
    return raw


def _uuid(where: str, name: str, value: str) -> bytes:
    try:
        return uuidlib.UUID(value).bytes
    except (TypeError, ValueError, AttributeError):
        raise ValueError(
            f"{where}: {name} = {value!r}: must be a UUID such as 'e2c56db5-dffb-48d2-b060-d0f5a71096e0'"
        ) from None


def _bytes(where: str, name: str, value: bytes, lo: int, hi: int) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise TypeError(f"{where}: {name} = {value!r}: must be bytes")
    if not lo <= len(value) <= hi:
        raise ValueError(f"{where}: {name} is {len(value)} bytes: must be {lo}..{hi}")
    return bytes(value)


def _finite(where: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: {name} = {value!r}: must be a finite number")
    return float(value)


# --------------------------------------------------------------------------- beacons


def ibeacon(uuid: str, major: int, minor: int, measured_power: int) -> dict[int, bytes]:
    """Apple iBeacon manufacturer data: 0x02 0x15, proximity UUID, major, minor (big-endian), power.

    `measured_power` is the calibrated RSSI at 1 m in dBm, a signed byte (typically -50..-70).
    """
    where = "ibeacon"
    value = (
        bytes([0x02, 0x15])
        + _uuid(where, "uuid", uuid)
        + _int(where, "major", major, 0, 0xFFFF).to_bytes(2, "big")
        + _int(where, "minor", minor, 0, 0xFFFF).to_bytes(2, "big")
        + _int8(where, "measured_power", measured_power)
    )
    return {APPLE: value}


def altbeacon(company_id: int, id1: str, id2: int, id3: int, ref_rssi: int, reserved: int = 0) -> dict[int, bytes]:
    """AltBeacon manufacturer data under `company_id`: 0xBEAC, beacon id (id1 UUID, id2, id3), RSSI, reserved.

    `ref_rssi` is the average RSSI at 1 m in dBm (signed byte); `reserved` is the
    manufacturer-reserved last byte.
    """
    where = "altbeacon"
    cid = _int(where, "company_id", company_id, 0, 0xFFFF)
    value = (
        bytes([0xBE, 0xAC])
        + _uuid(where, "id1", id1)
        + _int(where, "id2", id2, 0, 0xFFFF).to_bytes(2, "big")
        + _int(where, "id3", id3, 0, 0xFFFF).to_bytes(2, "big")
        + _int8(where, "ref_rssi", ref_rssi)
        + bytes([_int(where, "reserved", reserved, 0, 0xFF)])
    )
    return {cid: value}


def eddystone_uid(namespace_hex: str, instance_hex: str, tx_power: int) -> dict[str, bytes]:
    """Eddystone-UID service data: 0x00, tx power, 10-byte namespace, 6-byte instance, 2 RFU zero bytes.

    `tx_power` is the calibrated power at 0 m in dBm (signed byte).
    """
    where = "eddystone_uid"
    value = (
        bytes([0x00])
        + _int8(where, "tx_power", tx_power)
        + _hex(where, "namespace_hex", namespace_hex, 10)
        + _hex(where, "instance_hex", instance_hex, 6)
        + bytes(2)  # RFU, must be 0x00
    )
    return {EDDYSTONE: value}


def _encode_url(url: str) -> bytes:
    where = "eddystone_url"
    if not isinstance(url, str):
        raise TypeError(f"{where}: url = {url!r}: must be a str")
    for prefix, code in _URL_SCHEME_CODES:
        if url.startswith(prefix):
            out = bytearray([code])
            i = len(prefix)
            break
    else:
        raise ValueError(f"{where}: url = {url!r}: must start with http:// or https://")
    while i < len(url):
        for text, code in _URL_EXPANSION_CODES:
            if url.startswith(text, i):
                out.append(code)
                i += len(text)
                break
        else:
            c = ord(url[i])
            if not 0x21 <= c <= 0x7E:
                raise ValueError(
                    f"{where}: url = {url!r}: character {url[i]!r} at {i} is not printable ASCII (percent-encode it)"
                )
            out.append(c)
            i += 1
    if len(out) - 1 > _MAX_URL_BYTES:
        raise ValueError(
            f"{where}: url = {url!r}: encodes to {len(out) - 1} bytes after the scheme, "
            f"Eddystone-URL allows at most {_MAX_URL_BYTES} (use a shorter URL)"
        )
    return bytes(out)


def eddystone_url(url: str, tx_power: int) -> dict[str, bytes]:
    """Eddystone-URL service data: 0x10, tx power, scheme code, URL compressed with the expansion table.

    Raises ValueError when the URL has no http(s) scheme, contains a byte outside printable ASCII,
    or does not fit the 17 encoded bytes the frame allows.
    """
    return {EDDYSTONE: bytes([0x10]) + _int8("eddystone_url", "tx_power", tx_power) + _encode_url(url)}


def eddystone_tlm(
    battery_mv: int | None, temperature_c: float | None, adv_count: int, uptime_s: float
) -> dict[str, bytes]:
    """Eddystone-TLM service data, unencrypted version 0x00 (14 bytes, all big-endian).

    `battery_mv` None encodes 0 ("not supported"); `temperature_c` None encodes 0x8000. The
    temperature is rounded to 1/256 °C (signed 8.8 fixed point), the uptime to 0.1 s.
    """
    where = "eddystone_tlm"
    vbatt = 0 if battery_mv is None else _int(where, "battery_mv", battery_mv, 1, 0xFFFF)
    if temperature_c is None:
        temp = b"\x80\x00"
    else:
        raw = round(_finite(where, "temperature_c", temperature_c) * 256)
        # -32768 (0x8000) is the "not supported" marker, so the real range stops one step short.
        if not -0x7FFF <= raw <= 0x7FFF:
            raise ValueError(f"{where}: temperature_c = {temperature_c}: must be within ±127.99 °C")
        temp = raw.to_bytes(2, "big", signed=True)
    uptime = _finite(where, "uptime_s", uptime_s)
    sec_count = round(uptime * 10)
    if not 0 <= sec_count <= 0xFFFFFFFF:
        raise ValueError(f"{where}: uptime_s = {uptime_s}: must be 0..{0xFFFFFFFF / 10:.1f}")
    value = (
        bytes([0x20, 0x00])
        + vbatt.to_bytes(2, "big")
        + temp
        + _int(where, "adv_count", adv_count, 0, 0xFFFFFFFF).to_bytes(4, "big")
        + sec_count.to_bytes(4, "big")
    )
    return {EDDYSTONE: value}


def eid_value(identity_key: bytes, exponent: int, counter: int) -> str:
    """The ephemeral id (16 hex digits) an Eddystone-EID beacon sends when its seconds counter reads `counter`.

    From the Eddystone "EID computation" specification: the beacon encrypts, with AES-128 under its identity
    key, the block 00×11 ‖ FF ‖ 00 00 ‖ counter[31:16] to get a temporary key; under that key it encrypts
    00×11 ‖ K ‖ (counter with bits K-1..0 cleared) and sends the first 8 bytes.
    """
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(identity_key) != 16:
        raise ValueError(f"eid_value: identity_key must be 16 bytes, got {len(identity_key)}")
    if not 0 <= exponent <= 15:
        raise ValueError(f"eid_value: exponent = {exponent}: must be 0..15")
    if not 0 <= counter < 1 << 32:
        raise ValueError(f"eid_value: counter = {counter}: must be a 32-bit count of seconds")

    def block(key: bytes, data: bytes) -> bytes:
        e = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        return e.update(data) + e.finalize()

    key_block = bytearray(16)
    key_block[11] = 0xFF
    key_block[14:16] = (counter >> 16).to_bytes(2, "big")
    id_block = bytearray(16)
    id_block[11] = exponent
    id_block[12:16] = ((counter >> exponent) << exponent).to_bytes(4, "big")
    return block(block(identity_key, bytes(key_block)), bytes(id_block))[:8].hex()


def eddystone_eid(eid_hex: str, tx_power: int) -> dict[str, bytes]:
    """Eddystone-EID service data: 0x30, tx power, 8-byte ephemeral identifier."""
    where = "eddystone_eid"
    return {EDDYSTONE: bytes([0x30]) + _int8(where, "tx_power", tx_power) + _hex(where, "eid_hex", eid_hex, 8)}


# --------------------------------------------------------------------------- Visita member frame


def member_token(key: bytes, window: int) -> bytes:
    """The 8-byte member token: HMAC-SHA256(key, window as 8-byte big-endian unsigned)[:8]."""
    where = "member_token"
    k = _bytes(where, "key", key, 1, 1 << 16)
    w = _int(where, "window", window, 0, 0xFFFFFFFFFFFFFFFF)
    return hmac.new(k, w.to_bytes(8, "big"), hashlib.sha256).digest()[:8]


def member_frame(key: bytes, ts: float, measured_power: int, window_s: int = MEMBER_WINDOW_S) -> dict[int, bytes]:
    """Visita member frame v1 as the app sends it at UNIX time `ts` (docs/frames.md).

    Value: "V" (0x56), version 0x01, window_lo, measured power (signed), token (8 bytes), where
    window = floor(ts / window_s), window_lo = window & 0xFF and token = member_token(key, window).
    """
    where = "member_frame"
    t = _finite(where, "ts", ts)
    if t < 0:
        raise ValueError(f"{where}: ts = {ts}: must be UNIX seconds >= 0")
    step = _int(where, "window_s", window_s, 1, 1 << 32)
    window = int(t // step)
    value = (
        b"V" + bytes([0x01, window & 0xFF]) + _int8(where, "measured_power", measured_power) + member_token(key, window)
    )
    return {VISITA: value}


# --------------------------------------------------------------------------- personal devices


def apple_nearby_info(status: int = 0x07, data: bytes = b"\x1c\x2e\x9b\x07") -> dict[int, bytes]:
    """Apple Continuity Nearby Info, as an iPhone sends it: TLV type 0x10, then status and data.

    `status` packs status flags (high nibble) and the action code (low nibble; 0x07 is a
    common one). `data` is the rest of the TLV: a data-flags byte and a 3-byte auth tag by
    default, 5 bytes of TLV data in all, as recent iOS versions send. Opaque to the gateway.
    """
    where = "apple_nearby_info"
    body = bytes([_int(where, "status", status, 0, 0xFF)]) + _bytes(where, "data", data, 0, _MAX_MANUFACTURER_VALUE - 3)
    return {APPLE: bytes([0x10, len(body)]) + body}


def apple_handoff(sequence: int = 1, payload: bytes = bytes(range(0xA0, 0xAB))) -> dict[int, bytes]:
    """Apple Continuity Handoff: TLV type 0x0C, length 14 (clipboard flag, 2-byte sequence, payload).

    The 11-byte `payload` stands for the auth tag and encrypted activity; the gateway never reads it.
    """
    where = "apple_handoff"
    body = (
        b"\x00"  # clipboard status: nothing copied
        + _int(where, "sequence", sequence, 0, 0xFFFF).to_bytes(2, "big")
        + _bytes(where, "payload", payload, 11, 11)
    )
    return {APPLE: bytes([0x0C, len(body)]) + body}


def samsung(payload: bytes = bytes.fromhex("42098102141503210109")) -> dict[int, bytes]:
    """Samsung manufacturer data (company 0x0075) with an opaque `payload` of 4..27 bytes.

    The format is undocumented; the gateway counts it as a Samsung device by company id and length.
    """
    return {SAMSUNG: _bytes("samsung", "payload", payload, 4, _MAX_MANUFACTURER_VALUE)}
