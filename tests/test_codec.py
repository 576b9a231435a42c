"""The Gearman packet codec and the connect every gearmand client uses."""

from __future__ import annotations

import selectors
import socket

import pytest
from support import HOST, Gearmand, free_port

from gdriver.codec import (
    HEADER_SIZE,
    MAX_PACKET_SIZE,
    REQ,
    RES,
    Address,
    MalformedPacket,
    PacketType,
    connect,
    connect_error,
    error_text,
    header,
    pack,
    resolve,
    unpack,
)


def test_packet_types_are_the_protocol_numbers() -> None:
    # a few anchors from the Gearman protocol document
    assert PacketType.CAN_DO == 1
    assert PacketType.RESET_ABILITIES == 3
    assert PacketType.GRAB_JOB == 9
    assert PacketType.ECHO_RES == 17
    assert PacketType.JOB_ASSIGN_UNIQ == 31
    assert PacketType(6) is PacketType.NOOP


def test_pack_joins_arguments_with_nul() -> None:
    data = pack(PacketType.JOB_ASSIGN_UNIQ, b"H:1", b"fn", b"", b"x", magic=RES)
    assert data == b"\0RES" + (31).to_bytes(4, "big") + (9).to_bytes(4, "big") + b"H:1\0fn\0\0x"
    assert pack(PacketType.PRE_SLEEP) == REQ + (4).to_bytes(4, "big") + bytes(4)
    assert header(PacketType.WORK_COMPLETE, 3) + b"H\0r" == pack(
        PacketType.WORK_COMPLETE, b"H", b"r"
    )


def test_unpack_reads_packets_in_a_stream() -> None:
    stream = pack(PacketType.NOOP, magic=RES) + pack(PacketType.ECHO_RES, b"hi", magic=RES)
    assert unpack(stream) == (PacketType.NOOP, HEADER_SIZE, HEADER_SIZE)
    ptype, start, end = unpack(stream, HEADER_SIZE)
    assert (ptype, stream[start:end], end) == (PacketType.ECHO_RES, b"hi", len(stream))
    # a partial body: the end says how much is still missing
    assert unpack(stream[:-1], HEADER_SIZE)[2] == len(stream)
    # requests are read by asking for their magic
    assert unpack(pack(PacketType.CAN_DO, b"f"), magic=REQ) == (1, HEADER_SIZE, HEADER_SIZE + 1)


def test_unpack_rejects_garbage_and_oversized_packets() -> None:
    with pytest.raises(MalformedPacket):
        unpack(b"HTTP/1.1 400 Bad")
    with pytest.raises(MalformedPacket):
        unpack(pack(PacketType.NOOP))  # a request where a response is expected
    big = header(PacketType.JOB_ASSIGN_UNIQ, MAX_PACKET_SIZE + 1, magic=RES)
    with pytest.raises(MalformedPacket):
        unpack(big)
    small = header(PacketType.NOOP, 2048, magic=RES)
    assert unpack(small, limit=2048)[2] == HEADER_SIZE + 2048
    with pytest.raises(MalformedPacket):
        unpack(small, limit=1024)


def test_resolve_puts_ipv4_first() -> None:
    addresses = resolve("localhost", 4730)
    assert addresses and all(isinstance(a, Address) for a in addresses)
    families = [a.family for a in addresses]
    assert families == sorted(families, key=lambda f: f != socket.AF_INET)
    with pytest.raises(OSError) as info:
        resolve("name.invalid", 4730)
    assert error_text(info.value).startswith("cannot resolve host")


def wait_connected(sock: socket.socket, connected: bool) -> str | None:
    if connected:
        return None
    with selectors.DefaultSelector() as sel:
        sel.register(sock, selectors.EVENT_WRITE)
        assert sel.select(5.0), "connect neither finished nor failed"
    return connect_error(sock)


def test_connect_reaches_gearmand_and_reports_refusal(gearmand: Gearmand) -> None:
    sock, connected = connect(resolve(HOST, gearmand.port)[0])
    try:
        assert not sock.getblocking()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert wait_connected(sock, connected) is None
        sock.setblocking(True)
        sock.settimeout(5)
        sock.sendall(pack(PacketType.ECHO_REQ, b"ping"))
        reply = sock.recv(64)
        ptype, start, end = unpack(reply)
        assert (ptype, reply[start:end]) == (PacketType.ECHO_RES, b"ping")
    finally:
        sock.close()
    try:
        sock, connected = connect(resolve(HOST, free_port())[0])
    except OSError as exc:  # refused at once
        assert error_text(exc) == "connection refused"
    else:
        try:
            assert wait_connected(sock, connected) == "connection refused"
        finally:
            sock.close()
