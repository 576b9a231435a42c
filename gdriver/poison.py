"""Poison jobs: jobs whose worker processes die while running them.

gearmand hands the job of a worker whose connection drops to another worker, so a job that
kills its process (``os._exit``, a segfault, a timeout it blocks until SIGKILL) would kill
one process after another for ever. The supervisor reads from a dead process's slot
(``gdriver.slots``) the job it was running and counts the death against the job's handle and
unique (:class:`PoisonBook`). After ``poison_threshold`` deaths the job goes into the poison
table every process reads before each job: the next process that grabs it answers WORK_FAIL
with a message saying why, without running it, tells the supervisor (channel ``P``), which
logs it once and counts it in ``gdriver_poison_jobs_total``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from gdriver.channel import JobReport
from gdriver.exits import Exit
from gdriver.jobs import JobSpec, JobState, Process
from gdriver.logs import log_event
from gdriver.metrics import Metrics
from gdriver.slots import TABLE, Board, RunningJob, job_keys

log = logging.getLogger("gdriver")

KEPT = 4 * TABLE  # jobs whose deaths are remembered; the oldest are forgotten first
COUNTED = ("crash", "signal", "exit", "timeout")  # exits that are the running job's doing


@dataclasses.dataclass
class Record:
    """The deaths of one job (by handle, and by unique when it has one)."""

    job_name: str
    function: str
    handle: str
    unique: str
    keys: tuple[int, int]
    deaths: int = 0
    last: str = ""  # how the last process died: "signal SIGSEGV", "exit status 3"
    poisoned: bool = False
    failed: int = 0  # times a process failed it as poison


def describe(ended: Exit) -> str:
    """How a process ended, in a few words."""
    how = f"signal {ended.signal}" if ended.signal else f"exit status {ended.status}"
    return f"{how} after its timeout" if ended.reason == "timeout" else how


class PoisonBook:
    """The supervisor's count of deaths per job, and the poison table it publishes."""

    def __init__(self, board: Board, metrics: Metrics, threshold: Callable[[], int]) -> None:
        self.board = board
        self.metrics = metrics
        self.threshold = threshold  # read at each death: a reload may change it
        self.records: dict[int, Record] = {}  # key (handle's or unique's) -> its record
        self.order: list[Record] = []  # oldest first

    def exited(
        self,
        proc: Process,
        job: JobState | None,
        ended: Exit,
        on_reports: Callable[[JobState, Process, list[JobReport]], None],
    ) -> Death:
        """A process was reaped (its channel read to the end): hand the reports it finished
        but never sent to ``on_reports``, count its death against the job it was running,
        free its slot."""
        state = self.board.read(proc.pid, time.perf_counter())
        if job is not None:
            unsent = self.board.finished_since(proc.pid, proc.jobs_done)
            if unsent:
                on_reports(job, proc, [JobReport(f.outcome, f.seconds,
                           function_of(job.spec, f.method), "") for f in unsent])  # fmt: skip
        self.board.release(proc.pid)
        running = state.running
        if running is None or job is None:
            return Death(running)
        death = Death(running, function_of(job.spec, running.method))
        if self.counts(running, ended):
            death.record = self.died(job.name, death.function, running, ended)
        return death

    def running(self, proc: Process, job: JobState) -> dict[str, object]:
        """The log fields of the job a live process runs now (none between jobs)."""
        running = self.board.read(proc.pid, time.perf_counter()).running
        return Death(running, function_of(job.spec, running.method) if running else "").fields()

    @staticmethod
    def counts(running: RunningJob | None, ended: Exit) -> bool:
        """The death is the running job's doing: it crashed, took a signal, exited or ran past
        its timeout while running it (not a kill the supervisor decided for other reasons)."""
        return running is not None and ended.reason in COUNTED

    def died(self, job_name: str, function: str, running: RunningJob, ended: Exit) -> Record:
        """A process died running ``running``: one more death for it; poisoned at the
        threshold (the table is rewritten at once, before any replacement is forked)."""
        keys = job_keys(function, running.handle_bytes, running.unique_bytes)
        record = self.records.get(keys[0]) or (self.records.get(keys[1]) if keys[1] else None)
        if record is None:
            record = Record(job_name, function, running.handle, running.unique, keys)
            self.remember(record)
        elif keys[0] not in self.records:  # the same unique under a new handle
            self.records[keys[0]] = record
        record.deaths += 1
        record.last = describe(ended)
        threshold = self.threshold()
        if threshold and record.deaths >= threshold and not record.poisoned:
            record.poisoned = True
            self.publish()
        elif record.poisoned:
            self.publish()  # its deaths and last exit, as the message says them
        return record

    def remember(self, record: Record) -> None:
        for key in record.keys:
            if key:
                self.records[key] = record
        self.order.append(record)
        if len(self.order) > KEPT:
            old = self.order.pop(0)
            for key in [k for k, r in self.records.items() if r is old]:
                del self.records[key]
            if old.poisoned:
                self.publish()

    def publish(self) -> None:
        """Write the poisoned jobs into the table the processes read."""
        entries = [(r.keys[0], r.keys[1], r.deaths, r.last) for r in self.order if r.poisoned]
        self.board.set_poison(entries)

    def failed(self, job_name: str, function: str, handle: str, unique: str) -> None:
        """A process failed a poisoned job without running it: log it, count it."""
        keys = job_keys(function, *(s.encode("utf-8", "surrogateescape") for s in (handle, unique)))
        record = self.records.get(keys[0]) or (self.records.get(keys[1]) if keys[1] else None)
        deaths, last = (record.deaths, record.last) if record is not None else (0, "")
        if record is not None:
            record.failed += 1
        self.metrics.poison_jobs.labels(job_name, function).inc()
        message = (
            f"poison job {function} {handle} failed without running it: {deaths} worker "
            f"processes died running it (last: {last})"
        )
        log_event(log, logging.ERROR, message, "poison_job", job_name=job_name,
                  function=function, handle=handle, unique=unique, deaths=deaths,
                  last_exit=last)  # fmt: skip


@dataclasses.dataclass
class Death:
    """What a reaped process's slot said: the job it was running (None: between jobs), its
    function, and the job's death record when the death counts against the job."""

    running: RunningJob | None = None
    function: str = ""
    record: Record | None = None

    def fields(self) -> dict[str, object]:
        """The log fields of the job it was running."""
        if self.running is None:
            return {}
        out: dict[str, object] = {
            "function": self.function,
            "handle": self.running.handle,
            "unique": self.running.unique,
            "job_seconds": round(self.running.seconds, 3),
        }
        if self.record is not None:
            out["deaths"] = self.record.deaths
            out["poisoned"] = self.record.poisoned
        return out

    def error(self, pid: int, ended: Exit) -> str:
        """The console's last error for this exit."""
        text = f"process {pid} ended by {describe(ended)}"
        if self.running is not None:
            text += (
                f" running {self.function} {self.running.handle} for {self.running.seconds:.1f}s"
            )
        if self.record is not None:
            text += f" (death {self.record.deaths} of that job"
            text += ", poisoned)" if self.record.poisoned else ")"
        return text


def function_of(spec: JobSpec, method: int) -> str:
    return spec.methods[method].function if 0 <= method < len(spec.methods) else "?"
