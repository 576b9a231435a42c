"""A system resolver that never answers, for real.

A command runs in a mount namespace of its own (``unshare --mount``, as root) where
``/etc/resolv.conf`` names a UDP socket on loopback that receives every query and answers
none, and ``/etc/hosts`` is a file the test writes (rewritten in place, so a change is seen
at once, as a DNS change would be). glibc's ``getaddrinfo`` in there looks a name up in the
hosts file, then asks that silent server and waits out its timeouts.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
from pathlib import Path

BASE_HOSTS = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"


def namespaces_usable() -> str | None:
    """None when a mount namespace can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root for unshare --mount"
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    if probe.returncode != 0:
        return f"unshare --mount refused: {probe.stderr.decode().strip()}"
    return None


class SilentDns:
    """A DNS server address that takes queries and never answers, plus the files that point
    a mount namespace at it. ``timeout``/``attempts`` go into resolv.conf's options."""

    def __init__(self, directory: Path, timeout: int = 30, attempts: int = 5) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(20):  # a free loopback address of our own (all of 127/8 is loopback)
            self.address = f"127.53.{random.randint(1, 254)}.{random.randint(1, 254)}"
            try:
                self.sock.bind((self.address, 53))
                break
            except OSError:
                continue
        else:
            self.sock.close()
            raise OSError("no free loopback address for port 53")
        self.sock.setblocking(False)
        self.queries: list[bytes] = []
        self.resolv_conf = directory / "resolv.conf"
        self.resolv_conf.write_text(
            f"nameserver {self.address}\noptions timeout:{timeout} attempts:{attempts}\n"
        )
        self.hosts = directory / "hosts"
        self.set_hosts("")

    def set_hosts(self, extra: str) -> None:
        """The namespace's /etc/hosts: localhost plus ``extra`` lines (written in place: the
        bind mount keeps the inode)."""
        with open(self.hosts, "w") as f:
            f.write(BASE_HOSTS + extra)

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` run in a new mount namespace with these files as resolv.conf and hosts.
        unshare and sh exec it in place: the PID Popen returns is the command's."""
        script = (
            'mount --bind "$0" /etc/resolv.conf && mount --bind "$1" /etc/hosts && '
            'shift && exec "$@"'
        )
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                str(self.resolv_conf), str(self.hosts), *command]  # fmt: skip

    def received(self) -> int:
        """Queries received so far (read, never answered)."""
        with contextlib.suppress(BlockingIOError, OSError):  # OSError: closed already
            while True:
                self.queries.append(self.sock.recv(4096))
        return len(self.queries)

    def close(self) -> None:
        self.sock.close()
