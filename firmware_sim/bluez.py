"""An emulated BlueZ on a private D-Bus, so the real bleak code path runs without a radio.

Three parts:

* `BusDaemon` starts a `dbus-daemon` with a system-bus config of its own (a socket in a
  temporary folder, EXTERNAL auth, a policy that lets anyone own, send and receive). Its
  address goes into `DBUS_SYSTEM_BUS_ADDRESS`, which is where bleak (and dbus-fast) look.
* `EmulatedBluez` owns `org.bluez` on that bus and offers what bleak uses: one
  `org.bluez.Adapter1` + `org.bluez.AdvertisementMonitorManager1` object per receiver
  (`/org/bluez/hci0`, ...), and `org.bluez.Device1` objects that appear through
  `InterfacesAdded`, change through `PropertiesChanged` carrying only the changed properties,
  and disappear through `InterfacesRemoved` when not heard for `device_timeout_s`, as
  bluetoothd does with temporary devices. `deliver(adverts)` plays `Advert`s (what
  `World.advance` returns) as if the adapter named after each advert's receiver heard them.
  Adverts only reach clients while a client is discovering (`StartDiscovery`) or has an
  advertisement monitor registered whose or-patterns match (passive scanning).
* Test hooks that make it misbehave the way radios on a Pi do: remove and re-add an
  adapter, power it off or block it (rfkill), stop discovery by itself, go silent while
  still claiming to discover, restart the whole service (cleanly or as a crash), and flood
  an adapter with new random addresses. The same hooks are on D-Bus, as the interface
  `org.visita.BluezEmulator1` of the name `org.visita.BluezEmulator` at `/org/visita/emulator`,
  so a test (or `busctl`) can drive an emulator running in another process; `EmulatorControl`
  is a small client for it.

BlueZ behaviour copied on purpose (bluez `src/adapter.c`, `src/device.c`): with bleak's
filter `DuplicateData=False` bluetoothd only signals a property that changed, so an advert
with the same RSSI and data as the previous one produces no signal at all; ManufacturerData
and ServiceData are merged per key; a client gets one discovery session and StartDiscovery
twice answers `org.bluez.Error.InProgress`; StopDiscovery without a session answers
`org.bluez.Error.Failed`; a powered-off adapter answers `org.bluez.Error.NotReady`; power
off ends every discovery session; sessions and monitors of a client that leaves the bus
are dropped.

Device1 objects are not `ServiceInterface`s: BlueZ's Device1 properties come and go
(`Name` only once heard, `TxPower` only when advertised, `RSSI` invalidated when discovery
stops), which a ServiceInterface's fixed property set cannot express, and a flood creates
thousands of them. They are answered and signalled by hand with the same messages.

What it does not model: the kernel and the controller (HCI, scan windows, the controller's
own duplicate filter and its resolving list), BR/EDR, connections and GATT, pairing, RSSI
and pathloss discovery filters, bluetoothd's MGMT-level timing, and the Release/DeviceFound/
DeviceLost calls on advertisement monitors (only Activate is called).
"""

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TextIO

from dbus_fast import BusType, DBusError, Message, MessageType, PropertyAccess, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusDict, DBusDouble, DBusObjectPath, DBusSignature, DBusStr, DBusUInt32
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property

from firmware_sim import frames
from gateway.model import Advert

if TYPE_CHECKING:
    from firmware_sim.scenario import Scenario

log = logging.getLogger("visita.sim.bluez")

BLUEZ = "org.bluez"
ADAPTER1 = "org.bluez.Adapter1"
DEVICE1 = "org.bluez.Device1"
MONITOR_MANAGER1 = "org.bluez.AdvertisementMonitorManager1"
MONITOR1 = "org.bluez.AdvertisementMonitor1"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"

CONTROL_NAME = "org.visita.BluezEmulator"
CONTROL_PATH = "/org/visita/emulator"
CONTROL_IFACE = "org.visita.BluezEmulator1"

DEVICE_TIMEOUT_S = 30.0
"""bluetoothd's default TemporaryTimeout (main.conf): an unheard temporary device is removed."""

SilenceClearedBy = Literal["discovery", "power", "never"]
StrList = Annotated[list[str], DBusSignature("as")]

_BASE_UUID_TAIL = "-0000-1000-8000-00805f9b34fb"


class BluezEmulatorError(Exception):
    """The emulated BlueZ cannot start; the message says what is missing and the fix."""


# --------------------------------------------------------------------------- the bus


_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>{listen}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
  </policy>
</busconfig>
"""


def dbus_daemon_binary() -> str | None:
    """The dbus-daemon executable, or None when it is not installed."""
    return shutil.which("dbus-daemon") or next(
        (p for p in ("/usr/bin/dbus-daemon", "/bin/dbus-daemon") if os.path.exists(p)), None
    )


class BusDaemon:
    """A private `dbus-daemon` acting as a system bus; `address` is set once started."""

    def __init__(self, socket_path: str | None = None) -> None:
        self.address = ""
        self.socket_path = socket_path
        """Listen on this socket (unix:path=...) instead of a fresh one in a temporary folder."""
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> str:
        """Start the daemon; returns its address. BluezEmulatorError names what is missing."""
        binary = dbus_daemon_binary()
        if binary is None:
            raise BluezEmulatorError(
                "dbus-daemon is not installed (Debian package dbus-daemon): apt-get install dbus-daemon, "
                "or run scripts/test.sh, which installs it"
            )
        self._dir = tempfile.mkdtemp(prefix="visita-dbus-")
        config = Path(self._dir) / "system.conf"
        listen = f"unix:path={self.socket_path}" if self.socket_path else f"unix:dir={self._dir}"
        config.write_text(_BUS_CONFIG.format(listen=listen))
        self._proc = subprocess.Popen(
            [binary, f"--config-file={config}", "--nofork", "--nopidfile", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # "Failed to set fd limit" when not root: harmless
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        line = b""
        while time.monotonic() < deadline and not line.endswith(b"\n"):
            chunk = self._proc.stdout.readline()
            if not chunk:
                break
            line += chunk
        self._proc.stdout.close()
        self.address = line.decode().strip()
        if not self.address:
            self.stop()
            raise BluezEmulatorError(f"dbus-daemon ({binary}) did not print its address; is it working?")
        return self.address

    def stop(self) -> None:
        """Stop the daemon (by its pid) and remove its socket folder."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "BusDaemon":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- advertisement structures


def _uuid16(uuid: str) -> int | None:
    """The 16-bit short form of a UUID on the Bluetooth base UUID, else None."""
    u = uuid.lower()
    if len(u) == 36 and u.startswith("0000") and u.endswith(_BASE_UUID_TAIL):
        try:
            return int(u[4:8], 16)
        except ValueError:
            return None
    return None


def _uuid128_le(uuid: str) -> bytes:
    return bytes.fromhex(uuid.replace("-", ""))[::-1]


def ad_structures(adv: Advert) -> list[tuple[int, bytes]]:
    """The advert as (AD type, data) pairs, the way it went over the air (Core spec Vol 3 Part C §11).

    Used to match advertisement monitors' or-patterns, which BlueZ applies to these structures.
    """
    out: list[tuple[int, bytes]] = []
    short = [u for u in (_uuid16(s) for s in adv.service_uuids) if u is not None]
    if short:
        out.append((0x03, b"".join(u.to_bytes(2, "little") for u in short)))
    long_ = [s for s in adv.service_uuids if _uuid16(s) is None]
    if long_:
        out.append((0x07, b"".join(_uuid128_le(s) for s in long_)))
    if adv.local_name is not None:
        out.append((0x09, adv.local_name.encode()))
    if adv.tx_power is not None:
        out.append((0x0A, (adv.tx_power & 0xFF).to_bytes(1, "little")))
    for uuid, data in adv.service_data.items():
        u16 = _uuid16(uuid)
        if u16 is not None:
            out.append((0x16, u16.to_bytes(2, "little") + data))
        else:
            out.append((0x21, _uuid128_le(uuid) + data))
    for company, data in adv.manufacturer_data.items():
        out.append((0xFF, (company & 0xFFFF).to_bytes(2, "little") + data))
    return out


def matches_or_patterns(adv: Advert, patterns: Sequence[tuple[int, int, bytes]]) -> bool:
    """True when any pattern (start, AD type, content) matches any AD structure of the advert."""
    structures = ad_structures(adv)
    for start, ad_type, content in patterns:
        for t, data in structures:
            if t == ad_type and data[start : start + len(content)] == content:
                return True
    return False


# --------------------------------------------------------------------------- model


def _device_path(adapter_path: str, address: str) -> str:
    return f"{adapter_path}/dev_{address.upper().replace(':', '_')}"


@dataclass(slots=True)
class _Device:
    """A Device1 object's state; the dict holds only properties BlueZ would have."""

    path: str
    props: dict[str, Any]
    last_seen: float


@dataclass(slots=True)
class _Monitor:
    owner: str
    path: str
    patterns: list[tuple[int, int, bytes]] | None = None
    """None until read from the client (only then does it filter anything in)."""


@dataclass(slots=True)
class _Session:
    """One client's discovery session and its filter."""

    owner: str
    uuids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """An adapter to offer: its name (hci0), the receiver whose adverts it hears, its address."""

    name: str
    receiver: str
    address: str = ""


class _Adapter1(ServiceInterface):
    """org.bluez.Adapter1 (bluez doc/org.bluez.Adapter.rst), the part bleak and Visita use."""

    def __init__(self, emu: "EmulatedBluez", spec: AdapterSpec, index: int) -> None:
        super().__init__(ADAPTER1)
        self.emu = emu
        self.spec = spec
        self.path = f"/org/bluez/{spec.name}"
        self.address = spec.address or f"00:1A:7D:DA:71:{index:02X}"
        self.powered = True
        self.blocked = False
        self.discovering = False
        self.sessions: dict[str, _Session] = {}
        self.filters: dict[str, tuple[str, ...]] = {}
        self.monitors: dict[tuple[str, str], _Monitor] = {}
        self.devices: OrderedDict[str, _Device] = OrderedDict()
        self.silent: SilenceClearedBy | None = None
        self.manager = _MonitorManager1(self)

    # -- properties

    @dbus_property(PropertyAccess.READ)
    def Address(self) -> DBusStr:
        return self.address

    @dbus_property(PropertyAccess.READ)
    def AddressType(self) -> DBusStr:
        return "public"

    @dbus_property(PropertyAccess.READ)
    def Name(self) -> DBusStr:
        return self.spec.receiver

    @dbus_property(PropertyAccess.READ)
    def Alias(self) -> DBusStr:
        return self.spec.receiver

    @dbus_property(PropertyAccess.READWRITE)
    def Powered(self) -> DBusBool:
        return self.powered

    @Powered.setter  # type: ignore[no-redef]
    def Powered(self, value: DBusBool) -> None:
        self.emu._set_powered(self, bool(value))

    @dbus_property(PropertyAccess.READ)
    def Discovering(self) -> DBusBool:
        return self.discovering

    @dbus_property(PropertyAccess.READ)
    def Discoverable(self) -> DBusBool:
        return False

    @dbus_property(PropertyAccess.READ)
    def Pairable(self) -> DBusBool:
        return False

    @dbus_property(PropertyAccess.READ)
    def Roles(self) -> StrList:
        return ["central", "peripheral"]

    @dbus_property(PropertyAccess.READ)
    def UUIDs(self) -> StrList:
        return []

    # -- methods

    @dbus_method()
    def SetDiscoveryFilter(self, properties: DBusDict) -> None:
        owner = self.emu._caller()
        if not properties:
            self.filters.pop(owner, None)
            return
        transport = properties.get("Transport")
        if transport is not None and transport.value not in ("auto", "le", "bredr"):
            raise DBusError("org.bluez.Error.InvalidArguments", "Invalid arguments in method call")
        uuids = properties.get("UUIDs")
        self.filters[owner] = tuple(str(u).lower() for u in uuids.value) if uuids is not None else ()

    @dbus_method()
    def StartDiscovery(self) -> None:
        owner = self.emu._caller()
        if not self.powered:
            raise DBusError("org.bluez.Error.NotReady", "Resource Not Ready")
        if owner in self.sessions:
            raise DBusError("org.bluez.Error.InProgress", "Operation already in progress")
        self.sessions[owner] = _Session(owner, self.filters.get(owner, ()))
        if self.silent == "discovery":
            self.silent = None
        self.emu._discovering_changed(self)

    @dbus_method()
    def StopDiscovery(self) -> None:
        owner = self.emu._caller()
        if not self.powered:
            raise DBusError("org.bluez.Error.NotReady", "Resource Not Ready")
        if owner not in self.sessions:
            raise DBusError("org.bluez.Error.Failed", "No discovery started")
        del self.sessions[owner]
        self.emu._discovering_changed(self)

    @dbus_method()
    def RemoveDevice(self, device: DBusObjectPath) -> None:
        if device not in self.devices:
            raise DBusError("org.bluez.Error.DoesNotExist", "Does Not Exist")
        self.emu._remove_device(self, device)

    @dbus_method()
    def GetDiscoveryFilters(self) -> StrList:
        return ["UUIDs", "RSSI", "Pathloss", "Transport", "DuplicateData", "Discoverable", "Pattern"]


class _MonitorManager1(ServiceInterface):
    """org.bluez.AdvertisementMonitorManager1 (bluez doc/org.bluez.AdvertisementMonitorManager.rst)."""

    def __init__(self, adapter: "_Adapter1") -> None:
        super().__init__(MONITOR_MANAGER1)
        self.adapter = adapter

    @dbus_property(PropertyAccess.READ)
    def SupportedMonitorTypes(self) -> StrList:
        return ["or_patterns"]

    @dbus_property(PropertyAccess.READ)
    def SupportedFeatures(self) -> StrList:
        return []

    @dbus_method()
    def RegisterMonitor(self, application: DBusObjectPath) -> None:
        owner = self.adapter.emu._caller()
        key = (owner, application)
        if key in self.adapter.monitors:
            raise DBusError("org.bluez.Error.AlreadyExists", "Already Exists")
        self.adapter.monitors[key] = _Monitor(owner, application)
        self.adapter.emu._spawn(self.adapter.emu._activate_monitor(self.adapter, key))

    @dbus_method()
    def UnregisterMonitor(self, application: DBusObjectPath) -> None:
        owner = self.adapter.emu._caller()
        if self.adapter.monitors.pop((owner, application), None) is None:
            raise DBusError("org.bluez.Error.DoesNotExist", "Does Not Exist")


class _Control(ServiceInterface):
    """org.visita.BluezEmulator1: the test hooks, for an emulator in another process."""

    def __init__(self, emu: "EmulatedBluez") -> None:
        super().__init__(CONTROL_IFACE)
        self.emu = emu

    @dbus_method()
    def RemoveAdapter(self, name: DBusStr) -> None:
        self.emu.remove_adapter(name)

    @dbus_method()
    def AddAdapter(self, name: DBusStr) -> None:
        self.emu.add_adapter(name)

    @dbus_method()
    def SetPowered(self, name: DBusStr, on: DBusBool) -> None:
        self.emu.set_powered(name, on)

    @dbus_method()
    def Block(self, name: DBusStr, on: DBusBool) -> None:
        self.emu.block(name, on)

    @dbus_method()
    def StopDiscovery(self, name: DBusStr) -> None:
        self.emu.stop_discovery(name)

    @dbus_method()
    def Silence(self, name: DBusStr, cleared_by: DBusStr) -> None:
        if cleared_by not in ("discovery", "power", "never"):
            raise DBusError("org.visita.Error.InvalidArguments", "cleared_by: discovery, power or never")
        self.emu.silence(name, cleared_by)  # type: ignore[arg-type]

    @dbus_method()
    def Restart(self, crash: DBusBool, downtime_s: DBusDouble) -> None:
        self.emu._spawn(self.emu.restart(crash=crash, downtime_s=float(downtime_s)))

    @dbus_method()
    def Flood(self, name: DBusStr, count: DBusUInt32, duration_s: DBusDouble) -> None:
        self.emu._spawn(self.emu.flood(name, int(count), float(duration_s)))

    @dbus_method()
    def Stats(self) -> DBusStr:
        return json.dumps(self.emu.stats())

    @dbus_method()
    def Info(self) -> DBusStr:
        return json.dumps({**self.emu.info, "now": self.emu.clock(), "speed": self.emu.speed})


# --------------------------------------------------------------------------- the service


class EmulatedBluez:
    """A fake bluetoothd owning `org.bluez` on a (private) system bus.

    `clock` gives the emulator's time (the simulated store's clock when playing a scenario);
    `speed` is how many emulator seconds pass per wall second (for the device reaper and
    floods). All methods run on the event loop the emulator was started on.
    """

    def __init__(
        self,
        address: str,
        adapters: Sequence[AdapterSpec],
        *,
        clock: Callable[[], float] = time.time,
        speed: float = 1.0,
        device_timeout_s: float = DEVICE_TIMEOUT_S,
        passive: bool = True,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        self.info = dict(info or {})
        """What is being played (scenario, seed, ...), for `Info` on the control interface."""
        self.clock = clock
        self.speed = speed
        self.device_timeout_s = device_timeout_s
        self.passive = passive
        self._specs = {s.name: s for s in adapters}
        self._index = {s.name: i for i, s in enumerate(adapters)}
        self.adapters: dict[str, _Adapter1] = {}
        self._by_receiver: dict[str, _Adapter1] = {}
        self._bus: MessageBus | None = None
        self._control_bus: MessageBus | None = None
        self._control = _Control(self)
        self._sender = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._outbox: deque[Message] = deque()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._sock_fd = -1
        self._send_limit = 0
        self.counts = {
            "delivered": 0,
            "signals": 0,
            "unchanged": 0,
            "not_scanning": 0,
            "silenced": 0,
            "filtered": 0,
            "unrouted": 0,
            "devices_added": 0,
            "devices_removed": 0,
            "restarts": 0,
            "backlog_max": 0,
        }

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Connect, own org.bluez, offer the adapters and the control interface."""
        self._control_bus = await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect()
        self._control_bus.export(CONTROL_PATH, self._control)
        await self._control_bus.request_name(CONTROL_NAME)
        await self._bring_up()
        self._reaper = asyncio.create_task(self._reap())

    async def _bring_up(self) -> None:
        bus = await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect()
        bus.add_message_handler(self._handle)
        await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"],
            )
        )
        self._bus = bus
        self._outbox.clear()
        self._watch_socket(bus)
        self.adapters.clear()
        self._by_receiver.clear()
        for name in self._specs:
            self._export_adapter(name)
        await bus.request_name(BLUEZ)

    async def stop(self) -> None:
        """Leave the bus (cleanly: every object is removed first)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._take_down(clean=True)
        if self._control_bus is not None:
            self._control_bus.disconnect()
            self._control_bus = None

    def _take_down(self, clean: bool) -> None:
        if clean:
            for name in list(self.adapters):
                self._unexport_adapter(name)
        self.adapters.clear()
        self._by_receiver.clear()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._outbox.clear()
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ adapters

    def _export_adapter(self, name: str) -> None:
        assert self._bus is not None
        adapter = _Adapter1(self, self._specs[name], self._index[name])
        self.adapters[name] = adapter
        self._by_receiver[adapter.spec.receiver] = adapter
        self._bus.export(adapter.path, adapter)
        if self.passive:
            self._bus.export(adapter.path, adapter.manager)

    def _unexport_adapter(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        self._by_receiver.pop(adapter.spec.receiver, None)
        for path in list(adapter.devices):
            self._remove_device(adapter, path)
        if self._bus is not None:
            self._bus.unexport(adapter.path)

    def _adapter(self, name: str) -> _Adapter1:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise DBusError("org.visita.Error.NoSuchAdapter", f"no adapter {name} (have: {', '.join(self.adapters)})")
        return adapter

    def _set_powered(self, adapter: _Adapter1, on: bool) -> None:
        if on and adapter.blocked:
            raise DBusError("org.bluez.Error.Failed", "Blocked through rfkill")
        if on == adapter.powered:
            return
        adapter.powered = on
        if not on:
            # bluetoothd's adapter_stop: discovery sessions end and temporary devices go.
            adapter.sessions.clear()
            for path in list(adapter.devices):
                self._remove_device(adapter, path)
        elif adapter.silent == "power":
            adapter.silent = None
        adapter.emit_properties_changed({"Powered": on})
        self._discovering_changed(adapter)

    def _discovering_changed(self, adapter: _Adapter1) -> None:
        now = bool(adapter.sessions) and adapter.powered
        if now == adapter.discovering:
            return
        adapter.discovering = now
        adapter.emit_properties_changed({"Discovering": now})
        if not now:
            # bluetoothd clears RSSI and TxPower of every device when discovery stops.
            for dev in adapter.devices.values():
                gone = [k for k in ("RSSI", "TxPower") if dev.props.pop(k, None) is not None]
                if gone:
                    self._send_changed(dev.path, {}, gone)

    async def _activate_monitor(self, adapter: _Adapter1, key: tuple[str, str]) -> None:
        """Read a registered monitor's patterns from its client and Activate it, as bluetoothd does."""
        owner, path = key
        for _ in range(40):
            await asyncio.sleep(0.025)  # the client exports the monitor after RegisterMonitor returns
            if self._bus is None or key not in adapter.monitors:
                return
            reply = await self._bus.call(
                Message(
                    destination=owner, path=path, interface=PROPERTIES, member="GetAll", signature="s", body=[MONITOR1]
                )
            )
            if reply is None or reply.message_type != MessageType.METHOD_RETURN:
                continue
            props = reply.body[0]
            if "Type" not in props or props["Type"].value != "or_patterns" or "Patterns" not in props:
                log.warning("monitor %s of %s is not an or_patterns monitor: ignored", path, owner)
                return
            patterns = [(int(s), int(t), bytes(c)) for s, t, c in props["Patterns"].value]
            monitor = adapter.monitors.get(key)
            if monitor is None:
                return
            monitor.patterns = patterns
            if adapter.silent == "discovery":
                adapter.silent = None
            self._bus.send(Message(destination=owner, path=path, interface=MONITOR1, member="Activate"))
            return
        log.warning("monitor %s of %s never answered GetAll: ignored", path, owner)

    # ------------------------------------------------------------------ devices

    def _send(self, msg: Message) -> None:
        """Send a signal without ever filling the socket.

        dbus-fast treats EAGAIN on a full socket as a fatal error and drops the connection
        (python-dbus-next #153, still so in dbus-fast 5.2), and a flood or a busy daemon can
        fill it. So signals wait in `_outbox` while the kernel's send queue is more than
        half full, and are flushed from the event loop as it drains.
        """
        if self._outbox or not self._room():
            self._outbox.append(msg)
            self.counts["backlog_max"] = max(self.counts["backlog_max"], len(self._outbox))
            if self._flush_handle is None:
                self._flush_handle = asyncio.get_running_loop().call_later(0.001, self._flush)
            return
        assert self._bus is not None
        self._bus.send(msg)

    def _room(self) -> bool:
        if self._sock_fd < 0:
            return True
        try:
            queued = int.from_bytes(fcntl.ioctl(self._sock_fd, termios.TIOCOUTQ, b"\0\0\0\0"), sys.byteorder)
        except OSError:
            return True
        return queued < self._send_limit

    def _flush(self) -> None:
        self._flush_handle = None
        if self._bus is None:
            self._outbox.clear()
            return
        while self._outbox and self._room():
            self._bus.send(self._outbox.popleft())
        if self._outbox:
            self._flush_handle = asyncio.get_running_loop().call_later(0.001, self._flush)

    def _watch_socket(self, bus: MessageBus) -> None:
        # dbus-fast does not expose its socket; without it, sends are not paced.
        sock = getattr(bus, "_sock", None)
        self._sock_fd, self._send_limit = -1, 0
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            self._sock_fd = sock.fileno()
            self._send_limit = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2

    def _send_changed(self, path: str, changed: dict[str, Variant], invalidated: list[str]) -> None:
        if self._bus is None:
            return
        self._send(
            Message.new_signal(path, PROPERTIES, "PropertiesChanged", "sa{sv}as", [DEVICE1, changed, invalidated])
        )
        self.counts["signals"] += 1

    def _remove_device(self, adapter: _Adapter1, path: str) -> None:
        if adapter.devices.pop(path, None) is None:
            return
        self.counts["devices_removed"] += 1
        if self._bus is not None:
            self._send(Message.new_signal(path, OBJECT_MANAGER, "InterfacesRemoved", "oas", [path, [DEVICE1]]))

    @staticmethod
    def _variants(props: dict[str, Any]) -> dict[str, Variant]:
        out: dict[str, Variant] = {}
        for k, v in props.items():
            out[k] = _variant(k, v)
        return out

    def _accepts(self, adapter: _Adapter1, adv: Advert) -> bool:
        if adapter.discovering:
            sessions = adapter.sessions.values()
            if any(not s.uuids for s in sessions):
                return True
            wanted = {u for s in sessions for u in s.uuids}
            return bool(wanted.intersection(u.lower() for u in adv.service_uuids))
        monitors = [m.patterns for m in adapter.monitors.values() if m.patterns]
        return any(matches_or_patterns(adv, p) for p in monitors)

    def deliver(self, adverts: Iterable[Advert]) -> int:
        """Play adverts through the adapter named after each one's receiver; returns how many were delivered.

        An advert is dropped (and counted) when no adapter hears that receiver, the adapter is
        off or silent, nobody scans, or no registered monitor's patterns match it.
        """
        delivered = 0
        now = self.clock()
        counts = self.counts
        for adv in adverts:
            adapter = self._by_receiver.get(adv.receiver)
            if adapter is None or self._bus is None:
                counts["unrouted"] += 1
                continue
            if not adapter.powered or not (adapter.discovering or adapter.monitors):
                counts["not_scanning"] += 1
                continue
            if adapter.silent is not None:
                counts["silenced"] += 1
                continue
            if not self._accepts(adapter, adv):
                counts["filtered"] += 1
                continue
            self._update_device(adapter, adv, now)
            delivered += 1
        counts["delivered"] += delivered
        return delivered

    def _update_device(self, adapter: _Adapter1, adv: Advert, now: float) -> None:
        path = _device_path(adapter.path, adv.address)
        dev = adapter.devices.get(path)
        if dev is None:
            props: dict[str, Any] = {
                "Address": adv.address.upper(),
                "AddressType": "random" if adv.address_random else "public",
                "Alias": adv.local_name or adv.address.upper().replace(":", "-"),
                "Paired": False,
                "Bonded": False,
                "Trusted": False,
                "Blocked": False,
                "LegacyPairing": False,
                "Connected": False,
                "ServicesResolved": False,
                "UUIDs": [u.lower() for u in adv.service_uuids],
                "Adapter": adapter.path,
                "RSSI": adv.rssi,
            }
            if adv.local_name is not None:
                props["Name"] = adv.local_name
            if adv.tx_power is not None:
                props["TxPower"] = adv.tx_power
            if adv.manufacturer_data:
                props["ManufacturerData"] = dict(adv.manufacturer_data)
            if adv.service_data:
                props["ServiceData"] = dict(adv.service_data)
            adapter.devices[path] = _Device(path, props, now)
            self.counts["devices_added"] += 1
            assert self._bus is not None
            self._send(
                Message.new_signal(
                    path, OBJECT_MANAGER, "InterfacesAdded", "oa{sa{sv}}", [path, {DEVICE1: self._variants(props)}]
                )
            )
            self.counts["signals"] += 1
            return
        dev.last_seen = now
        adapter.devices.move_to_end(path)
        p = dev.props
        changed: dict[str, Variant] = {}
        if p.get("RSSI") != adv.rssi:
            p["RSSI"] = adv.rssi
            changed["RSSI"] = Variant("n", adv.rssi)
        if adv.tx_power is not None and p.get("TxPower") != adv.tx_power:
            p["TxPower"] = adv.tx_power
            changed["TxPower"] = Variant("n", adv.tx_power)
        if adv.local_name is not None and p.get("Name") != adv.local_name:
            p["Name"] = p["Alias"] = adv.local_name
            changed["Name"] = Variant("s", adv.local_name)
            changed["Alias"] = Variant("s", adv.local_name)
        if adv.manufacturer_data:
            merged = {**p.get("ManufacturerData", {}), **adv.manufacturer_data}
            if merged != p.get("ManufacturerData"):
                p["ManufacturerData"] = merged
                changed["ManufacturerData"] = _variant("ManufacturerData", merged)
        if adv.service_data:
            merged_sd = {**p.get("ServiceData", {}), **adv.service_data}
            if merged_sd != p.get("ServiceData"):
                p["ServiceData"] = merged_sd
                changed["ServiceData"] = _variant("ServiceData", merged_sd)
        if adv.service_uuids:
            uuids = list(dict.fromkeys([*p["UUIDs"], *(u.lower() for u in adv.service_uuids)]))
            if uuids != p["UUIDs"]:
                p["UUIDs"] = uuids
                changed["UUIDs"] = Variant("as", uuids)
        if changed:
            self._send_changed(path, changed, [])
        else:
            self.counts["unchanged"] += 1

    async def _reap(self) -> None:
        """Remove devices not heard for device_timeout_s (emulator time), like bluetoothd's temporary devices."""
        while True:
            await asyncio.sleep(min(1.0, max(0.05, self.device_timeout_s / self.speed / 4)))
            cutoff = self.clock() - self.device_timeout_s
            for adapter in list(self.adapters.values()):
                while adapter.devices:
                    path, dev = next(iter(adapter.devices.items()))
                    if dev.last_seen >= cutoff:
                        break
                    self._remove_device(adapter, path)

    # ------------------------------------------------------------------ D-Bus plumbing

    def _caller(self) -> str:
        return self._sender

    def _handle(self, msg: Message) -> Message | bool | None:
        """Runs before dbus-fast's own dispatch: notes the caller, answers for Device1 objects."""
        if msg.message_type == MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.sender == "org.freedesktop.DBus":
                name, _old, new = msg.body
                if name.startswith(":") and not new:
                    self._client_left(name)
            return None
        if msg.message_type != MessageType.METHOD_CALL:
            return None
        # dbus-fast's ServiceInterface methods do not see the message; they run synchronously
        # right after this handler returns, so the caller noted here is theirs.
        self._sender = msg.sender or ""
        path = msg.path or ""
        if msg.interface == OBJECT_MANAGER and msg.member == "GetManagedObjects":
            return self._managed_objects(msg)
        if "/dev_" in path:
            return self._device_call(msg, path)
        return None

    def _managed_objects(self, msg: Message) -> Message:
        objects: dict[str, dict[str, dict[str, Variant]]] = {}
        for adapter in self.adapters.values():
            if not (msg.path == "/" or adapter.path.startswith((msg.path or "") + "/") or adapter.path == msg.path):
                continue
            ifaces = {ADAPTER1: _adapter_props(adapter)}
            if self.passive:
                ifaces[MONITOR_MANAGER1] = {
                    "SupportedMonitorTypes": Variant("as", ["or_patterns"]),
                    "SupportedFeatures": Variant("as", []),
                }
            objects[adapter.path] = ifaces
            for dev in adapter.devices.values():
                objects[dev.path] = {DEVICE1: self._variants(dev.props)}
        return Message.new_method_return(msg, "a{oa{sa{sv}}}", [objects])

    def _device_call(self, msg: Message, path: str) -> Message:
        adapter_path = path[: path.index("/dev_")]
        adapter = next((a for a in self.adapters.values() if a.path == adapter_path), None)
        dev = adapter.devices.get(path) if adapter is not None else None
        if dev is None:
            return Message.new_error(msg, "org.freedesktop.DBus.Error.UnknownObject", f"no object at {path}")
        if msg.interface == PROPERTIES and msg.member == "GetAll" and msg.body and msg.body[0] == DEVICE1:
            return Message.new_method_return(msg, "a{sv}", [self._variants(dev.props)])
        if msg.interface == PROPERTIES and msg.member == "Get" and len(msg.body) == 2 and msg.body[0] == DEVICE1:
            name = msg.body[1]
            if name not in dev.props:
                return Message.new_error(msg, "org.freedesktop.DBus.Error.InvalidArgs", f"No such property '{name}'")
            return Message.new_method_return(msg, "v", [_variant(name, dev.props[name])])
        return Message.new_error(
            msg, "org.freedesktop.DBus.Error.UnknownMethod", f"{msg.interface}.{msg.member} is not emulated on Device1"
        )

    def _client_left(self, name: str) -> None:
        for adapter in self.adapters.values():
            adapter.filters.pop(name, None)
            for key in [k for k in adapter.monitors if k[0] == name]:
                del adapter.monitors[key]
            if adapter.sessions.pop(name, None) is not None:
                self._discovering_changed(adapter)

    # ------------------------------------------------------------------ test hooks

    def remove_adapter(self, name: str) -> None:
        """The dongle is unplugged (or the kernel resets it): devices and the adapter go away."""
        self._adapter(name)
        self._unexport_adapter(name)

    def add_adapter(self, name: str) -> None:
        """The dongle is back: a fresh, powered adapter with no sessions and no devices."""
        if name not in self._specs:
            raise DBusError("org.visita.Error.NoSuchAdapter", f"no adapter {name} was ever configured")
        if name in self.adapters:
            return
        self._export_adapter(name)

    def set_powered(self, name: str, on: bool) -> None:
        """Power the adapter off or on, as `bluetoothctl power off|on` would."""
        self._set_powered(self._adapter(name), on)

    def block(self, name: str, on: bool) -> None:
        """rfkill: a blocked adapter is powered off and refuses to power on until unblocked."""
        adapter = self._adapter(name)
        adapter.blocked = on
        if on:
            self._set_powered(adapter, False)

    def stop_discovery(self, name: str) -> None:
        """Discovery stops by itself: every session ends and Discovering turns false."""
        adapter = self._adapter(name)
        adapter.sessions.clear()
        self._discovering_changed(adapter)

    def silence(self, name: str, cleared_by: SilenceClearedBy = "power") -> None:
        """The silent scan: Discovering stays true, no error, and nothing is heard any more.

        It clears when discovery is started again ("discovery"), only on a power cycle
        ("power"), or not at all ("never").
        """
        self._adapter(name).silent = cleared_by

    async def restart(self, crash: bool = False, downtime_s: float = 1.0) -> None:
        """bluetoothd restarts: objects go (signalled unless it crashed), the name is free for
        `downtime_s` (wall seconds), then a new process offers fresh adapters."""
        self.counts["restarts"] += 1
        self._take_down(clean=not crash)
        await asyncio.sleep(downtime_s)
        await self._bring_up()

    async def flood(self, name: str, count: int, duration_s: float) -> None:
        """`count` adverts from as many new random addresses, spread over `duration_s` emulator seconds."""
        adapter = self._adapter(name)
        receiver = adapter.spec.receiver
        rng = random.Random(count)
        start = self.clock()
        sent = 0
        while sent < count:
            await asyncio.sleep(0.01)
            due = min(count, math.ceil((self.clock() - start) / duration_s * count)) if duration_s > 0 else count
            batch = []
            for _ in range(due - sent):
                b = bytearray(rng.randbytes(6))
                b[0] = (b[0] & 0x3F) | 0x40  # resolvable private address
                address = ":".join(f"{x:02X}" for x in b)
                batch.append(
                    Advert(
                        self.clock(), receiver, address, True, -60 - rng.randrange(30), None, frames.apple_nearby_info()
                    )
                )
            sent = due
            self.deliver(batch)

    def stats(self) -> dict[str, Any]:
        """Counters, and per adapter: powered, discovering, sessions, monitors, devices."""
        return {
            **self.counts,
            "adapters": {
                name: {
                    "receiver": a.spec.receiver,
                    "powered": a.powered,
                    "discovering": a.discovering,
                    "sessions": len(a.sessions),
                    "monitors": len(a.monitors),
                    "devices": len(a.devices),
                    "silent": a.silent,
                }
                for name, a in self.adapters.items()
            },
            "owner": self._bus.unique_name if self._bus is not None else None,
        }


def _variant(name: str, value: Any) -> Variant:
    if name == "ManufacturerData":
        return Variant("a{qv}", {int(k): Variant("ay", bytes(v)) for k, v in value.items()})
    if name == "ServiceData":
        return Variant("a{sv}", {str(k): Variant("ay", bytes(v)) for k, v in value.items()})
    sig = _DEVICE_SIGNATURES[name]
    return Variant(sig, value)


_DEVICE_SIGNATURES = {
    "Address": "s",
    "AddressType": "s",
    "Name": "s",
    "Alias": "s",
    "Paired": "b",
    "Bonded": "b",
    "Trusted": "b",
    "Blocked": "b",
    "LegacyPairing": "b",
    "Connected": "b",
    "ServicesResolved": "b",
    "UUIDs": "as",
    "Adapter": "o",
    "RSSI": "n",
    "TxPower": "n",
}


def _adapter_props(a: _Adapter1) -> dict[str, Variant]:
    return {
        "Address": Variant("s", a.address),
        "AddressType": Variant("s", "public"),
        "Name": Variant("s", a.spec.receiver),
        "Alias": Variant("s", a.spec.receiver),
        "Powered": Variant("b", a.powered),
        "Discovering": Variant("b", a.discovering),
        "Discoverable": Variant("b", False),
        "Pairable": Variant("b", False),
        "Roles": Variant("as", ["central", "peripheral"]),
        "UUIDs": Variant("as", []),
    }


# --------------------------------------------------------------------------- control client


class EmulatorControl:
    """Client for the test hooks of an emulator running anywhere on the same bus."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._bus: MessageBus | None = None

    async def __aenter__(self) -> "EmulatorControl":
        self._bus = await MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM).connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    async def call(self, member: str, signature: str = "", body: Sequence[Any] = ()) -> Any:
        """Call a hook; raises DBusError on an error reply."""
        assert self._bus is not None, "use `async with EmulatorControl(address)`"
        reply = await self._bus.call(
            Message(
                destination=CONTROL_NAME,
                path=CONTROL_PATH,
                interface=CONTROL_IFACE,
                member=member,
                signature=signature,
                body=list(body),
            )
        )
        assert reply is not None
        if reply.message_type == MessageType.ERROR:
            raise DBusError(reply.error_name or "org.freedesktop.DBus.Error.Failed", str(reply.body[:1]))
        return reply.body[0] if reply.body else None

    async def remove_adapter(self, name: str) -> None:
        """See `EmulatedBluez.remove_adapter`."""
        await self.call("RemoveAdapter", "s", [name])

    async def add_adapter(self, name: str) -> None:
        """See `EmulatedBluez.add_adapter`."""
        await self.call("AddAdapter", "s", [name])

    async def set_powered(self, name: str, on: bool) -> None:
        """See `EmulatedBluez.set_powered`."""
        await self.call("SetPowered", "sb", [name, on])

    async def block(self, name: str, on: bool) -> None:
        """See `EmulatedBluez.block`."""
        await self.call("Block", "sb", [name, on])

    async def stop_discovery(self, name: str) -> None:
        """See `EmulatedBluez.stop_discovery`."""
        await self.call("StopDiscovery", "s", [name])

    async def silence(self, name: str, cleared_by: SilenceClearedBy = "power") -> None:
        """See `EmulatedBluez.silence`."""
        await self.call("Silence", "ss", [name, cleared_by])

    async def restart(self, crash: bool = False, downtime_s: float = 1.0) -> None:
        """See `EmulatedBluez.restart` (returns at once; the restart runs in the emulator)."""
        await self.call("Restart", "bd", [crash, downtime_s])

    async def flood(self, name: str, count: int, duration_s: float) -> None:
        """See `EmulatedBluez.flood` (returns at once)."""
        await self.call("Flood", "sud", [name, count, duration_s])

    async def stats(self) -> dict[str, Any]:
        """See `EmulatedBluez.stats`."""
        return dict(json.loads(await self.call("Stats")))

    async def info(self) -> dict[str, Any]:
        """What the emulator plays (`visita sim`: scenario, seed, start), its clock `now` and `speed`."""
        return dict(json.loads(await self.call("Info")))


# --------------------------------------------------------------------------- playing a scenario


@dataclass(slots=True)
class PlayClock:
    """Emulator time: starts at `start`, runs `speed` times faster than the wall clock."""

    start: float
    speed: float = 1.0
    _t0: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        """Current emulator time, UNIX seconds."""
        return self.start + (time.monotonic() - self._t0) * self.speed


async def play(
    scenario: "Scenario",
    seed: int,
    start: float,
    speed: float = 1.0,
    *,
    duration: float | None = None,
    scenario_ref: str | None = None,
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
    tick_s: float = 0.02,
) -> dict[str, Any]:
    """`visita sim SCENARIO --bluez`: a private bus, an emulated BlueZ, the scenario played through it.

    Adapter hciN hears for the scenario's N-th receiver. Prints `DBUS_SYSTEM_BUS_ADDRESS=<address>`
    first (flushed) once the service is up, then a line naming the adapters and the simulated
    start, and plays from `start` (simulated time) at `speed` until `stop` is set, SIGINT or
    SIGTERM, or `duration` simulated seconds; returns the world's summary with the emulator's
    counters under "bluez". `scenario_ref` (the name or path it was loaded from) is what
    `visita run --ble --rehearse` loads, from the emulator's `Info`, to follow along.
    """
    from firmware_sim.world import World

    world = World(scenario, seed, start)
    clock = PlayClock(world.start_ts, speed)
    specs = [AdapterSpec(f"hci{i}", r.id) for i, r in enumerate(scenario.receivers)]
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    end = world.start_ts + duration if duration is not None else math.inf
    daemon = BusDaemon()
    try:
        await asyncio.to_thread(daemon.start)
        info = {"scenario": scenario_ref or scenario.name, "seed": seed, "start": world.start_ts}
        emu = EmulatedBluez(daemon.address, specs, clock=clock.now, speed=speed, info=info)
        await emu.start()
        try:
            print(f"DBUS_SYSTEM_BUS_ADDRESS={daemon.address}", file=out, flush=True)
            print(
                f"playing {scenario.name} seed {seed} from {world.start_ts:.0f} at {speed:g}x through "
                + " ".join(f"{s.name}={s.receiver}" for s in specs)
                + "; Ctrl-C stops",
                file=out,
                flush=True,
            )
            clock = PlayClock(world.start_ts, speed)  # simulated time starts now, not at daemon start
            emu.clock = clock.now
            pending: list[Advert] = []
            while not stop.is_set():
                now = min(clock.now(), end)
                while world.now < now + 1.0:
                    pending += world.advance(world.now + 1.0)
                cut = 0
                while cut < len(pending) and pending[cut].ts <= now:
                    cut += 1
                if cut:
                    emu.deliver(pending[:cut])
                    del pending[:cut]
                if now >= end:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), tick_s)
        finally:
            await emu.stop()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await asyncio.to_thread(daemon.stop)
    summary = {**world.summary(), "simulated_s": min(clock.now(), end) - world.start_ts, "bluez": dict(emu.counts)}
    return summary


# --------------------------------------------------------------------------- synthetic load


@dataclass(frozen=True, slots=True)
class Load:
    """A steady synthetic load per adapter, for tests and benchmarks (no store, no people)."""

    beacons: int = 3
    """Fixed beacons heard by every adapter: iBeacon, Eddystone-UID and AltBeacon in turn."""
    beacon_hz: float = 10.0
    """Adverts per second of each beacon."""
    phones: int = 0
    """Phones (Apple Nearby Info frames, random addresses) heard by every adapter."""
    phone_hz: float = 1.0
    """Adverts per second of each phone."""


def load_transmitters(load: Load, seed: int = 7) -> list[tuple[str, bool, dict[int, bytes], dict[str, bytes], float]]:
    """(address, random, manufacturer data, service data, adverts per second) for each transmitter of a load."""
    rng = random.Random(seed)
    out: list[tuple[str, bool, dict[int, bytes], dict[str, bytes], float]] = []
    for i in range(load.beacons):
        address = f"C0:FF:EE:00:{i // 256:02X}:{i % 256:02X}"
        kind = i % 3
        if kind == 0:
            out.append(
                (address, False, frames.ibeacon("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, i, -59), {}, load.beacon_hz)
            )
        elif kind == 1:
            out.append(
                (address, False, {}, frames.eddystone_uid("a1b2c3d4e5f60718293a", f"{i:012x}", -18), load.beacon_hz)
            )
        else:
            mfr = frames.altbeacon(0x0118, "7a3f0c55-1e0b-4c9a-9a51-3cbd2f4e8d10", 7, i, -59)
            out.append((address, False, mfr, {}, load.beacon_hz))
    for _ in range(load.phones):
        b = bytearray(rng.randbytes(6))
        b[0] = (b[0] & 0x3F) | 0x40
        out.append((":".join(f"{x:02X}" for x in b), True, frames.apple_nearby_info(), {}, load.phone_hz))
    return out


async def run_load(emu: EmulatedBluez, load: Load, stop: asyncio.Event, tick_s: float = 0.01) -> None:
    """Play `load` through every adapter of `emu` until `stop` is set (RSSI jitters, so most adverts signal)."""
    tx = load_transmitters(load)
    rng = random.Random(11)
    phase = [rng.random() for _ in tx]
    start = emu.clock()
    sent = [0] * len(tx)
    receivers = [s.receiver for s in emu._specs.values()]
    while not stop.is_set():
        now = emu.clock()
        batch: list[Advert] = []
        for i, (address, rand, mfr, svc, hz) in enumerate(tx):
            due = int((now - start) * hz + phase[i])
            for _ in range(due - sent[i]):
                for receiver in receivers:
                    batch.append(Advert(now, receiver, address, rand, -55 - rng.randrange(20), None, mfr, svc))
            sent[i] = due
        emu.deliver(batch)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), tick_s)


async def serve(specs: Sequence[AdapterSpec], load: Load, speed: float = 1.0, out: TextIO = sys.stdout) -> None:
    """`python -m firmware_sim.bluez`: a private bus and an emulated BlueZ playing a synthetic load until stopped."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    daemon = BusDaemon()
    await asyncio.to_thread(daemon.start)
    clock = PlayClock(time.time(), speed)
    emu = EmulatedBluez(daemon.address, specs, clock=clock.now, speed=speed)
    try:
        await emu.start()
        print(f"DBUS_SYSTEM_BUS_ADDRESS={daemon.address}", file=out, flush=True)
        await run_load(emu, load, stop)
    finally:
        await emu.stop()
        await asyncio.to_thread(daemon.stop)
    print("stats " + json.dumps(emu.stats(), separators=(",", ":")), file=out, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of `python -m firmware_sim.bluez` (a development tool; `visita sim --bluez` plays stores)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m firmware_sim.bluez",
        description="An emulated BlueZ on a private D-Bus playing synthetic beacons and phones. "
        "Prints DBUS_SYSTEM_BUS_ADDRESS=<address> first; test hooks: org.visita.BluezEmulator1.",
    )
    p.add_argument(
        "--adapter", action="append", metavar="NAME=RECEIVER", help="adapter and its receiver id (repeatable)"
    )
    p.add_argument("--beacons", type=int, default=3, help="fixed beacons per adapter (default 3)")
    p.add_argument("--beacon-hz", type=float, default=10.0, help="adverts per second per beacon (default 10)")
    p.add_argument("--phones", type=int, default=0, help="phones per adapter (default 0)")
    p.add_argument("--phone-hz", type=float, default=1.0, help="adverts per second per phone (default 1)")
    p.add_argument("--speed", type=float, default=1.0, help="emulator time runs X times faster (default 1)")
    args = p.parse_args(argv)
    specs = []
    for item in args.adapter or ["hci0=rx-1"]:
        name, _, receiver = item.partition("=")
        specs.append(AdapterSpec(name, receiver or name))
    load = Load(args.beacons, args.beacon_hz, args.phones, args.phone_hz)
    try:
        asyncio.run(serve(specs, load, args.speed))
    except BluezEmulatorError as e:
        print(f"firmware_sim.bluez: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
