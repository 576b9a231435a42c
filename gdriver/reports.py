"""What worker processes say over their channels (``gdriver.channel``), applied to the
supervisor's state: busy and idle, registrations, finished jobs and their counters, log
records to pass on, why a process stops."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gdriver import channel, logs
from gdriver.jobs import JobState, Process

if TYPE_CHECKING:
    from gdriver.supervisor import Driver


class Reports:
    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        # (job, function, outcome) -> the jobs counter and duration histogram series
        self.job_metrics: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def on_message(self, proc: Process, data: bytes) -> None:
        """One channel message of a worker process (``gdriver.channel``): registered, busy,
        a batch of finished jobs, idle, a log record to pass on, or why it stops. A busy
        report from a job whose every process is busy, below its max, asks the poller for
        an early round (sub-second scale-up). Messages that do not decode are dropped."""
        d = self.driver
        message = channel.decode(data)
        job = d.jobs.get(proc.job_name)
        if message is None or job is None:
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
                    and all(p.busy for p in job.live())
                ):
                    d.poller.request()
            case channel.Done(reports):
                proc.busy_since = now
                self.on_jobs_done(job, proc, reports)
            case channel.Idle():
                proc.busy = False
                proc.idle_since = now
            case channel.Log(line):
                logs.write_line(line + b"\n")
            case channel.Registered(servers):
                was = proc.registered
                proc.registered = servers > 0
                if proc.registered and not was and proc.idle_since is None:
                    proc.idle_since = now
            case channel.Exiting(reason):
                proc.stop_reason = proc.stop_reason or reason
            case channel.Poisoned(function, handle, unique):
                d.poison.failed(job.name, function, handle, unique)

    def on_jobs_done(self, job: JobState, proc: Process, reports: list[channel.JobReport]) -> None:
        now = time.time()
        d = self.driver
        cache = self.job_metrics
        for outcome, seconds, function, message in reports:
            proc.jobs_done += 1
            job.lastrun = now
            job.failures = 0
            if outcome != "complete":
                job.lasterror = now
                job.lasterror_msg = message.splitlines()[0] if message else outcome
            key = (job.name, function, outcome)
            children = cache.get(key)
            if children is None:  # labels() is costly: look each series up once
                children = cache[key] = (
                    d.metrics.jobs.labels(*key),
                    d.metrics.job_duration.labels(job.name, function),
                )
            children[0].inc()
            children[1].observe(seconds)
