"""App check-ins under load: sustained rate and latency from the request to `points.awarded` on a real broker.

Starts a private mosquitto on a free loopback port, imports `--members` member keys with `visita keys import`,
runs `visita run --sim` (the demo store's BLE traffic keeps the pipeline busy meanwhile) with the uplink on that
broker, then sends signed check-ins over HTTP at `--rate` per second for `--seconds`, each for a member who has
not checked in yet (so each one earns points). A QoS 1 subscriber stamps every `points.awarded`; the latency of
a check-in is from just before its request is written to the first `points.awarded` of its member.

Printed: check-ins sent and accepted, the achieved rate, HTTP answer latency p50/p99, request → points.awarded
latency p50/p99/max, the gateway's CPU time per check-in, and whether p99 met the target (`--target-ms`, 50).

Run from the repository root: ``.venv/bin/python benchmarks/checkin_bench.py [--rate 200] [--seconds 20]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from sensors.checkins import sign

STORE = "demo-store"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def wait_ready(port: int, proc: subprocess.Popen[Any], timeout: float = 60.0) -> None:
    """Until the gateway's token tables (current window and both neighbours) are built and its uplink is up: the
    first tick builds them at once (about 1 s for 100,000 members), which is start-up, not check-in latency."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"visita run exited with {proc.returncode}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/api/v1/status")
            status = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        if status["members"]["tables"] >= 3 and status["uplink"].get("connected"):
            time.sleep(0.5)
            return
        time.sleep(0.1)
    raise RuntimeError(f"the gateway was not ready (token tables, uplink) within {timeout} s")


def subscriber(port: int, ready: Any, stop: Any, results: Any) -> None:
    """Child process: stamp (CLOCK_MONOTONIC, shared by every process) the first points.awarded per member."""
    received: dict[str, float] = {}
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="checkin-bench")

    def on_connect(c: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
        c.subscribe("visita/v1/+/+/points.awarded", qos=1)

    def on_subscribe(c: mqtt.Client, u: object, mid: int, rcs: object, p: object) -> None:
        ready.set()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        t = time.monotonic()
        received.setdefault(json.loads(msg.payload)["data"]["member"], t)

    sub.on_connect, sub.on_subscribe, sub.on_message = on_connect, on_subscribe, on_message
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    stop.wait()
    sub.loop_stop()
    sub.disconnect()
    results.put(received)


def cpu_s(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far, seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0, help="check-ins per second (default 200)")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long to send (default 20)")
    ap.add_argument("--members", type=int, default=0, help="members provisioned (default: rate × seconds + 100)")
    ap.add_argument(
        "--senders",
        type=int,
        default=32,
        help="HTTP connections sending in parallel (default 32; fewer cannot offer the rate once an answer takes "
        "longer than senders / rate: 8 at 200/s is 40 ms)",
    )
    ap.add_argument("--target-ms", type=float, default=50.0)
    ap.add_argument("--profile", type=Path, metavar="FILE", help="run the gateway under cProfile, stats to FILE")
    ap.add_argument("--gateway-log", type=Path, metavar="FILE", help="keep the gateway's stderr here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    n = int(args.rate * args.seconds)
    members = max(args.members, n + 100)
    root = Path(__file__).resolve().parent.parent
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

    with tempfile.TemporaryDirectory(prefix="visita-checkin-bench-") as tmp:
        work = Path(tmp)
        mport, dport = free_port(), free_port()
        (work / "mosquitto.conf").write_text(
            f"listener {mport} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\nuser root\n"
        )
        broker = subprocess.Popen(
            [mosquitto, "-c", str(work / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        gateway: subprocess.Popen[str] | None = None
        try:
            wait_port(mport, broker, "mosquitto")
            keys = {f"bench-{i:06d}": secrets.token_bytes(32) for i in range(members)}
            keyfile = work / "members.jsonl"
            keyfile.write_text("".join(json.dumps({"member": r, "key": k.hex()}) + "\n" for r, k in keys.items()))
            data = work / "data"
            visita = [sys.executable, "-m", "gateway.cli"]
            subprocess.run([*visita, "keys", "import", str(keyfile), "--data-dir", str(data)], check=True, cwd=root)

            # The subscriber runs in its own process: in this one it would wait for the GIL behind the senders.
            ctx = multiprocessing.get_context("fork")
            ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
            sub = ctx.Process(target=subscriber, args=(mport, ready, stop, results))
            sub.start()
            if not ready.wait(10):
                raise RuntimeError("subscriber could not subscribe")
            lock = threading.Lock()

            profile = ["-m", "cProfile", "-o", str(args.profile.resolve())] if args.profile else []
            gateway = subprocess.Popen(
                [
                    sys.executable,
                    *profile,
                    "-m",
                    "gateway.cli",
                    "run",
                    "--sim",
                    "--data-dir",
                    str(data),
                    "--mqtt",
                    f"mqtt://127.0.0.1:{mport}",
                    "--dashboard",
                    f"127.0.0.1:{dport}",
                    "--log-level",
                    "warning",
                ],
                cwd=root,
                stdout=subprocess.DEVNULL,
                stderr=open(args.gateway_log or work / "gateway.log", "w"),  # noqa: SIM115  # the child keeps it
                text=True,
            )
            wait_port(dport, gateway, "visita run")
            wait_ready(dport, gateway)  # steady state: token tables built, uplink connected

            refs = list(keys)[:n]
            cpu0 = cpu_s(gateway.pid)
            sent: dict[str, float] = {}
            http_ms: list[float] = []
            codes: dict[int, int] = {}
            t_start = time.monotonic()

            def sender(k: int) -> None:
                conn = http.client.HTTPConnection("127.0.0.1", dport, timeout=10)
                for i in range(k, n, args.senders):
                    due = t_start + i / args.rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    ref = refs[i]
                    obj: dict[str, Any] = {
                        "member": ref,
                        "store": STORE,
                        "ts": int(time.time()),
                        "nonce": secrets.token_hex(16),
                    }
                    obj["sig"] = sign(keys[ref], obj)
                    payload = json.dumps(obj).encode()
                    t0 = time.monotonic()
                    conn.request("POST", "/api/v1/checkins", payload, {"content-type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                    t1 = time.monotonic()
                    with lock:
                        sent[ref] = t0
                        http_ms.append((t1 - t0) * 1000)
                        codes[resp.status] = codes.get(resp.status, 0) + 1
                conn.close()

            threads = [threading.Thread(target=sender, args=(k,)) for k in range(args.senders)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            t_sent = time.monotonic() - t_start
            time.sleep(3)  # the last awards on their way
            cpu_used = cpu_s(gateway.pid) - cpu0
            stop.set()
            received: dict[str, float] = results.get(timeout=30)
            sub.join(10)
            lat = [(received[r] - sent[r]) * 1000 for r in sent if r in received]
            missing = sum(1 for r in sent if r not in received)
        finally:
            if gateway is not None and gateway.poll() is None:
                gateway.send_signal(signal.SIGINT)
                try:
                    gateway.wait(30)
                except subprocess.TimeoutExpired:
                    gateway.kill()
            broker.terminate()
            broker.wait(10)

    out = {
        "rate_target": args.rate,
        "sent": len(sent),
        "answers": {str(k): v for k, v in sorted(codes.items())},
        "achieved_per_s": round(len(sent) / t_sent, 1),
        "http_p50_ms": round(statistics.median(http_ms), 2),
        "http_p99_ms": round(pct(http_ms, 99), 2),
        "to_points_awarded_p50_ms": round(statistics.median(lat), 2) if lat else None,
        "to_points_awarded_p99_ms": round(pct(lat, 99), 2) if lat else None,
        "to_points_awarded_max_ms": round(max(lat), 2) if lat else None,
        "no_points_awarded": missing,
        # The gateway's CPU over the run (its BLE pipeline at speed 1 included), per check-in sent.
        "gateway_cpu_ms_per_checkin": round(cpu_used * 1000 / max(1, len(sent)), 3),
        "cpus": os.cpu_count(),
    }
    ok = bool(lat) and missing == 0 and pct(lat, 99) < args.target_ms
    out["target_met"] = ok
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:28} {v}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
