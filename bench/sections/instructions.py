"""Instructions per job of a worker process's loop: deterministic, whatever the machine's load.

``valgrind --tool=callgrind`` counts the user-space instructions of ``jobloop.py`` (a gdriver
worker process's loop: ``process.Child``, its slot, ``GearmanWorker``, outside a supervisor)
running trivial echo jobs that a real gearmand (``--threads=1``) hands out one per grab, and
of the C worker ``gearman -w -c N`` on the same jobs. The jobs are queued as background jobs
before the worker starts, so every grab gets a job at once, as under a pipelined client.
Two runs of each, with FEW and MANY jobs: the difference divided by MANY - FEW is the cost
of one job, start-up excluded. With ``strace`` installed, the system calls per job too.

The kernel's share (the send and receive paths, the scheduler) is not in these counts: the
wall-clock figures of ``throughput`` hold it.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness as h

from gdriver.codec import HEADER_SIZE, PacketType, pack, unpack

NAMESPACE = "benchjobs.echo"
FUNCTION = "benchjobs.echo.Echo.echo"
C_FUNCTION = "bench.c.echo"
FEW, MANY = 200, 1200
VALGRIND = shutil.which("valgrind")
STRACE = shutil.which("strace")


def queue_jobs(port: int, function: str, count: int) -> None:
    """Submit count background echo jobs and wait until gearmand created them all."""
    packet = pack(PacketType.SUBMIT_JOB_BG, function.encode(), b"", b"x")
    with socket.create_connection((h.HOST, port), timeout=30) as sock:
        sock.sendall(packet * count)
        buf, created = b"", 0
        while created < count:
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("gearmand closed the connection while jobs were submitted")
            buf += chunk
            while len(buf) >= HEADER_SIZE:
                ptype, _, end = unpack(buf)
                if end > len(buf):
                    break
                if ptype != PacketType.JOB_CREATED:
                    raise RuntimeError(f"unexpected reply {ptype} to SUBMIT_JOB_BG")
                created += 1
                buf = buf[end:]


def run_gdriver(port: int, count: int, tool: list[str]) -> None:
    """jobloop.py for count jobs under tool; the channel's other end drained meanwhile."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def drain() -> None:
        while ours.recv(65536):
            pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        cmd = [*tool, h.PYTHON, str(h.BENCH / "jobloop.py"), str(port), NAMESPACE, str(count),
               str(theirs.fileno())]  # fmt: skip
        proc = h.start(cmd, pass_fds=(theirs.fileno(),), env=h.clean_env(),
                       stderr=subprocess.PIPE)  # fmt: skip
        theirs.close()
        _, err = proc.communicate(timeout=900)
        h.stop(proc)
        if proc.returncode != 0:
            raise RuntimeError(f"jobloop.py failed ({proc.returncode}): {err.decode()[-800:]}")
    finally:
        theirs.close()
        reader.join(10)
        ours.close()


def run_c(port: int, count: int, tool: list[str]) -> None:
    cmd = [*tool, h.GEARMAN, "-w", "-f", C_FUNCTION, "-c", str(count), "-h", h.HOST,
           "-p", str(port)]  # fmt: skip
    proc = h.start(cmd, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=900)
    h.stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"gearman -w failed ({proc.returncode}): {err.decode()[-800:]}")


def callgrind(out: Path) -> list[str]:
    return [VALGRIND or "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]


def instructions(out: Path) -> int:
    match = re.search(rb"^(?:summary|totals): (\d+)", out.read_bytes(), re.M)
    if not match:
        raise RuntimeError(f"no instruction total in {out}")
    return int(match.group(1))


def syscalls(out: Path) -> int:
    """The total of ``strace -c``'s table."""
    for line in reversed(out.read_text().splitlines()):
        parts = line.split()
        if parts and parts[-1] == "total":
            return int(parts[3] if len(parts) >= 6 else parts[2])
    raise RuntimeError(f"no total in {out}")


def per_job(g: h.Gearmand, function: str, measure: Callable[[int], int]) -> float:
    """(measure(MANY) - measure(FEW)) / (MANY - FEW), with the jobs queued before each run."""
    totals = {}
    for n in (FEW, MANY):
        queue_jobs(g.port, function, n)
        totals[n] = measure(n)
        if g.admin.status().get(function, (0,))[0]:
            raise RuntimeError(f"{function}: jobs left queued after the run")
    return (totals[MANY] - totals[FEW]) / (MANY - FEW)


def run(ctx: h.Context) -> dict[str, Any]:
    if VALGRIND is None:
        figure = "worker instructions per job: not measured, valgrind is not installed"
        return {"figures": [{"figure": figure, "unit": "", "pass": None,
                             "note": "Debian package valgrind"}]}  # fmt: skip
    out: dict[str, Any] = {"jobs": [FEW, MANY], "instructions_per_job": {}, "syscalls_per_job": {}}
    g = h.Gearmand(1).start()
    try:
        tmp = Path(tempfile.mkdtemp(prefix="gdriver-bench-callgrind-"))
        try:
            contenders = (("gdriver", FUNCTION, run_gdriver), ("c", C_FUNCTION, run_c))
            for who, function, runner in contenders:

                def counted(n: int, who: str = who, runner: Any = runner) -> int:
                    path = tmp / f"{who}-{n}.out"
                    runner(g.port, n, callgrind(path))
                    return instructions(path)

                out["instructions_per_job"][who] = per_job(g, function, counted)
                ctx.say(f"{who}: {out['instructions_per_job'][who]:,.0f} instructions per job")
                if STRACE:

                    def traced(n: int, who: str = who, runner: Any = runner) -> int:
                        path = tmp / f"{who}-{n}.strace"
                        runner(g.port, n, [STRACE, "-f", "-qq", "-c", "-o", str(path)])
                        return syscalls(path)

                    out["syscalls_per_job"][who] = per_job(g, function, traced)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        g.stop()
    ipj = out["instructions_per_job"]
    spj = out["syscalls_per_job"]
    ratio = ipj["gdriver"] / ipj["c"]
    note = f"C worker (libgearman) {ipj['c']:,.0f} per job, {ratio:.1f} x"
    if spj:
        note += (f"; system calls per job: gdriver {spj['gdriver']:.2f}, "
                 f"C worker {spj['c']:.2f}")  # fmt: skip
    out["figures"] = [
        {
            "figure": "worker instructions per echo job (callgrind)",
            "value": ipj["gdriver"],
            "unit": "instructions",
            "perl": "-",
            "target": "-",
            "pass": None,
            "note": note,
        }
    ]
    return out
