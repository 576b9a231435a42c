"""The management console over real TCP: byte-compatible replies (Perl's t/040, t/041 and the
verified raw-bytes table), the port's changes (whitelist, help, version, immediate limits,
plugins) and its hardening (line length, connections, idle timeout, bounded output, any
bytes)."""

from __future__ import annotations

import datetime
import http.client
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support import (
    HOST,
    Gdriver,
    Gearmand,
    console_raw,
    do,
    pid_alive,
    port_open,
    running,
    wait_for,
)
from test_reliability import metric

PING = "obs.console.Console.ping"
PONG = "obs.console.Console.pong"
NEVER = "1970-01-01T00:00:00"

P = "obs.probe.Probe."
P_FAIL, P_GRP, P_PING, P_SLOW = P + "fail", P + "grp", P + "ping", P + "slow"


class Session:
    """One console connection kept open across commands (as Net::Telnet in t/040)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.buf = b""

    def raw(self, data: bytes) -> bytes:
        """Send bytes, return the reply bytes up to and including its '.' line."""
        self.sock.sendall(data)
        while True:
            end = self.buf.find(b".\r\n")
            while end >= 0 and end != 0 and self.buf[end - 2 : end] != b"\r\n":
                end = self.buf.find(b".\r\n", end + 1)
            if end >= 0:
                reply, self.buf = self.buf[: end + 3], self.buf[end + 3 :]
                return reply
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; got {self.buf!r}")
            self.buf += chunk

    def cmd(self, line: str) -> list[str]:
        reply = self.raw(line.encode() + b"\n").decode()
        assert reply.endswith(".\r\n"), reply
        return reply.split("\r\n")[:-2]

    def eof(self, timeout: float = 5.0) -> bytes:
        """Read until the server closes; return what came before."""
        self.sock.settimeout(timeout)
        data = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return self.buf + data
            data += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def line(name: str, low: int, high: int, count: int, width: int = 0) -> str:
    """A status line of a job that never ran (numbers of one digit)."""
    return f"{name:<{width}}  {low}  {high}  {count}  {NEVER}  {NEVER}  "


def show_pids(d: Gdriver, job: str) -> list[int]:
    return [int(x) for x in d.console(f"show {job}")[1:]]


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def pids_when(d: Gdriver, job: str, n: int) -> set[int] | None:
    pids = set(show_pids(d, job))
    return pids if len(pids) == n else None


def log_problems(d: Gdriver, since: int = 0) -> list[str]:
    """Supervisor records at ERROR or worse, or with a traceback, about the console."""
    return [
        str(r)
        for r in d.records()[since:]
        if r.get("logger", "").startswith("gdriver.console")
        and (r.get("level") in ("ERROR", "CRITICAL") or "exc_info" in r)
    ]


class PatchedGdriver(Gdriver):
    """A gdriver whose module constants are changed before it runs (the same CLI entry)."""

    def __init__(self, *args: Any, patch: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.patch = patch

    def command(self) -> list[str]:
        cmd = super().command()
        i = cmd.index("-m")
        code = f"{self.patch}\nimport sys\nfrom gdriver.cli import main\nmain(sys.argv[1:])"
        return [cmd[0], "-c", code, *cmd[i + 2 :]]


@pytest.fixture(scope="module")
def console_gd(gearmand: Gearmand) -> Iterator[Gdriver]:
    """One gdriver with the console worker (no processes: both jobs have min 0) for the tests
    that only read, and for the hardening tests."""
    with running(gearmand, "--namespaces", "obs.console", "--interval", "1") as d:
        yield d


# -- t/040 -------------------------------------------------------------------------------------


def test_t040_live_console(gearmand: Gearmand) -> None:
    with (
        running(gearmand, "--namespaces", "obs.console", "--interval", "1") as d,
        Session(d.console_port) as c,
    ):
        table = [
            ("asdf", ["ERR unknown_command: asdf"]),
            ("set_min_processes asdf 5", ["ERR invalid_job_name: asdf"]),
            (f"set_min_processes {PING} ten", ["ERR invalid_value: min_processes must be >= 0"]),
            (
                f"set_min_processes {PING} 10",
                ["ERR invalid_value: min_processes must be smaller than max_processes"],
            ),
            ("set_max_processes asdf 5", ["ERR invalid_job_name: asdf"]),
            (f"set_max_processes {PING} ten", ["ERR invalid_value: max_processes must be >= 0"]),
            (f"set_max_processes {PING} 5", ["OK"]),
            (f"set_min_processes {PING} 5", ["OK"]),
            (
                f"set_max_processes {PING} 4",
                ["ERR invalid_value: max_processes must be greater than min_processes"],
            ),
            ("set_processes asdf 1 1", ["ERR invalid_job_name: asdf"]),
            (f"set_processes {PING} ten ten", ["ERR invalid_value: min_processes must be >= 0"]),
            (f"set_processes {PING} 1 ten", ["ERR invalid_value: max_processes must be >= 0"]),
            (
                f"set_processes {PING} 5 1",
                ["ERR invalid_value: max_processes must be greater than min_processes"],
            ),
            ("kill 1", ["ERR invalid_value: the given PID(s) do not belong to us"]),
            (f"set_min_processes {PING} 0", ["OK"]),
            (f"set_max_processes {PING} 1", ["OK"]),
        ]
        for sent, expected in table:
            assert c.cmd(sent) == expected, sent
        width = len(PING)
        expected_status = [line(PING, 0, 1, 0, width), line(PONG, 0, 1, 0, width)]
        # min 5 took effect at once here (Perl waited for its monitor): the surplus goes away
        wait_for(lambda: c.cmd("status") == expected_status, timeout=20, interval=0.2)
        assert c.raw(b"status\n") == "".join(f"{x}\r\n" for x in expected_status).encode() + (
            b".\r\n"
        )

        assert c.cmd(f"set_max_processes {PING} 2") == ["OK"]
        assert c.cmd(f"set_min_processes {PING} 2") == ["OK"]
        shown = c.cmd(f"show {PING}")  # at once: no wait for a monitor or an interval
        assert shown[0] == f"{PING}  2  2  2  {NEVER}  {NEVER}  "
        assert len(shown) == 3 and all(re.fullmatch(r"\d+", p) for p in shown[1:]), shown
        first = {int(p) for p in shown[1:]}

        for pid in sorted(first):
            assert c.cmd(f"kill {pid}") == ["OK"]

        def two_new(old: set[int]) -> set[int] | None:
            out = c.cmd(f"show {PING}")
            pids = {int(p) for p in out[1:]}
            ok = len(pids) == 2 and not pids & old and out[0].startswith(f"{PING}  2  2  2  ")
            return pids if ok else None

        second = wait_for(lambda: two_new(first), timeout=15, interval=0.2)
        wait_for(lambda: not any(pid_alive(p) for p in first), timeout=10)

        assert c.cmd(f"killall {PING}") == ["OK"]
        third = wait_for(lambda: two_new(first | second), timeout=15, interval=0.2)
        wait_for(lambda: not any(pid_alive(p) for p in second), timeout=10)
        assert all(pid_alive(p) for p in third)

        assert c.cmd(f"set_min_processes {PING} 0") == ["OK"]
        assert c.cmd(f"set_max_processes {PING} 1") == ["OK"]
        wait_for(lambda: c.cmd("status") == expected_status, timeout=20, interval=0.2)
        # console kills are graceful: the processes exited by themselves, none was killed
        exits = [r for r in d.records() if r.get("event") == "process_exited"]
        assert {r["pid"] for r in exits} >= first | second
        assert all(r.get("reason") == "retired" and r.get("status") == 0 for r in exits), exits


# -- the raw bytes of the Perl spec's verified table -------------------------------------------


def probe_status_bytes(counts: dict[str, int]) -> bytes:
    rows = [(P_FAIL, 1, 1), (P_GRP, 2, 4), (P_PING, 0, 1), (P_SLOW, 0, 3)]
    width = max(len(r[0]) for r in rows)
    text = "".join(f"{line(n, lo, hi, counts[n], width)}\r\n" for n, lo, hi in rows)
    return text.encode() + b".\r\n"


def test_raw_bytes_table(gearmand: Gearmand) -> None:
    with running(gearmand, "--namespaces", "obs.probe", "--interval", "1") as d:
        port = d.console_port
        counts = {P_FAIL: 1, P_GRP: 2, P_PING: 0, P_SLOW: 0}
        status = probe_status_bytes(counts)
        assert console_raw(port, b"status\n") == status
        assert b"obs.probe.Probe.grp   2  4  2  " in status  # name padded to the longest

        table = [
            (b"asdf\n", b"ERR unknown_command: asdf\r\n.\r\n"),
            (b"\n", b"ERR unknown_command: \r\n.\r\n"),
            (b"  status\n", b"ERR unknown_command: \r\n.\r\n"),
            (b"STATUS\n", b"ERR unknown_command: STATUS\r\n.\r\n"),
            (b"status\r\n", status),
            (b"status\r", status),
            (b"status\n\r", status),
            (b"status extra args\n", status),
            (b"show nope\n", b"ERR invalid_job_name: nope\r\n.\r\n"),
            (b"show\n", b"ERR invalid_job_name: \r\n.\r\n"),
            (
                f"set_min_processes {P_PING} -1\n".encode(),
                b"ERR invalid_value: min_processes must be >= 0\r\n.\r\n",
            ),
            (
                f"set_min_processes {P_PING} 1.5\n".encode(),
                b"ERR invalid_value: min_processes must be >= 0\r\n.\r\n",
            ),
            (
                f"set_min_processes {P_PING}\n".encode(),
                b"ERR invalid_value: min_processes must be >= 0\r\n.\r\n",
            ),
            (
                b"set_min_processes nope ten\n",  # the job is checked first
                b"ERR invalid_job_name: nope\r\n.\r\n",
            ),
            (
                f"set_processes {P_PING} ten 1\n".encode(),
                b"ERR invalid_value: min_processes must be >= 0\r\n.\r\n",
            ),
            (f"set_max_processes {P_PING} 0\n".encode(), b"OK\r\n.\r\n"),
            (
                f"set_processes {P_PING} 2 1\n".encode(),
                b"ERR invalid_value: max_processes must be greater than min_processes\r\n.\r\n",
            ),
            (f"set_processes {P_PING} 0 0\n".encode(), b"OK\r\n.\r\n"),
            (f"set_processes {P_PING} 0 1\n".encode(), b"OK\r\n.\r\n"),
            (b"kill\n", b"ERR invalid_value: the given PID(s) do not belong to us\r\n.\r\n"),
            (b"kill abc\n", b"ERR invalid_value: the given PID(s) do not belong to us\r\n.\r\n"),
            (b"killall\n", b"ERR invalid_value: no job_names given\r\n.\r\n"),
            (b"killall nope\n", b"ERR invalid_job_name: nope\r\n.\r\n"),
            (f"killall * {P_GRP}\n".encode(), b"ERR invalid_job_name: *\r\n.\r\n"),
            # only the whitelist dispatches (Perl answered any method of its console object)
            (b"driver\n", b"ERR unknown_command: driver\r\n.\r\n"),
            (f"get_job {P_GRP}\n".encode(), b"ERR unknown_command: get_job\r\n.\r\n"),
            (b"__init__\n", b"ERR unknown_command: __init__\r\n.\r\n"),
            (b"isa X\n", b"ERR unknown_command: isa\r\n.\r\n"),
            (b"port\n", b"ERR unknown_command: port\r\n.\r\n"),
            (b"cmd_status\n", b"ERR unknown_command: cmd_status\r\n.\r\n"),
            (b"Status\n", b"ERR unknown_command: Status\r\n.\r\n"),
        ]
        with Session(port) as c:
            for sent, expected in table:
                assert c.raw(sent) == expected, sent

        # show <grp>: the job line unpadded, then one PID per line
        reply = console_raw(port, f"show {P_GRP}\n".encode())
        head, *pids, dot, tail = reply.split(b"\r\n")
        assert head == f"{P_GRP}  2  4  2  {NEVER}  {NEVER}  ".encode()
        assert dot == b"." and tail == b""
        grp = {int(p) for p in pids}
        assert len(grp) == 2 and all(pid_alive(p) for p in grp)

        # killall <good> <bad>: every name is checked first, nothing is killed
        assert console_raw(port, f"killall {P_GRP} nope\n".encode()) == (
            b"ERR invalid_job_name: nope\r\n.\r\n"
        )
        time.sleep(1.0)
        assert set(show_pids(d, P_GRP)) == grp and all(pid_alive(p) for p in grp)
        assert not any(r.get("event") == "process_exited" for r in d.records())

        # kill <ownpid> 1: the foreign PID is ignored, ours stops and is replaced
        victim = min(grp)
        assert console_raw(port, f"kill {victim} 1\n".encode()) == b"OK\r\n.\r\n"
        wait_for(lambda: not pid_alive(victim), timeout=10)
        after = wait_for(lambda: pids_when(d, P_GRP, 2), 10)
        assert victim not in after and max(grp) in after
        assert pid_alive(1)

        # killall *: every process of every job
        before = set(after) | set(show_pids(d, P_FAIL))
        assert console_raw(port, b"killall *\n") == b"OK\r\n.\r\n"
        wait_for(lambda: not any(pid_alive(p) for p in before), timeout=10)

        def replaced() -> bool:
            now = set(show_pids(d, P_GRP)) | set(show_pids(d, P_FAIL))
            return len(now) == 3 and not now & before

        wait_for(replaced, timeout=15, interval=0.2)
        wait_for(lambda: console_raw(port, b"status\n") == status, timeout=10, interval=0.2)

        # quit: nothing, then EOF
        assert console_raw(port, b"quit\n", until_eof=True) == b""
        assert console_raw(port, b"quit extra\n", until_eof=True) == b""
        with Session(port) as c:  # quit closes only its own connection
            other = Session(port)
            other.sock.sendall(b"quit\nstatus\n")
            assert other.eof() == b""  # nothing after quit is answered
            other.close()
            assert c.raw(b"status\n") == status
        assert d.proc is not None and d.proc.poll() is None
        assert log_problems(d) == []


def test_status_shows_last_run_and_error(gearmand: Gearmand) -> None:
    with running(gearmand, "--namespaces", "obs.probe", "--interval", "1") as d:
        before = datetime.datetime.now(datetime.UTC).replace(microsecond=0, tzinfo=None)
        req = do(gearmand.address, P_FAIL, b"nl")
        assert req.state != "COMPLETE"
        after = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)

        def failed() -> list[str] | None:
            lines = d.console("status")
            return lines if "ERROR: " in lines[0] else None

        lines = wait_for(failed, timeout=5)  # the job's end reaches the supervisor by itself
        fail = next(x for x in lines if x.startswith(P_FAIL + " "))
        m = re.fullmatch(rf"{re.escape(P_FAIL)}  1  1  1  (\S+)  (\S+)  (.*)", fail)
        assert m, fail
        lastrun, lasterror, message = m.groups()
        assert lastrun == lasterror
        when = datetime.datetime.strptime(lastrun, "%Y-%m-%dT%H:%M:%S")  # UTC, no zone suffix
        assert before <= when <= after
        assert message == "ERROR: ValueError: boom: nl"  # the first line only
        # the other jobs never ran: 1970 and the two trailing spaces
        grp = next(x for x in lines if x.startswith(P_GRP + " "))
        assert grp.endswith(f"  {NEVER}  {NEVER}  ")
        show = d.console(f"show {P_FAIL}")
        assert show[0] == f"{P_FAIL}  1  1  1  {lastrun}  {lasterror}  ERROR: ValueError: boom: nl"


# -- t/041 -------------------------------------------------------------------------------------


def test_t041_runtime_attributes_padding(gearmand: Gearmand) -> None:
    config = {
        "namespaces": ["obs.runtime"],
        "worker_options": {
            "GLOBAL": {"global_option": "GlobalTest", "class_option": "GlobalTest"},
            "obs.runtime.RuntimeOption": {"class_option": "Test"},
        },
        "job_runtime_attributes": {
            "obs.runtime.RuntimeOption.job1": {"min_processes": 2, "max_processes": 10}
        },
    }
    job1, job2 = "obs.runtime.RuntimeOption.job1", "obs.runtime.RuntimeOption.job2"
    with running(gearmand, "--interval", "1", config=config) as d:
        assert do(gearmand.address, job1).result == b"Test"
        assert do(gearmand.address, job2).result == b"GlobalTest"
        lines = d.console("status")
        assert len(lines) == 2
        assert re.fullmatch(rf"{re.escape(job1)}  2  10  2  \S+  {NEVER}  ", lines[0]), lines
        assert re.fullmatch(rf"{re.escape(job2)}  1   1  1  \S+  {NEVER}  ", lines[1]), lines


# -- the port's changes ------------------------------------------------------------------------


def test_limits_take_effect_at_once(fresh_gearmand: Gearmand) -> None:
    """With a 30 s interval nothing but the command itself can change the processes."""
    g = fresh_gearmand
    with running(g, "--namespaces", "obs.console", "--interval", "30", metrics=True) as d:
        # the first poll (at 0.2 s) is done; the next is 30 s away
        wait_for(lambda: metric(d.metrics_port, "gdriver_observer_poll_duration_seconds_count"))
        assert d.console(f"set_processes {PING} 2 2") == ["OK"]
        pids = show_pids(d, PING)
        assert len(pids) == 2
        wait_for(lambda: g.workers_for(PING) == 2, timeout=10)
        assert d.console(f"set_max_processes {PING} 3") == ["OK"]
        assert d.console(f"set_processes {PING} 0 1") == ["OK"]  # retires the idle surplus
        left = wait_for(lambda: pids_when(d, PING, 1), timeout=5)
        assert left <= set(pids)
        wait_for(lambda: g.workers_for(PING) == 1, timeout=5)
        assert d.console("status")[0].startswith(f"{PING}  0  1  1  ")
        assert d.console(f"set_min_processes {PING} 1") == ["OK"]
        assert set(show_pids(d, PING)) == left  # already enough: nothing started
        assert d.console(f"set_max_processes {PING} 0") == [
            "ERR invalid_value: max_processes must be greater than min_processes"
        ]


def test_help_and_version(console_gd: Gdriver) -> None:
    from gdriver import __version__

    assert console_gd.console("version") == [f"gdriver {__version__}"]
    assert console_gd.console("version extra") == [f"gdriver {__version__}"]
    lines = console_gd.console("help")
    assert lines == sorted(lines)
    names = [x.split()[0] for x in lines]
    assert len(names) == len(set(names))  # one line per command
    for name in ("status", "show", "set_min_processes", "set_max_processes", "set_processes",
                 "kill", "killall", "quit", "shutdown", "help", "version", "obs_jobs",
                 "obs_max", "obs_crash"):  # fmt: skip
        assert name in names, name
    assert all(" - " in x and x.split(" - ", 1)[1].strip() for x in lines), lines
    by_name = dict(zip(names, lines, strict=True))
    assert by_name["obs_jobs"] == "obs_jobs [<prefix>] - job names with their process counts"
    assert by_name["obs_max"] == "obs_max <job_name> - max_processes of a job"  # from the doc


def test_plugin_command_end_to_end(console_gd: Gdriver) -> None:
    d = console_gd
    assert d.console("obs_jobs") == [f"{PING} 0", f"{PONG} 0"]
    assert d.console("obs_jobs obs.console.Console.p") == [f"{PING} 0", f"{PONG} 0"]
    assert d.console("obs_jobs nope") == ["ERR invalid_value: no job starts with nope"]
    assert d.console(f"obs_max {PING}") == ["1"]
    assert d.console("obs_max") == ["ERR invalid_job_name: "]
    assert d.console("obs_max nope") == ["ERR invalid_job_name: nope"]
    # a plugin that breaks: one ERR line, the connection and the supervisor carry on
    with Session(d.console_port) as c:
        assert c.cmd("obs_crash") == ["ERR internal_error: RuntimeError: plugin broke"]
        assert c.cmd(f"obs_max {PING}") == ["1"]
    crash = d.wait_log(lambda r: "plugin broke" in r.get("exc_info", ""))
    assert crash["logger"] == "gdriver.console" and crash["level"] == "ERROR"
    assert console_raw(d.console_port, b"OBS_JOBS\n") == b"ERR unknown_command: OBS_JOBS\r\n.\r\n"


def test_plugins_cannot_replace_builtins() -> None:
    from gdriver.console import PLUGINS, command

    for name in ("status", "kill", "quit", "shutdown", "help"):
        with pytest.raises(ValueError):
            command(name)(lambda ctx, *args: ["hijacked"])
        assert name not in PLUGINS


def test_shutdown_drains_in_flight_job(gearmand: Gearmand) -> None:
    from gdriver import __version__

    d = Gdriver(gearmand, "--namespaces", "obs.probe", "--interval", "1", metrics=True).start()
    try:
        wait_for(lambda: port_open(d.metrics_port), timeout=10)
        result: dict[str, Any] = {}

        def client() -> None:
            result["req"] = do(gearmand.address, P_SLOW, b"1.5", timeout=30)

        def running_slow() -> bool:
            return gearmand.status().get(P_SLOW, (0, 0, 0))[1] == 1

        # kill is graceful: the job in hand finishes, then the process exits
        t = threading.Thread(target=client, daemon=True)
        t.start()
        wait_for(running_slow, timeout=15)
        busy = show_pids(d, P_SLOW)
        assert len(busy) == 1
        assert console_raw(d.console_port, f"kill {busy[0]}\n".encode()) == b"OK\r\n.\r\n"
        t.join(20)
        assert result["req"].state == "COMPLETE" and int(result["req"].result) == busy[0]
        wait_for(lambda: not pid_alive(busy[0]), timeout=10)

        result.clear()
        t = threading.Thread(target=client, daemon=True)
        t.start()
        wait_for(running_slow, timeout=15)
        children = set(show_pids(d, P_SLOW)) | set(show_pids(d, P_GRP))
        assert len(children) == 3
        # a reply before the shutdown still arrives; the shutdown itself answers nothing
        reply = console_raw(d.console_port, b"version\nshutdown\nstatus\n", until_eof=True)
        assert reply == f"gdriver {__version__}\r\n.\r\n".encode()
        # while the job drains: alive, no longer ready
        assert http_get(d.metrics_port, "/readyz") == (503, b"stopping\n")
        assert http_get(d.metrics_port, "/healthz") == (200, b"ok\n")
        assert d.proc is not None
        assert d.proc.wait(20) == 0
        t.join(20)
        req = result["req"]
        assert req.state == "COMPLETE" and int(req.result) in children  # the job finished
        assert not any(pid_alive(p) for p in children)
        assert any(r.get("event") == "stopping" for r in d.records())
    finally:
        d.stop()


def test_pipelined_commands_then_quit(console_gd: Gdriver) -> None:
    """As ``printf 'status\\nquit\\n' | nc``: every reply before quit arrives, then EOF."""
    port = console_gd.console_port
    status = console_raw(port, b"status\n")
    version = console_raw(port, b"version\n")
    got = console_raw(port, b"status\r\nversion\nasdf\rquit\nstatus\n", until_eof=True)
    assert got == status + version + b"ERR unknown_command: asdf\r\n.\r\n"
    got = console_raw(port, b"version\n" * 200 + b"quit\n" + b"status\n" * 100, until_eof=True)
    assert got == version * 200


# -- hardening ---------------------------------------------------------------------------------


def test_line_length_limit(console_gd: Gdriver) -> None:
    port = console_gd.console_port
    status = console_raw(port, b"status\n")
    assert status.endswith(b"  \r\n.\r\n")
    # exactly 4096 bytes is a line (extra arguments are ignored)
    ok = b"status " + b"x" * (4096 - 7)
    assert len(ok) == 4096
    assert console_raw(port, ok + b"\n") == status
    too_long = b"ERR line_too_long: "
    for data in (ok + b"y\n", b"a" * 5000, b"version\n" + b"a" * 100_000):
        with Session(port) as c:
            c.sock.sendall(data)
            got = c.eof()
        if data.startswith(b"version"):
            first, got = got.split(b".\r\n", 1)
            assert first.startswith(b"gdriver ")
        assert got.startswith(too_long) and got.endswith(b"\r\n.\r\n"), got
        assert got.count(b"\r\n") == 2  # one ERR line, then '.', then the server closed
    assert console_raw(port, b"status\n") == status


def test_connection_limit(console_gd: Gdriver) -> None:
    """Past 64 connections the newest client is served and the least recently active
    connection is closed (no refusal: idle clients can never lock operators out)."""
    from gdriver.console import MAX_CONNECTIONS

    assert MAX_CONNECTIONS == 64
    port = console_gd.console_port
    sessions = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = Session(port)
            sessions.append(s)
            assert s.cmd("version")[0].startswith("gdriver ")
        for s in sessions[1:]:  # all but the first are active again
            assert s.cmd("version")[0].startswith("gdriver ")
        assert console_raw(port, b"version\n").startswith(b"gdriver ")
        assert sessions[0].eof() == b""  # made room: a plain close, no reply, no reset
        assert all(s.cmd("version")[0].startswith("gdriver ") for s in sessions[1:])
    finally:
        for s in sessions:
            s.close()
    wait_for(lambda: console_raw(port, b"version\n").startswith(b"gdriver "), timeout=5)


def test_idle_timeout(gearmand: Gearmand) -> None:
    from gdriver.console import IDLE_TIMEOUT

    assert IDLE_TIMEOUT == 300.0
    d = PatchedGdriver(
        gearmand, "--namespaces", "obs.console", "--interval", "1",
        patch="import gdriver.console as c\nc.IDLE_TIMEOUT = 1.0\nc.REAP_INTERVAL = 0.2",
    )  # fmt: skip
    with d:
        idle = Session(d.console_port)
        busy = Session(d.console_port)
        assert idle.cmd("version")[0].startswith("gdriver ")
        idle.sock.settimeout(0.2)
        closed = False
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not closed:
            assert busy.cmd("version")[0].startswith("gdriver ")  # active: never reaped
            try:
                closed = idle.sock.recv(100) == b""
            except TimeoutError:
                pass
        assert closed, "the idle connection was not closed"
        until = time.monotonic() + 1.5  # longer than the timeout: active connections stay
        while time.monotonic() < until:
            assert busy.cmd("version")[0].startswith("gdriver ")
            time.sleep(0.3)
        assert busy.cmd("status")[0].startswith(PING)
        idle.close()
        busy.close()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_client_that_never_reads(console_gd: Gdriver) -> None:
    d = console_gd
    port = d.console_port
    status = console_raw(port, b"status\n")
    rss_before = rss_bytes(d.pid)
    hog = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect((HOST, port))
    hog.setblocking(False)
    chunk = b"status\n" * 2000
    sent = off = 0
    stalled_since = None
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            try:
                n = hog.send(chunk[off:])
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 1.5:
                    break
                time.sleep(0.01)
                continue
            stalled_since = None
            sent += n
            off = (off + n) % len(chunk)
        assert stalled_since is not None, f"the supervisor kept reading: {sent} bytes sent"
        assert sent < 64 << 20
        # still responsive to everyone else
        for _ in range(3):
            assert console_raw(port, b"status\n") == status
        assert rss_bytes(d.pid) - rss_before < 32 << 20
        # the hog's replies are intact and in order
        hog.setblocking(True)
        hog.settimeout(5)
        got = b""
        while got.count(b".\r\n") < 300:
            got += hog.recv(65536)
        replies = got.split(b".\r\n")[:300]
        assert all(r + b".\r\n" == status for r in replies)
    finally:
        hog.close()
    assert console_raw(port, b"status\n") == status


def test_any_bytes(console_gd: Gdriver) -> None:
    d = console_gd
    port = d.console_port
    status = console_raw(port, b"status\n")
    since = len(d.records())
    cases = [
        (b"\xff\xfb\x01status\r\n", b"\xff\xfe\x01" + status),  # WILL ECHO: DONT ECHO
        (b"\xff\xfd\x18\xff\xfa\x18\x00xterm\xff\xf0status\r\n", b"\xff\xfc\x18" + status),
        (b"\xff\xf1status\n", status),  # IAC NOP
        (b"\xff\xffversion\n", b"ERR unknown_command: \xef\xbf\xbdversion\r\n.\r\n"),
        (b"\xc3\x28 args\n", b"ERR unknown_command: \xef\xbf\xbd(\r\n.\r\n"),
        (b"sta\x00tus\n", b"ERR unknown_command: sta\x00tus\r\n.\r\n"),
        (b"\x00\n", b"ERR unknown_command: \x00\r\n.\r\n"),
        (b"show \xe9\n", b"ERR invalid_job_name: \xef\xbf\xbd\r\n.\r\n"),
        ("show caf\u00e9\n".encode(), "ERR invalid_job_name: caf\u00e9\r\n.\r\n".encode()),
    ]
    with Session(port) as c:
        for sent, expected in cases:
            assert c.raw(sent) == expected, sent
        # a CRLF split over two reads is one line end; so is an IAC sequence split
        c.sock.sendall(b"status\r")
        time.sleep(0.2)
        assert c.raw(b"\nversion\n") == status
        assert c.raw(b"").startswith(b"gdriver ")  # no empty line in between
    with Session(port) as c:
        c.sock.sendall(b"\xff")
        time.sleep(0.2)
        assert c.raw(b"\xfb\x01status\r\n") == b"\xff\xfe\x01" + status
    garbage = [
        bytes(range(256)) * 4 + b"\n",
        b"\xff",
        b"\xff\xfa" + b"\x01" * 100,
        b"\r\r\r\n\n\n\x00\xff\xfe" * 50,
        b"\xed\xa0\x80\xf4\x90\x80\x80\xc0\xaf\n" * 10,
    ]
    for data in garbage:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)  # the server answers what it can, then closes
            while s.recv(65536):
                pass
    assert console_raw(port, b"status\n") == status
    assert d.proc is not None and d.proc.poll() is None
    assert log_problems(d, since) == []
