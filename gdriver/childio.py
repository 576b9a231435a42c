"""The supervisor's end of one worker process's I/O: its channel socket (tagged messages, see
``process.py``) and the pipes on its fd 1 and 2, whose lines become JSON log records.

Made before the fork (:class:`ChildIO`), then split: the child keeps its channel end and
writes to the pipes (:meth:`ChildIO.in_child`), the supervisor reads the other ends from its
loop (:meth:`ChildIO.attach`) and, after the process has exited, reads its last words and
closes everything (:meth:`ChildIO.close`).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from gdriver import logs
from gdriver.loop import EventLoop, Timer

OUTPUT_LINE_MAX = 64 * 1024  # longer lines of a worker's output are cut into records
CHANNEL_READS = 256  # messages read per wake-up: let other work in between
# every channel message is read into this one buffer (larger than any message, as a
# SOCK_SEQPACKET read must be): a fresh 64 KiB bytes per read cost the supervisor a page
# fault or two per message
_message = bytearray(65536)
_message_view = memoryview(_message)
# messages read after the exit: more than a socket buffer holds (each message takes at least a
# few hundred bytes of it); only a descendant still writing to the channel could reach it
CHANNEL_DRAIN = 1 << 16
OUTPUT_READS = 64  # reads of a dead process's pipe: what it left, and more than a pipe holds
OUTPUT_READ = 65536  # bytes read from one pipe per turn of the loop
OUTPUT_LINES = 256  # records made from one pipe per turn
OUTPUT_TURN_LINES = 1024  # records made from all pipes per turn (about 0.1 s of work)
CONGESTED_RETRY = 0.05  # s between looks at a congested stdout


class ChildIO:
    def __init__(self) -> None:
        """Raises OSError (EMFILE, ENFILE, ...) with nothing left open."""
        self.channel, self._child_channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        made: list[int] = []
        try:
            self.out_r, self._out_w = os.pipe()
            made += (self.out_r, self._out_w)
            self.err_r, self._err_w = os.pipe()
        except OSError:
            for fd in made:
                os.close(fd)
            self.channel.close()
            self._child_channel.close()
            raise
        self.buffers = {self.out_r: bytearray(), self.err_r: bytearray()}
        self.loop: EventLoop | None = None
        self.pid = 0
        self.job_name = ""
        self.closed = False
        self.ended: set[int] = set()  # pipes at end-of-file
        self.on_message: Callable[[bytes], None] = lambda data: None

    def fds(self) -> list[int]:
        """The supervisor's ends (a later child closes them)."""
        return [self.channel.fileno(), self.out_r, self.err_r]

    def stop_child(self) -> None:
        """Tell the child to stop after its current job, whatever it does with signals: it
        reads end-of-file on its channel, while its last words still reach us."""
        with contextlib.suppress(OSError):
            self.channel.shutdown(socket.SHUT_WR)

    def abort(self) -> None:
        """The fork failed: close every end."""
        for fd in (self.out_r, self._out_w, self.err_r, self._err_w):
            os.close(fd)
        self.channel.close()
        self._child_channel.close()

    def in_child(self) -> socket.socket:
        """In the forked child: drop the supervisor's ends, put the pipes on fd 1 and 2 and
        /dev/null on fd 0; returns the child's channel end."""
        for fd in (self.out_r, self.err_r, self.channel.fileno()):
            with contextlib.suppress(OSError):
                os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(self._out_w, 1)
        os.dup2(self._err_w, 2)
        for fd in (devnull, self._out_w, self._err_w):
            os.close(fd)
        return self._child_channel

    def attach(
        self, loop: EventLoop, pid: int, job_name: str, on_message: Callable[[bytes], None]
    ) -> None:
        """In the supervisor after the fork: close the child's ends, read ours from the loop;
        each channel message goes to ``on_message``."""
        self._child_channel.close()
        os.close(self._out_w)
        os.close(self._err_w)
        self.loop, self.pid, self.job_name, self.on_message = loop, pid, job_name, on_message
        self.channel.setblocking(False)
        os.set_blocking(self.out_r, False)
        os.set_blocking(self.err_r, False)
        loop.add(self.channel, selectors.EVENT_READ, self.on_channel_event)
        pump = OutputPump.of(loop)
        for fd in (self.out_r, self.err_r):
            loop.add(fd, selectors.EVENT_READ, partial(pump.on_event, self, fd))

    def close(self) -> None:
        """The process has exited: read what it still said and wrote (all of it: its last
        reports count), then close."""
        assert self.loop is not None
        self.closed = True
        self.read_channel(CHANNEL_DRAIN)
        for fd in (self.out_r, self.err_r):
            self.read_rest(fd)
        self.loop.remove(self.channel)
        self.channel.close()
        for fd in (self.out_r, self.err_r):
            self.loop.remove(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def on_channel_event(self, mask: int) -> None:
        self.read_channel()

    def read_channel(self, most: int = CHANNEL_READS) -> None:
        assert self.loop is not None
        for _ in range(most):
            try:
                n = self.channel.recv_into(_message)
            except BlockingIOError:
                return
            except OSError:
                n = 0
            if not n:
                self.loop.remove(self.channel)
                return
            self.on_message(_message_view[:n].tobytes())

    def read_output(self, fd: int, most: int = OUTPUT_LINES) -> tuple[int, bool]:
        """A worker's stdout/stderr: each line becomes one JSON record, at most ``most`` of
        them now; reads (one read) only once the lines read before are all written, so what
        the process writes faster waits in its pipe. Returns the records made and whether
        lines are left for the next turn; at end-of-file (``ended``), the unfinished last
        line too."""
        buf = self.buffers[fd]
        eof = False
        if not has_line(buf):
            try:
                chunk = os.read(fd, OUTPUT_READ)
            except BlockingIOError:
                chunk = None
            except OSError:
                chunk = b""
            eof = chunk == b""
            buf += chunk or b""
            if eof:
                self.ended.add(fd)
        lines = split_lines(buf, flush=eof, most=most)
        for line in lines:
            self.output_record(fd, line)
        return len(lines), has_line(buf)

    def read_rest(self, fd: int) -> None:
        """The process is gone: every line it left in the pipe, and the unfinished last one."""
        buf = self.buffers[fd]
        for _ in range(OUTPUT_READS):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
        for line in split_lines(buf, flush=True):
            self.output_record(fd, line)

    def output_record(self, fd: int, line: bytes) -> None:
        stream = "stdout" if fd == self.out_r else "stderr"
        logs.write_record(
            {
                "level": "INFO" if stream == "stdout" else "WARNING",
                "logger": "gdriver.output",
                "message": line.decode("utf-8", "replace").rstrip("\r"),
                "pid": self.pid,
                "job_name": self.job_name,
                "stream": stream,
            },
            droppable=False,  # its pipe waits instead (OutputPump)
        )


class OutputPump:
    """Reads the worker processes' output pipes for one loop: a bounded amount of each per
    turn, round robin, and none while the supervisor's stdout is congested
    (``logs.Writer``). A pipe is watched only while nothing read from it waits: what is not
    read stays in the pipe, so a process writing faster blocks in its writes (back-pressure;
    no line lost, none split differently)."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop
        self.ready: deque[tuple[ChildIO, int]] = deque()  # pipes with lines or data waiting
        self.timer: Timer | None = None

    @classmethod
    def of(cls, loop: EventLoop) -> OutputPump:
        pump = getattr(loop, "output_pump", None)
        if pump is None:
            pump = cls(loop)
            loop.output_pump = pump  # type: ignore[attr-defined]
        return pump

    def on_event(self, io: ChildIO, fd: int, mask: int) -> None:
        self.loop.remove(fd)  # until its turn comes
        self.ready.append((io, fd))
        self.schedule(0.0)

    def schedule(self, delay: float) -> None:
        if self.timer is None and self.ready:
            self.timer = self.loop.call_later(delay, self.run)

    def run(self) -> None:
        """One turn's share: at most OUTPUT_TURN_LINES records, OUTPUT_LINES per pipe."""
        self.timer = None
        if logs.WRITER.congested():
            self.schedule(CONGESTED_RETRY)
            return
        budget = OUTPUT_TURN_LINES
        for _ in range(len(self.ready)):
            if budget <= 0:
                break
            io, fd = self.ready.popleft()
            if io.closed:
                continue  # its close() read the rest
            made, left = io.read_output(fd, min(OUTPUT_LINES, budget))
            budget -= made
            if left:
                self.ready.append((io, fd))
            elif fd not in io.ended:
                self.watch(io, fd)
        self.schedule(0.0)

    def watch(self, io: ChildIO, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.loop.add(fd, selectors.EVENT_READ, partial(self.on_event, io, fd))


class Children(dict[int, ChildIO]):
    """Every worker process's I/O by PID, and which of them are owed address updates."""

    def __init__(self) -> None:
        super().__init__()
        self.behind: set[int] = set()  # pids whose channel was full for an update
        self._fds: list[int] | None = []  # every supervisor end; None: to be rebuilt

    def __setitem__(self, pid: int, io: ChildIO) -> None:
        super().__setitem__(pid, io)
        if self._fds is not None:
            self._fds.extend(io.fds())  # every fork asks: no walk over a thousand processes

    def __delitem__(self, pid: int) -> None:
        super().__delitem__(pid)
        self._fds = None

    def pop(self, pid: int, *default: Any) -> Any:
        self._fds = None
        return super().pop(pid, *default)

    def fds(self) -> list[int]:
        """The supervisor's ends of every process's I/O (a new child closes them)."""
        if self._fds is None:
            self._fds = [fd for io in self.values() for fd in io.fds()]
        return self._fds

    def broadcast(self, message: bytes) -> None:
        """A gearmand name resolves to new addresses: tell every worker process (they never
        resolve names themselves; see resolver.py)."""
        for pid, io in self.items():
            try:
                io.channel.send(message)
            except BlockingIOError:
                self.behind.add(pid)  # busy for long: all of them once it reads
            except OSError:
                pass  # exiting (or told to stop); reaped soon

    def resend(self, messages: list[bytes]) -> None:
        """Every update, to the processes that missed one."""
        behind, self.behind = self.behind, set()
        for pid in behind:
            io = self.get(pid)
            if io is None:
                continue  # gone: a new process inherits what the supervisor knows
            for message in messages:
                try:
                    io.channel.send(message)
                except BlockingIOError:
                    self.behind.add(pid)
                    break
                except OSError:
                    break


def has_line(buf: bytearray) -> bool:
    """A record is waiting in ``buf`` (see :func:`split_lines`)."""
    return len(buf) >= OUTPUT_LINE_MAX or b"\n" in buf


def split_lines(buf: bytearray, flush: bool, most: int | None = None) -> list[bytes]:
    """Take the complete lines out of ``buf`` (without their LF), at most ``most``; a line
    longer than OUTPUT_LINE_MAX comes out in pieces of that size; ``flush`` takes the rest
    too."""
    lines: list[bytes] = []
    while most is None or len(lines) < most:
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) >= OUTPUT_LINE_MAX or (flush and buf):
                nl = min(len(buf), OUTPUT_LINE_MAX)
                lines.append(bytes(buf[:nl]))
                del buf[:nl]
                continue
            return lines
        lines.append(bytes(buf[:nl]))
        del buf[: nl + 1]
    return lines
