"""Real processes for the tests: gearmand, gdriver, clients. Everything on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
HOST = "127.0.0.1"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never handed out before in this run: two ports
    picked in a row for one process (its console and its metrics) could otherwise be the
    same, as bind() to port 0 may give a port back once it is closed."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no port left that was not handed out before")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; return its value or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        time.sleep(interval)


def port_open(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def http_status(port: int, path: str) -> int:
    """The status code of a GET on 127.0.0.1:port (errors included)."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=3) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill(0); look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """Stop a process we started, by its PID: TERM, then KILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


class Gearmand:
    """A real gearmand on a free loopback port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> Gearmand:
        # by path: Debian gearman-server installs a Perl program also named gearmand
        exe = "/usr/sbin/gearmand"
        self.proc = subprocess.Popen(
            [exe, f"--listen={HOST}", f"--port={self.port}", "--log-file=none", "--threads=2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.port), timeout=10)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def admin(self, command: str, timeout: float = 3.0) -> list[str]:
        """Send one text admin command; return the reply lines."""
        with socket.create_connection((HOST, self.port), timeout=timeout) as s:
            s.sendall(command.encode() + b"\n")
            buf = b""
            while True:
                if command.startswith(("version", "maxqueue", "shutdown", "verbose")):
                    if buf.endswith(b"\n"):
                        break
                elif buf == b".\n" or buf.endswith(b"\n.\n"):
                    break
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        lines = buf.decode().split("\n")
        return [line for line in lines if line and line != "."]

    def status(self) -> dict[str, tuple[int, int, int]]:
        """function -> (total, running, workers)."""
        out = {}
        for line in self.admin("status"):
            parts = line.split("\t")
            if len(parts) == 4:
                out[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
        return out

    def workers_for(self, function: str) -> int:
        return self.status().get(function, (0, 0, 0))[2]


def client(*servers: str) -> Any:
    import gearman  # pygearman

    return gearman.GearmanClient(list(servers))


def do(
    servers: str | list[str], function: str, workload: bytes | str = b"", timeout: float = 15.0
) -> Any:
    """Submit one foreground job with a real client and wait for it; return the request."""
    import gearman

    hosts = [servers] if isinstance(servers, str) else servers
    c = gearman.GearmanClient(hosts)
    req = c.submit_job(function, workload, wait_until_complete=True, poll_timeout=timeout)
    c.shutdown()
    return req


def submit_background(server: str, function: str, workloads: list[bytes | str]) -> None:
    import gearman

    c = gearman.GearmanClient([server])
    jobs = [{"task": function, "data": w} for w in workloads]
    c.submit_multiple_jobs(jobs, background=True, wait_until_complete=False, poll_timeout=15)
    c.shutdown()


class Gdriver:
    """A real gdriver supervisor started as a subprocess, JSON stdout collected."""

    def __init__(
        self,
        gearmand: Gearmand | str,
        *args: str,
        env: dict[str, str] | None = None,
        console: bool = True,
        metrics: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.server = gearmand.address if isinstance(gearmand, Gearmand) else gearmand
        self.console_port = free_port() if console else 0
        self.metrics_port = free_port() if metrics else 0
        self.args = list(args)
        self.env = dict(env or {})
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[str] = []
        self._reader: threading.Thread | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="gdriver-test-")

    @property
    def tmp(self) -> Path:
        return Path(self._tmp.name)

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "gdriver", "run",
            "--server", self.server,
            "--console_port", str(self.console_port),
            "--metrics_port", str(self.metrics_port),
            "--metrics_bind", HOST,
            "--lib", str(WORKERS),
        ]  # fmt: skip
        if self.config is not None:
            import yaml

            path = self.tmp / "config.yml"
            path.write_text(yaml.safe_dump(self.config))
            cmd += ["--configfile", str(path)]
        return cmd + self.args

    def start(self, wait_console: bool = True) -> Gdriver:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GDRIVER_")}
        env.update({"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
        env.update(self.env)
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=self.tmp
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_console and self.console_port:
            try:
                wait_for(lambda: port_open(self.console_port) or self.proc.poll() is not None, 20)
            except TimeoutError:
                self.stop()
                raise
            if self.proc.poll() is not None:
                raise RuntimeError("gdriver exited at start:\n" + "\n".join(self.lines[-30:]))
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((r for r in self.records() if predicate(r)), None)

        return wait_for(found, timeout)  # type: ignore[no-any-return]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def console(self, line: str, timeout: float = 5.0) -> list[str]:
        return console_command(self.console_port, line, timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        rc = None
        if self.proc is not None:
            rc = stop_pid(self.proc, timeout)
            if self._reader is not None:
                self._reader.join(5)
        self._tmp.cleanup()
        return rc

    def __enter__(self) -> Gdriver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def console_raw(port: int, data: bytes, timeout: float = 5.0, until_eof: bool = False) -> bytes:
    """Send raw bytes to the console; read until a '.' line (or EOF)."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not until_eof and (buf == b".\r\n" or buf.endswith(b"\r\n.\r\n")):
                break
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            buf += chunk
        return buf


def console_command(port: int, line: str, timeout: float = 5.0) -> list[str]:
    raw = console_raw(port, line.encode() + b"\n", timeout)
    lines = raw.decode().split("\r\n")
    assert lines[-1] == "" and lines[-2] == ".", raw
    return lines[:-2]


@contextlib.contextmanager
def running(gearmand: Gearmand | str, *args: str, **kw: Any) -> Iterator[Gdriver]:
    g = Gdriver(gearmand, *args, **kw)
    g.start()
    try:
        yield g
    finally:
        g.stop()
