"""The supervisor's end of a worker process's I/O: line splitting (pure) and, with a real fork,
pipes and channel read from the loop, and the last words read after the exit."""

from __future__ import annotations

import json
import os
import time

import pytest

from gdriver.childio import OUTPUT_LINE_MAX, ChildIO, split_lines
from gdriver.loop import EventLoop


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
    pid = os.fork()
    if pid == 0:  # the child: say something on every path, end without a final newline
        code = 1
        try:
            channel = io.in_child()
            channel.send(b"Ihello")
            os.write(1, b"out line\nlast words")
            os.write(2, "é err\n".encode())
            channel.send(b"Xbye")
            code = 0
        finally:
            os._exit(code)
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
