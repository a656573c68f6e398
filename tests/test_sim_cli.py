"""`visita sim` and `visita run --sim --scenario`, as real processes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import VISITA

from firmware_sim.scenario import shipped


@pytest.mark.parametrize("name", shipped())
def test_the_gateway_runs_every_shipped_scenario_with_a_plan_derived_from_it(name: str, tmp_path: Path) -> None:
    quiet = ["--mqtt", "off", "--dashboard", "off", "--data-dir", str(tmp_path)]
    proc = subprocess.run(
        [*VISITA, "run", "--sim", "--scenario", name, "--speed", "600", "--until", "3m", *quiet],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"simulated store {name!r} (seed 1) at 600x" in proc.stdout
    assert "stopped: last event seq" in proc.stdout


def test_sim_prints_one_summary_line_and_what_it_wrote(tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "run")]
    proc = subprocess.run(
        [*VISITA, "sim", "mall-unit", "--seed", "4", "--duration", "10m", "--start", "2025-03-03T13:00", *out],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stdout.splitlines()
    assert re.match(
        r"mall-unit seed 4: 0h10m00s from 2025-03-03T12:00:00\.000Z simulated in [\d.]+ s · subjects [\d,]+ "
        r"\([\d,]+ people, 1 beacons\) · visits \d+ · pass-bys [\d,]+ · staff 2 · adverts [\d,]+ · "
        r"per receiver: rx-counter [\d,]+, rx-front [\d,]+, rx-fitting [\d,]+$",
        first,
    ), first
    pass_bys = int(re.search(r"pass-bys ([\d,]+)", first).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert pass_bys > 250, "a busy corridor: 2,200 an hour at 13:00"
    assert second.startswith(f"wrote {tmp_path / 'run' / 'adverts.vlog.gz'} (")
    assert (tmp_path / "run" / "truth.jsonl").stat().st_size > 0


def test_sim_without_out_writes_nothing_and_bad_options_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*VISITA, "sim", "small-shop", "--duration", "2m"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and list(tmp_path.iterdir()) == []
    for args, message in (
        (["--start", "noon"], "visita sim: --start 'noon': use an ISO date and time such as 2025-03-03T08:00"),
        (["--duration", "soon"], "'soon' is not a duration"),
        (["--speed", "0"], "must be more than 0"),
        (["--duration", "50d", "--out", str(tmp_path / "long")], "an advert log spans at most 49.7 days"),
        (["--seed", "-1"], "a seed is a whole number from 0"),
    ):
        proc = subprocess.run([*VISITA, "sim", "small-shop", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
