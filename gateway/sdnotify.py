"""systemd's notify protocol (sd_notify): READY, WATCHDOG, STATUS and STOPPING, without libsystemd.

Under `Type=notify` systemd starts the next unit only once the gateway says READY=1, and with
`WatchdogSec=` restarts it when the pipeline stops saying WATCHDOG=1: a hung pipeline is caught even
though the process is still alive. Outside systemd (no NOTIFY_SOCKET) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("visita.systemd")


class Notifier:
    """Talks to the service manager named by $NOTIFY_SOCKET, if any."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket (Linux); anything else a path.
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # Ping at half the interval systemd waits, as sd_watchdog_enabled(3) advises.
        self.watchdog_s = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._last_ping = 0.0
        self._failed = False

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens."""
        return bool(self._addr)

    def _send(self, message: str) -> None:
        if not self._addr:
            return
        try:
            # Non-blocking: a datagram queue that is full (a stalled manager) must never stall the pipeline;
            # a lost watchdog ping is made up by the next one, sent at half the interval.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK) as s:
                s.sendto(message.encode(), self._addr)
        except OSError as e:
            if not self._failed:  # once: a broken notify socket must not flood the journal
                log.warning("cannot notify systemd at NOTIFY_SOCKET (%s); the watchdog may restart Visita", e)
                self._failed = True

    def ready(self, status: str) -> None:
        """Start-up is done: systemd marks the unit active."""
        self._send(f"READY=1\nSTATUS={status}")

    def alive(self, status: str | None = None) -> None:
        """Called every pipeline tick; pings the watchdog when half its interval has passed."""
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_s:
            self._last_ping = now
            self._send("WATCHDOG=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> None:
        """Shutdown has begun (flushing the outbox may take up to its timeout)."""
        self._send("STOPPING=1\nSTATUS=stopping: flushing the outbox")
