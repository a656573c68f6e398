"""The MQTT uplink: the only module that imports paho.

Durability comes from the outbox in the store, not from paho. The runtime feeds this
module from the store (`room()` then `offer()` with `Store.sendable(cursor, room)`), so the
backlog of an earlier outage or run goes first, in seq order, at most `mqtt.max_rate`
events a second, and new events follow it; an event leaves the outbox only when
`take_acks` reports its PUBACK. At most `max_inflight` events are unacknowledged; paho
resends those after a reconnect (with the DUP flag), so an event is never lost and a
duplicate can only be a QoS 1 resend, recognisable by its `id`.

Connection: MQTT 5 (or 3.1.1) with a stable client id and a persistent session (clean
start off, session expiry), TLS for ``mqtts://`` URLs (a CA file, optionally a client
certificate and key), a user name and password, and reconnects with exponential backoff
and jitter, so a fleet of gateways does not reconnect in step after a broker restart.

The `status` topic carries a retained birth message ("online") and the last will
("offline"), so the backend always knows whether the gateway is reachable. `health`
events (outside the durable stream, like `status`) are published with `publish_transient`.

Downlink commands arrive on ``<prefix>cmd/<name>``; they are handed to the `on_command`
callback given to `start` (gateway/downlink.py decides what they mean) and answered with
`reply`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import sys
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
from gateway.events import topic, topic_prefix
from gateway.model import Event

log = logging.getLogger("visita.uplink")

QOS = 1

_AUTH_HINT = {
    # CONNACK reason codes (MQTT 5) and their 3.1.1 equivalents, with what to check.
    "Bad user name or password": "check mqtt.username and the password file",
    "Not authorized": "check mqtt.username, the password file, or the client certificate",
    "Client identifier not valid": "check mqtt.client_id",
}


EARLY_PUBACK_S = 5.0
"""How long a PUBACK that beat publish() returning its mid may wait to be matched, s."""


QUICK_DROP_S = 5.0
"""A connection the broker drops within this long of accepting it counts as a quick drop; three in a row mean
another client with the same client id is most likely taking the session over each time (a copied config)."""


class Uplink:
    """Publishes events with QoS 1 and reports which ones the broker acknowledged."""

    def __init__(
        self,
        cfg: MqttConfig,
        url: MqttUrl,
        client_id: str,
        status: Callable[[bool], Event],
        password: str | None = None,
        outbox: bool = True,
    ) -> None:
        """`password` is read by the caller (a file, systemd's CREDENTIALS_DIRECTORY); it is never logged. `outbox`
        False: a relay's uplink, which has no events to keep (its log lines do not speak of an outbox)."""
        self._cfg = cfg
        self._outbox = outbox
        self._url = url
        self._status = status
        # Never held while calling into paho: paho calls on_publish under its own mutex.
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # one pump at a time (runtime thread or paho's on_connect)
        self._queue: deque[Event] = deque()  # stored, not yet handed to paho
        self._inflight: dict[int, Event] = {}  # mid -> handed, waiting for PUBACK
        # PUBACKs that beat publish() returning its mid, with when they came. Status, health and reply
        # messages land here too and are never claimed: only a fresh entry may settle an event, or an
        # old one would settle the event that reuses its mid 65,535 publishes later, unacknowledged.
        self._early: dict[int, tuple[ReasonCode, float]] = {}
        self._acked: list[str] = []
        self._connected = threading.Event()
        self._outage_reported = False
        self._last_error = ""
        self._published = 0
        self._refused = 0
        self._refused_kind = ""  # what the last refusal logged was about ("refused zone.changed")
        self._paused_until = 0.0  # after a refused publish (an ACL), wait before trying again
        self._refusal_backoff = 0.0
        self._attempt = 0
        self._connects = 0
        self._client_id = client_id
        self._connected_at = 0.0
        self._quick_drops = 0  # connections in a row the broker dropped within QUICK_DROP_S
        self._taken_over_said = False
        self.cursor = 0
        """Highest seq offered so far (the feed asks the store for events after it)."""
        self._tokens = float(cfg.max_rate)
        self._t_tokens = time.monotonic()
        self._on_command: Callable[[str, bytes], None] | None = None
        v5 = cfg.protocol == "5"
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else False,
        )
        # paho's own queue stays unbounded: it only ever holds our in-flight window.
        self._client.max_inflight_messages_set(cfg.max_inflight)
        self._client.reconnect_delay_set(cfg.backoff_min_s, cfg.backoff_max_s)  # type: ignore[arg-type]
        if url.tls:
            self._client.tls_set(
                ca_certs=cfg.ca or None,
                certfile=cfg.cert or None,
                keyfile=cfg.key or None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if cfg.username or password:
            self._client.username_pw_set(cfg.username or None, password)
        will = status(False)
        self._prefix = topic_prefix(will.store, will.gateway)
        self._client.will_set(topic(will.store, will.gateway, "status"), will.payload(), qos=QOS, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message

    # ----------------------------------------------------------------- lifecycle

    def start(self, on_command: Callable[[str, bytes], None] | None = None) -> None:
        """Connect in the background; keeps retrying (backoff with jitter) while the broker is unreachable.

        With `on_command`, subscribes to ``<prefix>cmd/+`` and calls it (on paho's thread)
        with the command name and the payload of each message.
        """
        self._on_command = on_command
        if self._cfg.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._cfg.session_expiry_s
            self._client.connect_async(
                self._url.host,
                self._url.port,
                keepalive=self._cfg.keepalive_s,
                clean_start=False,
                properties=props,
            )
        else:
            self._client.connect_async(self._url.host, self._url.port, keepalive=self._cfg.keepalive_s)
        self._client.loop_start()

    def stop(self, flush_timeout_s: float) -> int:
        """Wait up to `flush_timeout_s` for everything offered to be acknowledged, then disconnect.

        Returns how many events are still unacknowledged (they stay in the outbox for next time).
        """
        deadline = time.monotonic() + flush_timeout_s
        try:
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
        finally:
            self._client.loop_stop()
        return left

    @property
    def connected(self) -> bool:
        """True while a session with the broker is up."""
        return self._connected.is_set()

    # ----------------------------------------------------------------- data path

    def room(self) -> int:
        """How many more events `offer` takes now: the in-flight window, limited to `max_rate` a second."""
        now = time.monotonic()
        with self._lock:
            rate = float(self._cfg.max_rate)
            # A burst of at most a quarter of a second's worth (at least the window): one tick's share.
            burst = max(rate / 4.0, float(self._cfg.max_inflight))
            self._tokens = min(burst, self._tokens + (now - self._t_tokens) * rate)
            self._t_tokens = now
            if not self.connected or now < self._paused_until:
                return 0
            # The queue holds up to a fifth of a second's worth beyond the in-flight window, so PUBACKs
            # refill the window between the runtime's ticks (see _on_publish).
            cap = max(2 * self._cfg.max_inflight, self._cfg.max_rate // 5)
            window = cap - len(self._queue) - len(self._inflight)
            return max(0, min(int(self._tokens), window))

    def offer(self, events: Iterable[Event]) -> int:
        """Queue events that are already in the outbox, in seq order; returns how many were taken.

        Only events that continue the cursor are taken (seq above it, in order); the feed
        fetches anything else from the store again, so an event offered out of turn is
        never sent ahead of the backlog nor skipped.
        """
        taken = 0
        with self._lock:
            for ev in events:
                if ev.seq is None or ev.seq <= self.cursor:
                    continue
                self._queue.append(ev)
                self.cursor = ev.seq
                taken += 1
            self._tokens -= taken
        if taken:
            self.pump()
        return taken

    def pump(self, blocking: bool = True) -> None:
        """Hand queued events to paho while connected, keeping the in-flight window.

        Not `blocking`: return at once when another thread is pumping (paho's thread must
        never wait for ours, which may be waiting inside paho for paho's own lock).
        """
        if not self._send_lock.acquire(blocking=blocking):
            return
        try:
            self._pump_locked()
        finally:
            self._send_lock.release()

    def _pump_locked(self) -> None:
        while self.connected and time.monotonic() >= self._paused_until:
            with self._lock:
                if not self._queue or len(self._inflight) >= self._cfg.max_inflight:
                    return
                event = self._queue.popleft()
            # paho keeps the message (and resends it after a reconnect) even if this
            # publish races with a disconnect, so it is in flight either way.
            info = self._client.publish(topic(event.store, event.gateway, event.type), event.payload(), qos=QOS)
            with self._lock:
                early = self._early.pop(info.mid, None)
                if early is None or time.monotonic() - early[1] > EARLY_PUBACK_S:
                    self._inflight[info.mid] = event
                else:
                    self._settle(event, early[0])

    def feed(self, fetch: Callable[[int, int], list[Event]]) -> int:
        """Top the queue up from the outbox: `fetch(after_seq, limit)` is `Store.sendable`. Runtime thread only.

        Returns how many events were taken. Also restarts sending after a pause.
        """
        room = self.room()
        taken = self.offer(fetch(self.cursor, room)) if room else 0
        self.pump()
        return taken

    def reconfigure(self, cfg: MqttConfig) -> None:
        """Take the settings that can change live (max_rate, health_interval_s); the connection stays."""
        with self._lock:
            self._cfg = cfg

    def publish_transient(self, event: Event) -> bool:
        """Publish an event outside the durable stream (`health`) if connected; False when not sent."""
        if not self.connected:
            return False
        self._client.publish(topic(event.store, event.gateway, event.type), event.payload(), qos=0)
        return True

    def publish_live(self, event_type: str, payload: bytes) -> bool:
        """Publish live data (a relay's sighting batch) on ``<prefix><event_type>`` with QoS 0, if connected; False
        when not sent. Never queued: paho keeps no QoS 0 message for later, so an outage drops, never delays."""
        if not self.connected:
            return False
        info = self._client.publish(f"{self._prefix}{event_type}", payload, qos=0)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def reply(self, name: str, payload: bytes) -> None:
        """Publish a downlink command's result on ``<prefix>cmd_result/<name>`` (QoS 1, not retained)."""
        self._client.publish(f"{self._prefix}cmd_result/{name}", payload, qos=QOS)

    def take_acks(self) -> list[str]:
        """Ids of events the broker acknowledged since the last call."""
        with self._lock:
            acked, self._acked = self._acked, []
        return acked

    def pending(self) -> int:
        """Events offered and not yet acknowledged."""
        with self._lock:
            return len(self._queue) + len(self._inflight)

    @property
    def last_error(self) -> str:
        """The last connection or publish error, "" once connected again (or, for a refused publish, once the broker
        accepts one again)."""
        return self._last_error

    @property
    def acknowledged(self) -> int:
        """Events acknowledged by the broker since start."""
        return self._published

    def diagnostics(self) -> dict[str, Any]:
        """Connection state, queue depth, in-flight count, acknowledged and refused totals, whether the broker refuses
        this gateway's events now (an ACL: until one is accepted again), last error."""
        with self._lock:
            return {
                "broker": str(self._url),
                "protocol": self._cfg.protocol,
                "connected": self.connected,
                "connects": self._connects,
                "queued": len(self._queue),
                "inflight": len(self._inflight),
                "acknowledged": self._published,
                "refused": self._refused,
                "refusing": bool(self._refused_kind),
                "cursor": self.cursor,
                "last_error": self._last_error,
            }

    # ----------------------------------------------------------------- paho callbacks (paho's thread)

    def _next_delay(self) -> None:
        """Exponential backoff with "equal jitter": half the step fixed, half random."""
        self._attempt += 1
        step = min(self._cfg.backoff_max_s, self._cfg.backoff_min_s * 2 ** min(self._attempt - 1, 30))
        delay = step * random.uniform(0.5, 1.0)
        # paho waits min(previous * 2, max_delay): with both set to `delay` it waits at most that.
        self._client.reconnect_delay_set(delay, delay)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            hint = _AUTH_HINT.get(str(reason), "check the broker's log")
            self._report_outage(f"refused the connection: {reason}; {hint}", level=logging.ERROR)
            self._next_delay()
            return
        if not self._quick_drops:
            # After quick drops (most likely another client with this client id) the backoff keeps growing and the
            # outage stays reported: two gateways taking the session from each other must not reconnect twice a
            # second, nor log each round, for as long as both run.
            self._attempt = 0
            self._outage_reported = False
        self._connects += 1
        self._connected_at = time.monotonic()
        self._client.reconnect_delay_set(self._cfg.backoff_min_s, self._cfg.backoff_max_s)  # type: ignore[arg-type]
        self._connected.set()
        birth = self._status(True)
        client.publish(topic(birth.store, birth.gateway, "status"), birth.payload(), QOS, retain=True)
        if self._on_command is not None:
            client.subscribe(f"{self._prefix}cmd/+", qos=QOS)
        # Only what was handed over is known here; the rest of the outbox (/api/v1/status → store.outbox_depth) follows.
        log.log(
            logging.DEBUG if self._quick_drops else logging.INFO,
            "MQTT connected to %s; sending the outbox (%d event(s) handed over and not yet acknowledged first)"
            if self._outbox
            else "MQTT connected to %s",
            self._url,
            *((self.pending(),) if self._outbox else ()),
        )
        self._last_error = ""
        self._refused_kind = ""
        self.pump()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError` block: the exception says why.
        err = sys.exc_info()[1]
        if isinstance(err, ssl.SSLError):
            what = f"refused the TLS handshake: {err.reason or err}; check mqtt.ca, mqtt.cert and mqtt.key"
            self._report_outage(what, level=logging.ERROR)
        elif err is not None:
            self._report_outage(f"is unreachable ({getattr(err, 'strerror', None) or err})")
        else:
            self._report_outage("is unreachable")
        self._next_delay()

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
        if was:
            # A broker that drops a client for another with the same client id says "Session taken over" (MQTT 5)
            # or nothing (MQTT 3.1.1, and Mosquitto to the client it drops): three silent drops in a row, each
            # within seconds of connecting, are that too. A drop with another reason says that reason instead.
            silent = str(reason) in ("Unspecified error", "Success", "Normal disconnection")
            quick = silent and time.monotonic() - self._connected_at < QUICK_DROP_S
            self._quick_drops = self._quick_drops + 1 if quick or str(reason) == "Session taken over" else 0
            if not self._quick_drops:  # a connection that held: this outage is new, and backs off afresh
                self._attempt = 0
                self._outage_reported = False
            if (self._quick_drops >= 3 or str(reason) == "Session taken over") and not self._taken_over_said:
                self._taken_over_said = True  # once: the drops go on as long as the other client does
                log.error(
                    "MQTT broker %s dropped this gateway's connection for another client with the same client id %r "
                    "(%s): most likely a second gateway with the same store and gateway ids (a copied config or SD "
                    "card); give each gateway its own `gateway` id, or set mqtt.client_id",
                    self._url,
                    self._client_id,
                    "session taken over" if str(reason) == "Session taken over" else "3 times within seconds",
                )
        if was and reason.is_failure:
            self._report_outage(f"dropped the connection: {reason}")
        elif not was and self._url.tls:
            # Closed before CONNACK: with TLS 1.3 a refused client certificate shows up only here.
            self._report_outage(
                f"closed the connection before accepting it ({reason}): the TLS client certificate may be "
                "refused; check mqtt.cert, mqtt.key and the broker's log",
                level=logging.ERROR,
            )
        elif not was:
            self._report_outage(f"closed the connection before accepting it ({reason}); check the broker's log")
        self._next_delay()

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
                # A status, health or reply message, or a PUBACK that arrived before publish() returned its mid.
                now = time.monotonic()
                if len(self._early) > 1000:
                    self._early = {m: e for m, e in self._early.items() if now - e[1] <= EARLY_PUBACK_S}
                self._early[mid] = (reason, now)
                return
            self._settle(event, reason)
        # Refill the window from the queue at once rather than at the runtime's next tick.
        self.pump(blocking=False)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        name = msg.topic.removeprefix(f"{self._prefix}cmd/")
        if self._on_command is None or name == msg.topic or "/" in name:
            return
        try:
            self._on_command(name, bytes(msg.payload))
        except Exception:
            log.exception("downlink command %r failed", name)

    def _settle(self, event: Event, reason: ReasonCode) -> None:
        """Record a PUBACK (caller holds the lock)."""
        if reason.is_failure:
            # The broker refused it (an ACL): keep it stored, pause, and try again later, in seq order (refusals of
            # a window come back one by one; each goes back before the queued events of higher seq).
            self._refused += 1
            kind, error = f"refused {event.type}", f"refused {event.type} seq {event.seq}: {reason}"
            at = next((i for i, q in enumerate(self._queue) if (q.seq or 0) > (event.seq or 0)), len(self._queue))
            self._queue.insert(at, event)
            now = time.monotonic()
            if now >= self._paused_until:  # the first refusal of this round: one pause per round, longer each time
                self._refusal_backoff = min(60.0, max(1.0, self._refusal_backoff * 2))
                self._paused_until = now + self._refusal_backoff
                if kind != self._refused_kind:
                    self._refused_kind = kind
                    log.error(
                        "MQTT broker %s %s; check the broker's ACL for %s# (retrying in %.0f s)",
                        self._url,
                        error,
                        self._prefix,
                        self._refusal_backoff,
                    )
                self._last_error = f"broker {self._url} {error}"
            return
        if time.monotonic() >= self._paused_until:  # acknowledged after a pause, not within the refused window
            self._refusal_backoff = 0.0
            if self._refused_kind:  # the ACL was fixed: say so, and stop reporting the refusal as current
                log.info("MQTT broker %s accepts this gateway's events again", self._url)
                self._refused_kind = ""
                self._last_error = ""
        self._acked.append(event.id)
        self._published += 1

    def _report_outage(self, what: str, level: int = logging.WARNING) -> None:
        self._last_error = f"broker {self._url} {what}"
        if not self._outage_reported:
            # Once per outage, not once per retry.
            self._outage_reported = True
            log.log(
                level,
                "MQTT broker %s %s; "
                + ("events are kept in the outbox and sent when it is back" if self._outbox else "nothing is kept")
                + " (retrying)",
                self._url,
                what,
            )
