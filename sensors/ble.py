"""The gateway's own radio: bleak's BleakScanner on BlueZ, supervised so it keeps hearing.

One `BleSource` drives every local adapter (hci0, hci1, ...), each mapped to a receiver of
the store plan. bleak's detection callback turns each AdvertisementData into an `Advert`
stamped by the clock passed in, into a bounded buffer that `poll(now)` drains.

Scanning is passive where BlueZ offers it (an `org.bluez.AdvertisementMonitorManager1`
supporting "or_patterns"), active otherwise. Passive scanning sends no scan requests, so
phones and beacons are not woken for scan responses, and several gateways do not disturb
each other; BlueZ only offers it through advertisement monitors, which need at least one
or-pattern (bleak refuses passive mode without one). The patterns below match every frame
Visita decodes (docs/frames.md), so a passive scan loses nothing the pipeline would use.

A supervisor task checks the radio every `check_s` (and at once when D-Bus signals a change
of org.bluez's owner or of an adapter) over a D-Bus connection of its own, and recovers from
what radios do on a Pi: no system bus yet, bluetoothd not running or restarted, the adapter
unplugged and back, powered off, discovery stopped by itself, and the silent scan (discovery
claims to run, no error, nothing heard: Theengs Gateway #99, bleak #832 and #1603). When the
store has fixed beacons (`expected_beacons`), silence longer than `silence_s` is impossible,
so the watchdog restarts discovery, then power-cycles the adapter (Adapter1.Powered off/on),
then keeps power-cycling every `repeat_power_cycle_s`. Every problem is logged once when it
starts and once when it is over, and shows in `diagnostics()`.

Memory stays bounded under a flood of new random addresses: the buffer has a cap (drops
are counted), bluetoothd removes unheard devices after its TemporaryTimeout, and bleak's
own per-scanner cache of every device seen since the scan started (`seen_devices`, which
Visita never reads) is emptied whenever it passes `bleak_cache_max`. After a bluetoothd
restart bleak's connection is renewed, so devices of the dead bluetoothd that were never
removed (it may have crashed) leave bleak's object cache too.

Only this module imports bleak. It talks to BlueZ with dbus-fast (a bleak dependency) for
what bleak does not offer: adapter state, power, and org.bluez's owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from bleak import BleakScanner
from bleak.args.bluez import BlueZScannerArgs, OrPattern
from bleak.assigned_numbers import AdvertisementDataType
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from gateway.model import Advert
from sensors.base import rate_per_s

log = logging.getLogger("visita.ble")

ScanMode = Literal["auto", "passive", "active"]
Pattern = tuple[int, int, bytes]
"""An or-pattern: (start position in the AD data, AD type, bytes that must be there)."""

BLUEZ = "org.bluez"
ADAPTER1 = "org.bluez.Adapter1"
MONITOR_MANAGER1 = "org.bluez.AdvertisementMonitorManager1"
PROPERTIES = "org.freedesktop.DBus.Properties"
DEFAULT_BUS = "unix:path=/run/dbus/system_bus_socket"

DEFAULT_OR_PATTERNS: tuple[Pattern, ...] = (
    (0, 0xFF, b"\x4c\x00"),  # Apple (0x004C, little-endian): iBeacon, Continuity frames of phones
    (0, 0xFF, b"\x75\x00"),  # Samsung (0x0075)
    (0, 0xFF, b"\xff\xff"),  # Visita member frame (company id 0xFFFF, docs/frames.md)
    (2, 0xFF, b"\xbe\xac"),  # AltBeacon: beacon code 0xBEAC right after any company id
    (0, 0x16, b"\xaa\xfe"),  # Eddystone: 16-bit service data 0xFEAA
)
"""What passive scanning asks BlueZ for: every frame Visita decodes, nothing else."""


@dataclass(frozen=True, slots=True)
class BleOptions:
    """How the BLE source scans and watches itself; every duration is wall-clock seconds."""

    adapters: tuple[tuple[str, str], ...] = (("hci0", "rx-1"),)
    """(adapter name, receiver id) pairs: which local adapter hears for which receiver of the plan."""
    mode: ScanMode = "auto"
    """passive, active, or auto: passive where BlueZ offers advertisement monitors, else active."""
    or_patterns: tuple[Pattern, ...] = DEFAULT_OR_PATTERNS
    """Patterns for passive scanning: an advert matching none is not delivered by BlueZ."""
    expected_beacons: int = 0
    """Fixed beacons advertising in range of every adapter; 0 disarms the silence watchdog."""
    silence_s: float = 4.0
    """Silence this long with expected beacons means the scan is dead."""
    recheck_s: float = 2.0
    """After a recovery step, how long to wait for adverts before the next step."""
    repeat_power_cycle_s: float = 30.0
    """While still silent after the first power cycle, power-cycle again this often."""
    check_s: float = 0.5
    """How often the supervisor checks each adapter (it also wakes on D-Bus signals)."""
    call_timeout_s: float = 3.0
    """Longest wait for one D-Bus call or a scanner start/stop."""
    retry_max_s: float = 5.0
    """Longest wait between attempts to reach the system bus."""
    power_on: bool = True
    """Power on an adapter found off (`bluetoothctl power on`)."""
    buffer_max: int = 100_000
    """Adverts kept between two polls; beyond this the oldest are dropped and counted."""
    bleak_cache_max: int = 2_000
    """Empty bleak's per-scanner device cache (unused by Visita) when it holds more than this."""

    def __post_init__(self) -> None:
        problems = []
        if not self.adapters:
            problems.append("adapters: at least one adapter is needed")
        names = [a for a, _ in self.adapters]
        if len(set(names)) != len(names):
            problems.append(f"adapters: {', '.join(names)}: each adapter may appear once")
        for name, receiver in self.adapters:
            if not name or "/" in name or not receiver:
                problems.append(f"adapters: {name!r}={receiver!r}: give an adapter name like hci0 and a receiver id")
        if self.mode not in ("auto", "passive", "active"):
            problems.append(f"mode = {self.mode!r}: must be auto, passive or active")
        if self.mode == "passive" and not self.or_patterns:
            problems.append("or_patterns: passive scanning on BlueZ needs at least one or-pattern")
        if self.expected_beacons < 0:
            problems.append(f"expected_beacons = {self.expected_beacons}: must be 0 or more")
        for name in ("silence_s", "recheck_s", "repeat_power_cycle_s", "check_s", "call_timeout_s", "retry_max_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} = {getattr(self, name)}: must be more than 0")
        if self.buffer_max < 1 or self.bleak_cache_max < 1:
            problems.append("buffer_max and bleak_cache_max must be at least 1")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(slots=True)
class _Radio:
    """One adapter's scanner and health; mutated only on the event loop."""

    name: str
    receiver: str
    path: str
    state: str = "starting"
    scanner: BleakScanner | None = None
    mode: str | None = None
    scan_started: float = 0.0
    last_advert: float = 0.0
    adverts: int = 0
    problem: str | None = None
    problem_since: float = 0.0
    stage: int = 0
    stage_at: float = 0.0
    passive_failed: bool = False
    discovery_restarts: int = 0
    power_cycles: int = 0
    rescans: int = 0
    watchdog_trips: int = 0
    bleak_cache_trims: int = 0
    last_recovery_s: float | None = None
    rate: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))


class BleSource:
    """Adverts from the local Bluetooth adapters through bleak, with a watchdog.

    `clock` stamps each advert when bleak hands it over (the runtime's data clock).
    """

    name = "ble"

    def __init__(self, options: BleOptions, clock: Callable[[], float]) -> None:
        self.options = options
        self._clock = clock
        self._radios = [_Radio(a, r, f"/org/bluez/{a}") for a, r in options.adapters]
        self._lock = threading.Lock()
        self._buffer: deque[Advert] = deque()
        self._dropped = 0
        self._no_rssi = 0
        self._bus: MessageBus | None = None
        self._owner: str | None = None
        self._owner_lost = False
        self._problem: str | None = None
        self._problem_since = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._events: deque[dict[str, Any]] = deque(maxlen=50)
        self._bus_address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_BUS
        self._patterns = [OrPattern(s, AdvertisementDataType(t), c) for s, t, c in options.or_patterns]

    # ------------------------------------------------------------------ Source

    async def start(self) -> None:
        """Start the supervisor; it connects, starts scanning and keeps retrying in the background."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._supervise(), name="visita-ble-supervisor")

    def poll(self, now: float) -> list[Advert]:
        """Adverts stamped up to `now` since the last call, in time order."""
        out: list[Advert] = []
        with self._lock:
            buf = self._buffer
            while buf and buf[0].ts <= now:
                out.append(buf.popleft())
        return out

    async def stop(self) -> None:
        """Stop the supervisor and every scanner, and leave the bus."""
        task, self._task = self._task, None
        if task is not None:
            # On Python 3.11 asyncio.wait_for loses a cancellation that arrives as the call it waits on completes
            # (CPython gh-86296, fixed in 3.12). When the supervisor's idle wait used it, a flood of adverts (whose
            # signals keep waking it) made one cancel() go unheard and stop() hung (the flood test, twice in CI).
            # The idle wait now uses asyncio.timeout; the D-Bus calls still use wait_for, so cancel until it has ended.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for r in self._radios:
            await self._drop_scanner(r)
            r.state = "stopped"
        await self._renew_bleak(reconnect=False)
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    def diagnostics(self) -> dict[str, Any]:
        """Scan health: adverts/s, adapter states, last advert age, restarts, recent events."""
        mono = time.monotonic()
        adapters = {}
        for r in self._radios:
            seen = self._bleak_cache(r)
            adapters[r.name] = {
                "receiver": r.receiver,
                "state": r.state,
                "mode": r.mode,
                "adverts": r.adverts,
                "adverts_per_s": round(rate_per_s(r.rate), 1),
                "last_advert_age_s": round(mono - r.last_advert, 1) if r.last_advert else None,
                "problem": r.problem,
                "discovery_restarts": r.discovery_restarts,
                "power_cycles": r.power_cycles,
                "rescans": r.rescans,
                "watchdog_trips": r.watchdog_trips,
                "last_recovery_s": r.last_recovery_s,
                "bleak_seen_devices": len(seen) if seen is not None else None,
                "bleak_cache_trims": r.bleak_cache_trims,
            }
        with self._lock:
            buffered = len(self._buffer)
        return {
            "source": self.name,
            "bus": self._bus_address,
            "bus_connected": self._bus is not None and self._bus.connected,
            "bluetoothd": self._owner,
            "problem": self._problem,
            "adverts": sum(r.adverts for r in self._radios),
            "adverts_per_s": round(sum(rate_per_s(r.rate) for r in self._radios), 1),
            "buffered": buffered,
            "dropped": self._dropped,
            "no_rssi": self._no_rssi,
            "watchdog": {
                "armed": self.options.expected_beacons > 0,
                "expected_beacons": self.options.expected_beacons,
                "silence_s": self.options.silence_s,
            },
            "adapters": adapters,
            "events": list(self._events),
        }

    # ------------------------------------------------------------------ callback

    def _on_advert(self, radio: _Radio, device: BLEDevice, ad: AdvertisementData) -> None:
        """bleak's detection callback: on the event loop, for every Device1 change BlueZ signals."""
        props = ad.platform_data[1] if len(ad.platform_data) > 1 else {}
        if "RSSI" not in props:
            # bluetoothd removes RSSI when discovery stops; that change is not an advert.
            self._no_rssi += 1
            return
        adv = Advert(
            ts=self._clock(),
            receiver=radio.receiver,
            address=device.address,
            address_random=props.get("AddressType") == "random",
            rssi=int(ad.rssi),
            tx_power=ad.tx_power,
            manufacturer_data=ad.manufacturer_data,
            service_data=ad.service_data,
            service_uuids=tuple(ad.service_uuids),
            local_name=ad.local_name,
        )
        with self._lock:
            if len(self._buffer) >= self.options.buffer_max:
                self._buffer.popleft()
                self._dropped += 1
            self._buffer.append(adv)
        radio.adverts += 1
        radio.last_advert = time.monotonic()

    # ------------------------------------------------------------------ supervision

    async def _supervise(self) -> None:
        delay = self.options.check_s
        while True:
            self._wake.clear()  # a signal (or a step asking for another look) during the check wakes the next one
            try:
                ok = await self._check()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the supervisor must outlive anything D-Bus or bleak throws
                self._global_problem("internal", f"BLE supervisor error: {e!r}; retrying")
                ok = False
            delay = self.options.check_s if ok else min(delay * 2, self.options.retry_max_s)
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that arrives as the wait ends
            # (see stop()), and this idle wait is where the supervisor spends its time.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _check(self) -> bool:
        bus = await self._ensure_bus()
        if bus is None:
            for r in self._radios:
                await self._drop_scanner(r)
                r.state = "no-bus"
            return False
        owner = await self._name_owner(bus)
        if owner is None:
            self._global_problem(
                "no-bluetoothd",
                f"bluetoothd is not running (nobody owns {BLUEZ} on the system bus {self._bus_address}): "
                "start it with `sudo systemctl start bluetooth`; retrying",
            )
            self._owner_lost = self._owner is not None or self._owner_lost
            for r in self._radios:
                await self._drop_scanner(r)
                r.state = "no-bluetoothd"
            return True
        if self._owner_lost or (self._owner is not None and owner != self._owner):
            if self._problem != "no-bluetoothd":
                self._global_problem("bluetoothd-restarted", f"bluetoothd restarted ({BLUEZ} {self._owner} -> {owner})")
            for r in self._radios:
                if r.scanner is not None or r.state == "no-bluetoothd":
                    r.rescans += 1
                await self._drop_scanner(r)
            await self._renew_bleak()
        self._owner, self._owner_lost = owner, False
        self._global_resolved(f"bluetoothd is up ({BLUEZ} {owner})")
        for r in self._radios:
            await self._check_radio(bus, r)
        return True

    async def _check_radio(self, bus: MessageBus, r: _Radio) -> None:
        mono = time.monotonic()
        r.rate.append((mono, r.adverts))
        if r.problem == "silent" and r.last_advert > r.stage_at:
            step = {1: "restarting discovery", 2: "a power cycle"}.get(r.stage, "repeated power cycles")
            self._resolved(r, f"{r.name}: adverts again, after {step}")
        props = await self._get_all(bus, r.path, ADAPTER1)
        if props is None:
            await self._drop_scanner(r)
            r.state = "absent"
            if r.problem != "absent":
                present = await self._adapter_names(bus)
                self._radio_problem(
                    r,
                    "absent",
                    f"adapter {r.name} not found (bluetoothd has: {', '.join(present) or 'no adapter'}): "
                    "is the dongle plugged in (`btmgmt info`)? waiting for it",
                )
            return
        if not props.get("Powered", False):
            await self._drop_scanner(r)
            r.state = "off"
            if not self.options.power_on:
                self._radio_problem(r, "off", f"adapter {r.name} is powered off: `bluetoothctl power on`; waiting")
                return
            error = await self._set_powered(bus, r, True)
            if error is not None:
                r.state = "blocked"
                self._radio_problem(
                    r,
                    "blocked",
                    f"adapter {r.name} is powered off and cannot be powered on ({error}): "
                    "check `rfkill list` and `rfkill unblock bluetooth`; retrying",
                )
            else:
                if r.problem != "blocked":  # unblocked: the "scanning again" line tells the rest
                    self._radio_problem(r, "off", f"adapter {r.name} was powered off; powered it on")
                self._wake.set()
            return
        if r.scanner is None:
            await self._start_scanner(bus, r)
            return
        self._trim_bleak_cache(r)
        if r.mode == "active" and not props.get("Discovering", False) and mono - r.scan_started > 1.0:
            r.discovery_restarts += 1
            self._radio_problem(r, "discovery-stopped", f"{r.name}: discovery stopped by itself; restarting it")
            await self._restart_scanner(bus, r)
            return
        await self._watchdog(bus, r, mono)

    async def _watchdog(self, bus: MessageBus, r: _Radio, mono: float) -> None:
        n = self.options.expected_beacons
        if n <= 0:
            return
        if r.stage == 0:
            quiet = mono - max(r.last_advert, r.scan_started)
            if quiet >= self.options.silence_s:
                r.watchdog_trips += 1
                r.discovery_restarts += 1
                r.stage, r.stage_at = 1, mono
                self._radio_problem(
                    r,
                    "silent",
                    f"{r.name}: nothing heard for {quiet:.1f} s although {n} beacon(s) advertise here: "
                    "the scan is silent; restarting discovery",
                )
                await self._restart_scanner(bus, r)
            return
        if r.last_advert > r.stage_at:
            return  # resolved at the next check
        waited = mono - r.stage_at
        if r.stage == 1 and waited >= self.options.recheck_s:
            log.warning("%s: still silent after restarting discovery; power-cycling the adapter", r.name)
            r.stage, r.stage_at = 2, mono
            await self._power_cycle(bus, r)
        elif r.stage == 2 and waited >= self.options.recheck_s:
            log.error(
                "%s: still silent after a power cycle; power-cycling every %g s until adverts come back "
                "(check the dongle and `btmon`)",
                r.name,
                self.options.repeat_power_cycle_s,
            )
            r.stage, r.stage_at = 3, mono
            await self._power_cycle(bus, r)
        elif r.stage == 3 and waited >= self.options.repeat_power_cycle_s:
            r.stage_at = mono
            await self._power_cycle(bus, r)

    # ------------------------------------------------------------------ scanners

    def _make_scanner(self, r: _Radio, mode: str) -> BleakScanner:
        args: BlueZScannerArgs = {"adapter": r.name}
        if mode == "passive":
            args["or_patterns"] = list(self._patterns)
            return BleakScanner(partial(self._on_advert, r), scanning_mode="passive", bluez=args)
        return BleakScanner(partial(self._on_advert, r), scanning_mode="active", bluez=args)

    async def _start_scanner(self, bus: MessageBus, r: _Radio) -> None:
        mode = self.options.mode
        if mode == "auto":
            mode = "passive" if not r.passive_failed and await self._passive_supported(bus, r) else "active"
        scanner = self._make_scanner(r, mode)
        try:
            await asyncio.wait_for(scanner.start(), self.options.call_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # bleak raises BleakError, BleakDBusError, dbus-fast errors, OSError, EOFError
            with contextlib.suppress(Exception):
                await asyncio.wait_for(scanner.stop(), self.options.call_timeout_s)
            if mode == "passive" and self.options.mode == "auto":
                r.passive_failed = True
                log.info("%s: passive scanning unavailable (%s); scanning actively", r.name, _say(e))
                self._wake.set()
                return
            self._radio_problem(r, "scan-failed", f"{r.name}: cannot start scanning: {_say(e)}; retrying")
            return
        r.scanner, r.mode, r.scan_started, r.state = scanner, mode, time.monotonic(), "scanning"
        if r.problem is None and r.adverts == 0 and r.rescans == 0:
            log.info("%s (receiver %s): scanning, %s", r.name, r.receiver, mode)
        elif r.problem not in (None, "silent"):
            self._resolved(r, f"{r.name}: scanning again ({mode})")

    async def _drop_scanner(self, r: _Radio) -> None:
        scanner, r.scanner = r.scanner, None
        if scanner is not None:
            # Stopping a scan on a vanished adapter or bluetoothd fails; the scan is gone either way.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(scanner.stop(), self.options.call_timeout_s)

    async def _restart_scanner(self, bus: MessageBus, r: _Radio) -> None:
        await self._drop_scanner(r)
        await self._start_scanner(bus, r)

    async def _power_cycle(self, bus: MessageBus, r: _Radio) -> None:
        r.power_cycles += 1
        await self._drop_scanner(r)
        error = await self._set_powered(bus, r, False)
        if error is None:
            for _ in range(20):
                props = await self._get_all(bus, r.path, ADAPTER1)
                if props is None or not props.get("Powered", False):
                    break
                await asyncio.sleep(0.05)
            error = await self._set_powered(bus, r, True)
        if error is not None:
            log.warning("%s: power cycle failed: %s", r.name, error)
            return
        await self._start_scanner(bus, r)

    def _bleak_cache(self, r: _Radio) -> dict[Any, Any] | None:
        # bleak keeps (BLEDevice, AdvertisementData) for every device seen since the scan
        # started, until BlueZ removes the device; Visita never reads it. Not public API,
        # hence the guarded lookup.
        backend = getattr(r.scanner, "_backend", None)
        seen = getattr(backend, "seen_devices", None)
        return seen if isinstance(seen, dict) else None

    def _trim_bleak_cache(self, r: _Radio) -> None:
        seen = self._bleak_cache(r)
        if seen is not None and len(seen) > self.options.bleak_cache_max:
            seen.clear()
            r.bleak_cache_trims += 1

    async def _renew_bleak(self, reconnect: bool = True) -> None:
        """Give bleak a fresh connection (its object cache then holds only the new bluetoothd's
        objects), or with `reconnect` false just close it (on stop)."""
        from bleak.backends.bluezdbus import manager as bluez_manager

        # bleak has no public way to drop its connection and object cache: it keeps one
        # manager per event loop, whose bus it renews by itself once that bus is closed.
        manager_log = logging.getLogger("bleak.backends.bluezdbus.manager")
        level = manager_log.level
        manager_log.setLevel(logging.ERROR)  # its "connection lost" warning: we cut it on purpose
        try:
            manager = bluez_manager._global_instances.get(asyncio.get_running_loop())
            bus = getattr(manager, "_bus", None)
            if isinstance(bus, MessageBus) and bus.connected:
                bus.disconnect()
                watcher = getattr(manager, "_bus_watcher_task", None)
                if isinstance(watcher, asyncio.Task):
                    await asyncio.wait({watcher}, timeout=self.options.call_timeout_s)
            if reconnect:
                await asyncio.wait_for(bluez_manager.get_global_bluez_manager(), self.options.call_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.debug("renewing bleak's connection: %s", _say(e))
        finally:
            manager_log.setLevel(level)

    # ------------------------------------------------------------------ D-Bus

    async def _ensure_bus(self) -> MessageBus | None:
        if self._bus is not None and self._bus.connected:
            return self._bus
        if self._bus is not None:
            with contextlib.suppress(Exception):
                self._bus.disconnect()
            self._bus = None
        self._bus_address = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or DEFAULT_BUS
        try:
            bus = await asyncio.wait_for(MessageBus(bus_type=BusType.SYSTEM).connect(), self.options.call_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._global_problem(
                "no-bus",
                f"no D-Bus system bus at {self._bus_address} ({_say(e)}): is dbus running "
                "(`systemctl status dbus`), or DBUS_SYSTEM_BUS_ADDRESS right? retrying",
            )
            return None
        bus.add_message_handler(self._on_signal)
        rules = [
            f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{BLUEZ}'",
            f"type='signal',interface='{PROPERTIES}',member='PropertiesChanged',arg0='{ADAPTER1}'",
        ]
        for r in self._radios:
            for member in ("InterfacesAdded", "InterfacesRemoved"):
                rules.append(f"type='signal',member='{member}',arg0path='{r.path}'")
        try:
            for rule in rules:
                await self._call(
                    bus,
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus",
                    "AddMatch",
                    "s",
                    [rule],
                )
        except Exception as e:
            bus.disconnect()
            self._global_problem(
                "no-bus", f"D-Bus system bus at {self._bus_address} refused a match rule ({_say(e)}); retrying"
            )
            return None
        self._bus = bus
        self._owner_lost = self._owner is not None or self._owner_lost
        self._global_resolved(f"connected to the D-Bus system bus at {self._bus_address}")
        return bus

    def _on_signal(self, msg: Message) -> bool:
        if msg.message_type == MessageType.SIGNAL:
            self._wake.set()
        return False

    async def _call(
        self, bus: MessageBus, dest: str, path: str, iface: str, member: str, sig: str = "", body: Sequence[Any] = ()
    ) -> Message:
        msg = Message(destination=dest, path=path, interface=iface, member=member, signature=sig, body=list(body))
        reply = await asyncio.wait_for(bus.call(msg), self.options.call_timeout_s)
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise _DBusFailure(reply.error_name or "error", str(reply.body[0]) if reply.body else "")
        return reply

    async def _name_owner(self, bus: MessageBus) -> str | None:
        try:
            reply = await self._call(
                bus,
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "GetNameOwner",
                "s",
                [BLUEZ],
            )
        except _DBusFailure:
            return None
        return str(reply.body[0])

    async def _get_all(self, bus: MessageBus, path: str, iface: str) -> dict[str, Any] | None:
        try:
            reply = await self._call(bus, BLUEZ, path, PROPERTIES, "GetAll", "s", [iface])
        except (_DBusFailure, TimeoutError):
            return None
        return {k: v.value for k, v in reply.body[0].items()}

    async def _adapter_names(self, bus: MessageBus) -> list[str]:
        try:
            reply = await self._call(bus, BLUEZ, "/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        except (_DBusFailure, TimeoutError):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p, ifaces in reply.body[0].items() if ADAPTER1 in ifaces)

    async def _passive_supported(self, bus: MessageBus, r: _Radio) -> bool:
        props = await self._get_all(bus, r.path, MONITOR_MANAGER1)
        return props is not None and "or_patterns" in props.get("SupportedMonitorTypes", [])

    async def _set_powered(self, bus: MessageBus, r: _Radio, on: bool) -> str | None:
        try:
            await self._call(bus, BLUEZ, r.path, PROPERTIES, "Set", "ssv", [ADAPTER1, "Powered", Variant("b", on)])
        except (_DBusFailure, TimeoutError) as e:
            return _say(e)
        return None

    # ------------------------------------------------------------------ logging once

    def _event(self, adapter: str | None, kind: str, message: str) -> None:
        self._events.append({"ts": self._clock(), "adapter": adapter, "event": kind, "message": message})

    def _global_problem(self, key: str, message: str) -> None:
        if self._problem == key:
            return
        self._problem, self._problem_since = key, time.monotonic()
        log.warning("%s", message)
        self._event(None, key, message)

    def _global_resolved(self, message: str) -> None:
        if self._problem is None:
            return
        took = time.monotonic() - self._problem_since
        self._problem = None
        log.info("%s (after %.1f s)", message, took)
        self._event(None, "resolved", message)

    def _radio_problem(self, r: _Radio, key: str, message: str) -> None:
        if r.problem == key:
            return
        if r.problem is None:
            r.problem_since = time.monotonic()
        r.problem = key
        log.warning("%s", message)
        self._event(r.name, key, message)

    def _resolved(self, r: _Radio, message: str) -> None:
        if r.problem is None:
            return
        took = time.monotonic() - r.problem_since
        r.problem, r.stage, r.last_recovery_s = None, 0, round(took, 2)
        log.info("%s after %.1f s", message, took)
        self._event(r.name, "recovered", f"{message} after {took:.1f} s")


class _DBusFailure(Exception):
    """An error reply: its D-Bus error name and text."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(f"{name}: {text}" if text else name)


def _say(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
