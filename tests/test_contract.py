"""The contract: docs/asyncapi.yaml and docs/schemas/ against what a running gateway really publishes.

One `visita run --sim` against a real Mosquitto, with `health` every second and downlink
commands sent while it runs: every payload received (events, status, health, cmd_result)
must validate against its JSON Schema, and the AsyncAPI document must name a channel and a
schema for every event type.
"""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
import pytest
import yaml
from conftest import VISITA, Broker, Subscriber
from paho.mqtt.enums import CallbackAPIVersion

from gateway.downlink import HANDLERS, UNKNOWN
from gateway.model import EVENT_TYPES
from gateway.points import rules_in_force

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "docs" / "schemas"
PREFIX = "visita/v1/demo-store/gw-1/"


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_asyncapi_names_a_channel_and_a_schema_for_every_event_type() -> None:
    doc = yaml.safe_load((REPO / "docs" / "asyncapi.yaml").read_text())
    assert doc["asyncapi"].startswith("3.")
    addresses = {}
    for channel in doc["channels"].values():
        for message in channel["messages"].values():
            ref = message["payload"].get("$ref")
            if ref:
                addresses[channel["address"]] = ref
    for t in EVENT_TYPES:
        ref = addresses.get(f"visita/v1/{{store}}/{{gateway}}/{t}")
        assert ref == f"./schemas/{t}.schema.json", t
        _validator(t)  # a valid draft 2020-12 schema
    assert addresses["visita/v1/{store}/{gateway}/cmd_result/{name}"] == "./schemas/cmd_result.schema.json"
    for op in doc["operations"].values():
        assert op["channel"]["$ref"].removeprefix("#/channels/") in doc["channels"]
    # The commands served, and where answers go: an unknown command's on cmd_result/unknown, a channel listed too.
    assert doc["channels"]["command"]["parameters"]["name"]["enum"] == list(HANDLERS)
    assert doc["channels"]["commandResult"]["parameters"]["name"]["enum"] == [*HANDLERS, UNKNOWN]


def _rules_json() -> dict[str, Any]:
    return tomllib.loads((REPO / "gateway" / "defaults" / "rules.toml").read_text())


@pytest.mark.broker
def test_every_published_payload_validates_and_commands_are_applied_or_refused(broker: Broker, tmp_path: Path) -> None:
    config = tmp_path / "visita.toml"
    config.write_text("[mqtt]\nhealth_interval_s = 1.0\n")
    sub = Subscriber(broker, PREFIX + "+", client_id="contract-subscriber")  # events, not cmd/ (not all JSON)
    replies = Subscriber(broker, PREFIX + "cmd_result/+", client_id="contract-replies")
    args = [
        *VISITA, "run", "--sim", "--config", str(config), "--speed", "60", "--until", "8m",
        "--mqtt", broker.url, "--dashboard", "off", "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    backend = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="contract-backend")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(t == PREFIX + "status" for t, _, _ in sub.snapshot()):
            time.sleep(0.05)
        backend.connect("127.0.0.1", broker.port)
        backend.loop_start()
        commands: list[tuple[str, bytes]] = [
            ("config", json.dumps({"id": "c1", "set": {"mqtt.max_rate": 500}}).encode()),
            ("config", json.dumps({"id": "c2", "set": {"mqtt.url": "mqtt://elsewhere"}}).encode()),
            ("config", json.dumps({"id": "c3", "set": {"mqtt.max_rate": 0}}).encode()),
            ("config", json.dumps({"id": "c8", "set": {"mqtt.health_interval_s": 5}, "extra": 1}).encode()),
            ("rules", json.dumps({"id": "r1", **_rules_json()}).encode()),
            ("rules", json.dumps({"id": "r2", "rules": [{"id": "x", "kind": "visit"}]}).encode()),
            ("nope", json.dumps({"id": "n1"}).encode()),
            ("nope", b"{}"),
            ("config", b"not json"),
        ]
        for name, payload in commands:
            backend.publish(PREFIX + "cmd/" + name, payload, qos=1).wait_for_publish(5)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        backend.loop_stop()
        backend.disconnect()
    assert proc.returncode == 0, err
    time.sleep(0.5)
    sub.close()
    replies.close()

    results = {}
    anonymous = []  # replies to commands that had no readable id
    seen: dict[str, int] = {}
    for topic, payload, _ in sub.snapshot() + replies.snapshot():
        if topic.startswith(PREFIX + "cmd_result/"):
            _validator("cmd_result").validate(payload)
            served = payload["name"] if payload["name"] in HANDLERS else UNKNOWN
            assert topic == PREFIX + "cmd_result/" + served, (topic, payload)  # only on the channels asyncapi lists
            if payload["id"] is None:
                anonymous.append(payload)
            results[str(payload["id"])] = payload
            seen["cmd_result"] = seen.get("cmd_result", 0) + 1
            continue
        event_type = topic.removeprefix(PREFIX)
        assert event_type in EVENT_TYPES, topic
        errors = sorted(_validator(event_type).iter_errors(payload), key=str)
        assert not errors, f"{topic}: {errors[0].message} at {list(errors[0].absolute_path)}\n{payload}"
        seen[event_type] = seen.get(event_type, 0) + 1
        if event_type == "status" and payload["data"]["state"] == "online":
            assert payload["data"]["resolution"] == "zones", payload  # the demo store has six receivers
    for t in ("visit.started", "visit.ended", "zone.changed", "points.awarded", "footfall.minute", "status", "health"):
        assert seen.get(t), f"no {t} was published: {seen}"

    assert results["c1"]["ok"] is True
    assert results["c2"]["ok"] is False and "cannot change mqtt.url live" in results["c2"]["error"]
    assert results["c3"]["ok"] is False and "max_rate" in results["c3"]["error"]
    assert results["c8"]["ok"] is False and "unknown field(s) extra" in results["c8"]["error"]
    assert results["n1"] == {"id": "n1", "name": "nope", "ok": False, "error": results["n1"]["error"]}
    assert results["r1"]["ok"] is True and "visit" in results["r1"]["rules"]
    assert results["r2"]["ok"] is False and "points" in results["r2"]["error"]
    kept, source = rules_in_force(None, tmp_path / "data")  # what the next start applies: r1's, not r2's
    assert [r.id for r in kept.rules] == results["r1"]["rules"] and "sent by the backend" in source
    assert len(anonymous) == 2 and all(p["ok"] is False for p in anonymous)
    assert {str(p["error"]).split(" ")[0] for p in anonymous} == {"unknown", "payload"}
    assert err.count("downlink command") >= 7, err
