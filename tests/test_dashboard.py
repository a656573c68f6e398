"""The dashboard's JSON API over a real gateway: the simulated store, the real pipeline, a Store in tmp_path.

No mocks: the gateway is built as `visita run --sim` builds it and advanced with `Gateway.step` over
simulated minutes; the expected figures come from the events the same steps produced.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    # Starlette >= 1.x wants the `httpx2` package for its TestClient and warns when it falls back to
    # `httpx` (what the dev extra installs). Only that one import-time notice is let through.
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

from dashboard.app import STATIC, create_app
from firmware_sim.scenario import Scenario, load_scenario
from firmware_sim.world import World
from gateway.config import Settings
from gateway.identity import MemberDirectory
from gateway.model import Event
from gateway.points import load_rules
from gateway.runtime import Gateway
from gateway.store import Store
from sensors.sim import SimSource

START = 1_780_000_000.0  # 2026-05-28 20:26:40 UTC: a fixed data time, so every run is the same
MAC = re.compile(r"(?i)\b(?:[0-9a-f]{2}[:-]){5}[0-9a-f]{2}\b")
ENDPOINTS = ["/healthz", "/api/v1/footfall", "/api/v1/zones", "/api/v1/visits?limit=500", "/api/v1/status"]


@dataclass
class SimRun:
    """A gateway over the simulated store, the events its steps produced, and a client for its dashboard."""

    gw: Gateway
    world: World
    client: TestClient
    events: list[Event]

    def advance(self, minutes: float, step_s: float) -> None:
        """Play the store forward, one pipeline tick every `step_s` of data time."""
        t, end = self.gw.now or START, (self.gw.now or START) + minutes * 60
        while t < end:
            t = min(end, t + step_s)
            self.events += self.gw.step(t)

    def get(self, url: str) -> Any:
        """GET that must answer 200; the decoded JSON."""
        r = self.client.get(url)
        assert r.status_code == 200, (url, r.status_code, r.text)
        return r.json()

    def started(self, classification: str = "visitor") -> list[dict[str, Any]]:
        """`data` of every visit.started event of visitors (or of staff)."""
        return [e.data for e in self.events if e.type == "visit.started" and e.data["classification"] == classification]

    def ended_ids(self) -> set[str]:
        """Visit ids of every visit.ended event."""
        return {str(e.data["visit_id"]) for e in self.events if e.type == "visit.ended"}


def sim_run(data_dir: Path, scenario: Scenario | None = None) -> SimRun:
    """A gateway wired the way `visita run --sim` wires it (cli.cmd_run), not yet stepped."""
    world = World(scenario or load_scenario("default"), 1, START)
    members = MemberDirectory()
    members.set_members(world.member_keys)  # the simulated store's app users, as the backend would provision them
    store = Store(data_dir)
    gw = Gateway(Settings(), store, SimSource(world), members, load_rules(None), world.staff_refs)
    return SimRun(gw, world, TestClient(create_app(gw)), [])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimRun]:
    """25 simulated minutes of the demo store, ticks of 5 s."""
    r = sim_run(tmp_path_factory.mktemp("dashboard") / "data")
    r.advance(25, 5.0)
    try:
        yield r
    finally:
        r.client.close()
        r.gw.store.close()


# --------------------------------------------------------------------------- /healthz


def test_healthz_is_exactly_status_store_gateway_version(run: SimRun) -> None:
    assert run.get("/healthz") == {"status": "ok", "store": "demo-store", "gateway": "gw-1", "version": run.gw.version}


# --------------------------------------------------------------------------- /api/v1/footfall


def test_footfall_counts_are_the_gateways_visits(run: SimRun) -> None:
    f = run.get("/api/v1/footfall")
    visits = run.get("/api/v1/visits?limit=500")
    open_visitors = [v for v in visits if v["open"] and v["classification"] == "visitor"]
    started = run.started()
    assert len(started) > 20, "25 minutes of the demo store bring in more than 20 visits"

    assert f["as_of"] == run.gw.now == START + 25 * 60
    assert f["day"] == "2026-05-28"
    # Inside now = open visitor visits, as listed by /visits, as counted per zone, and as the events say.
    assert f["occupancy"] > 0
    assert f["occupancy"] == len(open_visitors)
    assert f["occupancy"] == sum(z["visitors"] for z in f["zones"])
    still_open = {str(d["visit_id"]) for d in started} - run.ended_ids()
    assert {v["visit_id"] for v in open_visitors} == still_open
    for z in f["zones"]:
        assert z["visitors"] == sum(1 for v in open_visitors if v["zone"] == z["id"]), z
    # Less than an hour has passed: every visitor visit of the day started in the last hour.
    assert f["visitors_today"] == len(started)
    assert f["entries_last_hour"] == len(started)
    # The simulated store's staff are on shift: counted apart, never as visitors.
    assert f["staff_today"] == len(run.started("staff")) > 0
    assert all(v["classification"] != "staff" for v in open_visitors)
    # Pass-bys: the closed minutes' footfall.minute aggregates add up to at most today's count.
    minutes = [e.data for e in run.events if e.type == "footfall.minute"]
    assert len(minutes) >= 24
    assert 0 < sum(m["passbys"] for m in minutes) <= f["passbys_today"]
    assert sum(m["entries"] for m in minutes) <= f["visitors_today"]


def test_footfall_lists_the_inside_zones_of_the_plan_in_order(run: SimRun) -> None:
    f = run.get("/api/v1/footfall")
    assert [(z["id"], z["name"]) for z in f["zones"]] == [
        ("entrance", "Entrance"),
        ("produce", "Fruit & vegetables"),
        ("bakery", "Bakery"),
        ("grocery", "Grocery aisles"),
        ("promotions", "Promotions"),
        ("checkout", "Checkout"),
    ]
    assert f["resolution"] == "zones"
    assert run.get("/api/v1/zones") == f["zones"]


def test_entries_last_hour_counts_only_the_last_hour(tmp_path: Path) -> None:
    # A quieter street than the demo's, so 70 simulated minutes stay quick; the pipeline is the same.
    scenario = load_scenario("default")
    quiet = scenario.population.model_dump() | {"shoppers_per_hour": 90, "pedestrians_per_hour": 60}
    r = sim_run(tmp_path / "data", Scenario.model_validate(scenario.model_dump() | {"population": quiet}))
    try:
        r.advance(70, 15.0)
        f = r.get("/api/v1/footfall")
    finally:
        r.client.close()
        r.gw.store.close()
    started = [float(d["started"]) for d in r.started()]
    in_last_hour = [s for s in started if s >= f["as_of"] - 3600]
    assert f["visitors_today"] == len(started)
    assert f["entries_last_hour"] == len(in_last_hour)
    assert 0 < f["entries_last_hour"] < f["visitors_today"], "some of the day's visits are older than an hour"


def test_before_the_first_tick_everything_is_zero(tmp_path: Path) -> None:
    r = sim_run(tmp_path / "data")
    try:
        f = r.get("/api/v1/footfall")
        assert r.get("/api/v1/visits") == []
    finally:
        r.client.close()
        r.gw.store.close()
    assert f["as_of"] == 0 and f["day"] == ""
    assert (f["occupancy"], f["entries_last_hour"], f["visitors_today"], f["passbys_today"]) == (0, 0, 0, 0)
    assert all(z["visitors"] == 0 for z in f["zones"]) and len(f["zones"]) == 6


# --------------------------------------------------------------------------- /api/v1/visits


def test_visits_inside_first_newest_first_then_finished(run: SimRun) -> None:
    visits = run.get("/api/v1/visits?limit=500")
    inside = [v for v in visits if v["open"]]
    finished = [v for v in visits if not v["open"]]
    assert inside and finished
    assert visits == inside + finished
    assert [v["started"] for v in inside] == sorted((v["started"] for v in inside), reverse=True)
    assert [v["ended"] for v in finished] == sorted((v["ended"] for v in finished), reverse=True)
    # Every finished visit on the list is one the gateway announced with visit.ended.
    assert {v["visit_id"] for v in finished} <= run.ended_ids()
    # Staff on shift are listed too (the page labels them), as the events say.
    staff_open = {str(d["visit_id"]) for d in run.started("staff")} - run.ended_ids()
    assert {v["visit_id"] for v in inside if v["classification"] == "staff"} == staff_open


def test_visit_fields_describe_the_visit(run: SimRun) -> None:
    zone_ids = {z.id for z in run.gw.settings.plan.zones if not z.outside}
    for v in run.get("/api/v1/visits?limit=500"):
        assert re.fullmatch(r"[0-9a-f]{24}", v["visit_id"])
        assert v["subject_kind"] in ("member", "anonymous")
        assert v["open"] == (v["ended"] is None)
        assert v["path"] and set(v["path"]) <= zone_ids
        assert all(a != b for a, b in zip(v["path"], v["path"][1:], strict=False)), "a path repeats no zone in a row"
        assert set(v["path"]) | {v["zone"]} <= {z["zone"] for z in v["zones"]}, "path stops and zone have dwell"
        assert sum(z["dwell_s"] for z in v["zones"]) == pytest.approx(v["dwell_s"], abs=0.1 * len(v["zones"]) + 0.1)
        assert v["started"] <= run.gw.now
        if not v["open"]:
            assert v["started"] + v["dwell_s"] <= v["ended"] + 0.1
        if v["classification"] == "visitor":
            assert v["dwell_s"] >= run.gw.settings.visits.min_dwell_s  # a visit qualifies by dwelling


@pytest.mark.parametrize("limit", [1, 7, 500])
def test_visits_limit(run: SimRun, limit: int) -> None:
    everything = run.get("/api/v1/visits?limit=500")
    assert run.get(f"/api/v1/visits?limit={limit}") == everything[:limit]


def test_visits_default_limit_is_50(run: SimRun) -> None:
    assert len(run.get("/api/v1/visits")) == min(50, len(run.get("/api/v1/visits?limit=500")))


def test_visits_state_lists_only_those_inside_or_only_finished_ones(run: SimRun) -> None:
    everything = run.get("/api/v1/visits?limit=500")
    inside = [v for v in everything if v["open"]]
    finished = [v for v in everything if not v["open"]]
    assert inside and finished
    assert run.get("/api/v1/visits?state=all&limit=500") == everything
    assert run.get("/api/v1/visits?state=inside&limit=500") == inside
    assert run.get("/api/v1/visits?state=finished&limit=500") == finished
    # A store with more people inside than the page lists still shows its latest finished visits.
    assert run.get("/api/v1/visits?state=finished&limit=3") == finished[:3]
    assert run.get(f"/api/v1/visits?state=inside&limit={len(inside) - 1}") == inside[:-1]


def test_visits_unknown_state_is_a_clear_422(run: SimRun) -> None:
    r = run.client.get("/api/v1/visits?state=open")
    assert r.status_code == 422
    assert r.json()["message"] == "state = open: Input should be 'all', 'inside' or 'finished'"


@pytest.mark.parametrize("limit", ["0", "-3", "501", "100000", "ten", "2.5"])
def test_visits_limit_out_of_range_is_a_clear_422(run: SimRun, limit: str) -> None:
    r = run.client.get(f"/api/v1/visits?limit={limit}")
    assert r.status_code == 422
    body = r.json()
    assert body["message"] == f"limit = {limit}: must be a whole number from 1 to 500"
    assert body["detail"][0]["loc"] == ["query", "limit"]


# --------------------------------------------------------------------------- /api/v1/status


def test_status_reports_every_stage(run: SimRun) -> None:
    s = run.get("/api/v1/status")
    assert (s["store_id"], s["gateway_id"], s["version"]) == ("demo-store", "gw-1", run.gw.version)
    assert s["data_time"] == START + 25 * 60
    assert s["ticks"] == 25 * 60 // 5
    assert s["adverts"] == s["source"]["adverts"] == s["decoder"]["total"] > 10_000
    assert s["source"]["source"] == "sim"
    assert s["uplink"] == {"broker": "off"}
    assert s["dashboard"] == {"https": False, "certificate_until": None, "certificate_names": []}
    occupancy = run.get("/api/v1/footfall")["occupancy"]
    staff_inside = sum(1 for v in run.get("/api/v1/visits?limit=500") if v["open"] and v["classification"] == "staff")
    assert s["visits"]["open_visits"] == occupancy + staff_inside
    assert s["store"]["outbox_depth"] == len(run.events), "without a broker every event waits in the outbox"


# --------------------------------------------------------------------------- privacy


def test_no_response_carries_a_subject_address_or_member_ref(run: SimRun) -> None:
    subjects = {v.subject for v in run.gw.tracker.open_visits()} | {v.subject for v in run.gw.visits(10_000)}
    assert any(s.startswith("anon:") for s in subjects) and any(s.startswith("member:") for s in subjects)
    secrets = {s.split(":", 1)[1] for s in subjects}  # the hash or member ref behind each subject
    secrets |= set(run.world.member_keys) | {k.hex() for k in run.world.member_keys.values()}
    texts = [run.client.get(url).text for url in [*ENDPOINTS, "/openapi.json"]]
    texts += [run.client.get(f"/api/v1/visits?limit={n}").text for n in (1, 30)]
    for text in texts:
        assert "anon:" not in text and "member:" not in text
        assert not MAC.search(text), MAC.search(text)
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"identifiers leaked: {leaked[:3]}"


# --------------------------------------------------------------------------- OpenAPI


def test_openapi_documents_every_endpoint_with_its_model(run: SimRun) -> None:
    spec = run.get("/openapi.json")

    def ok_schema(path: str) -> dict[str, Any]:
        schema: dict[str, Any] = spec["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        return schema

    assert ok_schema("/healthz") == {"$ref": "#/components/schemas/Health"}
    assert ok_schema("/api/v1/footfall") == {"$ref": "#/components/schemas/FootfallNow"}
    assert ok_schema("/api/v1/status") == {"$ref": "#/components/schemas/Status"}
    assert ok_schema("/api/v1/zones")["items"] == {"$ref": "#/components/schemas/ZoneCount"}
    assert ok_schema("/api/v1/visits")["items"] == {"$ref": "#/components/schemas/VisitOut"}
    bad = spec["paths"]["/api/v1/visits"]["get"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert bad == {"$ref": "#/components/schemas/ValidationProblem"}
    limit, state = spec["paths"]["/api/v1/visits"]["get"]["parameters"]
    assert (limit["name"], limit["schema"]["minimum"], limit["schema"]["maximum"]) == ("limit", 1, 500)
    assert (state["name"], state["schema"]["enum"], state["schema"]["default"]) == (
        "state",
        ["all", "inside", "finished"],
        "all",
    )
    health = spec["components"]["schemas"]["Health"]
    assert set(health["properties"]) == {"status", "store", "gateway", "version"}
    footfall = spec["components"]["schemas"]["FootfallNow"]["properties"]
    assert all(p.get("description") for p in footfall.values()), "every footfall field is described"
    assert "/" not in spec["paths"] and "/static" not in json.dumps(spec["paths"])


def test_openapi_page_is_served_from_the_gateway_alone(run: SimRun) -> None:
    """Stores are often offline: /docs loads Swagger UI from the gateway, not from a CDN (and /redoc, which would
    fetch ReDoc's logo from the internet, is not served)."""
    page = run.client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page.text), "a URL out of the gateway"
    assets = re.findall(r'(?:href|src)="([^"]+)"', page.text)
    assert len(assets) == 3, assets  # script, stylesheet, icon
    for url in assets:
        assert url.startswith("/static/"), url
        r = run.client.get(url)
        assert r.status_code == 200 and len(r.content) > 500, (url, r.status_code)
    assert "url: '/openapi.json'" in page.text and '"validatorUrl": null' in page.text
    assert run.client.get("/redoc").status_code == 404


# --------------------------------------------------------------------------- the page


def test_page_and_assets_come_from_the_package_and_nothing_external(run: SimRun) -> None:
    page = run.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    for testid in ("occupancy", "entries-last-hour", "visitors-today", "passbys-today", "zones", "visits", "as-of"):
        assert f'data-testid="{testid}"' in page.text
    assert 'data-testid="conn-state"' in page.text and 'aria-live="polite"' in page.text
    assert run.client.head("/").status_code == 200
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        shipped = STATIC.joinpath(name).read_text(encoding="utf-8")
        r = run.client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert r.text == shipped
    for text in (page.text, *(STATIC.joinpath(n).read_text(encoding="utf-8") for n in ("app.js", "style.css"))):
        # Nothing from a CDN, no web fonts: the only link out is none at all.
        assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text), re.search(r"(?i)https?://\S+", text)
        assert "@import" not in text and "@font-face" not in text
