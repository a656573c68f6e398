"""Outages against real Mosquitto processes: an hour of store traffic with the broker down, and a
store broker bridged to a "cloud" broker through an outage of the bridge link."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from conftest import VISITA, Broker, Subscriber, free_port

from gateway.store import Store

pytestmark = pytest.mark.broker


def _run(url: str, data: Path, until: str, speed: str) -> list[str]:
    return [
        *VISITA, "run", "--sim", "--scenario", "small-shop", "--speed", speed, "--until", until,
        "--mqtt", url, "--dashboard", "off", "--data-dir", str(data),
    ]  # fmt: skip


def _first_arrivals(sub: Subscriber) -> list[int]:
    """Seqs in the order they first arrived (QoS 1 duplicates, same id, left out)."""
    seen: set[str] = set()
    out = []
    for _, p, _ in sub.snapshot():
        if p.get("seq") is not None and str(p["id"]) not in seen:
            seen.add(str(p["id"]))
            out.append(int(str(p["seq"])))
    return out


def _wait_for(sub: Subscriber, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(set(_first_arrivals(sub))) < n:
        time.sleep(0.1)
    return _first_arrivals(sub)


def test_an_hour_of_traffic_with_the_broker_down_arrives_complete_and_in_order(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker, client_id="hour-subscriber")
    data = tmp_path / "data"
    # 720x: one real second is twelve minutes of store time; the broker is down for 5 s = one hour.
    proc = subprocess.Popen(
        _run(broker.url, data, "3h", "720"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while len(_first_arrivals(sub)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = len(_first_arrivals(sub))
        assert before >= 3, "no events before the outage"
        broker.stop()
        time.sleep(5)
        broker.start()
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    with Store(data) as s:
        n = s.last_seq()
        assert s.pending_events() == []
    seqs = _wait_for(sub, n, 30)
    sub.close()
    assert n - before >= 60, f"too little traffic during the outage: {n - before} events"
    assert sorted(set(seqs)) == list(range(1, n + 1)), "every event arrives"
    assert seqs == sorted(seqs), "in seq order per gateway"
    warnings = [line for line in err.splitlines() if "WARNING" in line and "MQTT broker" in line]
    assert len(warnings) == 1 and "kept in the outbox" in warnings[0], warnings


def test_bridge_from_store_broker_to_cloud_survives_a_link_outage(tmp_path: Path) -> None:
    cloud = Broker(tmp_path / "cloud", free_port())
    store_port = free_port()
    store = Broker(
        tmp_path / "store",
        store_port,
        [
            "allow_anonymous true",
            "connection cloud",
            f"address 127.0.0.1:{cloud.port}",
            "topic visita/# out 1",
            "cleansession false",
            "remote_clientid store-bridge",
            "restart_timeout 1",
            "queue_qos0_messages false",
        ],
    )
    cloud.start()
    store.start()
    try:
        sub = Subscriber(cloud, client_id="cloud-backend")
        data = tmp_path / "data"
        proc = subprocess.Popen(
            _run(store.url, data, "2h", "720"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            deadline = time.monotonic() + 30
            while len(_first_arrivals(sub)) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(_first_arrivals(sub)) >= 3, "nothing crossed the bridge"
            cloud.stop()  # the store's uplink to the cloud is down; the gateway still reaches its store broker
            time.sleep(3)
            cloud.start()
            _, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        assert "WARNING" not in err, "the gateway never lost its own (store) broker"
        with Store(data) as s:
            n = s.last_seq()
        seqs = _wait_for(sub, n, 30)
        sub.close()
        assert sorted(set(seqs)) == list(range(1, n + 1)), f"missing: {sorted(set(range(1, n + 1)) - set(seqs))[:20]}"
    finally:
        store.stop()
        cloud.stop()


def test_two_gateways_with_the_same_ids_are_told_to_take_their_own(broker: Broker, tmp_path: Path) -> None:
    """A copied config: both gateways connect as visita-demo-store-gw-1 and the broker drops each for the other."""
    procs = [
        subprocess.Popen(
            _run(broker.url, tmp_path / f"data-{i}", "15m", "60"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    told = [e for e in errs if "for another client with the same client id 'visita-demo-store-gw-1'" in e]
    assert told, errs
    assert all(e.count("same client id") <= 1 for e in errs), "said once, not at every drop"
