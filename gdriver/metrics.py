"""The supervisor's one Prometheus registry. Worker processes report to the supervisor over
their channel; nothing here uses prometheus_client's multiprocess mode.

Labels: ``job_name`` (a gdriver job), ``function`` (a gearmand function), ``server``. Never
``job``: Prometheus reserves it for the scrape target.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from gdriver import __version__

DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        jn = ["job_name"]
        self.processes = Gauge("gdriver_processes", "Worker processes of a job.", jn, registry=r)
        self.processes_busy = Gauge(
            "gdriver_processes_busy", "Worker processes running a job now.", jn, registry=r
        )
        self.processes_min = Gauge(
            "gdriver_processes_min", "Configured minimum processes.", jn, registry=r
        )
        self.processes_max = Gauge(
            "gdriver_processes_max", "Configured maximum processes.", jn, registry=r
        )
        self.processes_desired = Gauge(
            "gdriver_processes_desired", "The observer's latest target process count.", jn,
            registry=r,
        )  # fmt: skip
        fn = ["function"]
        self.queue_jobs = Gauge(
            "gdriver_queue_jobs",
            "Jobs waiting in gearmand (total - running, summed over servers). Identical on "
            "every replica: aggregate with max by (function).",
            fn,
            registry=r,
        )
        self.queue_running = Gauge(
            "gdriver_queue_running_jobs", "Jobs running, as gearmand reports.", fn, registry=r
        )
        self.queue_workers = Gauge(
            "gdriver_queue_workers", "Capable workers registered with gearmand.", fn, registry=r
        )
        self.unknown_jobs = Gauge(
            "gdriver_unknown_function_jobs",
            "Jobs waiting for functions no job of this gdriver serves.",
            fn,
            registry=r,
        )
        self.scaling = Counter(
            "gdriver_scaling_decisions",
            "Processes started (up) or stopped (down) by the observer and supervisor.",
            ["job_name", "direction", "reason"],
            registry=r,
        )
        self.jobs = Counter(
            "gdriver_jobs", "Jobs finished.", ["job_name", "function", "outcome"], registry=r
        )
        self.job_duration = Histogram(
            "gdriver_job_duration_seconds",
            "Time spent in a job, decode to encode.",
            ["job_name", "function"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.process_starts = Counter(
            "gdriver_process_starts", "Worker processes forked.", jn, registry=r
        )
        self.process_exits = Counter(
            "gdriver_process_exits", "Worker processes ended.", ["job_name", "reason"], registry=r
        )
        self.crash_backoffs = Counter(
            "gdriver_crash_loop_backoffs",
            "Times a job's process starts were delayed because its processes kept dying young.",
            jn,
            registry=r,
        )
        self.job_timeouts = Counter(
            "gdriver_job_timeouts", "Jobs stopped for running past their timeout.", jn, registry=r
        )
        self.gearmand_up = Gauge(
            "gdriver_gearmand_up", "1 if the last admin poll of this server worked.", ["server"],
            registry=r,
        )  # fmt: skip
        self.poll_duration = Histogram(
            "gdriver_observer_poll_duration_seconds",
            "Time to poll every gearmand's status.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.build_info = Gauge("gdriver_build_info", "gdriver version.", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self._functions: set[str] = set()
        self._unknown: set[str] = set()

    def set_queue(
        self,
        loads: dict[str, tuple[int, int, int]],
        unknown: dict[str, int],
    ) -> None:
        """Replace the queue gauges: function -> (waiting, running, workers)."""
        for fn in self._functions - set(loads):
            for g in (self.queue_jobs, self.queue_running, self.queue_workers):
                g.remove(fn)
        for fn, (waiting, running, workers) in loads.items():
            self.queue_jobs.labels(fn).set(waiting)
            self.queue_running.labels(fn).set(running)
            self.queue_workers.labels(fn).set(workers)
        self._functions = set(loads)
        for fn in self._unknown - set(unknown):
            self.unknown_jobs.remove(fn)
        for fn, n in unknown.items():
            self.unknown_jobs.labels(fn).set(n)
        self._unknown = set(unknown)

    def forget_job(self, job_name: str) -> None:
        for g in (
            self.processes,
            self.processes_busy,
            self.processes_min,
            self.processes_max,
            self.processes_desired,
        ):
            try:
                g.remove(job_name)
            except KeyError:
                pass
