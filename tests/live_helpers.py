"""Helpers shared by the tests/test_live_*.py files."""

from __future__ import annotations

from typing import Any

from support import Gdriver, Gearmand, do, wait_for

FAST = ("--interval", "0.5", "--loglevel", "DEBUG")

# pygearman request states
COMPLETE = "COMPLETE"
FAILED = "FAILED"


def call(server: Gearmand | str, function: str, workload: bytes | str = b"") -> bytes:
    """A foreground job that must succeed; its result."""
    address = server.address if isinstance(server, Gearmand) else server
    req = do(address, function, workload)
    assert req.state == COMPLETE, (function, req.state, list(req.warning_updates))
    result: bytes = req.result
    return result


def call_failing(server: Gearmand | str, function: str, workload: bytes | str = b"") -> Any:
    """A foreground job that must fail; the request (warning_updates holds the message)."""
    address = server.address if isinstance(server, Gearmand) else server
    req = do(address, function, workload)
    assert req.state == FAILED, (function, req.state, req.result)
    return req


def show_pids(g: Gdriver, job_name: str) -> list[int]:
    """The PIDs the console's `show` lists for a job."""
    lines = g.console(f"show {job_name}")
    assert lines and lines[0].startswith(job_name + "  "), lines
    return [int(x) for x in lines[1:]]


def status_line(g: Gdriver, job_name: str) -> str:
    for line in g.console("status"):
        if line.startswith(job_name + " "):
            return line
    raise AssertionError(f"no status line for {job_name}")


def wait_registered(gearmand: Gearmand, *functions: str, timeout: float = 20) -> None:
    """Wait until gearmand has a worker for every function."""
    wait_for(lambda: all(gearmand.workers_for(f) > 0 for f in functions), timeout)


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()


def events(g: Gdriver, event: str, **match: Any) -> list[dict[str, Any]]:
    return [
        r
        for r in g.records()
        if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
    ]


def wait_events(g: Gdriver, event: str, timeout: float = 10, **match: Any) -> list[dict[str, Any]]:
    """events(), waiting until there is at least one (the output is read by a thread)."""
    found: list[dict[str, Any]] = wait_for(lambda: events(g, event, **match), timeout)
    return found
