"""Shared fixtures: private Mosquitto brokers on free loopback ports, free ports, the CLI."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/bin/mosquitto")
VISITA = [sys.executable, "-m", "gateway.cli"]


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mosquitto_binary() -> str:
    """The mosquitto executable; fails (never skips) when it is missing."""
    found = shutil.which("mosquitto") or next((p for p in MOSQUITTO_CANDIDATES if os.path.exists(p)), None)
    if found is None:
        pytest.fail("mosquitto is not installed (Debian package mosquitto): run scripts/test.sh, which installs it")
    return found


class Broker:
    """A mosquitto process of our own: persistent sessions, restartable on the same port."""

    def __init__(self, workdir: Path, port: int, listener: list[str] | None = None) -> None:
        """`listener`: settings of the listener (TLS files, password file, ACL); default anonymous plain MQTT."""
        self.port = port
        self.url = f"mqtt://127.0.0.1:{port}"
        self._dir = workdir
        self._dir.mkdir(parents=True, exist_ok=True)
        self._conf = self._dir / "mosquitto.conf"
        self._conf.write_text(
            "\n".join(
                [
                    f"listener {port} 127.0.0.1",
                    *(listener if listener is not None else ["allow_anonymous true"]),
                    "persistence true",
                    f"persistence_location {self._dir}/",
                    "autosave_interval 1",
                    "max_queued_messages 100000",
                    "log_dest stderr",
                    # Started as root it would drop to user mosquitto and fail to write here.
                    "user root",
                    "",
                ]
            )
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        with open(self._dir / "mosquitto.log", "ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen([mosquitto_binary(), "-c", str(self._conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self._dir / 'mosquitto.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"mosquitto did not listen on {self.port} within 10 s")

    def reload(self) -> None:
        """Make it read its password and ACL files again (SIGHUP), as an operator fixing them would."""
        assert self._proc is not None and self._proc.poll() is None, "the broker is not running"
        self._proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """Stop by PID (SIGTERM saves the persistent sessions)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private broker on a free loopback port, stopped after the test."""
    b = Broker(tmp_path / "broker", free_port())
    b.start()
    try:
        yield b
    finally:
        b.stop()


class Subscriber:
    """A persistent-session QoS 1 subscriber that collects every message (payload decoded as JSON)."""

    def __init__(self, broker: Broker, topic: str = "visita/#", client_id: str = "test-subscriber") -> None:
        import json
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, dict[str, object], bool]] = []  # (topic, payload, retained)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        self._client.reconnect_delay_set(0.2, 1)  # type: ignore[arg-type]

        def on_connect(client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
            client.subscribe(topic, qos=1)

        def on_subscribe(client: mqtt.Client, userdata: object, mid: int, rcs: object, props: object) -> None:
            self._subscribed.set()

        def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            with self._lock:
                self.messages.append((msg.topic, json.loads(msg.payload), bool(msg.retain)))

        self._client.on_connect = on_connect
        self._client.on_subscribe = on_subscribe
        self._client.on_message = on_message
        self._client.connect("127.0.0.1", broker.port)
        self._client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("test subscriber could not subscribe")

    def snapshot(self) -> list[tuple[str, dict[str, object], bool]]:
        """Messages received so far."""
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()


def self_signed_cert(where: Path, days: int = 825, name: str = "dashboard") -> tuple[Path, Path]:
    """A self-signed certificate and key, made the way docs/install.md says (with 127.0.0.1 among its names)."""
    cert, key = where / f"{name}.crt", where / f"{name}.key"
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    cmd += ["-days", str(days), "-subj", "/CN=visita-gw", "-addext", "subjectAltName=DNS:visita-gw.local,IP:127.0.0.1"]
    cmd += ["-keyout", str(key), "-out", str(cert)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"openssl (Debian package openssl) failed: {r.stderr}"
    key.chmod(0o600)  # as docs/install.md says: the gateway refuses a key others may read
    return cert, key
