"""The event loop's listeners out of descriptors, with a real descriptor limit and real sockets:
two listeners in one process whose every spare descriptor is held by clients of one of them.
The listener holding the most connections gives one up, so the other's client is served."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from support import HOST, ROOT, stop_pid, wait_for

from gdriver.loop import EventLoop, TcpServer

SERVER = textwrap.dedent(
    """
    import os, resource, sys, time
    from gdriver.loop import EventLoop, TcpServer

    class Echo:
        # answers each input with its listener's name; never stale
        def __init__(self, server, sock):
            self.server, self.sock, self.last_active = server, sock, time.monotonic()

        def on_event(self, mask):
            data = self.sock.recv(100)
            self.last_active = time.monotonic()
            if data:
                self.sock.sendall(self.server.name.encode() + b"\\n")
            else:
                self.close()

        def stale(self, now):
            return False

        def close(self):
            self.server.loop.remove(self.sock)
            self.sock.close()
            self.server.connections.discard(self)

    class Many(TcpServer):
        name = "many"
        def connect(self, sock):
            return Echo(self, sock)

    class Few(Many):
        name = "few"

    loop = EventLoop()
    many, few = Many(loop, "127.0.0.1", 0), Few(loop, "127.0.0.1", 0)
    used = [int(fd) for fd in os.listdir("/proc/self/fd")]  # and the listing's own
    limit = max(used) + 1 + int(sys.argv[1])  # a few descriptors beyond those open now
    spare = limit - (len(used) - 1)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    print(many.sock.getsockname()[1], few.sock.getsockname()[1], limit, spare, flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        loop.run_once(0.1)
    """
)


class Listeners:
    """The server process, its two ports, its descriptor limit and the room under it (spare),
    and the clients a test opened."""

    def __init__(self, proc: subprocess.Popen[str], line: str) -> None:
        self.proc = proc
        self.many, self.few, self.limit, self.spare = (int(x) for x in line.split())
        assert 0 < self.spare < 20, self.spare  # fill()'s 20 clients are more than the room
        self.clients: list[socket.socket] = []

    def connect(self, port: int) -> socket.socket:
        self.clients.append(socket.create_connection((HOST, port), timeout=5))
        return self.clients[-1]

    def fill(self) -> list[socket.socket]:
        """20 clients of "many": the process's every descriptor number ends up in use, each
        client past the room having closed the least recently active. Once no client waits,
        accept() still says EMFILE; that closes nothing (before, one more). The newest are
        served, the one before them was closed."""
        many = [self.connect(self.many) for _ in range(20)]
        wait_for(lambda: len(os.listdir(f"/proc/{self.proc.pid}/fd")) >= self.limit, 10)
        assert [ask(s) for s in many[-self.spare :]] == [b"many\n"] * self.spare
        assert ask(many[-self.spare - 1]) == b""
        return many


@pytest.fixture
def listeners() -> Iterator[Listeners]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, "6"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    try:
        it = Listeners(proc, proc.stdout.readline())
        try:
            yield it
        finally:
            for s in it.clients:
                s.close()
    finally:
        stop_pid(proc)
        proc.stdout.close()


def ask(s: socket.socket) -> bytes:
    s.sendall(b"?")
    return s.recv(100)


def test_out_of_descriptors_the_listener_holding_most_gives_one_up(listeners) -> None:
    it = listeners
    many = it.fill()
    # "few" holds no connection to give up: before, its accepting paused until "many" freed
    # a descriptor, which idle clients never do
    first = it.connect(it.few)
    assert ask(first) == b"few\n"
    # "few" holds one now, "many" still the most: "many" gives way again
    second = it.connect(it.few)
    assert ask(second) == b"few\n"
    assert ask(first) == b"few\n"
    assert ask(many[-1]) == b"many\n"
    assert it.proc.poll() is None


def test_a_close_that_frees_nothing_usable_is_not_repeated(listeners) -> None:
    """The limit lowered below the descriptors open: a close makes no room accept() can use.
    One connection is given up, not every listener's; accepting pauses until the limit is
    raised, and then the waiting client is served."""
    it = listeners
    many = it.fill()
    resource.prlimit(it.proc.pid, resource.RLIMIT_NOFILE, (3, it.limit))
    late = it.connect(it.few)
    time.sleep(0.5)  # its listener tries, pauses, tries again after a second
    answered = [ask(s) for s in many[-it.spare :]]
    assert answered.count(b"many\n") == it.spare - 1, answered  # before: none, all closed
    resource.prlimit(it.proc.pid, resource.RLIMIT_NOFILE, (it.limit, it.limit))
    assert ask(late) == b"few\n"
    assert it.proc.poll() is None


class Held:
    """A connection as the listeners see it, on one end of a socket pair."""

    def __init__(self, server, last_active: float) -> None:
        self.server, self.last_active = server, last_active
        self.sock, self.peer = socket.socketpair()
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()
        self.peer.close()
        self.server.connections.discard(self)


def test_the_listener_that_makes_room() -> None:
    loop = EventLoop()
    one, other = TcpServer(loop, HOST, 0), TcpServer(loop, HOST, 0)
    try:

        def hold(server: TcpServer, *times: float) -> list[Held]:
            held = [Held(server, t) for t in times]
            server.connections.update(held)
            return held

        def times(server: TcpServer) -> list[float]:
            return sorted(conn.last_active for conn in server.connections)

        hold(one, 5.0)
        hold(other, 1.0, 2.0, 3.0)
        # the listener holding the most gives up its least recently active connection
        assert one.make_room() is True
        assert (times(one), times(other)) == ([5.0], [2.0, 3.0])
        # on a tie, the listener whose client waits gives one up
        hold(one, 6.0)
        assert one.make_room() is True
        assert (times(one), times(other)) == ([6.0], [2.0, 3.0])
        # another listener's only connection (an operator's session) is left alone
        assert other.make_room() is True
        assert other.make_room() is True
        assert (times(one), times(other)) == ([6.0], [])
        assert other.make_room() is False
        assert times(one) == [6.0]
    finally:
        for server in (one, other):
            for conn in list(server.connections):
                conn.close()
            server.close()
        loop.close()


def test_a_closed_listener_leaves_the_loop() -> None:
    loop = EventLoop()
    server = TcpServer(loop, HOST, 0)
    assert loop.servers == [server]
    server.close()
    assert loop.servers == []
    loop.close()
