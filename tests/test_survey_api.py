"""The installer's site survey end to end: `visita run --sim` (real process, real HTTP), `visita survey` (the CLI
talking to it with the installer token), the map saved in the data directory and used again after a restart."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import VISITA, free_port

from firmware_sim.scenario import beacon_subject_id, load_scenario

TOKEN = "installer-token-for-tests-0123456789"


def _config(tmp_path: Path) -> tuple[Path, Path]:
    token = tmp_path / "installer-token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    tag = beacon_subject_id(load_scenario("default").beacons[0])  # the entrance iBeacon, at (14, 4)
    cfg = tmp_path / "visita.toml"
    cfg.write_text(f'[dashboard]\ninstaller_token_file = "{token}"\n\n[survey]\ntransmitter = "{tag}"\n')
    return cfg, token


def _start(cfg: Path, data: Path, port: int) -> subprocess.Popen[str]:
    args = [*VISITA, "run", "--sim", "--speed", "10", "--until", "2h", "--mqtt", "off"]
    args += ["--dashboard", f"127.0.0.1:{port}", "--data-dir", str(data), "--config", str(cfg)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None, f"gateway exited: {proc.communicate()[0]}"
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"gateway did not answer on port {port}: {proc.communicate()[0]}")


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return out


def _survey(port: int, token: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*VISITA, "survey", *args, "--url", f"http://127.0.0.1:{port}", "--token-file", str(token)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _status(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=5) as r:
        out: dict[str, object] = json.loads(r.read())
    return out


def test_installer_records_spots_applies_the_map_and_it_survives_a_restart(tmp_path: Path) -> None:
    cfg, token = _config(tmp_path)
    data = tmp_path / "data"
    port = free_port()
    proc = _start(cfg, data, port)
    try:
        # No token, or a wrong one: refused with a message saying what to send.
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/survey", timeout=5)
            raise AssertionError("the survey endpoint answered without the installer token")
        except urllib.error.HTTPError as e:
            assert e.code == 401 and "Authorization: Bearer" in json.loads(e.read())["message"]
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-installer-token-at-all\n")
        wrong.chmod(0o600)
        r = _survey(port, wrong, "status")
        assert r.returncode == 1 and "401" in r.stderr

        r = _survey(port, token, "status")
        assert r.returncode == 0, r.stderr
        assert "0 spot(s) recorded" in r.stdout and "in use: no survey map" in r.stdout

        # A spot outside the store is refused, naming the inside zones.
        r = _survey(port, token, "spot", "-50", "-50", "--seconds", "5")
        assert r.returncode == 1 and "422" in r.stderr and "lies in no inside zone" in r.stderr

        # Two spots with the tag: the CLI waits for each and shows what every receiver heard.
        for x, y in (("14", "4"), ("18", "8")):
            r = _survey(port, token, "spot", x, y, "--seconds", "5", "--json")
            assert r.returncode == 0, r.stderr
            final = json.loads(r.stdout)
            assert final["running"] is None
        spots = final["spots"]
        assert [(s["x"], s["y"]) for s in spots] == [(14.0, 4.0), (18.0, 8.0)]
        assert all(sum(s["packets"].values()) > 5 for s in spots), spots

        r = _survey(port, token, "apply")
        assert r.returncode == 0, r.stderr
        assert "survey map of 2 spot(s)" in r.stdout
        saved = json.loads((data / "survey.json").read_text())
        assert saved["format"] == "visita-survey" and len(saved["spots"]) == 2
        assert TOKEN not in (data / "survey.json").read_text()
        status = _status(port)
        assert status["survey"] == {"file": str(data / "survey.json"), "in_use": True, "problem": None, "tag": True}
        estimator = status["estimator"]
        assert isinstance(estimator, dict) and estimator["survey"]["spots"] == 2
    finally:
        _stop(proc)

    # After a restart the map is used again, and its spots are the survey to add to.
    proc = _start(cfg, data, port)
    try:
        r = _survey(port, token, "status")
        assert r.returncode == 0, r.stderr
        assert "2 spot(s) recorded" in r.stdout and "(2 spots)" in r.stdout
        r = _survey(port, token, "discard", "1", "--json")
        assert r.returncode == 0 and len(json.loads(r.stdout)["spots"]) == 1
        r = _survey(port, token, "discard", "5")
        assert r.returncode == 1 and "404" in r.stderr
        # A malformed request gets a line that says what was wrong and where.
        for body, says in (
            (b"garbage", "the request body is not valid JSON ("),
            (b'{"x": 5}', "y: required, and missing from the request"),
            (b'{"x": "five", "y": 1}', 'x = "five": '),
        ):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/survey/spots", data=body, method="POST")
            req.add_header("Authorization", f"Bearer {TOKEN}")
            req.add_header("Content-Type", "application/json")
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=5)
            assert e.value.code == 422
            message = json.loads(e.value.read())["message"]
            assert message.startswith(says), message
        # One spot at a time, and nothing is applied while one records.
        r = _survey(port, token, "spot", "14", "4", "--seconds", "60", "--no-wait")
        assert r.returncode == 0 and "recording at (14, 4)" in r.stdout, r.stderr
        r = _survey(port, token, "spot", "18", "8")
        assert r.returncode == 1 and "409" in r.stderr and "still recording" in r.stderr
        r = _survey(port, token, "apply")
        assert r.returncode == 1 and "409" in r.stderr and "still recording" in r.stderr
    finally:
        _stop(proc)


def test_installer_endpoints_are_off_without_a_token(tmp_path: Path) -> None:
    port = free_port()
    proc = _start(_plain_config(tmp_path), tmp_path / "data", port)
    try:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/survey", headers={"Authorization": "Bearer x"})
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("the survey endpoint answered with no installer token configured")
        except urllib.error.HTTPError as e:
            assert e.code == 403 and "installer_token_file" in json.loads(e.read())["message"]
    finally:
        _stop(proc)


def _plain_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "plain.toml"
    cfg.write_text('[dashboard]\ninstaller_token_file = ""\n')
    return cfg
