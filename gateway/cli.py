"""`visita`: the command line, for people and scripts.

Exit codes: 0 success, 1 failure while running, 2 bad usage or a bad config/rules file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gateway import __version__
from gateway.config import (
    ConfigError,
    PlanConfig,
    Settings,
    check_private,
    format_errors,
    load_sections,
    load_settings,
    parse_duration,
    parse_listen,
    parse_mqtt_url,
    redact_url,
)
from gateway.identity import BeaconRegistry
from gateway.points import load_rules, rules_in_force

if TYPE_CHECKING:
    import ssl

    from firmware_sim.scenario import Scenario
    from gateway.identity import MemberDirectory
    from gateway.runtime import Clock
    from sensors.base import Source
    from sensors.nodes import NodesSource

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
AHEAD_S = 5.0
"""A data directory whose data time is this far ahead of the wall clock came from a run faster than real time."""
HOSTNAME_MISMATCH = 62
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH: the certificate does not name the host it was reached at."""

EPILOG = """exit codes: 0 success, 1 failure while running, 2 bad usage or bad config.
Documentation: docs/ (config.md, events.md, rules.md, frames.md, ble.md, nodes.md, scenarios.md, advert-log.md,
survey.md, install.md)."""


THIRD_PARTY_LOGGERS = ("bleak", "dbus_fast", "asyncio", "paho", "uvicorn", "uvicorn.access", "uvicorn.error")
"""Loggers that never go below WARNING: they would write addresses, payloads or every request."""


class UsageError(Exception):
    """A command-line value that cannot be used; the message names the option."""


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use e.g. 1, 10 or 60") from None
    if not 0 < value <= 10_000:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 and at most 10000")
    return value


def _step(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds; use e.g. 0.5 or 1") from None
    if not 0.01 <= value <= 60:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0.01..60 seconds")
    return value


def _bounded(lo: float, hi: float, unit: str) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {unit}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {lo:g}..{hi:g} {unit}")
        return value

    return parse


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _mqtt(text: str) -> str:
    if text != "off":
        try:
            parse_mqtt_url(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{redact_url(text)!r}: {e}") from None
    return text


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{value}: a seed is a whole number from 0 to 2**63 - 1")
    return value


def add_mqtt_flags(p: argparse.ArgumentParser) -> None:
    """--mqtt-ca, --mqtt-cert, --mqtt-key, --mqtt-username, --mqtt-password-file, --mqtt-protocol (override [mqtt])."""
    p.add_argument("--mqtt-ca", metavar="FILE", help="CA certificate (PEM) for an mqtts:// broker (mqtt.ca)")
    p.add_argument("--mqtt-cert", metavar="FILE", help="client certificate (PEM) for mqtts:// (mqtt.cert)")
    p.add_argument("--mqtt-key", metavar="FILE", help="private key (PEM) of the client certificate (mqtt.key)")
    p.add_argument("--mqtt-username", metavar="NAME", help="MQTT user name (mqtt.username)")
    p.add_argument(
        "--mqtt-password-file", metavar="FILE", help="file holding the MQTT password, first line (mqtt.password_file)"
    )
    p.add_argument("--mqtt-protocol", choices=["5", "3.1.1"], help="MQTT protocol version (mqtt.protocol, default 5)")


def apply_mqtt_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    """Settings with the --mqtt-* flags applied over [mqtt]; ConfigError names a bad combination."""
    flags = {
        "ca": args.mqtt_ca,
        "cert": args.mqtt_cert,
        "key": args.mqtt_key,
        "username": args.mqtt_username,
        "password_file": args.mqtt_password_file,
        "protocol": args.mqtt_protocol,
    }
    update = {k: v for k, v in flags.items() if v is not None}
    if not update:
        return settings
    try:
        mqtt = type(settings.mqtt).model_validate({**settings.mqtt.model_dump(), **update})
    except ValidationError as e:
        raise ConfigError(format_errors("command line", e, type(settings.mqtt))) from None
    for key in ("ca", "cert", "key", "password_file"):
        value = getattr(mqtt, key)
        if value and not Path(value).is_file():
            raise ConfigError([f"--mqtt-{key.replace('_', '-')} {value}: no such file"])
    return settings.model_copy(update={"mqtt": mqtt})


def _listen(text: str) -> str:
    if text != "off":
        try:
            parse_listen(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI."""
    p = argparse.ArgumentParser(
        prog="visita",
        description="Visita: in-store presence gateway for retail loyalty programs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"visita {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run the gateway: source, pipeline, storage, uplink, dashboard",
        description="Run the gateway until stopped (Ctrl-C or SIGTERM flush the outbox first).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="config file (TOML, docs/config.md); default: the demo store",
    )
    run.add_argument("--sim", action="store_true", help="take adverts from the built-in store simulator")
    run.add_argument(
        "--ble",
        action="store_true",
        help="take adverts from the local Bluetooth adapters (bleak on BlueZ; docs/ble.md); keeps retrying "
        "while the bus, bluetoothd or an adapter is missing",
    )
    run.add_argument(
        "--adapter",
        action="append",
        metavar="NAME[=RECEIVER]",
        help="--ble: adapter and the plan receiver it hears for, e.g. hci0=rx-entrance (repeatable; "
        "default hci0 = the plan's first receiver, or with --rehearse hciN = the scenario's receivers in order)",
    )
    run.add_argument(
        "--scan", choices=["auto", "passive", "active"], default="auto", help="--ble: scan mode (default: auto)"
    )
    run.add_argument(
        "--expect-beacons",
        type=int,
        metavar="N",
        help="--ble: fixed beacons every adapter hears; silence is then impossible and the watchdog acts on it "
        "(default: the plan's beacons; 0 disarms it)",
    )
    run.add_argument(
        "--silence", type=float, default=4.0, metavar="SECONDS", help="--ble: watchdog silence threshold (default: 4)"
    )
    run.add_argument(
        "--clock-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="--ble and --nodes: at start, wait this long for the system clock to be synchronised (NTP) when it is "
        "not yet, since until then members' phones are not recognised and check-ins are refused (0: do not wait; "
        "default: 30)",
    )
    run.add_argument(
        "--rehearse",
        action="store_true",
        help="--ble against `visita sim SCENARIO --bluez`: scenario, seed, speed and clock come from that "
        "emulator; the plan (without --config) and the app users' keys from its scenario",
    )
    run.add_argument(
        "--nodes",
        nargs="?",
        const="uplink",
        metavar="URL",
        help="also take remote receivers (ESPresense nodes, other Visita gateways; docs/nodes.md) from this broker "
        "(default: the uplink's broker); alone, they are the only source",
    )
    run.add_argument(
        "--room",
        action="append",
        metavar="ROOM=RECEIVER",
        help="--nodes: an ESPresense node's room and the plan receiver it is (repeatable; default: the room's name)",
    )
    run.add_argument(
        "--relay",
        action="store_true",
        help="with --ble (or --sim, a rehearsal): run as a relay, a remote receiver of the store's main gateway: "
        "decode and identify only, and publish the sightings as batches to the store's broker (--mqtt) every 0.25 s "
        "for the main gateway's --nodes; no visits, points, events or outbox here. Set identity.anon_secret_file to "
        "the same store secret on both Pis, and give both the member keys (docs/nodes.md)",
    )
    run.add_argument("--scenario", default="default", metavar="NAME|FILE", help="simulator scenario (default: default)")
    run.add_argument("--seed", type=_seed, default=1, metavar="N", help="simulator seed (default: 1)")
    run.add_argument(
        "--speed",
        type=_speed,
        default=1.0,
        metavar="X",
        help="simulated time runs X times faster (--sim, or --ble --rehearse against a sim played at X); a --sim "
        "faster than the machine runs as fast as it can, and says so once",
    )
    run.add_argument(
        "--until", type=_duration, metavar="DURATION", help="stop after this much (simulated) time, e.g. 10m"
    )
    run.add_argument("--data-dir", type=Path, metavar="DIR", help="data directory (default: ~/.local/state/visita)")
    run.add_argument("--mqtt", type=_mqtt, metavar="URL|off", help="broker URL, e.g. mqtt://127.0.0.1:1883, or off")
    add_mqtt_flags(run)
    run.add_argument(
        "--dashboard", type=_listen, metavar="HOST:PORT|off", help="dashboard address (default 127.0.0.1:8080)"
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log detail")

    sim = sub.add_parser(
        "sim",
        help="simulate a store: write an advert log and the ground truth",
        description="Play a scenario (docs/scenarios.md) and write the receivers' adverts as an advert log "
        "(docs/advert-log.md) and what really happened as ground truth; prints a summary line.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument("scenario", metavar="SCENARIO", help="a shipped scenario's name or a scenario file")
    sim.add_argument("--seed", type=_seed, default=1, metavar="N", help="random seed (default: 1)")
    sim.add_argument(
        "--duration", type=_duration, metavar="DURATION", help="e.g. 2h (default: 1h; with --bluez: until stopped)"
    )
    sim.add_argument(
        "--start", metavar="TIME", help="ISO date and time to start at (default: the scenario's start, local time)"
    )
    sim.add_argument("--out", type=Path, metavar="DIR", help="write adverts.vlog.gz and truth.jsonl here")
    sim.add_argument("--speed", type=_speed, metavar="X", help="pace at X times real time (default: full speed)")
    sim.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    sim.add_argument(
        "--bluez",
        action="store_true",
        help="play the scenario live through an emulated BlueZ on a private D-Bus (docs/ble.md): prints "
        "DBUS_SYSTEM_BUS_ADDRESS=<address> first, then plays in real time (or --speed X) until stopped; "
        "run `visita run --ble --rehearse` with that variable set",
    )
    sim.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log detail")

    replay = sub.add_parser(
        "replay",
        help="feed a recorded advert log through the pipeline",
        description="Replay an advert log (docs/advert-log.md) through decode, identify, estimate, visits and "
        "points, as fast as it goes or at --speed X; the store plan and member keys come from the log's "
        "scenario unless --config is given.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("log", type=Path, metavar="LOG", help="an advert log, e.g. DIR/adverts.vlog.gz")
    replay.add_argument("--speed", type=_speed, metavar="X", help="pace at X times real time (default: full speed)")
    replay.add_argument(
        "--step",
        type=_step,
        default=1.0,
        metavar="SECONDS",
        help="at full speed, data time per pipeline tick (default: 1; the live gateway ticks every 0.1 s of wall time)",
    )
    replay.add_argument("--config", type=Path, metavar="FILE", help="config file (default: the log's scenario's plan)")
    replay.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="keep the store here (default: a temporary one); one holding data from after the log's start is refused",
    )
    replay.add_argument("--mqtt", type=_mqtt, default="off", metavar="URL|off", help="broker URL (default: off)")
    replay.add_argument("--dashboard", type=_listen, default="off", metavar="HOST:PORT|off", help="(default: off)")
    replay.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log detail")

    ev = sub.add_parser(
        "eval",
        help="score the estimator and visits against a simulated store's ground truth",
        description="Simulate a scenario with ground truth, run the pipeline (decode, identify, estimate, visits) "
        "with the configured estimator and with the baseline (strongest receiver with hysteresis) on the same "
        "adverts, and print zone accuracy, visit precision/recall/F1, pass-bys counted as visits, dwell error per "
        "zone visit, zone-change delay and path edit distance for both, then zone accuracy and dwell error per "
        "zone, which names the zones the receivers serve badly (docs/estimation.md).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("scenario", metavar="SCENARIO", help="a shipped scenario's name or a scenario file")
    ev.add_argument("--seed", type=_seed, default=1, metavar="N", help="random seed (default: 1)")
    ev.add_argument(
        "--duration",
        type=_duration,
        default=1800.0,
        metavar="DURATION",
        help="simulated time to score (default: 30m)",
    )
    ev.add_argument(
        "--skip",
        type=_duration,
        metavar="DURATION",
        help="start this long after the scenario's start (default: 2h, past the quiet opening hour)",
    )
    ev.add_argument("--config", type=Path, metavar="FILE", help="take [estimate] and [visits] from this config file")
    ev.add_argument("--tick", type=_step, default=1.0, metavar="SECONDS", help="pipeline tick, data time (default: 1)")
    ev.add_argument(
        "--survey",
        type=_bounded(0.5, 50, "metres"),
        metavar="SPACING_M",
        help="run a simulated site survey first (spots on a grid this many metres apart) and give its map to the "
        "estimator (docs/survey.md)",
    )
    ev.add_argument(
        "--survey-seconds",
        type=_bounded(3, 600, "seconds"),
        default=20.0,
        metavar="S",
        help="with --survey: seconds the installer stands, turning, at each spot (default: 20)",
    )
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"], help="log detail")

    cfg = sub.add_parser("config", help="check a config file", description="Config file tools.")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    check = cfg_sub.add_parser(
        "check",
        help="validate a config file (and its rules file) without running",
        description="Validate a config file and the files it names (rules, beacon keys, dashboard tokens and "
        "certificate); one line per problem, every problem in one round; exit 2 if any. Notes "
        "say what an installer should know: unserved zones, one receiver, backend rules in force instead of the file.",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="the gateway's data directory, for the backend's rules kept there "
        "(default: the config's; the systemd unit's is /var/lib/visita)",
    )
    check.add_argument(
        "--json", action="store_true", help="print the validated settings as JSON (notes about the plan go to stderr)"
    )

    keys = sub.add_parser("keys", help="member keys", description="Member keys (docs/checkin.md).")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    imp = keys_sub.add_parser(
        "import",
        help="import member keys from JSON lines into the encrypted vault",
        description='Import JSON lines {"member": REF, "key": 64 hex digits, "tier": NAME (optional)} into '
        "DATA_DIR/members.vault (AES-256-GCM; the vault key is the systemd credential visita-vault-key or "
        "DATA_DIR/vault.key, mode 0600). Every member needs a key of its own: a key on two lines, or already "
        "another member's in the vault, is refused. Every bad line is reported with its number and nothing is "
        "changed (exit 2). Refused (exit 1) while a gateway runs on DATA_DIR, which holds the directory and keeps "
        "its member set in memory: stop it, import, and start it again (it loads the vault when it starts), or "
        "have the backend send the members with cmd/members.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("file", type=Path, metavar="FILE", help="JSON lines, or - for standard input")
    imp.add_argument(
        "--config", type=Path, metavar="FILE", help="the gateway's config: its storage.data_dir is the data directory"
    )
    imp.add_argument(
        "--data-dir", type=Path, metavar="DIR", help="data directory (default: --config's, else ~/.local/state/visita)"
    )
    imp.add_argument("--replace", action="store_true", help="replace the whole member set instead of merging")
    imp.add_argument("--json", action="store_true", help="print the result as one JSON object")
    secret = keys_sub.add_parser(
        "new-store-secret",
        help="make a store secret file (identity.anon_secret_file) for the store's gateways",
        description="Write 32 random bytes to FILE (mode 0600; an existing file is never overwritten). Copy the same "
        "file to every gateway of the store (a relay and its main gateway, docs/nodes.md) and set "
        "identity.anon_secret_file to it: their anonymous subjects then agree (one phone heard by both is one "
        "subject that day). Whoever holds the file can compute a day's pseudonym of a Bluetooth address: keep it "
        "like a password, on the gateways only; it is never sent over MQTT (docs/events.md#privacy).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    secret.add_argument("file", type=Path, metavar="FILE", help="where to write it, e.g. /etc/visita/store-secret")

    points = sub.add_parser("points", help="loyalty points", description="Loyalty points (docs/rules.md).")
    points_sub = points.add_subparsers(dest="points_command", metavar="SUBCOMMAND", required=True)
    explain = points_sub.add_parser(
        "explain",
        help="why each rule did or did not award a member's visits",
        description="For a member's visits, newest first, every rule in force with the points it awarded or why it "
        "did not: for support staff answering 'where are my points?'. Run it where the gateway runs. With the "
        "gateway stopped it reads the data directory (finished visits, the whole ledger); while it runs (it holds "
        "the directory) the gateway answers through its API with the support token (--token-file, "
        "$VISITA_SUPPORT_TOKEN, or the config's dashboard.support_token_file), open visits included (at most 100).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("member", metavar="MEMBER_REF", help="the member's ref, as the backend knows it")
    explain.add_argument("--visit", metavar="ID", help="only this visit")
    explain.add_argument("--limit", type=int, default=10, metavar="N", help="newest N visits (default 10)")
    explain.add_argument("--config", type=Path, metavar="FILE", help="config file (for the rules and time zone)")
    explain.add_argument("--data-dir", type=Path, metavar="DIR", help="data directory (default: the config's)")
    explain.add_argument("--json", action="store_true", help="print one JSON object")
    explain.add_argument(
        "--url", metavar="URL", help="ask the gateway at this dashboard address, whatever the data directory"
    )
    explain.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the support token")
    explain.add_argument("--cafile", metavar="FILE", help=CAFILE_HELP)

    survey = sub.add_parser(
        "survey",
        help="site survey for the installer (talks to the running gateway)",
        description="The installer's site survey (docs/survey.md): stand at spots of the plan with the survey tag "
        "(config survey.transmitter), record each, then apply. Talks to the running gateway's installer API with "
        "the installer token (--token-file, $VISITA_INSTALLER_TOKEN, or the config's dashboard.installer_token_file).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    survey_sub = survey.add_subparsers(dest="survey_command", metavar="SUBCOMMAND", required=True)
    sv_status = survey_sub.add_parser("status", help="the spot recording now, the spots recorded, the map in use")
    sv_spot = survey_sub.add_parser("spot", help="record the tag at X Y (metres on the plan) and wait for it")
    sv_spot.add_argument("x", type=float, metavar="X")
    sv_spot.add_argument("y", type=float, metavar="Y")
    sv_spot.add_argument("--seconds", type=float, default=20.0, metavar="S", help="how long (5..120, default 20)")
    sv_spot.add_argument("--no-wait", action="store_true", help="start it and return at once")
    sv_discard = survey_sub.add_parser("discard", help="forget a recorded spot")
    sv_discard.add_argument("index", type=int, metavar="INDEX", help="its index, as `status` shows it")
    sv_apply = survey_sub.add_parser("apply", help="fit the map from the spots, save it, and use it")
    for sp in (sv_status, sv_spot, sv_discard, sv_apply):
        sp.add_argument("--config", type=Path, metavar="FILE", help="config file (dashboard address and token)")
        sp.add_argument("--url", metavar="URL", help="the gateway's dashboard, e.g. http://127.0.0.1:8080")
        sp.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the installer token")
        sp.add_argument("--cafile", metavar="FILE", help=CAFILE_HELP)
        sp.add_argument("--json", action="store_true", help="print the gateway's answer as JSON")

    doctor = sub.add_parser(
        "doctor",
        help="what is wrong with the running gateway, and what to do",
        description="Asks the running gateway for its status (/api/v1/status, no token needed) and checks it: the "
        "Bluetooth adapters and remote receivers (heard lately?), the system clock (synchronised? stepped?), the MQTT "
        "broker (connected? events waiting?), the disk, the fixed beacons' batteries, the member keys, the zone "
        "estimator and survey, the dashboard's certificate. Prints one line per check, and what to do for each "
        "warning and problem.",
        epilog="exit codes: 0 no problem (warnings allowed), 1 a problem or no gateway answering, 2 bad usage.",
    )
    doctor.add_argument("--config", type=Path, metavar="FILE", help="config file (the dashboard's address)")
    doctor.add_argument("--url", metavar="URL", help="the gateway's dashboard, e.g. http://127.0.0.1:8080")
    doctor.add_argument("--cafile", metavar="FILE", help=CAFILE_HELP)
    doctor.add_argument("--json", action="store_true", help="print one JSON object: the checks and their counts")
    return p


CAFILE_HELP = (
    "with an https --url: a certificate (PEM) to trust besides the public ones, e.g. a copy of the gateway's "
    "self-signed dashboard.tls_cert_file"
)


def _gateway_call(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    role: str | None = "installer",
) -> Any:
    """One request to the running gateway's API behind a token: the installer's, or with `role` "support" the support
    token, or with None none (an open endpoint). UsageError / GatewayCallError with its message."""
    import os
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    from gateway.config import read_secret

    settings = load_settings(args.config)
    base, context, pinned = _gateway_address(args, settings, role)
    try:
        if role is None:
            token: str | None = None
        elif args.token_file:
            token = read_secret(str(args.token_file), f"visita-{role}-token", "--token-file")
        elif role == "support":
            token = os.environ.get("VISITA_SUPPORT_TOKEN") or settings.dashboard.support_token()
        else:
            token = os.environ.get("VISITA_INSTALLER_TOKEN") or settings.dashboard.installer_token()
    except ValueError as e:
        raise UsageError(str(e)) from None
    token = token.strip() if token else None
    if not token and role is not None:
        env = "VISITA_SUPPORT_TOKEN" if role == "support" else "VISITA_INSTALLER_TOKEN"
        raise UsageError(f"no {role} token: pass --token-file FILE or set {env}")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("message", e.reason)
        except ValueError:
            message = e.reason
        raise GatewayCallError(f"{e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, ssl.SSLCertVerificationError) and pinned:
            raise GatewayCallError(_pin_failure(base, pinned, reason)) from None
        if isinstance(reason, ssl.SSLCertVerificationError) and reason.verify_code == HOSTNAME_MISMATCH:
            host = urllib.parse.urlsplit(base).hostname
            raise GatewayCallError(
                f"the gateway at {base} presents a certificate that is not for {host} ({reason.verify_message}): "
                "use in --url a name or address the certificate carries (openssl x509 -in CERT -noout -ext "
                "subjectAltName lists them)"
            ) from None
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise GatewayCallError(
                f"the gateway at {base} presents a certificate this machine does not trust ({reason.verify_message}):"
                " pass --cafile with the gateway's certificate (dashboard.tls_cert_file there)"
            ) from None
        if isinstance(reason, ssl.SSLError) and reason.reason == "WRONG_VERSION_NUMBER":
            raise GatewayCallError(
                f"the gateway at {base} does not speak HTTPS ({reason}): if dashboard.tls_cert_file was set since it "
                "started, restart it (systemctl restart visita)"
            ) from None
        if isinstance(reason, ssl.SSLError):
            raise GatewayCallError(f"the TLS handshake with the gateway at {base} failed: {reason}") from None
        if base.startswith("http:") and isinstance(reason, ConnectionResetError):
            raise GatewayCallError(
                f"the gateway at {base} hung up without an answer ({reason}): if it serves HTTPS, name its "
                "certificate in the config's dashboard.tls_cert_file, or use --url https://…"
            ) from None
        raise GatewayCallError(
            f"no gateway answers at {base} ({reason}): is it running? (systemctl status visita)"
        ) from None


def _gateway_address(args: argparse.Namespace, settings: Settings, role: str | None) -> tuple[str, ssl.SSLContext, str]:
    """The running gateway's base URL and the TLS context to reach it with, and the certificate file it is pinned to
    ("" unless it is this machine's own gateway over HTTPS). UsageError when the `role`'s token would cross a network
    in clear (None: no token is sent) or a certificate cannot be used."""
    import ssl
    from urllib.parse import urlsplit

    from gateway.config import is_loopback, parse_listen

    cert = settings.dashboard.tls_cert_file
    if args.url:
        base = args.url.rstrip("/")
        shown = redact_url(args.url)  # a user name or password in it is never echoed
        try:
            parts = urlsplit(base)
            _ = parts.port  # a port that is not a number raises here
        except ValueError as e:
            raise UsageError(f"--url {shown}: {e}; give an address such as https://visita-gw.local:8443") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username is not None:
            raise UsageError(f"--url {shown}: not an http(s) address such as https://visita-gw.local:8443")
        if parts.scheme == "http" and not is_loopback(parts.hostname) and role is not None:
            raise UsageError(
                f"--url {args.url}: plain HTTP would send the {role} token across the network in clear; use https:// "
                "(docs/install.md, HTTPS), or a tunnel (ssh -L 8080:127.0.0.1:8080 pi@gateway, then --url "
                "http://127.0.0.1:8080)"
            )
        # Publicly trusted certificates, plus the one given and the one this machine's gateway serves, names checked.
        context = ssl.create_default_context()
        try:
            if args.cafile:
                context.load_verify_locations(args.cafile)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"--cafile {args.cafile}: cannot be used: {e}; give a PEM certificate") from None
        if cert:
            context.load_verify_locations(cadata=_own_certificate(cert))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a server certificate trusted as it is, not only a CA
        return base, context, ""
    if settings.dashboard.listen == "off":
        api = role or "status"
        raise UsageError(f"the config says dashboard.listen = off: the {api} API needs the dashboard; use --url")
    host, port = parse_listen(settings.dashboard.listen)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    scheme = "https" if cert else "http"
    base = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    if not cert:
        if not _is_own_address(host) and role is not None:  # loopback included
            raise UsageError(
                f"dashboard.listen {settings.dashboard.listen}: {host} is not this machine, and plain HTTP would send "
                f"the {role} token there in clear; use an address of this machine, or HTTPS (docs/install.md)"
            )
        return base, ssl.create_default_context(), ""
    # This machine's own gateway: expect exactly the certificate it is configured with, whatever names it is for.
    context = ssl.create_default_context(cadata=_own_certificate(cert))
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return base, context, cert


def _own_certificate(cert: str) -> str:
    """The first certificate in the file `dashboard.tls_cert_file` names (PEM): this gateway's own, and only it. Not
    the rest of a chain: a CA there would vouch for every certificate it issued. UsageError when it cannot be read."""
    import re

    try:
        first = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", Path(cert).read_text(), re.S)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"dashboard.tls_cert_file {cert}: cannot be used: {e}") from None
    if first is None:
        raise UsageError(f"dashboard.tls_cert_file {cert}: cannot be used: no '-----BEGIN CERTIFICATE-----' block")
    return first.group(0)


def _is_own_address(host: str) -> bool:
    """Whether `host` is an address this machine can listen on (so that a connection there stays on it)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((addr[0], 0))
            except OSError:
                return False
    return bool(infos)


def _pin_failure(base: str, pinned: str, e: ssl.SSLCertVerificationError) -> str:
    """What to do when this machine's gateway does not present the configured certificate as valid."""
    if e.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return (
            f"the gateway at {base} serves dashboard.tls_cert_file {pinned}, which has expired: make a new one and "
            "restart the gateway (docs/install.md, HTTPS)"
        )
    if e.verify_code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
        return (
            f"the gateway at {base} serves dashboard.tls_cert_file {pinned}, which is not valid yet by this machine's "
            "clock: check the clock (timedatectl; a Pi has no real-time clock before NTP)"
        )
    return (
        f"the gateway at {base} serves a certificate other than dashboard.tls_cert_file {pinned} ({e.verify_message}):"
        " after changing the certificate, restart the gateway (systemctl restart visita)"
    )


class GatewayCallError(Exception):
    """The running gateway refused a request, or did not answer."""


def _print_recording(run: dict[str, Any]) -> None:
    heard = ", ".join(f"{rx} {n}" for rx, n in sorted(run["packets"].items())) or "nothing yet"
    print(f"recording at ({run['x']:g}, {run['y']:g}) in {run['zone']}: {run['seconds_left']:.0f} s left; {heard}")


def _print_survey(status: dict[str, Any]) -> None:
    if status.get("running"):
        _print_recording(status["running"])
    spots = status.get("spots", [])
    print(f"{len(spots)} spot(s) recorded with {status['transmitter']}")
    for sp in spots:
        heard = ", ".join(f"{rx} {n}" for rx, n in sorted(sp["packets"].items())) or "heard by no receiver"
        print(f"  [{sp['index']}] ({sp['x']:g}, {sp['y']:g}) {sp['zone']}: {heard}")
    applied = status.get("applied")
    print(f"in use: {applied['file']} ({applied['spots']} spots)" if applied else "in use: no survey map")
    if status.get("problem"):
        print(f"not used: {status['problem']}")


def cmd_doctor(args: argparse.Namespace) -> int:
    """visita doctor: the running gateway's status, checked (gateway/doctor.py)."""
    from gateway.doctor import checks

    try:
        status = _gateway_call(args, "GET", "/api/v1/status", role=None)
    except GatewayCallError as e:
        print(f"visita doctor: {e}", file=sys.stderr)
        return EXIT_FAILED
    found = checks(status, time.time())
    problems = sum(c.status == "problem" for c in found)
    warnings = sum(c.status == "warning" for c in found)
    if args.json:
        rows = [{"status": c.status, "what": c.what, "detail": c.detail} for c in found]
        print(json.dumps({"gateway": status.get("gateway_id"), "store": status.get("store_id"), "checks": rows,
                          "problems": problems, "warnings": warnings}))  # fmt: skip
    else:
        print(f"gateway {status.get('gateway_id')} of store {status.get('store_id')}, version {status.get('version')}")
        for c in found:
            print(f"  {c.status:<8} {c.what}: {c.detail}")
        print(f"{problems} problem(s), {warnings} warning(s)")
    return EXIT_FAILED if problems else EXIT_OK


def cmd_survey(args: argparse.Namespace) -> int:
    """visita survey status | spot X Y | discard INDEX | apply."""
    import time as _time

    try:
        if args.survey_command == "status":
            out = _gateway_call(args, "GET", "/api/v1/survey")
        elif args.survey_command == "discard":
            out = _gateway_call(args, "DELETE", f"/api/v1/survey/spots/{args.index}")
        elif args.survey_command == "apply":
            out = _gateway_call(args, "POST", "/api/v1/survey/apply")
            if not args.json:
                used = ", ".join(f"{rx} {n}" for rx, n in sorted(out["receivers"].items()))
                print(f"survey map of {out['spots']} spot(s) in {out['file']}, in use; spots per receiver: {used}")
                return EXIT_OK
        else:
            body = {"x": args.x, "y": args.y, "seconds": args.seconds}
            out = _gateway_call(args, "POST", "/api/v1/survey/spots", body)
            while not args.no_wait and out.get("running"):
                if not args.json:
                    _print_recording(out["running"])  # the whole survey once it has ended
                _time.sleep(min(2.0, max(0.5, out["running"]["seconds_left"])))
                out = _gateway_call(args, "GET", "/api/v1/survey")
    except GatewayCallError as e:
        print(f"visita survey {args.survey_command}: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(out))
    else:
        _print_survey(out)
    return EXIT_OK


def cmd_points_explain(args: argparse.Namespace) -> int:
    """visita points explain MEMBER_REF [--visit ID]: from the data directory, or from the running gateway."""
    import os
    import stat
    import urllib.parse
    from zoneinfo import ZoneInfo

    from gateway.days import LocalDays
    from gateway.identity import MemberDirectory
    from gateway.members import KeyStoreError, load_into
    from gateway.points import PointsEngine, explain_member
    from gateway.store import Store, StoreError, StoreInUse

    settings = load_settings(args.config)
    data_dir = settings.storage.directory(args.data_dir)
    store: Store | None = None
    why = ""  # why the running gateway is asked rather than the data directory read
    if args.url:
        why = f"--url {redact_url(args.url)}"
    else:
        try:
            here = stat.S_ISDIR(os.stat(data_dir).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            here = False
        except PermissionError:  # a parent closed to this user (systemd's /var/lib/private)
            here, why = True, f"{data_dir} is closed to this user"
        if not here:
            why = f"there is no {data_dir} here"
        elif not why:
            try:
                store = Store(data_dir)
            except StoreInUse:
                why = f"the gateway holds {data_dir}"
            except StoreError as e:
                if os.access(data_dir, os.R_OK | os.X_OK):
                    print(f"visita points explain: {e}", file=sys.stderr)
                    return EXIT_FAILED
                why = f"{data_dir} is closed to this user"
    if store is None:
        # The gateway answers, with its rules in force and the ledger its engine holds.
        params = {"limit": str(max(1, min(args.limit, 100)))}
        if args.visit:
            params["visit"] = args.visit
        query = urllib.parse.urlencode(params)
        path = f"/api/v1/members/{urllib.parse.quote(args.member, safe='')}/points?{query}"
        print(f"visita points explain: {why}; asking the running gateway", file=sys.stderr)
        try:
            result = _gateway_call(args, "GET", path, role="support")
        except GatewayCallError as e:
            print(f"visita points explain: {e}", file=sys.stderr)
            return EXIT_FAILED
    else:
        # The rules the gateway applies: the backend's (cmd/rules) if it sent any, else the rules file's.
        try:
            rules, source = rules_in_force(settings.points.rules_path(), data_dir)
        except ConfigError:
            store.close()
            raise
        members = MemberDirectory()
        tiers = "tiers from the member vault"
        try:
            vault_read = load_into(members, data_dir) > 0  # no vault (members from elsewhere): provisioning unknown
        except KeyStoreError as e:
            tiers = f"tiers unknown ({e})"
            vault_read = False  # then who is provisioned is not known either: nobody is taken for removed
        with store:
            ledger = store.awards()
            visits = store.visits_of("member:" + args.member, 1_000_000 if args.visit else max(1, args.limit))
        known: Callable[[str], bool] = members.known if vault_read else (lambda member: True)
        engine = PointsEngine(rules, LocalDays(settings.timezone), ledger, members.tier, known)
        if args.visit:
            visits = [v for v in visits if v.visit_id == args.visit]
        result = {
            **explain_member(engine, visits, args.member, ZoneInfo(settings.timezone)),
            "rules_source": source,
            "tiers": tiers,
        }
    if args.json:
        print(json.dumps(result))
        return EXIT_OK if result["visits"] or result["other_awards"] else EXIT_FAILED
    out, others = result["visits"], result["other_awards"]
    if not out:
        where = f"visit {args.visit}" if args.visit else "visit"
        print(f"no {where} of member {args.member} is known here")
    for rec in out:
        state = "still inside" if rec["open"] else "inside"
        print(
            f"visit {rec['visit_id']} · {rec['started']} · {rec['dwell_s']} s {state} · {rec['classification']}, "
            f"source {rec['source']} · path {' > '.join(rec['path']) or '-'} · {rec['points']} points"
        )
        for r in rec["rules"]:
            print(
                f"  {r['points']:>+5}  {r['rule']}: {r['why']}" if r["points"] else f"      0  {r['rule']}: {r['why']}"
            )
    if others:
        print(
            f"awards of {args.member} for visits not listed: "
            + ", ".join(f"{a['rule']} {a['points']} ({a['visit_id']})" for a in others[:20])
        )
    print(f"rules: {result['rules_source']}")
    return EXIT_OK if out or others else EXIT_FAILED


def cmd_new_store_secret(args: argparse.Namespace) -> int:
    """visita keys new-store-secret FILE: 32 random bytes, mode 0600, never over an existing file; never printed."""
    import os
    import secrets

    from gateway.config import STORE_SECRET_MIN
    from gateway.files import write_all

    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        print(
            f"visita keys new-store-secret: {args.file} exists already: not overwritten (the store's other gateways "
            "may hold a copy of it); give another path, or delete it first",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except OSError as e:
        print(f"visita keys new-store-secret: {args.file}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILED
    try:
        os.fchmod(fd, 0o600)
        write_all(fd, secrets.token_bytes(STORE_SECRET_MIN))
        os.fsync(fd)
    finally:
        os.close(fd)
    print(
        f"wrote a store secret to {args.file} (mode 0600): copy it to every gateway of the store and set "
        "identity.anon_secret_file to it there"
    )
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    """visita keys import FILE: all or nothing; never prints a key."""
    from gateway.members import KeyImportError, KeyStoreError, import_keys

    if args.keys_command == "new-store-secret":
        return cmd_new_store_secret(args)

    source = "stdin" if str(args.file) == "-" else str(args.file)
    try:
        text = sys.stdin.read() if source == "stdin" else args.file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{source}: cannot be read: {e}") from None
    data_dir = load_settings(args.config).storage.directory(args.data_dir)
    try:
        result = import_keys(data_dir, text, source, replace=args.replace)
    except KeyImportError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        print(f"visita keys import: {len(e.problems)} problem(s); nothing was imported", file=sys.stderr)
        return EXIT_USAGE
    except (KeyStoreError, OSError) as e:
        print(f"visita keys import: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"imported {result['imported']:,} member(s) ({result['added']:,} new, {result['changed']:,} changed, "
            f"{result['removed']:,} removed): {result['vault']} holds {result['members']:,}, version "
            f"{result['version']}, encrypted with {result['vault_key']}"
        )
        if result["unreadable_vault_kept_at"]:
            print(f"the vault that could not be read is kept at {result['unreadable_vault_kept_at']}")
    if source != "stdin":
        try:
            check_private(source, "the key file")
        except ValueError as e:  # imported all the same (the keys are in the vault now): the file is what is open
            print(f"visita keys import: warning: {e}, or delete it now that its keys are imported", file=sys.stderr)
    return EXIT_OK


def _check_rules(settings: Settings, plan: bool = True) -> str:
    """Validate the rules file the settings name, against the plan too (unless `plan` is False: the plan is not
    the file's); returns a one-line description."""
    from gateway.points import dead_rule_problems

    path = settings.points.rules_path()
    rules = load_rules(path)
    source = str(path) if path else "built-in rules"
    problems = dead_rule_problems(rules, [z.id for z in settings.plan.zones], source) if plan else []
    if problems:
        raise ConfigError(problems)
    return f"built-in rules ({len(rules.rules)})" if path is None else f"{path} ({len(rules.rules)} rules)"


def _backend_rules_notes(settings: Settings, data_dir: Path | None) -> list[str]:
    """Rules the backend sent (cmd/rules), kept in the data directory, are in force instead of the file's."""
    import os

    from gateway.points import BACKEND_RULES_FILE

    data_dir = settings.storage.directory(data_dir)
    path = data_dir / BACKEND_RULES_FILE
    try:
        os.stat(path)
    except FileNotFoundError:
        return []
    except PermissionError:
        return [f"{data_dir} is closed to this user: run as root to see whether the backend's rules are in force"]
    if not os.access(path, os.R_OK):
        return [f"{path} (rules the backend sent) cannot be read by this user: run as root to check it"]
    try:
        rules, source = rules_in_force(None, data_dir)
    except ConfigError as e:
        return [f"the backend's kept rules cannot be used; the gateway will apply the rules file: {e.problems[0]}"]
    return [f"the rules in force are not the file's but those {source} ({len(rules.rules)} rules)"]


def _dashboard_notes(settings: Settings, source: str) -> list[str]:
    """Check the dashboard's tokens and certificate as the gateway will load them (ConfigError when it would not
    start); notes on how it is served."""
    import os

    from gateway.config import load_tls, serving_notes

    dash = settings.dashboard
    problems: list[str] = []
    tokens: list[str] = []
    for role, token_of in (("installer", dash.installer_token), ("support", dash.support_token)):
        try:  # each token file is checked on its own, so that one round names every problem
            if token_of():
                tokens.append(role)
        except ValueError as e:
            problems.append(f"{source}: {e}")
    try:
        # The key may be for the unit alone (LoadCredential=): then the certificate is what can be checked here.
        key_elsewhere = dash.tls_cert_file and not dash.tls_key_file and not os.environ.get("CREDENTIALS_DIRECTORY")
        notes: list[str] = []
        if dash.listen == "off":  # not served: the gateway does not load them either
            tls = None
        elif not key_elsewhere:
            tls = dash.tls()
        else:
            tls = load_tls((dash.tls_cert_file, "dashboard.tls_cert_file"), None)
            notes = [
                "the dashboard's TLS key is to come from the unit's credential visita-dashboard-key: checked when "
                "the gateway starts"
            ]
    except ValueError as e:
        problems.append(f"{source}: {e}")
    if problems:
        raise ConfigError(problems)
    return notes + [message for _, message in serving_notes(dash.listen, tls, tokens)]


def _plan_notes(plan: PlanConfig) -> list[str]:
    """What an installer should know about a valid plan: zones no receiver serves, a one-receiver plan, receivers
    placed far from every zone, zones that overlap."""
    notes = (
        plan.overlap_notes()
        + [gaps for gaps in [plan.geometry_gaps()] if gaps]
        + [
            f"receiver {rx} is placed {d:g} m outside every zone: check its position (metres from the plan's origin, "
            "[x, y]); the estimator expects its signals from there"
            for rx, d in plan.stray_receivers()
        ]
    )
    unserved = plan.unserved_zones()
    if unserved and len(plan.receivers) == 1:
        notes.append(
            f"one receiver tells inside from outside and near from far, not zones: all inside time counts for its "
            f"zone {plan.receivers[0].zone}, none for {', '.join(unserved)}; a receiver in each, even a cheap ESP32 "
            "node (docs/nodes.md), gives zones (docs/estimation.md)"
        )
    elif unserved:
        notes.append(
            f"no receiver serves zone(s) {', '.join(unserved)}: they are told from their neighbours only by receivers "
            "elsewhere, and their dwell is the least accurate; a receiver in each, even a cheap ESP32 node "
            '(docs/nodes.md), helps (docs/estimation.md, "What it takes")'
        )
    return notes


def cmd_config_check(args: argparse.Namespace) -> int:
    """visita config check FILE: every problem of the file and of the files it names, in one round."""
    problems: list[str] = []
    try:
        settings, bad = load_settings(args.file), set[str]()
    except ConfigError as e:
        settings, bad, unreached = load_sections(args.file)  # and the files the valid sections name
        problems = e.problems + unreached
    rules, dashboard = "", list[str]()
    try:
        if "points" not in bad:
            rules = _check_rules(settings, plan="plan" not in bad)
    except ConfigError as e:
        problems += e.problems
    try:
        if "plan" not in bad:
            BeaconRegistry(settings.plan.beacons)  # the EID beacons' key files can be read
    except ConfigError as e:
        problems += e.problems
    try:
        if "dashboard" not in bad:
            dashboard = _dashboard_notes(settings, str(args.file))
    except ConfigError as e:
        problems += e.problems
    try:
        if "mqtt" not in bad:
            settings.mqtt.secrets()  # the password file and client key can be used, as `run` will
    except ValueError as e:
        problems.append(f"{args.file}: {e}")
    try:
        if "identity" not in bad:
            settings.identity.anon_secret()  # the store secret file can be used
    except ValueError as e:
        problems.append(f"{args.file}: {e}")
    if problems:
        raise ConfigError(problems)
    plan = settings.plan
    if args.json:
        data = settings.model_dump(mode="json")
        for b in data["plan"]["beacons"]:
            if b["eid"] is not None and b["eid"]["key"]:
                b["eid"]["key"] = "(hidden)"  # a secret: whoever has it can forge the beacon's ids
        print(json.dumps(data, indent=2))
    else:
        print(
            f"{args.file}: ok: store {settings.store}, gateway {settings.gateway}, {len(plan.zones)} zones, "
            f"{len(plan.receivers)} receivers, {len(plan.beacons)} beacons; rules: {rules}"
        )
    for note in _plan_notes(plan) + dashboard + _backend_rules_notes(settings, args.data_dir):
        # With --json the notes go to stderr, so that standard output stays the settings and nothing else.
        print(f"{args.file}: note: {note}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """visita run."""
    from datetime import UTC, datetime

    from firmware_sim.scenario import load_scenario, scenario_plan
    from firmware_sim.world import World
    from gateway.identity import MemberDirectory
    from gateway.runtime import Clock
    from sensors.sim import SimSource

    settings = apply_mqtt_flags(args, load_settings(args.config))
    load_rules(settings.points.rules_path())  # fail before anything starts
    BeaconRegistry(settings.plan.beacons)  # and on an EID beacon key that cannot be read
    if args.sim and args.ble:
        raise UsageError("--sim and --ble are two sources: pass one")
    if args.relay and args.nodes and args.nodes != "off":
        raise UsageError(
            "--relay with --nodes: a relay publishes what its own radio hears; ESPresense nodes and other gateways "
            "are taken by the store's main gateway (its --nodes)"
        )
    if args.relay and not (args.sim or args.ble):
        raise UsageError("--relay: say what the relay hears: --ble (the Pi's adapters), or --sim to try it out")
    if args.ble:
        return _run_ble(args, settings)
    if not args.sim and args.nodes and args.nodes != "off":
        return _run_nodes_only(args, settings)
    if not args.sim:
        raise UsageError(
            "no source chosen: pass --sim (the built-in store simulator) or --ble (the local Bluetooth adapters), "
            "or --nodes (remote receivers over MQTT)"
        )
    scenario = load_scenario(args.scenario)
    if args.config is None:  # no config: the plan is the scenario's own (for `default`, the built-in plan)
        settings = settings.model_copy(update={"plan": scenario_plan(scenario)})
    if "timezone" not in settings.model_fields_set:  # the store's days are the scenario's, unless the config says
        settings = settings.model_copy(update={"timezone": scenario.timezone})
    plan_rx = {r.id for r in settings.plan.receivers}
    missing = [r.id for r in scenario.receivers if r.id not in plan_rx]
    if missing:
        raise ConfigError(
            [
                f"scenario {args.scenario}: receiver(s) {', '.join(missing)} are not in the store plan "
                f"(plan receivers: {', '.join(sorted(plan_rx))}); give a config whose [plan] matches the scenario"
            ]
        )
    # A simulation faster than real time runs ahead of the wall clock: started again on the same data directory it
    # goes on from where that one got to, not back to now (its visits, days and counts are ahead of now).
    held = _data_until(settings.storage.directory(args.data_dir))
    ahead = held is not None and held > time.time() + AHEAD_S
    clock = Clock(args.speed, start=held if ahead else None, simulation=True)
    world = World(scenario, args.seed, clock.start)
    world_start = datetime.fromtimestamp(world.start_ts, UTC).isoformat(timespec="seconds")  # whole seconds
    members = MemberDirectory()
    members.set_members(world.member_keys)  # the simulated store's app users, as if the backend provisioned them
    banner = [
        f"Visita {__version__} · store {settings.store} · gateway {settings.gateway}",
        f"  source     simulated store {scenario.name!r} (seed {args.seed}) at {args.speed:g}x"
        + (f", for {args.until:g} s of simulated time" if args.until else "")
        + (f", going on from {_local(clock.start, settings.timezone)} (the data directory's time)" if ahead else ""),
        # The world's start: `visita sim SCENARIO --seed N --start …` writes this run's ground truth.
        # As --scenario was given (a file's path, not the name inside it, which `visita sim` would not find).
        f"  truth      visita sim {shlex.quote(args.scenario)} --seed {args.seed} --start {world_start} --out DIR "
        f"(the same world, from {_local(world.start_ts, settings.timezone)})",
    ]
    nodes = _nodes_source(args, settings, clock.now, banner)
    return _run_gateway(args, settings, SimSource(world), clock, members, world.staff_refs, banner, nodes)


def _run_gateway(
    args: argparse.Namespace,
    settings: Settings,
    source: Source,
    clock: Clock,
    members: MemberDirectory,
    staff: list[str],
    banner: list[str],
    nodes: NodesSource | None,
) -> int:
    """`visita run` on any source, with the options every source shares; a start-up failure is exit 1. With --relay,
    the relay's pipeline (gateway/relay.py) instead of the gateway's."""
    from gateway.runtime import RunOptions, StartupError, run, run_relay
    from gateway.store import StoreError

    opts = RunOptions(
        data_dir=args.data_dir,
        mqtt=args.mqtt,
        dashboard=args.dashboard,
        until_s=args.until,
        clock_wait_s=args.clock_wait,
    )
    try:
        if args.relay:
            assert nodes is None  # refused by cmd_run
            banner[0] += " · relay"
            return asyncio.run(run_relay(settings, opts, source, clock, members, banner))
        return asyncio.run(run(settings, opts, source, clock, members, staff, banner, nodes))
    except (StartupError, StoreError) as e:
        print(f"visita run: {e}", file=sys.stderr)
        return EXIT_FAILED


def _data_until(data_dir: Path) -> float | None:
    """The data time a data directory holds data up to (None: no data, or in use: `run` says so)."""
    from gateway.store import HOT_FILE, Store, StoreError

    if not (data_dir / HOT_FILE).exists():
        return None
    try:
        with Store(data_dir) as store:
            held = (store.kept() or {}).get("data_until")
    except StoreError:
        return None
    return float(held) if isinstance(held, (int, float)) else None


def _local(ts: float, timezone: str) -> str:
    """`ts` as the store's local date and time, for people."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    return datetime.fromtimestamp(ts, ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M:%S %Z")


def _ble_adapters(items: list[str] | None, defaults: list[str], plan_rx: list[str]) -> list[tuple[str, str]]:
    """--adapter NAME[=RECEIVER] values as (adapter, receiver) pairs; defaults: hci0, hci1, … for `defaults`."""
    if not items:
        return [(f"hci{i}", rx) for i, rx in enumerate(defaults)]
    out: list[tuple[str, str]] = []
    for i, item in enumerate(items):
        name, _, rx = item.partition("=")
        if not rx:
            if i >= len(defaults):
                raise UsageError(f"--adapter {item}: say which receiver it hears for, e.g. --adapter {name}=RECEIVER")
            rx = defaults[i]
        if not name or "/" in name:
            raise UsageError(f"--adapter {item}: give the adapter's name, e.g. hci0")
        if rx not in plan_rx:
            raise UsageError(
                f"--adapter {item}: no receiver {rx!r} in the store plan (receivers: {', '.join(plan_rx)})"
            )
        out.append((name, rx))
    if len({a for a, _ in out}) != len(out):
        raise UsageError(f"--adapter: each adapter may be given once ({', '.join(a for a, _ in out)})")
    return out


async def _emulator_info() -> dict[str, Any]:
    """What `visita sim SCENARIO --bluez` on this bus plays, and its clock (for --rehearse)."""
    import os

    from firmware_sim.bluez import EmulatorControl

    address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "")
    try:
        async with EmulatorControl(address) as ctl:
            return await asyncio.wait_for(ctl.info(), 5)
    except Exception as e:  # no bus, no emulator on it, or an emulator that does not answer
        raise UsageError(
            f"--rehearse: no emulated BlueZ answers on DBUS_SYSTEM_BUS_ADDRESS={address or '(unset)'} ({e}); "
            "start `visita sim SCENARIO --bluez` and set the variable it prints"
        ) from None


def _run_ble(args: argparse.Namespace, settings: Settings) -> int:
    """visita run --ble: the local Bluetooth adapters through bleak (sensors/ble.py)."""
    import os

    from firmware_sim.scenario import load_scenario, scenario_plan
    from firmware_sim.world import member_keys
    from gateway.identity import MemberDirectory
    from gateway.runtime import Clock
    from sensors import ble_source

    if args.speed != 1 and not args.rehearse:
        raise UsageError(
            f"--speed {args.speed:g}: a radio is heard in real time; --speed only applies to --sim, "
            "or to --ble --rehearse against `visita sim --bluez --speed X`"
        )
    members = MemberDirectory()
    staff: list[str] = []
    defaults = [r.id for r in settings.plan.receivers][:1]
    rehearsal = ""
    clock = Clock(args.speed)
    if args.rehearse:
        info = asyncio.run(_emulator_info())
        scenario = load_scenario(str(info["scenario"]))
        seed, speed = int(info["seed"]), float(info["speed"])
        if args.config is None:
            settings = settings.model_copy(update={"plan": scenario_plan(scenario)})
        keys = member_keys(seed, scenario.population.members, scenario.population.staff)
        members.set_members(keys)  # the simulated store's app users, as if the backend provisioned them
        staff = [ref for ref in keys if ref.startswith("staff-")]
        defaults = [r.id for r in scenario.receivers]
        # The store's phones compute member tokens from simulated time: follow the emulator's clock.
        clock = Clock(speed, start=float(info["now"]))
        rehearsal = f", rehearsing {scenario.name!r} (seed {seed}) at {speed:g}x"
    plan_rx = [r.id for r in settings.plan.receivers]
    missing = [rx for rx in defaults if rx not in plan_rx]
    if args.rehearse and not args.adapter and missing:  # as --sim says: the emulator plays the scenario's receivers
        raise ConfigError(
            [
                f"--rehearse: scenario {scenario.name}: receiver(s) {', '.join(missing)} are not in the store plan "
                f"(plan receivers: {', '.join(sorted(plan_rx))}); give a config whose [plan] matches the scenario, "
                "or say which adapter hears for which plan receiver (--adapter hci0=RECEIVER)"
            ]
        )
    adapters = _ble_adapters(args.adapter, defaults, plan_rx)
    expected = len(settings.plan.beacons) if args.expect_beacons is None else args.expect_beacons
    try:
        source = ble_source(adapters, clock.now, mode=args.scan, expected_beacons=expected, silence_s=args.silence)
    except ValueError as e:
        raise UsageError(str(e)) from None
    watchdog = f"{expected} beacon(s), silence {args.silence:g} s" if expected else "off (no beacons expected)"
    banner = [
        f"Visita {__version__} · store {settings.store} · gateway {settings.gateway}",
        f"  source     BLE {' '.join(f'{a}={r}' for a, r in adapters)} ({args.scan} scan){rehearsal}",
        f"  bus        {os.environ.get('DBUS_SYSTEM_BUS_ADDRESS') or 'unix:path=/run/dbus/system_bus_socket'}"
        f" · watchdog {watchdog}",
    ]
    nodes = _nodes_source(args, settings, clock.now, banner)
    return _run_gateway(args, settings, source, clock, members, staff, banner, nodes)


def _nodes_source(
    args: argparse.Namespace, settings: Settings, clock: Callable[[], float], banner: list[str]
) -> NodesSource | None:
    """The remote receivers `--nodes [URL]` and `--room ROOM=RECEIVER` ask for (sensors/nodes.py), or None."""
    from sensors.nodes import NodesOptions, NodesSource

    if not args.nodes or args.nodes == "off":
        if args.room:
            raise UsageError("--room only applies with --nodes")
        return None
    uplink = args.nodes == "uplink"
    text = (args.mqtt or settings.mqtt.url) if uplink else args.nodes
    if text == "off":
        raise UsageError("--nodes: the uplink is off; give the store broker, e.g. --nodes mqtt://127.0.0.1:1883")
    try:
        url = parse_mqtt_url(text)
    except ValueError as e:
        why = "must be mqtt://HOST[:PORT], the store's LAN broker" if "or off" in str(e) else str(e)
        raise UsageError(f"--nodes: {redact_url(text)!r}: {why}") from None
    if url.tls:
        raise UsageError(f"--nodes {url}: TLS is not supported for remote receivers yet; use the store's LAN broker")
    plan_rx = {r.id for r in settings.plan.receivers}
    rooms: dict[str, str] = {}
    for item in args.room or []:
        room, _, rx = item.partition("=")
        if not room or rx not in plan_rx:
            raise UsageError(
                f"--room {item}: give ROOM=RECEIVER with a receiver of the store plan ({', '.join(sorted(plan_rx))})"
            )
        if rooms.setdefault(room.lower(), rx) != rx:
            raise UsageError(
                f"--room {item}: room {room} is mapped to {rooms[room.lower()]} already (rooms match in any case)"
            )
    password = None
    if uplink and settings.mqtt.username:
        try:
            password = settings.mqtt.password()
        except ValueError as e:
            raise UsageError(str(e)) from None
    from gateway.identity import secret_id

    try:
        secret = settings.identity.anon_secret()
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    try:
        options = NodesOptions(
            host=url.host,
            port=url.port,
            store=settings.store,
            gateway=settings.gateway,
            rooms=rooms,
            anon_key=secret_id(secret) if secret is not None else None,
        )
    except ValueError as e:
        raise UsageError(f"--nodes: {e}") from None
    banner.append(
        f"  nodes      {url}  espresense/devices/# and visita/v1/{settings.store}/+/sightings"
        + (f" · rooms {' '.join(f'{k}={v}' for k, v in rooms.items())}" if rooms else "")
    )
    return NodesSource(options, clock, password, settings.mqtt.username if uplink else None)


def _run_nodes_only(args: argparse.Namespace, settings: Settings) -> int:
    """visita run --nodes without a radio: remote receivers are the only source."""
    from gateway.identity import MemberDirectory
    from gateway.runtime import Clock

    if args.speed != 1:
        raise UsageError(f"--speed {args.speed:g}: remote receivers are heard in real time")
    clock = Clock()
    banner = [f"Visita {__version__} · store {settings.store} · gateway {settings.gateway}"]
    nodes = _nodes_source(args, settings, clock.now, banner)
    assert nodes is not None
    return _run_gateway(args, settings, nodes, clock, MemberDirectory(), [], banner, nodes)


def _span(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def cmd_sim(args: argparse.Namespace) -> int:
    """visita sim SCENARIO: simulate, write the advert log and the ground truth, print the summary."""
    import time
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from firmware_sim.advlog import MAX_SPAN_MS
    from firmware_sim.record import record
    from firmware_sim.scenario import load_scenario

    scenario = load_scenario(args.scenario)
    start = scenario.start_ts()
    if args.start:
        try:
            when = datetime.fromisoformat(args.start)
        except ValueError:
            raise UsageError(f"--start {args.start!r}: use an ISO date and time such as 2025-03-03T08:00") from None
        start = (when if when.tzinfo else when.replace(tzinfo=ZoneInfo(scenario.timezone))).timestamp()
    if args.bluez:
        return _sim_bluez(args, scenario, start)
    duration = 3600.0 if args.duration is None else args.duration
    if duration * 1000 > MAX_SPAN_MS:
        raise UsageError(f"--duration {_span(duration)}: an advert log spans at most 49.7 days (2**32 ms)")
    last = [time.monotonic()]

    def progress(done: float, adverts: int) -> None:
        if time.monotonic() - last[0] >= 5:
            last[0] = time.monotonic()
            print(f"visita sim: {done:4.0%} of {_span(duration)}, {adverts:,} adverts", file=sys.stderr)

    try:
        rec = record(scenario, args.seed, start, duration, args.out, args.speed, progress)
    except OSError as e:
        print(f"visita sim: cannot write to {args.out}: {e.strerror}", file=sys.stderr)
        return EXIT_FAILED
    s = rec.summary
    if args.json:
        files = {"log": str(rec.log or ""), "truth": str(rec.truth or "")}
        print(json.dumps({**s, "wall_s": round(rec.wall_s, 3), **files}))
        return EXIT_OK
    per_rx = ", ".join(f"{k} {v:,}" for k, v in s["per_receiver"].items())
    print(
        f"{s['scenario']} seed {s['seed']}: {_span(s['duration_s'])} from {s['start_utc']} simulated in "
        f"{rec.wall_s:.1f} s · subjects {s['subjects']:,} ({s['people']:,} people, {s['beacons']} beacons) · "
        f"visits {s['visits']:,} · pass-bys {s['pass_bys']:,} · staff {s['staff']} · adverts {s['adverts']:,} · "
        f"per receiver: {per_rx}"
    )
    if rec.log is not None:
        print(f"wrote {rec.log} ({rec.log.stat().st_size:,} bytes) and {rec.truth}")
    return EXIT_OK


def _sim_bluez(args: argparse.Namespace, scenario: Scenario, start: float) -> int:
    """visita sim SCENARIO --bluez: the scenario played live through an emulated BlueZ (firmware_sim/bluez.py)."""
    from firmware_sim.bluez import BluezEmulatorError, play

    if args.out is not None or args.json:
        raise UsageError("--bluez plays live and writes no recording: drop --out and --json (or --bluez)")
    try:
        summary = asyncio.run(
            play(scenario, args.seed, start, args.speed or 1.0, duration=args.duration, scenario_ref=args.scenario)
        )
    except BluezEmulatorError as e:
        print(f"visita sim: {e}", file=sys.stderr)
        return EXIT_FAILED
    per_rx = ", ".join(f"{k} {v:,}" for k, v in summary["per_receiver"].items())
    print(
        f"{scenario.name} seed {args.seed}: {_span(summary['simulated_s'])} played · shoppers {summary['shoppers']:,}"
        f" · pedestrians {summary['pedestrians']:,} · adverts {summary['adverts']:,} "
        f"({summary['bluez']['signals']:,} D-Bus signals) · per receiver: {per_rx}",
        flush=True,
    )
    return EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    """visita replay LOG: feed a recorded advert log through the pipeline."""
    import tempfile
    import time

    from firmware_sim.advlog import LogError
    from firmware_sim.scenario import scenario_from_data, scenario_plan
    from firmware_sim.world import member_keys
    from gateway.identity import MemberDirectory
    from gateway.runtime import Clock, RunOptions, StartupError, run
    from gateway.store import StoreError
    from sensors.replay import ReplaySource

    settings = load_settings(args.config)
    load_rules(settings.points.rules_path())
    try:
        source = ReplaySource(args.log)
    except LogError as e:
        print(f"visita replay: {e}", file=sys.stderr)
        return EXIT_USAGE
    h = source.header
    if args.config is None:
        if not isinstance(h.get("scenario_data"), dict):
            raise UsageError(f"{args.log} names no scenario: pass --config with the store's [plan]")
        scenario = scenario_from_data(h["scenario_data"], f"{args.log}: embedded scenario")
        settings = settings.model_copy(update={"plan": scenario_plan(scenario)})
    members = MemberDirectory()
    staff = [str(r) for r in h.get("staff", [])]
    if "seed" in h and "members" in h:  # a simulated store's app users, as the backend would provision them
        members.set_members(member_keys(int(h["seed"]), int(h["members"]), len(staff)))
    span = source.end_ts - source.start_ts
    clock = Clock(args.speed, start=source.start_ts) if args.speed else Clock(start=source.start_ts, step_s=args.step)
    banner = [
        f"Visita {__version__} · store {settings.store} · gateway {settings.gateway}",
        f"  source     advert log {args.log} ({h.get('scenario', '?')}, seed {h.get('seed', '?')}, "
        f"{_span(span)} from {h.get('start_utc', source.start_ts)}) "
        + (f"at {args.speed:g}x" if args.speed else "as fast as it goes"),
    ]
    with tempfile.TemporaryDirectory(prefix="visita-replay-") as tmp:
        opts = RunOptions(
            data_dir=args.data_dir or Path(tmp),
            temporary_data=args.data_dir is None,
            mqtt=args.mqtt,
            dashboard=args.dashboard,
            until_s=span,
            tick_s=0.1 if args.speed else 0.0,
            recorded=True,
        )
        wall0 = time.monotonic()
        try:
            code = asyncio.run(run(settings, opts, source, clock, members, staff, banner))
        except (StartupError, StoreError) as e:
            print(f"visita replay: {e}", file=sys.stderr)
            return EXIT_FAILED
        wall = time.monotonic() - wall0
    print(
        f"replayed {source.delivered:,} adverts ({_span(span)} of data) in {wall:.1f} s "
        f"({source.delivered / max(wall, 1e-9):,.0f} adverts/s)"
        + ("" if args.data_dir else "; the store was temporary (pass --data-dir DIR to keep it)")
    )
    if source.error:
        print(f"visita replay: {source.error}", file=sys.stderr)
        return EXIT_FAILED
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `visita` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "info")).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Libraries log raw Bluetooth addresses and advert bytes at debug level (bleak logs every D-Bus
    # signal): --log-level is for Visita's own loggers; these stay at warnings, whatever it says.
    for chatty in THIRD_PARTY_LOGGERS:
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
    # bleak reads BLEAK_LOGGING when it is first imported (later, by `run --ble`) and then sets its logger to DEBUG
    # with a handler of its own, past the levels above: every device's address would be logged.
    os.environ.pop("BLEAK_LOGGING", None)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "sim":
            return cmd_sim(args)
        if args.command == "replay":
            return cmd_replay(args)
        if args.command == "eval":
            from gateway.eval import cmd_eval

            return cmd_eval(args)
        if args.command == "keys":
            return cmd_keys(args)
        if args.command == "points":
            return cmd_points_explain(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        if args.command == "survey":
            return cmd_survey(args)
        return cmd_config_check(args)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as e:
        print(f"visita {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
