"""The management console: a line protocol on TCP, byte-compatible with Gearman::Driver.

Replies end every line with CRLF and every reply with a ``.`` line; errors are
``ERR <code>: <detail>``. Only the commands below and registered plugin commands dispatch.

Plugins::

    from gdriver.console import ConsoleError, command

    @command("list", help="list the job names")
    def list_jobs(ctx, *args):
        return [job.name for job in ctx.driver.get_jobs()]

A plugin returns a list of lines (or one string, or None) and reports an error by raising
``ConsoleError(code, detail)``. Put it in a module your namespaces import, or expose it with
an entry point in the ``gdriver.console`` group.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
import selectors
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from gdriver import __version__
from gdriver.loop import TcpServer

if TYPE_CHECKING:
    from gdriver.control import Control
    from gdriver.jobs import JobState

log = logging.getLogger("gdriver.console")

MAX_LINE = 4096
MAX_CONNECTIONS = 64  # past it, the least recently active connection is closed
IDLE_TIMEOUT = 300.0
REAP_INTERVAL = 5.0  # s between looks for idle connections
MAX_OUTPUT = 1 << 20  # pending reply bytes per connection before we stop reading from it
# one connection's work per loop turn: a client flooding commands waits its turn, and the
# loop (health checks, other clients, the workers) goes round between its batches
TURN_COMMANDS = 16
TURN_OUTPUT = 64 << 10  # reply bytes; a single larger reply still goes out whole
# After an error that closes a connection (line too long), the rest of the client's input is
# read and dropped for a while: closing with unread input would reset the connection and the
# client could lose the ERR line.
LINGER = 2.0
LINGER_MAX = 1 << 20
DIGITS = re.compile(r"[0-9]+")
# telnet sends CR NUL for a bare CR (RFC 854): after a command in character mode, and as
# CR NUL CR LF for a piped "\r\n"; each is one line end, longest first
LINE_END = re.compile(rb"\r\x00\r\n|\r\x00|\r\n|\n\r|\n|\r")
LINE_ENDS = (b"\r\x00\r\n", b"\r\x00", b"\r\n", b"\n\r", b"\n", b"\r")
IAC = 255
WILL, WONT, DO, DONT = 251, 252, 253, 254
SGA = 3  # suppress go-ahead: we never send go-aheads, so we agree to it


class ConsoleError(Exception):
    """Raise from a command: the client gets ``ERR <code>: <detail>``."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"ERR {code}: {detail}")
        self.code, self.detail = code, detail


@dataclass
class Command:
    name: str
    func: Callable[..., Any]
    usage: str
    help: str


COMMANDS: dict[str, Command] = {}
PLUGINS: dict[str, Command] = {}


def command(
    name: str, usage: str = "", help: str = ""
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a console plugin command (a function ``f(ctx, *args)``)."""

    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        if name in COMMANDS or name in ("quit", "shutdown"):
            raise ValueError(f"console command {name!r} is built in")
        PLUGINS[name] = Command(name, func, usage, help or (func.__doc__ or "").strip())
        return func

    return register


def _builtin(
    name: str, usage: str, help: str
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(func: Callable[..., Any]) -> Callable[..., Any]:
        COMMANDS[name] = Command(name, func, usage, help)
        return func

    return register


def iso(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def job_fields(job: JobState) -> tuple[str, int, int, int, str, str, str]:
    msg = job.lasterror_msg.splitlines()[0] if job.lasterror_msg else ""
    error = f"ERROR: {msg}" if msg else ""
    return (
        job.name,
        job.min_processes,
        job.max_processes,
        job.count,
        iso(job.lastrun),
        iso(job.lasterror),
        error,
    )


def status_lines(jobs: Iterable[JobState]) -> list[str]:
    """Perl's status table: name left-aligned to the longest, numbers right-aligned."""
    rows = [job_fields(j) for j in jobs]
    w0 = max((len(r[0]) for r in rows), default=0)
    w1 = max([1] + [len(str(r[1])) for r in rows])
    w2 = max([1] + [len(str(r[2])) for r in rows])
    w3 = max([1] + [len(str(r[3])) for r in rows])
    return [
        f"{r[0]:<{w0}}  {r[1]:>{w1}}  {r[2]:>{w2}}  {r[3]:>{w3}}  {r[4]}  {r[5]}  {r[6]}"
        for r in rows
    ]


class Context:
    """What a command sees: the supervisor (``driver``, a :class:`gdriver.control.Control`)
    and a job lookup that raises the console error."""

    def __init__(self, driver: Control, server: ConsoleServer | None = None) -> None:
        self.driver = driver
        self.server = server

    def get_job(self, name: str | None) -> JobState:
        job = self.driver.get_job(name) if name else None
        if job is None:
            raise ConsoleError("invalid_job_name", name or "")
        return job


def _arg(args: tuple[str, ...], i: int) -> str | None:
    return args[i] if len(args) > i else None


@_builtin("status", "status", "one line per job: name, min, max, processes, last run, last error")
def cmd_status(ctx: Context, *args: str) -> list[str]:
    return status_lines(ctx.driver.get_jobs())


@_builtin("show", "show <job_name>", "the job's status line, then one PID per line")
def cmd_show(ctx: Context, *args: str) -> list[str]:
    job = ctx.get_job(_arg(args, 0))
    line = "{}  {}  {}  {}  {}  {}  {}".format(*job_fields(job))
    return [line, *(str(pid) for pid in sorted(job.processes))]


def _count(value: str | None, what: str) -> int:
    if value is None or not DIGITS.fullmatch(value):
        raise ConsoleError("invalid_value", f"{what} must be >= 0")
    return int(value)


def _set_limits(ctx: Context, job: JobState, low: int, high: int) -> None:
    problem = ctx.driver.limits_problem(job, low, high)
    if problem:  # nothing applied
        raise ConsoleError("invalid_value", problem)
    ctx.driver.set_limits(job, low, high)


@_builtin("set_min_processes", "set_min_processes <job_name> <n>", "set min processes, now")
def cmd_set_min(ctx: Context, *args: str) -> list[str]:
    job = ctx.get_job(_arg(args, 0))
    low = _count(_arg(args, 1), "min_processes")
    if low > job.max_processes:
        raise ConsoleError("invalid_value", "min_processes must be smaller than max_processes")
    _set_limits(ctx, job, low, job.max_processes)
    return ["OK"]


@_builtin("set_max_processes", "set_max_processes <job_name> <n>", "set max processes, now")
def cmd_set_max(ctx: Context, *args: str) -> list[str]:
    job = ctx.get_job(_arg(args, 0))
    high = _count(_arg(args, 1), "max_processes")
    if high < job.min_processes:
        raise ConsoleError("invalid_value", "max_processes must be greater than min_processes")
    _set_limits(ctx, job, job.min_processes, high)
    return ["OK"]


@_builtin("set_processes", "set_processes <job_name> <min> <max>", "set min and max, now")
def cmd_set_processes(ctx: Context, *args: str) -> list[str]:
    job = ctx.get_job(_arg(args, 0))
    low = _count(_arg(args, 1), "min_processes")
    high = _count(_arg(args, 2), "max_processes")
    if high < low:
        raise ConsoleError("invalid_value", "max_processes must be greater than min_processes")
    _set_limits(ctx, job, low, high)
    return ["OK"]


@_builtin("kill", "kill <pid> [<pid> ...]", "stop processes gracefully (after their job)")
def cmd_kill(ctx: Context, *args: str) -> list[str]:
    ours = {str(pid): pid for pid in ctx.driver.pids()}
    pids = [ours[a] for a in args if a in ours]
    if not pids:
        raise ConsoleError("invalid_value", "the given PID(s) do not belong to us")
    ctx.driver.kill_pids(pids)
    return ["OK"]


@_builtin("killall", "killall <job_name> [...] | killall *", "stop every process of the jobs")
def cmd_killall(ctx: Context, *args: str) -> list[str]:
    if not args:
        raise ConsoleError("invalid_value", "no job_names given")
    jobs = ctx.driver.get_jobs() if list(args) == ["*"] else [ctx.get_job(a) for a in args]
    for job in jobs:
        ctx.driver.kill_pids(list(job.processes))
    return ["OK"]


@_builtin("help", "help", "this list")
def cmd_help(ctx: Context, *args: str) -> list[str]:
    cmds = [*COMMANDS.values(), *PLUGINS.values()]
    lines = [f"{c.usage or c.name} - {c.help}" for c in sorted(cmds, key=lambda c: c.name)]
    lines.append("quit - close this connection")
    lines.append("shutdown - stop gdriver gracefully (in-flight jobs finish)")
    return sorted(lines)


@_builtin("version", "version", "gdriver version")
def cmd_version(ctx: Context, *args: str) -> list[str]:
    return [f"gdriver {__version__}"]


def load_plugins() -> None:
    """Import modules registered under the ``gdriver.console`` entry point group."""
    for ep in entry_points(group="gdriver.console"):
        try:
            ep.load()
        except Exception as exc:
            log.error("console plugin %s failed to load: %s", ep.name, exc)


def split_telnet(data: bytes) -> tuple[bytes, bytes, list[tuple[int, int]]]:
    """Take telnet IAC sequences out of the input; IAC IAC is a literal 0xFF. Returns the text,
    an incomplete sequence at the end, to be prefixed to the next read (a sequence may be
    split across reads; an unfinished subnegotiation is kept for at most MAX_LINE bytes), and
    the option negotiations seen, as (WILL|WONT|DO|DONT, option)."""
    if IAC not in data:
        return data, b"", []
    out = bytearray()
    options: list[tuple[int, int]] = []
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b != IAC:
            out.append(b)
            i += 1
            continue
        if i + 1 >= n:
            return bytes(out), data[i:], options
        nxt = data[i + 1]
        if nxt == IAC:
            out.append(IAC)
            i += 2
        elif WILL <= nxt <= DONT:
            if i + 2 >= n:
                return bytes(out), data[i:], options
            options.append((nxt, data[i + 2]))
            i += 3
        elif nxt == 250:  # SB ... IAC SE
            end = data.find(bytes([IAC, 240]), i + 2)
            if end < 0:
                rest = data[i:]
                return bytes(out), rest if len(rest) <= MAX_LINE else b"", options
            i = end + 2
        else:
            i += 2
    return bytes(out), b"", options


def dispatch(ctx: Context, line: str) -> tuple[list[str], str]:
    """Run one command line. Returns (reply lines without the '.', action) where action is
    '' or 'close' (quit) or 'shutdown'."""
    parts = re.split(r"\s+", line)
    while len(parts) > 1 and parts[-1] == "":
        parts.pop()
    name, args = parts[0], tuple(parts[1:])
    if name == "quit":
        return [], "close"
    if name == "shutdown":
        return [], "shutdown"
    cmd = COMMANDS.get(name) or PLUGINS.get(name)
    if cmd is None:
        return [f"ERR unknown_command: {name}"], ""
    try:
        result = cmd.func(ctx, *args)
    except ConsoleError as exc:
        return [str(exc)], ""
    except Exception as exc:
        log.exception("console command %s failed", name)
        return [f"ERR internal_error: {type(exc).__name__}: {exc}".splitlines()[0]], ""
    if result is None:
        return [], ""
    if isinstance(result, str):
        return result.splitlines() or [""], ""
    return [str(x) for x in result], ""


class Connection:
    def __init__(self, server: ConsoleServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.line_end = b""  # the last line's end, while more input could still extend it
        self.telnet = b""  # an IAC sequence cut by the end of the last read
        self.sga = False  # telnet suppress-go-ahead agreed
        self.closing = False
        self.linger = False  # drop input after our last reply instead of resetting
        self.dropped = 0
        self.shut = False
        self.linger_timer: Any = None
        self.last_active = time.monotonic()
        self.turn_commands = 0  # commands run in this loop turn
        self.turn_output = 0  # reply bytes made in this loop turn
        self.backlog = False  # input left for the next turn: read no more until it is done

    def stale(self, now: float) -> bool:
        return now - self.last_active > IDLE_TIMEOUT

    def events(self) -> int:
        ev = 0
        reading = not self.closing and not self.backlog and len(self.outbuf) < MAX_OUTPUT
        if self.linger or reading:
            ev |= selectors.EVENT_READ
        if self.outbuf or self.backlog:
            ev |= selectors.EVENT_WRITE  # writable at once: the backlog's turn comes next
        return ev

    def on_event(self, mask: int) -> None:
        self.last_active = time.monotonic()
        self.turn_commands = self.turn_output = 0
        if mask & selectors.EVENT_READ:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                self.close()
                return
            if data == b"":
                self.closing = True
                self.linger = False
            elif data and self.linger:
                self.dropped += len(data)
                if self.dropped > LINGER_MAX:
                    self.close()
                    return
            elif data:
                text, self.telnet, options = split_telnet(self.telnet + data)
                for verb, option in options:
                    self.negotiate(verb, option)
                self.feed(text)
        if self.outbuf:
            self.flush()
        if self.inbuf and len(self.outbuf) < MAX_OUTPUT:
            self.process_lines()  # input held back while the reply buffer was full
        self.update()

    def negotiate(self, verb: int, option: int) -> None:
        """Answer telnet option requests (RFC 854, 1143): we agree to suppress go-ahead and
        refuse every other option; a refusal of what is already off needs no answer, so two
        ends never loop. Clients that ask for nothing (Net::Telnet) never see an IAC."""
        if verb == DO and option == SGA:
            if not self.sga:
                self.sga = True
                self.outbuf += bytes([IAC, WILL, SGA])
        elif verb == DONT and option == SGA:
            if self.sga:
                self.sga = False
                self.outbuf += bytes([IAC, WONT, SGA])
        elif verb == DO:
            self.outbuf += bytes([IAC, WONT, option])
        elif verb == WILL:
            self.outbuf += bytes([IAC, DONT, option])

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self.line_end:
            # the last line ended the input read so far; these bytes may continue its end
            # (CR then LF, CR NUL then CR LF) rather than end an empty line
            joined = self.line_end + data
            if any(len(e) > len(joined) and e.startswith(joined) for e in LINE_ENDS):
                self.line_end = joined
                return
            m = LINE_END.match(joined)  # matches: joined starts with a line end
            data = joined[m.end() :] if m else data
            self.line_end = b""
        self.inbuf += data
        self.process_lines()

    def process_lines(self) -> None:
        pos = 0
        buf = self.inbuf
        while not self.closing and len(self.outbuf) < MAX_OUTPUT:
            if self.turn_used():
                break
            m = LINE_END.search(buf, pos)
            if m is None:
                if len(buf) - pos > MAX_LINE:
                    self.too_long()
                break
            line = bytes(buf[pos : m.start()])
            pos = m.end()
            if pos == len(buf) and m.group() in (b"\r", b"\n", b"\r\x00"):
                self.line_end = m.group()  # may be half of a longer line end
            if len(line) > MAX_LINE:
                self.too_long()
                break
            self.turn_commands += 1
            self.handle(line.decode("utf-8", "replace"))
            if self.sock.fileno() < 0:
                return
        del buf[:pos]
        self.backlog = bool(buf) and not self.closing and self.turn_used()

    def turn_used(self) -> bool:
        """This connection's share of the loop turn is spent."""
        return self.turn_commands >= TURN_COMMANDS or self.turn_output >= TURN_OUTPUT

    def too_long(self) -> None:
        self.reply([f"ERR line_too_long: lines are limited to {MAX_LINE} bytes"])
        self.closing = True
        self.linger = True
        self.inbuf.clear()

    def handle(self, line: str) -> None:
        lines, action = dispatch(Context(self.server.driver, self.server), line)
        if action == "close":  # quit: no reply; earlier replies still go out, then EOF
            self.closing = True
            self.linger = True
            return
        if action == "shutdown":
            self.closing = True
            if self.outbuf:
                self.flush()  # best effort: earlier replies; the loop may end before a write
            self.close()
            self.server.driver.begin_stop("console shutdown")
            return
        self.reply(lines)

    def reply(self, lines: list[str]) -> None:
        out = "".join(f"{line}\r\n" for line in lines) + ".\r\n"
        data = out.encode("utf-8", "replace")
        self.turn_output += len(data)
        self.outbuf += data

    def flush(self) -> None:
        try:
            n = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self.outbuf[:n]

    def update(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self.closing and not self.outbuf:
            if not self.linger:
                self.close()
                return
            if not self.shut:
                self.shut = True
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    self.close()
                    return
                self.linger_timer = self.server.loop.call_later(LINGER, self.close)
        ev = self.events()
        if ev:
            self.server.loop.modify(self.sock, ev, self.on_event)
        else:
            self.server.loop.modify(self.sock, selectors.EVENT_WRITE, self.on_event)

    def close(self) -> None:
        if self.linger_timer is not None:
            self.linger_timer.cancel()
            self.linger_timer = None
        if self.sock.fileno() >= 0:
            self.server.loop.remove(self.sock)
            with contextlib.suppress(OSError):
                self.sock.close()
        self.server.connections.discard(self)


class ConsoleServer(TcpServer):
    name = "console"
    max_connections = MAX_CONNECTIONS

    def __init__(self, driver: Control, host: str, port: int) -> None:
        self.driver = driver
        self.reap_interval = REAP_INTERVAL
        load_plugins()
        super().__init__(driver.loop, host, port)

    def connect(self, sock: socket.socket) -> Connection:
        return Connection(self, sock)
