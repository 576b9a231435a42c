"""Replicas against one real gearmand: each starts its share of a backlog, not all of it.

The waker of each replica is a registered worker of the job in gearmand's ``status``, so each
replica knows how many capable workers there are fleet-wide and how many of them are its own
(``gdriver.observer``); without that, every replica started a process for every waiting job.
The figures at scale (3 replicas, 30 and 90 jobs) are the ``fleet`` section of ``make bench``.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

from support import Gdriver, Gearmand, submit_background, wait_for
from test_reliability import metric

FN = "obs.metered.Metered.slow"  # min 0; each job sleeps its workload's seconds
MAX = 6  # per replica: together they could start twice the backlog


def worker_processes(g: Gdriver) -> int:
    """The replica's worker processes (its children but the resolver process)."""
    assert g.proc is not None
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            if (
                int(fields[1]) == g.proc.pid
                and b"[resolver]" not in (stat.parent / "cmdline").read_bytes()
            ):
                count += 1
        except (OSError, ValueError, IndexError):
            continue  # it ended meanwhile
    return count


def test_two_replicas_start_their_share_of_a_backlog_not_all_of_it(
    fresh_gearmand: Gearmand,
) -> None:
    attributes = json.dumps({
        FN: {"min_processes": 0, "max_processes": MAX},
        "obs.metered.Metered.outcomes": {"min_processes": 0},  # the module's other job: none
    })  # fmt: skip
    args = ["--namespaces", "obs.metered", "--max_idle_time", "0"]
    args += ["--job_runtime_attributes", attributes]
    replicas = [Gdriver(fresh_gearmand, *args) for _ in range(2)]
    try:
        for g in replicas:
            g.start()
        # both wakers registered, no process of the job yet
        wait_for(lambda: fresh_gearmand.status().get(FN, (0, 0, 0))[2] == 2, 20)
        wait_for(lambda: not any(worker_processes(g) for g in replicas), 20)
        submit_background(fresh_gearmand.address, FN, [b"1.0"] * MAX)
        peak, done, deadline = 0, False, time.monotonic() + 15
        while time.monotonic() < deadline and not done:
            peak = max(peak, sum(worker_processes(g) for g in replicas))
            total, running, _ = fresh_gearmand.status().get(FN, (0, 0, 0))
            done = total == 0 and running == 0
            time.sleep(0.02)
        assert done, "the backlog was not drained in 15 s"
        # every replica starting all of it: 2 x 6 = 12 processes for 6 jobs
        assert 0 < peak <= MAX * 1.2, peak
    finally:
        for g in replicas:
            assert g.stop() == 0


def test_the_waker_stands_for_the_replica_until_a_new_process_registers(
    fresh_gearmand: Gearmand,
) -> None:
    """Between a process's fork and its registration, gearmand would otherwise count none of
    the replica's workers for the job: another replica's observer then saw itself alone and
    started processes for the whole backlog (test above: a peak of 9 for 6 jobs, now and
    then)."""
    fn = "obs.latecomer.Latecomer.work"
    g = Gdriver(fresh_gearmand, "--namespaces", "obs.latecomer").start()
    try:
        wait_for(lambda: fresh_gearmand.workers_for(fn) == 1, 20)  # the waker
        submit_background(fresh_gearmand.address, fn, [b"x"])
        wait_for(lambda: worker_processes(g) >= 1, 10)  # forked; registers 1.5 s later
        workers, total = [], 1
        deadline = time.monotonic() + 10
        while total and time.monotonic() < deadline:
            total, _, n = fresh_gearmand.status().get(fn, (0, 0, 0))
            workers.append(n)
            time.sleep(0.05)
        assert total == 0, "the job was not done in 10 s"
        # a waker re-arming drops and re-registers its functions in one write: one sample of
        # 0 may catch that; before, 0 from the fork until the registration (1.5 s)
        assert not any(a == b == 0 for a, b in itertools.pairwise(workers)), workers
    finally:
        assert g.stop() == 0


def test_a_process_that_does_not_register_is_stood_for_a_while_without_a_poll_storm(
    fresh_gearmand: Gearmand,
) -> None:
    """A new process that does not register (its after_fork hangs): the waker stands for
    the job at most WAKER_STAND s, and it is not armed meanwhile (armed, gearmand woke it at
    once for the queued job after every poll round: a poll every 0.2 s)."""
    from gdriver.supervisor import WAKER_STAND

    fn = "obs.latecomer.Latecomer.work"
    config = {"worker_options": {"Latecomer": {"delay": 60}}, "graceful_timeout": 2}
    args = ("--namespaces", "obs.latecomer", "--interval", "30")
    g = Gdriver(fresh_gearmand, *args, metrics=True, config=config).start()
    try:
        wait_for(lambda: fresh_gearmand.workers_for(fn) == 1, 20)  # the waker
        submit_background(fresh_gearmand.address, fn, [b"x"])
        wait_for(lambda: worker_processes(g) >= 1, 10)
        forked = time.monotonic()
        polls = metric(g.metrics_port, "gdriver_observer_poll_duration_seconds_count")
        time.sleep(3)
        more = metric(g.metrics_port, "gdriver_observer_poll_duration_seconds_count") - polls
        assert more <= 2, more  # before: 15 or so
        assert fresh_gearmand.workers_for(fn) == 1  # the waker stands for the job
        wait_for(lambda: fresh_gearmand.workers_for(fn) == 0, WAKER_STAND + 5)
        assert time.monotonic() - forked >= WAKER_STAND - 1
    finally:
        g.stop()
