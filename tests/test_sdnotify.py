"""sd_notify: datagrams received on real AF_UNIX sockets (a path and an abstract name) from a
real gdriver: READY, STATUS, WATCHDOG, RELOADING, STOPPING, and what worker processes keep."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import Gdriver, Gearmand, do, wait_for

ENV_JOB = "obs.notify.Notify.env"
KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Receiver:
    """Collects datagrams (as lists of lines, with their arrival time) on a bound socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.got: list[tuple[float, list[str]]] = []
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.got.append((time.monotonic(), data.decode().split("\n")))

    def messages(self) -> list[list[str]]:
        return [m for _, m in list(self.got)]

    def index(self, predicate: Callable[[list[str]], bool], start: int = 0) -> int | None:
        for i, m in enumerate(self.messages()[start:], start):
            if predicate(m):
                return i
        return None

    def wait(
        self, predicate: Callable[[list[str]], bool], start: int = 0, timeout: float = 15
    ) -> int:
        found = wait_for(lambda: (i,) if (i := self.index(predicate, start)) is not None else None,
                         timeout)  # fmt: skip
        return int(found[0])

    def count(self, line: str, start: int = 0) -> int:
        return sum(1 for m in self.messages()[start:] if line in m)

    def close(self) -> None:
        self.done = True
        self.thread.join(2)
        self.sock.close()


def has(line: str) -> Callable[[list[str]], bool]:
    return lambda m: line in m


@pytest.fixture()
def path_receiver(tmp_path: Path) -> Iterator[tuple[str, Receiver]]:
    path = str(tmp_path / "notify")
    r = Receiver(path)
    try:
        yield path, r
    finally:
        r.close()


class WrappedGdriver(Gdriver):
    """gdriver run through ``sh -c 'export WATCHDOG_PID=$$; exec ...'``: the variable holds
    the supervisor's own PID, as systemd sets it (exec keeps the PID)."""

    def command(self) -> list[str]:
        return ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh",
                *super().command()]  # fmt: skip


def unix_dgram_inodes() -> set[str]:
    inodes = set()
    with open("/proc/net/unix") as f:
        next(f)
        for row in f:
            cols = row.split()
            if cols[4] == "0002":  # SOCK_DGRAM
                inodes.add(cols[6])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def child_pid(d: Gdriver) -> int:
    return int(d.console(f"show {ENV_JOB}")[1])


def test_ready_status_watchdog_stopping(
    gearmand: Gearmand, path_receiver: tuple[str, Receiver]
) -> None:
    path, r = path_receiver
    d = Gdriver(gearmand, "--namespaces", "obs.notify", "--interval", "1",
                env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})  # fmt: skip
    d.start()
    try:
        ready = r.wait(has("READY=1"))
        # READY only once the min processes are registered with gearmand
        assert gearmand.workers_for(ENV_JOB) >= 1
        assert any(x.startswith("STATUS=") for x in r.messages()[ready])
        r.wait(has("STATUS=1 jobs, 1 processes, 0 busy, 0 queued"))
        assert r.count("READY=1") == 1
        # WATCHDOG_USEC without WATCHDOG_PID: pings every 0.2 s while the loop runs
        start = len(r.messages())
        time.sleep(1.5)
        pings = r.count("WATCHDOG=1", start)
        assert 3 <= pings <= 12, pings
        # the worker process does not see the variables, nor does what it runs
        seen = json.loads(do(gearmand.address, ENV_JOB).result)
        assert seen["own"] == [] and seen["subprocess"] == []
        # and holds no notification socket of the supervisor's
        pid = child_pid(d)
        dgram = unix_dgram_inodes()
        assert not socket_inodes(pid) & dgram
        assert not socket_inodes(d.pid) & dgram
        before_stop = len(r.messages())
        assert d.stop() == 0
        stopping = r.wait(has("STOPPING=1"), before_stop, timeout=5)
        assert r.index(has("READY=1"), stopping) is None
    finally:
        d.stop()


def test_abstract_socket_watchdog_pid_and_reload(gearmand: Gearmand) -> None:
    name = f"gdriver-test-{uuid.uuid4().hex}"
    r = Receiver("\0" + name)
    config = {"namespaces": ["obs.notify"], "interval": 1}
    d = WrappedGdriver(gearmand, env={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000"},
                       config=config)  # fmt: skip
    d.start()
    try:
        r.wait(has("READY=1"))
        start = len(r.messages())
        time.sleep(1.5)
        pings = r.count("WATCHDOG=1", start)
        assert 3 <= pings <= 12, pings  # WATCHDOG_PID is the supervisor's PID

        # SIGHUP: RELOADING=1 with the monotonic clock, then READY=1 again
        mark = len(r.messages())
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        os.kill(d.pid, signal.SIGHUP)
        reloading = r.wait(has("RELOADING=1"), mark)
        msg = r.messages()[reloading]
        stamp = [x for x in msg if x.startswith("MONOTONIC_USEC=")]
        assert len(stamp) == 1
        assert 0 <= int(stamp[0].split("=", 1)[1]) - now_usec < 10_000_000
        r.wait(has("READY=1"), reloading + 1)
        d.wait_log(lambda x: x.get("event") == "reloaded")

        # a reload that is refused still ends in READY=1
        (d.tmp / "config.yml").write_text("namespaces: [obs.notify\n")
        mark = len(r.messages())
        os.kill(d.pid, signal.SIGHUP)
        reloading = r.wait(has("RELOADING=1"), mark)
        r.wait(has("READY=1"), reloading + 1)
        d.wait_log(lambda x: x.get("event") == "reload_failed")

        mark = len(r.messages())
        assert d.stop() == 0
        r.wait(has("STOPPING=1"), mark, timeout=5)
    finally:
        d.stop()
        r.close()


def test_watchdog_pid_of_another_process(
    gearmand: Gearmand, path_receiver: tuple[str, Receiver]
) -> None:
    path, r = path_receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}
    d = Gdriver(gearmand, "--namespaces", "obs.notify", "--interval", "1", env=env).start()
    try:
        r.wait(has("READY=1"))
        time.sleep(1.2)
        assert r.count("WATCHDOG=1") == 0
        assert r.count("STATUS=1 jobs, 1 processes, 0 busy, 0 queued") >= 1
    finally:
        d.stop()


def test_without_notify_socket(
    gearmand: Gearmand, path_receiver: tuple[str, Receiver], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gdriver.systemd import Notifier

    path, r = path_receiver
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    d = Gdriver(gearmand, "--namespaces", "obs.notify", "--interval", "1",
                env={"WATCHDOG_USEC": "400000"})  # fmt: skip
    with d:
        d.wait_log(lambda x: x.get("event") == "ready")
        time.sleep(0.5)
        assert r.messages() == []
        assert not [x for x in d.records() if x.get("level") in ("ERROR", "CRITICAL")]
    assert d.proc is not None and d.proc.returncode == 0

    # the same notifier, in this process: silent without the variable, sends with it
    off = Notifier(environ={"WATCHDOG_USEC": "400000"})
    assert not off.enabled and off.watchdog_interval == 0
    off.notify_ready()
    off.notify_status("x")
    off.watchdog(time.monotonic())
    on = Notifier(environ={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    assert on.enabled and on.watchdog_interval == pytest.approx(0.2)
    on.notify_ready()
    assert r.wait(has("READY=1"), timeout=5) == 0
    # a socket nobody listens on: no error
    gone = Notifier(environ={"NOTIFY_SOCKET": path + ".gone"})
    gone.notify_ready()
    gone.notify_stopping()
