"""sd_notify for the supervisor: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

Silent without ``NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket). Only the
supervisor (the main PID) notifies; worker processes drop ``NOTIFY_SOCKET``,
``WATCHDOG_USEC`` and ``WATCHDOG_PID`` from their environment right after fork. Each message
goes out on a socket opened for it alone, so no notification socket is ever open when the
supervisor forks: a worker process cannot inherit it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping

import sdnotify


class _Datagram(sdnotify.SystemdNotifier):
    """sdnotify's notifier on a socket of our own: opened for one message (so none is open
    when the supervisor forks), close-on-exec and non-blocking (so a stuck manager never
    stalls the loop), and aimed at the address we were given."""

    def __init__(self, address: str) -> None:
        self.debug = False
        self.socket = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        try:
            self.socket.connect(address)
        except OSError:
            self.socket.close()
            raise

    def __enter__(self) -> _Datagram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.socket.close()


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        self.enabled = bool(address)
        self.watchdog_interval = 0.0
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        ours = not pid or (pid.isdigit() and int(pid) == os.getpid())
        if self.enabled and usec.isdigit() and int(usec) > 0 and ours:
            self.watchdog_interval = int(usec) / 1e6 / 2
        self.ready = False
        self.status = ""
        self._last_watchdog = 0.0

    def send(self, *lines: str) -> None:
        """One datagram; errors are ignored (the manager may be gone or not listening)."""
        if not self.enabled:
            return
        # sdnotify encodes latin-1 and drops what it cannot encode: keep the text encodable
        text = "\n".join(lines).encode("latin-1", "replace").decode("latin-1")
        with contextlib.suppress(OSError), _Datagram(self.address) as notifier:
            notifier.notify(text)

    def notify_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self.send("READY=1", f"STATUS={self.status}" if self.status else "STATUS=ready")

    def notify_status(self, status: str) -> None:
        status = " ".join(status.split())
        if status != self.status:
            self.status = status
            self.send(f"STATUS={status}")

    def notify_reloading(self) -> None:
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.ready = False
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")

    def notify_stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self, now: float) -> None:
        """Call from the loop; pings every WATCHDOG_USEC/2, so only while the loop runs."""
        if self.watchdog_interval and now - self._last_watchdog >= self.watchdog_interval:
            self._last_watchdog = now
            self.send("WATCHDOG=1")
