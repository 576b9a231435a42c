"""The least a Python worker process does per job: the floor under any Python worker.

Usage: pyfloor.py HOST PORT FUNCTION

One connection, an epoll wait, one ``recv_into`` and one ``send`` per job (the result and
the next grab together, as gdriver sends them), the job's fields split from the packet and
its workload returned; nothing else: no supervisor, no slot, no report, no hook, no timer,
no second server. What gdriver's worker process does on top of this is its features; what
this loop costs next to the C worker is the language's.
"""

import select
import socket
import struct
import sys

HEADER = struct.Struct(">4sII")
REQ = b"\0REQ"
CAN_DO, PRE_SLEEP, GRAB_JOB_UNIQ, WORK_COMPLETE = 1, 4, 30, 13
NOOP, NO_JOB, JOB_ASSIGN_UNIQ = 6, 10, 31


def packet(ptype: int, body: bytes = b"") -> bytes:
    return HEADER.pack(REQ, ptype, len(body)) + body


def main() -> None:
    host, port, function = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    grab = packet(GRAB_JOB_UNIQ)
    sock.send(packet(CAN_DO, function) + grab)
    poll = select.epoll()
    poll.register(sock.fileno(), select.EPOLLIN)
    buf = bytearray(1 << 18)
    view = memoryview(buf)
    unpack_from, pack = HEADER.unpack_from, HEADER.pack
    pending = b""
    while True:
        poll.poll()
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            continue
        if not n:
            return  # gearmand closed the connection: the bench is over
        data = pending + view[:n].tobytes()
        pos = 0
        while len(data) - pos >= HEADER.size:
            _, ptype, size = unpack_from(data, pos)
            end = pos + HEADER.size + size
            if end > len(data):
                break
            body = data[pos + HEADER.size : end]
            pos = end
            if ptype == JOB_ASSIGN_UNIQ:
                handle, _, _, workload = body.split(b"\0", 3)
                head = pack(REQ, WORK_COMPLETE, len(handle) + 1 + len(workload))
                sock.send(b"".join((head, handle, b"\0", workload, grab)))
            elif ptype == NO_JOB:
                sock.send(packet(PRE_SLEEP))
            elif ptype == NOOP:
                sock.send(grab)
        pending = data[pos:]


if __name__ == "__main__":
    main()
