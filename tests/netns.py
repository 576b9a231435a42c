"""Hosts and links for the tests, made of Linux network namespaces; a resolver that never
answers, made of a mount namespace.

Network namespaces as hosts: :class:`Network` creates namespaces (``ip netns add``) and
point-to-point veth links between them, each link with its own /24 from 10.213.0.0/16
that exists only inside the two namespaces it joins (nothing is added to the namespace the
tests run in, nothing is routed anywhere). :meth:`Link.cut` takes both ends of a link down:
packets are dropped, no RST or FIN is sent, so each side keeps a half-open connection until
it notices by itself; :meth:`Link.restore` brings it back. Commands run inside a host with
``host.command([...])`` (``ip netns exec``, which execs, so the PID is the command's own);
the test process itself can open sockets inside a host with ``with host.entered():``.
:meth:`Network.close` deletes every namespace (their links go with them).

Needs root and ``ip`` (iproute2); :func:`unavailable` says why not when the machine does
not allow it, for a clear skip.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
IP = shutil.which("ip") or "/usr/sbin/ip"
_serial = itertools.count(1)


def _ip(*args: str) -> None:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def unavailable() -> str | None:
    """None when this machine lets us make namespaces and veth links; else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not os.path.exists(IP):
        return "iproute2 (ip) is not installed"
    name = f"gdt{os.getpid()}probe"
    try:
        _ip("netns", "add", name)
        try:
            _ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        finally:
            _ip("netns", "del", name)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"network namespaces not allowed here: {exc}"
    return None


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Host:
    """One network namespace: a host with its own loopback, addresses and routes."""

    def __init__(self, name: str) -> None:
        self.name = name
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside this host."""
        return [IP, "netns", "exec", self.name, *argv]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread's sockets are made inside this host until the block ends."""
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.name}") as ns:
            _setns(ns.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def connect(self, address: tuple[str, int], timeout: float = 2.0) -> socket.socket:
        """A TCP connection made from inside this host."""
        with self.entered():
            return socket.create_connection(address, timeout=timeout)


class Link:
    """A veth pair between two hosts; ``address_a`` lives in ``a``, ``address_b`` in ``b``."""

    def __init__(self, a: Host, b: Host, subnet: int) -> None:
        self.a, self.b = a, b
        self.dev_a, self.dev_b = f"v{subnet}a", f"v{subnet}b"
        self.address_a, self.address_b = f"10.213.{subnet}.1", f"10.213.{subnet}.2"
        _ip("-n", a.name, "link", "add", self.dev_a, "type", "veth", "peer", "name", self.dev_b,
            "netns", b.name)  # fmt: skip
        _ip("-n", a.name, "addr", "add", f"{self.address_a}/24", "dev", self.dev_a)
        _ip("-n", b.name, "addr", "add", f"{self.address_b}/24", "dev", self.dev_b)
        self.restore()

    def cut(self) -> None:
        """Both ends down: packets vanish, nobody is told (no RST, no FIN)."""
        _ip("-n", self.a.name, "link", "set", self.dev_a, "down")
        _ip("-n", self.b.name, "link", "set", self.dev_b, "down")

    def restore(self) -> None:
        _ip("-n", self.a.name, "link", "set", self.dev_a, "up")
        _ip("-n", self.b.name, "link", "set", self.dev_b, "up")


class Network:
    """Hosts and links made by one test; ``close()`` (or the ``with`` block) removes them."""

    def __init__(self) -> None:
        self.prefix = f"gdt{os.getpid() % 100000}x{next(_serial)}"
        self.hosts: list[Host] = []
        self.links: list[Link] = []

    def host(self, name: str) -> Host:
        host = Host(f"{self.prefix}{name}")
        self.hosts.append(host)
        return host

    def link(self, a: Host, b: Host) -> Link:
        if len(self.links) >= 250:
            raise ValueError("too many links in one network")
        link = Link(a, b, len(self.links) + 1)
        self.links.append(link)
        return link

    def close(self) -> None:
        for host in reversed(self.hosts):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                _ip("netns", "del", host.name)
        self.hosts, self.links = [], []

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SilentResolver:
    """A DNS server that never answers, and commands that use it as their only resolver.

    A UDP socket bound to port 53 of a loopback address of its own (127.213.x.y, in the
    namespace the tests run in) that nobody reads: queries are accepted by the kernel and
    never answered, as with a resolver that hangs. :meth:`wrap` turns a command into one that
    runs in a new mount namespace (``unshare --mount``) where ``/etc/resolv.conf`` is bound
    to a file naming only that address, so the command's ``getaddrinfo`` of a name that is
    not in /etc/hosts (``gearmand.invalid-dns.test``, say) blocks for the resolver timeout
    (``timeout`` seconds per try, ``attempts`` tries) and then fails with EAI_AGAIN; names in
    /etc/hosts and numeric addresses keep working. Nothing outside the wrapped command is
    changed. Use it as a context manager; needs root (port 53, mount namespaces)::

        with SilentResolver(timeout=2, attempts=1) as dns:
            proc = subprocess.Popen(dns.wrap([sys.executable, "-m", "gdriver", ...]))
    """

    def __init__(self, timeout: int = 5, attempts: int = 2) -> None:
        self.timeout = timeout
        self.attempts = attempts
        self.sock: socket.socket | None = None
        self.address = ""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.conf = Path()

    def __enter__(self) -> SilentResolver:
        base = os.getpid() % 250 + 1
        for i in range(1, 255):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            address = f"127.213.{base}.{i}"
            try:
                sock.bind((address, 53))
            except OSError:
                sock.close()
                continue
            self.sock, self.address = sock, address
            break
        else:
            raise OSError("no free loopback address for the silent resolver")
        self._tmp = tempfile.TemporaryDirectory(prefix="gdriver-dns-")
        self.conf = Path(self._tmp.name) / "resolv.conf"
        options = f"options timeout:{self.timeout} attempts:{self.attempts}"
        self.conf.write_text(f"nameserver {self.address}\n{options}\n")
        return self

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run with the silent resolver as the only nameserver."""
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        return ["unshare", "--mount", "sh", "-c", script, str(self.conf), *argv]

    def queries(self) -> int:
        """Queries received so far (read and dropped, never answered)."""
        assert self.sock is not None
        n = 0
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self.sock.recv(4096)
                n += 1
        return n

    def __exit__(self, *exc: object) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
