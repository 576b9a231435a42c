"""The supervisor's resources at start: the descriptor limit, and who holds a port it cannot
bind.

Each worker process costs the supervisor ``FDS_PER_PROCESS`` descriptors for its life (its
channel and the read ends of its stdout and stderr) and three more while it is forked. A start
raises the soft ``RLIMIT_NOFILE`` to the hard one (where the system lets it: a seccomp filter
or a container may not) and warns when the configured processes cannot fit.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket

from gdriver.logs import log_event

log = logging.getLogger("gdriver")

FDS_PER_PROCESS = 3  # channel socket, stdout and stderr pipes: held while the process lives
FDS_SPAWNING = 3  # the child's ends, held by the supervisor only during one fork
FDS_BASE = 16  # stdio, the selector, the wake-up pipe, listeners, logfile, the resolver
FDS_PER_SERVER = 2  # the admin poll and the waker of each gearmand
NR_OPEN = "/proc/sys/fs/nr_open"


class StartError(Exception):
    """The supervisor cannot start (a port in use, a bind address that does not resolve):
    one line for the operator, exit status 78 (a restart would not help)."""


def raise_nofile() -> tuple[int, int]:
    """Raise the soft descriptor limit to the hard one; returns the (soft, hard) in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = _nr_open()
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:  # EPERM under a seccomp filter: keep what we have
        log.debug("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
        return soft, hard
    return target, hard


def _nr_open() -> int:
    try:
        with open(NR_OPEN) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def fds_needed(processes: int, servers: int, connections: int) -> int:
    """Descriptors the supervisor needs for ``processes`` worker processes, ``servers``
    gearmands and ``connections`` console and HTTP clients at most."""
    return (
        FDS_BASE
        + FDS_PER_SERVER * servers
        + connections
        + FDS_PER_PROCESS * processes
        + FDS_SPAWNING
    )


def processes_that_fit(limit: int, servers: int, connections: int) -> int:
    """Worker processes that fit in a descriptor limit (the inverse of ``fds_needed``)."""
    spare = limit - fds_needed(0, servers, connections)
    return max(0, spare // FDS_PER_PROCESS)


def check_nofile(processes: int, servers: int, connections: int) -> int:
    """Raise the limit; warn when ``processes`` (the most the configuration may start)
    cannot fit. Returns the soft limit."""
    soft, hard = raise_nofile()
    if soft == resource.RLIM_INFINITY:
        return soft
    needed = fds_needed(processes, servers, connections)
    if needed > soft:
        fit = processes_that_fit(soft, servers, connections)
        message = (
            f"the descriptor limit ({soft}, hard {hard}) fits about {fit} worker processes, "
            f"the configuration may start {processes} ({needed} descriptors): raise "
            "LimitNOFILE / ulimit -n or lower max_total_processes; starts beyond it fail "
            "and are retried"
        )
        log_event(log, logging.WARNING, message, "fd_limit_low", limit=soft, needed=needed)
    return soft


def port_holders(port: int) -> list[str]:
    """The processes listening on TCP ``port`` (those this user may see), as "name (PID n)"."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{inode}]")
    holders: list[str] = []
    if not inodes:
        return holders
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        with contextlib.suppress(OSError):
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(_readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                with open(f"/proc/{pid}/comm") as f:
                    holders.append(f"{f.read().strip()} (PID {pid})")
    return holders


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def bind_error(what: str, host: str, port: int, exc: OSError) -> StartError:
    """The one line saying why ``what`` (console, metrics) cannot listen on host:port."""
    where = f"{host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        holders = port_holders(port)
        held = f"held by {', '.join(holders)}" if holders else "held by another process"
        return StartError(f"{what}_port {port}: cannot listen on {where}: in use, {held}")
    if isinstance(exc, socket.gaierror):
        return StartError(f"{what}_bind {host}: does not resolve ({exc.strerror or exc})")
    return StartError(f"{what}_port {port}: cannot listen on {where}: {exc.strerror or exc}")
