"""The supervisor's single-threaded event loop: a selector plus timers. No threads, ever,
so forking from inside it is safe."""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import select
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from gdriver.logs import log_event

log = logging.getLogger("gdriver.loop")

Callback = Callable[[int], None]  # called with the ready event mask


class Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.last_tick = time.monotonic()
        self.servers: list[TcpServer] = []  # the listeners open on this loop (console, HTTP)

    def fileno(self) -> int:
        return int(self.selector.fileno())

    def add(self, fileobj: Any, events: int, callback: Callback) -> None:
        self.selector.register(fileobj, events, callback)

    def modify(self, fileobj: Any, events: int, callback: Callback) -> None:
        self.selector.modify(fileobj, events, callback)

    def remove(self, fileobj: Any) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(time.monotonic() + delay, callback)

    def run_once(self, max_wait: float = 1.0) -> None:
        """Wait for I/O or the next timer (at most max_wait s), then run what is due."""
        now = time.monotonic()
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        wait = max_wait
        if self._timers:
            wait = min(wait, max(0.0, self._timers[0][0] - now))
        for key, mask in self.selector.select(wait):
            callback: Callback = key.data
            try:
                callback(mask)
            except Exception:
                log.exception("event handler failed")
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                try:
                    timer.callback()
                except Exception:
                    log.exception("timer failed")
        self.last_tick = now

    def close(self) -> None:
        self.selector.close()


class Connection(Protocol):
    sock: socket.socket
    last_active: float  # monotonic time of the client's last progress

    def on_event(self, mask: int) -> None: ...
    def close(self) -> None: ...
    def stale(self, now: float) -> bool: ...


class TcpServer:
    """A listening socket served by the loop: hands each client to ``connect()``, closes the
    stale ones every ``reap_interval`` s, and keeps at most ``max_connections``: a new client
    past the limit is served and the least recently active connection is closed to make room,
    so idle or stuck clients can never lock the others out. Out of descriptors, the loop's
    listener holding the most connections gives one up the same way, so clients of one
    listener (idle HTTP connections) cannot lock out those of another (the console)."""

    max_connections = 64
    reap_interval = 1.0
    name = "tcp"
    evict_log_interval = 60.0  # s between records about closing connections to make room

    def __init__(self, loop: EventLoop, host: str, port: int) -> None:
        self.loop = loop
        self.connections: set[Any] = set()
        self.evicted = 0  # connections closed to make room since the last record
        self.evict_logged = -self.evict_log_interval
        self.accept_paused: Timer | None = None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.sock.setblocking(False)
        self.loop.add(self.sock, selectors.EVENT_READ, self.on_accept)
        self.timer = self.loop.call_later(self.reap_interval, self.reap)
        self.loop.servers.append(self)
        message = f"{self.name} listening on {host}:{port}"
        log_event(log, logging.INFO, message, f"{self.name}_listening", port=port)

    def connect(self, sock: socket.socket) -> Connection:
        raise NotImplementedError

    def fds(self) -> list[int]:
        return [self.sock.fileno(), *(c.sock.fileno() for c in self.connections)]

    def on_accept(self, mask: int) -> None:
        made_room = False  # a close made room and accept() has not taken a client since
        for _ in range(64):
            try:
                sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # that client gave up before we took it
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    if not self.client_waiting():
                        return  # accept() says EMFILE before it looks at the backlog
                    # once per shortage: when the close freed nothing accept() can use (the
                    # system's table, ENFILE, refilled; a limit lowered below the descriptors
                    # open), more closes would only empty the listeners
                    if not made_room and self.make_room():
                        made_room = True
                        continue
                # the client stays in the backlog: retry later rather than spin on it
                log.warning("%s: accept failed: %s", self.name, exc)
                self.pause_accept()
                return
            made_room = False
            sock.setblocking(False)
            while len(self.connections) >= self.max_connections:
                self.evict(f"{self.max_connections} connections open")
            conn = self.connect(sock)
            self.connections.add(conn)
            self.loop.add(sock, selectors.EVENT_READ, conn.on_event)

    def client_waiting(self) -> bool:
        """A client is in the listening socket's backlog (poll() needs no new descriptor)."""
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        return bool(poll.poll(0))

    def make_room(self) -> bool:
        """Out of descriptors: the listener holding the most connections (this one on a tie)
        closes its least recently active. Another listener's only connection (an operator's
        console session) is left alone. False when there is nothing to close."""
        holders = [s for s in self.loop.servers if len(s.connections) > (0 if s is self else 1)]
        if not holders:
            return False
        holder = max(holders, key=lambda server: (len(server.connections), server is self))
        holder.evict(f"out of descriptors for a {self.name} client")
        return True

    def evict(self, why: str) -> None:
        """Close the least recently active connection (its client sees a plain close)."""
        victim = min(self.connections, key=lambda c: c.last_active)
        with contextlib.suppress(OSError):
            victim.sock.recv(65536)  # input left unread would turn the close into a reset
        victim.close()
        self.connections.discard(victim)
        self.evicted += 1
        now = time.monotonic()
        if now - self.evict_logged >= self.evict_log_interval:
            message = (
                f"{self.name}: {why}, closed the least recently active connection to make "
                f"room ({self.evicted} since the last record)"
            )
            log_event(log, logging.WARNING, message, f"{self.name}_evicted", count=self.evicted,
                      reason=why)  # fmt: skip
            self.evict_logged = now
            self.evicted = 0

    def pause_accept(self) -> None:
        if self.accept_paused is None:
            self.loop.remove(self.sock)
            self.accept_paused = self.loop.call_later(1.0, self.resume_accept)

    def resume_accept(self) -> None:
        self.accept_paused = None
        self.loop.add(self.sock, selectors.EVENT_READ, self.on_accept)

    def reap(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            if conn.stale(now):
                conn.close()
        self.timer = self.loop.call_later(self.reap_interval, self.reap)

    def close(self) -> None:
        self.timer.cancel()
        if self.accept_paused is not None:
            self.accept_paused.cancel()
        for conn in list(self.connections):
            conn.close()
        self.loop.remove(self.sock)
        with contextlib.suppress(ValueError):
            self.loop.servers.remove(self)
        self.sock.close()
