"""Processes of the benchmarks: gearmand, gdriver, plain workers; /proc readings; stats.

Every process started here is recorded and stopped by its PID (``stop_all``), also when a
section fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support import free_port, port_open, stop_pid  # the tests' process helpers
from support import wait_for as support_wait_for

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORKERS = BENCH / "workers"
HOST = "127.0.0.1"
PYTHON = sys.executable
GEARMAND = "/usr/sbin/gearmand"  # by path: Debian gearman-server has a Perl gearmand too
GEARMAN = shutil.which("gearman") or "/usr/bin/gearman"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

_started: list[subprocess.Popen[Any]] = []


@dataclasses.dataclass
class Context:
    """What every section gets: the mode and its run counts."""

    quick: bool
    runs: int  # repetitions of each figure (the median is reported)
    settle: float  # seconds to wait after processes are registered, before measuring
    idle_seconds: float  # the idle-cost window
    rng: random.Random

    def say(self, text: str) -> None:
        print(f"  {text}", flush=True)


# -- small helpers ---------------------------------------------------------------------------
def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
    """The tests' wait_for, polling faster: bench figures are timed by these polls."""
    return support_wait_for(predicate, timeout, interval)


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


def summary(values: Iterable[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "runs": vals}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GDRIVER_")}
    paths = [str(ROOT), str(WORKERS)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


# -- process bookkeeping -----------------------------------------------------------------------
def start(cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    kw.setdefault("stdin", subprocess.DEVNULL)
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, **kw)
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen[Any] | None, timeout: float = 15.0) -> int | None:
    """TERM, wait, then KILL: by the PID we started (the tests' own helper)."""
    if proc is None:
        return None
    code = stop_pid(proc, timeout)
    with contextlib.suppress(ValueError):
        _started.remove(proc)
    return code


def stop_many(procs: Iterable[subprocess.Popen[Any]], timeout: float = 15.0) -> None:
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        with contextlib.suppress(ValueError):
            _started.remove(proc)


def stop_all() -> None:
    """Stop whatever is still running, newest first (gdriver before its gearmand)."""
    for proc in reversed(list(_started)):
        stop(proc, timeout=10)


# -- gearmand ------------------------------------------------------------------------------------
class Admin:
    """A persistent connection for gearmand's text admin protocol."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection((HOST, self.port), timeout=5)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buf = b""
        return self.sock

    def command(self, line: str) -> list[str]:
        try:
            return self._command(line)
        except OSError:
            self.close()
            return self._command(line)

    def _command(self, line: str) -> list[str]:
        sock = self._connect()
        sock.sendall(line.encode() + b"\n")
        while True:
            end = self.buf.find(b"\n.\n")
            if self.buf.startswith(b".\n"):
                self.buf = self.buf[2:]
                return []
            if end >= 0:
                out, self.buf = self.buf[:end], self.buf[end + 3 :]
                return out.decode("utf-8", "replace").split("\n")
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("gearmand closed the admin connection")
            self.buf += chunk

    def status(self) -> dict[str, tuple[int, int, int]]:
        """function -> (total, running, workers)."""
        out = {}
        for line in self.command("status"):
            parts = line.split("\t")
            if len(parts) == 4:
                out[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
        return out

    def worker_pids(self, prefix: str) -> list[int]:
        """PIDs of the gdriver worker connections whose client id starts with prefix
        (client ids are ``gdriver:<job>:<pid>``)."""
        pids = []
        for line in self.command("workers"):
            parts = line.split(" ")
            if len(parts) >= 3 and parts[2].startswith(prefix):
                with contextlib.suppress(ValueError):
                    pids.append(int(parts[2].rsplit(":", 1)[1]))
        return pids

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None


class Gearmand:
    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self.port = free_port()
        self.proc: subprocess.Popen[Any] | None = None
        self.admin = Admin(self.port)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def label(self) -> str:
        return f"threads={self.threads}" if self.threads is not None else "threads=default(4)"

    def start(self) -> Gearmand:
        cmd = [GEARMAND, f"--listen={HOST}", f"--port={self.port}", "--log-file=none"]
        if self.threads is not None:
            cmd.append(f"--threads={self.threads}")
        self.proc = start(cmd)
        wait_for(lambda: port_open(self.port), 10)
        return self

    def stop(self) -> None:
        self.admin.close()
        stop(self.proc)
        self.proc = None

    def __enter__(self) -> Gearmand:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- gdriver -------------------------------------------------------------------------------------
class Gdriver:
    """``python -m gdriver run`` with the bench workers; JSON log kept in a file."""

    def __init__(
        self,
        gearmand: Gearmand,
        namespace: str,
        *args: str,
        attributes: dict[str, dict[str, Any]] | None = None,
        freeze: bool = True,
        console: bool = False,
    ) -> None:
        self.gearmand = gearmand
        self.namespace = namespace
        self.args = list(args)
        self.attributes = attributes
        self.freeze = freeze
        self.console_port = free_port() if console else 0
        self.proc: subprocess.Popen[Any] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="gdriver-bench-")
        self.log_path = Path(self._tmp.name) / "gdriver.log"
        self.started_at = 0.0  # wall clock, just before the command starts

    @property
    def tmp(self) -> Path:
        return Path(self._tmp.name)

    def command(self) -> list[str]:
        if self.freeze:
            head = [PYTHON, "-m", "gdriver", "run"]
        else:
            head = [PYTHON, str(BENCH / "nofreeze.py"), "run"]
        cmd = [
            *head,
            "--server", self.gearmand.address,
            "--lib", str(WORKERS),
            "--namespaces", self.namespace,
            "--console_port", str(self.console_port),
            "--metrics_port", "0",
        ]  # fmt: skip
        if self.attributes:
            cmd += ["--job_runtime_attributes", json.dumps(self.attributes)]
        return cmd + self.args

    def start(self) -> Gdriver:
        log = open(self.log_path, "wb")  # noqa: SIM115 (the child keeps it)
        try:
            self.started_at = time.time()
            self.proc = start(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=clean_env(PYTHONUNBUFFERED="1"),
                cwd=self.tmp,
            )
        finally:
            log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def records(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError("gdriver exited:\n" + "\n".join(tail))

    def children(self) -> list[int]:
        """The worker processes: the supervisor's children but its resolver process."""
        return [pid for pid in children_of(self.pid) if not is_resolver(pid)]

    def wait_registered(self, prefix: str, n: int, timeout: float = 30.0) -> float:
        """Wait until gearmand lists n worker connections of the job; return the wall time."""

        def done() -> bool:
            self.check_alive()
            return len(self.gearmand.admin.worker_pids(prefix)) >= n

        wait_for(done, timeout, 0.005)
        return time.time()

    def stop(self, timeout: float = 30.0) -> int | None:
        rc = stop(self.proc, timeout)
        self.proc = None
        self._tmp.cleanup()
        return rc

    def __enter__(self) -> Gdriver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def job_prefix(job_name: str) -> str:
    return f"gdriver:{job_name}:"


# -- /proc ----------------------------------------------------------------------------------------
def proc_stat(pid: int) -> list[str] | None:
    """Fields after the command name: [0] state, [1] ppid, ... [11] utime, [12] stime."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def is_resolver(pid: int) -> bool:
    """The supervisor's name-resolver process (its title ends with ``[resolver]``)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().rstrip(b"\0").endswith(b"[resolver]")
    except OSError:
        return False


def children_of(ppid: int) -> list[int]:
    """Live (not zombie) children of ppid."""
    try:
        with open(f"/proc/{ppid}/task/{ppid}/children") as f:
            pids = [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return _children_by_scan(ppid)
    out = []
    for pid in pids:
        fields = proc_stat(pid)
        if fields and fields[0] != "Z":
            out.append(pid)
    return sorted(out)


def _children_by_scan(ppid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = proc_stat(int(name))
        if fields and fields[1] == str(ppid) and fields[0] != "Z":
            out.append(int(name))
    return sorted(out)


def stat_cpu_seconds(pid: int) -> float:
    """utime + stime from /proc/PID/stat (whole clock ticks)."""
    fields = proc_stat(pid)
    if not fields:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of pid, in ns precision (/proc/PID/task/*/schedstat); falls
    back to utime + stime where schedstat is missing."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return stat_cpu_seconds(pid)
    return total / 1e9


def smaps(pid: int) -> dict[str, int]:
    """Rss, Pss, Uss (Private_Clean + Private_Dirty) in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key.strip()] = int(parts[0])
    return {
        "rss": out.get("Rss", 0),
        "pss": out.get("Pss", 0),
        "uss": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0),
    }


def mib(kb: float) -> float:
    return kb / 1024.0


def parse_ts(stamp: str) -> float:
    return datetime.datetime.fromisoformat(stamp).timestamp()


# -- machine ---------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        gearmand = subprocess.run(
            [GEARMAND, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        gearmand = "unknown"
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "gdriver"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        if dirty:
            commit += " (gdriver/ modified)"
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    import gdriver

    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gearmand": gearmand,
        "gdriver": getattr(gdriver, "__version__", "?"),
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "loadavg_start": os.getloadavg(),
    }


# -- the client ------------------------------------------------------------------------------------
#: the compiled C client (gclient.c), set by run.py; None: the Python client (gclient.py)
CLIENT_BIN: str | None = None


def build_client(directory: Path) -> str | None:
    """Compile gclient.c; None when no C compiler works (the Python client is used)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return None
    out = directory / "gclient"
    try:
        subprocess.run(
            [cc, "-O2", "-o", str(out), str(BENCH / "gclient.c")],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return str(out)


def client_name() -> str:
    return "C (bench/gclient.c)" if CLIENT_BIN else "Python (bench/gclient.py)"


def run_client(
    mode: str,
    port: int,
    function: str,
    count: int,
    *,
    window: int = 0,
    workload: str = "x",
    check: bool = False,
    warmup: int = 0,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Run the client as its own process; returns its JSON result."""
    if CLIENT_BIN:
        cmd = [CLIENT_BIN, mode, str(port), function, str(count), str(window), workload,
               "1" if check else "0", str(warmup)]  # fmt: skip
    else:
        cmd = [PYTHON, str(BENCH / "gclient.py"), mode, str(port), function, str(count),
               "--window", str(window), "--workload", workload, "--warmup", str(warmup),
               "--timeout", str(timeout)]  # fmt: skip
        if check:
            cmd.append("--check")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10)
    if done.returncode != 0:
        raise RuntimeError(f"client failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return dict(json.loads(done.stdout))
