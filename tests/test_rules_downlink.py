"""Rules the backend sends (downlink cmd/rules) are kept in the data directory and are in force after a restart,
until the backend sends others or asks for the rules file again; a refused command changes nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.scenario import load_scenario, scenario_plan
from firmware_sim.world import World
from gateway.config import ConfigError, Settings
from gateway.downlink import CommandRefused, _rules
from gateway.identity import MemberDirectory
from gateway.model import Visit
from gateway.points import BACKEND_RULES_FILE, load_rules, rules_in_force
from gateway.runtime import Gateway
from gateway.store import Store
from sensors.sim import SimSource

BACKEND: dict[str, Any] = {
    "rules": [
        {"id": "double-visit", "kind": "visit", "points": 20, "per_day": 1},
        {"id": "long-stay", "kind": "zone_bonus", "zone": "entrance", "min_dwell_s": 900, "points": 15},
    ]
}


VISIT = Visit("v1", "member:m-1", 1_780_000_000.0, 1_780_000_600.0, (), "visitor", "ble")


def rule_ids(gw: Gateway) -> list[str]:
    """The rules the gateway's points engine applies (each explains itself for any visit)."""
    return [e.rule for e in gw.points.explain(VISIT)]


def gateway(data_dir: Path, rules_file: Path | None) -> Gateway:
    scenario = load_scenario("default")
    settings = Settings().model_copy(update={"plan": scenario_plan(scenario)})
    settings = settings.model_copy(
        update={"points": settings.points.model_copy(update={"rules": str(rules_file) if rules_file else None})}
    )
    store = Store(data_dir)
    rules, source = rules_in_force(rules_file, data_dir)  # as `visita run` starts
    gw = Gateway(settings, store, SimSource(World(scenario, 1, 1_780_000_000.0)), MemberDirectory(), rules, [])
    gw.rules_source = source
    return gw


def test_backend_rules_survive_a_restart_until_the_backend_asks_for_the_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    file_rules = [r.id for r in load_rules(None).rules]
    gw = gateway(data, None)
    assert rule_ids(gw) == file_rules and gw.rules_source == "built-in rules"

    answer = _rules(gw, {"id": "r1", **BACKEND})
    assert answer == {"rules": ["double-visit", "long-stay"], "source": "backend"}
    assert rule_ids(gw) == ["double-visit", "long-stay"]
    assert "sent by the backend" in gw.rules_source and str(data / BACKEND_RULES_FILE) in gw.rules_source
    gw.store.close()

    gw = gateway(data, None)  # a restart (or a power cut: the file was written atomically, then applied)
    assert rule_ids(gw) == ["double-visit", "long-stay"], "the backend's rules were lost by a restart"
    assert "sent by the backend" in gw.rules_source
    assert gw.diagnostics()["points"]["rules_source"] == gw.rules_source

    answer = _rules(gw, {"id": "r2", "from_file": True})
    assert answer == {"rules": file_rules, "source": "file"}
    assert rule_ids(gw) == file_rules and gw.rules_source == "built-in rules"
    assert not (data / BACKEND_RULES_FILE).exists()
    gw.store.close()
    gw = gateway(data, None)
    assert rule_ids(gw) == file_rules
    gw.store.close()


def test_a_refused_rules_command_changes_nothing_in_memory_or_on_disk(tmp_path: Path) -> None:
    data = tmp_path / "data"
    gw = gateway(data, None)
    _rules(gw, BACKEND)
    kept = (data / BACKEND_RULES_FILE).read_bytes()
    refused: list[tuple[dict[str, Any], str]] = [
        ({"rules": [{"id": "x", "kind": "visit"}]}, "points"),
        ({"rules": [], "id": "r3"}, "rules"),
        ({"from_file": "yes"}, '"from_file" must be true or false'),
        ({"from_file": True, **BACKEND}, '"from_file" goes alone; drop rules'),
    ]
    for payload, says in refused:
        with pytest.raises(CommandRefused, match=says):
            _rules(gw, payload)
        assert rule_ids(gw) == ["double-visit", "long-stay"]
        assert (data / BACKEND_RULES_FILE).read_bytes() == kept
    gw.store.close()


def test_a_damaged_copy_of_the_backend_rules_is_named_with_the_way_out(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = data / BACKEND_RULES_FILE
    for content, says in [
        ("{not json", "not the rules the backend sent"),
        (json.dumps({"received_at": 0, "ruleset": []}), "its ruleset is not an object"),
        (
            json.dumps({"received_at": 0, "ruleset": {"rules": [{"id": "x", "kind": "visit"}]}}),
            r"rules\[0\] \(id 'x'\)",
        ),
    ]:
        path.write_text(content)
        with pytest.raises(ConfigError) as e:
            rules_in_force(None, data)
        problem = "; ".join(e.value.problems)
        assert str(path) in problem and re.search(says, problem), problem
        assert "delete it to apply the config's rules file" in problem
