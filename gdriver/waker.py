"""Instant reaction for jobs that have no process (``min_processes=0``).

A job with no process never reports busy, so only the observer's poll would notice its
backlog, up to ``interval`` seconds late. A :class:`Waker` is one worker connection per
gearmand, held by the supervisor, that registers the functions of such jobs, sends
PRE_SLEEP and never grabs: gearmand answers PRE_SLEEP with NOOP as soon as a job for one
of them is queued, and the supervisor polls at once. It never takes a job.

Side effect: while a job has no process, gearmand's ``workers`` column for its functions
counts this connection.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import time
from collections.abc import Callable, Iterable

from gdriver.gearman import CAN_DO, NOOP, PRE_SLEEP, SET_CLIENT_ID, Server, packet
from gdriver.loop import EventLoop

log = logging.getLogger("gdriver.waker")

RESET_ABILITIES = 3
GRAB_JOB = 9
HEADER = 12
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0


class Waker:
    def __init__(self, server: Server, loop: EventLoop, on_wake: Callable[[], None]) -> None:
        self.server = server
        self.loop = loop
        self.on_wake = on_wake
        self.sock: socket.socket | None = None
        self.connected = False
        self.functions: frozenset[str] = frozenset()
        self.armed = False  # PRE_SLEEP sent, waiting for NOOP
        self.out = bytearray()
        self.inbuf = bytearray()
        self.next_attempt = 0.0
        self.backoff = BACKOFF_MIN

    def fds(self) -> list[int]:
        return [self.sock.fileno()] if self.sock is not None else []

    # -- what the supervisor calls -------------------------------------------------------------
    def set_functions(self, names: Iterable[str]) -> None:
        wanted = frozenset(names)
        if wanted == self.functions:
            return
        self.functions = wanted
        if self.connected and (self.armed or not wanted):
            self.out += self.abilities()  # asleep: a job for a new function wakes it
            self.flush()
        elif self.connected:
            self.arm()
        elif wanted and self.sock is None:
            self.tick(time.monotonic())

    def arm(self) -> None:
        """Sleep again: the next queued job for one of the functions wakes the supervisor.

        gearmand 1.1.20 sends a sleeping worker NOOP only once until that worker grabs. So
        each arming drops the abilities, grabs (answered NO_JOB: with no abilities nothing
        can be assigned), registers the functions again and sleeps."""
        if self.connected and self.functions and not self.armed:
            self.armed = True
            self.out += packet(RESET_ABILITIES) + packet(GRAB_JOB) + self.abilities()
            self.out += packet(PRE_SLEEP)
            self.flush()

    def tick(self, now: float) -> None:
        """Connect when needed and due."""
        if self.sock is not None or not self.functions or now < self.next_attempt:
            return
        host, port = self.server
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
            family, kind, proto, _, addr = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            self.failed(f"cannot connect: {exc}")
            return
        sock.setblocking(False)
        code = sock.connect_ex(addr)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.failed(f"connect: {errno.errorcode.get(code, code)}")
            return
        self.sock = sock
        self.connected = False
        self.armed = False
        self.out = bytearray(packet(SET_CLIENT_ID, b"gdriver-waker"))
        self.inbuf = bytearray()
        self.loop.add(sock, selectors.EVENT_WRITE, self.on_event)

    def close(self) -> None:
        if self.sock is not None:
            self.loop.remove(self.sock)
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None
        self.connected = self.armed = False

    # -- internals -----------------------------------------------------------------------------
    def abilities(self) -> bytes:
        return packet(RESET_ABILITIES) + b"".join(
            packet(CAN_DO, name.encode()) for name in sorted(self.functions)
        )

    def failed(self, reason: str) -> None:
        self.close()
        self.next_attempt = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        log.debug("waker %s:%d: %s", *self.server, reason)

    def on_event(self, mask: int) -> None:
        sock = self.sock
        if sock is None:
            return
        if not self.connected and mask & selectors.EVENT_WRITE:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.failed(f"connect: {errno.errorcode.get(code, code)}")
                return
            self.connected = True
            self.backoff = BACKOFF_MIN
            self.arm()
        if mask & selectors.EVENT_READ:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as exc:
                self.failed(str(exc))
                return
            if data == b"":
                self.failed("connection closed")
                return
            if data:
                self.inbuf += data
                self.parse()
        self.flush()

    def parse(self) -> None:
        woken = False
        while len(self.inbuf) >= HEADER:
            magic = bytes(self.inbuf[:4])
            ptype = int.from_bytes(self.inbuf[4:8], "big")
            size = int.from_bytes(self.inbuf[8:12], "big")
            if magic != b"\0RES" or size > 1 << 20:
                self.failed("malformed reply")
                return
            if len(self.inbuf) < HEADER + size:
                break
            del self.inbuf[: HEADER + size]
            if ptype == NOOP:
                woken = True
        if woken:
            self.armed = False
            self.on_wake()

    def flush(self) -> None:
        sock = self.sock
        if sock is None:
            return
        if self.connected and self.out:
            try:
                n = sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self.failed(str(exc))
                return
            del self.out[:n]
        events = selectors.EVENT_READ if self.connected else selectors.EVENT_WRITE
        if self.out:
            events |= selectors.EVENT_WRITE
        self.loop.modify(sock, events, self.on_event)
