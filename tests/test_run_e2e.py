"""`visita run --sim` end to end: the real CLI process, a real Mosquitto, a paho subscriber."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from conftest import VISITA, Broker, Subscriber, free_port

from firmware_sim.world import member_keys
from gateway.store import Store
from sensors.checkins import sign

MAC = re.compile(r"(?i)\b(?:[0-9a-f]{2}:){5}[0-9a-f]{2}\b")
ENVELOPE_KEYS = {"schema", "id", "ts", "store", "gateway", "seq", "data"}
UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
PREFIX = "visita/v1/demo-store/gw-1/"


def sim_member_keys(seed: int = 1, members: int = 400) -> list[str]:
    """The simulator's member keys for a seed, as hex: none may ever appear in output."""
    keys = [hashlib.sha256(f"visita-sim/{seed}/member/{i}".encode()).hexdigest() for i in range(members)]
    return keys + [hashlib.sha256(f"visita-sim/{seed}/staff-{i}".encode()).hexdigest() for i in (1, 2)]


def run_args(broker_url: str, data_dir: Path, until: str = "20m") -> list[str]:
    return [
        *VISITA,
        "run",
        "--sim",
        "--speed",
        "60",
        "--until",
        until,
        "--mqtt",
        broker_url,
        "--dashboard",
        "off",
        "--data-dir",
        str(data_dir),
    ]


def last_seq(stdout: str) -> int:
    m = re.search(r"last event seq (\d+)", stdout)
    assert m, f"no 'last event seq' in output:\n{stdout}"
    return int(m.group(1))


def stream(sub: Subscriber) -> dict[str, dict[str, object]]:
    """Durable-stream events received, de-duplicated by id (as consumers do)."""
    return {str(p["id"]): p for _, p, _ in sub.snapshot() if p.get("seq") is not None}


def wait_for_seqs(sub: Subscriber, n: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seqs = sorted(int(str(p["seq"])) for p in stream(sub).values())
        if len(seqs) >= n:
            return seqs
        time.sleep(0.1)
    return sorted(int(str(p["seq"])) for p in stream(sub).values())


def outbox(data_dir: Path) -> int:
    """Events still waiting in a stopped gateway's outbox."""
    with Store(data_dir) as store:
        return len(store.pending_events())


def assert_private(text: str) -> None:
    assert not MAC.search(text), f"a Bluetooth address leaked: {MAC.search(text)}"
    for key in sim_member_keys():
        assert key not in text, "a member key leaked"


def test_run_sim_publishes_valid_gapless_events(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker)
    proc = subprocess.run(run_args(broker.url, tmp_path / "data"), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    n = last_seq(proc.stdout)
    seqs = wait_for_seqs(sub, n)
    sub.close()
    assert seqs == list(range(1, n + 1)), "seq must increase without gaps and every event must arrive"

    events = stream(sub).values()
    kinds = {str(e["schema"]) for e in events}
    assert {"visita.visit.started/1", "visita.visit.ended/1", "visita.points.awarded/1"} <= kinds
    for topic, payload, _ in sub.snapshot():
        assert set(payload) == ENVELOPE_KEYS, payload
        event_type = str(payload["schema"]).removeprefix("visita.").removesuffix("/1")
        assert topic == PREFIX + event_type
        assert UUID7.match(str(payload["id"]))
        assert payload["store"] == "demo-store" and payload["gateway"] == "gw-1"
        datetime.fromisoformat(str(payload["ts"]))
        assert isinstance(payload["data"], dict)
    awards = [e["data"] for e in events if e["schema"] == "visita.points.awarded/1"]
    assert all(isinstance(a, dict) and a["points"] > 0 and a["member"] for a in awards)
    ended = [e["data"] for e in events if e["schema"] == "visita.visit.ended/1"]
    assert all(isinstance(v, dict) and v["dwell_s"] >= 0 and v["path"] for v in ended)
    started = {e["data"]["visit_id"] for e in events if e["schema"] == "visita.visit.started/1"}  # type: ignore[index]
    assert started <= {v["visit_id"] for v in ended}, "a clean stop ends every open visit"  # type: ignore[index]

    # The retained status: online at start, offline after the clean stop.
    statuses = [p["data"] for t, p, _ in sub.snapshot() if t == PREFIX + "status"]
    assert statuses[-1] == {  # the demo store has six receivers: zones
        "state": "offline",
        "version": statuses[-1]["version"],  # type: ignore[index]
        "role": "gateway",
        "resolution": "zones",
    }
    online = {"state": "online", "version": statuses[0]["version"], "role": "gateway", "resolution": "zones"}  # type: ignore[index]
    assert online in statuses

    everything = json.dumps([p for _, p, _ in sub.snapshot()]) + proc.stdout + proc.stderr
    everything += (tmp_path / "data" / "visita.json").read_text()
    assert_private(everything)
    assert outbox(tmp_path / "data") == 0, "every acknowledged event leaves the outbox"


def test_broker_outage_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker, client_id="outage-subscriber")
    proc = subprocess.Popen(
        run_args(broker.url, tmp_path / "data"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while len(stream(sub)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stream(sub)) >= 3, "no events before the outage"
        broker.stop()
        time.sleep(5)  # five minutes of simulated store traffic with no broker
        broker.start()
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    n = last_seq(out)
    seqs = wait_for_seqs(sub, n)
    sub.close()
    assert seqs == list(range(1, n + 1)), f"missing seqs: {sorted(set(range(1, n + 1)) - set(seqs))[:20]}"
    outage_lines = [line for line in err.splitlines() if "WARNING" in line and "MQTT broker" in line]
    assert len(outage_lines) == 1, f"the outage must be reported once: {outage_lines}"
    assert "kept in the outbox" in outage_lines[0]
    assert outbox(tmp_path / "data") == 0


def test_unreachable_broker_keeps_running_and_next_start_sends_the_backlog(broker: Broker, tmp_path: Path) -> None:
    data = tmp_path / "data"
    nowhere = f"mqtt://127.0.0.1:{free_port()}"
    first = subprocess.run(run_args(nowhere, data, until="10m"), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    unreachable = [line for line in first.stderr.splitlines() if "unreachable" in line]
    assert len(unreachable) == 1, first.stderr
    queued = outbox(data)
    assert queued > 0 and f"{queued} still queued" in first.stdout
    n1 = last_seq(first.stdout)

    sub = Subscriber(broker, client_id="backlog-subscriber")
    second = subprocess.run(run_args(broker.url, data, until="2m"), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    n2 = last_seq(second.stdout)
    assert n2 >= n1, "seq continues across restarts"
    seqs = wait_for_seqs(sub, n2)
    sub.close()
    assert seqs == list(range(1, n2 + 1)), "the first run's backlog and the second run's events all arrive"


def _checkin(port: int, member: str, key: bytes) -> dict[str, object]:
    obj: dict[str, object] = {
        "member": member,
        "store": "demo-store",
        "ts": int(time.time()),
        "nonce": os.urandom(16).hex(),
    }
    obj["sig"] = sign(key, obj)
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/checkins", json.dumps(obj).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 201
        answer: dict[str, object] = json.loads(r.read())
    return answer


def test_a_members_visit_goes_on_across_a_sigterm_restart_and_ends_once(broker: Broker, tmp_path: Path) -> None:
    member, key = next(iter(member_keys(1, 400, 2).items()))
    data, port = tmp_path / "data", free_port()
    sub = Subscriber(broker, client_id="restart-subscriber")

    def gateway(*extra: str) -> tuple[subprocess.Popen[str], str]:
        """The gateway, once its banner is printed (the store is open and the dashboard listens); what it printed."""
        args = [*VISITA, "run", "--sim", "--mqtt", broker.url, "--dashboard", f"127.0.0.1:{port}", "--data-dir"]
        proc = subprocess.Popen([*args, str(data), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        head = ""
        for line in proc.stdout:
            head += line
            if line.startswith("Ctrl-C stops"):
                return proc, head
        raise AssertionError(f"the gateway exited before its banner: {head}{proc.communicate()[0]}")

    first, _ = gateway()
    try:
        visit_id = str(_checkin(port, member, key)["visit_id"])
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out
    second, head = gateway("--until", "5s")  # the same real time (speed 1): back within visits.resume_within_s
    out = head + second.communicate(timeout=60)[0]
    assert second.returncode == 0, out
    assert "visits open before the restart: 1 go on" in out, out

    deadline = time.monotonic() + 30

    def mine() -> list[tuple[str, str]]:
        return sorted({(str(p["id"]), str(p["schema"])) for p in stream(sub).values()
                       if isinstance(p["data"], dict) and p["data"].get("visit_id") == visit_id})  # fmt: skip

    while len([s for _, s in mine() if s == "visita.visit.ended/1"]) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    sub.close()
    kinds = [s for _, s in mine()]
    assert kinds.count("visita.visit.started/1") == 1 and kinds.count("visita.visit.ended/1") == 1, kinds
    awards = [p["data"] for p in stream(sub).values() if p["schema"] == "visita.points.awarded/1"]
    rules = [a["rule"] for a in awards if isinstance(a, dict) and a["visit_id"] == visit_id]
    assert sorted(rules) == sorted(set(rules)) and "checkin" in rules, rules


def test_a_simulation_faster_than_the_machine_runs_as_fast_as_it_can_and_stops_at_once(tmp_path: Path) -> None:
    """`--speed` beyond what the pipeline can do must not build a backlog of data time: a stop would have to process
    all of it in one step (minutes, and memory growing by the second: seen with --speed 500 on the supermarket)."""
    args = [*VISITA, "run", "--sim", "--scenario", "supermarket", "--speed", "10000", "--until", "3h", "--mqtt", "off",
            "--dashboard", "off", "--data-dir", str(tmp_path / "data"), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        slow = proc.stderr.readline()  # the first warning (or nothing: the 3 h ran at full speed and it is over)
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - stopping
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "the simulation cannot run at --speed 10000 on this machine: it runs as fast as the pipeline can" in slow
    assert took < 15, f"the stop took {took:.0f} s"
    assert "stopped: last event seq" in out, out


def test_a_faster_than_real_time_simulation_goes_on_from_its_data_directory_in_its_scenarios_time_zone(
    tmp_path: Path,
) -> None:
    """Started again on the same data directory, a --speed run went back to the wall clock: every kept visit ended,
    the last hour counted entries from its future, and footfall minutes were published twice. It goes on from the
    directory's data time, on the scenario's days (the supermarket is in Berlin)."""
    args = [*VISITA, "run", "--sim", "--scenario", "supermarket", "--speed", "2000", "--mqtt", "off",
            "--dashboard", "off", "--data-dir", str(tmp_path / "data")]  # fmt: skip
    first = subprocess.run([*args, "--until", "20m"], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([*args, "--until", "1m"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    (line,) = [x for x in second.stdout.splitlines() if x.startswith("  source")]
    held = re.search(r"going on from (\S+ \S+) (\S+) \(the data directory's time\)", line)
    assert held and held.group(2) in ("CET", "CEST"), line
    # 20 simulated minutes after the first run's start, in Berlin time: ahead of the wall clock.
    going_on = datetime.fromisoformat(held.group(1)).replace(tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
    assert going_on > time.time()
    # The banner names the command that writes this world's ground truth: its world starts where the run goes on.
    (truth,) = [x for x in second.stdout.splitlines() if x.startswith("  truth")]
    start = re.search(r"visita sim supermarket --seed 1 --start (\S+) --out DIR", truth)
    assert start and abs(datetime.fromisoformat(start.group(1)).timestamp() - going_on) < 1, truth


def test_a_clock_held_back_is_the_simulations_own_only() -> None:
    """A rehearsal's clock follows an emulated BlueZ whose phones compute member tokens from their own time: held
    back, its data time would drift from theirs. Only `visita run --sim`'s clock (simulation=True) is held back, and
    not at speed 1, where data time is the wall clock."""
    from gateway.runtime import Clock

    t = time.time() - 100
    assert Clock(60, start=t).hold_back(t + 5) is False
    assert Clock(1).hold_back(t) is False and Clock(1, simulation=True).hold_back(t) is False
    sim = Clock(60, start=t, simulation=True)
    assert sim.hold_back(t + 5) is True and abs(sim.now() - (t + 5)) < 1


def test_a_real_time_simulation_started_again_does_not_claim_to_go_on_from_the_data_directory(tmp_path: Path) -> None:
    args = [*VISITA, "run", "--sim", "--until", "2s", "--mqtt", "off", "--dashboard", "off", "--data-dir",
            str(tmp_path / "d")]  # fmt: skip
    for _ in range(2):
        r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "going on from" not in r.stdout, r.stdout


def test_a_live_run_on_a_clock_behind_its_own_data_says_what_that_costs(tmp_path: Path) -> None:
    """A Pi that booted on a stale clock and has not reached NTP: the data directory holds data from after "now"."""
    data = tmp_path / "data"
    ahead = time.time() + 3 * 3600
    with Store(data) as store:
        store.keep(lambda: {"data_until": ahead})
        store.keep_now()
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"}  # no radio needed for this
    args = [*VISITA, "run", "--ble", "--mqtt", "off", "--dashboard", "off", "--until", "2s", "--clock-wait", "0",
            "--data-dir", str(data)]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"the clock looks 10[78]\d\d s behind\. While it is wrong, members' phones are not recognised",
                     proc.stderr), proc.stderr  # fmt: skip
    assert "timedatectl" in proc.stderr


def test_the_truth_command_of_a_scenario_file_names_the_file(tmp_path: Path) -> None:
    """`--scenario FILE`: the banner's `visita sim` command is given the file, as `visita sim` needs it (the name
    inside the file is no shipped scenario's, or worse, one whose world is not this one)."""
    from gateway.cli import __file__ as cli_file

    shipped = Path(cli_file).parent.parent / "firmware_sim" / "scenarios" / "small-shop.toml"
    scenario = tmp_path / "my shop.toml"
    scenario.write_text(shipped.read_text().replace('name = "small-shop"', 'name = "my-shop"', 1))
    args = [*VISITA, "run", "--sim", "--scenario", str(scenario), "--speed", "100", "--until", "10s", "--mqtt",
            "off", "--dashboard", "off", "--data-dir", str(tmp_path / "data")]  # fmt: skip
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (truth,) = [x for x in r.stdout.splitlines() if x.startswith("  truth")]
    command = re.search(r"visita sim (.+) --out DIR", truth)
    assert command, truth
    sim = subprocess.run(
        [*VISITA, "sim", *shlex.split(command.group(1)), "--duration", "1m", "--out", str(tmp_path / "truth")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sim.returncode == 0, (truth, sim.stderr)
