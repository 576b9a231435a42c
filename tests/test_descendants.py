"""Processes forked by job code, and jobs that break their process's descriptors, against a
real gdriver and a real gearmand: a fork that outlives its job must not hold its worker
process's gearmand connection (gearmand would keep a dead process's job "running" and never
hand it out again), ends when that process dies, and a job whose result never reaches
gearmand is not counted done: its process's death counts against it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import gearman
import pytest
from support import Gdriver, Gearmand, do, pid_alive, submit_background, wait_for
from test_poison import lines, metric

NS = ("--namespaces", "descendants.jobs")
RUN = "descendants.run"


def pids_of(ledger: Path, word: str) -> list[int]:
    return [int(x.split()[-1]) for x in lines(ledger) if x.startswith(word + " ")]


@pytest.fixture()
def forked() -> Iterator[list[int]]:
    """PIDs of the descendants a test provokes: each is killed at the end, by its PID."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def start(gearmand: Gearmand, ledger: Path, **config: object) -> Gdriver:
    options = {"worker_options": {"Descendants": {"ledger": str(ledger)}}, **config}
    g = Gdriver(gearmand, *NS, config=options, metrics=True).start()
    try:
        wait_for(lambda: gearmand.workers_for(RUN) == 1, 15)
    except BaseException:
        g.stop()
        raise
    return g


def run_forking(g: Gdriver, ledger: Path, kind: str, forked: list[int]) -> int:
    """Run a job that forks (``kind``); the PID of the process it forked."""
    assert do(g.server, RUN, kind.encode()).result == kind.encode()
    pid: int = wait_for(lambda: pids_of(ledger, kind), 10)[0]
    forked.append(pid)
    return pid


def test_a_fork_that_outlives_its_job_loses_no_job_and_ends_with_its_process(
    fresh_gearmand: Gearmand, tmp_path: Path, forked: list[int]
) -> None:
    ledger = tmp_path / "ledger"
    g = start(fresh_gearmand, ledger)
    try:
        child = run_forking(g, ledger, "fork", forked)
        worker = pids_of(ledger, "run")[0]
        assert pid_alive(child) and pid_alive(worker)
        # the next job hangs with its timeout's signals blocked: its process is SIGKILLed
        submit_background(fresh_gearmand.address, RUN, [b"hang"])
        # gearmand hands it out again (its connection closed with the dead process), the
        # fork ended with the process that forked it
        wait_for(lambda: len(pids_of(ledger, "run")) == 3, 30)
        assert not pid_alive(worker)
        wait_for(lambda: not pid_alive(child), 5)
        wait_for(lambda: fresh_gearmand.status()[RUN][:2] == (0, 0), 10)
        assert fresh_gearmand.workers_for(RUN) == 1  # max_processes 1: one connection
        exits = [r for r in g.records() if r.get("event") == "process_exited"]
        assert [r["reason"] for r in exits] == ["timeout"]
    finally:
        assert g.stop() == 0


def test_a_fork_that_returns_from_its_job_ends_there(
    fresh_gearmand: Gearmand, tmp_path: Path, forked: list[int]
) -> None:
    ledger = tmp_path / "ledger"
    g = start(fresh_gearmand, ledger)
    try:
        copy = run_forking(g, ledger, "copy", forked)
        wait_for(lambda: not pid_alive(copy), 10)  # (a zombie of its parent until it ends)
        worker = pids_of(ledger, "run")[0]
        # the process itself serves on, counted once
        assert do(fresh_gearmand.address, RUN, b"next").result == b"next"
        assert pids_of(ledger, "run") == [worker, worker]
        assert fresh_gearmand.workers_for(RUN) == 1
        labels = {"job_name": RUN, "function": RUN, "outcome": "complete"}
        wait_for(lambda: metric(g.metrics_port, "gdriver_jobs_total", **labels) == 2, 10)
        assert not any(r.get("event") == "process_exited" for r in g.records())
    finally:
        assert g.stop() == 0


def test_a_detached_daemon_keeps_running_without_the_workers_descriptors(
    fresh_gearmand: Gearmand, tmp_path: Path, forked: list[int]
) -> None:
    # the documented way out: double fork and setsid; it holds no socket of its worker
    ledger = tmp_path / "ledger"
    g = start(fresh_gearmand, ledger)
    try:
        daemon = run_forking(g, ledger, "daemon", forked)
    finally:
        assert g.stop() == 0
    time.sleep(0.5)
    assert pid_alive(daemon)
    links = [os.readlink(f"/proc/{daemon}/fd/{fd}") for fd in os.listdir(f"/proc/{daemon}/fd")]
    assert not any(link.startswith("socket:") for link in links), links


@pytest.mark.parametrize("breaks", ["closefds", "devnull"])
def test_a_job_that_breaks_its_descriptors_is_not_counted_done_and_is_poisoned(
    fresh_gearmand: Gearmand, tmp_path: Path, breaks: str
) -> None:
    ledger = tmp_path / "ledger"
    g = start(fresh_gearmand, ledger, poison_threshold=2)
    try:
        client = gearman.GearmanClient([fresh_gearmand.address])
        req = client.submit_job(RUN, breaks, poll_timeout=30)
        client.shutdown()
        assert req.state == "FAILED"
        warning = b"".join(req.warning_updates).decode()
        assert warning.startswith("poison job: 2 worker processes died running it"), warning
        assert len(pids_of(ledger, "run")) == 2
        labels = {"job_name": RUN, "function": RUN}
        wait_for(lambda: metric(g.metrics_port, "gdriver_jobs_total", **labels) == 1, 10)
        assert metric(g.metrics_port, "gdriver_jobs_total", outcome="complete", **labels) == 0
        deaths = [r for r in g.records() if r.get("event") == "process_exited"]
        assert [r.get("deaths") for r in deaths] == [1, 2]
        assert all(r["reason"] == "crash" and r["function"] == RUN for r in deaths)
    finally:
        assert g.stop() == 0


def test_a_job_that_breaks_its_descriptors_backs_off_as_a_crash_loop(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger"
    g = start(fresh_gearmand, ledger, poison_threshold=0)
    try:
        submit_background(fresh_gearmand.address, RUN, [b"closefds"])
        # each process dies young, having handed nothing to gearmand: the delay grows
        g.wait_log(lambda r: r.get("event") == "crash_loop_backoff" and r["failures"] >= 3, 20)
        labels = {"job_name": RUN, "function": RUN, "outcome": "complete"}
        assert metric(g.metrics_port, "gdriver_jobs_total", **labels) == 0
        assert len(pids_of(ledger, "run")) < 10
    finally:
        assert g.stop() == 0
