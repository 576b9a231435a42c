"""The supervisor's end of a worker process's I/O: line splitting (pure) and, with a real fork,
pipes and channel read from the loop, and the last words read after the exit."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable

import pytest

from gdriver.childio import CHANNEL_READS, OUTPUT_LINE_MAX, ChildIO, split_lines
from gdriver.loop import EventLoop


def fork_child(io: ChildIO, body: Callable[[socket.socket], None]) -> int:
    """Fork a child that runs ``body`` on its channel end, then exits (0 when it worked)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body(io.in_child())
            code = 0
        finally:
            os._exit(code)
    return pid


def test_split_lines_keeps_the_unfinished_line() -> None:
    buf = bytearray(b"one\ntwo\r\nthr")
    assert split_lines(buf, flush=False) == [b"one", b"two\r"]
    assert buf == b"thr"
    assert split_lines(buf, flush=True) == [b"thr"]
    assert buf == b""
    assert split_lines(buf, flush=True) == []


def test_split_lines_cuts_overlong_output() -> None:
    buf = bytearray(b"x" * (OUTPUT_LINE_MAX + 10))
    assert split_lines(buf, flush=False) == [b"x" * OUTPUT_LINE_MAX]
    assert buf == b"x" * 10


def test_child_output_and_channel_and_last_words(capfd: pytest.CaptureFixture[str]) -> None:
    loop = EventLoop()
    io = ChildIO()

    def say(channel: socket.socket) -> None:  # on every path, without a final newline
        channel.send(b"Ihello")
        os.write(1, b"out line\nlast words")
        os.write(2, "é err\n".encode())
        channel.send(b"Xbye")

    pid = fork_child(io, say)
    messages: list[bytes] = []
    try:
        io.attach(loop, pid, "the.job", messages.append)
        deadline = time.monotonic() + 10
        while not messages and time.monotonic() < deadline:
            loop.run_once(0.1)
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    io.close()  # reads what is left: the message after exit, the unfinished line
    loop.close()
    assert messages == [b"Ihello", b"Xbye"]
    records = [json.loads(line) for line in capfd.readouterr().out.splitlines()]
    by_message = {r["message"]: r for r in records}
    assert set(by_message) == {"out line", "last words", "é err"}
    assert by_message["out line"]["stream"] == "stdout"
    assert by_message["é err"]["stream"] == "stderr"
    assert by_message["é err"]["level"] == "WARNING"
    assert all(r["pid"] == pid and r["job_name"] == "the.job" for r in records)
    assert io.channel.fileno() == -1


def test_every_last_message_of_a_dead_process_is_read() -> None:
    # more messages than one wake-up reads, all queued before the exit: none may be lost
    loop = EventLoop()
    io = ChildIO()

    def fill(channel: socket.socket) -> None:
        channel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        channel.setblocking(False)
        sent = 0
        with contextlib.suppress(BlockingIOError):
            while sent < 100_000:
                channel.send(b"I%d" % sent)
                sent += 1
        os.write(1, b"%d\n" % sent)

    pid = fork_child(io, fill)
    messages: list[bytes] = []
    try:
        io.attach(loop, pid, "the.job", messages.append)
    finally:
        _, status = os.waitpid(pid, 0)  # nothing read before the exit
    assert os.waitstatus_to_exitcode(status) == 0
    out = os.read(io.out_r, 100)
    sent = int(out)
    assert sent > CHANNEL_READS  # else this proves nothing
    io.close()
    loop.close()
    assert messages == [b"I%d" % n for n in range(sent)]
