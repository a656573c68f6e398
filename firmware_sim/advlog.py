"""The recorded advert log: a compact, versioned file of received advertisements (docs/advert-log.md).

The file is one gzip stream. It starts with a header line (UTF-8 JSON, ending in a newline)
naming the format, its version, the scenario, seed and time span; then binary frames follow,
each `type (1 byte) · body length (u32) · body`, all integers little-endian:

* `A` addresses: entries of 6 address bytes (as written, most significant first) and a flags
  byte (bit 0: random address); ids count up from 0 in the order entries appear;
* `P` payloads: entries of `u16 length · content`, ids count up from 0 likewise; content is
  `u8 items` then items: 0x01 manufacturer data (u16 company id, u8 length, bytes),
  0x02 service data (16-byte UUID, u8 length, bytes), 0x03 service UUID (16 bytes),
  0x04 local name (u8 length, UTF-8), 0x05 TX power (i8);
* `R` records: 14 bytes each, in time order: u32 milliseconds since the header's `start_ms`,
  u8 receiver (index into the header's `receivers`), u32 address id, u32 payload id, i8 RSSI;
* `E` end: u64 records, u32 addresses, u32 payloads written; a log without it was cut short.

Every id a record uses is defined by an earlier frame, so a reader can stream the file.
"""

from __future__ import annotations

import gzip
import json
import struct
import uuid as uuidlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

FORMAT = "visita-advert-log"
VERSION = 1
RECORD = np.dtype([("t", "<u4"), ("rx", "u1"), ("address", "<u4"), ("payload", "<u4"), ("rssi", "i1")])
"""One record, packed (14 bytes)."""
assert RECORD.itemsize == 14

_FRAME = struct.Struct("<cI")
_END = struct.Struct("<QII")
_MANUFACTURER, _SERVICE_DATA, _SERVICE_UUID, _NAME, _TX_POWER = 1, 2, 3, 4, 5
MAX_SPAN_MS = 0xFFFFFFFF
"""Records are at most this many ms (49.7 days) after the start."""


class LogError(Exception):
    """A log that cannot be read; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class Content:
    """What an advert carries besides time, receiver, address and RSSI."""

    manufacturer_data: dict[int, bytes] = field(default_factory=dict)
    service_data: dict[str, bytes] = field(default_factory=dict)
    service_uuids: tuple[str, ...] = ()
    local_name: str | None = None
    tx_power: int | None = None


def encode_content(c: Content) -> bytes:
    """A payload entry's content (without its u16 length)."""
    items = bytearray()
    n = 0
    for company, value in c.manufacturer_data.items():
        items += struct.pack("<BHB", _MANUFACTURER, company, len(value)) + value
        n += 1
    for uuid, value in c.service_data.items():
        items += bytes([_SERVICE_DATA]) + uuidlib.UUID(uuid).bytes + bytes([len(value)]) + value
        n += 1
    for uuid in c.service_uuids:
        items += bytes([_SERVICE_UUID]) + uuidlib.UUID(uuid).bytes
        n += 1
    if c.local_name is not None:
        name = c.local_name.encode()
        items += bytes([_NAME, len(name)]) + name
        n += 1
    if c.tx_power is not None:
        items += struct.pack("<Bb", _TX_POWER, c.tx_power)
        n += 1
    return bytes([n]) + bytes(items)


def decode_content(raw: bytes) -> Content:
    """Inverse of `encode_content`; ValueError on anything malformed."""
    if not raw:
        raise ValueError("empty payload entry")
    mfr: dict[int, bytes] = {}
    svc: dict[str, bytes] = {}
    uuids: list[str] = []
    name: str | None = None
    tx: int | None = None
    pos = 1

    def take(k: int) -> bytes:
        nonlocal pos
        if pos + k > len(raw):
            raise ValueError("payload entry ends inside an item")
        out = raw[pos : pos + k]
        pos += k
        return out

    for _ in range(raw[0]):
        kind = take(1)[0]
        if kind == _MANUFACTURER:
            company, length = struct.unpack("<HB", take(3))
            mfr[company] = take(length)
        elif kind == _SERVICE_DATA:
            key = str(uuidlib.UUID(bytes=take(16)))
            svc[key] = take(take(1)[0])
        elif kind == _SERVICE_UUID:
            uuids.append(str(uuidlib.UUID(bytes=take(16))))
        elif kind == _NAME:
            name = take(take(1)[0]).decode()
        elif kind == _TX_POWER:
            tx = struct.unpack("<b", take(1))[0]
        else:
            raise ValueError(f"unknown item type {kind}")
    if pos != len(raw):
        raise ValueError("payload entry has trailing bytes")
    return Content(mfr, svc, tuple(uuids), name, tx)


def _address_bytes(address: str) -> bytes:
    raw = bytes.fromhex(address.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"address {address!r}: must be six bytes such as 12:34:56:78:9A:BC")
    return raw


class LogWriter:
    """Writes one advert log; tables grow as `write` is handed records that use new ids."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.start_ms = int(header["start_ms"])
        self._raw = open(path, "wb")  # noqa: SIM115 - closed in close()
        # mtime=0 and no file name: the same run gives the same bytes.
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=6, mtime=0)
        line = {"format": FORMAT, "version": VERSION, **header}
        self._gz.write(json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
        self.records = 0
        self.addresses = 0
        self.payloads = 0

    def _frame(self, kind: bytes, body: bytes) -> None:
        self._gz.write(_FRAME.pack(kind, len(body)))
        self._gz.write(body)

    def add_addresses(self, new: Sequence[tuple[str, bool]]) -> None:
        """Define the next address ids: (address, random) each, ids counting on from `self.addresses`."""
        if new:
            self._frame(b"A", b"".join(_address_bytes(a) + bytes([1 if r else 0]) for a, r in new))
            self.addresses += len(new)

    def add_payloads(self, new: Sequence[Content]) -> None:
        """Define the next payload ids, counting on from `self.payloads`."""
        if new:
            parts = []
            for c in new:
                raw = encode_content(c)
                parts.append(struct.pack("<H", len(raw)) + raw)
            self._frame(b"P", b"".join(parts))
            self.payloads += len(new)

    def add_records(
        self,
        t_ms: npt.NDArray[np.int64],
        rx: npt.NDArray[np.uint8],
        address: npt.NDArray[np.uint32],
        payload: npt.NDArray[np.uint32],
        rssi: npt.NDArray[np.int8],
    ) -> None:
        """Append records (time order); every id must be defined already."""
        if not len(t_ms):
            return
        rel = t_ms - self.start_ms
        if rel[0] < 0 or rel[-1] > MAX_SPAN_MS:
            raise ValueError("record times must lie between the start and 49.7 days after it")
        rec = np.empty(len(t_ms), dtype=RECORD)
        rec["t"], rec["rx"], rec["address"], rec["payload"], rec["rssi"] = rel, rx, address, payload, rssi
        self._frame(b"R", rec.tobytes())
        self.records += len(rec)

    def close(self) -> None:
        """Write the end frame and close the file."""
        if self._raw.closed:
            return
        self._frame(b"E", _END.pack(self.records, self.addresses, self.payloads))
        self._gz.close()
        self._raw.close()

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _header_problem(header: dict[str, Any]) -> str | None:
    """What is wrong with the values of an advert log's header that its readers use, or None."""

    def whole(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if "start_ms" not in header or "receivers" not in header:
        return f"no {'start_ms' if 'start_ms' not in header else 'receivers'!r}"
    if not whole(header["start_ms"]):
        return f"start_ms = {header['start_ms']!r}: must be a whole number of milliseconds"
    receivers = header["receivers"]
    if not isinstance(receivers, list) or not all(isinstance(r, str) for r in receivers):
        return "receivers: must be a list of receiver ids"
    end = header.get("end", header["start_ms"] / 1000)
    if isinstance(end, bool) or not isinstance(end, int | float) or not end >= header["start_ms"] / 1000:
        return f"end = {end!r}: must be a time (UNIX seconds) not before the start"
    staff = header.get("staff", [])
    if not isinstance(staff, list) or not all(isinstance(r, str) for r in staff):
        return "staff: must be a list of member refs"
    for key in ("seed", "members"):
        if key in header and not whole(header[key]):
            return f"{key} = {header[key]!r}: must be a whole number"
    return None


class AdvertLog:
    """Reads an advert log as a stream: the header at once, records chunk by chunk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.addresses: list[str] = []
        self.address_random: list[bool] = []
        self.payloads: list[Content] = []
        self.records = 0
        self.complete = False
        try:
            self._raw: IO[bytes] = open(path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise LogError(f"{path}: cannot be read: {e.strerror}") from None
        self._buf = gzip.GzipFile(fileobj=self._raw, mode="rb")
        try:
            line = self._buf.readline(1 << 24)
            header = json.loads(line)
        except (OSError, EOFError, zlib.error, ValueError):
            self.close()
            raise LogError(f"{path}: not a Visita advert log (no gzip-compressed JSON header line)") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            self.close()
            raise LogError(f"{path}: not a Visita advert log (format is not {FORMAT!r})")
        if header.get("version") != VERSION:
            self.close()
            raise LogError(f"{path}: advert log version {header.get('version')!r}; this Visita reads version {VERSION}")
        problem = _header_problem(header)
        if problem is not None:
            self.close()
            raise LogError(f"{path}: header: {problem}; the log is damaged: simulate or record it again")
        self.header: dict[str, Any] = header
        self.start_ms = int(header["start_ms"])

    def _read(self, n: int, what: str) -> bytes:
        try:
            data = self._buf.read(n)
        except (OSError, EOFError, zlib.error) as e:
            raise LogError(f"{self.path}: damaged after {self.records} records ({e})") from None
        if len(data) != n:
            raise LogError(f"{self.path}: cut short after {self.records} records (inside {what}); no end frame")
        return data

    def chunks(self) -> Iterator[npt.NDArray[np.void]]:
        """Record arrays (dtype RECORD) in file order; the tables grow as definitions are read."""
        while not self.complete:
            head = self._buf.read(_FRAME.size)
            if len(head) < _FRAME.size:
                raise LogError(f"{self.path}: cut short after {self.records} records; no end frame")
            kind, length = _FRAME.unpack(head)
            body = self._read(length, f"a {kind!r} frame")
            if kind == b"R":
                if length % RECORD.itemsize:
                    raise LogError(f"{self.path}: record frame of {length} bytes is not whole records")
                rec = np.frombuffer(body, dtype=RECORD)
                if len(rec) and (
                    int(rec["address"].max()) >= len(self.addresses)
                    or int(rec["payload"].max()) >= len(self.payloads)
                    or int(rec["rx"].max()) >= len(self.header["receivers"])
                ):
                    raise LogError(f"{self.path}: a record after {self.records} uses an id not defined before it")
                self.records += len(rec)
                yield rec
            elif kind == b"A":
                if length % 7:
                    raise LogError(f"{self.path}: address frame of {length} bytes is not whole entries")
                for i in range(0, length, 7):
                    self.addresses.append(":".join(f"{b:02X}" for b in body[i : i + 6]))
                    self.address_random.append(bool(body[i + 6] & 1))
            elif kind == b"P":
                pos = 0
                try:
                    while pos < length:
                        (size,) = struct.unpack_from("<H", body, pos)
                        self.payloads.append(decode_content(body[pos + 2 : pos + 2 + size]))
                        pos += 2 + size
                except (struct.error, ValueError) as e:
                    raise LogError(f"{self.path}: bad payload entry {len(self.payloads)}: {e}") from None
            elif kind == b"E":
                records, addresses, payloads = _END.unpack(body)
                if (records, addresses, payloads) != (self.records, len(self.addresses), len(self.payloads)):
                    raise LogError(
                        f"{self.path}: end frame counts {records} records, {addresses} addresses, {payloads} "
                        f"payloads; the file holds {self.records}, {len(self.addresses)}, {len(self.payloads)}"
                    )
                self.complete = True
            else:
                raise LogError(f"{self.path}: unknown frame type {kind!r} after {self.records} records")

    def close(self) -> None:
        """Release the file."""
        self._raw.close()

    def __enter__(self) -> AdvertLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
