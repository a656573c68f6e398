"""End to end on the real bleak path: `visita sim default --bluez` + `visita run --ble --rehearse`.

Two processes, as an installer would run them: the simulator plays the default store at 20x
through an emulated BlueZ on a private D-Bus (six adapters, one per receiver), the gateway
scans all six with bleak. The visits it reports are checked against the simulator's ground
truth (the same World, rebuilt here from scenario, seed and start).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.bluez import EmulatorControl
from firmware_sim.scenario import load_scenario
from firmware_sim.truth import person_record
from firmware_sim.world import World
from gateway.store import Store

ROOT = Path(__file__).resolve().parent.parent
VISITA = [sys.executable, "-m", "gateway.cli"]
SPEED = 20
RUN_S = 600  # simulated seconds the gateway listens (30 s of wall time)


def emulator_now(address: str) -> float:
    import asyncio

    async def ask() -> float:
        async with EmulatorControl(address) as ctl:
            return float((await ctl.info())["now"])

    return asyncio.run(ask())


def truth(start: float, end: float) -> list[dict[str, Any]]:
    """Every person the simulator moved up to `end`, as ground truth records."""
    world = World(load_scenario("default"), 1, start)
    world.advance(end)
    return [person_record(world, p, end) for p in [*world.finished, *world.people]]


def test_gateway_on_real_bleak_finds_the_visits_ground_truth_has(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sim = subprocess.Popen(
        [*VISITA, "sim", "default", "--bluez", "--speed", str(SPEED)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert sim.stdout is not None
        first = sim.stdout.readline()
        if not first.startswith("DBUS_SYSTEM_BUS_ADDRESS="):
            sim.kill()
            pytest.fail(f"visita sim --bluez did not start: {first!r} {sim.communicate()[1][-2000:]}")
        address = first.strip().split("=", 1)[1]
        playing = sim.stdout.readline()
        m = re.search(r"from (\d+) at 20x through (.*);", playing)
        assert m, playing
        start = float(m.group(1))
        assert m.group(2).split() == [
            "hci0=rx-entrance",
            "hci1=rx-produce",
            "hci2=rx-bakery",
            "hci3=rx-grocery",
            "hci4=rx-promotions",
            "hci5=rx-checkout",
        ]
        time.sleep(1.0)  # let a minute of the store pass first: people already inside
        g0 = emulator_now(address)
        run = subprocess.run(
            [
                *VISITA,
                "run",
                "--ble",
                "--rehearse",
                "--mqtt",
                "off",
                "--dashboard",
                "off",
                "--until",
                f"{RUN_S}s",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            capture_output=True,
            text=True,
            env={**env, "DBUS_SYSTEM_BUS_ADDRESS": address},
            timeout=120,
        )
        g1 = g0 + RUN_S
    finally:
        sim.send_signal(signal.SIGTERM)
        out, err = sim.communicate(timeout=20)
    assert sim.returncode == 0, err[-2000:]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rehearsing 'default' (seed 1) at 20x" in run.stdout
    assert run.stderr.count("scanning, passive") == 6, run.stderr[-3000:]
    trouble = [line for line in run.stderr.splitlines() if "visita.ble" in line and "WARNING" in line]
    assert not trouble, trouble
    assert re.search(r"adverts [\d,]+ \([\d,]+ D-Bus signals\)", out), out

    with Store(tmp_path / "data") as store:
        events = store.pending_events()  # --mqtt off: every event stays in the outbox
    started = [e.data for e in events if e.type == "visit.started"]
    found = {str(d["member"]) for d in started if d["member"] and d["classification"] == "visitor"}
    staff = {str(d["member"]) for d in started if d["classification"] == "staff"}

    people = truth(start, g1 + 60)
    visited = {r["member"] for r in people if r["member"] and r["label"] == "visit"}
    # Members whose visit began while the gateway listened, early enough to qualify (45 s inside).
    expected = {
        r["member"]
        for r in people
        if r["member"]
        and r["label"] == "visit"
        and g0 <= r["visit"]["start"]
        and r["visit"]["end"] > g0 + 60
        and r["visit"]["start"] < g1 - 120
    }
    passers = {r["member"] for r in people if r["member"] and r["label"] == "pass-by"} - visited
    print(json.dumps({"found": sorted(found), "expected": sorted(expected), "passers": sorted(passers)}))
    assert len(expected) >= 5, "the scenario should bring members in while the gateway listens"
    assert found <= visited, f"member visits ground truth does not have: {found - visited}"
    assert not found & passers, f"app users who only walked past were counted as visits: {found & passers}"
    missed = expected - found
    assert len(missed) <= max(1, len(expected) // 10), f"missed member visits: {missed} of {expected}"
    assert staff == {"staff-1", "staff-2"}


def test_run_ble_without_a_bus_says_so_once_and_keeps_running(tmp_path: Path) -> None:
    """No system bus at all: one clear line, retries, no exit until asked (here --until 3s)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    args = ["run", "--ble", "--mqtt", "off", "--dashboard", "off", "--until", "3s", "--data-dir", str(tmp_path / "d")]
    args += ["--clock-wait", "0"]  # this machine's clock may not be synchronised: no wait for it here
    proc = subprocess.run([*VISITA, *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "no D-Bus system bus" in line]
    assert len(lines) == 1, proc.stderr
    assert f"unix:path={tmp_path}/no-bus" in lines[0] and "retrying" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--ble", "--adapter", "hci0=rx-nowhere"], "--adapter hci0=rx-nowhere: no receiver 'rx-nowhere'"),
        (["run", "--ble", "--adapter", "hci0", "--adapter", "hci1"], "--adapter hci1: say which receiver"),
        (["run", "--ble", "--sim"], "--sim and --ble are two sources: pass one"),
        (["run", "--ble", "--rehearse"], "--rehearse: no emulated BlueZ answers"),
        (["sim", "default", "--bluez", "--out", "x"], "--bluez plays live and writes no recording"),
    ],
)
def test_bad_ble_input_is_one_clear_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}
    proc = subprocess.run([*VISITA, *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_rehearsal_with_a_config_whose_plan_is_not_the_scenarios_is_refused(tmp_path: Path) -> None:
    """The installer rehearses with their own store's config: the emulator plays the scenario's receivers, which
    that plan does not have. Refused naming them, as `visita run --sim` does (it used to run, hearing nothing it
    could place, and report pass-bys only)."""
    cfg = tmp_path / "visita.toml"
    cfg.write_text(
        '[[plan.zones]]\nid = "street"\noutside = true\n[[plan.zones]]\nid = "shop"\n'
        '[[plan.receivers]]\nid = "hci0"\nzone = "shop"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sim = subprocess.Popen(
        [*VISITA, "sim", "default", "--bluez"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert sim.stdout is not None
        first = sim.stdout.readline()
        assert first.startswith("DBUS_SYSTEM_BUS_ADDRESS="), first
        run = subprocess.run(
            [*VISITA, "run", "--ble", "--rehearse", "--config", str(cfg), "--mqtt", "off", "--dashboard", "off",
             "--until", "10s", "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=60,
            env={**env, "DBUS_SYSTEM_BUS_ADDRESS": first.strip().split("=", 1)[1]},
        )  # fmt: skip
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.communicate(timeout=20)
    assert run.returncode == 2, run.stderr[-2000:]
    assert (
        "--rehearse: scenario default: receiver(s) rx-entrance, rx-produce, rx-bakery, rx-grocery, rx-promotions, "
        "rx-checkout are not in the store plan (plan receivers: hci0)" in run.stderr
    ), run.stderr[-2000:]
