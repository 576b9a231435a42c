"""Back-pressure on log output: a worker printing as fast as it can, and a stdout reader that
stalls, never stop the supervisor's loop (/healthz, the console), and lose no line."""

from __future__ import annotations

import json
import os
import select
import threading
import time
from typing import Any

import pytest
from live_helpers import wait_registered
from support import Gdriver, Gearmand, do, wait_for

from gdriver import logs
from gdriver.loop import EventLoop

FLOOD = "pressure.flood.Flood.flood"
PROBE_LIMIT = 1.0  # s: generous; a flood froze /healthz for 4.6 s


class StallingGdriver(Gdriver):
    """A gdriver whose stdout reader takes nothing until ``resume`` is set."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.resume = threading.Event()
        self.resume.set()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.resume.wait(60)  # one buffer of the file object read ahead at most
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))


def probe(g: Gdriver, stop: threading.Event, worst: dict[str, float]) -> None:
    """/healthz and the console, every 0.1 s, until ``stop``: the slowest answer of each."""
    while not stop.is_set():
        start = time.monotonic()
        try:
            import urllib.request

            url = f"http://127.0.0.1:{g.metrics_port}/healthz"
            with urllib.request.urlopen(url, timeout=5) as r:
                assert r.status == 200
        except Exception:
            worst["healthz"] = float("inf")
        else:
            worst["healthz"] = max(worst["healthz"], time.monotonic() - start)
        start = time.monotonic()
        try:
            assert g.console("status")
        except Exception:
            worst["console"] = float("inf")
        else:
            worst["console"] = max(worst["console"], time.monotonic() - start)
        time.sleep(0.1)


def flood_under_probes(g: Gdriver, gearmand: Gearmand, seconds: float) -> tuple[int, dict]:
    wait_registered(gearmand, FLOOD)
    worst = {"healthz": 0.0, "console": 0.0}
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(g, stop, worst))
    prober.start()
    try:
        printed = int(do(gearmand.address, FLOOD, str(seconds), timeout=60).result)
    finally:
        stop.set()
        prober.join(30)
    return printed, worst


def flood_lines(g: Gdriver) -> int:
    """The worker's lines among the records; every stdout line must be one whole JSON object,
    and every line the worker printed one record."""
    count = 0
    for line in list(g.lines):
        record = json.loads(line)
        assert isinstance(record, dict)
        message = record.get("message", "")
        if record.get("stream") == "stdout" and message.startswith("flood "):
            assert message == "flood " + "z" * 93  # never split, never joined
            count += 1
    return count


def test_a_worker_flooding_stdout_never_freezes_the_loop(gearmand: Gearmand) -> None:
    g = Gdriver(gearmand, "--namespaces", "pressure.flood", metrics=True)
    with g:
        printed, worst = flood_under_probes(g, gearmand, 3.0)
        wait_for(lambda: flood_lines(g) >= printed, 30)
        assert worst["healthz"] < PROBE_LIMIT and worst["console"] < PROBE_LIMIT, worst
    assert printed > 1000
    assert flood_lines(g) == printed  # every line, once


def test_a_stalled_stdout_reader_never_freezes_the_loop(gearmand: Gearmand) -> None:
    g = StallingGdriver(gearmand, "--namespaces", "pressure.flood", metrics=True)
    with g:
        wait_registered(gearmand, FLOOD)
        g.resume.clear()  # from here on, the reader takes nothing
        time.sleep(0.5)  # the reader is parked (it read everything before)
        stop = threading.Event()
        worst = {"healthz": 0.0, "console": 0.0}
        prober = threading.Thread(target=probe, args=(g, stop, worst))
        prober.start()
        done: list[Any] = []
        client = threading.Thread(target=lambda: done.append(do(gearmand.address, FLOOD, "2", 60)))
        client.start()
        time.sleep(4)  # far more output than the pipe to our reader holds
        stop.set()
        prober.join(30)
        g.resume.set()
        client.join(60)
        printed = int(done[0].result)
        wait_for(lambda: flood_lines(g) >= printed, 30)
        assert worst["healthz"] < PROBE_LIMIT and worst["console"] < PROBE_LIMIT, worst
    assert printed > 1000
    assert flood_lines(g) == printed


@pytest.fixture()
def stalled_pipe(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A Writer on a real pipe nobody reads yet, with small marks: (writer, read end, loop)."""
    monkeypatch.setattr(logs, "HIGH_WATER", 64 * 1024)
    monkeypatch.setattr(logs, "HARD_CAP", 256 * 1024)
    r, w = os.pipe()
    loop = EventLoop()
    writer = logs.Writer()
    writer.fd = w
    dropped: list[int] = []
    writer.attach(loop, dropped.append)
    try:
        yield writer, r, loop, dropped
    finally:
        writer.close(0)  # not buffered any more: the exit has nothing to do
        loop.close()
        os.close(r)
        os.close(w)


def read_all(r: int) -> bytes:
    out = b""
    while select.select([r], [], [], 0)[0]:
        out += os.read(r, 1 << 20)
    return out


def test_writer_queues_drops_past_the_cap_and_says_so(stalled_pipe: Any) -> None:
    writer, r, loop, dropped = stalled_pipe
    record = b'{"message": "' + b"r" * 1000 + b'"}\n'
    start = time.monotonic()
    for _ in range(1000):  # 1 MB: a pipe holds 64 KiB, the queue 256 KiB
        writer.write(record, droppable=True)
    assert time.monotonic() - start < 1.0  # never waited for the reader
    assert writer.congested()
    assert writer.size <= logs.HARD_CAP
    assert sum(dropped) > 0
    writer.write(b'{"message": "a worker line"}\n', droppable=False)  # never dropped
    got = b""
    for _ in range(1000):  # the reader resumes; the loop writes the rest
        got += read_all(r)
        loop.run_once(0.01)
        if not writer.queue and got.endswith(b"\n") and b"dropped" in got:
            break
    got += read_all(r)
    lines = [json.loads(line) for line in got.splitlines()]  # whole records, in order
    assert lines[-2] == {"message": "a worker line"}
    assert lines[-1]["event"] == "log_records_dropped"
    assert lines[-1]["count"] == sum(dropped)
    assert len(lines) - 2 + sum(dropped) == 1000
