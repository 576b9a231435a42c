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
from collections.abc import Callable
from functools import partial
from typing import Any

from gdriver import logs
from gdriver.loop import EventLoop

OUTPUT_LINE_MAX = 64 * 1024  # longer lines of a worker's output are cut into records
CHANNEL_READS = 256  # messages read per wake-up: let other work in between
# messages read after the exit: more than a socket buffer holds (each message takes at least a
# few hundred bytes of it); only a descendant still writing to the channel could reach it
CHANNEL_DRAIN = 1 << 16
OUTPUT_READS = 64


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
        loop.add(self.out_r, selectors.EVENT_READ, partial(self.on_output_event, self.out_r))
        loop.add(self.err_r, selectors.EVENT_READ, partial(self.on_output_event, self.err_r))

    def close(self) -> None:
        """The process has exited: read what it still said and wrote (all of it: its last
        reports count), then close."""
        assert self.loop is not None
        self.read_channel(CHANNEL_DRAIN)
        for fd in (self.out_r, self.err_r):
            self.read_output(fd, final=True)
        self.loop.remove(self.channel)
        self.channel.close()
        for fd in (self.out_r, self.err_r):
            self.loop.remove(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def on_channel_event(self, mask: int) -> None:
        self.read_channel()

    def on_output_event(self, fd: int, mask: int) -> None:
        self.read_output(fd)

    def read_channel(self, most: int = CHANNEL_READS) -> None:
        assert self.loop is not None
        for _ in range(most):
            try:
                data = self.channel.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.loop.remove(self.channel)
                return
            self.on_message(data)

    def read_output(self, fd: int, final: bool = False) -> None:
        """A worker's stdout/stderr: each line becomes one JSON record; ``final`` (the
        process is gone) flushes an unfinished last line."""
        assert self.loop is not None
        buf = self.buffers[fd]
        stream = "stdout" if fd == self.out_r else "stderr"
        eof = False
        for _ in range(OUTPUT_READS):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                eof = True
                break
            buf += chunk
        for line in split_lines(buf, flush=eof or final):
            self.output_record(stream, line)
        if eof:
            self.loop.remove(fd)

    def output_record(self, stream: str, line: bytes) -> None:
        logs.write_record(
            {
                "level": "INFO" if stream == "stdout" else "WARNING",
                "logger": "gdriver.output",
                "message": line.decode("utf-8", "replace").rstrip("\r"),
                "pid": self.pid,
                "job_name": self.job_name,
                "stream": stream,
            }
        )


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


def split_lines(buf: bytearray, flush: bool) -> list[bytes]:
    """Take the complete lines out of ``buf`` (without their LF); a line longer than
    OUTPUT_LINE_MAX comes out in pieces of that size; ``flush`` takes the rest too."""
    lines = []
    while True:
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
