"""Pure decoders from advertisement bytes to frames.

Everything here reads untrusted radio bytes: every length is checked before a byte is read,
and anything that does not match a format exactly is "not mine" (None), never an exception.
No I/O, no clock, no logging: the same functions run live, in the simulator and in replay.

The byte layouts are documented in docs/frames.md. `decode` is on the hot path (the gateway
targets hundreds of thousands of adverts per second), so it uses precompiled `struct.Struct`
objects, dict dispatch and shared immutable frames instead of general-purpose parsing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final

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

__all__ = [
    "APPLE_COMPANY_ID",
    "EDDYSTONE_SERVICE_UUID",
    "OUTCOMES",
    "SAMSUNG_COMPANY_ID",
    "VISITA_COMPANY_ID",
    "Decoder",
    "decode",
    "frame_kind",
]

APPLE_COMPANY_ID: Final = 0x004C
"""Bluetooth SIG company id of Apple Inc. (iBeacon and Continuity frames)."""
SAMSUNG_COMPANY_ID: Final = 0x0075
"""Bluetooth SIG company id of Samsung Electronics."""
VISITA_COMPANY_ID: Final = 0xFFFF
"""Company id of the Visita member frame.

0xFFFF is the id the Bluetooth SIG reserves for tests and internal use. It is a placeholder
until Visita has a registered company id; changing it is a new member frame version.
"""
EDDYSTONE_SERVICE_UUID: Final = "0000feaa-0000-1000-8000-00805f9b34fb"
"""The Eddystone 16-bit service UUID 0xFEAA in the 128-bit lowercase form bleak reports."""

OUTCOMES: Final = (
    "ibeacon",
    "altbeacon",
    "eddystone-uid",
    "eddystone-url",
    "eddystone-tlm",
    "eddystone-eid",
    "member",
    "device",
    "unknown",
)
"""Every key `Decoder.diagnostics` counts, besides "total"; "unknown" is a dropped advert."""

# --------------------------------------------------------------------------- layouts
# Offsets and sizes follow the published specifications; see docs/frames.md.

# iBeacon (Apple "Proximity Beacon Specification"): 0x02 0x15, uuid 16, major, minor (BE), power int8.
_IBEACON_TYPE: Final = 0x02
_IBEACON_LEN: Final = 0x15
_IBEACON_SIZE: Final = 23
_IBEACON = struct.Struct(">2x16sHHb")

# AltBeacon (altbeacon.org spec): beacon code 0xBEAC, id 20 (16 + 2 + 2), reference RSSI int8, reserved.
_ALTBEACON_CODE: Final = b"\xbe\xac"
_ALTBEACON_SIZE: Final = 24
_ALTBEACON = struct.Struct(">2x16sHHbB")

# Visita member frame v1: "V", version, window_lo, measured power int8, token 8.
_MEMBER_MAGIC: Final = 0x56  # ASCII "V"
_MEMBER_VERSION: Final = 1
_MEMBER_SIZE: Final = 12
_MEMBER = struct.Struct(">2xBb8s")

# Eddystone (google/eddystone): first service-data byte is the frame type.
_EDDYSTONE_UID_SIZES: Final = (18, 20)  # the two trailing RFU bytes are optional in practice
_EDDYSTONE_UID = struct.Struct(">xb10s6s")
_EDDYSTONE_URL_HEAD = struct.Struct(">xbB")  # tx power, scheme
_EDDYSTONE_URL_MIN: Final = 3  # frame type, tx power, scheme; the encoded URL may be empty
_EDDYSTONE_URL_MAX: Final = 3 + 17
_EDDYSTONE_TLM_SIZE: Final = 14
_EDDYSTONE_TLM_PLAIN: Final = 0x00  # version 0x01 is the encrypted (eTLM) layout: not ours to read
_EDDYSTONE_TLM = struct.Struct(">xxHhII")
_TLM_NO_TEMPERATURE: Final = -0x8000  # 0x8000 as a signed 8.8 value: "not supported"
_EDDYSTONE_EID_SIZE: Final = 10
_EDDYSTONE_EID = struct.Struct(">xb8s")

_URL_SCHEMES: Final = ("http://www.", "https://www.", "http://", "https://")
_URL_EXPANSIONS: Final = (
    ".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/", ".gov/",
    ".com", ".org", ".edu", ".net", ".info", ".biz", ".gov",
)  # fmt: skip
# One entry per byte value: its expansion, itself when printable ASCII (0x21..0x7E), else None.
# The spec reserves 0x0E..0x20 and 0x7F..0xFF, so such a byte means the frame is not a valid URL.
_URL_BYTES: Final[tuple[str | None, ...]] = tuple(
    _URL_EXPANSIONS[b] if b < len(_URL_EXPANSIONS) else chr(b) if 0x21 <= b <= 0x7E else None for b in range(256)
)

# Apple Continuity: the manufacturer value is a sequence of type(1) length(1) data(length) TLVs.
# Only these first types are taken as a person's phone, tablet or Mac: the others come from
# accessories (0x07 AirPods), trackers (0x12 Find My: AirTags and lost devices, not people) or
# brief user actions (0x05 AirDrop), and counting them would inflate or distort presence.
_APPLE_DEVICE_FRAMES: Final = {
    0x10: DeviceFrame(vendor="apple", kind="nearby-info"),
    0x0C: DeviceFrame(vendor="apple", kind="handoff"),
}
_SAMSUNG_MIN_SIZE: Final = 4
_SAMSUNG_FRAME: Final = DeviceFrame(vendor="samsung", kind="smartthings")

# --------------------------------------------------------------------------- decoders


def _uuid_str(raw: bytes) -> str:
    # uuid.UUID(bytes=...) costs several times more than slicing one hex string.
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _decode_ibeacon(value: bytes) -> IBeacon | None:
    if len(value) < _IBEACON_SIZE or value[0] != _IBEACON_TYPE or value[1] != _IBEACON_LEN:
        return None
    # Trailing bytes are ignored: some beacons append a vendor byte after the 23 of the spec.
    uuid, major, minor, power = _IBEACON.unpack_from(value)
    return IBeacon(uuid=_uuid_str(uuid), major=major, minor=minor, measured_power=power)


def _decode_apple(value: bytes) -> Frame | None:
    n = len(value)
    if n < 2:
        return None
    kind = value[0]
    if kind == _IBEACON_TYPE:
        return _decode_ibeacon(value)
    frame = _APPLE_DEVICE_FRAMES.get(kind)
    if frame is None:
        return None
    # Walk the whole TLV chain: each length must fit, and the chain must end exactly at the end
    # of the value. Random bytes that merely start with 0x10 rarely pass this.
    i = 0
    while i < n:
        if i + 2 > n:
            return None
        i += 2 + value[i + 1]
    return frame if i == n else None


def _decode_samsung(value: bytes) -> DeviceFrame | None:
    # Samsung's 0x0075 payloads are undocumented; the length floor only keeps obvious runts out.
    return _SAMSUNG_FRAME if len(value) >= _SAMSUNG_MIN_SIZE else None


def _decode_member(value: bytes) -> MemberFrame | None:
    if len(value) != _MEMBER_SIZE or value[0] != _MEMBER_MAGIC or value[1] != _MEMBER_VERSION:
        return None
    window_lo, power, token = _MEMBER.unpack(value)
    return MemberFrame(version=_MEMBER_VERSION, window_lo=window_lo, measured_power=power, token=token)


def _decode_altbeacon(company_id: int, value: bytes) -> AltBeacon | None:
    if len(value) != _ALTBEACON_SIZE:
        return None
    id1, id2, id3, ref_rssi, reserved = _ALTBEACON.unpack(value)
    return AltBeacon(company_id=company_id, id1=_uuid_str(id1), id2=id2, id3=id3, ref_rssi=ref_rssi, reserved=reserved)


def _decode_eddystone_uid(value: bytes) -> EddystoneUID | None:
    if len(value) not in _EDDYSTONE_UID_SIZES:
        return None
    tx_power, namespace, instance = _EDDYSTONE_UID.unpack_from(value)
    return EddystoneUID(namespace=namespace.hex(), instance=instance.hex(), tx_power=tx_power)


def _decode_eddystone_url(value: bytes) -> EddystoneURL | None:
    if not _EDDYSTONE_URL_MIN <= len(value) <= _EDDYSTONE_URL_MAX:
        return None
    tx_power, scheme = _EDDYSTONE_URL_HEAD.unpack_from(value)
    if scheme >= len(_URL_SCHEMES):
        return None
    parts = [_URL_SCHEMES[scheme]]
    table = _URL_BYTES
    for b in value[_EDDYSTONE_URL_MIN:]:
        text = table[b]
        if text is None:
            return None
        parts.append(text)
    return EddystoneURL(url="".join(parts), tx_power=tx_power)


def _decode_eddystone_tlm(value: bytes) -> EddystoneTLM | None:
    if len(value) != _EDDYSTONE_TLM_SIZE or value[1] != _EDDYSTONE_TLM_PLAIN:
        return None
    vbatt, temp, adv_count, sec_count = _EDDYSTONE_TLM.unpack(value)
    return EddystoneTLM(
        battery_mv=vbatt or None,  # 0 mV: "not supported" (a USB-powered beacon)
        temperature_c=None if temp == _TLM_NO_TEMPERATURE else temp / 256,
        adv_count=adv_count,
        uptime_s=sec_count / 10,
    )


def _decode_eddystone_eid(value: bytes) -> EddystoneEID | None:
    if len(value) != _EDDYSTONE_EID_SIZE:
        return None
    tx_power, eid = _EDDYSTONE_EID.unpack(value)
    return EddystoneEID(eid=eid.hex(), tx_power=tx_power)


_MANUFACTURER_DECODERS: Final[dict[int, Callable[[bytes], Frame | None]]] = {
    APPLE_COMPANY_ID: _decode_apple,
    SAMSUNG_COMPANY_ID: _decode_samsung,
    VISITA_COMPANY_ID: _decode_member,
}
_EDDYSTONE_DECODERS: Final[dict[int, Callable[[bytes], Frame | None]]] = {
    0x00: _decode_eddystone_uid,
    0x10: _decode_eddystone_url,
    0x20: _decode_eddystone_tlm,
    0x30: _decode_eddystone_eid,
}


def decode(advert: Advert) -> Frame | None:
    """The frame the gateway recognises in `advert`, or None when there is none.

    Manufacturer data is tried first, in the advert's order: a value starting with the
    AltBeacon code 0xBEAC under any company id, then Apple (iBeacon, Continuity), Samsung and
    the Visita member frame by company id; then Eddystone service data. Every other company
    id and service UUID is skipped without reading its bytes. Never raises on any bytes.

    A presence-only `DeviceFrame` (Apple Continuity, Samsung) is returned only when nothing
    else is there: BlueZ merges a device's manufacturer data across adverts and keeps the
    company ids in the order first heard, so an app phone heard first with its OS's Nearby
    Info carries both, and its member frame must win.
    """
    fallback: Frame | None = None
    manufacturer_data = advert.manufacturer_data
    if manufacturer_data:
        decoders = _MANUFACTURER_DECODERS
        for company_id, value in manufacturer_data.items():
            frame: Frame | None
            if value[:2] == _ALTBEACON_CODE:
                frame = _decode_altbeacon(company_id, value)
                if frame is not None:
                    return frame
            decoder = decoders.get(company_id)
            if decoder is not None:
                frame = decoder(value)
                if type(frame) is DeviceFrame:
                    fallback = fallback or frame
                elif frame is not None:
                    return frame
    service_data = advert.service_data
    if service_data:
        payload = service_data.get(EDDYSTONE_SERVICE_UUID)
        if payload:
            eddystone = _EDDYSTONE_DECODERS.get(payload[0])
            if eddystone is not None:
                frame = eddystone(payload)
                if frame is not None:
                    return frame
    return fallback


_KIND_BY_TYPE: Final[dict[type, str]] = {
    IBeacon: "ibeacon",
    AltBeacon: "altbeacon",
    EddystoneUID: "eddystone-uid",
    EddystoneURL: "eddystone-url",
    EddystoneTLM: "eddystone-tlm",
    EddystoneEID: "eddystone-eid",
    MemberFrame: "member",
    DeviceFrame: "device",
}


def frame_kind(frame: Frame) -> str:
    """The outcome name of a frame as `Decoder.diagnostics` counts it, e.g. "eddystone-uid"."""
    return _KIND_BY_TYPE[type(frame)]


class Decoder:
    """Decodes adverts and counts every outcome, so nothing is dropped without a trace.

    Each advert passed in is counted exactly once: under its frame kind, or under "unknown"
    when `decode` found no frame in it. No I/O and no clock; not thread-safe (one per pipeline).
    """

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)

    def decode(self, advert: Advert) -> Frame | None:
        """Decode one advert (see `decode`) and count its outcome."""
        frame = decode(advert)
        self._counts["unknown" if frame is None else _KIND_BY_TYPE[type(frame)]] += 1
        return frame

    def decode_batch(self, adverts: Sequence[Advert]) -> list[tuple[Advert, Frame]]:
        """The adverts that carry a frame, each paired with it, in input order; counts all of them."""
        counts = self._counts
        kinds = _KIND_BY_TYPE
        out: list[tuple[Advert, Frame]] = []
        append = out.append
        unknown = 0
        for advert in adverts:
            frame = decode(advert)
            if frame is None:
                unknown += 1
            else:
                counts[kinds[type(frame)]] += 1
                append((advert, frame))
        counts["unknown"] += unknown
        return out

    def diagnostics(self) -> dict[str, int]:
        """A copy of the counts per outcome (every key of `OUTCOMES`), plus "total" adverts seen."""
        out = dict(self._counts)
        out["total"] = sum(self._counts.values())
        return out
