"""Downlink commands: ``visita/v1/<store>/<gateway>/cmd/<name>`` in, ``.../cmd_result/<name>`` out.

A command's payload is a JSON object; an optional ``"id"`` (string) is echoed in the result
so the backend can match them. Each command is

- validated completely before anything changes;
- applied atomically, on the runtime's thread (the store and the pipeline are not
  thread-safe; paho's thread only queues the message);
- answered on ``cmd_result/<name>``: ``{"id", "name", "ok": true, ...handler's fields}``
  or ``{"id", "name", "ok": false, "error": "<reason>"}``. A refused command changed nothing. A name no handler
  serves is answered on ``cmd_result/unknown`` (`UNKNOWN`), its ``name`` field holding the name sent.
- refused when its payload has a top-level field the command does not take (`only_fields`; ``id`` is every
  command's).

Who may send commands is the broker's business (its ACL on ``.../cmd/#``), not the gateway's.

Handlers are registered by name in `HANDLERS` (a dict name -> handler); a handler takes the
gateway and the parsed payload and returns the result's fields, or raises `CommandRefused`
with the reason. Built in: ``rules`` (replace the points rules, kept across restarts, or go back to the rules file) and
``config`` (change the settings that can change live). ``members`` (gateway/members.py)
is registered here too, through its own `apply_members_command`.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from gateway.config import ConfigError, validate

if TYPE_CHECKING:
    from gateway.members import MemberKeys
    from gateway.runtime import Gateway

log = logging.getLogger("visita.downlink")

MAX_PAYLOAD = 32 << 20
"""Largest command accepted, bytes: a full member set of 100,000 members is about 11.7 MB (117 bytes a member);
a larger programme sends a full set and then `add` commands (docs/checkin.md). The broker's own limit
(mosquitto `message_size_limit`, 0 = none by default) must allow as much."""
MAX_QUEUED = 100
"""Commands waiting for the runtime's next tick, at most; more are refused at once."""


class CommandRefused(Exception):
    """A command that is not applied; the message is the reason sent back."""


Handler = Callable[["Gateway", dict[str, Any]], dict[str, Any]]


def only_fields(payload: dict[str, Any], allowed: set[str]) -> None:
    """Refuse a payload with a top-level field the command does not take (``id`` is every command's): a field the
    backend thinks means something and the gateway ignores would make "ok" a lie."""
    extra = sorted(set(payload) - allowed - {"id"})
    if extra:
        raise CommandRefused(
            f"unknown field(s) {', '.join(extra)} (allowed: {', '.join(['id', *sorted(allowed - {'id'})])}); "
            "nothing changed"
        )


def _rules(gw: Gateway, payload: dict[str, Any]) -> dict[str, Any]:
    """``{"rules": [...]}``: the rules file's content as JSON; replaces the rules of the running gateway and is kept in
    the data directory, so that a restart applies it again. ``{"from_file": true}``: the config's rules file again."""

    from gateway.days import LocalDays
    from gateway.points import (
        PointsEngine,
        RuleSet,
        backend_rules_source,
        dead_rule_problems,
        drop_backend_rules,
        ledger_since,
        parse_rules,
        rules_from_file,
        save_backend_rules,
    )

    only_fields(payload, {"from_file", *RuleSet.model_fields})
    body = {k: v for k, v in payload.items() if k != "id"}
    command_id = payload.get("id") if isinstance(payload.get("id"), str) else None
    from_file = body.pop("from_file", False)
    if not isinstance(from_file, bool):
        raise CommandRefused('"from_file" must be true or false')
    if from_file and body:
        raise CommandRefused(f'"from_file" goes alone; drop {", ".join(sorted(body))}')
    data_dir = gw.store.path.parent
    try:
        if from_file:
            rules, source = rules_from_file(gw.settings.points.rules_path())
        else:
            rules = parse_rules(body, "cmd/rules")
        dead = dead_rule_problems(rules, [z.id for z in gw.settings.plan.zones], "cmd/rules")
        if dead:
            raise ConfigError(dead)
    except ConfigError as e:
        raise CommandRefused("; ".join(e.problems)) from None
    # Built completely (the ledger replayed into it) before it replaces the old engine.
    since = ledger_since(rules, gw.store.history_days())
    engine = PointsEngine(
        rules, LocalDays(gw.settings.timezone), gw.ledger(since), gw.members.tier, gw.members.known, since
    )
    # Kept on disk before they are applied: rules in force are never lost by a restart. Once the file is in place
    # they are applied even if the directory could not be synced (a restart would apply them too), and `synced`
    # says so.
    synced = True
    try:
        if from_file:
            drop_backend_rules(data_dir)
        else:
            received_at = time.time()
            source = backend_rules_source(data_dir, received_at, command_id)
            synced = save_backend_rules(data_dir, body, received_at, command_id)
    except OSError as e:
        what = "stop keeping the backend's rules in" if from_file else "keep the rules in"
        raise CommandRefused(f"cannot {what} {data_dir}: {e.strerror}; nothing changed") from None
    gw.points = engine
    gw.rules_source = source
    gw.tracker.mark_all_changed()  # open visits may earn under the new rules before they end
    return {"rules": [r.id for r in rules.rules], "source": "file" if from_file else "backend", "synced": synced}


LIVE_CONFIG = {
    "mqtt.max_rate": ("mqtt", "max_rate"),
    "mqtt.health_interval_s": ("mqtt", "health_interval_s"),
    "storage.outbox_max": ("storage", "outbox_max"),
}
"""Settings the ``config`` command may change while the gateway runs."""


def _config(gw: Gateway, payload: dict[str, Any]) -> dict[str, Any]:
    """``{"set": {"mqtt.max_rate": 500, ...}}``: keys of LIVE_CONFIG, validated like the config file."""
    from gateway.config import Settings

    only_fields(payload, {"set"})
    changes = payload.get("set")
    if not isinstance(changes, dict) or not changes:
        raise CommandRefused('"set" must be a non-empty object of setting: value')
    unknown = sorted(set(changes) - set(LIVE_CONFIG))
    if unknown:
        raise CommandRefused(f"cannot change {', '.join(unknown)} live (allowed: {', '.join(LIVE_CONFIG)})")
    data = gw.settings.model_dump()
    for key, value in changes.items():
        section, name = LIVE_CONFIG[key]
        data[section][name] = value
    try:
        settings: Settings = validate(Settings, data, "cmd/config")
    except ConfigError as e:
        raise CommandRefused("; ".join(e.problems)) from None
    # Everything validated: apply all of it.
    gw.settings = settings
    if gw.uplink is not None:
        gw.uplink.reconfigure(settings.mqtt)
    gw.store.set_outbox_max(settings.storage.outbox_max)
    return {"set": {k: changes[k] for k in sorted(changes)}}


class KeepsMembers(Protocol):
    """What the ``members`` command needs: a gateway, or a relay (gateway/relay.py), which serves only this one."""

    member_keys: MemberKeys | None


def members_command(gw: KeepsMembers, payload: dict[str, Any]) -> dict[str, Any]:
    """``members``: the member keys (gateway/members.py `apply_members_command`), kept in the vault."""
    from gateway.members import apply_members_command

    if gw.member_keys is None:
        raise CommandRefused("this gateway keeps no member keys")
    result = apply_members_command(gw.member_keys, {k: v for k, v in payload.items() if k != "id"})
    if not result.get("ok", False):
        raise CommandRefused(str(result.get("error", "refused")))
    return {k: v for k, v in result.items() if k != "ok"}


HANDLERS: dict[str, Handler] = {"rules": _rules, "config": _config, "members": members_command}
"""Command name -> handler; add an entry to serve a new command."""

UNKNOWN = "unknown"
"""Where a command whose name no handler serves is answered: ``cmd_result/unknown`` (its ``name`` field holds the
name sent), so the gateway publishes only on the channels docs/asyncapi.yaml lists, whatever a sender makes up."""


T = TypeVar("T")


class Downlink(Generic[T]):
    """Queues commands from paho's thread and applies them on the runtime's, one at a time."""

    def __init__(
        self,
        gw: T,
        reply: Callable[[str, bytes], None],
        handlers: Mapping[str, Callable[[T, dict[str, Any]], dict[str, Any]]] | None = None,
    ) -> None:
        """`handlers`: the commands served (default `HANDLERS`, a gateway's; a relay serves ``members`` only)."""
        self._gw = gw
        self._reply = reply
        self._handlers = handlers if handlers is not None else cast(Mapping[str, Callable[[T, Any], Any]], HANDLERS)
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(MAX_QUEUED)
        self.counts = {"applied": 0, "refused": 0}

    def receive(self, name: str, payload: bytes) -> None:
        """Called on paho's thread for each message on ``cmd/<name>``."""
        try:
            self._queue.put_nowait((name, payload))
        except queue.Full:
            self._answer(name, None, False, {"error": f"too many commands waiting (at most {MAX_QUEUED})"})

    def apply_pending(self) -> None:
        """Apply every queued command (runtime thread)."""
        while True:
            try:
                name, payload = self._queue.get_nowait()
            except queue.Empty:
                return
            self.apply(name, payload)

    def apply(self, name: str, payload: bytes) -> dict[str, Any]:
        """Validate and apply one command; returns (and publishes) the result."""
        cmd_id: str | None = None
        try:
            if len(payload) > MAX_PAYLOAD:
                raise CommandRefused(f"payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
            try:
                body = json.loads(payload)
            except (UnicodeDecodeError, ValueError):
                raise CommandRefused("payload is not UTF-8 JSON") from None
            if not isinstance(body, dict):
                raise CommandRefused("payload must be a JSON object")
            raw_id = body.get("id")
            if raw_id is not None and not (isinstance(raw_id, str) and len(raw_id) <= 128):
                raise CommandRefused('"id" must be a string of at most 128 characters')
            cmd_id = raw_id  # echoed from here on, an unknown command's too
            handler = self._handlers.get(name)
            if handler is None:
                raise CommandRefused(f"unknown command {name!r} (known: {', '.join(sorted(self._handlers))})")
            fields = handler(self._gw, body)
        except CommandRefused as e:
            log.warning("downlink command %s refused: %s (nothing changed)", name, e)
            return self._answer(name, cmd_id, False, {"error": str(e)})
        log.info("downlink command %s applied", name)
        return self._answer(name, cmd_id, True, fields)

    def _answer(self, name: str, cmd_id: str | None, ok: bool, fields: dict[str, Any]) -> dict[str, Any]:
        self.counts["applied" if ok else "refused"] += 1
        result = {"id": cmd_id, "name": name, "ok": ok, **fields}
        self._reply(name if name in self._handlers else UNKNOWN, json.dumps(result, separators=(",", ":")).encode())
        return result
