"""The documentation users read says what the code does: every config and scenario key, rule kind and event type."""

from __future__ import annotations

from pathlib import Path
from typing import get_args, get_origin

from pydantic import BaseModel

from firmware_sim.scenario import Scenario
from gateway.config import Settings
from gateway.model import EVENT_TYPES
from gateway.points import CheckinRule, DwellBonusRule, VisitRule

DOCS = Path(__file__).parent.parent / "docs"


def _keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        args = [a for a in getattr(ann, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (args[0] if args else None)
        if sub is not None:
            out += _keys(sub, f"{prefix}{name}{'[]' if get_origin(ann) is list else ''}.")  # a list, or optional
        else:
            out.append(prefix + name)
    return out


def test_every_config_key_is_documented() -> None:
    doc = (DOCS / "config.md").read_text(encoding="utf-8")
    keys = _keys(Settings)
    assert "plan.zones[].outside" in keys and "mqtt.keepalive_s" in keys
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"docs/config.md does not document {missing}"


def test_every_rule_kind_is_documented() -> None:
    doc = (DOCS / "rules.md").read_text(encoding="utf-8")
    kinds = [get_args(m.model_fields["kind"].annotation)[0] for m in (VisitRule, CheckinRule, DwellBonusRule)]
    assert [k for k in kinds if f"### `{k}`" not in doc] == []


def test_every_event_type_is_documented() -> None:
    doc = (DOCS / "events.md").read_text(encoding="utf-8")
    assert [t for t in EVENT_TYPES if f"`{t}`" not in doc] == []


def test_every_scenario_key_is_documented() -> None:
    doc = (DOCS / "scenarios.md").read_text(encoding="utf-8")
    keys = _keys(Scenario)
    assert "population.routes[].weight" in keys and "radio.fading_k_db" in keys
    assert [k for k in keys if f"`{k}`" not in doc] == []


def test_the_member_ref_rule_is_the_one_the_code_applies() -> None:
    from gateway.members import MEMBER_REF
    from sensors.checkins import _MEMBER

    assert MEMBER_REF.pattern == _MEMBER.pattern, "check-ins and member keys must accept the same refs"
    doc = (DOCS / "checkin.md").read_text(encoding="utf-8")
    assert f"`{MEMBER_REF.pattern}`" in doc
    assert "the first a letter or digit" in doc
    for name in ("checkin.md", "events.md", "rules.md", "config.md"):  # the old wording left out the first character
        text = (DOCS / name).read_text(encoding="utf-8")
        assert "1–64 of `A-Z a-z 0-9 _ . : -` |" not in text, name


def test_events_md_says_status_and_health_carry_wall_clock_time_and_the_others_data_time() -> None:
    import json
    import re

    doc = (DOCS / "events.md").read_text(encoding="utf-8")
    (envelope,) = [line for line in doc.splitlines() if line.startswith("| `ts` |")]
    assert "store data time" in envelope and "wall clock" in envelope, envelope
    for name in ("status", "health"):  # gateway/runtime.py makes both with time.time(), not the pipeline's clock
        m = re.search(rf"### `{name}`.*?\n\n(.*?)\n\n", doc, re.S)
        assert m is not None and "wall-clock time" in m.group(1), name
        schema = json.loads((DOCS / "schemas" / f"{name}.schema.json").read_text(encoding="utf-8"))
        assert "wall clock" in schema["properties"]["ts"]["description"], name
