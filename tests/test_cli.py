"""`visita` as people and scripts use it: Ctrl-C, restarts, and clear errors for bad input."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import VISITA, Broker, Subscriber
from test_run_e2e import last_seq, outbox, run_args, stream, wait_for_seqs


def test_ctrl_c_flushes_the_outbox_and_a_restart_continues_the_sequence(broker: Broker, tmp_path: Path) -> None:
    data = tmp_path / "data"
    sub = Subscriber(broker, client_id="ctrl-c-subscriber")
    args = [a for a in run_args(broker.url, data) if a not in ("--until", "20m")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(stream(sub)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "0 still queued in the outbox" in out, out
    assert outbox(data) == 0
    first = last_seq(out)
    assert first >= 5

    again = subprocess.run(run_args(broker.url, data, until="3m"), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    second = last_seq(again.stdout)
    assert second > first, "the second run made events of its own"
    seqs = wait_for_seqs(sub, second)
    sub.close()
    assert seqs == list(range(1, second + 1)), "one gapless sequence across the restart, no seq reused"
    statuses = [p["data"] for t, p, _ in sub.snapshot() if t.endswith("/status")]
    assert statuses[-1]["state"] == "offline"  # type: ignore[index]


def visita(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VISITA, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "visita run: no source chosen: pass --sim (the built-in store simulator) or --ble"),
        (["run", "--sim", "--mqtt", "http://broker"], "--mqtt: 'http://broker': must be mqtt://HOST[:PORT]"),
        (["run", "--sim", "--dashboard", "localhost"], "--dashboard: 'localhost': must be HOST:PORT"),
        (["run", "--sim", "--until", "soon"], "'soon' is not a duration; use e.g. 90s, 10m, 1h30m or 2h"),
        (["run", "--sim", "--speed", "0"], "--speed: '0': must be more than 0"),
        (["run", "--ble", "--speed", "5"], "--speed 5: a radio is heard in real time"),
        (["run", "--sim", "--config", "/nonexistent/visita.toml"], "/nonexistent/visita.toml: no such file"),
    ],
)
def test_bad_input_is_refused_with_exit_2_and_a_clear_line(args: list[str], message: str) -> None:
    proc = visita(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_busy_dashboard_port_is_a_clear_startup_failure(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = visita("run", "--sim", "--mqtt", "off", "--dashboard", f"127.0.0.1:{port}", "--data-dir", str(tmp_path))
    assert proc.returncode == 1
    assert f"dashboard cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "--dashboard off" in proc.stderr


def test_a_data_directory_in_use_is_refused(tmp_path: Path) -> None:
    first = subprocess.Popen(
        [*VISITA, "run", "--sim", "--mqtt", "off", "--dashboard", "off", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None
        assert "Visita" in first.stdout.readline()  # the banner: the store is open
        second = visita("run", "--sim", "--mqtt", "off", "--dashboard", "off", "--data-dir", str(tmp_path))
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)
    assert second.returncode == 1
    assert "in use by another Visita process" in second.stderr
    assert first.returncode == 0


def test_debug_logging_never_opens_the_libraries_that_log_addresses() -> None:
    # bleak logs every BlueZ signal (device paths, addresses, advert bytes) at debug level.
    code = (
        "import logging; from gateway.cli import main, THIRD_PARTY_LOGGERS\n"
        "main(['run', '--log-level', 'debug'])\n"
        "print(logging.getLogger('visita.uplink').getEffectiveLevel(),"
        " min(logging.getLogger(n).getEffectiveLevel() for n in THIRD_PARTY_LOGGERS + ('bleak.backends',)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    ours, theirs = map(int, proc.stdout.split())
    assert ours == logging.DEBUG, "--log-level debug is for Visita's own loggers"
    assert theirs >= logging.WARNING


def test_bleak_logging_in_the_environment_does_not_reopen_bleaks_debug_log() -> None:
    # BLEAK_LOGGING=1 (bleak's own troubleshooting switch) makes bleak set its logger to DEBUG with a handler of its
    # own when it is imported, which `run --ble` does after the levels above are set: every address would be logged.
    code = (
        "import logging, os; os.environ['BLEAK_LOGGING'] = '1'; from gateway.cli import main\n"
        "main(['run'])\n"
        "import bleak\n"
        "log = logging.getLogger('bleak')\n"
        "print(log.getEffectiveLevel(), sum(not isinstance(h, logging.NullHandler) for h in log.handlers))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    level, handlers = map(int, proc.stdout.split())
    assert level >= logging.WARNING and handlers == 0, proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--sim", "--mqtt", "off", "--nodes", "mqtt://alice:S3cretPw@127.0.0.1:1883"],
        ["run", "--sim", "--mqtt", "off", "--nodes", "mqtts://alice:S3cretPw@127.0.0.1:8883"],
        ["survey", "status", "--url", "http://alice:S3cretPw@127.0.0.1:8080"],
        ["points", "explain", "m-1", "--url", "https://alice:S3cretPw@gw.local:x"],
    ],
)
def test_a_password_in_a_url_option_is_never_echoed(args: list[str]) -> None:
    proc = visita(*args)
    assert proc.returncode == 2, proc.stderr
    assert "***@" in proc.stderr
    assert "S3cretPw" not in proc.stdout + proc.stderr


@pytest.mark.broker
def test_keys_import_is_refused_while_the_gateway_runs_so_cmd_members_cannot_lose_the_keys(
    broker: Broker, tmp_path: Path
) -> None:
    import json
    import secrets

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from gateway.members import KeyVault

    config, data = tmp_path / "visita.toml", tmp_path / "data"
    config.write_text('store = "lossdemo"\n[dashboard]\nlisten = "off"\n')
    prefix = "visita/v1/lossdemo/gw-1/"
    replies = Subscriber(broker, prefix + "cmd_result/+", client_id="keys-replies")
    imported = json.dumps({"member": "m-imported", "key": secrets.token_hex(32)}) + "\n"
    gw = subprocess.Popen(
        # --clock-wait 0: this machine's clock may not be synchronised, and nothing here needs it to be
        [
            *VISITA,
            "run",
            "--nodes",
            "--config",
            str(config),
            "--mqtt",
            broker.url,
            "--data-dir",
            str(data),
            "--clock-wait",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    backend = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="keys-backend")
    try:
        assert gw.stdout is not None
        assert "Visita" in gw.stdout.readline()  # the banner: the data directory is the gateway's
        refused = subprocess.run(
            [*VISITA, "keys", "import", "-", "--data-dir", str(data)],
            input=imported,
            capture_output=True,
            text=True,
            timeout=60,
        )
        backend.connect("127.0.0.1", broker.port)
        backend.loop_start()
        add = {"op": "add", "version": 1, "members": [{"member": "m-backend", "key": secrets.token_hex(32)}]}
        backend.publish(prefix + "cmd/members", json.dumps(add), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not replies.snapshot():
            time.sleep(0.05)
    finally:
        backend.loop_stop()
        backend.disconnect()
        replies.close()
        gw.send_signal(signal.SIGTERM)
        _, err = gw.communicate(timeout=30)
    assert refused.returncode == 1, refused.stderr
    assert "held by a running gateway" in refused.stderr and "cmd/members" in refused.stderr
    assert "Traceback" not in refused.stderr
    ((topic, answer, _),) = replies.snapshot()
    assert topic == prefix + "cmd_result/members" and answer["ok"] is True, answer
    assert gw.returncode == 0, err
    # Stopped, the gateway no longer holds the directory: the import is applied on top of the backend's set.
    done = subprocess.run(
        [*VISITA, "keys", "import", "-", "--data-dir", str(data), "--json"],
        input=imported,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    vault = KeyVault(data).load()
    assert sorted(m.member for m in vault.members) == ["m-backend", "m-imported"] and vault.version == 2
