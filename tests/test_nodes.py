"""Tests for sensors.nodes: ESPresense reports and Visita sighting batches, pure and through a real mosquitto."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import VISITA, Broker, free_port
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from gateway.days import LocalDays
from gateway.decode import Decoder
from gateway.identity import Identifier, MemberDirectory
from gateway.model import Advert, Sighting
from sensors.nodes import (
    MAX_BATCH,
    NodesOptions,
    NodesSource,
    PeerClock,
    Reading,
    encode_batch,
    espresense_beacon,
    parse_batch,
    parse_espresense,
)

T0 = 1_764_000_000.0
MAC = "c0ffee123456"
ADDRESS = "C0:FF:EE:12:34:56"
UUID = "e2c56db5-dffb-48d2-b060-d0f5a71096e0"
ROOMS = {"entrance": "rx-entrance", "checkout": "rx-checkout"}


def report(device_id: str, rssi: int = -70, mac: str | None = MAC, **extra: object) -> bytes:
    """An ESPresense report as BleFingerprint::fill writes it (ESPresense 3.x/4.x)."""
    doc: dict[str, object] = {"id": device_id, "idType": 15, "rssi@1m": -65, "rssi": rssi, "raw": 2.11}
    if mac is not None:
        doc["mac"] = mac
    doc.update({"channel": 38, "distance": 2.1, "mean": 2.0, "var": 0.31, "ci": 0.24, "int": 210, **extra})
    return json.dumps(doc).encode()


def identifier() -> Identifier:
    return Identifier(MemberDirectory(), LocalDays("UTC"), salt_source=lambda: b"s" * 32)


def ident_known(ref: str) -> bool:
    """The members this gateway provisions, for peers' `member:` rows."""
    return ref in ("m-1", "m-2")


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------- pure decoders


def test_ibeacon_and_altbeacon_ids_become_beacon_subjects() -> None:
    topic = f"espresense/devices/iBeacon:{UUID}-100-7/entrance"
    r = parse_espresense(topic, report(f"iBeacon:{UUID}-100-7"), T0, ROOMS)
    assert r == Reading(T0, "rx-entrance", f"beacon:{UUID}:100:7", "", -70, -65)
    assert espresense_beacon(f"altBeacon:{UUID.upper()}-1-2") == f"beacon:{UUID}:1:2"
    assert espresense_beacon(f"iBeacon:{UUID}-70000-1") is None


def test_rooms_match_whatever_their_case_and_one_room_maps_to_one_receiver() -> None:
    opts = NodesOptions(rooms={"Front": "rx-entrance", "TILLS": "rx-checkout"})
    assert opts.rooms == {"front": "rx-entrance", "tills": "rx-checkout"}
    for room, rx in (
        ("front", "rx-entrance"),
        ("FRONT", "rx-entrance"),
        ("Tills", "rx-checkout"),
        ("Rx-Produce", "rx-produce"),
    ):
        r = parse_espresense(f"espresense/devices/apple:1005:9-26/{room}", report("apple:1005:9-26"), T0, opts.rooms)
        assert isinstance(r, Reading) and r.receiver == rx, room
    with pytest.raises(ValueError, match="the same room as another one"):
        NodesOptions(rooms={"front": "rx-entrance", "Front": "rx-checkout"})
    with pytest.raises(ValueError, match="not an ESPresense room name"):
        NodesOptions(rooms={"front door": "rx-entrance"})
    assert NodesOptions(rooms={"front": "rx-entrance", "Front": "rx-entrance"}).rooms == {"front": "rx-entrance"}


def test_eddystone_uid_id_loses_espresense_duplicated_byte() -> None:
    namespace, instance = "00112233445566778899", "aabbccddeeff"
    # ESPresense writes frame bytes 2..6 then 6..11: the namespace's fifth byte appears twice.
    written = namespace[:10] + namespace[8:10] + namespace[10:]
    assert espresense_beacon(f"eddy:{written}-{instance}") == f"beacon:{namespace}:{instance}"
    assert espresense_beacon(f"eddy:{namespace}-{instance}") == f"beacon:{namespace}:{instance}"


def test_phone_reports_keep_the_address_in_memory_only_as_key() -> None:
    r = parse_espresense("espresense/devices/apple:1005:9-26/checkout", report("apple:1005:9-26"), T0, ROOMS)
    assert isinstance(r, Reading)
    # Not the node's rssi@1m (-65): the reference the gateway's own radio uses for phones, so receivers compare.
    assert (r.receiver, r.subject, r.key, r.rssi, r.ref_rssi) == ("rx-checkout", None, ADDRESS, -70, -59)
    # A type fingerprint without the address cannot tell two phones apart: not taken.
    assert parse_espresense("espresense/devices/apple:1005:9-26/x", report("apple:1005:9-26", mac=None), T0, {}) == (
        "no-address"
    )
    irk = "00" * 16
    r = parse_espresense(f"espresense/devices/irk:{irk}/x", report(f"irk:{irk}"), T0, {})
    assert isinstance(r, Reading) and r.key == f"irk:{irk}" and r.receiver == "x"


def test_other_kinds_are_ignored_and_junk_is_malformed() -> None:
    assert parse_espresense("espresense/devices/sonos:c0ffee123456/x", report(f"sonos:{MAC}"), T0, {}) == "ignored"
    assert parse_espresense(f"espresense/devices/{MAC}/x", report(MAC), T0, {}) == "ignored"
    bad = [
        ("espresense/devices/apple:1/x", b"not json"),
        ("espresense/devices/apple:1/x", b"[1,2]"),
        ("espresense/devices/apple:1/x", json.dumps({"id": "apple:1", "mac": MAC}).encode()),  # no rssi
        ("espresense/devices/apple:1/x", json.dumps({"id": "apple:1", "mac": MAC, "rssi": True}).encode()),
        ("espresense/devices/apple:1/x", json.dumps({"id": "apple:1", "mac": MAC, "rssi": 900}).encode()),
        ("espresense/devices/apple:1/x", json.dumps({"id": "apple:1", "mac": MAC, "rssi": float("nan")}).encode()),
        ("espresense/devices/apple:1", report("apple:1")),  # no room level
        ("espresense/devices/apple:1/bad room", report("apple:1")),
        ("espresense/devices/apple:1/x", b"[" * 100_000),
        (f"espresense/devices/iBeacon:{UUID}/x", report(f"iBeacon:{UUID}")),  # no major/minor
    ]
    for topic, payload in bad:
        assert parse_espresense(topic, payload, T0, {}) == "malformed", payload[:60]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.text(max_size=40))
def test_espresense_decoder_never_raises(payload: bytes, device: str) -> None:
    result = parse_espresense(f"espresense/devices/{device}/room", payload, T0, {})
    assert isinstance(result, Reading | str)


def test_batch_round_trip_and_rejects() -> None:
    sightings = [
        Sighting(T0 + 0.25, "rx-2", "member:m-1", -61, -59),
        Sighting(T0 + 0.5, "rx-2", "anon:0123456789abcdef", -80, -59),
        Sighting(T0 + 0.75, "rx-2", "beacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:1:2", -70, -59),
    ]
    payload = encode_batch("gw-2", 7, T0 + 1, sightings)
    batch = parse_batch("visita/v1/s1/gw-2/sightings", payload, "s1")
    assert batch is not None and batch.gateway == "gw-2" and batch.seq == 7 and batch.sent == T0 + 1
    assert list(batch.sightings) == sightings
    assert parse_batch("visita/v1/other/gw-2/sightings", payload, "s1") is None  # another store
    assert parse_batch("visita/v1/s1/gw-3/sightings", payload, "s1") is None  # topic and sender disagree
    doc = json.loads(payload)
    for key, value in [
        ("schema", "visita.sightings/2"),
        ("seq", "7"),
        ("sent", None),
        ("sightings", [[T0, "rx-2", "AA:BB:CC:DD:EE:FF", -60, -59]]),  # an address is not a subject
        ("sightings", [[T0, "rx-2", "anon:C0:FF:EE:12:34:56", -60, -59]]),  # nor under a subject's prefix
        ("sightings", [[T0, "rx-2", "member:c0-ff-ee-12-34-56", -60, -59]]),
        ("sightings", [[T0, "rx-2", "beacon:c0:ff:ee:12:34:56", -60, -59]]),
        ("sightings", [[T0, "rx-2", "anon:ab12", -60, -59]]),  # not what a gateway makes of an address
        ("sightings", [[T0, "RX 2", "anon:ab", -60, -59]]),
        ("sightings", [[T0, "rx-2", "anon:ab", -60]]),
        ("anon_key", "not-a-secret-id"),  # the store secret's public id: 16 lowercase hex digits or null
        ("anon_key", 7),
    ]:
        bad = json.dumps({**doc, key: value}).encode()
        assert parse_batch("visita/v1/s1/gw-2/sightings", bad, "s1") is None, (key, value)


def test_a_batch_names_the_store_secret_its_anonymous_rows_are_salted_with() -> None:
    rows = [Sighting(T0, "rx-2", "anon:0123456789abcdef", -80, -59)]
    batch = parse_batch("visita/v1/s1/gw-2/sightings", encode_batch("gw-2", 1, T0, rows, "00112233aabbccdd"), "s1")
    assert batch is not None and batch.anon_key == "00112233aabbccdd"
    old = json.loads(encode_batch("gw-2", 1, T0, rows))
    assert old.pop("anon_key") is None  # a batch of a gateway older than the field: none
    batch = parse_batch("visita/v1/s1/gw-2/sightings", json.dumps(old).encode(), "s1")
    assert batch is not None and batch.anon_key is None


@pytest.mark.parametrize(
    ("ours", "theirs", "why"),
    [
        (None, None, "neither this gateway nor it has a store secret"),
        (None, "00112233aabbccdd", "it uses a store secret (identity.anon_secret_file) and this gateway has none"),
        ("00112233aabbccdd", None, "this gateway uses a store secret (identity.anon_secret_file) and it has none"),
        ("00112233aabbccdd", "ffffffffffffffff", "its store secret (identity.anon_secret_file) is not this gateway's"),
    ],
)
def test_a_peers_anonymous_rows_without_a_store_secret_in_common_are_counted_and_said_once(
    ours: str | None, theirs: str | None, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Taken (the peer may be the only one to hear the phone), but the same phone heard here too would be two
    subjects: counted per peer and in all, the reason logged once and kept for the status and `visita doctor`."""
    src = source(FakeClock(), anon_key=ours)
    rows = [Sighting(T0, "rx-2", "anon:0123456789abcdef", -80, -59), Sighting(T0, "rx-2", "member:m-1", -70, -59)]
    topic = "visita/v1/s1/gw-2/sightings"
    assert src.receive(topic, encode_batch("gw-2", 1, T0, rows, theirs)) == 2
    assert src.receive(topic, encode_batch("gw-2", 2, T0 + 0.5, rows, theirs)) == 2
    d = src.diagnostics()
    peer = d["nodes"]["gateway:gw-2"]
    assert d["unfused_anon"] == 2 and peer["unfused_anon"] == 2 and why in peer["anon_problem"]
    assert caplog.text.count(why) == 1
    fused = source(FakeClock(), anon_key="00112233aabbccdd")  # the same secret on both: nothing to say
    assert fused.receive(topic, encode_batch("gw-2", 1, T0, rows, "00112233aabbccdd")) == 2
    assert fused.diagnostics()["unfused_anon"] == 0
    assert fused.diagnostics()["nodes"]["gateway:gw-2"]["anon_problem"] == ""


def test_a_relay_restarting_at_seq_0_is_taken_not_dropped_as_a_resend() -> None:
    """A relay counts its batches from 0 at every start; a resend repeats (seq, sent), a restart does not."""
    src = source(FakeClock())
    rows = [Sighting(T0, "rx-2", "beacon:x:1:2", -70, -59)]
    topic = "visita/v1/s1/gw-2/sightings"
    for seq in range(5):
        assert src.receive(topic, encode_batch("gw-2", seq, T0 + seq * 0.25, rows)) == 1
    for seq in range(5):  # restarted 10 s later: seqs 0.. again
        assert src.receive(topic, encode_batch("gw-2", seq, T0 + 10 + seq * 0.25, rows)) == 1
    assert src.diagnostics()["duplicate_batches"] == 0


def test_a_full_batch_of_real_rows_fits_the_payload_limit() -> None:
    rows = [
        Sighting(T0 + i / 1000, "rx-checkout", f"beacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:{i}:{i}", -70, -59)
        for i in range(MAX_BATCH)
    ]
    payload = encode_batch("gw-2", 1, T0 + 20, rows)
    batch = parse_batch("visita/v1/s1/gw-2/sightings", payload, "s1")
    assert batch is not None and len(batch.sightings) == MAX_BATCH, len(payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_batch_decoder_never_raises(payload: bytes) -> None:
    assert parse_batch("visita/v1/s1/gw-2/sightings", payload, "s1") is None or True


def test_peer_clock_takes_the_fastest_transit_and_is_bounded() -> None:
    c = PeerClock(samples=4, max_offset_s=60)
    assert c.offset == 0.0
    for transit in (0.3, 0.02, 1.5):  # peer 30 s ahead; arrival = sent - 30 + transit
        c.observe(T0 - 30 + transit, T0)
    assert c.offset == pytest.approx(-29.98)
    far = PeerClock(samples=4, max_offset_s=60)
    far.observe(T0 + 3600, T0)
    assert far.offset == 60 and far.measured == 3600


def test_one_batch_stamped_far_off_does_not_move_a_peers_clock_but_a_real_change_does() -> None:
    c = PeerClock(samples=8, max_offset_s=120)
    for i in range(6):
        c.observe(T0 + i + 0.05, T0 + i)  # in step, 50 ms transit
    c.observe(T0 + 6.05, T0 + 100_000)  # one batch from a clock that jumped a day ahead, then was put right
    assert c.offset == pytest.approx(0.05), "a lone outlier would have dropped the peer's good readings as late"
    for i in range(7, 12):  # NTP moved the peer's clock 10 s back for good: it takes over once it holds the median
        c.observe(T0 + i + 0.05, T0 + i - 10)
    assert c.offset == pytest.approx(10.05)


# --------------------------------------------------------------------------- the source, without a broker


def source(clock: FakeClock, **kw: object) -> NodesSource:
    opts = NodesOptions(store="s1", gateway="gw-1", rooms=ROOMS, **kw)  # type: ignore[arg-type]
    return NodesSource(opts, clock)


def test_duplicates_only_within_one_receiver() -> None:
    clock = FakeClock()
    src = source(clock, dedup_s=0.5)
    topic = "espresense/devices/apple:1005:9-26/{}"
    assert src.receive(topic.format("entrance"), report("apple:1005:9-26", -70)) == 1
    assert src.receive(topic.format("checkout"), report("apple:1005:9-26", -80)) == 1  # another receiver: kept
    clock.t += 0.1
    assert src.receive(topic.format("entrance"), report("apple:1005:9-26", -70)) == 0  # same node, same device
    clock.t += 0.6
    assert src.receive(topic.format("entrance"), report("apple:1005:9-26", -72)) == 1  # a new reading
    ident = identifier()
    out = src.poll_sightings(clock.t, ident.remote_subject, ident_known)
    assert [(s.receiver, s.rssi) for s in out] == [("rx-entrance", -70), ("rx-checkout", -80), ("rx-entrance", -72)]
    assert len({s.subject for s in out}) == 1
    d = src.diagnostics()
    assert d["duplicates"] == 1 and d["readings"] == 3 and d["messages"] == 4


def test_remote_and_local_hearing_of_one_phone_is_one_subject() -> None:
    """The address is hashed with the identity's daily salt: the gateway's radio and a node agree."""
    clock = FakeClock()
    src = source(clock)
    src.receive("espresense/devices/apple:1005:9-26/entrance", report("apple:1005:9-26"))
    ident = identifier()
    remote = src.poll_sightings(clock.t, ident.remote_subject, ident_known)
    nearby = bytes([0x10, 0x05, 0x01, 0x18, 0x00, 0x00, 0x00])  # Apple Nearby Info, as docs/frames.md describes
    local = Advert(T0, "rx-local", ADDRESS, True, -60, manufacturer_data={0x004C: nearby})
    decoded = Decoder().decode_batch([local])
    assert decoded, "the Nearby Info frame should decode"
    mine = ident.identify(decoded)
    assert remote[0].subject == mine[0].subject and remote[0].subject.startswith("anon:")


def test_poll_holds_readings_stamped_after_now_and_buffer_is_bounded() -> None:
    clock = FakeClock()
    src = source(clock, buffer_max=3)
    for i in range(5):
        clock.t = T0 + i
        src.receive(f"espresense/devices/iBeacon:{UUID}-1-{i}/entrance", report(f"iBeacon:{UUID}-1-{i}"))
    assert src.diagnostics()["dropped"] == 2
    first = src.poll_sightings(T0 + 3, identifier().remote_subject, ident_known)
    assert [s.subject[-1] for s in first] == ["2", "3"]
    assert [s.ts for s in src.poll_sightings(T0 + 10, identifier().remote_subject, ident_known)] == [T0 + 4]


def test_malformed_and_foreign_messages_are_counted_never_raised() -> None:
    clock = FakeClock()
    src = source(clock)
    for topic, payload in [
        ("espresense/devices/x/entrance", b"\xff\xfe"),
        ("espresense/devices/x/entrance", b"{}"),
        ("visita/v1/s1/gw-2/sightings", b"{"),
        ("visita/v1/s1/gw-2/sightings", json.dumps({"schema": "visita.sightings/1"}).encode()),
        ("espresense/devices/tile:c0ffee123456/entrance", report(f"tile:{MAC}")),
    ]:
        assert src.receive(topic, payload) == 0
    d = src.diagnostics()
    assert d["malformed"] == 4 and d["ignored"] == 1 and d["ignored_kinds"] == {"tile": 1}
    assert src.receive("visita/v1/s1/gw-1/sightings", encode_batch("gw-1", 1, T0, [])) == 0  # our own
    assert src.diagnostics()["own_batches"] == 1


# --------------------------------------------------------------------------- through a real broker


class Publisher:
    """A QoS 1 publisher on the test broker."""

    def __init__(self, broker: Broker) -> None:
        self._client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="test-node")
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        info = self._client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def publisher(broker: Broker) -> Iterator[Publisher]:
    p = Publisher(broker)
    try:
        yield p
    finally:
        p.close()


def wait_for(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_espresense_and_gateway_batches_through_mosquitto(
    broker: Broker, publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    opts = NodesOptions(port=broker.port, store="s1", gateway="gw-1", rooms=ROOMS, max_offset_s=60)
    src = NodesSource(opts, clock)

    async def main() -> None:
        await src.start()
        try:
            await asyncio.to_thread(wait_for, lambda: src.connected)
            await asyncio.sleep(0.2)  # the SUBACK follows CONNACK; a retained-free topic needs it in place
            publisher.publish(f"espresense/devices/iBeacon:{UUID}-100-7/entrance", report(f"iBeacon:{UUID}-100-7"))
            publisher.publish("espresense/devices/apple:1005:9-26/checkout", report("apple:1005:9-26", -77))
            publisher.publish("espresense/devices/apple:1005:9-26/checkout", b"{oops")
            publisher.publish("espresense/devices/samsung:c0ffee123456/entrance", report(f"samsung:{MAC}", mac=None))
            # gw-2's clock runs 30 s ahead of ours.
            peer = [Sighting(T0 + 29.5, "rx-aisle", "member:m-1", -62, -59)]
            publisher.publish("visita/v1/s1/gw-2/sightings", encode_batch("gw-2", 1, T0 + 30, peer))
            publisher.publish("visita/v1/s1/gw-2/sightings", encode_batch("gw-2", 1, T0 + 30, peer))  # resent
            publisher.publish("visita/v1/s1/gw-1/sightings", encode_batch("gw-1", 9, T0, peer))  # our own
            await asyncio.to_thread(wait_for, lambda: src.diagnostics()["messages"] >= 7)
        finally:
            await src.stop()

    asyncio.run(main())
    ident = identifier()
    out = src.poll_sightings(T0 + 1, ident.remote_subject, ident_known)
    by_receiver = {s.receiver: s for s in out}
    assert by_receiver["rx-entrance"].subject == f"beacon:{UUID}:100:7"
    assert by_receiver["rx-checkout"].subject.startswith("anon:") and by_receiver["rx-checkout"].rssi == -77
    peer_sighting = by_receiver["rx-aisle"]
    assert peer_sighting.subject == "member:m-1"
    assert peer_sighting.ts == pytest.approx(T0 - 0.5)  # moved onto our clock
    assert len(out) == 3 and [s.ts for s in out] == sorted(s.ts for s in out)

    d = src.diagnostics()
    assert d["malformed"] == 1 and d["no_address"] == 1 and d["duplicate_batches"] == 1 and d["own_batches"] == 1
    assert d["nodes"]["gateway:gw-2"]["clock_offset_s"] == pytest.approx(-30.0)
    assert d["nodes"]["espresense:checkout"]["receivers"] == ["rx-checkout"]
    text = json.dumps(d) + caplog.text
    for form in (MAC, MAC.upper(), ADDRESS, ADDRESS.lower()):
        assert form not in text


def test_receive_from_paho_thread_and_poll_from_another_do_not_race() -> None:
    clock = FakeClock()
    src = source(clock)
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set() and i < 2000:
            src.receive(f"espresense/devices/iBeacon:{UUID}-1-{i % 50}/entrance", report(f"iBeacon:{UUID}-1-{i % 50}"))
            i += 1

    t = threading.Thread(target=produce)
    t.start()
    got = 0
    ident = identifier()
    while t.is_alive():
        got += len(src.poll_sightings(T0 + 1, ident.remote_subject, ident_known))
    t.join()
    got += len(src.poll_sightings(T0 + 1, ident.remote_subject, ident_known))
    d = src.diagnostics()
    assert got == d["readings"] and got + d["duplicates"] == 2000


# --------------------------------------------------------------------------- visita run --nodes


def test_visita_run_with_nodes_only_feeds_the_pipeline(broker: Broker, publisher: Publisher, tmp_path: Path) -> None:
    """The real CLI: `visita run --nodes --room ...` takes ESPresense reports into identify and the estimator."""
    port = free_port()
    cmd = [
        *VISITA,
        "run",
        "--nodes",
        "--clock-wait",
        "0",  # this machine's clock may not be synchronised: no wait for it here
        "--room",
        "Front=rx-entrance",  # rooms match whatever their case: the node publishes "front"
        "--mqtt",
        broker.url,
        "--dashboard",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(tmp_path / "data"),
        "--until",
        "20s",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            publisher.publish("espresense/devices/apple:1005:9-26/front", report("apple:1005:9-26", -60))
            publisher.publish("espresense/devices/apple:1005:9-26/rx-produce", report("apple:1005:9-26", -85))
            publisher.publish("espresense/devices/samsung:000000000000/front", b"junk")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=2) as r:
                    status = json.loads(r.read())
            except OSError:
                status = {}
            if status.get("nodes", {}).get("readings", 0) >= 6 and status["identity"]["anonymous"] >= 6:
                break
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "nodes      mqtt://127.0.0.1" in out and "front=rx-entrance" in out
    nodes = status["nodes"]
    assert nodes["connected"] and nodes["malformed"] >= 1
    assert set(nodes["nodes"]) == {"espresense:front", "espresense:rx-produce"}
    assert nodes["nodes"]["espresense:front"]["receivers"] == ["rx-entrance"]
    assert status["estimator"].get("unknown_receiver_sightings", 0) == 0
    text = json.dumps(status) + out + err
    for form in (MAC, MAC.upper(), ADDRESS, ADDRESS.lower()):
        assert form not in text


def test_peer_batches_resent_are_dropped_and_a_far_clock_is_clamped(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    src = source(clock, max_offset_s=60)
    rows = [Sighting(T0 + 3599, "rx-aisle", "beacon:x:1:2", -70, -59)]
    topic = "visita/v1/s1/gw-2/sightings"
    assert src.receive(topic, encode_batch("gw-2", 1, T0 + 3600, rows)) == 1  # an hour ahead
    assert src.receive(topic, encode_batch("gw-2", 2, T0 + 3600.1, rows)) == 1
    assert src.receive(topic, encode_batch("gw-2", 1, T0 + 3600, rows)) == 0  # an older batch, resent
    assert src.receive(topic, encode_batch("gw-2", 1, T0 + 3700, rows)) == 1  # restarted: seq 1 again, later
    out = src.poll_sightings(T0 + 10, identifier().remote_subject, ident_known)
    # Moved back by the bound (60 s), then never later than their arrival: all at T0.
    assert [s.ts for s in out] == [T0] * 3
    peer = src.diagnostics()["nodes"]["gateway:gw-2"]
    # The restarted batch's 100 s more is one sample against two: not taken (PeerClock.JITTER_S).
    assert peer["clock_offset_s"] == -60 and peer["clock_offset_measured_s"] == pytest.approx(-3600.1)
    assert peer["clock_clamped"] == 3 and peer["duplicate_batches"] == 1 and peer["batches"] == 3
    assert caplog.text.count("more than max_offset_s") == 1


def test_no_broker_at_start_then_a_broker_restart(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The source keeps retrying in the background: a broker that comes late, or restarts, is picked up."""
    broker = Broker(tmp_path / "late", free_port())
    clock = FakeClock()
    src = NodesSource(NodesOptions(port=broker.port, store="s1", gateway="gw-1", rooms=ROOMS), clock)

    async def main() -> None:
        await src.start()
        try:
            await asyncio.to_thread(wait_for, lambda: src.diagnostics()["last_error"], 5)
            assert not src.connected and "cannot reach the broker" in caplog.text
            broker.start()
            await asyncio.to_thread(wait_for, lambda: src.connected, 10)
            broker.stop()
            await asyncio.to_thread(wait_for, lambda: not src.connected, 10)
            broker.start()
            await asyncio.to_thread(wait_for, lambda: src.connected, 10)
            await asyncio.sleep(0.2)
            pub = Publisher(broker)
            try:
                pub.publish(f"espresense/devices/iBeacon:{UUID}-1-1/checkout", report(f"iBeacon:{UUID}-1-1"))
                await asyncio.to_thread(wait_for, lambda: src.diagnostics()["readings"] == 1)
            finally:
                pub.close()
        finally:
            await src.stop()
            broker.stop()

    asyncio.run(main())
    assert [s.receiver for s in src.poll_sightings(T0, identifier().remote_subject, ident_known)] == ["rx-checkout"]
    assert "lost the broker" in caplog.text


def test_a_peers_rows_are_taken_for_members_this_gateway_provisions_only() -> None:
    """A peer gateway's `member:` rows become this gateway's visits, events and history: a member this gateway does not
    provision is not taken, and so neither is an address a peer writes as a member ref (ESPresense's `mac` form)."""
    clock = FakeClock()
    src = source(clock, max_offset_s=60)
    rows = [
        Sighting(T0 + 0.5, "rx-aisle", "member:m-2", -62, -59),
        Sighting(T0 + 0.5, "rx-aisle", "member:m-peer-only", -62, -59),
        Sighting(T0 + 0.5, "rx-aisle", "member:c0ffee123456", -62, -59),
        Sighting(T0 + 0.5, "rx-aisle", "anon:0123456789abcdef", -62, -59),
    ]
    assert src.receive("visita/v1/s1/gw-2/sightings", encode_batch("gw-2", 1, T0 + 1, rows)) == 4
    out = src.poll_sightings(T0 + 2, identifier().remote_subject, ident_known)
    assert sorted(s.subject for s in out) == ["anon:0123456789abcdef", "member:m-2"]
    assert src.diagnostics()["unknown_members"] == 2


def test_a_step_of_our_clock_moves_the_peers_offsets_with_it_at_once() -> None:
    # Our clock is 100 s behind a peer gateway's until NTP steps it forward; the peer's sightings were placed on our
    # clock by the measured offset. Shifted with the step (gateway.runtime.Gateway.shift), the next batch's sightings
    # are placed right at once; not shifted, 100 s early (late, for the estimator) until new samples held the median.
    topic = "visita/v1/s1/gw-2/sightings"

    def placed(shift: bool) -> list[float]:
        clock = FakeClock(T0 - 100)
        src = source(clock, max_offset_s=300)
        for i in range(6):
            clock.t = T0 - 100 + i + 0.05
            rows = [Sighting(T0 + i - 0.5, "rx-aisle", "beacon:x:1:2", -70, -59)]
            src.receive(topic, encode_batch("gw-2", i + 1, T0 + i, rows))
        assert [s.ts for s in src.poll_sightings(clock.t, identifier().remote_subject, ident_known)] == [
            pytest.approx(T0 - 100 + i - 0.45) for i in range(6)
        ]
        clock.t += 100
        if shift:
            src.shift(100)
        clock.t = T0 + 6.05
        rows = [Sighting(T0 + 5.5, "rx-aisle", "beacon:x:1:2", -70, -59)]
        src.receive(topic, encode_batch("gw-2", 7, T0 + 6, rows))
        return [s.ts for s in src.poll_sightings(clock.t, identifier().remote_subject, ident_known)]

    assert placed(True) == [pytest.approx(T0 + 5.55)]
    assert placed(False) == [pytest.approx(T0 + 5.55 - 100)]


def test_batches_that_came_in_between_the_step_and_the_gateway_following_it_are_not_moved_by_it_again() -> None:
    # A peer first heard just before our clock was stepped forward by 100 s, and two more of its batches read our
    # clock after the step (paho's thread may be the one that sees it) before the gateway followed it (a tick later, or
    # more during a catch-up): their samples are of the new clock already. Moved by the step with the one before, they
    # were 100 s too high and, two of four with the next, made the median: the peer's clock looked 100 s off ours and
    # its sightings were placed at their arrival instead of their time. Only what was stamped before the step (before
    # `at - by / 2`, as the gateway re-dates readings) moves.
    topic = "visita/v1/s1/gw-2/sightings"
    clock = FakeClock(T0 - 100 + 0.05)
    src = source(clock, max_offset_s=300)

    def batch(seq: int) -> None:
        rows = [Sighting(T0 + seq - 1.5, "rx-aisle", "beacon:x:1:2", -70, -59)]
        src.receive(topic, encode_batch("gw-2", seq, T0 + seq - 1, rows))

    batch(1)
    for seq in (2, 3):  # after the step
        clock.t = T0 + seq - 1 + 0.05
        batch(seq)
    src.shift(100, at=T0 + 1.05)  # the gateway follows the step (`at`: our time just after it)
    clock.t = T0 + 3.05
    batch(4)
    assert src.diagnostics()["nodes"]["gateway:gw-2"]["clock_offset_s"] == pytest.approx(0.05)
    placed = [s.ts for s in src.poll_sightings(clock.t, identifier().remote_subject, ident_known)]
    assert placed[1:] == [pytest.approx(T0 + t) for t in (0.55, 1.55, 2.55)]
