"""Support staff's "where are my points?" while the gateway runs: `visita points explain` finds the data directory
held by the running gateway and asks it (real process, real HTTP, the support token, which opens nothing of the
installer's); the gateway's answer agrees with the points it published, and with what the same command reads from
the data directory once it has stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import VISITA, Broker, Subscriber, free_port

SUPPORT = "support-token-for-tests-0123456789"
INSTALLER = "installer-token-for-tests-0123456789"


def _get(url: str, token: str) -> int:
    req = urllib.request.Request(url)
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


def _explain(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*VISITA, "points", "explain", *args, "--data-dir", str(data), "--json"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _points_of(answer: dict[str, object], visit_id: str) -> dict[str, int]:
    (rec,) = [v for v in answer["visits"] if v["visit_id"] == visit_id]  # type: ignore[attr-defined]
    return {r["rule"]: r["points"] for r in rec["rules"] if r["points"]}


@pytest.mark.broker
def test_points_explain_asks_the_running_gateway_and_agrees_with_the_data_directory_after(
    broker: Broker, tmp_path: Path
) -> None:
    support, installer = tmp_path / "support-token", tmp_path / "installer-token"
    support.write_text(SUPPORT + "\n")
    installer.write_text(INSTALLER + "\n")
    support.chmod(0o600)
    installer.chmod(0o600)
    data, port = tmp_path / "data", free_port()
    cfg = tmp_path / "visita.toml"
    cfg.write_text(
        f'[dashboard]\nlisten = "127.0.0.1:{port}"\nsupport_token_file = "{support}"\n'
        f'installer_token_file = "{installer}"\n'
    )
    sub = Subscriber(broker, "visita/v1/+/+/+", client_id="support-test")
    args = [*VISITA, "run", "--sim", "--speed", "30", "--until", "3h", "--mqtt", broker.url, "--config", str(cfg)]
    args += ["--data-dir", str(data)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = ["--url", f"http://127.0.0.1:{port}"]
    try:
        # A member's visit that earned the visit rule and has ended (so nothing about it changes any more).
        deadline = time.monotonic() + 180
        award = None
        while award is None:
            assert proc.poll() is None, f"gateway exited: {proc.communicate()[0]}"
            assert time.monotonic() < deadline, "no ended visit with a points.awarded event within 180 s"
            events: list[tuple[str, Any]] = [(t.rsplit("/", 1)[1], p["data"]) for t, p, _ in sub.messages]
            ended = {d["visit_id"] for kind, d in events if kind == "visit.ended"}
            paid = [d for kind, d in events if kind == "points.awarded" and d["rule"] == "visit"]
            award = next((d for d in paid if d["visit_id"] in ended), None)
            time.sleep(0.5)
        member, visit_id = str(award["member"]), str(award["visit_id"])

        # The directory is the gateway's: the command asks it, at the address and with the token of the config.
        r = _explain(data, member, "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert f"the gateway holds {data}; asking the running gateway" in r.stderr, r.stderr
        live = json.loads(r.stdout)
        assert live["member"] == member and live["rules_source"] == "built-in rules"
        (rec,) = [v for v in live["visits"] if v["visit_id"] == visit_id]
        assert rec["open"] is False
        assert _points_of(live, visit_id)["visit"] == award["points"]
        assert all(rule["why"] for v in live["visits"] for rule in v["rules"])
        only = json.loads(_explain(data, member, "--visit", visit_id, "--config", str(cfg), *url).stdout)
        assert [v["visit_id"] for v in only["visits"]] == [visit_id]

        # Each token opens its own endpoints only.
        base = f"http://127.0.0.1:{port}/api/v1"
        assert _get(f"{base}/members/{member}/points", SUPPORT) == 200
        assert _get(f"{base}/members/{member}/points", INSTALLER) == 401
        assert _get(f"{base}/survey", SUPPORT) == 401 and _get(f"{base}/survey", INSTALLER) != 401
        # Refusals say what is wrong: no token, a wrong one, a ref that is none.
        r = _explain(data, member, *url)
        assert r.returncode == 2 and "no support token" in r.stderr, r.stderr
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token-at-all\n")
        wrong.chmod(0o600)
        r = _explain(data, member, *url, "--token-file", str(wrong))
        assert r.returncode == 1 and "401" in r.stderr and "wrong support token" in r.stderr, r.stderr
        assert _get(f"{base}/members/a%20b/points", SUPPORT) == 422
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        sub.close()
    assert proc.returncode == 0, out

    # Stopped: the same command reads the data directory, and tells the same story of that visit.
    r = _explain(data, member, "--visit", visit_id, "--config", str(cfg))
    assert r.returncode == 0 and "asking the running gateway" not in r.stderr, r.stderr
    assert _points_of(json.loads(r.stdout), visit_id) == _points_of(live, visit_id)
    # --url asks the gateway whatever the directory, and says so when none answers.
    r = _explain(data, member, "--config", str(cfg), *url)
    assert r.returncode == 1 and f"--url {url[1]}; asking the running gateway" in r.stderr
    assert "no gateway answers" in r.stderr, r.stderr
