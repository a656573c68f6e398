"""firmware_sim.world, record and truth: determinism, devices that behave like real ones, truth that holds."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from firmware_sim import frames
from firmware_sim.advlog import AdvertLog
from firmware_sim.geometry import as_polygon, zone_index
from firmware_sim.record import LOG_NAME, TRUTH_NAME, record
from firmware_sim.scenario import load_scenario, shipped
from firmware_sim.truth import read_truth
from firmware_sim.world import World, member_keys
from gateway.config import default_plan
from gateway.decode import decode
from gateway.model import Advert, EddystoneTLM, MemberFrame

START = 1_741_000_000.0  # any whole second


@dataclass
class Run:
    """A recorded run of the demo store, read back: truth objects and the log's records."""

    truth: list[dict[str, Any]]
    t: np.ndarray[Any, Any]
    rx: np.ndarray[Any, Any]
    address: np.ndarray[Any, Any]
    payload: np.ndarray[Any, Any]
    rssi: np.ndarray[Any, Any]
    addresses: list[str]
    payloads: list[Any]
    header: dict[str, Any]

    def people(self) -> list[dict[str, Any]]:
        return [o for o in self.truth if o["type"] == "person"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """40 minutes of the demo store (seed 7), written and read back."""
    out = tmp_path_factory.mktemp("sim")
    record(load_scenario("default"), 7, START, 2400, out)
    truth = list(read_truth(out / TRUTH_NAME))
    with AdvertLog(out / LOG_NAME) as log:
        rec = np.concatenate(list(log.chunks()))
        t = (log.start_ms + rec["t"].astype(np.int64)) / 1000
        return Run(truth, t, rec["rx"], rec["address"], rec["payload"], rec["rssi"], log.addresses, log.payloads,
                   log.header)  # fmt: skip


# --------------------------------------------------------------------------- determinism


def test_the_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    s = load_scenario("small-shop")
    start = s.start_ts() + 4 * 3600
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        record(s, seed, start, 900, tmp_path / name)
    for f in (LOG_NAME, TRUTH_NAME):
        a, b, c = ((tmp_path / d / f).read_bytes() for d in "abc")
        assert a == b, f"{f} differs between two runs with one seed"
        assert a != c, f"{f} is the same for another seed"


def test_the_world_is_the_same_however_it_is_stepped() -> None:
    s = load_scenario("default")
    a, b = World(s, 11, START), World(s, 11, START)
    big = a.advance(START + 300)
    small: list[Advert] = []
    t = START
    while t < START + 300:
        t = min(t + 0.37, START + 300)
        small += b.advance(t)
    assert big == small and len(big) > 1000
    assert all(x.ts <= y.ts for x, y in itertools.pairwise(big)), "time order"
    assert a.advance(START + 300) == [], "nothing twice"


@pytest.mark.parametrize("name", sorted(shipped()))
def test_each_shipped_scenario_runs_and_every_receiver_hears(name: str) -> None:
    s = load_scenario(name)
    w = World(s, 1, s.start_ts() + 5 * 3600)  # early afternoon: every store open
    adverts = w.advance(w.start_ts + 600)
    summary = w.summary()
    assert summary["adverts"] == len(adverts) > 0
    assert all(v > 0 for v in summary["per_receiver"].values()), summary["per_receiver"]
    assert summary["shoppers"] > 0 and summary["pedestrians"] > 0
    heard_beacons = {a.address for a in adverts if not a.address_random}
    assert len(heard_beacons) == len(s.beacons), "every beacon is heard (public address)"


# --------------------------------------------------------------------------- phones and beacons


def owners(run: Run) -> dict[str, tuple[dict[str, Any], float, float]]:
    out = {}
    for p in run.people():
        for a in p["addresses"]:
            out[a["address"]] = (p, a["from"], a["to"] if a["to"] is not None else math.inf)
    return out


def test_every_phone_advert_belongs_to_a_person_present_with_that_address(run: Run) -> None:
    own = owners(run)
    beacons = {o["address"] for o in run.truth if o["type"] == "beacon"}
    ids_seen = np.unique(run.address)
    for a in ids_seen.tolist():
        address = run.addresses[a]
        if address in beacons:
            continue
        p, lo, hi = own[address]
        ts = run.t[run.address == a]
        assert lo - 0.001 <= ts.min() and ts.max() <= hi + 0.001, (address, p["pid"])
        assert p["arrived"] - 0.001 <= ts.min()
        assert p["phone"]


def test_addresses_rotate_about_every_15_minutes(run: Run) -> None:
    jitter = load_scenario("default").phones.address_rotation_jitter
    lifetimes = [
        a["to"] - a["from"]
        for p in run.people()
        for a in p["addresses"][1:-1]  # whole lifetimes: neither the first (begun before) nor the last
    ]
    assert lifetimes and min(lifetimes) >= 900 * (1 - jitter) - 1 and max(lifetimes) <= 900 * (1 + jitter) + 1
    staff = [p for p in run.people() if p["kind"] == "staff"]
    assert all(len(p["addresses"]) >= 3 for p in staff), "40 minutes: at least two rotations"
    # In the output: no address is heard for longer than one lifetime, and a staff phone's member
    # frames come from each of its addresses in turn.
    spans = defaultdict(list)
    for a, t in zip(run.address.tolist(), run.t.tolist(), strict=True):
        spans[a].append(t)
    random_spans = [max(v) - min(v) for a, v in spans.items() if run.addresses[a] in owners(run)]
    assert max(random_spans) <= 900 * (1 + jitter) + 1
    heard = {run.addresses[a] for a in spans}
    for p in staff:
        assert all(a["address"] in heard for a in p["addresses"]), "every address of a staff phone is heard"


def test_ios_app_phones_pause_in_background_gaps_and_android_ones_do_not(run: Run) -> None:
    member_payloads = [i for i, c in enumerate(run.payloads) if frames.VISITA in c.manufacturer_data]
    share: dict[str, list[float]] = {"ios": [], "android": []}
    index = {a: i for i, a in enumerate(run.addresses)}
    for p in run.people():
        if not p["has_app"] or p["kind"] == "staff" or (p["departed"] or 0) - p["arrived"] < 300:
            continue
        ids = [index[a["address"]] for a in p["addresses"] if a["address"] in index]
        ts = np.sort(run.t[np.isin(run.address, ids) & np.isin(run.payload, member_payloads)])
        if len(ts) < 20:
            continue
        gaps = np.diff(ts)
        share[p["platform"]].append(float(gaps[gaps > 5].sum() / (ts[-1] - ts[0])))
    assert len(share["ios"]) >= 5 and len(share["android"]) >= 5
    phones = load_scenario("default").phones
    expected = phones.ios_gap_mean_s / (phones.ios_gap_mean_s + phones.ios_active_mean_s)
    assert float(np.mean(share["ios"])) == pytest.approx(expected, abs=0.12)
    assert float(np.mean(share["android"])) < 0.03


def test_phones_without_the_app_are_only_anonymous_and_app_phones_send_member_frames(run: Run) -> None:
    keys = member_keys(7, 400, 2)
    by_address = owners(run)
    for a, pid in zip(*np.unique(np.stack([run.address, run.payload]), axis=1), strict=True):
        address, content = run.addresses[int(a)], run.payloads[int(pid)]
        if address not in by_address:
            continue
        p = by_address[address][0]
        if frames.VISITA in content.manufacturer_data:
            assert p["has_app"]
            frame = content.manufacturer_data[frames.VISITA]
            window = int(run.t[(run.address == a) & (run.payload == pid)][0] // frames.MEMBER_WINDOW_S)
            assert frame[4:] == frames.member_token(keys[p["member"]], window), "the member's own rotating token"
        else:
            assert set(content.manufacturer_data) <= {frames.APPLE, frames.SAMSUNG}
            assert (frames.APPLE in content.manufacturer_data) == (p["platform"] == "ios")
    non_app = [p for p in run.people() if p["phone"] and not p["has_app"]]
    assert non_app and all(p["member"] is None for p in non_app)


def test_phone_intervals_are_100_ms_to_1_s_log_uniform() -> None:
    w = World(load_scenario("default"), 2, START)
    w.advance(START + 2400)
    streams = [s for p in w.people + list(w.finished) for s in p.streams]
    intervals = np.array([s.interval_s for s in streams])
    assert len(intervals) > 300
    assert intervals.min() >= 0.1 and intervals.max() <= 1.0
    # log-uniform over 100 ms..1 s: quartiles of log10 at -0.75, -0.5, -0.25 (standard error ≈ 0.025)
    assert np.quantile(np.log10(intervals), [0.25, 0.5, 0.75]) == pytest.approx([-0.75, -0.5, -0.25], abs=0.07)


def test_eddystone_tlm_reports_battery_and_growing_counters(run: Run) -> None:
    cfg = load_scenario("default").beacons[1]  # the checkout's Eddystone-UID, TLM every 10th frame
    tlm: list[tuple[float, EddystoneTLM]] = []
    for pid in np.unique(run.payload).tolist():
        c = run.payloads[pid]
        if not c.service_data:
            continue
        frame = decode(Advert(0.0, "rx", "00:00:00:00:00:01", False, -60, None, {}, c.service_data))
        if isinstance(frame, EddystoneTLM):
            tlm.append((float(run.t[run.payload == pid][0]), frame))
    tlm.sort(key=lambda x: x[0])
    assert len(tlm) > 100
    first, last = tlm[0][1], tlm[-1][1]
    assert first.battery_mv == pytest.approx(cfg.battery_mv - cfg.battery_drain_mv_per_day * cfg.uptime_days, abs=1)
    assert all(b.adv_count > a.adv_count and b.uptime_s > a.uptime_s for (_, a), (_, b) in itertools.pairwise(tlm))
    elapsed = tlm[-1][0] - tlm[0][0]
    assert last.uptime_s - first.uptime_s == pytest.approx(elapsed, abs=0.2)
    # one frame per interval plus the 0-10 ms advDelay (5 ms on average)
    assert last.adv_count - first.adv_count == pytest.approx(elapsed / (cfg.interval_ms / 1000 + 0.005), rel=0.01)
    assert all(f.adv_count % cfg.tlm_every == 0 for _, f in tlm)
    assert first.uptime_s == pytest.approx(cfg.uptime_days * 86_400 + (tlm[0][0] - START), abs=1)


# --------------------------------------------------------------------------- ground truth


def test_truth_is_consistent_with_the_positions(run: Run) -> None:
    s = load_scenario("default")
    ids = [z.id for z in s.zones]
    polys = [as_polygon(z.polygon) for z in s.zones]
    inside = set(s.inside_zones())
    people = run.people()
    assert {p["kind"] for p in people} == {"shopper", "pedestrian", "staff"}
    for p in people:
        tr = p["track"]
        t = tr["t0"] + tr["step"] * np.arange(len(tr["x"]))
        z = zone_index(np.array(tr["x"]), np.array(tr["y"]), polys)
        runs = p["zones"]
        assert runs[0][1] == pytest.approx(p["arrived"], abs=0.01)
        assert all(a[2] == b[1] for a, b in itertools.pairwise(runs)), "zone runs are contiguous"
        for ti, zi in zip(t.tolist(), z.tolist(), strict=True):
            here = [r[0] for r in runs if r[1] + 0.5 < ti < r[2] - 0.5]
            if here:  # away from a change (runs are at 0.5 s, the track at whole seconds)
                assert here[0] == (ids[zi] if zi >= 0 else None), (p["pid"], ti)
        visit = p["visit"]
        if p["kind"] == "shopper" and (p["complete"] or visit is not None):
            assert p["label"] == "visit" and visit is not None
            inside_runs = [r for r in runs if r[0] in inside]
            assert visit["start"] == inside_runs[0][1] and visit["end"] == inside_runs[-1][2]
            assert all(r[0] in inside for r in visit["zones"])
            assert visit["dwell_s"] == pytest.approx(visit["end"] - visit["start"], abs=0.01)
        elif p["kind"] == "pedestrian":
            assert p["label"] == "pass-by" and visit is None
            assert all(r[0] not in inside for r in runs)
        if p["complete"]:
            assert runs[-1][2] == pytest.approx(p["departed"], abs=0.01)
        if p["has_app"]:
            assert p["member"] is not None and p["member_index"] is not None


def test_truth_summary_and_header(run: Run) -> None:
    header, summary = run.truth[0], run.truth[-1]
    assert header["type"] == "header" and header["scenario"] == "default" and header["seed"] == 7
    assert header["end"] - header["start"] == 2400
    assert summary["type"] == "summary"
    labels = [p["label"] for p in run.people()]
    assert summary["visits"] == labels.count("visit") > 50
    assert summary["pass_bys"] == labels.count("pass-by") > 100
    assert summary["adverts"] == len(run.t)
    assert sum(summary["per_receiver"].values()) == len(run.t)
    for i, rx in enumerate(run.header["receivers"]):
        assert summary["per_receiver"][rx] == int(np.count_nonzero(run.rx == i))
    beacons = [o for o in run.truth if o["type"] == "beacon"]
    assert [b["subject"] for b in beacons] == [b.id for b in default_plan().beacons]
    assert [b["zone"] for b in beacons] == [b.zone for b in default_plan().beacons]


def test_member_windows_roll_over_and_tokens_change(run: Run) -> None:
    windows = {
        run.payloads[p].manufacturer_data[frames.VISITA][2]
        for p in np.unique(run.payload).tolist()
        if frames.VISITA in run.payloads[p].manufacturer_data
    }
    assert len(windows) >= 3, "40 minutes span three or four 15-minute windows"
    frame = next(c.manufacturer_data[frames.VISITA] for c in run.payloads if frames.VISITA in c.manufacturer_data)
    assert isinstance(decode(Advert(0.0, "r", "40:00:00:00:00:01", True, -60, None, {frames.VISITA: frame})),
                      MemberFrame)  # fmt: skip
