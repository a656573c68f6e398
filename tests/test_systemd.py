"""The systemd unit is valid and hardened, and the gateway speaks systemd's notify protocol."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import VISITA

UNIT = Path(__file__).parent.parent / "systemd" / "visita.service"


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: install Debian's systemd package (scripts/test.sh does)")
    return found


def local_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's visita (verify checks that the binary exists)."""
    visita = Path(os.environ.get("VIRTUAL_ENV", Path(__file__).parent.parent / ".venv")) / "bin" / "visita"
    assert visita.exists(), f"{visita} is missing: run scripts/setup.sh"
    unit = tmp_path / "visita.service"
    unit.write_text(UNIT.read_text().replace("/opt/visita/.venv/bin/visita", str(visita)))
    return unit


def test_unit_file_verifies(tmp_path: Path) -> None:
    proc = subprocess.run(
        [systemd_analyze(), "verify", str(local_unit(tmp_path))], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "visita.service" not in proc.stderr, proc.stderr  # no warnings about our unit either


def test_unit_is_hardened(tmp_path: Path) -> None:
    proc = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", str(local_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for visita\.service: (\d+\.\d)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0, f"exposure {m.group(1)} (a bare unit scores 9.6)"


def test_gateway_tells_systemd_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    messages: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.2)
        env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        args = ["run", "--sim", "--speed", "60", "--until", "3m", "--mqtt", "off", "--dashboard", "off"]
        proc = subprocess.Popen(
            [*VISITA, *args, "--data-dir", str(tmp_path / "data")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while True:  # read while it runs (a datagram queue holds only a few), then drain
                try:
                    messages.append(sock.recv(4096).decode())
                except TimeoutError:
                    if proc.poll() is not None:
                        break
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert messages, "nothing was sent to NOTIFY_SOCKET"
    assert messages[0].startswith("READY=1\nSTATUS=running"), messages[0]
    pings = [m for m in messages if m.startswith("WATCHDOG=1")]
    assert len(pings) >= 5, f"3 s of running with a 0.2 s watchdog pinged only {len(pings)} times"
    assert messages[-1].startswith("STOPPING=1"), messages[-1]
