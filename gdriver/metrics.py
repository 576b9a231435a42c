"""The supervisor's one Prometheus registry. Worker processes report to the supervisor over
their channel; nothing here uses prometheus_client's multiprocess mode.

Labels: ``job_name`` (a gdriver job), ``function`` (a gearmand function), ``server``. Never
``job``: Prometheus reserves it for the scrape target.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from gdriver import __version__
from gdriver.config import DURATION_BUCKETS
from gdriver.gearman import FunctionStatus


class Metrics:
    def __init__(self, duration_buckets: Sequence[float] = DURATION_BUCKETS) -> None:
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
            "gdriver_processes_desired",
            "The observer's latest target process count.",
            jn,
            registry=r,
        )
        self._queue_series(r)
        self._event_series(r, jn, tuple(duration_buckets))
        self.gearmand_up = Gauge(
            "gdriver_gearmand_up",
            "1 if the last admin poll of this server worked.",
            ["server"],
            registry=r,
        )
        self.resolver_failures = Counter(
            "gdriver_resolver_failures",
            "Failed lookups of a gearmand name (an error, no address, or no answer in time).",
            ["server"],
            registry=r,
        )
        self.resolver_restarts = Counter(
            "gdriver_resolver_restarts",
            "Restarts of the resolver process (it died, or a lookup in it never returned).",
            registry=r,
        )
        self.poll_duration = Histogram(
            "gdriver_observer_poll_duration_seconds",
            "Time to poll every gearmand's status.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.log_records_dropped = Counter(
            "gdriver_log_records_dropped",
            "Log records dropped while stdout's reader stalled (the queue past its hard cap).",
            registry=r,
        )
        self.build_info = Gauge("gdriver_build_info", "gdriver version.", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.function_info = Gauge(
            "gdriver_function_info",
            "1 for each function a job serves: joins job_name to function.",
            ["job_name", "function"],
            registry=r,
        )
        self._job_functions: dict[str, frozenset[str]] = {}
        # function -> its (waiting, running, workers) gauge children, as last set
        self._queue: dict[str, tuple[Gauge, Gauge, Gauge]] = {}
        self._unknown: dict[str, Gauge] = {}

    def _queue_series(self, r: CollectorRegistry) -> None:
        """What gearmand reports, per function."""
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

    def _event_series(
        self, r: CollectorRegistry, jn: list[str], buckets: tuple[float, ...]
    ) -> None:
        """Counters and histograms of what happened to jobs and processes."""
        self.scaling = Counter(
            "gdriver_scaling_decisions",
            "Processes started (up) or stopped (down) by the observer and supervisor.",
            ["job_name", "direction", "reason"],
            registry=r,
        )
        self.jobs = Counter(
            "gdriver_jobs", "Jobs finished.", ["job_name", "function", "outcome"], registry=r
        )
        self.job_duration = JobDurations(
            "gdriver_job_duration_seconds", "Time spent in a job, decode to encode.", buckets, r
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
        self.spawn_failures = Counter(
            "gdriver_spawn_failures",
            "Process starts that failed (fork, pipe or socketpair: fd or process limits).",
            jn,
            registry=r,
        )
        self.poison_jobs = Counter(
            "gdriver_poison_jobs",
            "Jobs failed without running them because their processes kept dying running them.",
            ["job_name", "function"],
            registry=r,
        )
        self.job_timeouts = Counter(
            "gdriver_job_timeouts", "Jobs stopped for running past their timeout.", jn, registry=r
        )

    def set_queue(self, status: Mapping[str, FunctionStatus], unknown: Mapping[str, int]) -> None:
        """Replace the queue gauges with gearmand's merged ``status`` (function -> row) and the
        ``unknown`` functions' waiting jobs. A function left out loses its series: after a
        round no server answered, pass empty maps."""
        queue = self._queue
        for fn in [fn for fn in queue if fn not in status]:
            del queue[fn]
            for g in (self.queue_jobs, self.queue_running, self.queue_workers):
                g.remove(fn)
        for fn, row in status.items():
            children = queue.get(fn)
            if children is None:
                children = queue[fn] = (
                    self.queue_jobs.labels(fn),
                    self.queue_running.labels(fn),
                    self.queue_workers.labels(fn),
                )
            children[0].set(row.waiting)
            children[1].set(row.running)
            children[2].set(row.workers)
        for fn in [fn for fn in self._unknown if fn not in unknown]:
            del self._unknown[fn]
            self.unknown_jobs.remove(fn)
        for fn, n in unknown.items():
            child = self._unknown.get(fn)
            if child is None:
                child = self._unknown[fn] = self.unknown_jobs.labels(fn)
            child.set(n)

    def set_functions(self, job_name: str, functions: Iterable[str]) -> None:
        """The functions a job serves now (``gdriver_function_info``); pairs it no longer
        has are removed."""
        new = frozenset(functions)
        old = self._job_functions.get(job_name, frozenset())
        for fn in old - new:
            self.function_info.remove(job_name, fn)
        for fn in new - old:
            self.function_info.labels(job_name, fn).set(1)
        self._job_functions[job_name] = new

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
        self.set_functions(job_name, ())
        del self._job_functions[job_name]


class DurationSeries:
    """One (job_name, function) histogram of :class:`JobDurations`: counts per bucket."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # the first bound >= seconds
        self.sum += seconds


class JobDurations:
    """``gdriver_job_duration_seconds``, a histogram per (job_name, function), exposed as
    prometheus_client's own Histogram exposes one (``_bucket``, ``_count``, ``_sum``,
    ``_created``) by a custom collector: its buckets are counted here, a list index per
    job, where Histogram.observe takes a lock and scans the buckets for every job (at tens
    of thousands of jobs a second, most of the supervisor's time)."""

    LABELS = ("job_name", "function")

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(float(b) for b in buckets)
        self.les = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self.series: dict[tuple[str, str], DurationSeries] = {}
        registry.register(self)

    def labels(self, job_name: str, function: str) -> DurationSeries:
        series = self.series.get((job_name, function))
        if series is None:
            series = self.series[(job_name, function)] = DurationSeries(self.bounds)
        return series

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.LABELS)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.LABELS)
        created = _created_series()
        for labels, series in self.series.items():
            buckets, running = [], 0
            for le, n in zip(self.les, series.counts, strict=True):
                running += n
                buckets.append((le, float(running)))
            family.add_metric(labels, buckets, series.sum)
            if created:
                names = dict(zip(self.LABELS, labels, strict=True))
                family.add_sample(f"{self.name}_created", names, series.created)
        yield family


def _created_series() -> bool:
    """Whether prometheus_client exports ``_created`` series (PROMETHEUS_DISABLE_CREATED_SERIES,
    ``disable_created_metrics()``): its own Histogram follows the same switch."""
    return bool(getattr(prometheus_metrics, "_use_created", True))
