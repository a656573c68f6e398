"""docs/checkin.md's worked example is what the gateway does: the message, the signature, the answer."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from starlette.exceptions import StarletteDeprecationWarning
from test_checkins import Clock, NoAdverts

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

from dashboard.app import create_app
from gateway.config import Settings
from gateway.identity import MemberDirectory
from gateway.points import load_rules
from gateway.runtime import Gateway
from gateway.store import Store
from sensors.checkins import REASONS, canonical, sign

DOC = (Path(__file__).parent.parent / "docs" / "checkin.md").read_text(encoding="utf-8")


def blocks() -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", DOC, re.S)


def test_the_worked_example_reproduces_and_is_accepted(tmp_path: Path) -> None:
    b = blocks()
    key_hex, message, sig = b[0].strip(), b[1].strip(), b[2].strip()
    request = b[5].strip().split("\n\n", 1)[1]
    body = json.loads(request)
    assert body["sig"] == sig
    assert canonical(body).decode() == message
    assert sign(bytes.fromhex(key_hex), body) == sig
    assert key_hex in b[3] and message in b[3] and key_hex in b[4]  # the OpenSSL and Python snippets use them

    members = MemberDirectory()
    members.set_members({body["member"]: bytes.fromhex(key_hex)})
    gw = Gateway(Settings(), Store(tmp_path), NoAdverts(), members, load_rules(None), [])
    gw.clock = Clock(float(body["ts"]))
    try:
        with TestClient(create_app(gw)) as client:
            r = client.post("/api/v1/checkins", content=request.encode())
        assert r.status_code == 201, r.text
        got = r.json()
        shown = json.loads(re.sub(r'"…"', '""', b[6]))
        assert [(a["rule"], a["points"]) for a in got["awarded"]] == [
            (a["rule"], a["points"]) for a in shown["awarded"]
        ]
        assert (got["source"], got["points_visit"], got["points_today"]) == (
            shown["source"],
            shown["points_visit"],
            shown["points_today"],
        )
    finally:
        gw.store.close()
        gw.checkins.close()


def test_every_refusal_reason_is_in_the_answers_table() -> None:
    for reason, status in REASONS.items():
        assert re.search(rf"\| {status} \| [^\n]*`{reason}`", DOC), reason
