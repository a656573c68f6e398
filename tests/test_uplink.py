"""Uplink pieces that need no broker: credentials, settings checks, backoff, the feed's cursor."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MqttConfig, parse_mqtt_url
from gateway.events import EventFactory
from gateway.model import Event
from gateway.uplink import Uplink


def _uplink(**cfg: object) -> tuple[Uplink, EventFactory]:
    settings = MqttConfig.model_validate({"url": "mqtt://127.0.0.1:1", **cfg})
    factory = EventFactory("s", "g", 0)
    up = Uplink(settings, parse_mqtt_url(settings.url), "t", lambda on: factory.status(time.time(), on, "t"))
    return up, factory


def test_password_from_file_from_systemd_credentials_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert MqttConfig().password() is None
    f = tmp_path / "pw"
    f.write_text("from-file\nignored\n")
    with pytest.raises(ValueError, match="mode 0644 lets anyone on this machine read it; chmod 640 it"):
        MqttConfig(password_file=str(f)).password()
    f.chmod(0o600)
    assert MqttConfig(password_file=str(f)).password() == "from-file"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-systemd")
    (creds / "mqtt-password").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert MqttConfig().password() == "from-systemd"
    assert MqttConfig(password_file=str(f)).password() == "from-file", "an explicit file wins"
    with pytest.raises(ValueError, match=r"mqtt.password_file .*missing: cannot be read"):
        MqttConfig(password_file=str(tmp_path / "missing")).password()


def test_cert_without_key_and_backoff_order_are_refused() -> None:
    with pytest.raises(ValueError, match=r"mqtt\.cert and mqtt\.key go together"):
        MqttConfig(cert="/x.pem")
    with pytest.raises(ValueError, match="backoff_min_s must not be above"):
        MqttConfig(backoff_min_s=10, backoff_max_s=1)
    with pytest.raises(ValueError):
        MqttConfig.model_validate({"protocol": "4"})


def test_backoff_doubles_with_jitter_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    up, _ = _uplink(backoff_min_s=0.5, backoff_max_s=8.0)
    delays: list[float] = []
    monkeypatch.setattr(up._client, "reconnect_delay_set", lambda a, b: delays.append(a))
    for _ in range(300):
        up._next_delay()
    steps = [min(8.0, 0.5 * 2**i) for i in range(300)]
    assert all(step / 2 <= d <= step for d, step in zip(delays, steps, strict=True))
    assert len({round(d, 6) for d in delays[10:]}) > 200, "jittered, not in step"


def test_offer_takes_only_events_after_the_cursor_in_order() -> None:
    up, factory = _uplink()
    events: list[Event] = [factory.make("visit.started", 1.0, {}) for _ in range(5)]
    assert up.offer(events[:3]) == 3 and up.cursor == 3
    assert up.offer(events[1:4]) == 1 and up.cursor == 4, "already offered ones are skipped"
    assert up.pending() == 4
    assert up.room() == 0, "nothing is fed while disconnected"


def test_refused_events_go_back_in_seq_order_and_one_window_of_refusals_is_one_pause(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker refuses a window of publishes (an ACL): their PUBACKs come one by one, lowest seq first."""
    up, factory = _uplink()
    events: list[Event] = [factory.make("zone.changed", 1.0, {}) for _ in range(6)]
    up.offer(events)  # disconnected: all queued
    window = [up._queue.popleft() for _ in range(4)]  # seqs 1-4 handed to paho, 5-6 still queued
    refused = ReasonCode(PacketTypes.PUBACK, "Not authorized")
    with caplog.at_level("ERROR", logger="visita.uplink"), up._lock:
        for ev in window[:3]:  # seqs 1, 2, 3 refused; 4 acknowledged
            up._settle(ev, refused)
        up._settle(window[3], ReasonCode(PacketTypes.PUBACK, "Success"))
    assert [e.seq for e in up._queue] == [1, 2, 3, 5, 6], "retried in seq order, ahead of what waits"
    assert up._refusal_backoff == 1.0, "one pause for the window, not one doubling per refused PUBACK"
    assert len(caplog.records) == 1 and "refused zone.changed seq 1" in caplog.text
    assert "broker" not in caplog.records[0].getMessage().split(" refused ")[0].removeprefix("MQTT broker ")
    # The next round refused again: the pause doubles once.
    up._paused_until = 0.0
    with up._lock:
        for _ in range(3):
            up._settle(up._queue.popleft(), refused)
    assert up._refusal_backoff == 2.0 and [e.seq for e in up._queue] == [1, 2, 3, 5, 6]


def test_only_silent_quick_drops_or_a_session_taken_over_are_blamed_on_a_second_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    up, _ = _uplink()

    def drops(reason: str, n: int) -> int:
        for _ in range(n):
            up._connected.set()
            up._connected_at = time.monotonic()
            up._on_disconnect(up._client, None, None, ReasonCode(PacketTypes.DISCONNECT, reason), None)  # type: ignore[arg-type]
        return caplog.text.count("same client id")

    with caplog.at_level("ERROR", logger="visita.uplink"):
        assert drops("Message rate too high", 3) == 0, "a drop that says why is not a second client"
        assert drops("Unspecified error", 2) == 0
        assert drops("Unspecified error", 1) == 1
        assert drops("Unspecified error", 3) == 1, "said once"


def test_a_second_client_taking_the_session_is_fought_with_growing_backoff_and_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two gateways with one client id (a copied config): each connection is accepted and dropped at once. The
    gateway used to reconnect every 0.5 s and log a WARNING and an INFO each time, for as long as both ran."""
    up, _ = _uplink(backoff_min_s=0.5, backoff_max_s=60.0)
    delays: list[float] = []
    monkeypatch.setattr(up._client, "reconnect_delay_set", lambda a, b: delays.append(a))
    accepted = ReasonCode(PacketTypes.CONNACK, "Success")
    dropped = ReasonCode(PacketTypes.DISCONNECT, "Unspecified error")
    with caplog.at_level("DEBUG", logger="visita.uplink"):
        for _ in range(8):
            up._on_connect(up._client, None, None, accepted, None)  # type: ignore[arg-type]
            up._on_disconnect(up._client, None, None, dropped, None)  # type: ignore[arg-type]
    after_drops = delays[1::2]  # each connect resets paho's delay first; each drop sets the next one
    assert after_drops[-1] >= 0.5 * 2**6 * 0.5, after_drops  # the 8th round waits half a minute or so
    infos = [r for r in caplog.records if r.levelname == "INFO"]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(infos) == 1 and len(warnings) == 1 and len(errors) == 1, caplog.text
    assert "same client id" in errors[0].getMessage()
    # A connection that then holds, and drops later: a new outage, said again, backing off from the start.
    caplog.clear()
    up._on_connect(up._client, None, None, accepted, None)  # type: ignore[arg-type]
    up._connected_at -= 60
    up._on_disconnect(up._client, None, None, dropped, None)  # type: ignore[arg-type]
    assert delays[-1] <= 0.5 and [r.levelname for r in caplog.records] == ["WARNING"], caplog.text
