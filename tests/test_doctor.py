"""`visita doctor`: the checks on hand-made statuses, and the command against a running gateway."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import VISITA, free_port
from test_survey_api import _start, _stop

from gateway.doctor import BATTERY_LOW_MV, checks

NOW = 1_790_000_000.0


def status(**over: Any) -> dict[str, Any]:
    """A healthy gateway on two Bluetooth adapters, as /api/v1/status gives it; `over` replaces sections."""
    base: dict[str, Any] = {
        "source": {
            "source": "ble",
            "bus_connected": True,
            "problem": None,
            "adapters": {
                name: {"receiver": rx, "state": "scanning", "adverts_per_s": 40.5, "last_advert_age_s": 0.2}
                for name, rx in (("hci0", "rx-entrance"), ("hci1", "rx-checkout"))
            },
        },
        "uplink": {"broker": "mqtts://broker:8883", "connected": True, "last_error": ""},
        "store": {"outbox_depth": 3, "disk_full": False, "last_error": "", "outbox_dropped": {}, "recent_visits": 10},
        "identity": {"members_known": 1200, "beacon_battery_mv": {"beacon:a:1:1": 2950}},
        "estimator": {"estimator": "hmm", "resolution": "zones"},
        "survey": {"problem": None},
        "dashboard": {"https": True, "certificate_until": "2027-06-01T00:00:00+00:00"},
        "clock": {"live": True, "synchronised": True, "steps": 0},
    }
    return {**base, **over}


def found(s: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"ok": [], "warning": [], "problem": []}
    for c in checks(s, NOW):
        out[c.status].append(f"{c.what}: {c.detail}")
    return out


def test_a_healthy_gateway_has_no_warning_and_no_problem() -> None:
    f = found(status())
    assert f["warning"] == [] and f["problem"] == [], f
    assert any(line.startswith("adapter hci0 (receiver rx-entrance): scanning") for line in f["ok"])


def test_each_fault_is_named_with_what_to_do() -> None:
    s = status()
    s["source"]["adapters"]["hci1"]["last_advert_age_s"] = 300.0
    s["source"]["adapters"]["hci0"] = {"receiver": "rx-entrance", "state": "off", "problem": None}
    s["source"]["adapters"]["hci2"] = {"receiver": "rx-bakery", "state": "absent", "problem": "absent"}
    s["source"]["events"] = [
        {"adapter": "hci2", "event": "absent", "message": "adapter hci2 not found (bluetoothd has: hci0, hci1): is the "
         "dongle plugged in (`btmgmt info`)? waiting for it"},
    ]  # fmt: skip
    s["uplink"] = {"broker": "mqtts://broker:8883", "connected": False, "last_error": "refused: not authorised"}
    s["store"] = {**s["store"], "disk_full": True, "last_error": "cannot write /var/lib/visita: No space left"}
    s["identity"]["beacon_battery_mv"]["beacon:b:1:2"] = BATTERY_LOW_MV - 200
    s["dashboard"]["certificate_until"] = "2026-09-01T00:00:00+00:00"  # before NOW
    s["clock"] = {"live": True, "synchronised": False, "steps": 2}
    f = found(s)
    assert f["problem"] == [
        "adapter hci0 (receiver rx-entrance): is off, not scanning: systemctl restart visita, then check "
        "`bluetoothctl list` and dmesg for the adapter (docs/ble.md)",
        "adapter hci2 (receiver rx-bakery): adapter hci2 not found (bluetoothd has: hci0, hci1): is the dongle "
        "plugged in (`btmgmt info`)? waiting for it (docs/ble.md)",
        "MQTT: not connected to mqtts://broker:8883 (refused: not authorised); 3 event(s) wait in the outbox and are "
        "sent once it is back: check the broker, the network and the credentials (docs/install.md)",
        "storage: the disk is full (cannot write /var/lib/visita: No space left): new events are held in memory only "
        "and a power cut loses them; free space on the SD card",
        "HTTPS: the dashboard's certificate ended on 2026-09-01T00:00:00+00:00: browsers and `visita survey` refuse "
        "it; renew dashboard.tls_cert_file and restart (docs/install.md)",
    ], f["problem"]
    heads = [w.split(":")[0] for w in f["warning"]]
    assert heads == ["adapter hci1 (receiver rx-checkout)", "clock", "clock", "beacon"], f["warning"]
    assert "has heard nothing for 300 s" in f["warning"][0]
    assert "not synchronised (NTP)" in f["warning"][1] and "stepped forward 2 time(s)" in f["warning"][2]
    assert f"battery at {BATTERY_LOW_MV - 200} mV" in f["warning"][3]


def test_remote_receivers_members_and_a_plan_without_geometry() -> None:
    nodes = {
        "connected": True,
        "malformed": 0,
        "nodes": {
            "espresense:bakery": {"last_seen_age_s": 2.0, "receivers": ["rx-bakery"]},
            "espresense:drinks": {"last_seen_age_s": 900.0, "receivers": ["rx-drinks"]},
            "gateway:gw-2": {"last_seen_age_s": 1.0, "receivers": [], "clock_clamped": True,
                             "clock_offset_measured_s": 95.0},
        },
    }  # fmt: skip
    f = found(
        status(
            nodes=nodes,
            identity={"members_known": 0},
            estimator={"estimator": "strongest-receiver", "resolution": "receiver-zones"},
        )
    )
    assert f["problem"] == []
    heads = [w.split(":")[0] for w in f["warning"]]
    assert heads == ["espresense", "gateway", "members", "zones"], f["warning"]
    assert "silent for 900 s" in f["warning"][0] and "95.0 s off ours" in f["warning"][1]
    assert "no member keys" in f["warning"][2] and "strongest receiver only" in f["warning"][3]


def test_a_node_whose_room_is_no_plan_receiver_is_a_warning() -> None:
    """An ESPresense node named `Kitchen` in a plan without such a receiver is heard, and all it hears is thrown
    away: the installer is told which receiver and how to map it, not `ok`."""
    nodes = {"connected": True, "nodes": {"espresense:Kitchen": {"last_seen_age_s": 1.0, "receivers": ["kitchen"]}}}
    est = {
        "estimator": "hmm",
        "resolution": "zones",
        "unknown_receiver_sightings": 42,
        "unknown_receivers": ["kitchen"],
    }
    f = found(status(nodes=nodes, estimator=est))
    assert f["warning"] == [
        "receivers: 42 sighting(s) from kitchen, not in the plan, were not used: map an ESPresense node's room to its "
        "plan receiver with --room ROOM=RECEIVER, or name the room after it (docs/nodes.md)"
    ], f["warning"]


def test_the_command_checks_a_running_gateway_and_says_when_none_answers(tmp_path: Path) -> None:
    cfg = tmp_path / "visita.toml"
    cfg.write_text("")
    port = free_port()
    proc = _start(cfg, tmp_path / "data", port)
    try:
        r = subprocess.run([*VISITA, "doctor", "--url", f"http://127.0.0.1:{port}", "--json"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["gateway"] == "gw-1" and out["problems"] == 0
        assert {k: v for k, v in out["checks"][1].items() if k != "detail"} == {"status": "warning", "what": "MQTT"}
        r = subprocess.run([*VISITA, "doctor", "--url", f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert r.returncode == 0 and "  ok       source: the simulator (scenario default)" in r.stdout, r.stdout
    finally:
        _stop(proc)
    r = subprocess.run([*VISITA, "doctor", "--url", f"http://127.0.0.1:{port}"], capture_output=True, text=True)
    assert r.returncode == 1 and f"no gateway answers at http://127.0.0.1:{port}" in r.stderr, r.stderr


def test_a_clock_the_gateway_cannot_ask_about_is_not_said_to_be_synchronised() -> None:
    # Under the shipped unit (ProtectClock=, SystemCallFilter=~@privileged) adjtimex is refused: synchronised is None.
    f = found(status(clock={"live": True, "synchronised": None, "steps": 0}))
    (clock,) = [line for line in f["ok"] if line.startswith("clock")]
    assert clock != "clock: synchronised" and "cannot tell" in clock, clock


def test_a_disk_full_that_is_over_is_no_warning(tmp_path: Path) -> None:
    import errno

    from gateway.model import Event
    from gateway.store import Store

    with Store(tmp_path / "data") as store:
        store.put_events([Event("visit.ended", "evt-1", 1_700_000_000.0, "store-1", "gw-1", 1, {})])
        real = store._disk.write_payload

        def full(payload: bytes) -> float:
            raise OSError(errno.ENOSPC, "No space left on device")

        store._disk.write_payload = full  # type: ignore[method-assign]
        assert store.commit() is False
        store._disk.write_payload = real  # type: ignore[method-assign]
        assert store.commit(force=True)
        f = found(status(store=store.diagnostics()))
    assert f["warning"] == [] and f["problem"] == [], f
    (line,) = [x for x in f["ok"] if x.startswith("storage")]
    assert "earlier: cannot write" in line and "written since" in line, line


def test_events_held_back_by_a_full_disk_are_not_blamed_on_the_broker() -> None:
    # A full disk holds new events in memory, unpublished: thousands wait while the broker is fine.
    full = {"outbox_depth": 1330, "disk_full": True, "last_error": "cannot write /var/lib/visita: No space left"}
    f = found(status(store={**status()["store"], **full}))
    assert [line for line in f["problem"] if line.startswith("storage: the disk is full")], f
    assert not [line for line in f["warning"] + f["problem"] if line.startswith("MQTT")], f
    (mqtt,) = [line for line in f["ok"] if line.startswith("MQTT")]
    assert "1330 event(s) wait to be written first (disk full" in mqtt, mqtt
    few = found(status(store={**status()["store"], **full, "outbox_depth": 40}))
    assert [line for line in few["ok"] if line.startswith("MQTT") and "40 event(s) wait to be written first" in line]
