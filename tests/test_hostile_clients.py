"""Hostile and careless clients of the HTTP endpoint and the console, over real sockets against
a real gdriver: many idle connections, slowloris, clients that never read, flooders. Neither
server may lock out a new client nor stall the supervisor loop."""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import resource
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from support import (
    HOST,
    Gdriver,
    Gearmand,
    console_raw,
    port_open,
    running,
    stop_pid,
    wait_for,
)


@pytest.fixture(scope="module")
def gd(gearmand: Gearmand) -> Iterator[Gdriver]:
    """One gdriver with the console and HTTP; a hundred jobs of long names (min 0: no worker
    process) make /metrics about 120 KiB and a status reply about 14 KiB."""
    args = ("--namespaces", "obs.console", "--namespaces", "obs.crowd", "--interval", "1")
    with running(gearmand, *args, metrics=True) as d:
        wait_for(lambda: port_open(d.metrics_port), timeout=10)
        yield d


def timed_get(port: int, path: str, timeout: float = 5.0) -> tuple[float, int, bytes]:
    """GET on a new connection: (seconds to the whole response, status, body)."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return time.monotonic() - t0, resp.status, body
    finally:
        conn.close()


def open_idle(port: int, n: int) -> list[socket.socket]:
    """n connections that send nothing (non-blocking connects: a full backlog must not stall
    the test)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        rc = s.connect_ex((HOST, port))
        assert rc in (0, errno.EINPROGRESS), rc
        socks.append(s)
    return socks


def closed_by_server(s: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Wait for the server's close: (closed, the bytes received before it)."""
    s.setblocking(True)
    s.settimeout(0.1)
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            return True, got
        got += chunk
    return False, got


def server_holds(server_port: int, client_port: int) -> bool:
    """The server still has a socket open for this connection: an ESTABLISHED entry with an
    inode in /proc/net/tcp (once the server closes it, the kernel orphans it: inode 0)."""
    local = f"{server_port:04X}"
    remote = f"{client_port:04X}"
    with open("/proc/net/tcp") as f:
        for row in f.readlines()[1:]:
            cols = row.split()
            if cols[1].endswith(":" + local) and cols[2].endswith(":" + remote):
                return cols[3] == "01" and cols[9] != "0"
    return False


def server_connections(pid: int, port: int) -> int:
    """Sockets the process holds for clients of this port (listening socket excluded)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as f:
        for row in f.readlines()[1:]:
            cols = row.split()
            if cols[1].endswith(f":{port:04X}") and cols[3] == "01" and cols[9] in inodes:
                count += 1
    return count


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


# -- HTTP --------------------------------------------------------------------------------------


def test_http_answers_beside_200_idle_connections(gd: Gdriver) -> None:
    port = gd.metrics_port
    idle = open_idle(port, 200)
    try:
        time.sleep(0.3)  # the supervisor accepts them
        for path in ("/healthz", "/metrics", "/healthz"):
            took, status, body = timed_get(port, path)
            assert status == 200 and body, (path, status)
            assert took < 1.0, f"{path} took {took:.2f}s"
        # idle connections are not kept for long: the header deadline closes the survivors
        for s in idle[-3:]:
            closed, got = closed_by_server(s, timeout=5)
            assert closed and got == b""
    finally:
        close_all(idle)


def test_http_out_of_descriptors(gd: Gdriver) -> None:
    """accept() failing with EMFILE: an old connection makes room, the loop does not spin on
    the listening socket, and the new client is answered."""
    port = gd.metrics_port
    soft, hard = resource.prlimit(gd.pid, resource.RLIMIT_NOFILE)
    since = len(gd.records())
    idle: list[socket.socket] = []
    try:
        in_use = len(os.listdir(f"/proc/{gd.pid}/fd"))
        resource.prlimit(gd.pid, resource.RLIMIT_NOFILE, (in_use + 8, hard))
        idle = open_idle(port, 40)  # far fewer than 64: the descriptors run out first
        time.sleep(0.3)
        for path in ("/healthz", "/metrics"):
            took, status, _ = timed_get(port, path)
            assert status == 200 and took < 1.0, (path, status, took)
        failed = [r for r in gd.records()[since:] if "accept failed" in r.get("message", "")]
        assert len(failed) <= 2, failed[:3]
    finally:
        resource.prlimit(gd.pid, resource.RLIMIT_NOFILE, (soft, hard))
        close_all(idle)


def test_http_accept_waits_when_no_descriptor_is_free(gd: Gdriver) -> None:
    """EMFILE with no connection to close: accepting pauses (no spin, no log flood) and
    resumes once descriptors are free; the waiting client is then answered."""
    port = gd.metrics_port
    soft, hard = resource.prlimit(gd.pid, resource.RLIMIT_NOFILE)
    since = len(gd.records())
    waiting = None
    try:
        wait_for(lambda: not server_connections(gd.pid, port), timeout=5, interval=0.1)
        # below every descriptor in use: those stay valid, no new one can be made
        resource.prlimit(gd.pid, resource.RLIMIT_NOFILE, (3, hard))
        waiting = socket.create_connection((HOST, port), timeout=5)
        waiting.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        time.sleep(1.5)
        failed = [r for r in gd.records()[since:] if "accept failed" in r.get("message", "")]
        assert 1 <= len(failed) <= 3, len(failed)
    finally:
        resource.prlimit(gd.pid, resource.RLIMIT_NOFILE, (soft, hard))
    got = b""
    while chunk := waiting.recv(65536):
        got += chunk
    waiting.close()
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"\r\n\r\nok\n")


def test_http_slowloris_is_cut_off(gd: Gdriver) -> None:
    port = gd.metrics_port
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 500
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.settimeout(0.05)
        t0 = time.monotonic()
        closed = False
        for i in range(len(request)):  # one byte every 20 ms: 10 s of request at most
            try:
                s.sendall(request[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            try:
                if s.recv(100) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed = True
                break
            if time.monotonic() - t0 > 6:
                break
        took = time.monotonic() - t0
    assert closed, "a dribbling client kept its connection"
    assert took < 5.0, f"closed after {took:.1f}s"
    assert timed_get(port, "/healthz")[1] == 200


def test_http_client_that_never_reads(gd: Gdriver) -> None:
    port = gd.metrics_port
    body_size = len(timed_get(port, "/metrics")[2])
    assert body_size > 100_000
    hogs = []
    try:
        for _ in range(3):
            s = socket.socket()
            # before connect: a tiny window and segments, so the server's kernel buffers only
            # some 40 KiB of the response (on loopback it would otherwise take megabytes)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
            s.connect((HOST, port))
            # a request the server answers with a large response, which the client never reads
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            hogs.append(s)
        cports = [h.getsockname()[1] for h in hogs]
        time.sleep(0.3)
        # stuck: the response did not fit in the kernel buffers (else the test proves nothing)
        assert any(server_holds(port, p) for p in cports), body_size
        t0 = time.monotonic()
        wait_for(lambda: not any(server_holds(port, p) for p in cports), timeout=8, interval=0.1)
        took = time.monotonic() - t0
        assert took < 5.0, f"a client that never reads held its connection {took:.1f}s"
        assert timed_get(port, "/healthz")[0] < 1.0
    finally:
        close_all(hogs)


# -- console -----------------------------------------------------------------------------------


def test_console_status_beside_100_idle_connections(gd: Gdriver) -> None:
    port = gd.console_port
    status = console_raw(port, b"status\n")
    assert status.endswith(b"\r\n.\r\n") and b"ERR" not in status
    idle = open_idle(port, 100)
    try:
        time.sleep(0.3)
        for _ in range(3):
            t0 = time.monotonic()
            got = console_raw(port, b"status\n")
            took = time.monotonic() - t0
            assert got == status
            assert took < 1.0, f"status took {took:.2f}s"
        # the oldest idle connections made room: they see a plain close, nothing else
        closed, got = closed_by_server(idle[0], timeout=2)
        assert closed and got == b""
        # the newest are still served
        newest = idle[-1]
        newest.setblocking(True)
        newest.settimeout(5)
        newest.sendall(b"status\n")
        got = b""
        while not got.endswith(b"\r\n.\r\n"):
            chunk = newest.recv(65536)
            assert chunk, got
            got += chunk
        assert got == status
    finally:
        close_all(idle)
    assert gd.proc is not None and gd.proc.poll() is None


FLOODER = textwrap.dedent(
    """
    import selectors, socket, sys, time
    port, n, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    sel = selectors.DefaultSelector()
    chunk = b"status\\n" * 2000
    got = {}
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        got[s] = 0
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, mask in sel.select(0.1):
            s = key.fileobj
            if mask & selectors.EVENT_READ:
                data = s.recv(1 << 20)
                if not data:
                    sys.exit("closed by the server")
                got[s] += data.count(b".\\r\\n")
            if mask & selectors.EVENT_WRITE:
                try:
                    s.send(chunk)
                except BlockingIOError:
                    pass
    print(" ".join(str(v) for v in got.values()), flush=True)
    """
)


def test_console_flooders_do_not_stall_the_loop(gd: Gdriver) -> None:
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOODER, str(gd.console_port), "3", "4"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert flood.stdout is not None
        assert flood.stdout.readline() == "ready\n"
        time.sleep(0.5)  # the flood is under way
        worst = 0.0
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            took, status, _ = timed_get(gd.metrics_port, "/healthz")
            assert status == 200
            worst = max(worst, took)
            time.sleep(0.05)
        t0 = time.monotonic()
        assert console_raw(gd.console_port, b"version\n").startswith(b"gdriver ")
        console_took = time.monotonic() - t0
        out, _ = flood.communicate(timeout=10)
        assert flood.returncode == 0
        replies = [int(x) for x in out.split()]
        assert len(replies) == 3 and all(r > 100 for r in replies), replies  # all were served
        # about 0.15 s at worst on a 2-core machine the flood keeps busy; a stalled loop takes
        # seconds
        assert worst < 2.5, f"/healthz took {worst:.2f}s while 3 clients flooded the console"
        assert console_took < 2.5, f"the console took {console_took:.2f}s"
    finally:
        stop_pid(flood)
