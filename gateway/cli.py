"""`visita`: the command line, for people and scripts.

Exit codes: 0 success, 1 failure while running, 2 bad usage or a bad config/rules file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from gateway import __version__
from gateway.config import ConfigError, Settings, load_settings, parse_duration, parse_listen, parse_mqtt_url
from gateway.points import load_rules

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EPILOG = """exit codes: 0 success, 1 failure while running, 2 bad usage or bad config.
Documentation: docs/ (config.md, events.md, rules.md, frames.md)."""


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
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    return text


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
    run.add_argument("--scenario", default="default", metavar="NAME|FILE", help="simulator scenario (default: default)")
    run.add_argument("--seed", type=int, default=1, metavar="N", help="simulator seed (default: 1)")
    run.add_argument(
        "--speed", type=_speed, default=1.0, metavar="X", help="simulated time runs X times faster (--sim)"
    )
    run.add_argument(
        "--until", type=_duration, metavar="DURATION", help="stop after this much (simulated) time, e.g. 10m"
    )
    run.add_argument("--data-dir", type=Path, metavar="DIR", help="data directory (default: ~/.local/state/visita)")
    run.add_argument("--mqtt", type=_mqtt, metavar="URL|off", help="broker URL, e.g. mqtt://127.0.0.1:1883, or off")
    run.add_argument(
        "--dashboard", type=_listen, metavar="HOST:PORT|off", help="dashboard address (default 127.0.0.1:8080)"
    )
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log detail")

    cfg = sub.add_parser("config", help="check a config file", description="Config file tools.")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    check = cfg_sub.add_parser(
        "check",
        help="validate a config file (and its rules file) without running",
        description="Validate a config file and the rules file it names; one line per problem; exit 2 if any.",
    )
    check.add_argument("file", type=Path, metavar="FILE")
    check.add_argument("--json", action="store_true", help="print the validated settings as JSON")
    return p


def _check_rules(settings: Settings) -> str:
    """Validate the rules file the settings name; returns a one-line description."""
    if not settings.points.rules:
        return f"built-in rules ({len(load_rules(None).rules)})"
    return f"{settings.points.rules} ({len(load_rules(Path(settings.points.rules)).rules)} rules)"


def cmd_config_check(args: argparse.Namespace) -> int:
    """visita config check FILE."""
    settings = load_settings(args.file)
    rules = _check_rules(settings)
    if args.json:
        print(json.dumps(settings.model_dump(mode="json"), indent=2))
    else:
        plan = settings.plan
        print(
            f"{args.file}: ok: store {settings.store}, gateway {settings.gateway}, {len(plan.zones)} zones, "
            f"{len(plan.receivers)} receivers, {len(plan.beacons)} beacons; rules: {rules}"
        )
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """visita run."""
    from firmware_sim.scenario import load_scenario
    from firmware_sim.world import World
    from gateway.identity import MemberDirectory
    from gateway.runtime import Clock, RunOptions, StartupError, run
    from gateway.store import StoreError
    from sensors.sim import SimSource

    settings = load_settings(args.config)
    load_rules(Path(settings.points.rules) if settings.points.rules else None)  # fail before anything starts
    if not args.sim:
        raise UsageError("no radio source yet: pass --sim to run against the built-in store simulator")
    scenario = load_scenario(args.scenario)
    plan_rx = {r.id for r in settings.plan.receivers}
    missing = [r.id for r in scenario.receivers if r.id not in plan_rx]
    if missing:
        raise ConfigError(
            [
                f"scenario {args.scenario}: receiver(s) {', '.join(missing)} are not in the store plan "
                f"(plan receivers: {', '.join(sorted(plan_rx))}); give a config whose [plan] matches the scenario"
            ]
        )
    clock = Clock(args.speed)
    world = World(scenario, args.seed, clock.start)
    members = MemberDirectory()
    members.set_members(world.member_keys)  # the simulated store's app users, as if the backend provisioned them
    banner = [
        f"Visita {__version__} · store {settings.store} · gateway {settings.gateway}",
        f"  source     simulated store {scenario.name!r} (seed {args.seed}) at {args.speed:g}x"
        + (f", for {args.until:g} s of simulated time" if args.until else ""),
    ]
    opts = RunOptions(data_dir=args.data_dir, mqtt=args.mqtt, dashboard=args.dashboard, until_s=args.until)
    try:
        return asyncio.run(run(settings, opts, SimSource(world), clock, members, world.staff_refs, banner))
    except (StartupError, StoreError) as e:
        print(f"visita run: {e}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `visita` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(getattr(args, "log_level", "info")).upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "run":
            return cmd_run(args)
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
