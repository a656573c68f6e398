"""gateway.uplink's PUBACK bookkeeping: an event leaves the outbox only on its own PUBACK.

A unit test of one module: paho's publish() is replaced so a PUBACK can be made to arrive
before publish() returns its message id, the race the uplink has to handle.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway import uplink as uplink_module
from gateway.config import MqttConfig, parse_mqtt_url
from gateway.events import EventFactory
from gateway.uplink import EARLY_PUBACK_S, Uplink

SUCCESS = ReasonCode(PacketTypes.PUBACK, "Success")


@dataclass
class Info:
    mid: int


def connected_uplink(monkeypatch: pytest.MonkeyPatch, mid: int) -> tuple[Uplink, EventFactory]:
    factory = EventFactory("demo-store", "gw-1", 0)
    up = Uplink(MqttConfig(), parse_mqtt_url("mqtt://127.0.0.1:1"), "t", lambda on: factory.status(0.0, on, "t"))
    monkeypatch.setattr(up._client, "publish", lambda *a, **k: Info(mid))
    up._connected.set()
    return up, factory


def test_a_stale_puback_of_a_status_message_never_settles_the_event_that_reuses_its_mid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    up, factory = connected_uplink(monkeypatch, mid=7)
    clock = [1000.0]
    monkeypatch.setattr(uplink_module.time, "monotonic", lambda: clock[0])
    up._on_publish(up._client, None, 7, SUCCESS, None)  # e.g. the retained status, mid 7
    clock[0] += EARLY_PUBACK_S + 60  # 65,535 publishes later paho hands out mid 7 again
    event = factory.make("visit.started", 1.0, {})
    up.offer([event])
    up.pump()
    assert up.take_acks() == [], "acknowledged without a PUBACK of its own: it would leave the outbox"
    up._on_publish(up._client, None, 7, SUCCESS, None)  # its real PUBACK
    assert up.take_acks() == [event.id]


def test_a_puback_that_beats_publish_returning_settles_the_event(monkeypatch: pytest.MonkeyPatch) -> None:
    up, factory = connected_uplink(monkeypatch, mid=9)
    up._on_publish(up._client, None, 9, SUCCESS, None)  # paho's thread got the PUBACK first
    event = factory.make("visit.started", 1.0, {})
    up.offer([event])
    up.pump()
    assert up.take_acks() == [event.id]
