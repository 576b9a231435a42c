"""The compatibility matrix's real parts: the other Gearman servers (Perl Gearman::Server,
gear's geard) on free loopback ports, and the clients (pygearman in this process; Perl
Gearman::Client, the PHP extension and gear each in a process of their own).

Servers are found by their package's absolute path, never by PATH: Debian's
``gearman-server`` installs a Perl program also named ``gearmand``.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support import HOST, Gearmand, port_open, wait_for

COMPAT = Path(__file__).resolve().parent / "compat"
C_GEARMAND = "/usr/sbin/gearmand"  # Debian gearman-job-server
GEARD = str(Path(sys.executable).parent / "geard")  # PyPI gear
CLIENTS = ("pygearman", "perl", "php", "gear")
SERVERS = ("c", "perl", "geard")


@functools.cache
def package_program(package: str, name: str) -> str:
    """The absolute path of the program ``name`` that a Debian package installs."""
    out = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        if line.endswith("/bin/" + name) and Path(line).is_file():
            return line
    raise FileNotFoundError(f"{package} installs no {name}")


class PerlGearmand(Gearmand):
    """Perl's Gearman::Server (Debian gearman-server), the server Gearman::Driver grew up on."""

    def start(self) -> PerlGearmand:
        exe = package_program("gearman-server", "gearmand")
        self.proc = subprocess.Popen(
            [exe, f"--listen={HOST}", f"--port={self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.port), timeout=10)
        return self


class Geard(Gearmand):
    """gear's geard (PyPI gear, OpenStack's), a server in pure Python."""

    def start(self) -> Geard:
        self.proc = subprocess.Popen(
            [GEARD, "-d", "-p", str(self.port), "--listen-address", HOST],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: port_open(self.port), timeout=10)
        return self


def server(kind: str, port: int | None = None) -> Gearmand:
    """A server of the given kind (not started)."""
    return {"c": Gearmand, "perl": PerlGearmand, "geard": Geard}[kind](port)


@dataclass
class Run:
    """What one client saw of one foreground job."""

    result: bytes | None = None
    failed: bool = False
    exception: str | None = None
    status: list[tuple[int, int]] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    warnings: list[bytes] = field(default_factory=list)


def _script(client: str) -> list[str]:
    if client == "perl":
        return ["perl", str(COMPAT / "client.pl")]
    if client == "php":
        return ["php", str(COMPAT / "client.php")]
    if client == "gear":
        return [sys.executable, str(COMPAT / "client_gear.py")]
    raise ValueError(client)


def _hex(value: str | None) -> bytes | None:
    return None if value is None else bytes.fromhex(value)


def _external(client: str, spec: dict[str, Any], workload: bytes, timeout: float) -> dict[str, Any]:
    """Run a client script on a spec (the workload goes in a file); its JSON answer."""
    with tempfile.TemporaryDirectory(prefix="gdriver-compat-") as tmp:
        (Path(tmp) / "workload").write_bytes(workload)
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps({**spec, "workload_file": str(Path(tmp) / "workload")}))
        proc = subprocess.run(
            [*_script(client), str(path)], capture_output=True, timeout=timeout, check=False
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{client} client exited {proc.returncode}: {proc.stderr.decode()}")
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _runs(client: str, out: dict[str, Any]) -> list[Run]:
    runs = []
    for r in out["runs"]:
        if client == "gear":
            # gear appends WORK_DATA, WORK_WARNING and WORK_COMPLETE payloads to one list
            data = [bytes.fromhex(d) for d in r["data"]]
            runs.append(
                Run(
                    result=None if r["failed"] else b"".join(data),
                    failed=r["failed"],
                    exception=r["exception"],
                    status=[tuple(s) for s in r["status"]],
                    data=data,
                    warnings=[b"(flag)"] if r["warning"] else [],
                )
            )
        else:
            runs.append(
                Run(
                    result=_hex(r["result"]),
                    failed=bool(r["failed"]),
                    exception=r["exception"],
                    status=[tuple(s) for s in r["status"]],
                    data=[bytes.fromhex(d) for d in r["data"]],
                    warnings=[bytes.fromhex(w) for w in r["warnings"]],
                )
            )
    return runs


def _pygearman(
    address: str, function: str, workload: bytes, unique: str | None, count: int
) -> list[Run]:
    import gearman

    # one client per submission: pygearman refuses two requests with one unique
    clients = [gearman.GearmanClient([address]) for _ in range(count)]
    try:
        reqs = [
            c.submit_job(function, workload, unique=unique, wait_until_complete=False)
            for c in clients
        ]
        for c, req in zip(clients, reqs, strict=True):
            c.wait_until_jobs_completed([req], poll_timeout=60)
    finally:
        for c in clients:
            c.shutdown()
    runs = []
    for req in reqs:
        status = req.status
        runs.append(
            Run(
                result=req.result if req.state == gearman.JOB_COMPLETE else None,
                failed=req.state == gearman.JOB_FAILED,
                exception=None if req.exception is None else req.exception.decode(),
                status=[(int(status["numerator"]), int(status["denominator"]))] if status else [],
                data=list(req.data_updates),
                warnings=list(req.warning_updates),
            )
        )
    return runs


def submit(
    client: str,
    address: str,
    function: str,
    workload: bytes = b"",
    unique: str | None = None,
    exceptions: bool = False,
    pair: bool = False,
    timeout: float = 90,
) -> list[Run]:
    """Foreground job(s) through a real client: one, or two at once with the same unique."""
    if client == "pygearman":
        return _pygearman(address, function, workload, unique, 2 if pair else 1)
    spec = {
        "server": address,
        "op": "pair" if pair else "do",
        "function": function,
        "unique": unique,
        "exceptions": exceptions,
    }
    return _runs(client, _external(client, spec, workload, timeout))


def submit_background(
    client: str, address: str, function: str, workload: bytes, unique: str
) -> None:
    """One background job through a real client."""
    if client == "pygearman":
        import gearman

        c = gearman.GearmanClient([address])
        try:
            c.submit_job(function, workload, unique=unique, background=True, poll_timeout=30)
        finally:
            c.shutdown()
        return
    spec = {"server": address, "op": "background", "function": function, "unique": unique}
    out = _external(client, spec, workload, 60)
    assert out.get("handle"), out


def php_do_normal(address: str, function: str, workload: bytes, exceptions: bool) -> dict[str, Any]:
    """PHP's synchronous doNormal: what it returns, its return code and error text."""
    spec = {"server": address, "op": "normal", "function": function, "exceptions": exceptions}
    out = _external("php", spec, workload, 60)
    normal: dict[str, Any] = out["normal"]
    return normal
