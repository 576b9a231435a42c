"""A worker process's job handler: outcomes and reports, without forking; and what a worker
process does with jobs that raise or are too large, on a real gearmand."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from support import Gdriver, Gearmand, do, wait_for

from gdriver import channel, process
from gdriver.gearman import Job, JobFailed
from gdriver.jobs import JobSpec, MethodSpec
from gdriver.process import Child
from gdriver.slots import OUTCOMES
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
    child.answered(True)  # (the worker sent the failure to gearmand)
    child.report_idle()
    messages = [channel.decode(theirs.recv(65536)) for _ in range(3)]
    assert isinstance(messages[0], channel.Busy) and isinstance(messages[2], channel.Idle)
    done = messages[1]
    assert isinstance(done, channel.Done) and len(done.records) == 1
    ((seconds, method, code),) = done.records
    error = done.errors.get(done.first, "")
    return channel.JobReport(OUTCOMES[code], seconds, spec.functions[method], error)


def test_an_alarm_in_the_disarm_fails_the_job_with_its_report(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the job's timeout fires as the job ends, between its last bytecode and the alarm's
    # disarm: the job fails as a timeout, and its end reaches the slot and the supervisor (it
    # was answered WORK_FAIL with no report: the slot said it was still running, so the
    # process's end counted as a death of a job gearmand had its answer for)
    calls: list[float] = []

    def setitimer(which: int, seconds: float, interval: float = 0.0) -> tuple[float, float]:
        calls.append(seconds)  # (no real alarm: this process has no handler for it)
        if calls == [5.0, 0]:  # the job's disarm, once
            raise process.JobTimeout("job exceeded its timeout")
        return 0.0, 0.0

    monkeypatch.setattr(process.signal, "setitimer", setitimer)
    spec = JobSpec("t", Worker(), [MethodSpec("t.f", "f", lambda worker, job, data: b"done")])
    spec.timeout = 5.0
    ours, theirs = pair
    child = Child(spec, ours, 0, 0.0)
    with pytest.raises(JobFailed, match="JobTimeout"):
        child.handler(spec.methods[0])(Job(b"w", "t.f", "H:1", ""))
    assert calls == [5.0, 0]
    child.answered(True)
    assert child.slot.done == 1 and child.stop_requested and child.stop_reason == "timeout"
    child.report_idle()
    done = [channel.decode(theirs.recv(65536)) for _ in range(3)][1]
    assert isinstance(done, channel.Done) and len(done.records) == 1
    assert OUTCOMES[done.records[0][2]] == "exception"
    assert done.errors[done.first].startswith("JobTimeout")


def test_a_result_of_the_wrong_type_fails_the_job(pair: Any) -> None:
    report = run_one(pair, lambda worker, job, workload: 42)
    assert report.outcome == "fail"
    assert report.error.startswith("ResultTypeError: job t.f returned int")


def test_a_type_error_raised_by_the_job_is_an_exception(pair: Any) -> None:
    def body(worker: Any, job: Job, workload: Any) -> bytes:
        raise TypeError("job t.f returned int, says the job itself")

    report = run_one(pair, body)
    assert report.outcome == "exception"


@pytest.mark.parametrize(
    "error",
    [KeyboardInterrupt("typed ^C"), asyncio.CancelledError("gone"), GeneratorExit(), SystemExit(3)],
    ids=["KeyboardInterrupt", "CancelledError", "GeneratorExit", "SystemExit"],
)
def test_a_base_exception_fails_the_job_not_the_process(pair: Any, error: BaseException) -> None:
    def body(worker: Any, job: Job, workload: Any) -> bytes:
        raise error

    ours, theirs = pair
    spec = JobSpec("t", Worker(), [MethodSpec("t.f", "f", body)])
    child = Child(spec, ours, 0, 0.0)
    with pytest.raises(JobFailed) as failed:
        child.handler(spec.methods[0])(Job(b"w", "t.f", "H:1", ""))
    child.answered(True)  # (the worker sent the failure to gearmand)
    child.report_idle()
    reports = [channel.decode(theirs.recv(65536)) for _ in range(3)][1]
    assert isinstance(reports, channel.Done) and OUTCOMES[reports.records[0][2]] == "exception"
    name = type(error).__name__
    if isinstance(error, SystemExit):
        # the job asked for its process to end: it fails, then the process exits cleanly
        assert failed.value.message == b"job called exit(3)"
        assert (child.stop_requested, child.stop_reason) == (True, "exit")
    else:
        assert (failed.value.message or b"").startswith(name.encode())
        assert not child.stop_requested and child.stop_reason == ""


# -- in a real worker process, on a real gearmand ------------------------------------------------


@pytest.fixture(scope="module")
def raising(gearmand: Gearmand) -> Iterator[Gdriver]:
    g = Gdriver(gearmand, "--namespaces", "raising", config={"max_packet_size": 1 << 20})
    g.start()
    try:
        wait_for(lambda: gearmand.workers_for("raising.base") > 0, 20)
        yield g
    finally:
        assert g.stop() == 0  # the stop signal still ends every process cleanly


@pytest.mark.parametrize("kind", ["cancelled", "interrupt", "generator", "own"])
def test_base_exceptions_in_jobs_keep_the_process(
    raising: Gdriver, gearmand: Gearmand, kind: str
) -> None:
    pid = do(gearmand.address, "raising.pid", b"").result
    req = do(gearmand.address, "raising.base", kind.encode())
    assert req.state == "FAILED"
    (message,) = req.warning_updates
    name = {"cancelled": b"CancelledError", "interrupt": b"KeyboardInterrupt"}.get(kind)
    assert message.startswith(name or (b"GeneratorExit" if kind == "generator" else b"Stubborn"))
    assert do(gearmand.address, "raising.pid", b"").result == pid


def test_max_packet_size_reaches_the_worker_processes(raising: Gdriver, gearmand: Gearmand) -> None:
    pid = do(gearmand.address, "raising.pid", b"").result
    req = do(gearmand.address, "raising.pid", b"z" * (2 << 20), timeout=30)
    assert req.state == "FAILED"
    (message,) = req.warning_updates
    assert b"larger than max_packet_size (1048576 bytes)" in message
    assert do(gearmand.address, "raising.pid", b"").result == pid  # same process, same link
    wait_for(lambda: "max_packet_size" in (raising.console("show raising.raising")[0]), 10)


def test_a_rejected_job_of_a_function_the_job_lacks_counts_under_none_of_its_functions(
    pair: Any,
) -> None:
    # only a broken server assigns a function a worker did not register: its failure must
    # not be counted as a failure of the job's first function
    ours, theirs = pair
    spec = JobSpec("t", Worker(), [MethodSpec("t.f", "f", lambda worker, job, workload: b"")])
    child = Child(spec, ours, 0, 0.0)
    child.rejected("t.other", "H:1", "job packet of 99 bytes is larger than max_packet_size")
    done = channel.decode(theirs.recv(65536))
    assert isinstance(done, channel.Done)
    ((_, method, code),) = done.records
    assert method == len(spec.functions) and OUTCOMES[code] == "fail"
    assert done.errors == {0: "job packet of 99 bytes is larger than max_packet_size"}
