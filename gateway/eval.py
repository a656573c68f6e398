"""`visita eval`: a simulated store with ground truth through the pipeline, scored (docs/estimation.md).

The simulator (firmware_sim) plays a scenario in-process; its adverts go through the gateway's own
decode and identify stages once, and the sightings feed two estimator + visit tracker pairs side by
side: the configured estimator ("ours", the HMM where the plan has geometry) and the baseline
(strongest receiver with hysteresis). Both are scored against what really happened.

Subjects are linked to people the way docs/advert-log.md describes: `member:<ref>` is the person
with that member ref at that time, `anon:<hash>` is the keyed hash of one of a person's addresses
(the identifier is given a fixed salt here, so the hashes can be recomputed from the truth).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
import numpy.typing as npt

from firmware_sim.scenario import Scenario, scenario_plan
from firmware_sim.truth import person_record
from firmware_sim.world import World
from gateway.config import EstimateConfig, PlanConfig, SurveyConfig, VisitsConfig
from gateway.days import LocalDays
from gateway.decode import Decoder
from gateway.estimate import REORDER_S, Estimator, StrongestReceiver, make_estimator
from gateway.handover import HandoverLinker
from gateway.identity import Identifier, MemberDirectory
from gateway.model import Sighting, SubjectLink, Visit, ZoneEstimate
from gateway.survey import SurveyMap, SurveyRecorder
from gateway.visits import VisitTracker, link_subjects

SALT = b"visita-eval-salt-not-secret-0001"
"""The identifier's salt in evaluation, so anonymous subjects can be linked to the truth's addresses."""

HOLD_S = 15.0
"""An estimate says where a subject is for at most this long after its time (zone accuracy)."""
MIN_ZONE_STAY_S = 10.0
"""Zone stays shorter than this (walking through a zone) are left out of dwell errors, change delays and
the main path distance; `path_edit_distance_all_mean` keeps them."""

METRIC_KEYS = (
    "zone_accuracy",
    "inside_outside_accuracy",
    "visit_precision",
    "visit_recall",
    "visit_f1",
    "visits_reported",
    "visits_true",
    "visits_split",
    "visits_unlinked",
    "passby_as_visit_rate",
    "dwell_error_median_pct",
    "dwell_error_p90_pct",
    "dwell_error_median_s",
    "dwell_error_p90_s",
    "visit_dwell_error_median_pct",
    "zone_change_delay_median_s",
    "zone_changes_detected",
    "path_edit_distance_mean",
    "path_edit_distance_all_mean",
    "position_error_median_m",
    "position_error_p90_m",
)


@dataclass(slots=True)
class _Track:
    """What one estimator said about one subject: estimate times, zones, inside flags, positions (NaN: none),
    report times."""

    ts: list[float] = field(default_factory=list)
    zone: list[str] = field(default_factory=list)
    inside: list[bool] = field(default_factory=list)
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)
    reported: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _Pipeline:
    name: str
    estimator: Estimator
    tracker: VisitTracker
    linker: HandoverLinker | None = None
    tracks: dict[str, _Track] = field(default_factory=dict)
    visits: list[Visit] = field(default_factory=list)
    wall_s: float = 0.0

    def step(self, sightings: list[Sighting], now: float, links: list[SubjectLink] | None = None) -> None:
        t0 = time.perf_counter()
        changes = link_subjects(self.estimator, self.tracker, self.linker, links or [])
        estimates = self.estimator.update(sightings, now)
        changes += self.tracker.update(estimates, now)
        if self.linker is not None:
            self.linker.observe(sightings)
            for link in self.linker.update(estimates, now):
                changes += self.tracker.link(link)
        self.wall_s += time.perf_counter() - t0
        self._record(estimates, now)
        self.visits += [c.visit for c in changes if c.kind == "ended"]

    def _record(self, estimates: list[ZoneEstimate], now: float) -> None:
        for e in estimates:
            tr = self.tracks.get(e.subject)
            if tr is None:
                tr = self.tracks[e.subject] = _Track()
            tr.ts.append(e.ts)
            tr.zone.append(e.zone)
            tr.inside.append(e.inside)
            tr.x.append(math.nan if e.x is None else e.x)
            tr.y.append(math.nan if e.y is None else e.y)
            tr.reported.append(now)


def anon_subject(address: str) -> str:
    """The subject the evaluation's identifier gives an anonymous address (same hash as gateway.identity)."""
    return "anon:" + hmac.new(SALT, address.encode(), hashlib.sha256).hexdigest()[:16]


def levenshtein(a: list[str], b: list[str]) -> int:
    """Edit distance between two zone sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def _dedup(zones: list[str]) -> list[str]:
    out: list[str] = []
    for z in zones:
        if not out or out[-1] != z:
            out.append(z)
    return out


@dataclass(frozen=True, slots=True)
class SurveyRun:
    """A simulated site survey to run before the evaluation (`visita eval --survey`)."""

    spacing_m: float
    """Grid spacing of the spots, m."""
    seconds: float = 20.0
    """Time the installer stands (turning) at each spot, s."""
    config: SurveyConfig | None = None
    """How the map is fitted ([survey]); None: the defaults. Its transmitter is the simulated tag's."""


def run_survey(
    scenario: Scenario, seed: int, before: float, plan: PlanConfig, estimate: EstimateConfig, run: SurveyRun
) -> tuple[SurveyMap, dict[str, Any]]:
    """The installer's survey of the scenario's store (same seed: same static shadowing), finished by `before`,
    through the gateway's decode and identify stages into a SurveyRecorder; the fitted map and run facts."""
    from firmware_sim.survey import survey_world

    wall0 = time.monotonic()
    world, planned, tag = survey_world(scenario, seed, run.spacing_m, run.seconds, before)
    decoder = Decoder()
    identifier = Identifier(MemberDirectory(), LocalDays(scenario.timezone), salt_source=lambda: SALT)
    recorder = SurveyRecorder(plan, tag)
    t = world.start_ts
    end = planned[-1].start + planned[-1].seconds + 1.0
    for spot in planned:
        while t < spot.start:  # walking to the spot: the tag's packets then go nowhere
            t = min(t + 1.0, spot.start)
            recorder.observe(identifier.identify(decoder.decode_batch(world.advance(t))))
        recorder.start_spot(spot.x, spot.y, spot.seconds, t)
    while t < end:
        t = min(t + 1.0, end)
        recorder.observe(identifier.identify(decoder.decode_batch(world.advance(t))))
    recorder.status(end)
    cfg = (run.config or SurveyConfig()).model_copy(update={"transmitter": tag})
    survey = SurveyMap(plan, recorder.spots(), cfg, estimate, tag)
    facts = {
        "spacing_m": run.spacing_m,
        "spot_seconds": run.seconds,
        "spots": len(recorder.spots()),
        "installer_s": round(end - 1.0 - world.start_ts, 1),
        "wall_s": round(time.monotonic() - wall0, 2),
        "offsets_db": survey.offsets(),
    }
    return survey, facts


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def evaluate(
    scenario: Scenario,
    seed: int,
    duration_s: float,
    start: float | None = None,
    *,
    estimate: EstimateConfig | None = None,
    visits: VisitsConfig | None = None,
    plan: PlanConfig | None = None,
    tick_s: float = 1.0,
    progress: Callable[[float], None] | None = None,
    survey: SurveyRun | None = None,
) -> dict[str, Any]:
    """Simulate, run both pipelines, score them; one dict with METRIC_KEYS, per-zone figures (`zones`), `baseline`
    (the same keys) and run facts.

    With `survey`, a simulated site survey of the same store is run first (it ends when the scored run
    starts) and the configured estimator uses its map; the baseline does not (run.survey has its facts)."""
    wall0 = time.monotonic()
    est_cfg = estimate or EstimateConfig()
    visits_cfg = visits or VisitsConfig()
    plan = plan or scenario_plan(scenario)
    world = World(scenario, seed, scenario.start_ts() if start is None else start)
    survey_map: SurveyMap | None = None
    survey_facts: dict[str, Any] | None = None
    if survey is not None:
        survey_map, survey_facts = run_survey(scenario, seed, world.start_ts, plan, est_cfg, survey)
    visits_cfg = visits_cfg.model_copy(update={"staff": sorted({*visits_cfg.staff, *world.staff_refs})})
    members = MemberDirectory()
    members.set_members(world.member_keys)
    decoder = Decoder()
    identifier = Identifier(members, LocalDays(scenario.timezone), salt_source=lambda: SALT)
    linker = HandoverLinker(plan.doors) if visits_cfg.handover else None
    ours = _Pipeline("ours", make_estimator(plan, est_cfg, survey_map), VisitTracker("eval", visits_cfg), linker)
    base = _Pipeline("baseline", StrongestReceiver(plan, est_cfg), VisitTracker("eval", visits_cfg))
    end = world.start_ts + duration_s
    people: list[Any] = []
    adverts = 0
    t = world.start_ts
    ticks = max(1, math.ceil(duration_s / tick_s))
    sim_wall = 0.0
    for i in range(1, ticks + 1):
        t = min(world.start_ts + i * tick_s, end)
        w0 = time.perf_counter()
        batch = world.advance(t)
        sim_wall += time.perf_counter() - w0
        adverts += len(batch)
        sightings = identifier.identify(decoder.decode_batch(batch))
        links = identifier.take_links()
        ours.step(sightings, t, links)
        base.step(sightings, t, links)
        people += world.pop_finished()
        if progress is not None and i % 600 == 0:
            progress(i / ticks)
    # Let both decide what they have seen (the HMM's lag) and close every session.
    flush = end + est_cfg.lag_s + REORDER_S + 1.0
    ours.step([], flush)
    base.step([], flush)
    closing = flush + visits_cfg.absence_timeout_s + 1.0
    ours.step([], closing)
    base.step([], closing)
    people += world.people
    truth = [person_record(world, p, end) for p in people if p.t0 < end]
    inside_zones = {z.id for z in scenario.zones if not z.outside}
    zones = [z.id for z in scenario.zones]
    result: dict[str, Any] = _score(ours, truth, zones, inside_zones, end, visits_cfg.min_dwell_s)
    result["baseline"] = _score(base, truth, zones, inside_zones, end, visits_cfg.min_dwell_s)
    result["run"] = {
        "scenario": scenario.name,
        "seed": seed,
        "start": world.start_ts,
        "duration_s": duration_s,
        "tick_s": tick_s,
        "adverts": adverts,
        "people": len(truth),
        "shoppers": sum(1 for p in truth if p["kind"] == "shopper"),
        "pedestrians": sum(1 for p in truth if p["kind"] == "pedestrian"),
        "estimator": ours.estimator.diagnostics(),
        "survey": survey_facts,
        "estimator_wall_s": round(ours.wall_s, 2),
        "baseline_wall_s": round(base.wall_s, 2),
        "simulator_wall_s": round(sim_wall, 2),
        "wall_s": round(time.monotonic() - wall0, 2),
    }
    return result


def _subjects_of(p: dict[str, Any]) -> list[tuple[str, float, float]]:
    """The subjects a person appears as, with the time range of each."""
    end = p["departed"] if p["departed"] is not None else math.inf
    out: list[tuple[str, float, float]] = []
    if p["member"] is not None:
        out.append(("member:" + p["member"], p["arrived"], end))
    for a in p["addresses"]:
        out.append((anon_subject(a["address"]), a["from"], a["to"] if a["to"] is not None else end))
    return out


def _score(
    pipe: _Pipeline,
    truth: list[dict[str, Any]],
    zones: list[str],
    inside_zones: set[str],
    end: float,
    min_dwell_s: float,
) -> dict[str, Any]:
    by_subject: dict[str, list[int]] = {}
    for i, p in enumerate(truth):
        if p["phone"]:
            for subject, _a, _b in _subjects_of(p):
                by_subject.setdefault(subject, []).append(i)
    tracks = {s: (np.array(tr.ts), tr) for s, tr in pipe.tracks.items()}
    positions = {s: (np.array(tr.x), np.array(tr.y)) for s, tr in pipe.tracks.items()}

    # ---- zone accuracy: subject-seconds in the right zone (inside truth, or while the gateway has an estimate)
    right = total = io_right = 0
    zone_right: dict[str, int] = {}
    zone_total: dict[str, int] = {}
    pos_err: list[npt.NDArray[np.float64]] = []  # inside seconds: estimated position's distance from the truth, m
    for p in truth:
        if not p["phone"]:
            continue
        track = p["track"]
        track_x, track_y = np.array(track["x"]), np.array(track["y"])
        subject_ranges = (
            [("member:" + p["member"], p["arrived"], math.inf)]
            if p["member"] is not None
            else [(anon_subject(a["address"]), a["from"], a["to"] or math.inf) for a in p["addresses"]]
        )
        for zone, z0, z1 in p["zones"]:
            if zone is None:
                continue
            secs = np.arange(math.ceil(z0), math.floor(min(z1, end)) + 1e-9, 1.0)
            if not len(secs):
                continue
            got = np.full(len(secs), None, dtype=object)
            got_inside = np.full(len(secs), None, dtype=object)
            for subject, a0, a1 in subject_ranges:
                entry = tracks.get(subject)
                if entry is None:
                    continue
                ts, tr = entry
                sel = (secs >= a0) & (secs < a1)
                if not sel.any():
                    continue
                j = np.searchsorted(ts, secs[sel], side="right") - 1
                ok = (j >= 0) & (secs[sel] - ts[np.maximum(j, 0)] <= HOLD_S)
                zs = np.array(tr.zone, dtype=object)[np.maximum(j, 0)]
                ins = np.array(tr.inside, dtype=object)[np.maximum(j, 0)]
                idx = np.nonzero(sel)[0]
                got[idx[ok]] = zs[ok]
                got_inside[idx[ok]] = ins[ok]
                if zone in inside_zones:
                    k = np.rint((secs[sel] - track["t0"]) / track["step"]).astype(np.int64)
                    k = np.clip(k, 0, len(track_x) - 1)
                    jj = np.maximum(j, 0)
                    ex, ey = (a[jj] for a in positions[subject])
                    d = np.hypot(ex - track_x[k], ey - track_y[k])[ok]
                    pos_err.append(d[~np.isnan(d)])
            counted = np.array([g is not None for g in got]) | (zone in inside_zones)
            n_right = int(sum(1 for g in got[counted] if g == zone))
            total += int(counted.sum())
            right += n_right
            zone_total[zone] = zone_total.get(zone, 0) + int(counted.sum())
            zone_right[zone] = zone_right.get(zone, 0) + n_right
            io_right += int(sum(1 for g in got_inside[counted] if g is not None and g == (zone in inside_zones)))

    # ---- visits: link each reported visitor visit to the person it overlaps most
    reported = [v for v in pipe.visits if v.classification == "visitor"]
    linked: dict[int, list[Visit]] = {}
    false_pos = 0
    for v in reported:
        v_end = v.ended if v.ended is not None else end
        best, best_overlap = -1, 0.0
        for i in by_subject.get(v.subject, []):
            p = truth[i]
            p_end = p["departed"] if p["departed"] is not None else end
            overlap = min(v_end, p_end) - max(v.started, p["arrived"])
            if overlap > best_overlap:
                best, best_overlap = i, overlap
        if best < 0:
            false_pos += 1
        else:
            linked.setdefault(best, []).append(v)
    # A shopper who walked in shortly before the end of the run, with less than the minimum dwell inside by then,
    # is no visit yet by any definition the gateway could apply: left out of recall (and a visit reported for
    # them is not held against precision), counted as `visits_censored`.
    censored = {
        i
        for i, p in enumerate(truth)
        if p["label"] == "visit" and p["phone"] and (p["visit"] is None or p["visit"]["dwell_s"] < min_dwell_s)
    }
    true_visits = [i for i, p in enumerate(truth) if p["label"] == "visit" and p["phone"] and i not in censored]
    true_visits_set = set(true_visits)
    tp = sum(1 for i in true_visits if i in linked)

    def extra(i: int, vs: list[Visit]) -> int:
        """False positives among the visits linked to person i: every one beyond the first of a true visit (a
        split: an address rotation), every one of a pedestrian; none of staff or of a censored visit."""
        if truth[i]["label"] == "staff" or i in censored:
            return 0
        return len(vs) - (1 if truth[i]["label"] == "visit" else 0)

    fp = false_pos + sum(extra(i, vs) for i, vs in linked.items())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / len(true_visits) if true_visits else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    walkers = [i for i, p in enumerate(truth) if p["label"] == "pass-by" and p["phone"]]
    passby_as_visit = sum(1 for i in walkers if i in linked)

    # ---- dwell per zone, visit dwell, paths, zone-change delays (true visits that were found)
    dwell_pct: list[float] = []
    dwell_s: list[float] = []
    zone_dwell_pct: dict[str, list[float]] = {}
    zone_dwell_sum: dict[str, list[float]] = {}  # per zone: seconds found minus true, true seconds
    visit_pct: list[float] = []
    paths: list[int] = []
    paths_all: list[int] = []
    delays: list[float] = []
    changes_total = 0
    for i in true_visits:
        if i not in linked:
            continue
        p, vs = truth[i], linked[i]
        tv = p["visit"]
        true_zone: dict[str, float] = {}
        for zone, z0, z1 in tv["zones"]:
            true_zone[zone] = true_zone.get(zone, 0.0) + (z1 - z0)
        got_zone: dict[str, float] = {}
        for v in vs:
            for zone, d in v.zone_dwell().items():
                got_zone[zone] = got_zone.get(zone, 0.0) + d
        for zone, d in true_zone.items():
            if d >= MIN_ZONE_STAY_S:
                err = abs(got_zone.get(zone, 0.0) - d)
                dwell_s.append(err)
                dwell_pct.append(100.0 * err / d)
                zone_dwell_pct.setdefault(zone, []).append(100.0 * err / d)
                sums = zone_dwell_sum.setdefault(zone, [0.0, 0.0])
                sums[0] += got_zone.get(zone, 0.0) - d
                sums[1] += d
        got_total = sum(v.dwell_s for v in vs)
        if tv["dwell_s"] > 0:
            visit_pct.append(100.0 * abs(got_total - tv["dwell_s"]) / tv["dwell_s"])
        got_path = _dedup([z for v in sorted(vs, key=lambda v: v.started) for z in v.path])
        paths_all.append(levenshtein(_dedup([z for z, _a, _b in tv["zones"]]), got_path))
        paths.append(levenshtein(_dedup([z for z, a, b in tv["zones"] if b - a >= MIN_ZONE_STAY_S]), got_path))
        # Zone changes between stays of at least MIN_ZONE_STAY_S (outside zones too: entering and leaving).
        stays = [(z, a, b) for z, a, b in p["zones"] if z is not None and b - a >= MIN_ZONE_STAY_S]
        subjects = {s for s, _a, _b in _subjects_of(p)}
        for (z_from, _a, _b), (z_to, t_change, _c) in pairwise(stays):
            if z_from == z_to:
                continue
            changes_total += 1
            first = math.inf
            for subject in subjects:
                entry = tracks.get(subject)
                if entry is None:
                    continue
                ts, tr = entry
                j0 = int(np.searchsorted(ts, t_change - MIN_ZONE_STAY_S))
                j1 = int(np.searchsorted(ts, t_change + 60.0))
                for j in range(j0, j1):
                    if tr.zone[j] == z_to:
                        first = min(first, tr.reported[j])
                        break
            if math.isfinite(first):
                delays.append(first - t_change)

    errs = np.concatenate(pos_err).tolist() if pos_err else []

    def r(x: float | None, nd: int = 3) -> float | None:
        return None if x is None else round(x, nd)

    return {
        "zone_accuracy": r(right / total if total else 0.0, 4),
        "inside_outside_accuracy": r(io_right / total if total else 0.0, 4),
        "visit_precision": r(precision, 4),
        "visit_recall": r(recall, 4),
        "visit_f1": r(f1, 4),
        "visits_reported": len(reported),
        "visits_true": len(true_visits),
        "visits_censored": len(censored),
        "visits_split": sum(len(vs) - 1 for i, vs in linked.items() if i in true_visits_set),
        "visits_unlinked": false_pos,
        "passby_as_visit_rate": r(passby_as_visit / len(walkers) if walkers else 0.0, 4),
        "dwell_error_median_pct": r(_pct(dwell_pct, 50), 1),
        "dwell_error_p90_pct": r(_pct(dwell_pct, 90), 1),
        "dwell_error_median_s": r(_pct(dwell_s, 50), 1),
        "dwell_error_p90_s": r(_pct(dwell_s, 90), 1),
        "visit_dwell_error_median_pct": r(_pct(visit_pct, 50), 1),
        "zone_change_delay_median_s": r(_pct(delays, 50), 1),
        "zone_changes_detected": r(len(delays) / changes_total if changes_total else 0.0, 3),
        "path_edit_distance_mean": r(float(np.mean(paths)) if paths else None, 3),
        "path_edit_distance_all_mean": r(float(np.mean(paths_all)) if paths_all else None, 3),
        "position_error_median_m": r(_pct(errs, 50), 2),
        "position_error_p90_m": r(_pct(errs, 90), 2),
        "zones": {
            zone: {
                "seconds": zone_total.get(zone, 0),
                "accuracy": r(zone_right[zone] / zone_total[zone], 4) if zone_total.get(zone) else None,
                "zone_visits": len(zone_dwell_pct.get(zone, [])),
                "dwell_error_median_pct": r(_pct(zone_dwell_pct.get(zone, []), 50), 1),
                "dwell_bias_pct": r(100.0 * zone_dwell_sum[zone][0] / zone_dwell_sum[zone][1], 1)
                if zone in zone_dwell_sum
                else None,
            }
            for zone in zones
        },
    }


LABELS = (
    ("zone_accuracy", "zone accuracy (subject-seconds in the right zone)", "pct"),
    ("inside_outside_accuracy", "inside/outside right", "pct"),
    ("visit_precision", "visit precision", "f"),
    ("visit_recall", "visit recall", "f"),
    ("visit_f1", "visit F1", "f"),
    ("visits_reported", "visits reported / true (with a phone)", "pair"),
    ("visits_split", "extra visits from one true visit (split)", "f"),
    ("visits_unlinked", "visits matching nobody", "f"),
    ("passby_as_visit_rate", "pass-bys counted as visits", "pct"),
    ("dwell_error_median_pct", "dwell error per zone visit, median", "dwell"),
    ("dwell_error_p90_pct", "dwell error per zone visit, p90", "dwell"),
    ("visit_dwell_error_median_pct", "visit dwell error, median", "pctv"),
    ("zone_change_delay_median_s", "zone change reported after, median", "s"),
    ("zone_changes_detected", "zone changes detected", "pct"),
    ("path_edit_distance_mean", "path edit distance, mean (stays >= 10 s)", "f"),
    ("path_edit_distance_all_mean", "path edit distance, mean (every zone)", "f"),
    ("position_error_median_m", "position error inside, median", "m"),
    ("position_error_p90_m", "position error inside, p90", "m"),
)


def _cell(result: dict[str, Any], key: str, kind: str) -> str:
    v = result.get(key)
    if kind == "pair":
        return f"{result['visits_reported']} / {result['visits_true']}"
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.1f} %"
    if kind == "pctv":
        return f"{v:.1f} %"
    if kind == "signed":
        return f"{v:+.1f} %"
    if kind == "dwell":
        return f"{v:.1f} % ({result[key.replace('_pct', '_s')]:.0f} s)"
    if kind == "s":
        return f"{v:.1f} s"
    if kind == "m":
        return f"{v:.1f} m"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def format_table(result: dict[str, Any]) -> str:
    """The figures for people: ours and the baseline side by side."""
    run = result["run"]
    est = run["estimator"]
    lines = [
        f"{run['scenario']} seed {run['seed']}: {run['duration_s'] / 60:g} min of simulated time, "
        f"{run['adverts']:,} adverts, {run['shoppers']} shoppers, {run['pedestrians']} pedestrians; "
        f"estimator {est['estimator']} (resolution {est['resolution']}) in {run['estimator_wall_s']:.1f} s, "
        f"baseline in {run['baseline_wall_s']:.1f} s, total {run['wall_s']:.1f} s",
    ]
    sv = run.get("survey")
    if sv is not None:
        lines.append(
            f"site survey first (ours only): {sv['spots']} spots {sv['spacing_m']:g} m apart, "
            f"{sv['spot_seconds']:g} s each, {sv['installer_s'] / 60:.0f} min of installer time"
        )
    lines += [
        f"{'':44s} {'ours':>18s} {'baseline':>18s}",
    ]
    for key, label, kind in LABELS:
        lines.append(f"{label:44s} {_cell(result, key, kind):>18s} {_cell(result['baseline'], key, kind):>18s}")
    lines += [
        "",
        "per zone, ours: the true zone's seconds (outside zones: where ours had an estimate), the share right (and",
        "the baseline's, over its own seconds), zone visits, dwell error median, dwell bias (found minus true dwell,",
        "summed over the zone visits, of the true dwell)",
        f"{'zone':16s} {'seconds':>8s} {'right':>8s} {'baseline':>9s} {'zone visits':>12s} {'dwell error':>12s} "
        f"{'dwell bias':>11s}",
    ]
    for zone, z in result["zones"].items():
        base = result["baseline"]["zones"][zone]
        lines.append(
            f"{zone:16s} {z['seconds']:8d} {_cell(z, 'accuracy', 'pct'):>8s} {_cell(base, 'accuracy', 'pct'):>9s} "
            f"{z['zone_visits']:12d} {_cell(z, 'dwell_error_median_pct', 'pctv'):>12s} "
            f"{_cell(z, 'dwell_bias_pct', 'signed'):>11s}"
        )
    return "\n".join(lines)


def cmd_eval(args: Any) -> int:
    """visita eval SCENARIO: simulate with ground truth, run both estimators, print the scores."""
    import json
    import sys

    from firmware_sim.scenario import load_scenario
    from gateway.config import load_settings

    scenario = load_scenario(args.scenario)
    settings = load_settings(args.config) if args.config else None
    skip = 7200.0 if args.skip is None else args.skip

    def progress(done: float) -> None:
        if not args.json:
            print(f"visita eval: {done:4.0%}", file=sys.stderr, flush=True)

    result = evaluate(
        scenario,
        args.seed,
        args.duration,
        scenario.start_ts() + skip,
        estimate=settings.estimate if settings else None,
        visits=settings.visits if settings else None,
        tick_s=args.tick,
        progress=progress,
        survey=None
        if args.survey is None
        else SurveyRun(args.survey, args.survey_seconds, settings.survey if settings else None),
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0
