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


@pytest.fixture
def listeners() -> Iterator[tuple[subprocess.Popen[str], int, int, int, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, "6"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        many, few, limit, spare = (int(x) for x in proc.stdout.readline().split())
        assert 0 < spare < 20, spare  # the tests' 20 clients are more than the room
        yield proc, many, few, limit, spare
    finally:
        stop_pid(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def ask(s: socket.socket) -> bytes:
    s.sendall(b"?")
    return s.recv(100)


def test_out_of_descriptors_the_listener_holding_most_gives_one_up(listeners) -> None:
    proc, many_port, few_port, limit, spare = listeners
    clients: list[socket.socket] = []
    try:
        many = [socket.create_connection((HOST, many_port), timeout=5) for _ in range(20)]
        clients += many
        # the process's every descriptor number is in use: the listeners hit EMFILE. Once no
        # client waits, accept() still says EMFILE; that closes nothing (before, one more)
        wait_for(lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) >= limit, 10)
        assert [ask(s) for s in many[-spare:]] == [b"many\n"] * spare
        assert ask(many[-spare - 1]) == b""  # made room for the newer ones
        # "few" holds no connection to give up: before, its accepting paused until "many"
        # freed a descriptor, which idle clients never do
        first = socket.create_connection((HOST, few_port), timeout=5)
        clients.append(first)
        assert ask(first) == b"few\n"
        # "few" holds one now, "many" still the most: "many" gives way again
        second = socket.create_connection((HOST, few_port), timeout=5)
        clients.append(second)
        assert ask(second) == b"few\n"
        assert ask(first) == b"few\n"
        assert ask(many[-1]) == b"many\n"
        assert proc.poll() is None
    finally:
        for s in clients:
            s.close()


def test_a_close_that_frees_nothing_usable_is_not_repeated(listeners) -> None:
    """The limit lowered below the descriptors open: a close makes no room accept() can use.
    One connection is given up, not every listener's; accepting pauses until the limit is
    raised, and then the waiting client is served."""
    proc, many_port, few_port, limit, spare = listeners
    clients: list[socket.socket] = []
    try:
        many = [socket.create_connection((HOST, many_port), timeout=5) for _ in range(20)]
        clients += many
        wait_for(lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) >= limit, 10)
        assert [ask(s) for s in many[-spare:]] == [b"many\n"] * spare
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (3, limit))
        late = socket.create_connection((HOST, few_port), timeout=5)
        clients.append(late)
        time.sleep(0.5)  # its listener tries, pauses, tries again after a second
        answered = [ask(s) for s in many[-spare:]]
        assert answered.count(b"many\n") == spare - 1, answered  # before: 1, the rest closed
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        assert ask(late) == b"few\n"
        assert proc.poll() is None
    finally:
        for s in clients:
            s.close()


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
