"""What the supervisor makes of its processes' channel messages (``gdriver.reports``): a real
supervisor object, its real slots and metrics, messages as a process (or worker code writing
to its channel) would send them."""

from __future__ import annotations

import logging
import struct

import pytest

from gdriver import slots
from gdriver.exits import Exit
from gdriver.jobs import JobSpec, JobState, MethodSpec, Process
from gdriver.supervisor import Driver
from gdriver.worker import Worker


def _body(worker: object, job: object, workload: object) -> None:
    return None


def done(first: int, records: list[tuple[float, int, int]], errors: bytes = b"") -> bytes:
    """A ``D`` message as a process sends it: (seconds, function index, outcome code) each."""
    head = b"D" + struct.pack("=QH", first, len(records))
    return head + b"".join(struct.pack("=dHB", *r) for r in records) + errors


def driver_with_job() -> tuple[Driver, JobState, Process]:
    d = Driver()
    spec = JobSpec("job", Worker(), [MethodSpec("f", "f", _body), MethodSpec("g", "g", _body)])
    job = d.jobs["job"] = JobState(spec, 1, 1)
    proc = Process(pid=4242, job_name="job", started=0.0, functions=tuple(spec.functions))
    job.processes[proc.pid] = proc
    return d, job, proc


def series(d: Driver, name: str) -> dict[tuple[str, str, str], float]:
    """(job_name, function, outcome) -> value of every sample called ``name``."""
    return {
        (s.labels["job_name"], s.labels["function"], s.labels.get("outcome", "")): s.value
        for family in d.metrics.registry.collect()
        for s in family.samples
        if s.name == name
    }


def test_reports_that_are_not_of_the_job_are_dropped_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d, job, proc = driver_with_job()
    forged = [
        done(0, [(0.5, 0, 0)], b"[[0, 5]]"),  # an error that is no text
        done(0, [(0.5, 0, 0)], b'[["0", "e"]]'),
        done(0, [(0.5, 0, 3)]),  # an outcome no job has
        done(0, [(0.5, 2, 0)]),  # a function not of this job (it has two)
        done(0, [(float("nan"), 0, 0), (-1.0, 0, 0)]),
        b"D" + struct.pack("=QH", 0, 2) + struct.pack("=dHB", 0.5, 0, 0),  # one record of two
        b'D0[["complete", 0.5, "f", ""]]',  # the JSON form of earlier releases
        b"D[]",
        b'P["other", "H:1", ""]',
    ]
    with caplog.at_level(logging.WARNING, logger="gdriver"):
        for data in forged:
            d.reports.on_message(proc, data)  # raises nothing
        d.reports.on_message(proc, done(0, [(0.5, 0, 0), (1.0, 1, 2)], b'[[1, "E: x\\ny"]]'))
    assert series(d, "gdriver_jobs_total") == {
        ("job", "f", "complete"): 1.0,
        ("job", "g", "exception"): 1.0,
    }
    assert series(d, "gdriver_job_duration_seconds_count") == {
        ("job", "f", ""): 1.0,
        ("job", "g", ""): 1.0,
    }
    assert series(d, "gdriver_poison_jobs_total") == {}
    assert job.lasterror_msg == "E: x" and proc.jobs_done == 2
    assert proc.bad_reports == len(forged) + 1  # the message of two bad reports: both
    bad = [r for r in caplog.records if getattr(r, "event", "") == "bad_report"]
    assert len(bad) == 1 and bad[0].pid == 4242  # type: ignore[attr-defined]


def test_a_lost_report_message_is_read_from_the_slot_and_nothing_twice() -> None:
    d, job, proc = driver_with_job()
    index = d.board.claim()
    child = slots.child_slot()  # the child's end, as after the fork
    d.board.bind(proc.pid, index)
    for n in range(6):  # the process finishes six jobs of f
        child.begin(0, "f", b"H:%d" % n, b"", 0.0)
        child.finish(0, 0.25)
    d.reports.on_message(proc, done(0, [(0.25, 0, 0)] * 2))
    # jobs 2 and 3: a message dropped by send() (EMSGSIZE, say): never arrives
    d.reports.on_message(proc, done(4, [(0.25, 0, 0)]))
    assert series(d, "gdriver_jobs_total") == {("job", "f", "complete"): 5.0}
    assert proc.reported == 5
    # it dies before sending job 5's report: read from its slot, the ones it sent are not
    death = d.poison.exited(proc, job, Exit("crash", status=1), d.reports.on_jobs_done)
    assert death.running is None
    assert series(d, "gdriver_jobs_total") == {("job", "f", "complete"): 6.0}
    assert series(d, "gdriver_job_duration_seconds_count") == {("job", "f", ""): 6.0}


def test_a_report_the_slot_does_not_hold_counts_nothing_and_nothing_twice() -> None:
    # worker code can write to its channel: a D message numbered beyond the jobs the process
    # finished had the supervisor read the slot for "lost" messages, count those jobs, then
    # count them again when their real report arrived; one with made-up records was counted
    d, _, proc = driver_with_job()
    index = d.board.claim()
    child = slots.child_slot()
    d.board.bind(proc.pid, index)
    for n in range(4):
        child.begin(0, "f", b"H:%d" % n, b"", 0.0)
        child.finish(0, 0.25)
    d.reports.on_message(proc, done(1000, [(0.25, 0, 0)]))  # jobs it never finished
    d.reports.on_message(proc, done(3, [(0.25, 0, 0)] * 2))  # one past the slot's count
    d.reports.on_message(proc, done(2, [(0.5, 0, 0)]))  # job 2 as it was not
    d.reports.on_message(proc, done(2, [(0.25, 1, 0)]))
    assert series(d, "gdriver_jobs_total") == {}
    assert proc.bad_reports == 4 and proc.reported == 0
    d.reports.on_message(proc, done(0, [(0.25, 0, 0)] * 4))  # the real report
    assert series(d, "gdriver_jobs_total") == {("job", "f", "complete"): 4.0}
    assert series(d, "gdriver_job_duration_seconds_count") == {("job", "f", ""): 4.0}
    assert proc.reported == 4 and proc.bad_reports == 4
    child.release()
