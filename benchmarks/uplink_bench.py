"""Backlog drain rate: events per second from the outbox to PUBACK on loopback.

For each size N a store is seeded with N queued events (as after an outage), a private
mosquitto is started on a free loopback port, and the uplink drains the outbox the way the
runtime does it: every tick (`--tick`, default 0.1 s) it acks what the broker acknowledged,
commits, and feeds the uplink from `Store.sendable`; PUBACKs refill the in-flight window
between ticks. Printed per size: drain time, events/s, ticks, the median commit time while
draining (the outbox shrinks from N to 0, so the first commits are the dearest), and the
rate limit in force (`--max-rate`, mqtt.max_rate).

Run from the repository root (mosquitto must be installed):
``.venv/bin/python benchmarks/uplink_bench.py`` (default sizes 10000,100000).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gateway.config import MqttConfig, parse_mqtt_url
from gateway.events import EventFactory
from gateway.store import Store
from gateway.uplink import Uplink

T0 = 1_764_000_000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nuser root\nlog_dest none\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.01)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def bench(root: Path, size: int, max_rate: int, max_inflight: int, tick: float) -> dict[str, float]:
    data = root / f"n{size}"
    factory = EventFactory("store-0042", "gw-0042-a", 0)
    store = Store(data, outbox_max=max(size, 20_000))
    batch = []
    for i in range(size):
        batch.append(
            factory.make(
                "visit.ended",
                T0 + i,
                {"visit_id": f"v{i:08d}", "subject": "anon:0123456789abcdef", "dwell_s": 321.5, "path": ["a", "b"]},
            )
        )
        if len(batch) == 5000:
            store.put_events(batch)
            batch = []
    store.put_events(batch)
    store.commit()

    broker, port = start_broker(root)
    cfg = MqttConfig(url=f"mqtt://127.0.0.1:{port}", max_rate=max_rate, max_inflight=max_inflight)
    up = Uplink(cfg, parse_mqtt_url(cfg.url), f"bench-{size}", lambda on: factory.status(time.time(), on, "bench"))
    commits: list[float] = []
    ticks = 0
    try:
        up.start()
        deadline = time.monotonic() + 10
        while not up.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        while store.diagnostics()["outbox_depth"]:
            store.ack_events(up.take_acks())
            t = time.perf_counter()
            store.commit()
            commits.append((time.perf_counter() - t) * 1000.0)
            up.feed(store.sendable)
            ticks += 1
            time.sleep(tick)
        elapsed = time.perf_counter() - t0
        up.stop(1.0)
    finally:
        broker.kill()
        broker.wait()
        store.close()
    return {
        "events": size,
        "seconds": elapsed,
        "events_per_s": size / elapsed,
        "ticks": ticks,
        "median_commit_ms": statistics.median(commits),
        "max_rate": max_rate,
        "max_inflight": max_inflight,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000", help="comma-separated backlog sizes (default: %(default)s)")
    p.add_argument("--max-rate", type=int, default=MqttConfig().max_rate, help="mqtt.max_rate (default: %(default)s)")
    p.add_argument("--max-inflight", type=int, default=MqttConfig().max_inflight, help="mqtt.max_inflight")
    p.add_argument("--tick", type=float, default=0.1, help="seconds between runtime ticks (default: 0.1)")
    p.add_argument("--dir", type=Path, help="where to create the stores (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="one JSON object per size")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        if not args.json:
            print(f"{'events':>8} {'seconds':>8} {'events/s':>9} {'ticks':>6} {'commit ms':>10} {'max_rate':>9}")
        for size in sizes:
            r = bench(Path(tmp), size, args.max_rate, args.max_inflight, args.tick)
            if args.json:
                print(json.dumps(r))
            else:
                print(
                    f"{size:>8} {r['seconds']:>8.1f} {r['events_per_s']:>9.0f} {r['ticks']:>6.0f} "
                    f"{r['median_commit_ms']:>10.1f} {r['max_rate']:>9}"
                )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
