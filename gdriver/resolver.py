"""Name resolution that never blocks the supervisor's loop nor a worker's other servers.

``getaddrinfo`` blocks for as long as the system resolver takes: with a DNS server that never
answers, 10 s and more per name. So the supervisor never calls it for a name: a small
*resolver process*, forked at start, does. It runs each lookup in a thread of its own (it
never forks, so threads are safe there), one lookup per name at a time, and answers over a
SOCK_SEQPACKET socketpair. The supervisor keeps the answers in a cache (:class:`Resolver`):

- a name that is known answers at once from the cache; one not known yet raises
  :class:`Unresolved` (an ``OSError``) and the caller retries later, as after any failed
  connect, while its other servers are served;
- names are resolved again every REFRESH s so DNS changes are followed, sooner when a
  connect to them fails (:meth:`Resolver.suspect`); while a name fails, its last known
  addresses stay in use (a resolver outage does not take away a server that still answers);
- a lookup unanswered after LOOKUP_TIMEOUT s counts as failed; one unanswered after STUCK s
  (a ``getaddrinfo`` that never returns) gets the resolver process killed and restarted;
- the resolver process is restarted with backoff whenever it dies.

The supervisor reaps every child with ``waitpid(-1)`` and hands a resolver process's PID to
:meth:`Resolver.exited`; the resolver also reaps its own processes without waiting (WNOHANG,
each tick). It never waits for a process in the loop and never signals a PID once reaped: the
kernel may have given it to another process, a new worker process of ours included.

Numeric addresses (``127.0.0.1``, ``::1``) are parsed at once and never go near the resolver.

Worker processes are forked from the supervisor and inherit its cache; they never ask
anyone. The supervisor hands every change to them over their channel (an ``A`` message,
:func:`update_message`; :func:`apply_message` in the child), so a worker connects to a
server as soon as the supervisor knows its addresses and keeps serving the others meanwhile.

Without an installed resolver (``GearmanWorker`` used on its own, the command-line tools),
:func:`gdriver.codec.resolve` calls ``getaddrinfo`` itself, as any client library does.

Why a process and not c-ares (``pycares``): pycares starts a thread as soon as a channel is
made (to destroy channels safely, since 4.10) and c-ares can run its own event thread; a
thread alive in the supervisor when it forks breaks the fork safety gdriver rests on. c-ares
also reads resolv.conf and /etc/hosts itself, ignoring nsswitch (mDNS, LDAP, ``nss-resolve``),
so a name could resolve differently than it does for every other program on the host. The
resolver process uses the system's own ``getaddrinfo``: same answers, no new dependency.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from gdriver import channel, codec, exits
from gdriver.codec import Address
from gdriver.logs import log_event
from gdriver.loop import EventLoop, Timer

if TYPE_CHECKING:
    from gdriver.metrics import Metrics

log = logging.getLogger("gdriver.resolver")

Server = tuple[str, int]

LOOKUP_TIMEOUT = 5.0  # s: an unanswered lookup counts as failed (its answer is still taken)
REFRESH = 30.0  # s: names in use are resolved again this often
RETRY_MIN = 1.0  # s: first retry of a failing name; doubles up to REFRESH
SUSPECT_GAP = 5.0  # s: a failed connect re-resolves a name at most this often
STUCK = 60.0  # s: a lookup unanswered this long restarts the resolver process
RESTART_MIN, RESTART_MAX = 0.1, 5.0  # s: backoff between restarts of the resolver process
CLOSE_WAIT = 1.0  # s: close() waits this long at most for the killed process to be reaped
UNUSED_AFTER = 600.0  # s: names nobody asked for this long are forgotten
TICK = 0.5  # s between checks of the timers above
MAX_IN_FLIGHT = 64  # lookups running at once in the resolver process
MAX_ADDRESSES = 16  # addresses kept per name
MESSAGE_MAX = 4096  # bytes of one request or answer on the socketpair
UPDATE_TAG = channel.ADDRESSES  # supervisor -> worker process: the addresses of one server


class Unresolved(socket.gaierror):
    """No address for a name yet (not answered yet, or the last lookup failed)."""


class _Entry:
    __slots__ = (
        "addrs", "answered", "asked", "error", "failures", "last_used", "next_lookup", "since",
    )  # fmt: skip

    def __init__(self, now: float) -> None:
        self.addrs: list[Address] = []
        self.error: str | None = None
        self.asked = 0.0  # monotonic time of the request in flight; 0: none
        self.since = 0.0  # first request not answered yet; 0: none
        self.answered = 0.0  # monotonic time of the last answer
        self.next_lookup = now
        self.failures = 0
        self.last_used = now


_numeric: dict[Server, list[Address] | None] = {}


def numeric(host: str, port: int) -> list[Address] | None:
    """The address of a numeric host (never asks a resolver), or None for a name."""
    key = (host, port)
    found = _numeric.get(key, _numeric)
    if found is not _numeric:
        return found  # type: ignore[return-value]
    try:
        infos = socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        )
        result: list[Address] | None = [Address(f, p, sa) for f, _, p, _, sa in infos]
    except (OSError, UnicodeError):
        result = None
    if len(_numeric) < 1024:
        _numeric[key] = result
    return result


def update_message(host: str, port: int, addrs: list[Address], error: str | None) -> bytes:
    """What the supervisor sends a worker process when a server's addresses change."""
    body = [host, port, [[a.family, a.proto, list(a.sockaddr)] for a in addrs], error]
    return UPDATE_TAG + json.dumps(body).encode()


def _decode_addrs(items: Any) -> list[Address]:
    return [Address(int(f), int(p), tuple(sa)) for f, p, sa in items][:MAX_ADDRESSES]


class Resolver:
    """The supervisor's resolver process and its cache of answers (module docstring).

    ``on_change(message)`` is called with an :func:`update_message` whenever a name's
    addresses change (the first answer included). ``metrics`` counts failed lookups and
    restarts of the resolver process."""

    def __init__(
        self,
        loop: EventLoop | None = None,
        on_change: Callable[[bytes], None] | None = None,
        timeout: float = LOOKUP_TIMEOUT,
        refresh: float = REFRESH,
        stuck: float = STUCK,
        metrics: Metrics | None = None,
    ) -> None:
        self.loop = loop
        self.metrics = metrics
        self.on_change = on_change
        self.timeout = timeout
        self.refresh = refresh
        self.stuck = stuck
        self.entries: dict[Server, _Entry] = {}
        self.watched: set[Server] = set()
        self.owner = os.getpid()  # in any other process (a forked worker) only the cache is used
        self.sock: socket.socket | None = None
        self.pid = 0  # the resolver process in use; 0: none
        self.unreaped: set[int] = set()  # resolver processes not reaped yet: safe to signal
        self.restart_at = 0.0
        self.restart_backoff = RESTART_MIN
        self.restarts = 0
        self.closed = False
        self.timer: Timer | None = None

    # -- the resolver process ----------------------------------------------------------------
    def start(self) -> None:
        """Fork the resolver process (again, after it died) and send what is waiting."""
        if self.closed or os.getpid() != self.owner:
            return
        try:  # out of descriptors: try again later, like a failed fork
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:
            self._died(f"cannot start the resolver process: {exc}")
            return
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            ours.close()
            theirs.close()
            self._died(f"cannot start the resolver process: {exc}")
            return
        if pid == 0:
            try:
                ours.close()
                _serve(theirs)
            finally:
                os._exit(1)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        theirs.close()
        ours.setblocking(False)
        self.sock, self.pid = ours, pid
        self.unreaped.add(pid)
        if self.loop is not None:
            self.loop.add(ours, selectors.EVENT_READ, self.on_readable)
            if self.timer is None:
                self.timer = self.loop.call_later(TICK, self.tick)
        for server, entry in self.entries.items():
            if entry.since:
                self._ask(server, entry, time.monotonic())

    def fds(self) -> list[int]:
        """Descriptors a forked worker process must close."""
        return [self.sock.fileno()] if self.sock is not None else []

    def close(self) -> None:
        """Stop the resolver process; answers known so far stay usable. The loop is over:
        this reaps the process, waiting CLOSE_WAIT s at most."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._stop_process()
        deadline = time.monotonic() + CLOSE_WAIT
        while self.unreaped and time.monotonic() < deadline and os.getpid() == self.owner:
            time.sleep(0.005)
            self.reap()

    def exited(self, pid: int, status: int) -> bool:
        """Whoever reaps the supervisor's children hands every PID here: True when ``pid``
        (with its wait ``status``) was a resolver process. The one in use is restarted; the
        PID is never signalled again."""
        if pid not in self.unreaped:
            return False
        self.unreaped.discard(pid)
        if pid == self.pid:
            self.pid = 0  # reaped: _stop_process must not signal it
            self._died(_exit_text(status))
        return True

    def reap(self) -> None:
        """Reap the resolver processes that ended, never waiting (only our own unreaped
        PIDs, so no other child's exit is taken from the supervisor)."""
        if os.getpid() != self.owner:
            return
        for pid in list(self.unreaped):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone who did not tell: forget it
                done, status = pid, 0
            if done == pid:
                self.exited(pid, status)

    def _stop_process(self) -> None:
        if os.getpid() != self.owner:
            return
        if self.sock is not None:
            if self.loop is not None:
                self.loop.remove(self.sock)
            self.sock.close()
            self.sock = None
        pid, self.pid = self.pid, 0
        if pid in self.unreaped:  # not reaped yet, so the PID is still this process's
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.reap()  # gone already, or reaped later (by the supervisor or the next tick)

    def _lost(self) -> None:
        """The socket reached EOF: the process exited (or is exiting)."""
        self.reap()  # reaped already: exited() restarts it and tells the exit status
        if self.sock is not None:
            self._died("it closed its socket")

    def _died(self, why: str) -> None:
        self._stop_process()
        if self.closed:
            return
        if self.restart_backoff == RESTART_MIN:  # one record per episode
            message = f"resolver process: {why}; restarting it"
            log_event(log, logging.WARNING, message, "resolver_restart", reason=why)
        self.restarts += 1
        if self.metrics is not None:
            self.metrics.resolver_restarts.inc()
        self.restart_at = time.monotonic() + self.restart_backoff
        self.restart_backoff = min(self.restart_backoff * 2, RESTART_MAX)

    # -- lookups -----------------------------------------------------------------------------
    def lookup(self, host: str, port: int) -> list[Address]:
        """Addresses of host:port now, never blocking; raises Unresolved when none is known."""
        found = numeric(host, port)
        if found is not None:
            return found
        server = (host, port)
        now = time.monotonic()
        entry = self.entries.get(server)
        if entry is None:
            entry = self.entries[server] = _Entry(now)
        entry.last_used = now
        if self.sock is None and now >= self.restart_at and os.getpid() == self.owner:
            self.start()  # without a loop nothing else restarts it
        if not entry.asked and now >= entry.next_lookup:
            self._ask(server, entry, now)
        if entry.addrs:
            return entry.addrs
        raise Unresolved(socket.EAI_AGAIN, entry.error or "no answer from the resolver yet")

    def watch(self, servers: Iterable[Server]) -> None:
        """Resolve these names now and keep them resolved even when nobody connects (a
        worker process needs them although the supervisor may not poll)."""
        self.watched = {s for s in servers if numeric(*s) is None}
        for host, port in self.watched:
            with contextlib.suppress(Unresolved):
                self.lookup(host, port)

    def suspect(self, host: str, port: int) -> None:
        """A connect to host:port failed: its addresses may be stale, resolve it again."""
        entry = self.entries.get((host, port))
        now = time.monotonic()
        if entry is not None and not entry.asked and now - entry.answered >= SUSPECT_GAP:
            self._ask((host, port), entry, now)

    def settle(self, timeout: float) -> None:
        """Wait, at most ``timeout`` s, for the first answers (before anything is served)."""
        deadline = time.monotonic() + timeout
        while self.sock is not None and any(e.since for e in self.entries.values()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            with selectors.DefaultSelector() as sel:
                sel.register(self.sock, selectors.EVENT_READ)
                if not sel.select(remaining):
                    return
            self.on_readable(selectors.EVENT_READ)

    def messages(self) -> list[bytes]:
        """An update message per known name: what a worker process that missed some needs."""
        return [update_message(h, p, e.addrs, e.error) for (h, p), e in self.entries.items()]

    def _ask(self, server: Server, entry: _Entry, now: float) -> None:
        entry.asked = now
        entry.since = entry.since or now
        if self.sock is None or os.getpid() != self.owner:
            return  # asked again when the process (re)starts; a worker waits for the supervisor
        try:
            self.sock.send(json.dumps(list(server)).encode())
        except (BlockingIOError, InterruptedError):
            entry.asked = 0.0  # the process is behind: ask again at the next tick
        except OSError as exc:
            self._died(f"socket error: {exc}")

    # -- answers and timers ------------------------------------------------------------------
    def on_readable(self, mask: int) -> None:
        for _ in range(64):  # bounded: let other work in between
            sock = self.sock
            if sock is None:
                return
            try:
                data = sock.recv(MESSAGE_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            try:
                host, port, error, items = json.loads(data)
                server = (str(host), int(port))
                addrs = _decode_addrs(items)
            except (ValueError, TypeError):
                continue
            self.restart_backoff = RESTART_MIN
            self._answer(server, addrs, error)

    def _answer(self, server: Server, addrs: list[Address], error: str | None) -> None:
        entry = self.entries.get(server)
        if entry is None:
            return
        now = time.monotonic()
        asked = entry.asked  # 0: a late answer to a lookup already counted as failed
        entry.asked = entry.since = 0.0
        entry.answered = now
        name = f"{server[0]}:{server[1]}"
        if error is None and addrs:
            if entry.error is not None and entry.failures:
                message = f"gearmand host {name} resolves again"
                log_event(log, logging.INFO, message, "resolved", server=name)
            changed = addrs != entry.addrs or entry.error is not None
            entry.addrs, entry.error, entry.failures = addrs, None, 0
            entry.next_lookup = now + self.refresh
            if changed:
                self._changed(server, entry)
            return
        error = error or "no address"
        if asked and self.metrics is not None:
            self.metrics.resolver_failures.labels(name).inc()
        if entry.failures == 0:  # one record per episode
            kept = "; keeping its last known addresses" if entry.addrs else ""
            message = f"cannot resolve gearmand host {name}: {error}{kept}"
            log_event(log, logging.WARNING, message, "resolve_failed", server=name, error=error)
        entry.failures += 1
        entry.next_lookup = now + exits.doubling(RETRY_MIN, entry.failures, self.refresh)
        if entry.error != error:
            entry.error = error
            if not entry.addrs:
                self._changed(server, entry)

    def _changed(self, server: Server, entry: _Entry) -> None:
        if self.on_change is not None:
            self.on_change(update_message(server[0], server[1], entry.addrs, entry.error))

    def tick(self) -> None:
        """Timeouts, refreshes, restarts; runs every TICK s from the loop."""
        self.timer = None
        if self.closed:
            return
        now = time.monotonic()
        self.reap()
        if self.sock is None and now >= self.restart_at:
            self.start()
        for server, entry in list(self.entries.items()):
            if entry.since and now - entry.since > self.stuck and self.sock is not None:
                entry.since = now
                self._died(f"no answer for {server[0]} in {self.stuck:g}s")
            elif entry.asked and now - entry.asked > self.timeout:
                self._answer_timeout(server, entry, now)
            elif not entry.asked and now >= entry.next_lookup:
                if server in self.watched or now - entry.last_used < UNUSED_AFTER:
                    self._ask(server, entry, now)
                else:
                    del self.entries[server]
        if self.loop is not None:
            self.timer = self.loop.call_later(TICK, self.tick)

    def _answer_timeout(self, server: Server, entry: _Entry, now: float) -> None:
        since = entry.since  # a late answer is still taken, and STUCK counts from the first ask
        self._answer(server, [], f"no answer from the resolver within {self.timeout:g}s")
        entry.since = since

    # -- in a worker process -----------------------------------------------------------------
    def apply(self, data: bytes) -> None:
        """Take an :func:`update_message` from the supervisor (in a worker process)."""
        try:
            host, port, items, error = json.loads(data[len(UPDATE_TAG) :])
            server = (str(host), int(port))
            addrs = _decode_addrs(items)
        except (ValueError, TypeError):
            return
        entry = self.entries.get(server)
        if entry is None:
            entry = self.entries[server] = _Entry(time.monotonic())
        if addrs:
            entry.addrs = addrs
        entry.error = None if addrs else error


def _exit_text(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"killed by {exits.signal_name(-code)}" if code < 0 else f"exited with status {code}"


# --------------------------------------------------------------------------- installation

_active: Resolver | None = None


def install(resolver: Resolver | None) -> None:
    """Make ``resolver`` answer every name :func:`gdriver.codec.resolve` is asked for (None:
    back to a blocking getaddrinfo). Forked worker processes inherit it."""
    global _active
    _active = resolver
    codec.name_lookup = resolver.lookup if resolver is not None else None


def suspect(host: str, port: int) -> None:
    """A connect to host:port failed: the installed resolver looks the name up again soon."""
    if _active is not None and numeric(host, port) is None:
        _active.suspect(host, port)


def apply_message(data: bytes) -> None:
    """A worker process received an update message on its channel."""
    if _active is not None:
        _active.apply(data)


# --------------------------------------------------------------------------- the process


def _serve(sock: socket.socket) -> None:
    """The body of the resolver process: answer lookups until the socket reaches EOF."""
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            handler = signal.getsignal(sig)
            if callable(handler) or handler == signal.default_int_handler:
                signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)  # a terminal's ^C is for the supervisor to handle
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(0)
    fd = sock.fileno()
    devnull = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(devnull, target)
    os.closerange(3, fd)
    os.closerange(fd + 1, 1 << 20)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    gc.freeze()  # the supervisor's objects live on here unused: never finalize them
    codec.name_lookup = None  # resolve for real here
    with contextlib.suppress(Exception):
        import setproctitle

        setproctitle.setproctitle(f"{setproctitle.getproctitle()} [resolver]")
    sock.setblocking(True)
    lock = threading.Lock()
    in_flight: set[Server] = set()

    def answer(server: Server) -> None:
        error: str | None = None
        addrs: list[Address] = []
        try:
            addrs = codec.resolve(*server)[:MAX_ADDRESSES]
        except OSError as exc:
            error = (exc.strerror if isinstance(exc, socket.gaierror) else None) or str(exc)
        except Exception as exc:  # e.g. UnicodeError for a name IDNA cannot encode
            error = str(exc) or type(exc).__name__
        items = [[a.family, a.proto, list(a.sockaddr)] for a in addrs]
        data = json.dumps([server[0], server[1], error, items]).encode()
        with lock:
            in_flight.discard(server)
            with contextlib.suppress(OSError):
                sock.send(data)

    while True:
        try:
            data = sock.recv(MESSAGE_MAX)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            os._exit(0)  # the supervisor closed its end or is gone
        try:
            host, port = json.loads(data)
            server = (str(host), int(port))
        except (ValueError, TypeError):
            continue
        with lock:
            if server in in_flight:
                continue  # one lookup per name at a time; its answer serves every ask
            if len(in_flight) >= MAX_IN_FLIGHT:
                with contextlib.suppress(OSError):
                    sock.send(json.dumps([*server, "too many lookups at once", []]).encode())
                continue
            in_flight.add(server)
        threading.Thread(target=answer, args=(server,), daemon=True).start()
