"""The footfall dashboard: a static page and the JSON API behind it.

`create_app(gateway)` builds the FastAPI app around a running `Gateway`; every endpoint
reads the gateway's in-memory objects (the gateway process is the database's only writer).
The page ships in `dashboard/static` and loads nothing from the internet: stores are often
offline. The OpenAPI page is at /docs.
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from gateway.model import Visit
from gateway.runtime import Gateway

STATIC = resources.files("dashboard").joinpath("static")


def get_gateway(request: Request) -> Gateway:
    """The running gateway this app serves."""
    gw: Gateway = request.app.state.gateway
    return gw


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


class Health(BaseModel):
    """Liveness: the process answers and which gateway it is."""

    status: Literal["ok"] = Field(description="Always ok when the process answers.")
    store: str = Field(description="Store id.")
    gateway: str = Field(description="Gateway id.")
    version: str = Field(description="Visita version.")


class FootfallNow(BaseModel):
    """Live footfall counts."""

    store: str = Field(description="Store id.")
    as_of: float = Field(description="Data time of these counts, UNIX seconds.")
    day: str = Field(description="Store-local day the 'today' counts are for (YYYY-MM-DD).")
    occupancy: int = Field(description="Visitors inside now (staff excluded).")
    entries_last_hour: int = Field(description="Visits that started in the last hour.")
    visitors_today: int = Field(description="Visits today.")
    passbys_today: int = Field(description="People who passed by without visiting, today.")
    staff_today: int = Field(description="Staff visits today.")
    zones: dict[str, int] = Field(description="Visitors inside now by zone.")
    zone_names: dict[str, str] = Field(description="Display name of each zone.")
    resolution: Literal["zones", "presence"] = Field(
        description="'zones' with several receivers; 'presence' (inside/outside only) with one."
    )


class ZoneDwell(BaseModel):
    """Time spent in one zone during a visit."""

    zone: str
    dwell_s: float


class VisitOut(BaseModel):
    """A visit, open or finished. Subjects are pseudonymous; no address or key ever appears."""

    visit_id: str
    subject_kind: Literal["member", "anonymous"]
    started: float = Field(description="Entered the store, UNIX seconds.")
    ended: float | None = Field(description="Last seen before the visit ended; null while open.")
    open: bool
    dwell_s: float
    zone: str | None = Field(description="Current zone while open, last zone when finished.")
    path: list[str]
    zones: list[ZoneDwell]
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
            zone=v.path[-1] if v.path else None,
            path=list(v.path),
            zones=[ZoneDwell(zone=z, dwell_s=round(d, 1)) for z, d in v.zone_dwell().items()],
            classification=v.classification,
            source=v.source,
        )


def create_app(gateway: Gateway) -> FastAPI:
    """The dashboard app for a running gateway."""
    app = FastAPI(
        title="Visita gateway",
        version=gateway.version,
        description="Footfall dashboard and API of one Visita gateway.",
    )
    app.state.gateway = gateway

    @app.get("/healthz", response_model=Health, tags=["ops"])
    def healthz(gw: GatewayDep) -> Health:
        """Liveness probe."""
        return Health(status="ok", store=gw.settings.store, gateway=gw.settings.gateway, version=gw.version)

    @app.get("/api/v1/footfall", response_model=FootfallNow, tags=["footfall"])
    def footfall(gw: GatewayDep) -> FootfallNow:
        """Occupancy now, entries in the last hour, visitors vs pass-by today, visitors per zone."""
        snap = gw.footfall.snapshot()
        plan = gw.settings.plan
        return FootfallNow(
            store=gw.settings.store,
            as_of=snap["as_of"],
            day=snap["day"],
            occupancy=snap["occupancy"],
            entries_last_hour=snap["entries_last_hour"],
            visitors_today=snap["visitors_today"],
            passbys_today=snap["passbys_today"],
            staff_today=snap["staff_today"],
            zones=gw.zone_occupancy(),
            zone_names={z.id: z.name or z.id for z in plan.zones},
            resolution="zones" if len(plan.receivers) > 1 else "presence",
        )

    @app.get("/api/v1/visits", response_model=list[VisitOut], tags=["footfall"])
    def visits(
        gw: GatewayDep,
        limit: Annotated[int, Query(ge=1, le=200, description="How many visits at most.")] = 50,
    ) -> list[VisitOut]:
        """Open visits (longest first), then finished ones (newest first)."""
        return [VisitOut.of(v) for v in gw.visits(limit)]

    @app.get("/api/v1/status", tags=["ops"])
    def status(gw: GatewayDep) -> dict[str, object]:
        """Diagnostics of every stage: source, decoder, identity, estimator, visits, store, uplink."""
        return gw.diagnostics()

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(str(STATIC.joinpath("index.html")))

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    return app
