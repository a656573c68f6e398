"""Rules the backend sends (downlink cmd/rules) are kept in the data directory and are in force after a restart,
until the backend sends others or asks for the rules file again; a refused command changes nothing; a damaged kept
copy neither crashes nor keeps a gateway down."""

from __future__ import annotations

import asyncio
import errno
import json
import math
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import VISITA
from test_checkins import NOW, Clock, body, gateway

from firmware_sim.scenario import load_scenario, scenario_plan
from firmware_sim.world import World
from gateway import points as points_module
from gateway.config import ConfigError, Settings
from gateway.downlink import CommandRefused, _rules
from gateway.identity import MemberDirectory
from gateway.model import Visit
from gateway.points import BACKEND_RULES_FILE, BackendRulesDamaged, load_rules, rules_in_force, save_backend_rules
from gateway.runtime import CommitWriter, Gateway
from gateway.store import Store
from sensors.sim import SimSource

BACKEND: dict[str, Any] = {
    "rules": [
        {"id": "double-visit", "kind": "visit", "points": 20, "per_day": 1},
        {"id": "long-stay", "kind": "zone_bonus", "zone": "entrance", "min_dwell_s": 900, "points": 15},
    ]
}
FILE_RULES = '[[rules]]\nid = "from-the-file"\nkind = "visit"\npoints = 3\n'
VISIT = Visit("v1", "member:m-1", 1_780_000_000.0, 1_780_000_600.0, (), "visitor", "ble")


def rule_ids(gw: Gateway) -> list[str]:
    """The rules the gateway's points engine applies (each explains itself for any visit)."""
    return [e.rule for e in gw.points.explain(VISIT)]


def start_gateway(data_dir: Path, rules_file: Path | None) -> Gateway:
    scenario = load_scenario("default")
    settings = Settings().model_copy(update={"plan": scenario_plan(scenario)})
    settings = settings.model_copy(
        update={"points": settings.points.model_copy(update={"rules": str(rules_file) if rules_file else ""})}
    )
    store = Store(data_dir)
    rules, source = rules_in_force(rules_file, data_dir)  # as `visita run` starts
    gw = Gateway(settings, store, SimSource(World(scenario, 1, 1_780_000_000.0)), MemberDirectory(), rules, [])
    gw.rules_source = source
    return gw


@pytest.mark.parametrize("configured", [False, True], ids=["built-in rules", "a rules file"])
def test_backend_rules_survive_a_restart_until_the_backend_asks_for_the_file(tmp_path: Path, configured: bool) -> None:
    data = tmp_path / "data"
    rules_file = tmp_path / "rules.toml" if configured else None
    if rules_file is not None:
        rules_file.write_text(FILE_RULES)
    file_rules = [r.id for r in load_rules(rules_file).rules]
    file_source = str(rules_file) if rules_file else "built-in rules"
    gw = start_gateway(data, rules_file)
    assert rule_ids(gw) == file_rules and gw.rules_source == file_source

    answer = _rules(gw, {"id": "r1", **BACKEND})
    assert answer == {"rules": ["double-visit", "long-stay"], "source": "backend", "synced": True}
    assert rule_ids(gw) == ["double-visit", "long-stay"]
    assert "sent by the backend at" in gw.rules_source and "cmd/rules id 'r1'" in gw.rules_source
    assert str(data / BACKEND_RULES_FILE) in gw.rules_source
    assert (data / BACKEND_RULES_FILE).stat().st_mode & 0o077 == 0
    gw.store.close()

    gw = start_gateway(data, rules_file)  # a restart (or a power cut: the file was written atomically, then applied)
    assert rule_ids(gw) == ["double-visit", "long-stay"], "the backend's rules were lost by a restart"
    assert "cmd/rules id 'r1'" in gw.rules_source, "a restart should say the same as the command did"
    assert gw.diagnostics()["points"]["rules_source"] == gw.rules_source

    answer = _rules(gw, {"id": "r2", "from_file": True})
    assert answer == {"rules": file_rules, "source": "file", "synced": True}
    assert rule_ids(gw) == file_rules and gw.rules_source == file_source
    assert not (data / BACKEND_RULES_FILE).exists()
    gw.store.close()
    gw = start_gateway(data, rules_file)
    assert rule_ids(gw) == file_rules
    gw.store.close()


def test_a_refused_rules_command_changes_nothing_in_memory_or_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    gw = start_gateway(data, None)
    _rules(gw, BACKEND)
    kept, source = (data / BACKEND_RULES_FILE).read_bytes(), gw.rules_source
    refused: list[tuple[dict[str, Any], str]] = [
        ({"rules": [{"id": "x", "kind": "visit"}]}, r"rules\[0\] \(id 'x'\)\.points: required key is missing"),
        ({"rules": [], "id": "r3"}, r"cmd/rules: rules: .*at least 1"),
        ({"from_file": "yes"}, '"from_file" must be true or false'),
        ({"from_file": 1}, '"from_file" must be true or false'),
        ({"from_file": True, **BACKEND}, '"from_file" goes alone; drop rules'),
        (
            {"rules": [{"id": f"r{i}", "kind": "visit", "points": 1} for i in range(101)]},
            r"cmd/rules: rules: List should have at most 100 items",
        ),
        (
            {"rules": [{"id": "promo", "kind": "zone_bonus", "zone": "nowhere", "points": 5}]},
            r"cmd/rules: rules\[0\] \(id 'promo'\)\.zone = 'nowhere': no such zone in the store plan \(zones: ",
        ),
    ]
    for payload, says in refused:
        with pytest.raises(CommandRefused, match=says):
            _rules(gw, payload)
        assert rule_ids(gw) == ["double-visit", "long-stay"] and gw.rules_source == source
        assert (data / BACKEND_RULES_FILE).read_bytes() == kept

    # The disk refuses: the new rules are not applied, and the old ones stay kept.
    def full(path: Path, data: bytes, mode: int = 0o600) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(points_module, "write_atomic", full)
    with pytest.raises(CommandRefused, match=r"cannot keep the rules in .*: No space left on device; nothing changed"):
        _rules(gw, {"rules": [{"id": "other", "kind": "visit", "points": 1}]})
    assert rule_ids(gw) == ["double-visit", "long-stay"] and gw.rules_source == source
    assert (data / BACKEND_RULES_FILE).read_bytes() == kept
    gw.store.close()


def test_rules_written_but_not_synced_are_applied_as_a_restart_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    gw = start_gateway(data, None)
    real = points_module.write_atomic

    def unsynced(path: Path, data: bytes, mode: int = 0o600) -> bool:
        real(path, data, mode)
        return False  # in place, but its directory could not be synced

    monkeypatch.setattr(points_module, "write_atomic", unsynced)
    answer = _rules(gw, BACKEND)
    assert answer["source"] == "backend" and answer["synced"] is False
    assert rule_ids(gw) == ["double-visit", "long-stay"]
    assert rules_in_force(None, data)[0].rules[0].id == "double-visit"  # what a restart applies: the same
    gw.store.close()


def test_from_file_with_a_broken_rules_file_is_refused_and_keeps_the_backends(tmp_path: Path) -> None:
    data, rules_file = tmp_path / "data", tmp_path / "rules.toml"
    rules_file.write_text(FILE_RULES)
    gw = start_gateway(data, rules_file)
    assert _rules(gw, BACKEND)["synced"] is True
    kept = (data / BACKEND_RULES_FILE).read_bytes()
    rules_file.write_text('[[rules]]\nid = "broken"\nkind = "visit"\n')  # edited since: no points
    with pytest.raises(CommandRefused, match=r"rules\[0\] \(id 'broken'\)\.points"):
        _rules(gw, {"from_file": True})
    assert rule_ids(gw) == ["double-visit", "long-stay"] and (data / BACKEND_RULES_FILE).read_bytes() == kept
    gw.store.close()


def test_a_damaged_copy_of_the_backend_rules_is_named_with_the_way_out(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    path = data / BACKEND_RULES_FILE

    def record(received_at: Any, ruleset: Any = BACKEND) -> str:
        return json.dumps({"received_at": received_at, "command_id": None, "ruleset": ruleset})

    cases: list[tuple[str | bytes, str]] = [
        ("{not json", "not the rules the backend sent"),
        (b"\xff\xfe{}", "not text"),
        ("[1, 2]", "not the rules the backend sent"),
        (record(math.nan), "not the rules the backend sent"),
        (record(1e20), "not the rules the backend sent"),
        (record(-1e15), "not the rules the backend sent"),
        (record(0, []), "its ruleset is not an object"),
        (record(0, {"rules": [{"id": "x", "kind": "visit"}]}), r"rules\[0\] \(id 'x'\)"),
        ("[" * 100_000, "not the rules the backend sent"),
        (
            '{"received_at": 0, "ruleset": {"rules": ' + "[" * 100_000 + "]" * 100_000 + "}}",
            "not the rules the backend",
        ),
    ]
    for content, says in cases:
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        with pytest.raises(BackendRulesDamaged) as e:
            rules_in_force(None, data)
        problem = "; ".join(e.value.problems)
        assert str(path) in problem and re.search(says, problem), (content, problem)
        assert "delete it to apply the config's rules file" in problem
        assert isinstance(e.value, ConfigError)


def test_a_gateway_with_damaged_backend_rules_starts_on_the_rules_file_and_keeps_the_copy_aside(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / BACKEND_RULES_FILE).write_text("{half a fil")
    args = [*VISITA, "run", "--sim", "--speed", "60", "--until", "2m", "--mqtt", "off", "--dashboard", "off"]
    r = subprocess.run([*args, "--data-dir", str(data)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    aside = data / (BACKEND_RULES_FILE + ".damaged")
    assert aside.read_text() == "{half a fil" and not (data / BACKEND_RULES_FILE).exists()
    assert "built-in rules, because the backend's kept rules could not be used" in r.stderr, r.stderr
    assert f"moved to {aside}" in r.stderr


def test_backend_rules_for_a_zone_the_plan_has_lost_stay_in_force_with_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    gone = {"rules": [{"id": "promo", "kind": "zone_bonus", "zone": "old-promo-corner", "points": 5}]}
    assert save_backend_rules(data, gone, 1_780_000_000.0, "r9")
    args = [*VISITA, "run", "--sim", "--speed", "60", "--until", "2m", "--mqtt", "off", "--dashboard", "off"]
    r = subprocess.run([*args, "--data-dir", str(data)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "rules[0] (id 'promo').zone = 'old-promo-corner': no such zone" in r.stderr
    assert (data / BACKEND_RULES_FILE).exists(), "the backend's rules are kept until it sends others"


def test_every_command_refuses_a_top_level_field_it_does_not_take_and_changes_nothing(tmp_path: Path) -> None:
    from gateway.downlink import Downlink
    from gateway.members import KeyVault, MemberKeys

    gw = start_gateway(tmp_path / "data", None)
    gw.member_keys = MemberKeys(gw.members, KeyVault(tmp_path / "data"))
    sent: list[tuple[str, dict[str, Any]]] = []
    downlink = Downlink(gw, lambda name, payload: sent.append((name, json.loads(payload))))
    settings, rules_before = gw.settings, rule_ids(gw)
    member = {"member": "m-1", "key": "ab" * 32}
    commands = {
        "config": {"id": "c8", "set": {"mqtt.health_interval_s": 5}, "extra": 1},
        "rules": {"id": "r8", **BACKEND, "extra": 1},
        "members": {"id": "m8", "op": "full", "version": 1, "members": [member], "extra": 1},
    }
    try:
        for name, payload in commands.items():
            result = downlink.apply(name, json.dumps(payload).encode())
            assert result["ok"] is False and "unknown field(s) extra" in result["error"], result
            assert result["id"] == payload["id"] and sent[-1] == (name, result)
        assert gw.settings is settings and rule_ids(gw) == rules_before
        assert not (tmp_path / "data" / BACKEND_RULES_FILE).exists()
        assert len(gw.members) == 0 and gw.members.version == 0
        # Without the stray field each is applied: "id" is every command's.
        for name, payload in commands.items():
            assert downlink.apply(name, json.dumps({k: v for k, v in payload.items() if k != "extra"}).encode())["ok"]
        assert gw.settings.mqtt.health_interval_s == 5 and rule_ids(gw) == ["double-visit", "long-stay"]
    finally:
        gw.store.close()


def test_a_command_no_handler_serves_is_answered_on_cmd_result_unknown_with_the_name_sent(tmp_path: Path) -> None:
    from gateway.downlink import UNKNOWN, Downlink

    gw = start_gateway(tmp_path / "data", None)
    sent: list[tuple[str, dict[str, Any]]] = []
    downlink = Downlink(gw, lambda name, payload: sent.append((name, json.loads(payload))))
    try:
        result = downlink.apply("nosuch", b'{"id": "n1"}')
    finally:
        gw.store.close()
    assert sent == [(UNKNOWN, result)] and UNKNOWN == "unknown"
    assert result["id"] == "n1" and result["name"] == "nosuch" and result["ok"] is False
    assert "unknown command 'nosuch'" in result["error"]


def test_rules_sent_while_a_check_in_waits_for_its_commit_do_not_award_it_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The downlink is applied when a commit finishes (feed_uplink); a check-in answered meanwhile has its awards
    # applied but not yet handed to the store. The new engine must know them, or the open visit (looked at again
    # under the new rules) earns the same awards once more: a second points.awarded, under a new event id.
    gw = gateway(tmp_path / "data", Clock(NOW))
    real_write = gw.store.write_commit

    def slow_disk(pending: Any) -> None:
        time.sleep(0.05)
        real_write(pending)

    monkeypatch.setattr(gw.store, "write_commit", slow_disk)

    async def main() -> None:
        gw.writer = CommitWriter(gw)
        first = asyncio.create_task(gw.checkin_async(json.dumps(body("m-1")).encode()))
        await asyncio.sleep(0.01)  # m-1's commit is being written
        second = asyncio.create_task(gw.checkin_async(json.dumps(body("m-2")).encode()))
        await asyncio.sleep(0)  # m-2 applied, waiting for the next commit
        _rules(gw, {"rules": [r.model_dump() for r in load_rules(None).rules]})  # the same rules, sent again
        await asyncio.gather(first, second)
        gw.step(NOW + 1)
        await gw.writer.drain()
        gw.writer.close()

    try:
        asyncio.run(main())
        awarded = [e.data["award_id"] for e in gw.store.pending_events() if e.type == "points.awarded"]
        assert len(awarded) == 4, "m-1 and m-2 each earn visit and checkin once"
        assert len(set(awarded)) == len(awarded), "an award was published twice"
        assert len(gw.store.awards()) == 4
    finally:
        gw.store.close()
        gw.checkins.close()
