"""Tests for gateway.eval and `visita eval`: the scores' keys and ranges, and the scoring helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from firmware_sim.scenario import load_scenario
from gateway.cli import main
from gateway.eval import METRIC_KEYS, anon_subject, evaluate, levenshtein

SCENARIOS = Path(__file__).parent.parent / "firmware_sim" / "scenarios"
REQUIRED = (
    "zone_accuracy",
    "visit_precision",
    "visit_recall",
    "visit_f1",
    "passby_as_visit_rate",
    "dwell_error_median_pct",
    "dwell_error_p90_pct",
    "zone_change_delay_median_s",
    "path_edit_distance_mean",
)


def test_levenshtein_and_anonymous_subjects() -> None:
    assert levenshtein(["a", "b", "c"], ["a", "c"]) == 1
    assert levenshtein([], ["a", "b"]) == 2
    assert levenshtein(["a", "b"], ["b", "a"]) == 2
    s = anon_subject("12:34:56:78:9A:BC")
    assert s.startswith("anon:") and len(s) == 21 and s == anon_subject("12:34:56:78:9A:BC")


def test_evaluate_scores_both_estimators_on_the_same_run() -> None:
    sc = load_scenario("mall-unit")
    r = evaluate(sc, 2, 420, sc.start_ts() + 7200)
    for result in (r, r["baseline"]):
        assert set(REQUIRED) <= set(result) and set(METRIC_KEYS) <= set(result)
        for key in ("zone_accuracy", "visit_precision", "visit_recall", "visit_f1", "passby_as_visit_rate"):
            assert 0.0 <= result[key] <= 1.0, key
    assert r["run"]["estimator"]["estimator"] == "hmm" and r["run"]["estimator"]["resolution"] == "zones"
    assert r["run"]["pedestrians"] > r["run"]["shoppers"] > 0
    assert r["visits_true"] == r["baseline"]["visits_true"] > 0
    # Positions: the HMM places subjects (a mall unit is 12 m deep), the baseline only names a receiver's zone.
    assert 0.0 < r["position_error_median_m"] <= r["position_error_p90_m"] < 15.0
    assert r["baseline"]["position_error_median_m"] is None
    # Per zone, every zone of the plan: the seconds and right seconds add up to the overall figure; dwell figures
    # only for inside zones; a zone with one zone visit has its error as the size of its bias.
    for result in (r, r["baseline"]):
        zones = result["zones"]
        assert list(zones) == [z.id for z in sc.zones]
        assert all((z["accuracy"] is None) == (z["seconds"] == 0) for z in zones.values())
        seconds = sum(z["seconds"] for z in zones.values())
        right = sum(z["accuracy"] * z["seconds"] for z in zones.values() if z["seconds"])
        assert seconds > 0 and right / seconds == pytest.approx(result["zone_accuracy"], abs=1e-3)
        outside = {z.id for z in sc.zones if z.outside}
        assert all(zones[z]["zone_visits"] == 0 and zones[z]["dwell_bias_pct"] is None for z in outside)
        assert any(z["zone_visits"] for z in zones.values())
        for z in zones.values():
            if z["zone_visits"] == 1:
                assert abs(z["dwell_bias_pct"]) == pytest.approx(z["dwell_error_median_pct"], abs=0.11)


def test_visita_eval_json_takes_a_file_path_as_well_as_a_name(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "shop.toml"
    path.write_text((SCENARIOS / "small-shop.toml").read_text(encoding="utf-8"), encoding="utf-8")
    assert main(["eval", str(path), "--seed", "3", "--duration", "5m", "--skip", "3h", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(REQUIRED) <= set(r) and set(REQUIRED) <= set(r["baseline"])
    assert r["run"]["estimator"]["resolution"] == "inside-outside"  # small-shop has one receiver


def test_visita_eval_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "small-shop", "--duration", "3m", "--skip", "3h"]) == 0
    out = capsys.readouterr().out
    assert "zone accuracy" in out and "baseline" in out and "visit F1" in out
    assert "per zone" in out and "dwell bias" in out
    rows = {line.split()[0] for line in out.splitlines()[-len(load_scenario("small-shop").zones) :]}
    assert rows == {z.id for z in load_scenario("small-shop").zones}
