"""sd_notify for the supervisor: READY, STATUS, WATCHDOG, RELOADING, STOPPING.

Wraps the sdnotify package. Silent without ``NOTIFY_SOCKET``. Only the supervisor (the main
PID) notifies; worker processes drop ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
``WATCHDOG_PID`` from their environment right after fork.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import sdnotify


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self.watchdog_interval = 0.0
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        if self.enabled and usec.isdigit() and int(usec) > 0:
            if not pid or (pid.isdigit() and int(pid) == os.getpid()):
                self.watchdog_interval = int(usec) / 1e6 / 2
        self.ready = False
        self.status = ""
        self._last_watchdog = 0.0

    def send(self, *lines: str) -> None:
        if self._notifier is not None:
            text = "\n".join(lines)
            # sdnotify encodes latin-1; keep the datagram valid whatever the text holds
            self._notifier.notify(text.encode("latin-1", "replace").decode("latin-1"))

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
