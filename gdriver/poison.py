"""Poison jobs: jobs whose worker processes die while running them.

gearmand hands the job of a worker whose connection drops to another worker, so a job that
kills its process (``os._exit``, a segfault, a timeout it blocks until SIGKILL) would kill
one process after another for ever. The supervisor reads from a dead process's slot
(``gdriver.slots``) the job it was running and counts the death against the job
(:class:`PoisonBook`): its function and unique, or its handle when it has no unique. The
jobs' deaths go into the table every process reads before each job (the TABLE most recent,
poisoned ones first), a job marked poisoned after ``poison_threshold`` deaths: the next
process that grabs it answers WORK_FAIL with a message saying why, without running it, tells
the supervisor (channel ``P``), which logs it once and counts it in
``gdriver_poison_jobs_total``. A process also counts the death of the process that ran the
job before it when that one is not reaped yet (``gdriver.slots``: the in-flight table), so
idle processes that gearmand hands the job to at once do not run it past the threshold; the
supervisor's count stays one per reaped death.

A job's deaths are forgotten KEEP_FOR seconds after the last one, and a job known by its
handle alone once it has been failed: gearmand numbers handles afresh when it restarts, so
the same handle soon names another job.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from gdriver import channel
from gdriver.channel import JobReport
from gdriver.exits import Exit
from gdriver.jobs import JobState, Process
from gdriver.logs import log_event
from gdriver.metrics import Metrics
from gdriver.slots import TABLE, Board, Finished, RunningJob, SlotState, job_key

log = logging.getLogger("gdriver")

KEPT = 4 * TABLE  # jobs whose deaths are remembered; the oldest are forgotten first
KEEP_FOR = 3600.0  # s after a job's last death: then its deaths are forgotten
ANSWERED_FOR = 60.0  # s a job known by its handle alone is not counted after it was failed
COUNTED = ("crash", "signal", "exit", "timeout")  # exits that are the running job's doing


@dataclasses.dataclass
class Record:
    """The deaths of one job (by function and unique, or by handle when it has no unique)."""

    job_name: str
    function: str
    handle: str
    unique: str
    key: int
    deaths: int = 0
    reaped: int = 0  # deaths the supervisor counted itself
    since: float = 0.0  # perf_counter time of the last death
    last: str = ""  # how the last process died: "signal SIGSEGV", "exit status 3"
    poisoned: bool = False


def describe(ended: Exit) -> str:
    """How a process ended, in a few words."""
    how = f"signal {ended.signal}" if ended.signal else f"exit status {ended.status}"
    return f"{how} after its timeout" if ended.reason == "timeout" else how


class PoisonBook:
    """The supervisor's count of deaths per job, and the poison table it publishes."""

    def __init__(
        self,
        board: Board,
        metrics: Metrics,
        threshold: Callable[[], int],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.board = board
        self.metrics = metrics
        self.threshold = threshold  # read at each death: a reload may change it
        self.clock = clock  # the processes compare the table's times with their perf_counter
        self.records: OrderedDict[int, Record] = OrderedDict()  # key -> record, oldest first
        self.counted: dict[int, tuple[Record, int]] = {}  # pid -> death counted at its stop
        self.answered: dict[int, float] = {}  # jobs known by handle a process failed: -> when
        board.set_threshold(threshold())  # for the processes (see gdriver.slots)

    def exited(
        self,
        proc: Process,
        job: JobState | None,
        ended: Exit,
        on_reports: Callable[[JobState, Process, list[JobReport]], None],
    ) -> Death:
        """A process was reaped (its channel read to the end): hand the reports it finished
        but never sent to ``on_reports``, count its death against the job it was running,
        free its slot (once the death is in the table the processes read)."""
        state = self.board.read(proc.pid, time.perf_counter())
        if job is not None:
            unsent = self.unsent(proc, 1 << 62, live=False)
            if unsent:
                on_reports(job, proc, unsent)
        try:
            return self.charge(proc, job, ended, state)
        finally:
            self.board.release(proc.pid)

    def charge(self, proc: Process, job: JobState | None, ended: Exit, state: SlotState) -> Death:
        """Count the death of a reaped process against the job its slot says it ran."""
        running = state.running
        counted = self.counted.pop(proc.pid, None)
        if counted is not None:  # stopped for its timeout: the death was counted then
            record, finished = counted
            if running is not None and state.finished == finished:  # it died in that job
                if record.last != describe(ended):
                    record.last = describe(ended)
                    self.publish()
                return Death(running, record.function, record)
            self.undo(record)  # it finished the job after all, before it ended
        if running is None or job is None:
            return Death(running)
        death = Death(running, function_of(proc.functions, running.method))
        if self.counts(running, ended):
            death.record = self.died(job.name, death.function, running, ended)
        return death

    def stopping(self, proc: Process, job: JobState) -> dict[str, object]:
        """The supervisor stops ``proc`` because its job ran past its timeout: the death is
        counted against the job now, before the signal (and published), not when the process
        is reaped. gearmand hands the job to another idle process of the function as soon as
        this one's connection closes, which is before the supervisor can reap it: a
        replacement already started, or a sibling. The log fields of the job."""
        state = self.board.read(proc.pid, time.perf_counter())
        running = state.running
        if running is None:
            return {}
        function = function_of(proc.functions, running.method)
        record = self.died(job.name, function, running, Exit("timeout", signal="SIGKILL"))
        self.counted[proc.pid] = (record, state.finished)
        return Death(running, function, record).fields()

    def undo(self, record: Record) -> None:
        """A death counted at a timeout stop did not happen: the process finished the job."""
        record.deaths -= 1
        record.reaped -= 1
        if record.deaths <= 0 and self.records.get(record.key) is record:
            del self.records[record.key]
        self.publish()  # (poisoned again as its deaths say)

    def unsent(self, proc: Process, end: int, live: bool) -> list[JobReport]:
        """The reports of ``proc``'s jobs from the first it has not sent (or whose message was
        lost) up to ``end``, as its slot still holds them."""
        found = self.board.finished_range(proc.pid, proc.reported, end, live)
        return [report_of(f, proc.functions) for f in found]

    @staticmethod
    def counts(running: RunningJob | None, ended: Exit) -> bool:
        """The death is the running job's doing: it crashed, took a signal, exited or ran past
        its timeout while running it (not a kill the supervisor decided for other reasons)."""
        return running is not None and ended.reason in COUNTED

    def died(self, job_name: str, function: str, running: RunningJob, ended: Exit) -> Record:
        """A process died running ``running``: one more death for it, poisoned at the
        threshold; the table is rewritten at once (the processes count on its deaths too),
        before any replacement is forked."""
        now = self.clock()
        self.expire(now)
        key = job_key(function, running.handle_bytes, running.unique_bytes)
        record = self.records.pop(key, None)
        if record is None:
            record = Record(job_name, function, running.handle, running.unique, key)
        # its process knew of ``running.deaths`` before it: a death reaped out of order (or
        # not yet reaped) is not missed, and none is counted twice
        record.reaped += 1
        record.deaths = max(record.deaths, record.reaped, running.deaths + 1)
        record.last = describe(ended)
        record.since = now
        threshold = self.threshold()
        if threshold and record.deaths >= threshold:
            record.poisoned = True  # (its deaths and last exit: the message says them)
        if key not in self.answered:  # (known by its handle, failed already: over)
            self.records[key] = record  # the most recent death last
            if len(self.records) > KEPT:
                self.records.popitem(last=False)
        self.publish()
        return record

    def expire(self, now: float) -> None:
        """Forget the jobs whose last death is KEEP_FOR old (the table is rewritten with the
        next death), and the answered ones after ANSWERED_FOR."""
        while self.records:
            record = next(iter(self.records.values()))
            if now - record.since < KEEP_FOR:
                break
            del self.records[record.key]
        for key, when in list(self.answered.items()):
            if now - when >= ANSWERED_FOR:
                del self.answered[key]

    def publish(self) -> None:
        """Write the jobs' deaths into the table the processes read, the poisoned ones first
        kept when there are more than it holds: each until KEEP_FOR after its last death (a
        process refuses it no more after that, table rewritten or not)."""
        threshold = self.threshold()
        for r in self.records.values():  # against the threshold now (a reload changes it)
            r.poisoned = bool(threshold and r.deaths >= threshold)
        poisoned = [r for r in self.records.values() if r.poisoned][-TABLE:]
        others = [r for r in self.records.values() if not r.poisoned]
        room = TABLE - len(poisoned)
        others = others[max(0, len(others) - room) :] if room else []
        entries = [(r.key, r.since + KEEP_FOR, r.deaths, r.last, r.poisoned)
                   for r in (*others, *poisoned)]  # fmt: skip
        self.board.set_poison(entries, threshold)

    def failed(self, job_name: str, function: str, poisoned: channel.Poisoned) -> None:
        """A process failed a poison job without running it: log it, count it. A job
        known by its handle alone is forgotten: gearmand has its answer, and after a restart
        the handle names another job (a death of it reaped later is not kept either)."""
        handle, unique = poisoned.handle, poisoned.unique
        key = job_key(function, *(s.encode("utf-8", "surrogateescape") for s in (handle, unique)))
        record = self.records.get(key)
        deaths, last = poisoned.deaths, poisoned.last
        if record is not None and record.deaths > deaths:
            deaths, last = record.deaths, record.last
        if not unique:
            self.answered[key] = self.clock()
            if self.records.pop(key, None) is not None:
                self.publish()
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


def function_of(functions: Sequence[str], method: int) -> str:
    """The function of a method index in a process's job (its own, from before any reload)."""
    return functions[method] if 0 <= method < len(functions) else "?"


def report_of(finished: Finished, functions: Sequence[str], error: str = "") -> JobReport:
    function = function_of(functions, finished.method)
    return JobReport(finished.outcome, finished.seconds, function, error)
