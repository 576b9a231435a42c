"""Instant reaction for jobs that have no process (``min_processes=0``).

A job with no process never reports busy, so only the observer's poll would notice its
backlog, up to ``interval`` seconds late. A :class:`Waker` is one worker connection per
gearmand, held by the supervisor, that registers the functions of such jobs, sends
PRE_SLEEP and never grabs: gearmand answers PRE_SLEEP with NOOP as soon as a job for one
of them is queued, and the supervisor polls at once. It never takes a job.

Side effect: while a job has no process, gearmand's ``workers`` column for its functions
counts this connection; on purpose, until one of the job's new processes has registered (at
most ``supervisor.WAKER_STAND`` s), so that other replicas count this one meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time
from collections.abc import Callable, Iterable

from gdriver.codec import (
    HEADER_SIZE,
    MalformedPacket,
    connect,
    connect_error,
    error_text,
    pack,
    resolve,
    unpack,
)
from gdriver.codec import PacketType as P
from gdriver.gearman import Server
from gdriver.loop import EventLoop

log = logging.getLogger("gdriver.waker")

BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0
MAX_REPLY = 1 << 20  # bytes; it never takes a job, so every reply it gets is tiny


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
            self.out += pack(P.RESET_ABILITIES) + pack(P.GRAB_JOB) + self.abilities()
            self.out += pack(P.PRE_SLEEP)
            self.flush()

    def tick(self, now: float) -> None:
        """Connect when needed and due."""
        if self.sock is not None or not self.functions or now < self.next_attempt:
            return
        try:
            # one socket only: it is registered with the supervisor's loop
            sock, _ = connect(resolve(*self.server)[0])
        except OSError as exc:
            self.failed(f"cannot connect: {error_text(exc)}")
            return
        self.sock = sock
        self.connected = False  # set on the first writable event, connected at once or not
        self.armed = False
        self.out = bytearray(pack(P.SET_CLIENT_ID, b"gdriver-waker"))
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
        return pack(P.RESET_ABILITIES) + b"".join(
            pack(P.CAN_DO, name.encode()) for name in sorted(self.functions)
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
            failed = connect_error(sock)
            if failed is not None:
                self.failed(f"connect: {failed}")
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
        while len(self.inbuf) >= HEADER_SIZE:
            try:
                ptype, _, end = unpack(self.inbuf, 0, MAX_REPLY)
            except MalformedPacket:
                self.failed("malformed reply")
                return
            if len(self.inbuf) < end:
                break
            del self.inbuf[:end]
            if ptype == P.NOOP:
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
