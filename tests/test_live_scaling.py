"""Live: scaling on backlog and back down, replacing killed processes, draining on SIGTERM."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from live_helpers import call, events, show_pids, wait_events, wait_registered
from support import Gdriver, Gearmand, do, pid_alive, submit_background, wait_for

S = "live.scaling.Scaling."


def test_scaling_replacement_and_drain(fresh_gearmand: Gearmand) -> None:
    gearmand = fresh_gearmand
    g = Gdriver(
        gearmand, "--namespaces", "live.scaling",
        "--interval", "0.5", "--max_idle_time", "1", "--graceful_timeout", "20",
    )  # fmt: skip
    g.start()
    try:
        wait_registered(gearmand, S + "steady", S + "inflight")
        check_killed_process_is_replaced(g, gearmand)
        check_scale_up_to_max_and_back_to_zero(g, gearmand)
        check_busy_group_process_is_not_stopped(g, gearmand)
        check_sigterm_drains_in_flight_job(g, gearmand)
    finally:
        g.stop()


def check_killed_process_is_replaced(g: Gdriver, gearmand: Gearmand) -> None:
    (old,) = show_pids(g, S + "steady")
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old), 5)
    new = wait_for(lambda: [p for p in show_pids(g, S + "steady") if p != old], 10)
    assert len(new) == 1 and pid_alive(new[0])
    assert show_pids(g, S + "steady") == new
    exited = g.wait_log(lambda r: r.get("event") == "process_exited" and r.get("pid") == old)
    assert exited["signal"] == "SIGKILL" and exited["reason"] == "signal"
    assert int(call(gearmand, S + "steady")) == new[0]


def check_scale_up_to_max_and_back_to_zero(g: Gdriver, gearmand: Gearmand) -> None:
    job = S + "slow"
    assert show_pids(g, job) == []
    submit_background(gearmand.address, job, [b"1.5"] * 6)
    seen: list[int] = []
    workers: list[int] = []

    def queue_done() -> bool:
        seen.append(len(show_pids(g, job)))
        workers.append(gearmand.workers_for(job))
        return gearmand.status().get(job, (0, 0, 0))[0] == 0

    wait_for(queue_done, 30, interval=0.1)
    assert max(seen) == 3, seen  # scaled up to max ...
    assert max(workers) <= 3, workers  # ... and never above it
    ups = wait_events(g, "scale", job_name=job, direction="up")
    assert {e["reason"] for e in ups} == {"backlog"}
    assert sum(e["count"] for e in ups) <= 6
    # the queue is empty: every process goes after max_idle_time (min is 0)
    wait_for(lambda: show_pids(g, job) == [], 15)
    started = sum(e["count"] for e in ups)

    def downs() -> list[dict[str, Any]]:
        found = events(g, "scale", job_name=job, direction="down")
        return found if sum(e["count"] for e in found) >= started else []

    assert {e["reason"] for e in wait_for(downs, 10)} == {"idle"}
    assert sum(e["count"] for e in downs()) == started
    assert g.console(f"show {job}")[0].split()[1:4] == ["0", "3", "0"]


def check_busy_group_process_is_not_stopped(g: Gdriver, gearmand: Gearmand) -> None:
    """Perl §6.3: a group's process busy on one function was stopped as idle because the
    other function had no queue; the client then waited forever."""
    job = S + "group"
    assert g.console(f"show {job}")[0].split()[1:4] == ["0", "1", "0"]  # min 0 kept in a group
    first = int(call(gearmand, S + "group_slow", b"1.5"))
    # used again at once (well within max_idle_time): the same process, not stopped meanwhile
    assert int(call(gearmand, S + "group_slow", b"1.5")) == first
    assert int(call(gearmand, S + "group_fast")) == first
    wait_for(lambda: not pid_alive(first), 15)  # then stopped once idle
    exits = wait_events(g, "process_exited", job_name=job)
    assert [(r["pid"], r["reason"]) for r in exits] == [(first, "retired")]
    stopped = events(g, "scale", job_name=job, direction="down")
    assert [(r["reason"], r["count"]) for r in stopped] == [("idle", 1)]


def check_sigterm_drains_in_flight_job(g: Gdriver, gearmand: Gearmand) -> None:
    outcome: dict[str, Any] = {}

    def client() -> None:
        outcome["req"] = do(gearmand.address, S + "inflight", b"2", timeout=30)

    (worker,) = show_pids(g, S + "inflight")
    pids = {p for line in g.console("status") for p in show_pids(g, line.split()[0])}
    assert worker in pids
    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    wait_for(lambda: gearmand.status().get(S + "inflight", (0, 0, 0))[1] == 1, 10)
    submit_background(gearmand.address, S + "inflight", [b"0"])  # queued behind it
    assert gearmand.status()[S + "inflight"][:2] == (2, 1)
    os.kill(g.pid, signal.SIGTERM)
    assert g.proc is not None
    assert g.proc.wait(30) == 0
    thread.join(30)
    wait_events(g, "stopped")  # the last record: every earlier one has been read too
    req = outcome["req"]
    assert req.state == "COMPLETE"
    assert req.result == f"finished {worker}".encode()
    exited = [r for r in events(g, "process_exited") if r["pid"] == worker]
    assert [(r["reason"], r.get("status")) for r in exited] == [("retired", 0)]  # not killed
    for pid in pids:
        assert not pid_alive(pid), pid
    # the draining process did not take the queued job; nothing is registered any more
    wait_for(lambda: gearmand.status()[S + "inflight"] == (1, 0, 0), 10)
    stopping = [r for r in g.records() if r.get("event") == "stopping"]
    assert stopping and stopping[0]["reason"] == "SIGTERM"
    assert not [r for r in g.records() if r.get("event") == "drain_timeout"]
