"""What worker processes say over their channels (``gdriver.channel``), applied to the
supervisor's state: busy and idle, registrations, finished jobs and their counters, log
records to pass on, why a process stops."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from gdriver import channel, logs
from gdriver.jobs import JobState, Process
from gdriver.logs import log_event
from gdriver.metrics import DurationSeries
from gdriver.poison import function_of
from gdriver.slots import OUTCOME_CODE, OUTCOMES

if TYPE_CHECKING:
    from gdriver.supervisor import Driver

log = logging.getLogger("gdriver")
INF = float("inf")


class Reports:
    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        # (job, function, outcome) -> its series of the jobs counter
        self.job_counters: dict[tuple[str, str, str], Any] = {}

    def on_message(self, proc: Process, data: bytes) -> None:
        """One channel message of a worker process (``gdriver.channel``): registered, busy,
        a batch of finished jobs, idle, a log record to pass on, or why it stops. A busy
        report from a job whose every process is busy, below its max, asks the poller for
        an early round (sub-second scale-up). Messages that do not decode are dropped, the
        first of them logged (``bad_report``)."""
        d = self.driver
        message = channel.decode(data)
        job = d.jobs.get(proc.job_name)
        if job is None:
            return
        if message is None:
            self.bad_report(proc, "a message that does not decode", data)
            return
        now = time.monotonic()
        match message:
            case channel.Busy():
                proc.busy = True
                proc.busy_since = now
                if (
                    not d.stopping
                    and d.settings.interval > 0
                    and len(job.processes) < job.max_processes
                    and all(p.busy for p in job.processes.values() if not p.retiring)
                ):
                    d.poller.request()
            case channel.Done(first, records, errors, raw):
                if d.board.holds(proc.pid, first, raw) is False:
                    self.bad_report(proc, "a report of jobs its slot does not hold", data)
                    return
                proc.busy_since = now
                if first > proc.reported:  # a message was lost: its jobs are in the slot
                    self.on_jobs_done(job, proc, d.poison.unsent(proc, first, live=True))
                proc.reported = max(proc.reported, first + len(records))
                names = proc.functions
                reports = [
                    (OUTCOMES[code], seconds, function_of(names, method), errors.get(first + i, ""))
                    for i, (seconds, method, code) in enumerate(records)
                ]
                self.on_jobs_done(job, proc, reports)
            case channel.Idle():
                proc.busy = False
                proc.idle_since = now
            case channel.Log(line):
                logs.write_line(line + b"\n")
            case channel.Registered(servers):
                was = proc.registered
                proc.registered = servers > 0
                if proc.registered and not was:
                    if proc.idle_since is None:
                        proc.idle_since = now
                    if any(not w.functions.isdisjoint(job.functions) for w in d.wakers):
                        d.update_wakers()  # the process stands for the replica in gearmand
            case channel.GrabsRefused(servers):
                proc.grabs_refused = servers
            case channel.Exiting(reason):
                proc.stop_reason = proc.stop_reason or reason
            case channel.Poisoned(function):
                if function in proc.functions:
                    d.poison.failed(job.name, function, message)
                else:
                    self.bad_report(proc, "a poison job of another function", data)

    def on_jobs_done(
        self, job: JobState, proc: Process, reports: Iterable[tuple[str, float, str, str]]
    ) -> None:
        """Count a batch of finished jobs, (outcome, seconds, function, error) each: every
        duration into its histogram, and one increment of each (function, outcome) counter
        for the batch (a report message holds up to 64 jobs)."""
        now = time.time()
        metrics = self.driver.metrics
        name = job.name
        functions = proc.functions
        counted: dict[tuple[str, str], int] = {}
        durations: dict[str, DurationSeries] = {}
        for report in reports:
            outcome, seconds, function, message = report
            if outcome not in OUTCOME_CODE or function not in functions or not 0 <= seconds < INF:
                self.bad_report(proc, "a job report of another outcome or function", report)
                continue  # no series of a name its job does not have, no broken histogram
            key = (function, outcome)
            counted[key] = counted.get(key, 0) + 1
            series = durations.get(function)
            if series is None:
                series = durations[function] = metrics.job_duration.labels(name, function)
            series.observe(seconds)
            if outcome != "complete":
                job.lasterror = now
                job.lasterror_msg = message.splitlines()[0] if message else outcome
        if not counted:
            return
        job.lastrun = now
        cache = self.job_counters
        for (function, outcome), n in counted.items():
            proc.jobs_done += n
            counter = cache.get((name, function, outcome))
            if counter is None:  # labels() is costly: look each series up once
                counter = cache[(name, function, outcome)] = metrics.jobs.labels(
                    name, function, outcome
                )
            counter.inc(n)

    def bad_report(self, proc: Process, what: str, data: object) -> None:
        """Drop what a process sent that is not a report of its job (worker code can write
        to its channel); log the first of each process."""
        proc.bad_reports += 1
        if proc.bad_reports == 1:
            message = (f"process {proc.pid} sent {what}: dropped (and any more of its kind "
                       "from it, without a further record)")  # fmt: skip
            log_event(log, logging.WARNING, message, "bad_report", pid=proc.pid,
                      job_name=proc.job_name, data=repr(data)[:200])  # fmt: skip
