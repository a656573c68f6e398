"""firmware_sim.scenario: shipped scenarios load, plans derive, bad files get one clear line per problem."""

from __future__ import annotations

import subprocess
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from conftest import VISITA

from firmware_sim.geometry import as_polygon, polygon_area
from firmware_sim.scenario import Scenario, load_scenario, scenario_plan, shipped
from gateway.config import ConfigError, default_plan

SHIPPED = ["default", "mall-unit", "small-shop", "supermarket", "supermarket-dense", "supermarket-grid"]


def shipped_data(name: str) -> dict[str, Any]:
    text = resources.files("firmware_sim").joinpath(f"scenarios/{name}.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """A minimal TOML writer for the shapes scenarios use (tables, arrays of tables, scalars, lists)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any], array: bool = False) -> None:
        if prefix:
            lines.append(f"[[{prefix}]]" if array else f"[{prefix}]")
        subs = []
        for k, v in d.items():
            if isinstance(v, dict):
                subs.append((k, v, False))
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                subs.append((k, v, True))
            else:
                lines.append(f"{k} = {value(v)}")
        for k, v, is_array in subs:
            name = f"{prefix}.{k}" if prefix else k
            for item in v if is_array else [v]:
                table(name, item, is_array)

    table("", data)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_shipped_scenarios_are_the_four_named_ones() -> None:
    assert shipped() == SHIPPED


@pytest.mark.parametrize("name", ["supermarket-dense", "supermarket-grid"])
def test_the_supermarket_variants_differ_from_it_only_in_their_receivers(name: str) -> None:
    """docs/estimation.md compares them as the same store, people and radio with more receivers."""
    base, variant = shipped_data("supermarket"), shipped_data(name)
    assert variant["name"] == name and variant["description"] != base["description"]
    same = {k for k in base if k not in ("name", "description", "receivers")}
    assert {k: variant.get(k) for k in same} == {k: base[k] for k in same} and set(variant) == set(base)
    ids = [r["id"] for r in variant["receivers"]]
    assert len(ids) > len(base["receivers"]) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_scenario_loads_and_derives_a_valid_plan(name: str) -> None:
    s = load_scenario(name)
    assert s.name == name
    plan = scenario_plan(s)
    assert [z.id for z in plan.zones] == [z.id for z in s.zones]
    assert [r.id for r in plan.receivers] == [r.id for r in s.receivers]
    assert len(plan.beacons) == len(s.beacons)
    assert all(r.zone for r in plan.receivers) and all(b.zone for b in plan.beacons)


def test_shipped_scenarios_are_what_the_issue_asks_for() -> None:
    assert len(load_scenario("small-shop").receivers) == 1
    market = load_scenario("supermarket")
    assert len(market.receivers) == 6
    area = sum(polygon_area(as_polygon(z.polygon)) for z in market.zones if not z.outside)
    assert area == pytest.approx(1500)
    assert market.radio.shadowing_sigma_db == 6.0
    mall = load_scenario("mall-unit")
    assert max(mall.population.pedestrians_per_hour) >= 2000, "a busy corridor"
    assert any("glass" in w.name for w in mall.walls)
    frames = {b.frame for s in map(load_scenario, SHIPPED) for b in s.beacons}
    assert frames == {"ibeacon", "altbeacon", "eddystone-uid", "eddystone-url"}
    assert any(b.tlm_every for b in market.beacons)


def test_default_scenario_matches_the_built_in_plan_exactly() -> None:
    assert scenario_plan(load_scenario("default")) == default_plan()


def test_a_scenario_is_a_shipped_name_or_a_path(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "my-store.toml", shipped_data("small-shop") | {"name": ""})
    assert load_scenario(str(path)).name == "my-store", "a file without a name is named after the file"
    with pytest.raises(ConfigError) as e:
        load_scenario("no-such-store")
    assert e.value.problems == [f"no-such-store: no such scenario file (shipped scenarios: {', '.join(SHIPPED)})"]


def test_a_gateway_config_given_as_a_scenario_is_named_as_such_in_one_line(tmp_path: Path) -> None:
    """`visita eval ./my-store.toml` (docs/install.md) with the store's visita.toml: one line saying it is a gateway
    config, not twelve about scenario keys missing and config keys unknown."""
    path = tmp_path / "visita.toml"
    path.write_text('store = "s-1"\n[mqtt]\nurl = "off"\n[[plan.zones]]\nid = "shop"\n')
    with pytest.raises(ConfigError) as e:
        load_scenario(str(path))
    assert len(e.value.problems) == 1, e.value.problems
    assert e.value.problems[0].startswith(f"{path}: a gateway config file (mqtt, plan, store), not a scenario")


def test_hourly_rates_take_a_number_or_24_numbers() -> None:
    data = shipped_data("default")
    flat = Scenario.model_validate(data)
    assert flat.population.shoppers_per_hour == [180.0] * 24
    assert load_scenario("supermarket").population.shoppers_per_hour[3] == 0


def problems(tmp_path: Path, change: dict[str, Any], base: str = "default") -> list[str]:
    """The error lines of a shipped scenario with `change` merged in (one level deep per table)."""
    data = shipped_data(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = data[key] | value
        else:
            data[key] = value
    path = write_toml(tmp_path / "bad.toml", data)
    with pytest.raises(ConfigError) as e:
        load_scenario(str(path))
    return [line.removeprefix(f"{path}: ") for line in e.value.problems]


def test_schema_errors_name_the_key_the_value_and_what_is_allowed(tmp_path: Path) -> None:
    out = problems(
        tmp_path,
        {
            "radio": {"shadowing_sigma_db": 20.0, "fading": 1},
            "population": {"shoppers_per_hour": [1, 2, 3], "walking_speed_mps": [2.0, 1.0]},
            "timezone": "Mars/Olympus",
        },
    )
    assert "radio.shadowing_sigma_db = 20.0: Input should be less than or equal to 12" in out
    assert any(line.startswith("radio.fading: unknown key (allowed here: path_loss_exponent,") for line in out)
    assert (
        "population.shoppers_per_hour: must be a number >= 0 or a list of 24 numbers >= 0 "
        "(one per hour of the day, from midnight)" in out
    )
    assert "population.walking_speed_mps: must be [low, high] with 0.3 <= low <= high <= 3" in out
    assert "timezone = 'Mars/Olympus': unknown time zone; use an IANA name such as Europe/Berlin or UTC" in out
    assert len(out) == 5, out


def test_whole_file_errors_one_line_each(tmp_path: Path) -> None:
    data = shipped_data("default")
    data["receivers"][1]["position"] = [99.0, 99.0]
    data["receivers"][2]["id"] = "rx-entrance"
    data["entrances"][0]["inside"] = [15.0, -1.0]
    data["beacons"][0]["uuid"] = "not-a-uuid"
    data["beacons"][2]["tlm_every"] = 10
    data["population"]["routes"] = [{"zones": ["produce", "sidewalk", "nowhere"]}]
    path = write_toml(tmp_path / "bad.toml", data)
    with pytest.raises(ConfigError) as e:
        load_scenario(str(path))
    out = [line.removeprefix(f"{path}: ") for line in e.value.problems]
    assert out == [
        "receivers: id 'rx-entrance' is used twice: every receiver id must be unique",
        "entrances[0].inside = [15, -1]: must lie in an inside zone (found sidewalk)",
        "receivers[1].position = [99, 99]: in no zone; move it or give its zone",
        "beacons[0].uuid = 'not-a-uuid': ibeacon beacons need a UUID such as 'e2c56db5-dffb-48d2-b060-d0f5a71096e0'",
        "beacons[2].tlm_every = 10: TLM frames are Eddystone's; use 0 for altbeacon beacons",
        "population.routes[0].zones[1] = 'sidewalk': not an inside zone "
        "(inside zones: bakery, checkout, entrance, grocery, produce, promotions)",
        "population.routes[0].zones[2] = 'nowhere': not an inside zone "
        "(inside zones: bakery, checkout, entrance, grocery, produce, promotions)",
    ]


def test_geometry_errors(tmp_path: Path) -> None:
    out = problems(
        tmp_path,
        {
            "zones": [
                {"id": "street", "outside": True, "polygon": [[0, 0], [1, 1], [2, 2]]},
                {"id": "shop", "polygon": [[0, 0], [10, 0], [10, 10], [0, 10]]},
            ],
            "sidewalk": {"points": [[5, 5], [5, 5]]},
            "entrances": [{"outside": [5, 5], "inside": [5, 6]}],
            "receivers": [{"id": "rx", "position": [5, 5], "scan_window_ms": 100, "scan_interval_ms": 50}],
            "beacons": [],
        },
    )
    assert out[0] == "zones[0].polygon = [[0, 0], [1, 1], [2, 2]]: encloses no area (corners in order, not in a line)"
    assert "receivers[0].scan_window_ms = 100: must be at most scan_interval_ms (50)" in out
    assert "sidewalk.points = [[5, 5], [5, 5]]: a sidewalk needs two different points" in out
    assert any(line.startswith("entrances[0].outside = [5, 5]: must lie in an outside zone") for line in out)


def test_bad_toml_and_missing_keys(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_scenario(str(broken))
    assert e.value.problems[0].startswith(f"{broken}: not valid TOML:")
    empty = write_toml(tmp_path / "empty.toml", {"name": "x"})
    with pytest.raises(ConfigError) as e:
        load_scenario(str(empty))
    assert sorted(e.value.problems) == [
        f"{empty}: entrances: required key is missing",
        f"{empty}: receivers: required key is missing",
        f"{empty}: sidewalk: required key is missing",
        f"{empty}: zones: required key is missing",
    ]


def test_the_cli_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    data = shipped_data("default")
    data["radio"]["path_loss_exponent"] = 9.0
    data["receivers"][0]["position"] = [500.0, 500.0]
    path = write_toml(tmp_path / "bad.toml", data)
    proc = subprocess.run([*VISITA, "sim", str(path), "--duration", "1m"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"{path}: radio.path_loss_exponent = 9.0: Input should be less than or equal to 5",
    ], "schema errors come first; whole-file checks run once the schema holds"
    proc = subprocess.run(
        [*VISITA, "run", "--sim", "--scenario", str(tmp_path / "nope.toml")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert f"no such scenario file (shipped scenarios: {', '.join(SHIPPED)})" in proc.stderr
