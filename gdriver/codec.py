"""The Gearman binary packet format, and the non-blocking connect every gearmand client uses.

A packet is a 12-byte header (magic ``\\0REQ`` from a worker or client, ``\\0RES`` from the
server; the type; the body size, all big-endian) and a body whose arguments are separated by
NUL bytes.  :class:`PacketType` names the types; :func:`pack` and :func:`unpack` build and read
packets.  Used by the worker (:mod:`gdriver.gearman`), the waker (:mod:`gdriver.waker`) and
the warm-up of worker processes (:mod:`gdriver.process`).

Connecting is split in two so that name resolution can move elsewhere without touching the
callers' connect logic: :func:`resolve` turns a server into addresses (a blocking
``getaddrinfo``), :func:`connect` starts a non-blocking connect to one of them.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = [
    "HEADER_SIZE",
    "MAX_PACKET_SIZE",
    "REQ",
    "RES",
    "Address",
    "MalformedPacket",
    "PacketType",
    "connect",
    "connect_error",
    "errno_text",
    "error_text",
    "header",
    "pack",
    "pack_header",
    "resolve",
    "unpack",
    "unpack_header",
]


class PacketType(enum.IntEnum):
    """Packet types of the Gearman binary protocol (the ones gdriver or its tests use)."""

    CAN_DO = 1
    CANT_DO = 2
    RESET_ABILITIES = 3
    PRE_SLEEP = 4
    NOOP = 6
    SUBMIT_JOB = 7
    JOB_CREATED = 8
    GRAB_JOB = 9
    NO_JOB = 10
    JOB_ASSIGN = 11
    WORK_STATUS = 12
    WORK_COMPLETE = 13
    WORK_FAIL = 14
    GET_STATUS = 15
    ECHO_REQ = 16
    ECHO_RES = 17
    SUBMIT_JOB_BG = 18
    ERROR = 19
    STATUS_RES = 20
    SET_CLIENT_ID = 22
    WORK_EXCEPTION = 25
    OPTION_REQ = 26
    OPTION_RES = 27
    WORK_DATA = 28
    WORK_WARNING = 29
    GRAB_JOB_UNIQ = 30
    JOB_ASSIGN_UNIQ = 31


REQ = b"\0REQ"  # magic of packets to the server
RES = b"\0RES"  # magic of packets from the server
_HEADER = struct.Struct(">4sII")
HEADER_SIZE = _HEADER.size
#: Largest packet body accepted by default; anything bigger is treated as garbage.
MAX_PACKET_SIZE = 64 * 1024 * 1024

_pack_header = _HEADER.pack
_unpack_header = _HEADER.unpack_from
#: (magic, type, size) of the header at an offset, unchecked: for a loop that checks inline.
unpack_header = _HEADER.unpack_from
#: header() without the call around it, for the result every job sends: (magic, type, size).
pack_header = _HEADER.pack


class MalformedPacket(ValueError):
    """Bytes that are not a Gearman packet with the expected magic and a sane size."""


def header(ptype: int, size: int, magic: bytes = REQ) -> bytes:
    """The header of a packet whose body, ``size`` bytes, the caller sends right after it."""
    return _pack_header(magic, ptype, size)


def pack(ptype: int, *args: bytes, magic: bytes = REQ) -> bytes:
    """One whole packet; the arguments are joined with NUL bytes."""
    body = args[0] if len(args) == 1 else b"\0".join(args)
    return _pack_header(magic, ptype, len(body)) + body


def unpack(
    data: bytes | bytearray, pos: int = 0, limit: int = MAX_PACKET_SIZE, magic: bytes = RES
) -> tuple[int, int, int]:
    """The packet whose header starts at ``pos``: (type, body start, body end).

    ``data`` must hold at least HEADER_SIZE bytes from ``pos``; the body is complete when
    ``end <= len(data)``.  A wrong magic or a body larger than ``limit`` raises
    MalformedPacket."""
    got, ptype, size = _unpack_header(data, pos)
    if got != magic or size > limit:
        raise MalformedPacket("bad magic" if got != magic else f"packet of {size} bytes")
    start = pos + HEADER_SIZE
    return ptype, start, start + size


# --------------------------------------------------------------------------- connecting


class Address(NamedTuple):
    """One resolved address of a server: what socket() and connect() need."""

    family: int
    proto: int
    sockaddr: Any


#: Set by :func:`gdriver.resolver.install` in the supervisor (and so in its workers): answers
#: from a cache that a resolver process fills, never blocking.
name_lookup: Callable[[str, int], list[Address]] | None = None


def resolve(host: str, port: int) -> list[Address]:
    """The addresses of host:port, IPv4 first, then the rest in the resolver's order.

    With a resolver installed (:mod:`gdriver.resolver`) this never blocks and raises
    OSError (socket.gaierror) while a name has no known address; else it blocks on
    getaddrinfo and raises socket.gaierror when the name does not resolve."""
    if name_lookup is not None:
        return name_lookup(host, port)
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, "no address")
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # stable: keeps the resolver's order
    return [Address(family, proto, sockaddr) for family, _, proto, _, sockaddr in infos]


_CONNECT_PENDING = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EALREADY, errno.EINTR)


def connect(address: Address) -> tuple[socket.socket, bool]:
    """Start a non-blocking TCP connect: (socket, connected already).

    When not connected already, wait until the socket is writable and ask
    :func:`connect_error`.  A connect that fails at once closes the socket and raises
    OSError whose message is the short reason (see :func:`error_text`)."""
    sock = socket.socket(address.family, socket.SOCK_STREAM, address.proto)
    sock.setblocking(False)
    _tune(sock)
    err = sock.connect_ex(address.sockaddr)
    if err == 0:
        return sock, True
    if err in _CONNECT_PENDING:
        return sock, False
    sock.close()
    raise OSError(err, errno_text(err))


def connect_error(sock: socket.socket) -> str | None:
    """After a pending connect made the socket writable: None, or why it failed."""
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return errno_text(err) if err else None


#: A dead link (cut, or a host gone without a RST) is noticed within LINK_TIMEOUT s of the
#: last unacknowledged send, and within LINK_TIMEOUT + KEEPALIVE_INTERVAL s of the last packet
#: received on an idle connection: the kernel sends keepalive probes after KEEPALIVE_IDLE s
#: of silence (no packet while data flows) and drops the connection when data or probes stay
#: unacknowledged for LINK_TIMEOUT s (TCP_USER_TIMEOUT, Linux); the caller sees ETIMEDOUT
#: and reconnects.
KEEPALIVE_IDLE = 2
KEEPALIVE_INTERVAL = 1
LINK_TIMEOUT = 8


def _tune(sock: socket.socket) -> None:
    # results go out at once; keepalive and the user timeout bound a half-open connection
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, LINK_TIMEOUT)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, LINK_TIMEOUT * 1000)
    except OSError:
        pass


_ERRNO_TEXT = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.ETIMEDOUT: "timeout",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EPIPE: "connection closed",
}


def errno_text(err: int) -> str:
    """A short lowercase reason for an errno ("connection refused", "timeout", ...)."""
    return _ERRNO_TEXT.get(err) or os.strerror(err).lower()


def error_text(exc: OSError) -> str:
    """A short lowercase reason for a socket error, for logs and admin replies."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    if exc.errno:
        return errno_text(exc.errno)
    return str(exc) or type(exc).__name__
