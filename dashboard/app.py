"""The footfall dashboard: a static page and the JSON API behind it.

`create_app(gateway)` builds the FastAPI app around a running `Gateway`; every endpoint
reads the gateway's in-memory objects (the gateway process is the database's only writer).
The page ships in `dashboard/static` and loads nothing from the internet: stores are often
offline, and the page's Content-Security-Policy makes the browser refuse anything that is not
served by the gateway itself. The OpenAPI page (/docs, Swagger UI) is served from the files the `fastapi-offline`
package ships, for the same reason. There is no /redoc: ReDoc fetches its logo from the internet whatever it is told.

Privacy: subjects are pseudonymous and stay inside the gateway. No response carries a subject
(`member:…`, `anon:…`), a member ref or a Bluetooth address; a visit says only whether it was a
member or an anonymous phone.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from dashboard import installer
from gateway.model import Visit
from gateway.relay import Relay
from gateway.runtime import Gateway
from gateway.survey import SurveyRefused
from sensors.checkins import MAX_BODY, CheckinRefused

STATIC = resources.files("dashboard").joinpath("static")
VISITS_MAX = 500
# Swagger UI's files, as the fastapi-offline package ships them, and where they are served.
API_UI = resources.files("fastapi_offline").joinpath("static")
API_UI_URL = "/static/api-ui"

# The OpenAPI page runs Swagger UI's inline start-up script and styles; nothing else.
DOCS_CSP = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# Everything the page needs comes from the gateway; inline scripts and styles are refused too.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


async def get_gateway(request: Request) -> Gateway:
    """The running gateway this app serves (`async`: a plain `def` dependency would cost every request a hop
    to FastAPI's thread pool and back)."""
    gw: Gateway = request.app.state.gateway
    return gw


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


# --------------------------------------------------------------------------- response models


class Health(BaseModel):
    """Liveness: the process answers and which gateway it is."""

    status: Literal["ok"] = Field(description="Always ok when the process answers.")
    store: str = Field(description="Store id.")
    gateway: str = Field(description="Gateway id.")
    version: str = Field(description="Visita version.")


class ZoneCount(BaseModel):
    """Visitors inside one zone now."""

    id: str = Field(description="Zone id from the store plan.")
    name: str = Field(description="Display name of the zone (the id when the plan gives none).")
    visitors: int = Field(
        ge=0,
        description="Open visitor visits whose current zone this is (staff excluded). With resolution 'presence' "
        "the zones are not told apart (the receiver's zone holds everyone inside): read occupancy instead.",
    )


class FootfallNow(BaseModel):
    """Live footfall counts."""

    store: str = Field(description="Store id.")
    gateway: str = Field(description="Gateway id.")
    timezone: str = Field(description="Store's IANA time zone; 'today' is the store-local day.")
    as_of: float = Field(description="Data time of these counts, UNIX seconds; 0 before the first tick.")
    day: str = Field(description="Store-local day the 'today' counts are for (YYYY-MM-DD); empty before data.")
    occupancy: int = Field(ge=0, description="Visitors inside now (staff excluded).")
    entries_last_hour: int = Field(ge=0, description="Visitor visits that started in the hour up to as_of.")
    visitors_today: int = Field(
        ge=0, description="Visitor visits started today (a visit open across midnight is its first day's)."
    )
    passbys_today: int = Field(ge=0, description="People who passed by without visiting, today.")
    staff_today: int = Field(
        ge=0, description="Staff visits started today (one open across midnight is its first day's)."
    )
    left_today: int = Field(ge=0, description="Visitor visits that ended today (store-local day of their end).")
    mean_dwell_today_s: int | None = Field(
        description="The average visit: mean dwell of the visitor visits that ended today, seconds; null before the "
        "first of the day."
    )
    zones: list[ZoneCount] = Field(description="Visitors inside now by zone, in store plan order (inside zones).")
    resolution: Literal["zones", "presence"] = Field(
        description="'zones' with several receivers; 'presence' (inside/outside only) with one."
    )


class ZoneDwell(BaseModel):
    """Time spent in one zone during a visit."""

    zone: str = Field(description="Zone id.")
    dwell_s: float = Field(ge=0, description="Seconds in this zone, summed over the visit.")


class VisitOut(BaseModel):
    """A visit, open or finished. Subjects are pseudonymous; no subject, address or key ever appears."""

    visit_id: str = Field(description="Visit id (derived, the same as in visit.* events).")
    subject_kind: Literal["member", "anonymous"] = Field(description="A member's app, or a phone without it.")
    started: float = Field(description="Entered the store, UNIX seconds.")
    ended: float | None = Field(description="Last seen before the visit ended; null while open.")
    open: bool = Field(description="True while the visitor is still inside.")
    dwell_s: float = Field(ge=0, description="Seconds from entering to the last sighting inside.")
    zone: str | None = Field(description="Current zone while open, last zone when finished.")
    path: list[str] = Field(description="Zone ids the visitor stayed in (10 s or more), in order.")
    zones: list[ZoneDwell] = Field(description="Seconds per zone.")
    classification: Literal["visitor", "pass-by", "staff"]
    source: Literal["ble", "checkin", "both"]

    @classmethod
    def of(cls, v: Visit) -> VisitOut:
        """From a Visit record."""
        return cls(
            visit_id=v.visit_id,
            subject_kind="member" if v.member is not None else "anonymous",
            started=v.started,
            ended=v.ended,
            open=v.ended is None,
            dwell_s=round(v.dwell_s, 1),
            zone=v.zone,
            path=list(v.path),
            zones=[ZoneDwell(zone=z, dwell_s=round(d, 1)) for z, d in v.zone_dwell().items()],
            classification=v.classification,
            source=v.source,
        )


class Status(BaseModel):
    """Diagnostics of every stage, as `Gateway.diagnostics()` reports them."""

    # A stage that grows a new diagnostics section shows up here without a release of the page.
    model_config = ConfigDict(extra="allow")

    store_id: str = Field(description="Store id.")
    gateway_id: str = Field(description="Gateway id.")
    version: str = Field(description="Visita version.")
    data_time: float = Field(description="Data time of the last pipeline tick, UNIX seconds.")
    ticks: int = Field(ge=0, description="Pipeline ticks since start.")
    adverts: int = Field(ge=0, description="Adverts received since start.")
    source: dict[str, Any] = Field(description="The advert source (radio, nodes or simulator).")
    decoder: dict[str, Any] = Field(description="Frames decoded by type, unknown adverts dropped.")
    identity: dict[str, Any] = Field(description="Sightings by subject kind, beacon telemetry.")
    estimator: dict[str, Any] = Field(description="Zone estimator state.")
    visits: dict[str, Any] = Field(description="Open sessions and visits.")
    points: dict[str, Any] = Field(
        description="Awards known (`awards`) and where the points rules in force come from (`rules_source`: the "
        "backend's cmd/rules, kept in the data directory, or the rules file)."
    )
    checkins: dict[str, Any] = Field(description="App check-ins accepted, and refused by reason.")
    store: dict[str, Any] = Field(description="Database file, outbox depth, commits.")
    uplink: dict[str, Any] = Field(description="MQTT broker connection and outbox delivery.")
    dashboard: dict[str, Any] = Field(
        description="How this API is served: `https`, and the certificate's end (`certificate_until`, ISO 8601 UTC) "
        "and `certificate_names` (dashboard.tls_cert_file, docs/install.md)."
    )


class CheckinAward(BaseModel):
    """One award a check-in brought."""

    award_id: str = Field(description="hash(member, visit, rule): the same as in points.awarded.")
    rule: str = Field(description="Rule id.")
    points: int = Field(description="Points granted.")


class CheckinAccepted(BaseModel):
    """A check-in the gateway accepted (201)."""

    visit_id: str = Field(description="The visit the check-in proved (the same as in visit.* events).")
    source: Literal["checkin", "both"] = Field(description="both when the member's phone was also heard over BLE.")
    beacon: Literal["none", "verified", "fixed", "unknown"] = Field(
        description="What the check-in's beacon claim proved: verified (a current id of one of the store's "
        "Eddystone-EID beacons: the visit is placed in its zone), fixed (a fixed beacon id: public, so it proves "
        "nothing), unknown (not this store's, or not current), none (no claim). docs/checkin.md."
    )
    awarded: list[CheckinAward] = Field(description="Awards this check-in brought (often none: already awarded).")
    points_visit: int = Field(description="Points for this visit so far.")
    points_today: int = Field(description="Points for the member today (store-local day) so far.")


class CheckinRefusal(BaseModel):
    """A check-in that was not accepted; nothing changed."""

    reason: str = Field(
        description="too_large, malformed, wrong_store, unauthorized (unknown member or bad signature: one answer, "
        "so refs cannot be probed), stale, replayed, rate_limited, busy or unavailable (docs/checkin.md)."
    )
    message: str = Field(description="What is wrong, in one line.")
    field: str | None = Field(default=None, description="The field at fault, when there is one.")


class ValidationProblem(BaseModel):
    """A request the API cannot answer: `message` in one line, `detail` as FastAPI reports it."""

    message: str = Field(
        description="What is wrong and what is allowed, e.g. 'limit = 900: must be a whole number from 1 to 500'."
    )
    detail: list[dict[str, Any]] = Field(description="Every problem, with its location.")


# --------------------------------------------------------------------------- app


def _problem_line(err: dict[str, Any]) -> str:
    """One line per problem: what, where and what is allowed."""
    kind = err.get("type")
    if kind == "json_invalid":
        why = err.get("ctx", {}).get("error", "cannot be parsed")
        return f"the request body is not valid JSON ({why}): send a JSON object"
    where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path", "body")) or "request"
    if kind == "missing":
        return f"{where}: required, and missing from the request"
    value = err.get("input")
    in_body = tuple(err.get("loc", ()))[:1] == ("body",)
    text = json.dumps(value) if in_body else str(value)  # a body's values as JSON spells them (true, null)
    shown = where if "input" not in err or isinstance(value, (dict, list)) else f"{where} = {text}"
    if where == "limit":
        return f"{shown}: must be a whole number from 1 to {VISITS_MAX}"
    return f"{shown}: {err.get('msg', 'invalid')}"


def _zones(gw: Gateway) -> list[ZoneCount]:
    counts = gw.zone_occupancy()
    return [
        ZoneCount(id=z.id, name=z.name or z.id, visitors=counts.get(z.id, 0))
        for z in gw.settings.plan.zones
        if not z.outside
    ]


def create_app(gateway: Gateway) -> FastAPI:
    """The dashboard app for a running gateway."""
    app = FastAPI(
        docs_url=None,  # served below, from local files
        redoc_url=None,
        title="Visita gateway",
        version=gateway.version,
        description="Footfall dashboard and API of one Visita gateway. People are pseudonymous: no response "
        "carries a subject, member ref or Bluetooth address, except that support staff's endpoint (behind the "
        "support token) answers for the member ref it is asked about.",
    )
    app.state.gateway = gateway
    bad_request: dict[int | str, dict[str, Any]] = {
        422: {"model": ValidationProblem, "description": "A query parameter is out of range."}
    }

    app.include_router(installer.router())
    app.include_router(installer.support_router())
    app.add_exception_handler(SurveyRefused, installer.refused)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors: list[dict[str, Any]] = jsonable_encoder(exc.errors())  # ctx may hold exceptions
        problem = ValidationProblem(message="; ".join(_problem_line(e) for e in errors), detail=errors)
        return JSONResponse(problem.model_dump(mode="json"), status_code=422)

    # The endpoints are `async def` on purpose: they then run on the event loop that also runs the
    # pipeline ticks, so a read never sees a tick half-way (the tracker's dicts, the recent-visits deque).

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz(gw: GatewayDep) -> Health:
        """Liveness probe: always exactly {status, store, gateway, version}."""
        return Health(status="ok", store=gw.settings.store, gateway=gw.settings.gateway, version=gw.version)

    @app.get("/api/v1/footfall", response_model=FootfallNow, tags=["footfall"])
    async def footfall(gw: GatewayDep) -> FootfallNow:
        """Occupancy now, entries in the last hour, visitors vs pass-by today, visitors per zone."""
        snap = gw.footfall.snapshot()
        return FootfallNow(
            store=gw.settings.store,
            gateway=gw.settings.gateway,
            timezone=gw.settings.timezone,
            as_of=snap["as_of"],
            day=snap["day"],
            occupancy=snap["occupancy"],
            entries_last_hour=snap["entries_last_hour"],
            visitors_today=snap["visitors_today"],
            passbys_today=snap["passbys_today"],
            staff_today=snap["staff_today"],
            left_today=snap["left_today"],
            mean_dwell_today_s=snap["mean_dwell_today_s"],
            zones=_zones(gw),
            resolution=gw.resolution,
        )

    @app.get("/api/v1/zones", response_model=list[ZoneCount], tags=["footfall"])
    async def zones(gw: GatewayDep) -> list[ZoneCount]:
        """Visitors inside now by zone (the same list as in /api/v1/footfall)."""
        return _zones(gw)

    @app.get("/api/v1/visits", response_model=list[VisitOut], tags=["footfall"], responses=bad_request)
    async def visits(
        gw: GatewayDep,
        limit: Annotated[int, Query(ge=1, le=VISITS_MAX, description="How many visits at most (1..500).")] = 50,
        state: Annotated[
            Literal["all", "inside", "finished"],
            Query(description="Only the visits still inside, only the finished ones, or all (inside first)."),
        ] = "all",
    ) -> list[VisitOut]:
        """Visits still inside (newest first), then finished ones (most recently ended first).

        Newest first so that a busy store's new arrivals are never cut off by `limit`; a store with more visitors
        inside than `limit` lists its finished visits with `state=finished`.
        """
        known = gw.visits(sys.maxsize)  # in memory and bounded: the open visits and the recent finished ones
        inside = sorted((v for v in known if v.ended is None), key=lambda v: v.started, reverse=True)
        finished = sorted((v for v in known if v.ended is not None), key=lambda v: v.ended or 0.0, reverse=True)
        listed = {"all": inside + finished, "inside": inside, "finished": finished}[state]
        return [VisitOut.of(v) for v in listed[:limit]]

    refusals: dict[int | str, dict[str, Any]] = {
        code: {"model": CheckinRefusal, "description": what}
        for code, what in (
            (401, "Unknown member or bad signature."),
            (409, "Replayed nonce or stale timestamp (more than 2 min from the gateway's clock)."),
            (413, "Body too large."),
            (422, "Malformed: the field and the reason."),
            (429, "Over the member's rate limit (or the gateway is busy); Retry-After says when to try again."),
            (503, "The gateway cannot record check-ins on its disk now; Retry-After says when to try again."),
        )
    }

    @app.post("/api/v1/checkins", status_code=201, response_model=CheckinAccepted, tags=["app"], responses=refusals)
    async def checkin(request: Request, gw: GatewayDep) -> Any:
        """An app check-in signed with the member key (docs/checkin.md); every refusal is counted by reason."""
        body = bytearray()
        async for chunk in request.stream():  # read at most one byte past the limit
            body += chunk
            if len(body) > MAX_BODY:
                break
        try:
            result = await gw.checkin_async(bytes(body))
        except CheckinRefused as e:
            refusal = CheckinRefusal(reason=e.public_reason, message=e.message, field=e.field)
            headers = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s is not None else None
            return JSONResponse(refusal.model_dump(mode="json"), status_code=e.status, headers=headers)
        # Serialised here, once, by pydantic-core: FastAPI would validate the model a second time and encode it
        # in Python (a check-in is answered 200 times a second; docs/checkin.md).
        accepted = CheckinAccepted.model_validate(result)
        return Response(accepted.model_dump_json(), status_code=201, media_type="application/json")

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    async def metrics(gw: GatewayDep) -> PlainTextResponse:
        """Prometheus text format: check-ins accepted and refused by reason, awards, members known."""
        c = gw.checkins.diagnostics()
        lines = [
            "# HELP visita_checkins_accepted_total App check-ins accepted.",
            "# TYPE visita_checkins_accepted_total counter",
            f"visita_checkins_accepted_total {c['accepted']}",
            "# HELP visita_checkins_refused_total App check-ins refused, by reason (docs/checkin.md).",
            "# TYPE visita_checkins_refused_total counter",
            *(f'visita_checkins_refused_total{{reason="{r}"}} {n}' for r, n in sorted(c["refused"].items())),
            "# HELP visita_checkin_beacon_claims_total Accepted check-ins by what their beacon claim proved.",
            "# TYPE visita_checkin_beacon_claims_total counter",
            *(f'visita_checkin_beacon_claims_total{{proof="{k}"}} {n}' for k, n in sorted(c["beacon_claims"].items())),
            "# HELP visita_checkin_nonces Nonces remembered for replay protection.",
            "# TYPE visita_checkin_nonces gauge",
            f"visita_checkin_nonces {c['nonces']}",
            "# HELP visita_awards Awards in the ledger the points engine started from, plus those made since.",
            "# TYPE visita_awards gauge",
            f"visita_awards {gw.points.diagnostics()['awards']}",
            "# HELP visita_members Member keys known.",
            "# TYPE visita_members gauge",
            f"visita_members {len(gw.members)}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/api/v1/status", response_model=Status, tags=["ops"])
    async def status(gw: GatewayDep) -> Status:
        """Diagnostics of every stage: source, decoder, identity, estimator, visits, points, store, uplink."""
        return Status(
            store_id=gw.settings.store, gateway_id=gw.settings.gateway, version=gw.version, **gw.diagnostics()
        )

    def page(name: str) -> FileResponse:
        headers = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
        return FileResponse(str(STATIC.joinpath(name)), headers=headers)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return page("index.html")

    @app.api_route("/survey", methods=["GET", "HEAD"], include_in_schema=False)
    async def survey_page() -> FileResponse:
        # The installer's page (docs/survey.md); what it shows and does needs the installer token.
        return page("survey.html")

    # FastAPI's own /docs loads its script from a CDN: a blank page in a store without internet.
    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        html = get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} · API",
            swagger_js_url=f"{API_UI_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{API_UI_URL}/swagger-ui.css",
            swagger_favicon_url=f"{API_UI_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # else the spec goes to validator.swagger.io for a badge
        )
        html.headers["Content-Security-Policy"] = DOCS_CSP
        return html

    # Mounted before /static, which would otherwise take its paths.
    app.mount(API_UI_URL, StaticFiles(directory=str(API_UI)), name="api-ui")
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app


class RelayStatus(BaseModel):
    """Diagnostics of a relay (`Relay.diagnostics()`): its source, decoder, identity, member keys, what it published."""

    model_config = ConfigDict(extra="allow")

    store_id: str = Field(description="Store id.")
    gateway_id: str = Field(description="This relay's gateway id.")
    version: str = Field(description="Visita version.")
    role: Literal["relay"] = Field(description="Always relay: no visits, footfall or points are made here.")
    source: dict[str, Any] = Field(description="The advert source (radio or simulator).")
    identity: dict[str, Any] = Field(description="Sightings by subject kind; `anon_salt`: store or gateway.")
    relay: dict[str, Any] = Field(description="Sighting batches published and dropped (docs/nodes.md).")
    uplink: dict[str, Any] = Field(description="MQTT broker connection.")


def create_relay_app(relay: Relay) -> FastAPI:
    """A relay's dashboard (`visita run --relay`): /healthz and /api/v1/status only, for `visita doctor`; the
    footfall page and its API are the main gateway's."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, title="Visita relay", version=relay.version)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness probe."""
        return Health(status="ok", store=relay.store, gateway=relay.gateway, version=relay.version)

    @app.get("/api/v1/status", response_model=RelayStatus)
    async def status() -> RelayStatus:
        """Diagnostics of the relay's stages."""
        return RelayStatus(store_id=relay.store, gateway_id=relay.gateway, version=relay.version, **relay.diagnostics())

    return app
