"""sd_notify(3) without libsystemd: tell systemd we are ready, alive, reloading, stopping.

The protocol is one datagram of `KEY=VALUE` lines to the unix socket named by
$NOTIFY_SOCKET ('@' = abstract namespace). Outside systemd (no $NOTIFY_SOCKET) every
call is a no-op, so the daemon runs the same by hand, in the lab and under systemd.

The failover loop calls `watchdog_ping(now)` on every turn; it must cost one float
compare when nothing is due, so the next deadline is kept and compared, nothing else.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Mapping, MutableMapping

log = logging.getLogger("hasync.sdnotify")

_NEVER = float("inf")
_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str | None) -> str | bytes | None:
    """The sendto() address for a $NOTIFY_SOCKET value; None if unusable or unset."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:... and other forms: not spoken here (systemd never gives them to services)


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.

    None when the watchdog is off, the value is bad, or $WATCHDOG_PID names another process
    (the variable was inherited, it is not for us).
    """
    env = os.environ if env is None else env
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    watchdog_pid = env.get("WATCHDOG_PID")
    if watchdog_pid:
        if not watchdog_pid.isdigit() or int(watchdog_pid) != (os.getpid() if pid is None else pid):
            return None
    if not usec_text.isdigit() or int(usec_text) == 0:
        return None
    return int(usec_text) / 2e6


class Notifier:
    """One service's messages to systemd. Build it with `from_environ()` once at start-up."""

    def __init__(self, address: str | bytes | None, interval: float | None = None):
        self.address = address
        self.interval = interval
        self.errors = 0  # datagrams systemd could not take (counted, never raised)
        self.sent = 0
        self._sock: socket.socket | None = None
        self._next_ping = 0.0 if (address is not None and interval) else _NEVER

    @classmethod
    def from_environ(cls, env: MutableMapping[str, str] | None = None,
                     unset: bool = True) -> "Notifier":
        """The notifier systemd asked for. With `unset`, the variables are removed from the
        environment so that notify hooks and the sync child do not talk to systemd as us."""
        env = os.environ if env is None else env
        notifier = cls(socket_address(env.get("NOTIFY_SOCKET")), watchdog_interval(env))
        if unset:
            for key in _ENV_KEYS:
                env.pop(key, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=VALUE` fields in one datagram; False if not under systemd or it failed."""
        if self.address is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)  # a stuck systemd must never stall the heartbeat loop
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                log.warning("sd_notify to %r failed (%d so far): %s", self.address, self.errors, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        """Start-up finished: systemd's `start` job completes (Type=notify)."""
        return self.notify("READY=1", *_status_field(status))

    def status(self, text: str) -> bool:
        """The one-line status `systemctl status` shows."""
        return self.notify(*_status_field(text))

    def reloading(self, status: str = "") -> bool:
        """A reload began; call `ready()` when it is done."""
        return self.notify("RELOADING=1", *_status_field(status))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *_status_field(status))

    def watchdog_ping(self, now: float) -> bool:
        """WATCHDOG=1 if half the watchdog period passed since the last one (monotonic `now`)."""
        if now < self._next_ping:
            return False
        self._next_ping = now + self.interval  # type: ignore[operator]  # finite only when enabled
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status_field(text: str) -> tuple[str, ...]:
    # one datagram field per line: a newline inside STATUS would start a bogus field
    return (f"STATUS={' '.join(text.split())}",) if text else ()
