"""The MQTT uplink: the only module that imports paho.

Durability comes from the outbox in the store, not from paho: the runtime stores an event
before it offers it here, and deletes it only when `take_acks` reports its PUBACK. This
module hands events to paho only while connected and keeps at most `max_inflight` of them
unacknowledged; paho itself resends those after a reconnect (with the DUP flag), so an event
is never lost and a duplicate can only be a QoS 1 resend, recognisable by its `id`.

The `status` topic carries a retained birth message ("online") and the last will
("offline"), so the backend always knows whether the gateway is reachable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MqttConfig, MqttUrl
from gateway.events import topic
from gateway.model import Event

log = logging.getLogger("visita.uplink")

QOS = 1


class Uplink:
    """Publishes events with QoS 1 and reports which ones the broker acknowledged."""

    def __init__(
        self,
        cfg: MqttConfig,
        url: MqttUrl,
        client_id: str,
        status: Callable[[bool], Event],
    ) -> None:
        self._cfg = cfg
        self._url = url
        self._status = status
        # Never held while calling into paho: paho calls on_publish under its own mutex.
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # one pump at a time (runtime thread or paho's on_connect)
        self._queue: deque[Event] = deque()  # stored, not yet handed to paho
        self._inflight: dict[int, Event] = {}  # mid -> handed, waiting for PUBACK
        self._early: dict[int, ReasonCode] = {}  # PUBACKs that beat publish() returning its mid
        self._acked: list[str] = []
        self._connected = threading.Event()
        self._outage_reported = False
        self._last_error = ""
        self._published = 0
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        # paho's own queue stays unbounded: it only ever holds our in-flight window.
        self._client.max_inflight_messages_set(cfg.max_inflight)
        self._client.reconnect_delay_set(1, 30)
        if url.tls:
            self._client.tls_set()
        will = status(False)
        self._client.will_set(topic(will.store, will.gateway, "status"), will.payload(), qos=QOS, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Connect in the background; keeps retrying while the broker is unreachable."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        self._client.connect_async(
            self._url.host,
            self._url.port,
            keepalive=self._cfg.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    def stop(self, flush_timeout_s: float) -> int:
        """Wait up to `flush_timeout_s` for everything offered to be acknowledged, then disconnect.

        Returns how many events are still unacknowledged (they stay in the outbox for next time).
        """
        deadline = time.monotonic() + flush_timeout_s
        while self.connected and self.pending() and time.monotonic() < deadline:
            self.pump()
            time.sleep(0.02)
        left = self.pending()
        if self.connected:
            # A clean goodbye: the will is not sent on a normal disconnect, so say "offline" ourselves.
            bye = self._status(False)
            info = self._client.publish(topic(bye.store, bye.gateway, "status"), bye.payload(), QOS, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=2.0)
            self._client.disconnect()
        self._client.loop_stop()
        return left

    @property
    def connected(self) -> bool:
        """True while a session with the broker is up."""
        return self._connected.is_set()

    # ----------------------------------------------------------------- data path

    def offer(self, events: Iterable[Event]) -> None:
        """Queue events that are already in the outbox, in seq order."""
        with self._lock:
            self._queue.extend(events)
        self.pump()

    def pump(self) -> None:
        """Hand queued events to paho while connected, keeping the in-flight window."""
        with self._send_lock:
            while self.connected:
                with self._lock:
                    if not self._queue or len(self._inflight) >= self._cfg.max_inflight:
                        return
                    event = self._queue.popleft()
                # paho keeps the message (and resends it after a reconnect) even if this
                # publish races with a disconnect, so it is in flight either way.
                info = self._client.publish(topic(event.store, event.gateway, event.type), event.payload(), qos=QOS)
                with self._lock:
                    early = self._early.pop(info.mid, None)
                    if early is None:
                        self._inflight[info.mid] = event
                    else:
                        self._settle(event, early)

    def take_acks(self) -> list[str]:
        """Ids of events the broker acknowledged since the last call."""
        with self._lock:
            acked, self._acked = self._acked, []
        return acked

    def pending(self) -> int:
        """Events offered and not yet acknowledged."""
        with self._lock:
            return len(self._queue) + len(self._inflight)

    def diagnostics(self) -> dict[str, Any]:
        """Connection state, queue depth, in-flight count, acknowledged total, last error."""
        with self._lock:
            return {
                "broker": str(self._url),
                "connected": self.connected,
                "queued": len(self._queue),
                "inflight": len(self._inflight),
                "acknowledged": self._published,
                "last_error": self._last_error,
            }

    # ----------------------------------------------------------------- paho callbacks (paho's thread)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            self._report_outage(f"refused the connection: {reason}")
            return
        self._connected.set()
        birth = self._status(True)
        client.publish(topic(birth.store, birth.gateway, "status"), birth.payload(), QOS, retain=True)
        log.info("MQTT connected to %s; %d event(s) waiting to be sent", self._url, self.pending())
        self._outage_reported = False
        self._last_error = ""
        self.pump()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._report_outage("is unreachable")

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was = self.connected
        self._connected.clear()
        if was and reason.is_failure:
            self._report_outage(f"dropped the connection: {reason}")

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            event = self._inflight.pop(mid, None)
            if event is None:
                # A status message, or a PUBACK that arrived before publish() returned its mid.
                if len(self._early) > 1000:
                    self._early.clear()
                self._early[mid] = reason
                return
            self._settle(event, reason)

    def _settle(self, event: Event, reason: ReasonCode) -> None:
        """Record a PUBACK (caller holds the lock)."""
        if reason.is_failure:
            # The broker refused it (for example an ACL): keep it stored and try again later.
            self._last_error = f"broker refused {event.type} seq {event.seq}: {reason}"
            self._queue.appendleft(event)
            log.error("MQTT broker %s %s", self._url, self._last_error)
            return
        self._acked.append(event.id)
        self._published += 1

    def _report_outage(self, what: str) -> None:
        self._last_error = f"broker {self._url} {what}"
        if not self._outage_reported:
            # Once per outage, not once per retry.
            self._outage_reported = True
            log.warning(
                "MQTT broker %s %s; events are kept in the outbox and sent when it is back (retrying)",
                self._url,
                what,
            )
