"""A worker process's job handler: outcomes and reports, without forking."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest

from gdriver import channel
from gdriver.gearman import Job, JobFailed
from gdriver.jobs import JobSpec, MethodSpec
from gdriver.process import Child
from gdriver.worker import Worker


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.settimeout(5)
    yield ours, theirs
    ours.close()
    theirs.close()


def run_one(pair: tuple[socket.socket, socket.socket], body: Any) -> channel.JobReport:
    ours, theirs = pair
    spec = JobSpec("t", Worker(), [MethodSpec("t.f", "f", body)])
    child = Child(spec, ours, 0, 0.0)
    handle = child.handler(spec.methods[0])
    job = Job(b"w", "t.f", "H:1", "")
    with pytest.raises(JobFailed):
        handle(job)
    child.report_idle()
    messages = [channel.decode(theirs.recv(65536)) for _ in range(3)]
    assert isinstance(messages[0], channel.Busy) and isinstance(messages[2], channel.Idle)
    done = messages[1]
    assert isinstance(done, channel.Done) and len(done.reports) == 1
    return done.reports[0]


def test_a_result_of_the_wrong_type_fails_the_job(pair: Any) -> None:
    report = run_one(pair, lambda worker, job, workload: 42)
    assert report.outcome == "fail"
    assert report.error.startswith("ResultTypeError: job t.f returned int")


def test_a_type_error_raised_by_the_job_is_an_exception(pair: Any) -> None:
    def body(worker: Any, job: Job, workload: Any) -> bytes:
        raise TypeError("job t.f returned int, says the job itself")

    report = run_one(pair, body)
    assert report.outcome == "exception"
