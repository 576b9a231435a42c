"""A small raw-socket Gearman client for the benchmarks (one TCP connection).

Modes:

- ``pipelined``: keeps up to ``window`` SUBMIT_JOB requests in flight and reads the
  WORK_COMPLETE packets as they come (worker-bound);
- ``sequential``: submits one job, waits for its WORK_COMPLETE, repeats (latency-bound);
- ``background``: SUBMIT_JOB_BG for every workload, returns once all are queued.

Run as a script it prints one JSON object, so that the client is a process of its own::

    gclient.py pipelined|sequential PORT FUNCTION COUNT [--window N] [--workload X] [--check]
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import struct
import sys
import time
from collections.abc import Sequence

HEADER = struct.Struct(">4sII")
REQ, RES = b"\0REQ", b"\0RES"
SUBMIT_JOB, JOB_CREATED, WORK_COMPLETE, WORK_FAIL = 7, 8, 13, 14
SUBMIT_JOB_BG, ERROR, WORK_EXCEPTION = 18, 19, 25


def packet(ptype: int, body: bytes) -> bytes:
    return HEADER.pack(REQ, ptype, len(body)) + body


def submit(function: str, workload: bytes, background: bool = False) -> bytes:
    ptype = SUBMIT_JOB_BG if background else SUBMIT_JOB
    return packet(ptype, function.encode() + b"\0\0" + workload)


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class Counts:
    def __init__(self) -> None:
        self.created = 0
        self.completed = 0
        self.failed = 0
        self.mismatched = 0
        self.errors: list[str] = []


def _parse(buf: bytearray, counts: Counts, expect: bytes | None) -> None:
    pos = 0
    n = len(buf)
    unpack = HEADER.unpack_from
    while n - pos >= 12:
        magic, ptype, size = unpack(buf, pos)
        if magic != RES:
            raise ConnectionError("malformed reply from gearmand")
        end = pos + 12 + size
        if end > n:
            break
        if ptype == WORK_COMPLETE:
            counts.completed += 1
            if expect is not None:
                body = bytes(buf[pos + 12 : end])
                if body[body.index(b"\0") + 1 :] != expect:
                    counts.mismatched += 1
        elif ptype == JOB_CREATED:
            counts.created += 1
        elif ptype in (WORK_FAIL, WORK_EXCEPTION):
            counts.failed += 1
        elif ptype == ERROR:
            counts.failed += 1
            counts.errors.append(bytes(buf[pos + 12 : end]).decode("utf-8", "replace"))
        pos = end
    del buf[:pos]


def pipelined(
    port: int,
    function: str,
    count: int,
    window: int = 0,
    workload: bytes = b"x",
    check: bool = False,
    timeout: float = 120.0,
) -> dict[str, object]:
    """``count`` jobs with up to ``window`` in flight (0: all of them)."""
    window = window or count
    one = submit(function, workload)
    expect = workload if check else None
    counts = Counts()
    buf = bytearray()
    out = bytearray()
    sent = 0
    sock = connect(port)
    sock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    writing = False
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    try:
        while counts.completed + counts.failed < count:
            inflight = sent - counts.completed - counts.failed
            if sent < count and inflight < window and len(out) < 65536:
                k = min(count - sent, window - inflight, 2048)
                out += one * k
                sent += k
            if out:
                try:
                    n = sock.send(out)
                    del out[:n]
                except BlockingIOError:
                    pass
            want = selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0)
            if (want & selectors.EVENT_WRITE) != writing:
                sel.modify(sock, want)
                writing = bool(want & selectors.EVENT_WRITE)
            for _key, mask in sel.select(1.0):
                if mask & selectors.EVENT_READ:
                    try:
                        data = sock.recv(1 << 18)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise ConnectionError("gearmand closed the connection")
                    buf += data
                    _parse(buf, counts, expect)
            if time.monotonic() > deadline:
                break
        seconds = time.perf_counter() - start
    finally:
        sel.close()
        sock.close()
    return _result(counts, count, seconds)


def sequential(
    port: int,
    function: str,
    count: int,
    workload: bytes = b"x",
    check: bool = False,
    timeout: float = 120.0,
) -> dict[str, object]:
    """One job at a time: submit, wait for its result, repeat."""
    one = submit(function, workload)
    expect = workload if check else None
    counts = Counts()
    buf = bytearray()
    sock = connect(port)
    sock.settimeout(timeout)
    start = time.perf_counter()
    try:
        for i in range(count):
            sock.sendall(one)
            while counts.completed + counts.failed <= i:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("gearmand closed the connection")
                buf += data
                _parse(buf, counts, expect)
        seconds = time.perf_counter() - start
    finally:
        sock.close()
    return _result(counts, count, seconds)


def background(port: int, function: str, workloads: Sequence[bytes]) -> dict[str, object]:
    """Queue background jobs; returns when gearmand has acknowledged every one."""
    counts = Counts()
    buf = bytearray()
    data = b"".join(submit(function, w, background=True) for w in workloads)
    sock = connect(port)
    start = time.perf_counter()
    try:
        sock.sendall(data)
        while counts.created + counts.failed < len(workloads):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("gearmand closed the connection")
            buf += chunk
            _parse(buf, counts, None)
        seconds = time.perf_counter() - start
    finally:
        sock.close()
    return {"jobs": len(workloads), "created": counts.created, "seconds": seconds}


def _result(counts: Counts, count: int, seconds: float) -> dict[str, object]:
    return {
        "jobs": count,
        "completed": counts.completed,
        "failed": counts.failed,
        "mismatched": counts.mismatched,
        "errors": counts.errors[:5],
        "seconds": seconds,
        "rate": counts.completed / seconds if seconds > 0 else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("mode", choices=("pipelined", "sequential"))
    p.add_argument("port", type=int)
    p.add_argument("function")
    p.add_argument("count", type=int)
    p.add_argument("--window", type=int, default=0)
    p.add_argument("--workload", default="x")
    p.add_argument("--check", action="store_true")
    p.add_argument("--warmup", type=int, default=0, help="untimed jobs first")
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args(argv)
    workload = a.workload.encode()
    if a.warmup:
        pipelined(a.port, a.function, a.warmup, 0, workload, False, a.timeout)
    if a.mode == "pipelined":
        res = pipelined(a.port, a.function, a.count, a.window, workload, a.check, a.timeout)
    else:
        res = sequential(a.port, a.function, a.count, workload, a.check, a.timeout)
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
