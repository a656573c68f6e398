"""Measure the real bleak path against the emulated BlueZ: latency, throughput, memory under a flood.

Three measurements, each with a private dbus-daemon:

- latency: emulator and `BleSource` in one process; one advert at a time, from the
  emulator's `deliver` (the D-Bus signal is sent) to bleak's callback in `BleSource`
  (the Advert is stamped); median and p99.
- throughput: the emulator in its own process (`python -m firmware_sim.bluez`) sends
  `--phones` phones at `--phone-hz` each; `BleSource` in this process counts what arrives;
  printed: signals sent, adverts received per second, this process's CPU share.
- flood: the emulator floods new random addresses at 10,000 per (emulator) minute, run
  `--speed` times faster, for `--periods` minutes; after each minute this process's RSS,
  Python heap (tracemalloc) and bleak's caches are printed. Bounded memory means the
  figures stop growing after the first minute.

Run from the repository root: ``.venv/bin/python benchmarks/ble_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from firmware_sim.bluez import AdapterSpec, BusDaemon, EmulatedBluez, EmulatorControl
from gateway.model import Advert
from sensors.ble import BleOptions, BleSource

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    """Resident set size of this process, MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def wait_scanning(src: BleSource, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(a["state"] == "scanning" for a in src.diagnostics()["adapters"].values()):
            return
        await asyncio.sleep(0.02)
    raise RuntimeError(f"not scanning: {src.diagnostics()}")


async def latency(n: int) -> dict[str, float]:
    with BusDaemon() as daemon:
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = daemon.address
        emu = EmulatedBluez(daemon.address, [AdapterSpec("hci0", "rx-1")])
        await emu.start()
        src = BleSource(BleOptions(adapters=(("hci0", "rx-1"),)), time.perf_counter)
        await src.start()
        await wait_scanning(src)
        sent: dict[int, float] = {}
        lat: list[float] = []
        i = 0
        while len(lat) < n:
            i += 1
            mfr = {0xFFFF: b"\x56\x01" + i.to_bytes(4, "big")}
            sent[i] = time.perf_counter()
            emu.deliver([Advert(time.time(), "rx-1", "C0:FF:EE:00:00:01", False, -60, None, mfr)])
            deadline = time.perf_counter() + 0.2  # the first ones go before BlueZ activated the monitor
            while time.perf_counter() < deadline:
                got = src.poll(time.perf_counter())
                if got:
                    seq = int.from_bytes(got[-1].manufacturer_data[0xFFFF][2:], "big")
                    lat.append((got[-1].ts - sent[seq]) * 1000)
                    break
                await asyncio.sleep(0)
        await src.stop()
        await emu.stop()
    lat.sort()
    return {"adverts": n, "median_ms": statistics.median(lat), "p99_ms": lat[int(len(lat) * 0.99) - 1]}


async def start_emulator(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim.bluez", *args], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    if not line.startswith("DBUS_SYSTEM_BUS_ADDRESS="):
        proc.kill()
        raise RuntimeError(f"emulator did not start: {line!r}")
    return proc, line.strip().split("=", 1)[1]


def stop_emulator(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=10)
    if proc.poll() is None:
        proc.kill()


async def throughput(phones: int, hz: float, seconds: float) -> dict[str, Any]:
    proc, address = await start_emulator(["--beacons", "0", "--phones", str(phones), "--phone-hz", str(hz)])
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    src = BleSource(BleOptions(adapters=(("hci0", "rx-1"),)), time.time)
    try:
        await src.start()
        await wait_scanning(src)
        await asyncio.sleep(1.0)
        async with EmulatorControl(address) as ctl:
            s0 = (await ctl.stats())["signals"]
        n0, c0, t0 = src.diagnostics()["adverts"], time.process_time(), time.monotonic()
        while time.monotonic() - t0 < seconds:
            src.poll(time.time())
            await asyncio.sleep(0.1)
        n1, c1, t1 = src.diagnostics()["adverts"], time.process_time(), time.monotonic()
        async with EmulatorControl(address) as ctl:
            s1 = (await ctl.stats())["signals"]
        dropped = src.diagnostics()["dropped"]
    finally:
        await src.stop()
        stop_emulator(proc)
    return {
        "offered_per_s": phones * hz,
        "signals_per_s": round((s1 - s0) / (t1 - t0)),
        "received_per_s": round((n1 - n0) / (t1 - t0)),
        "gateway_cpu": f"{(c1 - c0) / (t1 - t0):.0%}",
        "dropped": dropped,
    }


def bleak_objects() -> int:
    """Objects in bleak's BlueZ manager cache (private; for this measurement only)."""
    from bleak.backends.bluezdbus import manager

    return sum(len(m._properties) for m in manager._global_instances.values())


async def flood(speed: float, periods: int) -> list[dict[str, Any]]:
    proc, address = await start_emulator(["--speed", str(speed), "--beacons", "3"])
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    src = BleSource(BleOptions(adapters=(("hci0", "rx-1"),), expected_beacons=3), time.time)
    rows: list[dict[str, Any]] = []
    try:
        await src.start()
        await wait_scanning(src)
        tracemalloc.start()
        async with EmulatorControl(address) as ctl:
            for minute in range(1, periods + 1):
                await ctl.flood("hci0", 10_000, 60.0)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 60.0 / speed:
                    src.poll(time.time())
                    await asyncio.sleep(0.05)
                d = src.diagnostics()
                rows.append(
                    {
                        "minute": minute,
                        "adverts": d["adverts"],
                        "rss_mb": round(rss_mb(), 1),
                        "heap_mb": round(tracemalloc.get_traced_memory()[0] / 1e6, 1),
                        "bluez_devices": (await ctl.stats())["adapters"]["hci0"]["devices"],
                        "bleak_objects": bleak_objects(),
                        "bleak_seen_devices": d["adapters"]["hci0"]["bleak_seen_devices"],
                        "dropped": d["dropped"],
                    }
                )
        tracemalloc.stop()
    finally:
        await src.stop()
        stop_emulator(proc)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latency-n", type=int, default=2000)
    p.add_argument("--phones", type=int, default=1000)
    p.add_argument("--phone-hz", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--speed", type=float, default=6.0, help="flood: emulator minutes run this much faster")
    p.add_argument("--periods", type=int, default=4, help="flood: minutes of flood")
    p.add_argument("--only", choices=["latency", "throughput", "flood"])
    args = p.parse_args()
    if args.only in (None, "latency"):
        print("latency (deliver -> BleSource callback):", asyncio.run(latency(args.latency_n)), flush=True)
    if args.only in (None, "throughput"):
        print("throughput:", asyncio.run(throughput(args.phones, args.phone_hz, args.seconds)), flush=True)
    if args.only in (None, "flood"):
        print(f"flood, 10,000 new addresses per minute at {args.speed:g}x:", flush=True)
        for row in asyncio.run(flood(args.speed, args.periods)):
            print("  ", row, flush=True)


if __name__ == "__main__":
    main()
