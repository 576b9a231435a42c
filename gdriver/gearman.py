"""Gearman wire protocol: the worker loop and the text admin protocol (stdlib only).

The worker (:class:`GearmanWorker`) is a single-threaded ``selectors`` loop that keeps one
connection to every configured gearmand, grabs jobs with GRAB_JOB_UNIQ, runs them one at a
time and sends the result together with the next grab in one ``send``.  PRE_SLEEP is sent on
a connection as soon as it answers NO_JOB; the loop then blocks until gearmand sends NOOP.
Connection trouble never escapes :meth:`GearmanWorker.work`: the connection is dropped and
re-established with exponential backoff while the other servers keep being served.

Every server this module works with (checked by ``tests/test_compat.py``):

* The C gearmand (primary target): everything below.
* Perl's Gearman::Server answers GRAB_JOB_UNIQ with ``ERROR server_error`` and has no
  WORK_DATA or WORK_WARNING; its WORK_EXCEPTION is not final (a WORK_FAIL must follow).  A
  refused GRAB_JOB_UNIQ is answered with GRAB_JOB on that connection from then on (logged
  once); there ``job.unique`` is empty, send_data/send_warning send nothing and a failure's
  message goes out as WORK_EXCEPTION before the WORK_FAIL.
* gear's geard does not answer ECHO_REQ and ignores GRAB_JOB.  Nothing here depends on an
  optional packet: a registration is confirmed by the answer to the first grab (NO_JOB or a
  job), and an idle connection is checked with a grab, which every server answers.

A server that refuses both grabs serves nothing: the connection stays, the grab is tried
again every ``ping_interval`` seconds, and ``on_refused`` tells how many servers refuse.
A job whose packet is larger than ``max_packet_size`` is not read into memory: its body is
read and discarded as it arrives and the job fails (the message names both sizes); the
connection stays.

No threads are used and the only thing created at import time is the receive buffer every
connection reads into (reused, never shared by two readers at once), so the module is safe
to use in processes forked after import.

Behaviour of gearmand 1.1.20 this module relies on (checked by
``tests/test_gearman_protocol.py`` against a real gearmand):

* WORK_EXCEPTION is final: gearmand forgets the job, and a WORK_FAIL sent after it is
  answered with ``ERROR JOB_NOT_FOUND``.  Clients that enabled the ``exceptions`` option get
  the WORK_EXCEPTION; every other client gets a WORK_FAIL whose handle carries a trailing NUL
  byte.  Neither common client copes with that packet: the pygearman client raises KeyError,
  the C client (``gearman -f fn``, which does not enable exceptions) never finishes.
  WORK_EXCEPTION is therefore not sent by default.  A failed job with a message is
  reported as WORK_WARNING(message) followed by WORK_FAIL: both are forwarded unchanged to
  every client (pygearman keeps the message in ``warning_updates``, the C client prints it
  on stderr before "Job failed"), and the job ends cleanly.  Without a message only
  WORK_FAIL is sent.  With ``send_exceptions`` a failure with a message is one
  WORK_EXCEPTION (clients that asked for exceptions get the message in their exception
  callback; gear's geard treats it as final too).
* After PRE_SLEEP gearmand answers with NOOP at once if a job is already queued, and sends
  NOOP when one arrives later.
* Replies on one connection come in request order, so SET_CLIENT_ID, CAN_DO and the first
  GRAB_JOB_UNIQ are pipelined in one ``send``; an ERROR that comes before the first grab is
  answered can only be the grab's.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, overload

from gdriver.codec import (
    HEADER_SIZE,
    MAX_PACKET_SIZE,
    REQ,
    RES,
    Address,
    PacketType,
    connect,
    connect_error,
    error_text,
    header,
    pack,
    pack_header,
    resolve,
    unpack,
    unpack_header,
)

__all__ = [
    "DEFAULT_PORT",
    "MAX_PACKET_SIZE",
    "AdminRequest",
    "FunctionStatus",
    "GearmanWorker",
    "Handler",
    "Job",
    "JobFailed",
    "Protocol",
    "Server",
    "parse_servers",
    "parse_status",
]

log = logging.getLogger(__name__)

Server = tuple[str, int]
DEFAULT_PORT = 4730

#: Largest admin (text protocol) reply accepted.
MAX_ADMIN_REPLY = 16 * 1024 * 1024

# Reads go into one reused buffer, made at import: a fresh 256 KiB bytes object per recv() is
# above glibc's mmap threshold and costs an mmap, mremap and munmap per read (measured: 3
# syscalls a job).
_RECV_SIZE = 256 * 1024
#: Seconds an awake connection may stay silent before the worker counts as idle anyway.
STALLED = 1.0
_recv_buffer = bytearray(_RECV_SIZE)
_recv_view = memoryview(_recv_buffer)

P = PacketType
# plain ints where every job uses them: comparing with an IntEnum member costs twice as much
JOB_ASSIGN_UNIQ = int(P.JOB_ASSIGN_UNIQ)
WORK_COMPLETE = int(P.WORK_COMPLETE)
WORK_FAIL = int(P.WORK_FAIL)
WORK_WARNING = int(P.WORK_WARNING)
WORK_EXCEPTION = int(P.WORK_EXCEPTION)
_ASSIGNS = (JOB_ASSIGN_UNIQ, int(P.JOB_ASSIGN))

_GRAB = pack(P.GRAB_JOB_UNIQ)
_GRAB_PLAIN = pack(P.GRAB_JOB)  # for servers without GRAB_JOB_UNIQ (Perl's Gearman::Server)
_PRE_SLEEP = pack(P.PRE_SLEEP)
#: Bytes of an oversize job packet kept to learn its handle and function (the rest is
#: discarded as it arrives).
_OVERSIZE_HEAD = 4096


@dataclass(frozen=True, slots=True)
class Protocol:
    """Deployment settings of the worker's side of the protocol (config keys of the same name).

    ``send_exceptions``: a failure with a message is sent as WORK_EXCEPTION instead of
    WORK_WARNING + WORK_FAIL.  ``max_packet_size``: a job packet larger than this many bytes
    fails the job without reading it into memory."""

    send_exceptions: bool = False
    max_packet_size: int = MAX_PACKET_SIZE


# --------------------------------------------------------------------------- servers


def _parse_port(text: str, item: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"bad port in {item!r}: {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"bad port in {item!r}: {port} is not in 1..65535")
    return port


def _check_host(host: str, item: str) -> None:
    if any(ch.isspace() or ch in "[]/@," for ch in host):
        raise ValueError(f"bad host in {item!r}")


def parse_servers(spec: str) -> list[Server]:
    """'host[:port][,host[:port]]' -> [(host, port)].

    Items are stripped of whitespace; a missing host means 'localhost', a missing port 4730.
    IPv6 addresses are written in brackets: '[::1]' or '[::1]:4730'.  Empty items, bad ports
    and malformed hosts raise ValueError with a short message.  Repeated servers are listed
    once.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("no gearman server given")
    servers: list[Server] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty server entry in {spec!r}")
        if item.startswith("["):
            close = item.find("]")
            if close < 0:
                raise ValueError(f"missing ']' in {item!r}")
            host = item[1:close]
            rest = item[close + 1 :]
            if not host:
                raise ValueError(f"empty address in {item!r}")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"unexpected text after ']' in {item!r}")
                port = _parse_port(rest[1:], item)
            else:
                port = DEFAULT_PORT
        elif item.count(":") > 1:
            raise ValueError(f"IPv6 address must be written as [address]:port in {item!r}")
        else:
            host, sep, port_text = item.partition(":")
            host = host.strip()
            port = _parse_port(port_text.strip(), item) if sep else DEFAULT_PORT
            host = host or "localhost"
        _check_host(host, item)
        server = (host, port)
        if server not in servers:
            servers.append(server)
    return servers


def _label(server: Server) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- jobs


class JobFailed(Exception):
    """Raised by a handler to fail the job.

    ``message`` (bytes or None), when given, is sent to the client as WORK_WARNING just
    before the WORK_FAIL that ends the job (not as WORK_EXCEPTION; see the module docstring).
    """

    def __init__(self, message: bytes | None = None) -> None:
        super().__init__(message)
        self.message = message


_FINISHED = -1
_new = object.__new__


class _Text:
    """A job's handle or unique as text: what a hand-made job was given (or was set to),
    else its raw bytes decoded when first asked for (not UTF-8: surrogate escapes)."""

    def __init__(self, raw: str, text: str) -> None:
        self.raw, self.text = raw, text

    @overload
    def __get__(self, job: None, owner: Any = None) -> _Text: ...
    @overload
    def __get__(self, job: Job, owner: Any = None) -> str: ...
    def __get__(self, job: Job | None, owner: Any = None) -> _Text | str:
        if job is None:
            return self
        text = getattr(job, self.text, None)  # a job _run_job made leaves it unset
        if text is None:
            text = getattr(job, self.raw).decode("utf-8", "surrogateescape")
            setattr(job, self.text, text)
        return text

    def __set__(self, job: Job, value: str) -> None:
        setattr(job, self.text, value)


class Job:
    """What a handler receives: one job assigned by gearmand.

    Attributes: ``workload`` (bytes), ``function_name`` (str, as registered), ``handle``
    and ``unique`` (str; bytes that are not UTF-8 are kept as surrogate escapes).
    send_status/send_data/send_warning send WORK_STATUS/WORK_DATA/WORK_WARNING at once on
    the connection the job came from (on a server without WORK_DATA and WORK_WARNING, Perl's
    Gearman::Server, send_data and send_warning send nothing; the worker logs that once).

    A Job built by hand (no connection) accepts send_* calls and drops them, which makes
    handlers easy to call directly.  Sending for a job that has already finished raises
    RuntimeError.
    """

    __slots__ = (
        "_conn", "_gen", "_handle", "_handle_text", "_unique", "_unique_text", "function_name",
        "workload",
    )  # fmt: skip

    def __init__(
        self,
        workload: bytes,
        function_name: str,
        handle: str,
        unique: str,
        conn: _Conn | None = None,
        raw_handle: bytes | None = None,
        raw_unique: bytes | None = None,
    ) -> None:
        self.workload = workload
        self.function_name = function_name
        self._handle_text: str | None = handle
        self._unique_text: str | None = unique
        self._conn = conn
        self._gen = conn.gen if conn is not None else 0
        self._handle = (
            raw_handle if raw_handle is not None else handle.encode("utf-8", "surrogateescape")
        )
        self._unique = (
            raw_unique if raw_unique is not None else unique.encode("utf-8", "surrogateescape")
        )

    # a job from gearmand has them decoded when asked for: most jobs never look at them
    handle = _Text("_handle", "_handle_text")
    unique = _Text("_unique", "_unique_text")

    def __repr__(self) -> str:
        return (
            f"Job(function_name={self.function_name!r}, handle={self.handle!r}, "
            f"unique={self.unique!r}, workload={len(self.workload)} bytes)"
        )

    def _send(self, ptype: int, body: bytes) -> None:
        conn = self._conn
        if conn is None:
            if self._gen == _FINISHED:
                raise RuntimeError("job is finished; nothing can be sent for it any more")
            return  # a Job made by hand, not connected to any server
        if conn.gen != self._gen:
            return  # the connection it came from is gone; gearmand requeues the job
        if conn.legacy and ptype != P.WORK_STATUS:
            return  # the server has no WORK_DATA/WORK_WARNING (logged once per connection)
        h = self._handle
        conn.write(b"".join((header(ptype, len(h) + 1 + len(body)), h, b"\0", body)))

    def send_status(self, numerator: int, denominator: int) -> None:
        """Send WORK_STATUS (progress numerator/denominator) to the client now."""
        self._send(P.WORK_STATUS, b"%d\0%d" % (int(numerator), int(denominator)))

    def send_data(self, data: bytes | str) -> None:
        """Send WORK_DATA (a partial result) to the client now; str is UTF-8 encoded."""
        self._send(P.WORK_DATA, data.encode() if isinstance(data, str) else bytes(data))

    def send_warning(self, data: bytes | str) -> None:
        """Send WORK_WARNING to the client now; str is UTF-8 encoded."""
        self._send(P.WORK_WARNING, data.encode() if isinstance(data, str) else bytes(data))


Handler = Callable[[Job], bytes]


def coerce_result(result: Any, error: type[TypeError] = TypeError, what: str = "handler") -> bytes:
    """A result as bytes: bytes as is, str as UTF-8, None as empty; else ``error``."""
    if isinstance(result, bytes):
        return result
    if isinstance(result, str):
        return result.encode("utf-8")
    if result is None:
        return b""
    if isinstance(result, bytearray | memoryview):
        return bytes(result)
    raise error(
        f"{what} returned {type(result).__name__}; return bytes, str or None, "
        "or set encode= to turn it into bytes"
    )


def _failure_packet(
    handle: bytes, message: bytes | None, exceptions: bool = False, legacy: bool = False
) -> bytes:
    """What ends a failed job (module docstring): WORK_WARNING + WORK_FAIL by default, as
    gearmand 1.1.20 garbles WORK_EXCEPTION for most clients; WORK_EXCEPTION alone (final)
    with ``exceptions``; WORK_EXCEPTION + WORK_FAIL on a server without WORK_WARNING, whose
    WORK_EXCEPTION is not final (``legacy``)."""
    fail = header(WORK_FAIL, len(handle)) + handle
    if message is None:
        return fail
    kind = WORK_EXCEPTION if exceptions or legacy else WORK_WARNING
    first = b"".join((header(kind, len(handle) + 1 + len(message)), handle, b"\0", message))
    return first if exceptions and not legacy else first + fail


def _exception_message(exc: BaseException) -> bytes | None:
    if isinstance(exc, JobFailed):
        msg = exc.message
        if msg is None:
            return None
        return msg.encode() if isinstance(msg, str) else bytes(msg)
    text = str(exc) or type(exc).__name__
    return text.encode("utf-8", "replace")


# --------------------------------------------------------------------------- worker

_DOWN = 0
_CONNECTING = 1
_UP = 2

_IN = select.POLLIN
_OUT = select.POLLOUT
_ERR_HUP = select.POLLERR | select.POLLHUP


class _Poller:
    """epoll where the platform has it, else poll; both use the POLLIN/POLLOUT masks."""

    def __init__(self) -> None:
        self.objects: dict[int, _Conn | None] = {}
        impl: Any
        if hasattr(select, "epoll"):
            impl = select.epoll()
            self.scale = 1.0  # epoll.poll takes seconds
        else:  # pragma: no cover - platforms without epoll
            impl = select.poll()
            self.scale = 1000.0  # poll.poll takes milliseconds
        self._impl = impl
        self.poll: Callable[[float], list[tuple[int, int]]] = impl.poll

    def register(self, fd: int, events: int, obj: _Conn | None) -> None:
        self._impl.register(fd, events)
        self.objects[fd] = obj

    def modify(self, fd: int, events: int) -> None:
        self._impl.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self.objects.pop(fd, None)
        try:
            self._impl.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass

    def close(self) -> None:
        self.objects.clear()
        if hasattr(self._impl, "close"):
            self._impl.close()


class _Conn:
    """One worker connection to one gearmand; reused across reconnects."""

    __slots__ = (
        "addr_idx", "addrs", "backoff", "broken", "confirmed", "connect_deadline", "deadline",
        "events", "fd", "gen", "grab", "grabbing", "inbuf", "label", "last_rx", "legacy",
        "need", "next_attempt", "noted_legacy", "out", "poller", "retry_at",
        "server", "skip", "skip_head", "skip_size", "sleeping", "sock", "state", "tampered",
    )  # fmt: skip

    def __init__(self, server: Server) -> None:
        self.server = server
        self.label = _label(server)
        self.sock: socket.socket | None = None
        self.fd = -1
        self.poller: _Poller | None = None
        self.events = 0
        self.state = _DOWN
        self.gen = 0
        self.addrs: list[Address] = []
        self.addr_idx = 0
        self.next_attempt = 0.0
        self.backoff = 0.0
        self.connect_deadline = 0.0
        self.noted_legacy = False  # the GRAB_JOB fallback was logged (once per server)
        self.reset()

    def reset(self) -> None:
        self.inbuf = bytearray()
        self.need = 0
        self.out = bytearray()
        self.confirmed = False  # a grab was answered: jobs can come from this connection
        self.grab = _GRAB  # what this connection grabs with (GRAB_JOB on older servers)
        self.legacy = False  # GRAB_JOB_UNIQ refused: no WORK_DATA/WORK_WARNING either
        self.retry_at = 0.0  # grabs refused: when to try again
        self.skip = 0  # bytes of an oversize job packet still to discard
        self.skip_size = 0
        self.skip_head = bytearray()
        self.grabbing = False
        self.sleeping = False
        self.deadline = 0.0
        self.last_rx = 0.0
        self.broken: str | None = None
        self.tampered = False  # the descriptor was closed or replaced under us (by job code)

    def attach(self, sock: socket.socket, poller: _Poller, events: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.poller = poller
        self.events = events
        self.reset()
        poller.register(self.fd, events, self)

    def set_events(self, events: int) -> None:
        if events != self.events and self.poller is not None:
            self.poller.modify(self.fd, events)
            self.events = events

    def write(self, data: bytes) -> None:
        """Send now; whatever the socket does not take is kept and sent when writable."""
        sock = self.sock
        if sock is None or self.broken is not None:
            return
        if self.out:
            self.out += data
            return
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.broken = error_text(exc)
            self.tampered = exc.errno in (errno.EBADF, errno.ENOTSOCK)
            return
        if sent < len(data):
            self.out += memoryview(data)[sent:]
            self.set_events(_IN | _OUT)

    def close(self) -> None:
        sock = self.sock
        if sock is not None:
            if self.poller is not None:
                self.poller.unregister(self.fd)
            try:
                sock.close()
            except OSError:
                pass
        self.sock = None
        self.poller = None
        self.fd = -1
        self.events = 0
        self.state = _DOWN
        self.gen += 1
        self.reset()


class GearmanWorker:
    """A Gearman worker serving ``functions`` on every server in ``servers``.

    Handlers return bytes (WORK_COMPLETE; None counts as b"" and str is UTF-8 encoded),
    raise :class:`JobFailed` to fail the job, and any other ``Exception`` fails the job with
    ``str(exc)`` (or the exception's class name when that is empty) as the message.
    ``BaseException`` that is not an ``Exception`` (SystemExit, KeyboardInterrupt) is not
    caught: it closes the connections and leaves :meth:`work`; gearmand then hands the job
    to another worker (:mod:`gdriver.process` turns every exception into a failed job).
    ``protocol`` (:class:`Protocol`): how failures are sent and the largest job packet read.
    """

    #: Seconds to wait for the reply to a grab before the connection is considered dead.
    reply_timeout = 20.0
    #: Seconds of silence on a sleeping connection after which a grab checks it (every server
    #: answers a grab; ECHO_REQ is optional); also the retry period of refused grabs.
    ping_interval = 30.0
    #: Upper bound, in seconds, for waiting on outstanding grabs and unsent results when
    #: stopping.
    stop_grace = 5.0
    #: should_stop() is checked at least this often (seconds) even with no wake fds.
    poll_interval = 0.5

    def __init__(
        self,
        servers: list[Server],
        functions: dict[str, Handler],
        client_id: str | None = None,
        reconnect_min: float = 0.05,
        reconnect_max: float = 0.5,
        connect_timeout: float = 1.0,
        protocol: Protocol | None = None,
    ) -> None:
        if not servers:
            raise ValueError("no gearman server given")
        if not functions:
            raise ValueError("no functions to register")
        if reconnect_min <= 0 or reconnect_max < reconnect_min:
            raise ValueError("need 0 < reconnect_min <= reconnect_max")
        self.servers = list(dict.fromkeys(servers))
        self.functions = dict(functions)
        self.client_id = client_id
        self.reconnect_min = float(reconnect_min)
        self.reconnect_max = float(reconnect_max)
        self.connect_timeout = float(connect_timeout)
        self.protocol = protocol if protocol is not None else Protocol()
        self._handlers: dict[bytes, tuple[str, Handler]] = {
            name.encode(): (name, fn) for name, fn in self.functions.items()
        }
        hello = []
        if client_id:
            hello.append(pack(P.SET_CLIENT_ID, client_id.encode()))
        hello.extend(pack(P.CAN_DO, name) for name in self._handlers)
        self._hello = b"".join(hello)
        self._conns = [_Conn(s) for s in self.servers]
        self._poller: _Poller | None = None
        self._confirmed = 0
        self._stopping = False
        self._should_stop: Callable[[], bool] = _never
        self._on_registered: Callable[[int], None] | None = None
        self._on_refused: Callable[[int], None] | None = None
        self._refusing: set[_Conn] = set()  # servers refusing every grab
        #: Called with (function, handle, message) for a job failed without running it
        #: (its packet is over ``max_packet_size``), after the failure was sent.
        self.on_rejected: Callable[[str, str, str], None] | None = None
        #: Called after each job's handler with False when its answer (WORK_COMPLETE or
        #: WORK_FAIL) could not be handed to the connection's socket because the job closed
        #: or replaced the descriptor (gearmand then hands the job out again), else True.
        self.on_answered: Callable[[bool], None] | None = None
        #: Jobs finished with WORK_COMPLETE / with WORK_FAIL.
        self.jobs_completed = 0
        self.jobs_failed = 0
        self._on_packet: dict[int, Callable[[_Conn, int, bytes], None]] = {
            int(P.JOB_ASSIGN_UNIQ): self._on_assign,
            int(P.JOB_ASSIGN): self._on_assign,
            int(P.NO_JOB): self._on_no_job,
            int(P.NOOP): self._on_noop,
            int(P.ECHO_RES): self._on_echo_res,
            int(P.ERROR): self._on_error,
            int(P.OPTION_RES): self._on_option_res,
        }
        self._stop_deadline = 0.0
        self._stop_jobs = -1
        #: When the timers (connects, pings, grab and connect deadlines, on_idle) must next be
        #: looked at; 0.0: at once (any event but a job answered with a grab resets it).
        self._due = 0.0

    @property
    def confirmed_servers(self) -> int:
        """Number of servers on which the registration is currently confirmed."""
        return self._confirmed

    # ------------------------------------------------------------------ main loop

    def work(
        self,
        should_stop: Callable[[], bool],
        wake_fds: Sequence[int] = (),
        on_wake: Callable[[int], None] | None = None,
        on_registered: Callable[[int], None] | None = None,
        on_idle: Callable[[], float | None] | None = None,
        on_refused: Callable[[int], None] | None = None,
    ) -> None:
        """Serve until should_stop() is true at a safe point, then close connections.

        on_registered(n) is called when the number of servers on which a grab was answered
        changes; on_refused(n) when the number of servers that refuse every grab changes.

        on_idle(), when given, is called before the loop blocks while every live connection
        is asleep (PRE_SLEEP sent, no grab outstanding): the worker has no work. It may return
        the number of seconds after which it wants to be called again.

        should_stop() is checked after every job, before every grab, after every wake fd
        event, before every computation of the timers and at least every ``poll_interval``
        seconds.  Once it is true no grab is
        sent; a grab still outstanding is waited for (at most ``stop_grace`` seconds) and a
        job it brings is run, so no job is taken and dropped.
        """
        if self._poller is not None:
            raise RuntimeError("work() is already running")
        self._should_stop = should_stop
        self._on_registered = on_registered
        self._on_refused = on_refused
        self._refusing = set()
        self._stopping = False
        self.close()
        poller = self._poller = _Poller()
        objects = poller.objects
        poll = poller.poll
        scale = poller.scale
        monotonic = time.monotonic
        try:
            self._start(wake_fds)
            while True:
                now = monotonic()
                if self._stopping or (now >= self._due and should_stop()):
                    self._stopping = True
                    self._due = 0.0
                    timeout = self._stop_timeout(now)
                    if timeout is None:
                        return
                elif now < self._due:
                    # only jobs answered with a grab since the timers were last computed (and
                    # each asked should_stop() before its grab): a grab's deadline only moves
                    # later, so nothing is due before _due
                    timeout = self._due - now
                else:
                    self._due = now  # a drop while the timers run resets it: then look again
                    timeout = self._serve_timeout(now, on_idle)
                    if self._due:
                        self._due = now + timeout
                    else:
                        timeout = 0.0
                events = poll(timeout * scale if timeout > 0.0 else 0.0)
                now = monotonic()
                for fd, ev in events:
                    obj = objects.get(fd, _GONE)
                    if obj is None:
                        self._on_wake_fd(fd, on_wake)
                    elif obj is _GONE:
                        continue  # closed while handling an earlier event of this round
                    elif ev == _IN and obj.state == _UP:
                        self._read(obj, now)
                    else:
                        self._on_event(obj, ev, now)
                if now >= self._due:
                    self._check_deadlines(now, events)
        finally:
            self._should_stop = _never
            self._on_registered = None
            self._on_refused = None
            self.close()
            self._poller = None
            poller.close()

    def _start(self, wake_fds: Sequence[int]) -> None:
        poller = self._poller
        assert poller is not None
        for fd in dict.fromkeys(wake_fds):
            poller.register(fd, _IN, None)
        now = time.monotonic()
        for c in self._conns:
            c.next_attempt = now
            c.backoff = self.reconnect_min
            c.addrs = []
            c.addr_idx = 0
        self._stop_deadline = 0.0
        self._stop_jobs = -1
        self._due = 0.0

    def _stop_timeout(self, now: float) -> float | None:
        """While stopping: None once nothing is left to wait for, else the poll timeout."""
        jobs = self.jobs_completed + self.jobs_failed
        if jobs != self._stop_jobs:
            # a job run while stopping gets its own grace period for its result
            self._stop_deadline = now + self.stop_grace
            self._stop_jobs = jobs
        # wait for results to go out and for grabs a live server may still answer
        # (a stalled one gets its job back when we close: gearmand re-queues it)
        if now >= self._stop_deadline or not any(
            c.out or (c.grabbing and now - c.last_rx < STALLED) for c in self._conns
        ):
            return None
        return min(self._timers(now, True), self._stop_deadline - now)

    def _serve_timeout(self, now: float, on_idle: Callable[[], float | None] | None) -> float:
        """Start due connects and pings, tell on_idle when there is no work; the poll timeout."""
        timeout = self._timers(now, False)
        if on_idle is not None:
            # awake connections count as work unless silent for STALLED seconds
            # (a gearmand that accepts but never answers must not keep us busy)
            # (a loop, not any() over a generator: this runs before every job)
            busy = False
            for c in self._conns:
                if c.state == _UP and not c.sleeping and now - c.last_rx < STALLED:
                    busy = True
                    break
            if busy:
                timeout = min(timeout, STALLED)
            else:
                again = on_idle()
                if again is not None:
                    timeout = min(timeout, again)
        return timeout

    def _on_wake_fd(self, fd: int, on_wake: Callable[[int], None] | None) -> None:
        self._due = 0.0
        if on_wake is not None:
            on_wake(fd)
        elif not _drain(fd):
            self._poller.unregister(fd)  # type: ignore[union-attr]
        self._stop_now()

    def forget(self) -> None:
        """In a process forked from this one (job code called ``os.fork``): close this
        process's copies of the connections and of the poller, sending nothing and leaving
        the parent's epoll set as it is; the connections count as broken from now on."""
        for c in self._conns:
            if c.sock is not None:
                try:
                    c.sock.close()
                except OSError:
                    pass
            c.sock, c.poller, c.fd, c.out = None, None, -1, bytearray()
            c.broken = "closed in a forked process"
        if self._poller is not None:
            self._poller.objects.clear()
            try:
                self._poller._impl.close()
            except OSError:
                pass

    def close(self) -> None:
        """Close every connection (work() does this itself when it returns)."""
        for c in self._conns:
            c.close()
        self._confirmed = 0

    # ------------------------------------------------------------------ timers

    def _timers(self, now: float, stopping: bool) -> float:
        """Start due connects, send idle pings; return the poll timeout in seconds."""
        timeout = self.poll_interval
        for c in self._conns:
            state = c.state
            if state == _UP:
                if c.grabbing:
                    timeout = min(timeout, c.deadline - now)
                elif (c.sleeping or c.retry_at) and not stopping:
                    # a grab checks a silent connection: every server answers one
                    due = c.retry_at or c.last_rx + self.ping_interval
                    if now >= due:
                        c.sleeping = False
                        c.retry_at = 0.0
                        self._send_grab(c, now)
                        if c.broken is not None:
                            self._drop(c, c.broken)
                        continue
                    timeout = min(timeout, due - now)
            elif state == _DOWN:
                if stopping:
                    continue
                if now >= c.next_attempt:
                    self._connect(c, now)
                    if c.state == _CONNECTING:
                        timeout = min(timeout, c.connect_deadline - now)
                    elif c.state == _DOWN:
                        timeout = min(timeout, c.next_attempt - now)
                else:
                    timeout = min(timeout, c.next_attempt - now)
            else:
                timeout = min(timeout, c.connect_deadline - now)
        return timeout

    def _check_deadlines(self, now: float, events: list[tuple[int, int]]) -> None:
        # Only connections poll() did not report ready can have timed out: a reply that
        # arrived while a handler ran is reported by the poll() that follows it.
        for c in self._conns:
            if c.state == _UP:
                if c.grabbing and now >= c.deadline and not _is_ready(c.fd, events):
                    self._drop(c, "timeout waiting for reply")
            elif (
                c.state == _CONNECTING and now >= c.connect_deadline and not _is_ready(c.fd, events)
            ):
                self._connect_failed(c, now, "connect timeout")

    # ------------------------------------------------------------------ connections

    def _connect(self, c: _Conn, now: float) -> None:
        poller = self._poller
        assert poller is not None
        reason = "no address"
        if c.addr_idx >= len(c.addrs):
            try:
                c.addrs = resolve(*c.server)
            except OSError as exc:
                self._schedule_retry(c, now, error_text(exc))
                return
            c.addr_idx = 0
        while c.addr_idx < len(c.addrs):
            address = c.addrs[c.addr_idx]
            c.addr_idx += 1
            try:
                sock, connected = connect(address)
            except OSError as exc:
                reason = error_text(exc)
                continue
            if connected:
                c.attach(sock, poller, _IN)
                self._connected(c, now)
            else:
                c.attach(sock, poller, _OUT)
                c.state = _CONNECTING
                c.connect_deadline = now + self.connect_timeout
            return
        self._schedule_retry(c, now, reason)

    def _connect_failed(self, c: _Conn, now: float, reason: str) -> None:
        c.close()
        if c.addr_idx < len(c.addrs):
            self._connect(c, now)  # next address of the same name
        else:
            self._schedule_retry(c, now, reason)

    def _schedule_retry(self, c: _Conn, now: float, reason: str) -> None:
        c.addr_idx = len(c.addrs)  # resolve again on the next attempt
        c.next_attempt = now + c.backoff
        log.debug("gearmand %s unavailable (%s); retry in %.2fs", c.label, reason, c.backoff)
        c.backoff = min(c.backoff * 2.0, self.reconnect_max)

    def _connected(self, c: _Conn, now: float) -> None:
        c.state = _UP
        c.last_rx = now
        data = self._hello
        if not self._stopping and not self._stop_now():
            c.grabbing = True  # the grab's answer confirms the registration
            c.deadline = now + self.reply_timeout
            data += c.grab
        c.write(data)
        if c.broken is not None:
            self._drop(c, c.broken)

    def _send_grab(self, c: _Conn, now: float) -> None:
        c.grabbing = True
        c.deadline = now + self.reply_timeout
        c.write(c.grab)

    def _drop(self, c: _Conn, reason: str) -> None:
        self._due = 0.0
        was_confirmed = c.confirmed
        c.close()
        c.addr_idx = len(c.addrs)
        c.next_attempt = time.monotonic() + c.backoff
        c.backoff = min(c.backoff * 2.0, self.reconnect_max)
        if was_confirmed:
            log.warning("lost gearmand %s: %s", c.label, reason)
            self._set_confirmed(self._confirmed - 1)
        else:
            log.debug("gearmand %s dropped: %s", c.label, reason)

    def _set_confirmed(self, n: int) -> None:
        self._confirmed = n
        if self._on_registered is not None:
            self._on_registered(n)

    # ------------------------------------------------------------------ I/O

    def _on_event(self, c: _Conn, ev: int, now: float) -> None:
        self._due = 0.0
        sock = c.sock
        assert sock is not None
        if c.state == _CONNECTING:
            failed = connect_error(sock)
            if failed is not None:
                self._connect_failed(c, now, failed)
                return
            try:
                sock.getpeername()
            except OSError:
                return  # not connected yet (an event left over from a closed socket)
            c.set_events(_IN)
            self._connected(c, now)
            return
        if ev & _OUT and c.out:
            self._flush(c)
            if c.sock is None:
                return
        if ev & (_IN | _ERR_HUP):
            self._read(c, now)

    def _flush(self, c: _Conn) -> None:
        sock = c.sock
        assert sock is not None
        try:
            sent = sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(c, error_text(exc))
            return
        del c.out[:sent]
        if not c.out:
            c.set_events(_IN)

    def _read(self, c: _Conn, now: float) -> None:
        sock = c.sock
        assert sock is not None
        try:
            n = sock.recv_into(_recv_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(c, error_text(exc))
            return
        if not n:
            self._drop(c, "connection closed by server")
            return
        if now - c.last_rx >= STALLED:
            # the timers last saw it silent, so not busy (on_idle was told): look again
            self._due = 0.0
        c.last_rx = now
        if n > HEADER_SIZE and c.grabbing and not c.skip and not c.inbuf:
            # what nearly every read is: one whole JOB_ASSIGN_UNIQ and nothing else; its
            # fields are taken straight from the buffer (the checks are _parse's)
            magic, ptype, size = unpack_header(_recv_buffer, 0)
            if (
                ptype == JOB_ASSIGN_UNIQ
                and n == HEADER_SIZE + size
                and magic == RES
                and size <= self.protocol.max_packet_size
            ):
                parts = _recv_view[HEADER_SIZE:n].tobytes().split(b"\0", 3)
                if len(parts) == 4:
                    gen = c.gen
                    c.grabbing = False
                    if not c.confirmed:
                        self._confirm(c)
                    handle, fname, unique, workload = parts
                    self._run_job(c, handle, fname, unique, workload)
                    if c.gen == gen and c.broken is not None:
                        self._drop(c, c.broken)
                    return
        data = _recv_view[:n].tobytes()
        if c.skip:
            data = self._skip(c, data, now)
            if not data:
                return
        if c.inbuf:
            c.inbuf += data
            if len(c.inbuf) < c.need:
                return
            data = bytes(c.inbuf)
            c.inbuf = bytearray()
        self._parse(c, data)

    def _parse(self, c: _Conn, data: bytes) -> None:
        pos = 0
        total = len(data)
        gen = c.gen
        handlers = self._on_packet
        limit = self.protocol.max_packet_size
        while total - pos >= HEADER_SIZE:
            # codec.unpack() inlined: this loop runs for every packet of every job
            magic, ptype, size = unpack_header(data, pos)
            if magic != RES or size > limit:
                if magic == RES and ptype in _ASSIGNS and c.grabbing:
                    self._oversize(c, size, data[pos + HEADER_SIZE :])
                else:
                    self._drop(c, "malformed packet from server")
                return
            start = pos + HEADER_SIZE
            end = start + size
            if end > total:
                break
            pos = end
            on_packet = handlers.get(ptype)
            if on_packet is None:
                self._drop(c, f"unexpected packet type {ptype} from server")
                return
            if ptype not in _ASSIGNS:
                self._due = 0.0  # it may put the connection to sleep or start a timer
            on_packet(c, ptype, data[start:end])
            if c.gen != gen:
                return  # dropped, or closed by a callback: the rest belongs to that connection
            if c.broken is not None:
                self._drop(c, c.broken)
                return
        if pos < total:
            rest = data[pos:]
            c.inbuf = bytearray(rest)
            # a partial header is not checked yet; a whole one passed the checks above
            c.need = unpack(rest, 0, limit)[2] if len(rest) >= HEADER_SIZE else HEADER_SIZE

    # ------------------------------------------------------------------ oversize jobs

    def _oversize(self, c: _Conn, size: int, body: bytes) -> None:
        """A job packet over max_packet_size: discard its body as it arrives (never held in
        memory), then fail the job by its handle."""
        self._due = 0.0
        c.inbuf = bytearray()
        c.skip = c.skip_size = size
        c.skip_head = bytearray()
        rest = self._skip(c, body, time.monotonic())
        if rest and c.state == _UP:
            self._parse(c, rest)

    def _skip(self, c: _Conn, data: bytes, now: float) -> bytes:
        """Discard what belongs to the oversize packet; returns the bytes after it."""
        n = min(c.skip, len(data))
        room = _OVERSIZE_HEAD - len(c.skip_head)
        if room > 0:
            c.skip_head += data[: min(n, room)]
        c.skip -= n
        c.deadline = now + self.reply_timeout  # a slow transfer is not a dead server
        if c.skip:
            return b""
        self._reject_oversize(c)
        return data[n:] if c.state == _UP else b""

    def _reject_oversize(self, c: _Conn) -> None:
        handle, sep, rest = bytes(c.skip_head).partition(b"\0")
        if not sep or not handle:
            self._drop(c, "oversize job packet without a handle")
            return
        function = rest.partition(b"\0")[0].decode("utf-8", "replace")
        limit = self.protocol.max_packet_size
        message = (
            f"job packet of {c.skip_size} bytes is larger than max_packet_size "
            f"({limit} bytes); the job was not run"
        )
        c.skip_head = bytearray()
        log.error(
            "job %s (%s) failed: %s", function, handle.decode("utf-8", "replace"), message,
            extra={"function": function},
        )  # fmt: skip
        c.grabbing = False
        if not c.confirmed:
            self._confirm(c)
        self.jobs_failed += 1
        packet = _failure_packet(handle, message.encode(), self.protocol.send_exceptions, c.legacy)
        self._answer(c, packet)
        if self.on_rejected is not None:
            self.on_rejected(function, handle.decode("utf-8", "surrogateescape"), message)
        if c.broken is not None:
            self._drop(c, c.broken)

    # ------------------------------------------------------------------ replies

    def _on_assign(self, c: _Conn, ptype: int, body: bytes) -> None:
        fields = 4 if ptype == JOB_ASSIGN_UNIQ else 3
        parts = body.split(b"\0", fields - 1)
        if len(parts) != fields or not c.grabbing:
            self._drop(c, "malformed JOB_ASSIGN from server")
            return
        c.grabbing = False
        if not c.confirmed:
            self._confirm(c)
        if fields == 4:
            self._run_job(c, *parts)
        else:
            self._run_job(c, parts[0], parts[1], b"", parts[2])

    def _on_no_job(self, c: _Conn, ptype: int, body: bytes) -> None:
        if not c.grabbing:
            self._drop(c, "unexpected NO_JOB from server")
            return
        c.grabbing = False
        if not c.confirmed:
            self._confirm(c)
        if not self._stopping:
            c.sleeping = True
            c.write(_PRE_SLEEP)

    def _on_noop(self, c: _Conn, ptype: int, body: bytes) -> None:
        if c.sleeping:
            c.sleeping = False
            if not self._stopping and not self._stop_now():
                self._send_grab(c, time.monotonic())

    def _confirm(self, c: _Conn) -> None:
        """A grab was answered: the registration holds and jobs can come from this server."""
        c.confirmed = True
        c.backoff = self.reconnect_min
        log.info("registered on gearmand %s", c.label)
        self._set_confirmed(self._confirmed + 1)
        if c in self._refusing:
            self._refusing.discard(c)
            log.warning("gearmand %s accepts grabs again", c.label)
            self._report_refused()

    def _report_refused(self) -> None:
        if self._on_refused is not None:
            self._on_refused(len(self._refusing))

    def _on_echo_res(self, c: _Conn, ptype: int, body: bytes) -> None:
        pass  # never asked for (optional on some servers); harmless

    def _on_error(self, c: _Conn, ptype: int, body: bytes) -> None:
        code, _, text = body.partition(b"\0")
        reason = f"{code.decode('utf-8', 'replace')}: {text.decode('utf-8', 'replace')}"
        if c.grabbing and not c.confirmed:
            # nothing before the first grab draws an answer: this ERROR is the grab's
            self._grab_refused(c, reason.strip())
            return
        log.warning("gearmand error %s: %s", c.label, reason)

    def _grab_refused(self, c: _Conn, reason: str) -> None:
        now = time.monotonic()
        if c.grab is _GRAB:
            # an older server (Perl's Gearman::Server): GRAB_JOB is in every version
            c.grab = _GRAB_PLAIN
            c.legacy = True
            if not c.noted_legacy:
                c.noted_legacy = True
                log.warning(
                    "gearmand %s refuses GRAB_JOB_UNIQ (%s): grabbing with GRAB_JOB; on this "
                    "server job.unique is empty, send_data and send_warning send nothing, and "
                    "a failure's message goes out as WORK_EXCEPTION before WORK_FAIL",
                    c.label, reason,
                )  # fmt: skip
            c.deadline = now + self.reply_timeout
            c.write(c.grab)
            return
        # no grab works: nothing can be served from this server; try again later
        c.grabbing = False
        c.grab = _GRAB
        c.legacy = False
        c.retry_at = now + self.ping_interval
        if c not in self._refusing:
            self._refusing.add(c)
            log.warning(
                "gearmand %s refuses grabs (%s): no job can be served from it; trying again "
                "every %gs", c.label, reason, self.ping_interval,
            )  # fmt: skip
            self._report_refused()

    def _on_option_res(self, c: _Conn, ptype: int, body: bytes) -> None:
        pass  # an answer to nothing we asked; harmless

    def _stop_now(self) -> bool:
        if self._should_stop():
            self._stopping = True
        return self._stopping

    def _run_job(
        self, c: _Conn, handle: bytes, fname: bytes, unique: bytes, workload: bytes
    ) -> None:
        entry = self._handlers.get(fname)
        if entry is None:
            packet = _failure_packet(handle, b"function not registered by this worker")
            self.jobs_failed += 1
        else:
            name, handler = entry
            job = _new(Job)  # Job(workload, name, "", "", c, handle, unique), minus its call
            job.workload = workload
            job.function_name = name
            job._handle = handle
            job._unique = unique
            job._conn = c
            job._gen = c.gen
            try:
                result = handler(job)
                if type(result) is not bytes:
                    result = coerce_result(result)
                size = len(handle) + 1 + len(result)
                packet = b"".join((pack_header(REQ, WORK_COMPLETE, size), handle, b"\0", result))
                self.jobs_completed += 1
            except Exception as exc:
                packet = _failure_packet(
                    handle, _exception_message(exc), self.protocol.send_exceptions, c.legacy
                )
                self.jobs_failed += 1
            finally:
                job._conn = None
                job._gen = _FINISHED
        if c.broken is None:
            self._answer(c, packet)
        if entry is not None and self.on_answered is not None:
            # no syscall of its own: whether the write above took the answer; a connection
            # gearmand broke is reconnected as ever (gearmand re-queues the job), a descriptor
            # the job closed or replaced leaves nothing in this process to trust
            self.on_answered(c.broken is None or not c.tampered)

    def _answer(self, c: _Conn, packet: bytes) -> None:
        """Send a job's result together with the next grab (unless stopping), in one write."""
        if not self._stopping and self._should_stop():  # (_stop_now() without its call)
            self._stopping = True
        if not self._stopping:
            packet += c.grab
            c.grabbing = True
            c.deadline = time.monotonic() + self.reply_timeout
        c.write(packet)


def _never() -> bool:
    return False


def _drain(fd: int) -> bool:
    """Read and discard what is readable on fd; False at end of file."""
    try:
        return bool(os.read(fd, 65536))
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False


def _is_ready(fd: int, events: list[tuple[int, int]]) -> bool:
    return any(efd == fd for efd, _ in events)


_GONE: Any = object()


# --------------------------------------------------------------------------- admin protocol

_MULTILINE_COMMANDS = ("status", "workers", "prioritystatus", "show")


def _is_multiline(command: str) -> bool:
    words = command.split()
    return bool(words) and words[0].lower() in _MULTILINE_COMMANDS


def _admin_payload(command: str) -> bytes:
    if "\n" in command or "\r" in command or "\0" in command:
        raise ValueError("admin command must be a single line")
    if not command.strip():
        raise ValueError("empty admin command")
    return command.strip().encode() + b"\n"


def _admin_reply(buf: bytes | bytearray, multiline: bool) -> list[str] | None:
    """The reply lines once buf holds a whole reply, else None."""
    if not multiline or buf.startswith(b"ERR "):
        if b"\n" not in buf:
            return None
        line = bytes(buf).split(b"\n", 1)[0]
        return [line.rstrip(b"\r").decode("utf-8", "replace")]
    if not (buf in (b".\n", b".\r\n") or buf.endswith((b"\n.\n", b"\n.\r\n"))):
        return None
    lines = bytes(buf).decode("utf-8", "replace").split("\n")
    lines = [line.rstrip("\r") for line in lines]
    while lines and lines[-1] == "":
        lines.pop()
    return lines[:-1]  # without the final "."


@dataclass(frozen=True, slots=True)
class FunctionStatus:
    """One line of the ``status`` admin command."""

    total: int
    running: int
    workers: int

    @property
    def waiting(self) -> int:
        return max(self.total - self.running, 0)


def _count(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


def parse_status(lines: list[str]) -> dict[str, FunctionStatus]:
    """Parse ``status`` reply lines ("function\\ttotal\\trunning\\tworkers"); skip bad lines."""
    out: dict[str, FunctionStatus] = {}
    for line in lines:
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 4 or not parts[0]:
            continue
        total, running, workers = (_count(p.strip()) for p in parts[1:])
        if total is None or running is None or workers is None:
            continue
        out[parts[0]] = FunctionStatus(total, running, workers)
    return out


class AdminRequest:
    """One admin text command to one server over a fresh non-blocking connection.

    Drive it from a selectors loop: call :meth:`start` (it raises OSError if the request
    fails at once), register the request (or :meth:`fileno`) for :meth:`wanted_events`,
    call :meth:`on_event` with the ready mask (then re-read wanted_events), and call
    :meth:`check_timeout` with ``time.monotonic()`` every loop.  When ``done`` is set,
    ``error`` is None and ``lines`` holds the reply without the final '.', or ``error`` says
    what went wrong: "connection refused", "timeout", "malformed reply", "server error:
    ERR ..." (gearmand rejected the command), ...  The socket stays open until
    :meth:`close`, so unregister it first and then close it.
    """

    def __init__(self, server: Server, command: str, timeout: float) -> None:
        self.server = server
        self.command = command
        self.timeout = float(timeout)
        self.done = False
        self.error: str | None = None
        self.lines: list[str] = []
        self.deadline = 0.0
        self._payload = _admin_payload(command)
        self._multiline = _is_multiline(command)
        self._sock: socket.socket | None = None
        self._fd = -1
        self._state = "new"
        self._sent = 0
        self._buf = bytearray()

    def __repr__(self) -> str:
        return f"AdminRequest({_label(self.server)}, {self.command!r}, state={self._state})"

    def start(self) -> None:
        """Resolve the host, create the socket and start connecting; never blocks on I/O.

        When the request fails at once (the name does not resolve, no socket can be made,
        the connect is refused synchronously) ``done`` and ``error`` are set, the socket is
        closed and OSError is raised with ``error`` as its message; there is then nothing to
        register.
        """
        if self._state != "new":
            raise RuntimeError("AdminRequest already started")
        self.deadline = time.monotonic() + self.timeout
        self._state = "connecting"
        try:
            # one socket only, so the fd stays stable for the caller's selector
            sock, connected = connect(resolve(*self.server)[0])
        except OSError as exc:
            self._fail_now(error_text(exc))
        self._sock = sock
        self._fd = sock.fileno()
        if connected:
            self._state = "sending"

    def _fail_now(self, error: str) -> NoReturn:
        self._fail(error)
        self.close()
        raise OSError(error)

    def fileno(self) -> int:
        return self._fd

    def wanted_events(self) -> int:
        if self._state in ("connecting", "sending"):
            return selectors.EVENT_WRITE
        return selectors.EVENT_READ

    def on_event(self, mask: int) -> None:
        if self.done or self._sock is None:
            return
        sock = self._sock
        try:
            if self._state == "connecting":
                failed = connect_error(sock)
                if failed is not None:
                    self._fail(failed)
                    return
                self._state = "sending"
            if self._state == "sending":
                self._sent += sock.send(self._payload[self._sent :])
                if self._sent >= len(self._payload):
                    self._state = "reading"
                return
            if self._state == "reading" and mask & selectors.EVENT_READ:
                chunk = sock.recv(65536)
                if not chunk:
                    self._fail("connection closed before the end of the reply")
                    return
                if b"\0" in chunk:
                    self._fail("malformed reply")
                    return
                self._buf += chunk
                if len(self._buf) > MAX_ADMIN_REPLY:
                    self._fail(f"reply larger than {MAX_ADMIN_REPLY} bytes")
                    return
                lines = _admin_reply(self._buf, self._multiline)
                if lines is not None:
                    self.lines = lines
                    self._buf = bytearray()
                    self._state = "done"
                    self.done = True
                    if lines and lines[0].startswith("ERR "):
                        self.error = f"server error: {lines[0]}"
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(error_text(exc))

    def check_timeout(self, now: float) -> None:
        if not self.done and self._state != "new" and now >= self.deadline:
            self._fail("timeout")

    def _fail(self, error: str) -> None:
        self.error = error
        self.done = True
        self._state = "failed"
        self._buf = bytearray()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        self._fd = -1
        if not self.done:
            self._fail("closed")
