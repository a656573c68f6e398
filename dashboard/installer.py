"""The endpoints behind a token: the installer's site survey (docs/survey.md), and a member's points explained for
support staff (docs/rules.md, "Where are my points?"), behind the support token.

Every request carries `Authorization: Bearer <token>`: the installer token (config `dashboard.installer_token_file`,
or systemd's credential `visita-installer-token`), or for the support endpoint the support token
(`dashboard.support_token_file`, `visita-support-token`); neither opens the other's. Without a configured token
these endpoints answer 403 and say how to set one: a gateway never runs them open.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from gateway.members import MEMBER_REF
from gateway.runtime import Gateway
from gateway.survey import SurveyRefused


class InstallerRefusal(BaseModel):
    """An installer request that was not carried out; nothing changed."""

    message: str = Field(description="What is wrong and what to do, in one line.")


class SpotRequest(BaseModel):
    """Where the installer stands with the survey tag, and for how long."""

    x: float = Field(description="Position on the plan, metres (the zones' frame).")
    y: float = Field(description="Position on the plan, metres (the zones' frame).")
    seconds: float = Field(default=20.0, ge=5, le=120, description="How long to record there, s (turn slowly).")


class _Spot(BaseModel):
    x: float = Field(description="Position, m.")
    y: float = Field(description="Position, m.")
    zone: str = Field(description="Zone the spot lies in.")
    packets: dict[str, int] = Field(description="Packets of the survey tag each receiver heard there (so far).")


class SpotOut(_Spot):
    """A recorded spot."""

    index: int = Field(ge=0, description="Its number, for DELETE /api/v1/survey/spots/{index}.")


class RunningSpot(_Spot):
    """The spot being recorded now."""

    seconds_left: float = Field(ge=0, description="Recording ends in this many seconds (data time).")


class SurveyStatus(BaseModel):
    """The survey as it stands."""

    transmitter: str = Field(description="Subject id of the survey tag (config survey.transmitter).")
    running: RunningSpot | None = Field(description="The spot being recorded, if any.")
    spots: list[SpotOut] = Field(description="Spots recorded: those of the map in use, and any recorded since.")
    applied: dict[str, Any] | None = Field(
        description="The survey map the estimator uses: its file and how many spots it was fitted from; null "
        "without one."
    )
    problem: str | None = Field(
        default=None,
        description="Why the survey file in the data directory is not used (made for another plan, unreadable); "
        "null when it is, or when there is none.",
    )


class SurveyApplied(BaseModel):
    """A survey fitted, saved and in use."""

    file: str = Field(description="Where it was saved (in the data directory).")
    spots: int = Field(ge=1, description="Spots it was fitted from.")
    receivers: dict[str, int] = Field(description="Per receiver, the spots it heard the tag at well enough to use.")


class RuleOutcome(BaseModel):
    """What one rule did for a visit."""

    rule: str = Field(description="Rule id.")
    points: int = Field(description="Points it awarded (0 when it did not).")
    why: str = Field(description="Why, in words support staff can read out.")


class VisitExplained(BaseModel):
    """One of the member's visits and what every rule did for it."""

    visit_id: str
    started: str = Field(description="Start, ISO 8601 in the store's time zone.")
    open: bool = Field(description="Still inside: judged as it stands now (a dwell bonus waits for the end).")
    dwell_s: int = Field(description="Seconds inside.")
    source: str = Field(description="What proved presence: ble, checkin or both.")
    classification: str = Field(description="visitor, pass-by or staff.")
    path: list[str] = Field(description="Zones in the order visited.")
    points: int = Field(description="Points the visit earned in all.")
    rules: list[RuleOutcome]


class OtherAward(BaseModel):
    """An award of the member for a visit not listed."""

    visit_id: str
    rule: str
    points: int
    reason: str


class PointsExplained(BaseModel):
    """A member's visits with every rule's outcome: the answer to "where are my points?"."""

    member: str
    visits: list[VisitExplained] = Field(description="Open visits, then finished ones, newest first.")
    other_awards: list[OtherAward] = Field(description="Awards the engine holds for visits not listed.")
    rules_source: str = Field(description="Where the rules in force come from (the backend's cmd/rules, or a file).")
    tiers: str = Field(description="Where the members' tiers (points multipliers) come from.")


MemberRef = Annotated[str, Path(pattern=MEMBER_REF.pattern, description="The member's ref, as the backend knows it.")]


class PlanZone(BaseModel):
    """A zone of the store plan."""

    id: str
    name: str = Field(description="Human name ('' when the plan gives none).")
    outside: bool = Field(description="Outside the store (sidewalk, mall corridor): no spot can be recorded there.")
    polygon: list[tuple[float, float]] = Field(description="Corners [x, y], m.")


class PlanReceiver(BaseModel):
    """A receiver of the plan."""

    id: str
    zone: str
    position: tuple[float, float] | None = Field(description="Where it is mounted, [x, y] m; null: unknown.")


class PlanWall(BaseModel):
    """A wall, window or shelf run of the plan (radio loss)."""

    name: str
    points: list[tuple[float, float]] = Field(description="Polyline corners [x, y], m.")


class SurveyPlan(BaseModel):
    """The store plan in the zones' frame (metres), for drawing where to stand."""

    zones: list[PlanZone]
    receivers: list[PlanReceiver]
    walls: list[PlanWall]
    doors: list[tuple[float, float]] = Field(description="Where people cross between outside and inside, [x, y] m.")
    min_packets: int = Field(description="Packets a receiver must hear at a spot for the map to use it there.")


def _refusal(status: int, message: str) -> JSONResponse:
    return JSONResponse(InstallerRefusal(message=message).model_dump(), status_code=status)


def _bearer(role: str, why: str) -> Callable[..., Awaitable[Gateway]]:
    """A dependency: the gateway, when the request carries the `role` token (installer, support; the gateway's
    `<role>_token`); SurveyRefused 403 when none is configured, 401 unless the header carries it. `why`: its
    docstring's reason, for the OpenAPI page."""

    async def dependency(request: Request, authorization: Annotated[str | None, Header()] = None) -> Gateway:
        gw: Gateway = request.app.state.gateway
        token: str | None = getattr(gw, f"{role}_token")
        if token is None:
            raise SurveyRefused(
                403,
                f"{role} endpoints are off: no {role} token is configured; set dashboard.{role}_token_file "
                f"(or the systemd credential visita-{role}-token) and restart",
            )
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not authorization or not hmac.compare_digest(given.encode(), token.encode()):
            raise SurveyRefused(401, f"missing or wrong {role} token: send 'Authorization: Bearer <{role} token>'")
        return gw

    dependency.__doc__ = f"The gateway, when the request carries the {role} token. {why}"
    return dependency


installer = _bearer("installer", "A gateway never runs its installer functions open.")
InstallerDep = Annotated[Gateway, Depends(installer)]
support = _bearer(
    "support",
    "Not the installer's: a survey contractor holds that one, and members' visits are none of their business.",
)
SupportDep = Annotated[Gateway, Depends(support)]

REFUSALS: dict[int | str, dict[str, Any]] = {
    code: {"model": InstallerRefusal, "description": what}
    for code, what in (
        (401, "No or a wrong installer token."),
        (403, "No installer token is configured on this gateway."),
        (404, "No survey tag configured (survey.transmitter), or no such spot."),
        (409, "A spot is still recording, or there is nothing to apply."),
        (422, "The spot lies in no inside zone, or a value is out of range."),
    )
}


def router() -> APIRouter:
    """The installer endpoints; `create_app` includes them and maps SurveyRefused to its status."""
    r = APIRouter(prefix="/api/v1/survey", tags=["installer"], responses=REFUSALS)

    @r.get("", response_model=SurveyStatus)
    async def survey(gw: InstallerDep) -> Any:
        """The survey: the spot being recorded, the spots recorded, the map in use (docs/survey.md)."""
        return gw.survey_status()

    @r.get("/plan", response_model=SurveyPlan)
    async def plan(gw: InstallerDep) -> Any:
        """The store plan (zones, receivers, walls, doors), for the survey page's map of where to stand."""
        p = gw.settings.plan
        return SurveyPlan(
            zones=[PlanZone(id=z.id, name=z.name, outside=z.outside, polygon=list(z.polygon)) for z in p.zones],
            receivers=[PlanReceiver(id=r.id, zone=r.zone, position=r.position) for r in p.receivers],
            walls=[PlanWall(name=w.name, points=list(w.points)) for w in p.walls],
            doors=list(p.doors),
            min_packets=gw.settings.survey.min_packets,
        )

    @r.post("/spots", status_code=202, response_model=SurveyStatus)
    async def spot(body: SpotRequest, gw: InstallerDep) -> Any:
        """Start recording the survey tag at (x, y) for `seconds`; poll GET /api/v1/survey until it is done."""
        return gw.survey_spot(body.x, body.y, body.seconds)

    @r.delete("/spots/{index}", response_model=SurveyStatus)
    async def discard(index: Annotated[int, Path(ge=0, description="The spot's index.")], gw: InstallerDep) -> Any:
        """Forget a recorded spot (recorded at the wrong place, or with the tag in a pocket)."""
        return gw.survey_discard(index)

    @r.post("/apply", response_model=SurveyApplied)
    async def apply(gw: InstallerDep) -> Any:
        """Fit the map from the recorded spots, save it in the data directory and use it from the next second."""
        return gw.survey_apply()

    return r


def support_router() -> APIRouter:
    """Support staff's endpoint, behind the support token; `create_app` includes it."""
    responses: dict[int | str, dict[str, Any]] = {
        401: {"model": InstallerRefusal, "description": "No or a wrong support token."},
        403: {"model": InstallerRefusal, "description": "No support token is configured on this gateway."},
    }
    responses[422] = {"description": "Not a member ref, or a query value out of range (the API's validation answer)."}
    r = APIRouter(prefix="/api/v1/members", tags=["support"], responses=responses)

    @r.get("/{member}/points", response_model=PointsExplained)
    async def points(
        member: MemberRef,
        gw: SupportDep,
        visit: Annotated[str | None, Query(max_length=64, description="Only this visit id.")] = None,
        limit: Annotated[int, Query(ge=1, le=100, description="Newest N visits (1..100).")] = 10,
    ) -> Any:
        """Why each rule did or did not award the member's visits (what `visita points explain` prints): open visits
        judged as they stand, then finished ones, newest first, with the rules in force. Visits older than the
        ledger the running engine holds (at least 9 days) say "not judged again"; `visita points explain` with the
        gateway stopped reads the whole ledger."""
        return gw.explain_points(member, visit, limit)

    return r


def refused(_request: Request, exc: Exception) -> JSONResponse:
    """SurveyRefused as its status and one-line message."""
    assert isinstance(exc, SurveyRefused)
    return _refusal(exc.status, exc.message)
