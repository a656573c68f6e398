"""`visita doctor`: what is wrong with a running gateway, and what to do about it, from its /api/v1/status.

Each check gives a status (ok, warning, problem), what it looked at, and for anything not ok what to do. Problems keep
the gateway from doing its job (no radio, no broker, a full disk); warnings are things an installer should look at
(a receiver that has gone quiet, a beacon's battery, a certificate near its end). No I/O here: the CLI fetches the
status and prints the checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

QUIET_S = 60.0
"""A receiver (adapter or remote node) that has heard nothing for this long is worth a look."""
BATTERY_LOW_MV = 2600
"""A fixed beacon's battery below this (a CR2032 near its end, or two AAs at 1.3 V) is worth replacing."""
CERT_WARN_DAYS = 30
"""The dashboard's certificate this close to its end is worth renewing."""
OUTBOX_WARN = 1000
"""Events waiting in the outbox beyond this while the broker is connected: delivery is falling behind."""

Status = Literal["ok", "warning", "problem"]


@dataclass(frozen=True, slots=True)
class Check:
    """One finding: its status, what it is about, and what was seen (and, unless ok, what to do)."""

    status: Status
    what: str
    detail: str


def checks(status: dict[str, Any], now: float) -> list[Check]:
    """Every check of a gateway's status (as /api/v1/status gives it), `now` the wall clock (UNIX seconds)."""
    out: list[Check] = []
    out += _source(status.get("source") or {})
    out += _clock(status.get("clock") or {})
    if status.get("role") == "relay":  # a relay (docs/nodes.md): no store, estimator or outbox to check
        out += _relay(status.get("relay") or {}, status.get("uplink") or {}, status.get("identity") or {})
        out += _beacons(status.get("identity") or {})
        out += _members(status.get("identity") or {})
        return out
    out += _nodes(status.get("nodes"))
    out += _uplink(status.get("uplink") or {}, status.get("store") or {})
    out += _store(status.get("store") or {})
    out += _beacons(status.get("identity") or {})
    out += _members(status.get("identity") or {})
    out += _estimator(status.get("estimator") or {}, status.get("survey") or {})
    out += _certificate(status.get("dashboard") or {}, now)
    return out


def _source(src: dict[str, Any]) -> list[Check]:
    kind = src.get("source")
    if kind == "sim":
        return [Check("ok", "source", f"the simulator (scenario {src.get('scenario')}): no radio to check")]
    if kind == "replay":
        return [Check("ok", "source", f"a replay of {src.get('file')}: no radio to check")]
    if kind != "ble":
        return [Check("ok", "source", f"{kind or 'unknown'}")]
    out: list[Check] = []
    if not src.get("bus_connected"):
        out.append(
            Check("problem", "bluetooth", "not connected to BlueZ over D-Bus: systemctl status bluetooth (docs/ble.md)")
        )
    if src.get("problem"):
        out.append(Check("problem", "bluetooth", f"{src['problem']} (docs/ble.md)"))
    adapters: dict[str, dict[str, Any]] = src.get("adapters") or {}
    said = {e.get("adapter"): e.get("message") for e in src.get("events") or [] if e.get("event") != "recovered"}
    for name, a in adapters.items():
        label = f"adapter {name} (receiver {a.get('receiver')})"
        age = a.get("last_advert_age_s")
        if a.get("problem"):  # a code (absent, off, blocked, silent); the scanner's own words are in its events
            out.append(Check("problem", label, f"{said.get(name) or a['problem']} (docs/ble.md)"))
        elif a.get("state") == "starting":
            out.append(Check("warning", label, "still starting: ask again in a few seconds"))
        elif a.get("state") != "scanning":
            out.append(
                Check(
                    "problem",
                    label,
                    f"is {a.get('state')}, not scanning: systemctl restart visita, then "
                    "check `bluetoothctl list` and dmesg for the adapter (docs/ble.md)",
                )
            )
        elif age is None or age > QUIET_S:
            heard = "has heard nothing since the start" if age is None else f"has heard nothing for {age:.0f} s"
            out.append(
                Check(
                    "warning",
                    label,
                    f"{heard}: check that it is plugged in, and where it is (a metal "
                    "shelf or fridge between it and the floor shields it)",
                )
            )
        else:
            out.append(Check("ok", label, f"scanning, {a.get('adverts_per_s', 0)} adverts/s"))
    if not adapters and not out:
        out.append(Check("problem", "bluetooth", "no adapter is in use (docs/ble.md)"))
    return out


def _clock(clock: dict[str, Any]) -> list[Check]:
    if not clock.get("live"):
        return []  # a simulation or a rehearsal keeps its own time
    out: list[Check] = []
    if clock.get("synchronised") is False:
        out.append(
            Check(
                "warning",
                "clock",
                "the system clock is not synchronised (NTP): if it is wrong, members' phones are not recognised, "
                "check-ins are refused and events carry the wrong time (until it is stepped right); check "
                "`timedatectl` and the network's NTP (docs/install.md, Time)",
            )
        )
    if clock.get("steps"):
        out.append(
            Check(
                "warning",
                "clock",
                f"the system clock was stepped forward {clock['steps']} time(s) while running: the visits open then "
                "went on, but what was published before carries times that were wrong by as much (docs/install.md, "
                "Time)",
            )
        )
    if out:
        return out
    if clock.get("synchronised") is None:  # not Linux, or a sandbox that refuses adjtimex (systemd's ProtectClock=)
        return [Check("ok", "clock", "the gateway cannot tell whether it is synchronised: `timedatectl` says")]
    return [Check("ok", "clock", "synchronised")]


def _nodes(nodes: dict[str, Any] | None) -> list[Check]:
    if nodes is None:
        return []
    out: list[Check] = []
    if not nodes.get("connected", True):
        out.append(
            Check(
                "problem",
                "remote receivers",
                f"not connected to their broker {nodes.get('broker', '')} "
                f"({nodes.get('last_error') or 'no answer'}) (docs/nodes.md)",
            )
        )
    for name, n in (nodes.get("nodes") or {}).items():
        age = n.get("last_seen_age_s")
        if n.get("clock_clamped"):
            out.append(
                Check(
                    "warning",
                    name,
                    f"its clock is {n.get('clock_offset_measured_s')} s off ours, beyond "
                    "the limit: its sightings are dated at the limit; set up NTP on it",
                )
            )
        elif age is not None and age > QUIET_S:
            out.append(
                Check(
                    "warning",
                    name,
                    f"silent for {age:.0f} s: is it powered and on the store's network? (docs/nodes.md)",
                )
            )
        else:
            out.append(Check("ok", name, f"last heard {age} s ago, receivers {', '.join(n.get('receivers') or [])}"))
        if n.get("unfused_anon"):
            out.append(
                Check(
                    "warning",
                    name,
                    f"{n['unfused_anon']} anonymous sighting(s) not fused with this gateway's: {n.get('anon_problem')}",
                )
            )
    if nodes.get("malformed"):
        out.append(
            Check(
                "warning",
                "remote receivers",
                f"{nodes['malformed']} message(s) could not be read: a node "
                "with other firmware, or a peer of another version",
            )
        )
    return out


def _relay(relay: dict[str, Any], up: dict[str, Any], identity: dict[str, Any]) -> list[Check]:
    out: list[Check] = []
    dropped = relay.get("dropped_sightings", 0)
    if not up.get("connected"):
        out.append(
            Check(
                "problem",
                "relay",
                f"not connected to the store's broker {up.get('broker')} ({up.get('last_error') or 'no answer yet'}): "
                f"the main gateway hears nothing from this relay; {dropped} sighting(s) dropped so far (live data, "
                "never queued): check the broker, the network and the credentials",
            )
        )
    else:
        out.append(
            Check(
                "ok" if not dropped else "warning",
                "relay",
                f"publishing to {up.get('broker')}: {relay.get('batches', 0)} batch(es), {relay.get('sightings', 0)} "
                f"sighting(s)"
                + (f"; {dropped} dropped during {relay.get('outages')} broker outage(s)" if dropped else ""),
            )
        )
    if identity.get("anon_salt") != "store":
        out.append(
            Check(
                "warning",
                "anonymous phones",
                "no store secret (identity.anon_secret_file): an anonymous phone this relay and the main gateway both "
                "hear is two subjects there, counted twice in footfall; copy the main gateway's secret file here "
                "(docs/nodes.md)",
            )
        )
    return out


def _uplink(up: dict[str, Any], store: dict[str, Any]) -> list[Check]:
    broker = up.get("broker")
    waiting = store.get("outbox_depth", 0)
    if broker == "off":
        return [
            Check(
                "warning",
                "MQTT",
                "the uplink is off (--mqtt off): events stay in the outbox, nothing reaches the backend",
            )
        ]
    if not up.get("connected"):
        why = up.get("last_error") or "no answer yet"
        return [
            Check(
                "problem",
                "MQTT",
                f"not connected to {broker} ({why}); {waiting} event(s) wait in the "
                "outbox and are sent once it is back: check the broker, the network and "
                "the credentials (docs/install.md)",
            )
        ]
    if up.get("refusing"):
        return [
            Check(
                "problem",
                "MQTT",
                f"connected to {broker}, but it refuses this gateway's events ({up.get('last_error')}); {waiting} "
                "event(s) wait in the outbox and are sent once it accepts them: check the broker's ACL for the "
                "gateway's topics (docs/events.md, Delivery)",
            )
        ]
    if store.get("disk_full"):
        # Not a slow broker: events are published once they are on disk.
        waits = f"{waiting} event(s) wait to be written first (disk full, below)"
        return [Check("ok", "MQTT", f"connected to {broker}; {waits}")]
    if waiting > OUTBOX_WARN:
        return [
            Check(
                "warning",
                "MQTT",
                f"connected to {broker}, but {waiting} events wait in the outbox: delivery "
                "is falling behind (a slow link, or a broker limiting this client)",
            )
        ]
    return [Check("ok", "MQTT", f"connected to {broker}, {waiting} event(s) waiting")]


def _store(store: dict[str, Any]) -> list[Check]:
    out: list[Check] = []
    if store.get("disk_full"):
        out.append(
            Check(
                "problem",
                "storage",
                f"the disk is full ({store.get('last_error')}): new events are held in "
                "memory only and a power cut loses them; free space on the SD card",
            )
        )
    dropped = store.get("outbox_dropped") or {}
    if dropped:
        what = ", ".join(f"{n} {t}" for t, n in dropped.items())
        out.append(
            Check(
                "warning",
                "storage",
                f"the outbox was full and dropped {what} (visits and awards never): "
                "the broker was away long; storage.outbox_max can hold more",
            )
        )
    if not out:
        out.append(
            Check(
                "ok",
                "storage",
                f"{store.get('outbox_depth', 0)} event(s) in the outbox, "
                f"{store.get('recent_visits', 0)} recent visits kept"
                # `last_error` stays after the disk has room again: a past disk-full, written since.
                + (f" (earlier: {store['last_error']}; written since)" if store.get("last_error") else ""),
            )
        )
    return out


def _beacons(identity: dict[str, Any]) -> list[Check]:
    out: list[Check] = []
    for beacon, mv in sorted((identity.get("beacon_battery_mv") or {}).items()):
        if isinstance(mv, (int, float)) and mv < BATTERY_LOW_MV:
            out.append(Check("warning", beacon, f"battery at {mv} mV: replace it soon"))
    return out


def _members(identity: dict[str, Any]) -> list[Check]:
    if identity.get("members_known", 0) == 0:
        return [
            Check(
                "warning",
                "members",
                "no member keys: members' phones count as anonymous shoppers and earn no "
                "points; the backend sends them with cmd/members, or `visita keys import` "
                "(docs/checkin.md)",
            )
        ]
    return [Check("ok", "members", f"{identity['members_known']} member key(s)")]


def _estimator(est: dict[str, Any], survey: dict[str, Any]) -> list[Check]:
    name, resolution = est.get("estimator"), est.get("resolution")
    out = [Check("ok", "zones", f"estimator {name}, resolution {resolution}")]
    if name == "strongest-receiver":
        out = [
            Check(
                "warning",
                "zones",
                "the plan has no geometry (zone polygons, receiver positions): zones come "
                "from the strongest receiver only; `visita config check` names what is "
                "missing (docs/estimation.md)",
            )
        ]
    unknown = est.get("unknown_receivers") or []
    if est.get("unknown_receiver_sightings"):
        named = ", ".join(unknown) if unknown else "some receivers"
        out.append(
            Check(
                "warning",
                "receivers",
                f"{est['unknown_receiver_sightings']} sighting(s) from {named}, not in the plan, were not used: map an "
                "ESPresense node's room to its plan receiver with --room ROOM=RECEIVER, or name the room after it "
                "(docs/nodes.md)",
            )
        )
    if survey.get("problem"):
        out.append(Check("warning", "survey", f"the survey map is not used: {survey['problem']} (docs/survey.md)"))
    return out


def _certificate(dash: dict[str, Any], now: float) -> list[Check]:
    until = dash.get("certificate_until")
    if not until:
        return []
    end = datetime.fromisoformat(until)
    if end.tzinfo is None:
        end = end.replace(tzinfo=UTC)
    days = (end.timestamp() - now) / 86_400
    if days < 0:
        return [
            Check(
                "problem",
                "HTTPS",
                f"the dashboard's certificate ended on {until}: browsers and `visita survey` "
                "refuse it; renew dashboard.tls_cert_file and restart (docs/install.md)",
            )
        ]
    if days < CERT_WARN_DAYS:
        return [Check("warning", "HTTPS", f"the dashboard's certificate ends in {days:.0f} days ({until}): renew it")]
    return [Check("ok", "HTTPS", f"certificate valid until {until}")]
