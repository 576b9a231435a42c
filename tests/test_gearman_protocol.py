"""Contract tests for gdriver.gearman against a real gearmand 1.1.20 on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from compat_support import Geard, PerlGearmand
from support import (
    HOST,
    Gdriver,
    Gearmand,
    do,
    free_port,
    http_status,
    submit_background,
    wait_for,
)

from gdriver.codec import RES, pack
from gdriver.codec import PacketType as P
from gdriver.gearman import (
    DEFAULT_PORT,
    MAX_PACKET_SIZE,
    AdminRequest,
    FunctionStatus,
    GearmanWorker,
    Job,
    JobFailed,
    Protocol,
    parse_servers,
    parse_status,
)

HEADER = struct.Struct(">4sII")


def req(ptype: int, *args: bytes) -> bytes:
    return pack(ptype, *args)


def res(ptype: int, *args: bytes) -> bytes:
    return pack(ptype, *args, magic=RES)


class RawPeer:
    """A plain binary-protocol connection to gearmand, for what the clients cannot show."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=5)
        self.buf = b""

    def send(self, *packets: bytes) -> None:
        self.sock.sendall(b"".join(packets))

    def read(self, count: int = 1, timeout: float = 5.0) -> list[tuple[int, bytes]]:
        """Read exactly `count` packets (fewer only if the timeout passes)."""
        out: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            while len(self.buf) >= 12:
                magic, ptype, size = HEADER.unpack_from(self.buf)
                assert magic == b"\0RES"
                if len(self.buf) < 12 + size:
                    break
                out.append((ptype, self.buf[12 : 12 + size]))
                self.buf = self.buf[12 + size :]
                if len(out) == count:
                    return out
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            self.buf += chunk
        return out

    def close(self) -> None:
        self.sock.close()


class RunningWorker:
    """GearmanWorker.work() in a thread, stopped through should_stop and a wake pipe."""

    def __init__(self, servers: list[tuple[str, int]], functions: dict[str, Any], **kw: Any):
        self.worker = GearmanWorker(servers, functions, **kw)
        self.stop_flag = threading.Event()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        self.registrations: list[int] = []
        self.refusals: list[int] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.worker.work(
                self.stop_flag.is_set,
                wake_fds=[self.wake_r],
                on_wake=self._drain,
                on_registered=self.registrations.append,
                on_refused=self.refusals.append,
            )
        except BaseException as exc:
            self.error = exc

    def _drain(self, fd: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(fd, 1024)

    def start(self, registered: int | None = None) -> RunningWorker:
        self.thread.start()
        if registered is not None:
            self.wait_registered(registered)
        return self

    def wait_registered(self, n: int, timeout: float = 5.0) -> None:
        wait_for(lambda: self.worker.confirmed_servers == n, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_flag.set()
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")
        self.thread.join(timeout)
        alive = self.thread.is_alive()
        if not alive:
            for fd in (self.wake_r, self.wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
        assert not alive, "work() did not return"
        assert self.error is None, repr(self.error)

    def __enter__(self) -> RunningWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_of(g: Gearmand) -> tuple[str, int]:
    return (HOST, g.port)


def echo(job: Job) -> bytes:
    return job.workload


# --------------------------------------------------------------------------- parse_servers


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("localhost", [("localhost", DEFAULT_PORT)]),
        ("127.0.0.1:4731", [("127.0.0.1", 4731)]),
        (":4732", [("localhost", 4732)]),
        (" a:1 , b ,c:65535 ", [("a", 1), ("b", 4730), ("c", 65535)]),
        ("gm-1.example.com:04730", [("gm-1.example.com", 4730)]),
        ("[::1]", [("::1", 4730)]),
        ("[::1]:4740,127.0.0.1", [("::1", 4740), ("127.0.0.1", 4730)]),
        ("a:1,a:1", [("a", 1)]),
    ],
)
def test_parse_servers_good(spec: str, expected: list[tuple[str, int]]) -> None:
    assert parse_servers(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        "a,,b",
        "a,",
        "a:",
        "a:x",
        "a:0",
        "a:65536",
        "a:-1",
        "a:1.5",
        "a b:1",
        "::1",
        "[::1",
        "[]:1",
        "[::1]x",
        "[::1]:",
        "a:\uff11\uff12",  # non-ASCII digits
    ],
)
def test_parse_servers_bad(spec: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_servers(spec)
    assert str(info.value)


# --------------------------------------------------------------------------- jobs


def test_echo_registration_and_names(gearmand: Gearmand) -> None:
    names = ["t.echo", "myapp.images.Images.resize", "ns:fn::x"]
    with RunningWorker(
        [server_of(gearmand)], dict.fromkeys(names, echo), client_id="proto-test"
    ).start(registered=1) as rw:
        assert rw.registrations == [1]
        line = next(w for w in gearmand.admin("workers") if "proto-test" in w)
        assert set(line.split(" : ", 1)[1].split()) == set(names)
        for name in names:
            r = do(gearmand.address, name, f"hello {name}")
            assert r.state == "COMPLETE"
            assert r.result == f"hello {name}".encode()
        assert rw.worker.jobs_completed == 3


def test_binary_and_large_payloads(gearmand: Gearmand) -> None:
    big = bytes(range(256)) * 4096  # 1 MiB with NUL bytes all over
    seen: list[bytes] = []

    def handler(job: Job) -> bytes:
        seen.append(job.workload)
        return job.workload[::-1] + b"\0tail"

    with RunningWorker([server_of(gearmand)], {"t.bin": handler}).start(registered=1):
        for payload in (b"\0", b"a\0b\0\0c", big):
            r = do(gearmand.address, "t.bin", payload)
            assert r.state == "COMPLETE"
            assert r.result == payload[::-1] + b"\0tail"
        assert seen[-1] == big


def test_result_types_and_finished_job(gearmand: Gearmand) -> None:
    jobs: list[Job] = []

    def none(job: Job) -> bytes:
        jobs.append(job)
        return None  # type: ignore[return-value]

    def text(job: Job) -> bytes:
        return "grüße"  # type: ignore[return-value]

    def wrong(job: Job) -> bytes:
        return 42  # type: ignore[return-value]

    functions = {"t.none": none, "t.text": text, "t.wrong": wrong}
    with RunningWorker([server_of(gearmand)], functions).start(registered=1):
        assert do(gearmand.address, "t.none", b"x").result == b""
        assert do(gearmand.address, "t.text", b"x").result == "grüße".encode()
        r = do(gearmand.address, "t.wrong", b"x")
        assert r.state == "FAILED"
        assert b"int" in b"".join(r.warning_updates)
        assert do(gearmand.address, "t.text", b"x").state == "COMPLETE"
    with pytest.raises(RuntimeError):
        jobs[0].send_data(b"late")
    Job(b"w", "f", "H:x:1", "u").send_status(1, 2)  # a hand-made Job drops what it sends


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The ERROR packets the worker logged."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("gearmand error")]


def test_failures_reach_client_and_worker_keeps_serving(
    gearmand: Gearmand, caplog: pytest.LogCaptureFixture
) -> None:
    def fail_msg(job: Job) -> bytes:
        raise JobFailed(b"bad input\0x")

    def fail_plain(job: Job) -> bytes:
        raise JobFailed()

    def crash(job: Job) -> bytes:
        raise ZeroDivisionError("division by zero")

    functions = {"t.fmsg": fail_msg, "t.fplain": fail_plain, "t.crash": crash, "t.ok": echo}
    with RunningWorker([server_of(gearmand)], functions).start(registered=1) as rw:
        r = do(gearmand.address, "t.fmsg", b"x")
        assert r.state == "FAILED"
        assert list(r.warning_updates) == [b"bad input\0x"]
        r = do(gearmand.address, "t.fplain", b"x")
        assert r.state == "FAILED"
        assert list(r.warning_updates) == []
        r = do(gearmand.address, "t.crash", b"x")
        assert r.state == "FAILED"
        assert list(r.warning_updates) == [b"division by zero"]
        assert do(gearmand.address, "t.ok", b"still here").result == b"still here"
        # gearmand accepted every result packet: no ERROR came back
        assert server_errors(caplog) == []
        assert (rw.worker.jobs_failed, rw.worker.jobs_completed) == (3, 1)
        assert rw.worker.confirmed_servers == 1


@pytest.mark.skipif(shutil.which("gearman") is None, reason="gearman-tools not installed")
def test_failures_with_c_client(gearmand: Gearmand, caplog: pytest.LogCaptureFixture) -> None:
    def fail_msg(job: Job) -> bytes:
        raise JobFailed(b"no such image")

    def fail_plain(job: Job) -> bytes:
        raise JobFailed()

    functions = {"t.c.fmsg": fail_msg, "t.c.fplain": fail_plain, "t.c.echo": echo}
    with RunningWorker([server_of(gearmand)], functions).start(registered=1):

        def run(fn: str) -> subprocess.CompletedProcess[bytes]:
            cmd = ["gearman", "-h", HOST, "-p", str(gearmand.port), "-f", fn, "payload"]
            return subprocess.run(cmd, capture_output=True, timeout=10, stdin=subprocess.DEVNULL)

        p = run("t.c.echo")
        assert (p.returncode, p.stdout) == (0, b"payload")
        p = run("t.c.fmsg")
        assert p.returncode != 0
        assert b"no such image" in p.stderr and b"Job failed" in p.stderr
        p = run("t.c.fplain")
        assert p.returncode != 0 and b"Job failed" in p.stderr
        assert server_errors(caplog) == []


def test_gearmand_work_exception_facts(fresh_gearmand: Gearmand) -> None:
    """Why the worker never sends WORK_EXCEPTION to gearmand 1.1.20 (see the module doc)."""
    port = fresh_gearmand.port
    worker, plain, opted = RawPeer(port), RawPeer(port), RawPeer(port)
    try:
        worker.send(req(P.CAN_DO, b"t.x"), req(P.ECHO_REQ, b"e"))
        assert worker.read() == [(P.ECHO_RES, b"e")]
        opted.send(req(P.OPTION_REQ, b"exceptions"))
        assert opted.read() == [(P.OPTION_RES, b"exceptions")]
        opted.send(req(P.SUBMIT_JOB, b"t.x", b"", b"1"))
        ((_, h1),) = opted.read()
        plain.send(req(P.SUBMIT_JOB, b"t.x", b"", b"2"))
        ((_, h2),) = plain.read()

        # WORK_EXCEPTION is final: a WORK_FAIL after it is rejected with ERROR
        worker.send(req(P.GRAB_JOB_UNIQ))
        assert worker.read()[0][1].split(b"\0")[0] == h1
        worker.send(req(P.WORK_EXCEPTION, h1, b"boom"), req(P.WORK_FAIL, h1))
        ptype, body = worker.read()[0]
        assert ptype == P.ERROR and body.startswith(b"JOB_NOT_FOUND\0")
        assert opted.read() == [(P.WORK_EXCEPTION, h1 + b"\0boom")]
        assert opted.read(timeout=0.3) == []  # and no WORK_FAIL follows

        # a client without the exceptions option gets WORK_FAIL with a garbled handle
        worker.send(req(P.GRAB_JOB_UNIQ))
        assert worker.read()[0][1].split(b"\0")[0] == h2
        worker.send(req(P.WORK_EXCEPTION, h2, b"boom"))
        assert plain.read() == [(P.WORK_FAIL, h2 + b"\0")]

        # WORK_WARNING + WORK_FAIL reach both kinds of client unchanged
        opted.send(req(P.SUBMIT_JOB, b"t.x", b"", b"3"))
        ((_, h3),) = opted.read()
        worker.send(req(P.GRAB_JOB_UNIQ))
        assert worker.read()[0][1].split(b"\0")[0] == h3
        worker.send(req(P.WORK_WARNING, h3, b"why"), req(P.WORK_FAIL, h3))
        assert opted.read(2) == [(P.WORK_WARNING, h3 + b"\0why"), (P.WORK_FAIL, h3)]
        assert worker.read(timeout=0.3) == []
    finally:
        for peer in (worker, plain, opted):
            peer.close()


def test_gearmand_pre_sleep_facts(fresh_gearmand: Gearmand) -> None:
    """PRE_SLEEP right after NO_JOB loses no wake-up; ECHO_REQ does not cancel the sleep."""
    worker, client = RawPeer(fresh_gearmand.port), RawPeer(fresh_gearmand.port)
    try:
        worker.send(req(P.CAN_DO, b"t.sleep"), req(P.GRAB_JOB_UNIQ))
        assert worker.read() == [(P.NO_JOB, b"")]
        # a job arriving between NO_JOB and PRE_SLEEP: gearmand answers PRE_SLEEP with NOOP
        client.send(req(P.SUBMIT_JOB, b"t.sleep", b"", b"1"))
        assert client.read()[0][0] == P.JOB_CREATED
        worker.send(req(P.PRE_SLEEP))
        assert worker.read() == [(P.NOOP, b"")]
        worker.send(req(P.GRAB_JOB_UNIQ))
        ((ptype, body),) = worker.read()
        assert ptype == P.JOB_ASSIGN_UNIQ
        worker.send(req(P.WORK_COMPLETE, body.split(b"\0")[0], b"r"))
        assert client.read()[0][0] == P.WORK_COMPLETE
        # asleep, pinged, then a job arrives: the NOOP still comes
        worker.send(req(P.GRAB_JOB_UNIQ))
        assert worker.read() == [(P.NO_JOB, b"")]
        worker.send(req(P.PRE_SLEEP), req(P.ECHO_REQ, b"ping"))
        assert worker.read() == [(P.ECHO_RES, b"ping")]
        client.send(req(P.SUBMIT_JOB, b"t.sleep", b"", b"2"))
        assert worker.read() == [(P.NOOP, b"")]
    finally:
        worker.close()
        client.close()


def test_exceptions_option_client_sees_warning_and_fail(gearmand: Gearmand) -> None:
    def fail(job: Job) -> bytes:
        raise JobFailed(b"nope")

    with RunningWorker([server_of(gearmand)], {"t.opt": fail}).start(registered=1):
        client = RawPeer(gearmand.port)
        try:
            client.send(req(P.OPTION_REQ, b"exceptions"), req(P.SUBMIT_JOB, b"t.opt", b"", b"x"))
            (_, (_, handle)) = client.read(2)
            assert client.read(2) == [(P.WORK_WARNING, handle + b"\0nope"), (P.WORK_FAIL, handle)]
        finally:
            client.close()


def test_status_data_and_warning_reach_client(gearmand: Gearmand) -> None:
    def progress(job: Job) -> bytes:
        job.send_status(1, 3)
        job.send_data(b"part\0one")
        job.send_data("zwei")
        job.send_warning("careful")
        job.send_status(3, 3)
        return b"done"

    with RunningWorker([server_of(gearmand)], {"t.progress": progress}).start(registered=1):
        r = do(gearmand.address, "t.progress", b"x")
        assert r.state == "COMPLETE" and r.result == b"done"
        assert list(r.data_updates) == [b"part\0one", b"zwei"]
        assert list(r.warning_updates) == [b"careful"]
        assert (r.status["numerator"], r.status["denominator"]) == (3, 3)


# --------------------------------------------------------------------------- volume


def test_2000_background_jobs_exactly_once_in_forked_worker(fresh_gearmand: Gearmand) -> None:
    total = 2000
    workloads = [b"job-%d" % i for i in range(total)]
    submit_background(fresh_gearmand.address, "t.count", list(workloads))
    assert fresh_gearmand.status()["t.count"][0] == total
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(read_fd)
            seen: Counter[bytes] = Counter()

            def count(job: Job) -> bytes:
                seen[job.workload] += 1
                return b""

            worker = GearmanWorker([server_of(fresh_gearmand)], {"t.count": count})
            started = time.monotonic()
            worker.work(lambda: sum(seen.values()) >= total or time.monotonic() - started > 20)
            report = {"distinct": len(seen), "max": max(seen.values(), default=0)}
            os.write(write_fd, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, timeout=30)
        pid = 0
        report = json.loads(os.read(read_fd, 4096))
    finally:
        os.close(read_fd)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert report == {"distinct": total, "max": 1}
    wait_for(lambda: fresh_gearmand.status()["t.count"] == (0, 0, 0), timeout=5)


def test_stops_after_job_without_taking_more(fresh_gearmand: Gearmand) -> None:
    done: list[bytes] = []

    def handler(job: Job) -> bytes:
        done.append(job.workload)
        return b""

    submit_background(fresh_gearmand.address, "t.few", [b"%d" % i for i in range(10)])
    worker = GearmanWorker([server_of(fresh_gearmand)], {"t.few": handler})
    worker.work(lambda: len(done) >= 3)
    assert len(done) == 3
    # gearmand may see the disconnect a moment after the admin query
    wait_for(lambda: fresh_gearmand.status()["t.few"] == (7, 0, 0), timeout=5)


# --------------------------------------------------------------------------- servers


def test_two_servers_served_by_one_worker() -> None:
    a, b = Gearmand().start(), Gearmand().start()
    try:
        with RunningWorker([server_of(a), server_of(b)], {"t.two": echo}).start() as rw:
            rw.wait_registered(2)
            assert sorted(rw.registrations) == [1, 2]
            for g in (a, b, a, b):
                assert do(g.address, "t.two", g.address).result == g.address.encode()
    finally:
        a.stop()
        b.stop()


def test_one_server_down_at_start() -> None:
    live = Gearmand().start()
    try:
        servers = [(HOST, free_port()), server_of(live)]
        with RunningWorker(servers, {"t.half": echo}).start(registered=1) as rw:
            assert do(live.address, "t.half", b"ok").result == b"ok"
            time.sleep(0.3)
            assert rw.worker.confirmed_servers == 1
    finally:
        live.stop()


def test_hanging_connect_does_not_block_other_server(gearmand: Gearmand) -> None:
    with socket.socket() as jammed:
        jammed.bind((HOST, 0))
        jammed.listen(0)
        fillers = []
        try:
            for _ in range(3):  # fill the accept queue: later SYNs go unanswered
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(jammed.getsockname())
                fillers.append(filler)
            servers = [jammed.getsockname(), server_of(gearmand)]
            rw = RunningWorker(servers, {"t.jam": echo}, connect_timeout=0.2)
            with rw.start(registered=1):
                t0 = time.monotonic()
                assert do(gearmand.address, "t.jam", b"through").result == b"through"
                assert time.monotonic() - t0 < 2.0
                time.sleep(0.5)  # a few connect timeouts and retries on the jammed one
                assert rw.worker.confirmed_servers == 1
        finally:
            for filler in fillers:
                filler.close()


def test_gearmand_restart_on_same_port(fresh_gearmand: Gearmand) -> None:
    port = fresh_gearmand.port
    with RunningWorker([(HOST, port)], {"t.restart": echo}).start(registered=1) as rw:
        assert do(fresh_gearmand.address, "t.restart", b"1").result == b"1"
        fresh_gearmand.kill()
        rw.wait_registered(0)
        time.sleep(0.6)  # a few failed reconnects: the backoff reaches its maximum
        fresh_gearmand.port = port
        fresh_gearmand.start()
        started = time.monotonic()
        rw.wait_registered(1, timeout=5)
        assert time.monotonic() - started < 3
        assert do(fresh_gearmand.address, "t.restart", b"2").result == b"2"
        assert rw.registrations == [1, 0, 1]


def test_sleeping_worker_is_woken_after_idle_pings(gearmand: Gearmand) -> None:
    rw = RunningWorker([server_of(gearmand)], {"t.ping": echo})
    rw.worker.ping_interval = 0.1
    with rw.start(registered=1):
        time.sleep(0.6)  # several ECHO_REQ round trips while sleeping
        assert do(gearmand.address, "t.ping", b"awake").result == b"awake"
        assert rw.registrations == [1]


# --------------------------------------------------------------------------- other servers


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_perl_gearman_server_falls_back_to_grab_job(caplog: pytest.LogCaptureFixture) -> None:
    """Perl's Gearman::Server refuses GRAB_JOB_UNIQ and has no WORK_DATA or WORK_WARNING:
    jobs are grabbed with GRAB_JOB (logged once), data and warnings are not sent (no ERROR
    comes back), and a failure's message reaches exception listeners before WORK_FAIL."""

    def progress(job: Job) -> bytes:
        job.send_status(1, 2)
        job.send_data(b"part")
        job.send_warning(b"careful")
        return b"done " + job.workload

    def fail(job: Job) -> bytes:
        raise JobFailed(b"nope")

    perl = PerlGearmand().start()
    client = None
    try:
        functions = {"t.perl.progress": progress, "t.perl.fail": fail}
        with RunningWorker([(HOST, perl.port)], functions).start(registered=1) as rw:
            client = RawPeer(perl.port)
            for i in range(3):
                client.send(req(P.SUBMIT_JOB, b"t.perl.progress", b"", b"%d" % i))
                ((_, handle),) = client.read()
                assert client.read(2) == [
                    (P.WORK_STATUS, handle + b"\0" + b"1\0" + b"2"),
                    (P.WORK_COMPLETE, handle + b"\0done %d" % i),
                ]
            client.send(req(P.OPTION_REQ, b"exceptions"))
            assert client.read() == [(P.OPTION_RES, b"exceptions")]
            client.send(req(P.SUBMIT_JOB, b"t.perl.fail", b"", b"x"))
            ((_, handle),) = client.read()
            assert client.read(2) == [(P.WORK_EXCEPTION, handle + b"\0nope"), (P.WORK_FAIL, handle)]
            assert client.read(timeout=0.3) == []
            assert rw.registrations == [1] and rw.refusals == []
            assert (rw.worker.jobs_completed, rw.worker.jobs_failed) == (3, 1)
        assert len(logged(caplog, "refuses GRAB_JOB_UNIQ")) == 1
        assert server_errors(caplog) == []
    finally:
        if client is not None:
            client.close()
        perl.stop()


def test_geard_registers_without_echo_and_keeps_idle_connections() -> None:
    """gear's geard answers no ECHO_REQ: the answer to a grab confirms the registration, and
    idle checks (grabs) keep the connection instead of dropping it for a missing reply."""
    geard = Geard().start()
    try:
        rw = RunningWorker([(HOST, geard.port)], {"t.geard": echo})
        rw.worker.ping_interval = 0.2
        rw.worker.reply_timeout = 0.5
        with rw.start(registered=1):
            time.sleep(1.5)  # several idle checks, each well past reply_timeout
            assert rw.registrations == [1]
            assert do(geard.address, "t.geard", b"still").result == b"still"
            assert rw.registrations == [1]
    finally:
        geard.stop()


class RefusingServer:
    """A server that refuses every grab with ERROR and keeps the connection: counts grabs."""

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.grabs: list[int] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conns: list[socket.socket] = []
        bufs: dict[socket.socket, bytes] = {}
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        try:
            while self.running:
                for key, _ in sel.select(0.05):
                    if key.fileobj is self.listener:
                        conn, _ = self.listener.accept()
                        self.connections += 1
                        conns.append(conn)
                        bufs[conn] = b""
                        sel.register(conn, selectors.EVENT_READ)
                        continue
                    conn = key.fileobj  # type: ignore[assignment]
                    chunk = conn.recv(65536)
                    if not chunk:
                        sel.unregister(conn)
                        continue
                    buf = bufs[conn] + chunk
                    while len(buf) >= 12:
                        _, ptype, size = HEADER.unpack_from(buf)
                        if len(buf) < 12 + size:
                            break
                        buf = buf[12 + size :]
                        if ptype in (P.GRAB_JOB, P.GRAB_JOB_UNIQ):
                            self.grabs.append(ptype)
                            conn.sendall(res(P.ERROR, b"refused", b"no grabs here"))
                    bufs[conn] = buf
        finally:
            sel.close()
            for conn in conns:
                conn.close()

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)
        self.listener.close()


def test_refused_grabs_are_reported_and_retried_without_reconnecting(
    gearmand: Gearmand, caplog: pytest.LogCaptureFixture
) -> None:
    refusing = RefusingServer()
    try:
        rw = RunningWorker([(HOST, refusing.port), server_of(gearmand)], {"t.refused": echo})
        rw.worker.ping_interval = 0.3
        rw.worker.reply_timeout = 0.3
        with rw.start(registered=1):
            wait_for(lambda: rw.refusals == [1])
            assert do(gearmand.address, "t.refused", b"served").result == b"served"
            wait_for(lambda: len(refusing.grabs) >= 6)  # tried again, both kinds each time
            assert refusing.grabs[:2] == [P.GRAB_JOB_UNIQ, P.GRAB_JOB]
            assert refusing.connections == 1
            assert rw.refusals == [1] and rw.registrations == [1]
        assert len(logged(caplog, "refuses grabs")) == 1
    finally:
        refusing.stop()


def test_a_gdriver_whose_only_gearmand_refuses_grabs_is_alive_but_not_ready() -> None:
    refusing = RefusingServer()
    g = Gdriver(f"{HOST}:{refusing.port}", "--namespaces", "live.basic", metrics=True)
    try:
        g.start()
        job = "basic.echo"

        def readyz() -> tuple[int, str]:
            url = f"http://{HOST}:{g.metrics_port}/readyz"
            try:
                with urllib.request.urlopen(url, timeout=3) as r:
                    return int(r.status), r.read().decode()
            except urllib.error.HTTPError as exc:
                return int(exc.code), exc.read().decode()

        wait_for(lambda: len(refusing.grabs) >= 2, timeout=20)
        deadline = time.monotonic() + 3  # it stays so: no grab is ever answered
        while time.monotonic() < deadline:
            status, body = readyz()
            assert status == 503 and body.startswith("gearmand refuses grabs of:"), body
            assert job in body, body
            assert http_status(g.metrics_port, "/healthz") == 200
            time.sleep(0.2)
        assert refusing.connections >= 1
    finally:
        g.stop()
        refusing.stop()


def submit_raw(port: int, function: bytes, workload: bytes) -> RawPeer:
    peer = RawPeer(port)
    peer.send(req(P.SUBMIT_JOB, function, b"", workload))
    return peer


def test_a_job_over_the_packet_limit_fails_and_the_connection_stays(gearmand: Gearmand) -> None:
    """70 MiB through gearmand: the worker discards it as it arrives and fails the job with
    both sizes, keeps its connection and serves the next job."""
    ran: list[int] = []
    rejected: list[tuple[str, str, str]] = []

    def handler(job: Job) -> bytes:
        ran.append(len(job.workload))
        return b"ok"

    rw = RunningWorker([server_of(gearmand)], {"t.huge": handler})
    rw.worker.on_rejected = lambda *args: rejected.append(args)
    with rw.start(registered=1):
        client = submit_raw(gearmand.port, b"t.huge", b"\xab" * (70 << 20))
        try:
            ((ptype, handle),) = client.read(timeout=30)
            assert ptype == P.JOB_CREATED
            (warning, fail) = client.read(2, timeout=30)
            assert fail == (P.WORK_FAIL, handle)
            message = warning[1].split(b"\0", 1)[1].decode()
            size = len(handle) + len(b"t.huge") + (70 << 20) + 3
            assert warning[0] == P.WORK_WARNING
            assert f"{size} bytes" in message and f"({MAX_PACKET_SIZE} bytes)" in message
        finally:
            client.close()
        assert do(gearmand.address, "t.huge", b"small").result == b"ok"
        assert ran == [5]
        assert rw.registrations == [1]
        assert rejected == [("t.huge", handle.decode(), message)]
        assert (rw.worker.jobs_failed, rw.worker.jobs_completed) == (1, 1)


def test_packet_limit_and_send_exceptions_are_settings(fresh_gearmand: Gearmand) -> None:
    """A smaller limit applies to every job packet; send_exceptions sends the failure as one
    WORK_EXCEPTION (final on gearmand), to a client that asked for exceptions."""

    def fail(job: Job) -> bytes:
        raise JobFailed(b"nope")

    protocol = Protocol(send_exceptions=True, max_packet_size=1 << 20)
    functions = {"t.limit": echo, "t.exc": fail}
    with RunningWorker([server_of(fresh_gearmand)], functions, protocol=protocol).start(1) as rw:
        client = RawPeer(fresh_gearmand.port)
        try:
            client.send(req(P.OPTION_REQ, b"exceptions"))
            assert client.read() == [(P.OPTION_RES, b"exceptions")]
            for payload in (b"x" * (1 << 20), b"y" * 1000):  # over the limit, then under it
                client.send(req(P.SUBMIT_JOB, b"t.limit", b"", payload))
                ((_, handle),) = client.read()
                ((ptype, body),) = client.read()
                if len(payload) > 1000:
                    assert ptype == P.WORK_EXCEPTION and b"(1048576 bytes)" in body
                else:
                    assert (ptype, body) == (P.WORK_COMPLETE, handle + b"\0" + payload)
            client.send(req(P.SUBMIT_JOB, b"t.exc", b"", b"x"))
            ((_, handle),) = client.read()
            assert client.read() == [(P.WORK_EXCEPTION, handle + b"\0nope")]
            assert client.read(timeout=0.3) == []
            assert rw.registrations == [1]
        finally:
            client.close()


# --------------------------------------------------------------------------- stopping


def test_graceful_stop_while_job_runs(gearmand: Gearmand) -> None:
    started = threading.Event()

    def slow(job: Job) -> bytes:
        started.set()
        time.sleep(0.5)
        return b"finished " + job.workload

    rw = RunningWorker([server_of(gearmand)], {"t.slow": slow})
    rw.worker.poll_interval = 30.0  # only the job end and the wake pipe may notice the stop
    rw.start(registered=1)
    result: list[Any] = []
    client = threading.Thread(target=lambda: result.append(do(gearmand.address, "t.slow", b"x")))
    client.start()
    try:
        assert started.wait(5)
        rw.stop_flag.set()
        rw.thread.join(3)
        assert not rw.thread.is_alive()
        client.join(10)
        assert result and result[0].state == "COMPLETE"
        assert result[0].result == b"finished x"
        wait_for(lambda: gearmand.workers_for("t.slow") == 0, timeout=5)
    finally:
        rw.stop()
        client.join(10)


def test_wake_fd_stops_idle_worker_promptly(gearmand: Gearmand) -> None:
    rw = RunningWorker([server_of(gearmand)], {"t.idle": echo})
    rw.worker.poll_interval = 30.0
    rw.start(registered=1)
    time.sleep(0.2)  # asleep after PRE_SLEEP
    rw.stop_flag.set()
    os.write(rw.wake_w, b"!")
    t0 = time.monotonic()
    rw.thread.join(5)
    assert time.monotonic() - t0 < 1.0
    rw.stop()


def test_wake_fd_without_stop_keeps_serving(gearmand: Gearmand) -> None:
    woken: list[int] = []
    worker = GearmanWorker([server_of(gearmand)], {"t.wake": echo})
    r, w = os.pipe()
    stop = threading.Event()

    def on_wake(fd: int) -> None:
        woken.append(fd)
        os.read(fd, 100)

    thread = threading.Thread(target=worker.work, args=(stop.is_set, [r], on_wake), daemon=True)
    thread.start()
    try:
        wait_for(lambda: worker.confirmed_servers == 1)
        os.write(w, b"1")
        wait_for(lambda: woken == [r])
        assert do(gearmand.address, "t.wake", b"on").result == b"on"
    finally:
        stop.set()
        os.write(w, b"2")
        thread.join(5)
        os.close(r)
        os.close(w)
    assert not thread.is_alive()


def read_packets_until(
    conn: socket.socket, wanted: int, timeout: float = 5.0
) -> list[tuple[int, bytes]]:
    """Read request packets from a worker until one of type `wanted` (or EOF/timeout)."""
    packets: list[tuple[int, bytes]] = []
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while len(buf) >= 12:
            _, ptype, size = HEADER.unpack_from(buf)
            if len(buf) < 12 + size:
                break
            packets.append((ptype, buf[12 : 12 + size]))
            buf = buf[12 + size :]
            if ptype == wanted:
                return packets
        conn.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            packets.append((-1, b"EOF"))
            break
        buf += chunk
    return packets


def test_stop_with_grab_outstanding_runs_the_assigned_job() -> None:
    """A grab already sent when the stop comes is answered and its job is run, not dropped."""
    grab_sent = threading.Event()
    release = threading.Event()
    seen: list[list[tuple[int, bytes]]] = []
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(1)

        def peer() -> None:
            conn, _ = listener.accept()
            with conn:
                hello = read_packets_until(conn, P.GRAB_JOB_UNIQ)
                seen.append(hello)
                grab_sent.set()
                release.wait(5)
                conn.sendall(res(P.JOB_ASSIGN_UNIQ, b"H:fake:1", b"t.late", b"u1", b"payload"))
                seen.append(read_packets_until(conn, -2, timeout=3))  # everything until EOF

        thread = threading.Thread(target=peer, daemon=True)
        thread.start()
        ran: list[bytes] = []

        def handler(job: Job) -> bytes:
            ran.append(job.workload)
            return b"result"

        rw = RunningWorker([listener.getsockname()], {"t.late": handler})
        rw.worker.poll_interval = 30.0
        rw.start()
        try:
            assert grab_sent.wait(5)
            rw.stop_flag.set()
            os.write(rw.wake_w, b"!")  # the worker notices the stop with its grab outstanding
            time.sleep(0.2)
            assert rw.thread.is_alive(), "returned with a grab outstanding"
            release.set()
            rw.thread.join(5)
            assert not rw.thread.is_alive()
        finally:
            release.set()
            rw.stop()
            thread.join(5)
    assert ran == [b"payload"]
    assert [p for p, _ in seen[0]] == [P.CAN_DO, P.GRAB_JOB_UNIQ]
    assert seen[1] == [(P.WORK_COMPLETE, b"H:fake:1\0result"), (-1, b"EOF")]  # and no new grab


# --------------------------------------------------------------------------- hostile peers


class FakeServer:
    """A deliberately broken gearmand: answers every connection with `reply`."""

    def __init__(self, reply: bytes, close_after: bool = True) -> None:
        self.reply = reply
        self.close_after = close_after
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(32)
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.open: list[socket.socket] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(1)
            with contextlib.suppress(OSError):
                conn.recv(65536)  # the worker's hello
                conn.sendall(self.reply)
            if self.close_after:
                conn.close()
            else:
                self.open.append(conn)

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)
        self.listener.close()
        for conn in self.open:
            conn.close()


@contextlib.contextmanager
def fake_servers(*specs: tuple[bytes, bool]) -> Iterator[list[FakeServer]]:
    fakes = [FakeServer(reply, close_after) for reply, close_after in specs]
    try:
        yield fakes
    finally:
        for fake in fakes:
            fake.stop()


def test_hostile_servers_do_not_crash_the_worker(gearmand: Gearmand) -> None:
    specs = [
        (b"XXXX" + struct.pack(">II", P.ECHO_RES, 0), False),  # bad magic
        (HEADER.pack(b"\0RES", P.JOB_ASSIGN_UNIQ, 100 << 20), False),  # absurd size
        (res(99), False),  # unknown type
        (HEADER.pack(b"\0RES", P.JOB_ASSIGN_UNIQ, 100) + b"H:1\0", True),  # truncated, EOF
        (HEADER.pack(b"\0RES", P.JOB_ASSIGN_UNIQ, 100) + b"H:1\0", False),  # truncated, silent
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", True),  # not gearman at all
        (res(P.JOB_ASSIGN_UNIQ, b"H:1", b"t.hostile"), False),  # too few fields
        (res(P.ECHO_RES, b"gdriver") + res(P.NOOP), False),  # replies to nothing
    ]
    with fake_servers(*specs) as fakes:
        servers = [(HOST, f.port) for f in fakes] + [server_of(gearmand)]
        rw = RunningWorker(servers, {"t.hostile": echo}, reconnect_max=0.2)
        rw.worker.reply_timeout = 0.3
        rw.worker.stop_grace = 0.5
        with rw.start(registered=1):
            wait_for(lambda: all(f.connections >= 2 for f in fakes), timeout=5)
            assert do(gearmand.address, "t.hostile", b"fine").result == b"fine"
            assert rw.thread.is_alive()
            assert rw.worker.confirmed_servers == 1
            assert rw.registrations == [1]


def test_server_error_packet_is_logged_not_fatal(
    gearmand: Gearmand, caplog: pytest.LogCaptureFixture
) -> None:
    reply = res(P.NO_JOB) + res(P.ERROR, b"ERR_CODE", b"something odd")
    with fake_servers((reply, False)) as (fake,):
        rw = RunningWorker([(HOST, fake.port)], {"t.err": echo})
        rw.worker.stop_grace = 0.3  # the fake never answers the grab
        with rw.start(registered=1):
            errors = server_errors(caplog)
            assert len(errors) == 1 and errors[0].endswith(": ERR_CODE: something odd"), errors
            time.sleep(0.2)
            assert fake.connections == 1


def test_registration_lost_when_server_turns_hostile() -> None:
    # confirms the registration, then sends garbage: up, down, up, down ...
    reply = res(P.NO_JOB) + b"garbage-garbage-garbage"
    with fake_servers((reply, False)) as (fake,):
        rw = RunningWorker([(HOST, fake.port)], {"t.flaky": echo}, reconnect_max=0.1)
        with rw.start():
            wait_for(lambda: len(rw.registrations) >= 4, timeout=5)
            assert rw.registrations[:4] == [1, 0, 1, 0]


# --------------------------------------------------------------------------- admin protocol


def drive(request: AdminRequest, limit: float = 5.0) -> AdminRequest:
    """A small selectors loop like the supervisor's."""
    sel = selectors.DefaultSelector()
    try:
        try:
            request.start()
        except OSError:
            assert request.done and request.error
            return request
        sel.register(request, request.wanted_events())
        deadline = time.monotonic() + limit
        while not request.done and time.monotonic() < deadline:
            for _, mask in sel.select(0.05):
                request.on_event(mask)
                if not request.done:
                    sel.modify(request, request.wanted_events())
            request.check_timeout(time.monotonic())
        sel.unregister(request)
        return request
    finally:
        sel.close()
        request.close()


def test_admin_request_status(fresh_gearmand: Gearmand) -> None:
    gearmand = fresh_gearmand
    submit_background(gearmand.address, "t.admin.queued", [b"1", b"2"])
    with RunningWorker([server_of(gearmand)], {"t.admin.fn": echo}).start(registered=1):
        request = drive(AdminRequest(server_of(gearmand), "status", 2.0))
    assert request.done and request.error is None
    status = parse_status(request.lines)
    assert status["t.admin.fn"].workers == 1
    assert status["t.admin.queued"] == FunctionStatus(2, 0, 0)
    assert status["t.admin.queued"].waiting == 2
    assert "." not in request.lines

    version = drive(AdminRequest(server_of(gearmand), "version", 2.0))
    assert version.error is None and len(version.lines) == 1
    assert version.lines[0].startswith("OK 1.1")

    rejected = drive(AdminRequest(server_of(gearmand), "bogus", 2.0))
    assert (rejected.error or "").startswith("server error: ERR ")


def test_admin_request_connection_refused() -> None:
    t0 = time.monotonic()
    request = drive(AdminRequest((HOST, free_port()), "status", 5.0))
    assert request.done and request.error == "connection refused"
    assert time.monotonic() - t0 < 1.0
    assert request.lines == []


def test_admin_request_timeout_on_silent_listener() -> None:
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever answers
        t0 = time.monotonic()
        request = drive(AdminRequest(silent.getsockname(), "status", 0.3))
        assert request.done and request.error == "timeout"
        assert 0.25 <= time.monotonic() - t0 < 2.0


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"fn\t1\t0\0\t1\n.\n", "malformed reply"),
        (b"fn\t1\t0\t1\n", "connection closed before the end of the reply"),
        (b"x" * (17 << 20), "reply larger than 16777216 bytes"),
    ],
)
def test_admin_request_bad_replies(reply: bytes, error: str) -> None:
    with fake_servers((reply, True)) as (fake,):
        request = drive(AdminRequest((HOST, fake.port), "status", 5.0))
    assert request.error == error


def test_admin_request_lists_workers_and_takes_one_line(gearmand: Gearmand) -> None:
    with RunningWorker([server_of(gearmand)], {"t.admin": echo}, client_id="adm").start(1):
        workers = drive(AdminRequest(server_of(gearmand), "workers", 2.0))
        assert workers.error is None
        assert any(line.endswith("adm : t.admin") for line in workers.lines)
    with pytest.raises(ValueError):
        AdminRequest(server_of(gearmand), "status\nshutdown", 2.0)


def test_parse_status_skips_malformed_lines() -> None:
    lines = [
        "good\t5\t2\t3",
        "idle\t0\t0\t1",
        "over\t1\t4\t4",
        "too\tfew\t1",
        "bad\tx\t1\t1",
        "neg\t-1\t0\t1",
        "\t1\t1\t1",
        "",
        "extra\t1\t1\t1\t1",
        "uni\t\uff11\t0\t0",
    ]
    status = parse_status(lines)
    assert status == {
        "good": FunctionStatus(5, 2, 3),
        "idle": FunctionStatus(0, 0, 1),
        "over": FunctionStatus(1, 4, 4),
    }
    assert status["good"].waiting == 3
    assert status["over"].waiting == 0
    with pytest.raises(AttributeError):
        status["good"].total = 1  # type: ignore[misc]


def test_a_job_after_a_silence_still_lets_the_worker_say_it_is_idle() -> None:
    # A grab answered only after STALLED seconds: meanwhile the worker counted as idle (on_idle
    # was told) and its timers were put off until the poll interval. The job that then came
    # must bring them back: after it, on_idle comes about STALLED later, not at the poll
    # interval (in gdriver the process's last report and its idle message waited 4.5 s).
    listener = socket.create_server((HOST, 0))
    answered: list[float] = []
    idle: list[float] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            buf, grabs = b"", 0
            while chunk := conn.recv(65536):
                buf += chunk
                while len(buf) >= 12 and len(buf) >= 12 + HEADER.unpack_from(buf)[2]:
                    _, ptype, size = HEADER.unpack_from(buf)
                    buf = buf[12 + size :]
                    if ptype == P.GRAB_JOB_UNIQ:
                        grabs += 1
                        if grabs <= 2:  # the first at once, the second after 1.5 s
                            time.sleep(1.5 if grabs == 2 else 0.0)
                            conn.sendall(res(P.JOB_ASSIGN_UNIQ, b"H:%d" % grabs, b"f", b"", b"w"))
                        # the third grab is never answered

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    worker = GearmanWorker([(HOST, listener.getsockname()[1])], {"f": lambda job: b"ok"})
    worker.poll_interval = 5.0  # as in a gdriver worker process
    worker.on_answered = lambda sent: answered.append(time.monotonic())

    def on_idle() -> None:
        idle.append(time.monotonic())

    try:
        deadline = time.monotonic() + 6.0
        worker.work(lambda: len(answered) == 2 and time.monotonic() > deadline, on_idle=on_idle)
    finally:
        listener.close()
        server.join(5)
    assert len(answered) == 2
    after = [t - answered[1] for t in idle if t > answered[1]]
    assert after and after[0] <= 2.5, after  # STALLED (1 s) after the job, not 4.5 s


def test_a_job_keeps_the_handle_and_unique_it_was_given() -> None:
    # a job from gearmand decodes its raw handle and unique when asked; a hand-made one keeps
    # what it was given, and both can be set without touching what is sent to gearmand
    job = Job(b"w", "f", "shown", "u", None, b"raw", b"r")
    assert (job.handle, job.unique, job._handle, job._unique) == ("shown", "u", b"raw", b"r")
    job.handle, job.unique = "set", "other"
    assert (job.handle, job.unique, job._handle, job._unique) == ("set", "other", b"raw", b"r")
    seen: list[tuple[str, str]] = []
    worker = GearmanWorker([(HOST, 1)], {"f": lambda job: seen.append((job.handle, job.unique))})
    worker._run_job(worker._conns[0], b"H:\xff", b"f", b"u\xfe", b"w")  # not connected: no send
    assert seen == [("H:\udcff", "u\udcfe")]  # bytes that are not UTF-8 as surrogate escapes
