"""The supervisor: one process, one event loop; forks, watches, scales and drains workers.

Signals are only queued by their handlers and dispatched in the loop by ``handle_signals``
(SIGHUP reloads, the stop signals drain). No thread is ever started here, so forking is safe.
The admin polling of gearmand lives in ``poller.py``, each child's pipes in ``childio.py``,
the meaning of an exit in ``exits.py``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import selectors
import signal
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry

from gdriver import config, exits, loader, observer, process, reload, resolver, resources, spawn
from gdriver.attributes import PROCESS_LIMIT
from gdriver.childio import Children
from gdriver.jobs import JobSpec, JobState, Process
from gdriver.logs import WRITER as LOG_WRITER
from gdriver.logs import log_event
from gdriver.loop import EventLoop
from gdriver.metrics import Metrics
from gdriver.poison import PoisonBook
from gdriver.poller import Concern, GearmandPoller, Status
from gdriver.reports import Reports
from gdriver.resolver import Resolver
from gdriver.slots import Board
from gdriver.systemd import Notifier
from gdriver.waker import Waker
from gdriver.worker import Worker

log = logging.getLogger("gdriver")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT)  # ABRT: as Perl
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGCHLD)
KILL_GRACE = 3.0  # s between TERM and KILL for a hung job
WAKER_STAND = 10.0  # s a waker stands for a job whose new processes have not registered yet


class Driver:
    """The supervisor, also the programmatic API (``add_job``, ``get_job``, ``has_job``,
    ``get_jobs``, ``run``, ``shutdown``), like Perl's Gearman::Driver."""

    def __init__(
        self,
        settings: config.Settings | None = None,
        *,
        wanted: Callable[[str], bool] | None = None,
        reload_settings: Callable[[], config.Settings] | None = None,
        **options: Any,
    ) -> None:
        self.settings = settings if settings is not None else config.load(base=options, environ={})
        self.wanted = wanted
        self.reload_settings = reload_settings
        self.jobs: dict[str, JobState] = {}
        self.manual_specs: list[JobSpec] = []
        self.loaded = False
        self.loop = EventLoop()
        self.metrics = Metrics(self.settings.duration_buckets)
        self.notifier = Notifier()
        self.procs: dict[int, Process] = {}
        self.children = Children()  # pid -> its channel socket and output pipes
        self.signals: list[int] = []
        self.step_errors: dict[str, float] = {}  # "step:error" -> when last logged
        self.stopping = False
        self.stop_deadline = 0.0
        self.generation = 0
        self.wakers: list[Waker] = []
        self.resolver = Resolver(self.loop, self.children.broadcast, metrics=self.metrics)
        s = self.settings
        self.poller = GearmandPoller(self.loop, self.metrics, self.on_status, s.servers, s.interval,
                                     self.concern)  # fmt: skip
        self.removed_jobs: set[str] = set()
        self.last_unknown: dict[str, int] = {}
        self.ready = False
        self.spawn_failures = spawn.SpawnFailures(self.metrics)
        self.reports = Reports(self)  # what the processes say over their channels
        self.board = Board(PROCESS_LIMIT)  # each process's running job, shared with it
        self.poison = PoisonBook(self.board, self.metrics, lambda: self.settings.poison_threshold)
        self._wake_r = self._wake_w = -1
        self._last_housekeeping = 0.0

    # -- programmatic API ----------------------------------------------------------------------
    def add_job(
        self,
        name: str,
        worker: Worker,
        methods: Iterable[Mapping[str, Any]],
        min_processes: int | None = None,
        max_processes: int | None = None,
        **limits: Any,
    ) -> JobState:
        """Register a job by hand. ``methods``: dicts with ``name``, ``body`` (called as
        ``body(worker, job, workload)``; a bound method as ``body(job, workload)``), and
        optional ``encode``/``decode``. Names get the worker's prefix."""
        spec = loader.manual_spec(name, worker, methods, min_processes, max_processes, limits)
        low, high = spec.min_processes, spec.max_processes
        loader.check_unique([*(j.spec for j in self.jobs.values()), spec])
        self.manual_specs.append(spec)
        job = JobState(spec, low, high)
        self.jobs[spec.name] = job
        log.debug("added job %s (min %d, max %d)", spec.name, low, high)
        return job

    def get_job(self, name: str) -> JobState | None:
        return None if name in self.removed_jobs else self.jobs.get(name)

    def has_job(self, name: str) -> bool:
        return self.get_job(name) is not None

    def get_jobs(self) -> list[JobState]:
        """The jobs, sorted by name (not those a reload removed and that still drain)."""
        return [self.jobs[k] for k in sorted(self.jobs) if k not in self.removed_jobs]

    def shutdown(self) -> None:
        """Graceful stop, as SIGTERM."""
        self.signals.append(signal.SIGTERM)

    def load(self) -> None:
        """Import the namespaces and build the jobs (raises loader.LoadError)."""
        if self.loaded:
            return
        with contextlib.suppress(ValueError):  # not the main thread: the caller's signals
            signal.signal(signal.SIGHUP, self._on_signal)  # a reload once running, not death
        for spec in self.load_specs(self.settings):
            self.jobs[spec.name] = JobState(spec, spec.min_processes, spec.max_processes)
            low, high = spec.min_processes, spec.max_processes
            log.debug("added job %s (min %d, max %d)", spec.name, low, high)
        self.loaded = True

    def load_specs(self, s: config.Settings) -> list[JobSpec]:
        """The jobs of the namespaces ``s`` names, beside the jobs added by hand (raises
        loader.LoadError: at start and for a reload)."""
        specs = loader.load(
            s.namespaces, s.lib, s.worker_options, s.job_runtime_attributes, s.server, self.wanted
        )
        loader.check_unique([*self.manual_specs, *specs])
        return specs

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; returns the exit status (0 after a graceful stop)."""
        self.load()
        self.setup()
        log_event(
            log,
            logging.INFO,
            "gdriver started",
            "started",
            jobs=sorted(self.jobs),
            server=self.settings.server,
        )
        for job in self.get_jobs():
            self.update_static_gauges(job)
            self.ensure_min(job, "min")
        self.loop.call_later(0.2, self.poller.start)
        max_wait = 1.0
        if self.notifier.watchdog_interval:
            max_wait = min(max_wait, self.notifier.watchdog_interval / 2)
        while True:
            self.loop.run_once(max_wait)
            for step in (self.handle_signals, self.reap, self.housekeeping):
                self.guarded(step)
            if self.stopping and not self.procs:
                break
        self.teardown()
        log_event(log, logging.INFO, "gdriver stopped", "stopped", status=0)
        return 0

    def guarded(self, step: Callable[[], None]) -> None:
        """Run one step of the loop; an error in it is logged (once a minute per kind), and
        the loop goes on: the next turn runs the step again."""
        try:
            step()
        except Exception as exc:
            now = time.monotonic()
            key = f"{step.__name__}:{type(exc).__name__}:{exc}"
            if now - self.step_errors.get(key, -60.0) >= 60.0:
                self.step_errors[key] = now
                log.exception("supervisor step %s failed; carrying on", step.__name__)

    def setup(self) -> None:
        """Listen (``resources.StartError`` when a port is taken: nothing else started yet),
        raise the descriptor limit, install the signal handlers, start the resolver."""
        LOG_WRITER.attach(self.loop, self.metrics.log_records_dropped.inc)  # never blocks it
        self.listen()
        self.check_resources()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)
        self.loop.add(self._wake_r, selectors.EVENT_READ, self._drain_wakeup)
        s = self.settings
        resolver.install(self.resolver)  # names resolve off the loop from now on
        self.resolver.start()
        self.resolver.watch(s.servers)
        self.resolver.settle(0.5)  # /etc/hosts answers in ms: the first workers know their servers
        self.make_wakers()
        process.warm_up()
        gc.collect()
        gc.freeze()  # keep the imported code's pages shared after fork

    def listen(self) -> None:
        from gdriver.console import ConsoleServer
        from gdriver.http import HttpServer

        s = self.settings
        wanted = [("console", ConsoleServer, s.console_bind, s.console_port),
                  ("metrics", HttpServer, s.metrics_bind, s.metrics_port)]  # fmt: skip
        for what, server, host, port in wanted:
            if not port:
                continue
            try:
                server(self, host, port)  # joins self.loop.servers
            except OSError as exc:
                for listener in list(self.loop.servers):
                    listener.close()
                raise resources.bind_error(what, host, port, exc) from None

    def check_resources(self) -> None:
        """The most processes the jobs may run, against the descriptor limit."""
        s = self.settings
        most = min(s.max_total_processes, sum(j.max_processes for j in self.jobs.values()))
        connections = sum(x.max_connections for x in self.loop.servers)
        resources.check_nofile(most, len(s.servers), connections)

    def make_wakers(self) -> None:
        for w in self.wakers:
            w.close()
        self.wakers = []
        if self.settings.interval > 0:
            self.wakers = [Waker(s, self.loop, self.poller.request) for s in self.settings.servers]

    def teardown(self) -> None:
        for w in self.wakers:
            w.close()
        for listener in list(self.loop.servers):
            with contextlib.suppress(Exception):
                listener.close()
        self.poller.close()
        self.resolver.close()
        resolver.install(None)
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        LOG_WRITER.detach()  # what is queued is written at exit, with a bounded wait
        self.loop.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum != signal.SIGCHLD:
            self.signals.append(signum)

    def _drain_wakeup(self, mask: int) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._wake_r, 4096):
                pass

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGHUP:
                reload.handle_hup(self)
            else:
                self.begin_stop(exits.signal_name(signum))

    def begin_stop(self, why: str) -> None:
        if self.stopping:
            log.info("already draining (%s)", why)
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.settings.graceful_timeout
        self.notifier.notify_stopping()
        message = "draining: in-flight jobs finish, then exit"
        log_event(
            log,
            logging.INFO,
            message,
            "stopping",
            reason=why,
            processes=len(self.procs),
            graceful_timeout=self.settings.graceful_timeout,
        )
        self.poller.stop()
        for w in self.wakers:
            w.close()
        self.wakers = []
        for proc in list(self.procs.values()):
            self.stop_process(proc, "shutdown")

    def forget_removed(self, job: JobState) -> None:
        """A job dropped by a reload leaves the tables once its last process is gone."""
        if job.name in self.removed_jobs and not job.processes:
            self.removed_jobs.discard(job.name)
            del self.jobs[job.name]
            self.metrics.forget_job(job.name)
            self.spawn_failures.forget(job.name)

    # -- processes -----------------------------------------------------------------------------
    def child_fds(self) -> list[int]:
        """Descriptors of the supervisor that a new child must close."""
        fds = [self.loop.fileno(), self._wake_r, self._wake_w, *self.poller.fds()]
        fds.extend(self.resolver.fds())
        fds.extend(self.children.fds())
        for listener in self.loop.servers:
            fds.extend(listener.fds())
        for waker in self.wakers:
            fds.extend(waker.fds())
        return fds

    def spawn(self, job: JobState, reason: str) -> Process | None:
        """Fork one worker process of ``job`` (``spawn.fork_worker``); returns it, or None
        when it cannot: max_total_processes reached, or the fork or its pipes failed (the
        job then backs off, ``spawn.SpawnFailures``). The supervisor records the process and
        reads its channel and output from the loop (``on_message``, ``childio.ChildIO``)."""
        if len(self.procs) >= self.settings.max_total_processes:
            return None
        max_jobs, lifetime = recycle_limits(job.spec, self.settings)
        slot = self.board.claim()
        try:
            pid, io = spawn.fork_worker(job.spec, self.settings.servers, self.child_fds(),
                                        HANDLED_SIGNALS, max_jobs, lifetime,
                                        self.settings.protocol)  # fmt: skip
        except OSError as exc:
            self.board.unclaim(slot)
            job.next_start = time.monotonic() + self.spawn_failures.failed(job.name, exc)
            return None
        self.board.bind(pid, slot)
        self.spawn_failures.started(job.name)
        now = time.monotonic()
        proc = Process(pid=pid, job_name=job.name, started=now, generation=self.generation,
                       functions=tuple(job.functions))  # fmt: skip
        job.processes[pid] = proc
        self.procs[pid] = proc
        io.attach(self.loop, pid, job.name, partial(self.reports.on_message, proc))
        self.children[pid] = io
        self.metrics.process_starts.labels(job.name).inc()
        log_event(log, logging.INFO, "process started", "process_started", pid=pid,
                  job_name=job.name, reason=reason)  # fmt: skip
        return proc

    def stop_process(self, proc: Process, reason: str, sig: int = signal.SIGTERM) -> None:
        """Ask a process to stop: it finishes its current job first (SIGTERM, and EOF on its
        channel for code that ignores SIGTERM; ``escalate`` kills it if it stays)."""
        if not proc.retiring:
            proc.retiring = True
            proc.term_sent = time.monotonic()
            self.board.stopped(proc.pid)  # its death, if it comes, is not the job's (slots)
            proc.stop_reason = proc.stop_reason or reason
            io = self.children.get(proc.pid)
            if io is not None:
                io.stop_child()
        proc.kill_sent = proc.kill_sent or sig == signal.SIGKILL
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    def ensure_min(self, job: JobState, reason: str) -> None:
        """Start processes up to min now, unless the crash-loop backoff says wait."""
        if self.stopping:
            return
        missing = job.min_processes - len(job.live())
        if missing <= 0:
            return
        if time.monotonic() >= job.next_start:
            started = 0
            while started < missing and self.spawn(job, reason) is not None:
                started += 1
            if started:
                self.metrics.scaling.labels(job.name, "up", reason).inc(started)
            if started == missing or time.monotonic() >= job.next_start:
                return  # all started, or max_total_processes reached: a poll retries
        if job.backoff_timer is None:  # crash-loop or failed-start backoff: retry then

            def retry(j: JobState = job) -> None:
                j.backoff_timer = None
                self.ensure_min(j, "replace")

            job.backoff_timer = self.loop.call_at(job.next_start, retry)

    # -- reaping -------------------------------------------------------------------------------
    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self.procs.pop(pid, None)
            if proc is not None:
                self.on_exit(proc, status)
            else:  # the resolver's, or an orphan reparented to us (PID 1): just reaped
                self.resolver.exited(pid, status)

    def on_exit(self, proc: Process, status: int) -> None:
        """A reaped worker process: read its last words, drop it from its job, log and count
        the exit (``exits.classify``), and replace it.

        Unasked deaths of young processes (``exits.crash_loop``) delay the job's next start,
        longer for each one in a row. Retired and killed processes are replaced only up to
        min; a job a reload removed leaves the tables with its last process."""
        now = time.monotonic()
        io = self.children.pop(proc.pid, None)
        if io is not None:
            io.close()
        job = self.jobs.get(proc.job_name)
        if job is not None:
            job.processes.pop(proc.pid, None)
        ended = exits.classify(status, proc.retiring, proc.stop_reason)
        # its slot: the reports it never sent, the job it was running (counted against it)
        death = self.poison.exited(proc, job, ended, self.reports.on_jobs_done)
        young = exits.died_young(now - proc.started, proc.jobs_done)
        if death.record is not None and self.settings.poison_threshold:
            young = False  # poison_threshold bounds these deaths: backoff would starve the job
        level = logging.WARNING if ended.warns(young) or death.record else logging.INFO
        log_event(
            log,
            level,
            "process exited",
            "process_exited",
            pid=proc.pid,
            job_name=proc.job_name,
            **ended.fields(),
            **death.fields(),
        )
        self.metrics.process_exits.labels(proc.job_name, ended.reason).inc()
        if job is None:
            return
        if job.name in self.removed_jobs:
            self.forget_removed(job)
            return
        if ended.reason == "timeout":
            self.metrics.job_timeouts.labels(job.name).inc()
        if ended.warns(young) or death.record is not None or ended.signal == "SIGKILL":
            job.lasterror, job.lasterror_msg = time.time(), death.error(proc.pid, ended)
        if not (self.stopping and young):  # draining: no backoff
            job.failures, delay = exits.crash_loop(job.failures, ended, young)
            if delay:
                self.back_off(job, now + delay, delay)
        self.ensure_min(job, "min" if ended.reason in ("retired", "killed") else "replace")

    def back_off(self, job: JobState, until: float, delay: float) -> None:
        job.next_start = until
        self.metrics.crash_backoffs.labels(job.name).inc()
        at = time.strftime("%H:%M:%S", time.gmtime(time.time() + delay))
        job.lasterror = time.time()  # the console shows the backoff in the error column
        job.lasterror_msg = (
            f"crash-loop backoff, next start in {delay:.2f}s at {at}: {job.lasterror_msg}"
        )
        message = f"processes of job {job.name} keep dying young; next start in {delay:.2f}s"
        log_event(
            log,
            logging.WARNING,
            message,
            "crash_loop_backoff",
            job_name=job.name,
            failures=job.failures,
            delay=delay,
        )

    # -- the observer --------------------------------------------------------------------------
    def on_status(self, status: Status | None) -> None:
        """A poll round finished (``status`` None: no server answered): scale, re-arm the
        wakers for the functions still without a process."""
        try:
            self.observe(status)
        except Exception:  # the next round is scheduled after this returns: never stop it
            log.exception("observer: scaling failed; the next poll tries again")
        # looked at again for the processes this round started; standing for a job, an armed
        # waker would be woken at once while the job is queued, a poll after every round
        if not self.update_wakers():
            for w in self.wakers:
                w.arm()

    def job_views(self) -> list[observer.JobView]:
        views = []
        for job in self.get_jobs():
            procs = tuple(
                observer.ProcessView(p.pid, p.busy, p.idle_since if p.registered else None)
                for p in job.live()
            )
            # gearmand counts a waker registering the job's functions as one of its workers
            fns = job.functions
            wakers = sum(w.connected and not w.functions.isdisjoint(fns) for w in self.wakers)
            views.append(
                observer.JobView(
                    job.name,
                    job.min_processes,
                    job.max_processes,
                    tuple(job.functions),
                    procs,
                    wakers,
                )
            )
        return views

    def observe(self, status: Status | None) -> None:
        if self.stopping:
            return
        decision = observer.decide(
            status if self.settings.interval > 0 else None,
            self.job_views(),
            time.monotonic(),
            self.settings.max_idle_time,
            servers=self.poller.answered,
        )
        self.apply(decision)
        # no server answered: no queue series, a stale backlog would fire alerts and scale
        self.metrics.set_queue(status or {}, decision.unknown)
        if status is not None:
            for fn, n in sorted(decision.unknown.items()):
                if fn not in self.last_unknown:  # once per sighting, the gauge tells the rest
                    message = f"jobs queued for a function no job serves: {fn} ({n} waiting)"
                    log_event(
                        log, logging.WARNING, message, "unknown_function", function=fn, count=n
                    )
            self.last_unknown = dict(decision.unknown)

    def concern(self) -> Concern:
        """The functions the poller keeps: ours, and those ``watch_functions`` names."""
        return Concern.of((j.spec for j in self.get_jobs()), self.settings.watch_functions)

    def apply(self, decision: observer.Decision) -> None:
        for start in decision.starts:
            job = self.jobs[start.job_name]
            if start.reason == "min":
                self.ensure_min(job, "min")
                continue
            if time.monotonic() < job.next_start:
                continue  # crash-loop backoff: no forks for this job yet
            n = 0
            while n < start.count and self.spawn(job, start.reason) is not None:
                n += 1
            if n:
                self.metrics.scaling.labels(job.name, "up", start.reason).inc(n)
                self.log_scale(job, "up", n, start.reason)
        for stop in decision.stops:
            job = self.jobs[stop.job_name]
            stopped = 0
            for pid in stop.pids:
                proc = job.processes.get(pid)
                if proc is not None and not proc.busy and not proc.retiring:
                    self.stop_process(proc, stop.reason)
                    stopped += 1
            if stopped:  # a process that turned busy since the poll is left alone
                self.metrics.scaling.labels(job.name, "down", stop.reason).inc(stopped)
                self.log_scale(job, "down", stopped, stop.reason)
        for name, target in decision.desired.items():
            self.metrics.processes_desired.labels(name).set(target)

    def log_scale(self, job: JobState, direction: str, count: int, reason: str) -> None:
        message = f"scaling job {job.name} {direction} by {count} ({reason})"
        log_event(log, logging.INFO, message, "scale", job_name=job.name, direction=direction,
                  count=count, reason=reason)  # fmt: skip

    # -- commands (console) --------------------------------------------------------------------
    def limits_problem(self, job: JobState, low: int, high: int) -> str:
        limits = {j.name: (j.min_processes, j.max_processes) for j in self.get_jobs()}
        limits[job.name] = (low, high)
        return config.check_jobs_total(self.settings.max_total_processes, limits)

    def set_limits(self, job: JobState, low: int, high: int) -> None:
        """New min/max, applied at once: start up to min, retire idle surplus above max."""
        job.min_processes, job.max_processes = low, high
        self.update_static_gauges(job)
        self.ensure_min(job, "min")
        live = job.live()
        if len(live) > high:
            decision = observer.decide(
                None, [v for v in self.job_views() if v.name == job.name], time.monotonic(), 0.0
            )
            self.apply(decision)

    def kill_pids(self, pids: Iterable[int]) -> None:
        for pid in pids:
            proc = self.procs.get(pid)
            if proc is not None:
                self.stop_process(proc, "killed_by_console")

    # -- housekeeping --------------------------------------------------------------------------
    def housekeeping(self) -> None:
        now = time.monotonic()
        self.notifier.watchdog(now)
        if now - self._last_housekeeping < 0.1:
            return
        self._last_housekeeping = now
        if self.stopping and now >= self.stop_deadline and self.procs:
            message = f"graceful_timeout reached; killing {len(self.procs)} process(es)"
            log_event(log, logging.WARNING, message, "drain_timeout")
            for proc in list(self.procs.values()):
                self.stop_process(proc, "drain_timeout", signal.SIGKILL)
            self.stop_deadline = now + 5.0
            return
        for job in list(self.jobs.values()):
            self.enforce_timeouts(job, now)  # during a drain too
            self.escalate(job, now)
            if not self.stopping:
                self.roll(job)
        if self.stopping:
            return
        self.update_wakers()
        for w in self.wakers:
            w.tick(now)
        if self.children.behind:
            self.children.resend(self.resolver.messages())
        self.update_readiness()

    def update_wakers(self) -> bool:
        """Wakers watch the functions of jobs that have no process (and may have one). They
        keep watching a job's functions until one of its new processes has registered them,
        for at most WAKER_STAND s after the newest one's start: until then gearmand would
        count none of this replica's workers for them, and another replica's observer would
        take the whole backlog for itself. Returns whether they stand for such a job (then
        they are not to be armed)."""
        standing = False
        if self.wakers:
            watched = frozenset().union(*(w.functions for w in self.wakers))
            now = time.monotonic()
            idle = []
            for j in self.jobs.values():
                if j.max_processes <= 0:
                    continue
                live = j.live()
                if not live:
                    idle.append(j)
                elif not (j.registered_count or watched.isdisjoint(j.functions)) and any(
                    now - p.started < WAKER_STAND for p in live
                ):
                    idle.append(j)
                    standing = True
            functions = {fn for j in idle for fn in j.functions}
            for w in self.wakers:
                w.set_functions(functions)
        return standing

    def enforce_timeouts(self, job: JobState, now: float) -> None:
        """A job past its timeout (and KILL_GRACE more: the process's own alarm failed):
        SIGTERM, then SIGKILL after KILL_GRACE s; while draining too."""
        limit = job.spec.timeout
        for proc in list(job.processes.values()):
            if proc.kill_sent:
                continue
            if proc.stop_reason == "timeout":
                if proc.retiring and now - proc.term_sent > KILL_GRACE:
                    self.stop_process(proc, "timeout", signal.SIGKILL)
            elif limit and proc.busy and now - proc.busy_since > limit + KILL_GRACE:
                message = f"job {job.name} ran past its timeout of {limit}s; stopping process"
                log_event(log, logging.WARNING, message, "timeout", pid=proc.pid,
                          job_name=job.name, **self.poison.stopping(proc, job))  # fmt: skip
                proc.stop_reason = "timeout"
                self.stop_process(proc, "timeout")

    def escalate(self, job: JobState, now: float) -> None:
        """A process told to stop that is still there KILL_GRACE s (at most graceful_timeout)
        after its job ended ignores SIGTERM and its channel's EOF: SIGKILL."""
        grace = min(KILL_GRACE, self.settings.graceful_timeout)
        for proc in list(job.processes.values()):
            if not proc.retiring or proc.busy or proc.kill_sent:
                continue
            if now - max(proc.term_sent, proc.idle_since or 0.0) > grace:
                message = f"process {proc.pid} of job {job.name} ignored its stop; killing it"
                log_event(log, logging.WARNING, message, "stop_ignored", pid=proc.pid,
                          job_name=job.name, reason=proc.stop_reason)  # fmt: skip
                self.stop_process(proc, proc.stop_reason, signal.SIGKILL)

    def roll(self, job: JobState) -> None:
        """After a reload, replace processes of older generations one at a time."""
        old = [p for p in job.live() if p.generation != self.generation]
        if not old:
            return
        if any(p.retiring and p.stop_reason == "reload" for p in job.processes.values()):
            return
        old.sort(key=lambda p: (p.busy, p.idle_since or 0.0))
        self.stop_process(old[0], "reload")
        self.ensure_min(job, "replace")

    def update_static_gauges(self, job: JobState) -> None:
        self.metrics.processes_min.labels(job.name).set(job.min_processes)
        self.metrics.processes_max.labels(job.name).set(job.max_processes)
        self.metrics.set_functions(job.name, job.functions)

    # -- what the console and HTTP see (gdriver.control.Control) ----------------------------------
    def pids(self) -> Collection[int]:
        return self.procs.keys()

    def scrape(self) -> CollectorRegistry:
        # the process gauges are refreshed here, for their only reader
        for job in self.get_jobs():
            self.metrics.processes.labels(job.name).set(len(job.processes))
            self.metrics.processes_busy.labels(job.name).set(job.busy_count)
        return self.metrics.registry

    def loop_lag(self) -> float:
        return time.monotonic() - self.loop.last_tick

    def is_ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        refused = sorted({p.job_name for p in self.procs.values() if p.grabs_refused})
        if refused:  # a job queued there would never be served; the cause of what follows
            return False, f"gearmand refuses grabs of: {', '.join(refused)}"
        missing = [j.name for j in self.get_jobs() if j.registered_count < j.min_processes]
        if missing:
            return False, f"jobs without their min processes registered: {', '.join(missing)}"
        if not self.poller.any_up() and not any(p.registered for p in self.procs.values()):
            return False, "no gearmand answers"
        return True, "ok"

    def update_readiness(self) -> None:
        ready, why = self.is_ready()
        if ready and not self.ready:
            log_event(log, logging.INFO, "ready", "ready")
        elif self.ready and not ready and not self.stopping:  # once per episode
            log_event(log, logging.WARNING, f"not ready: {why}", "not_ready", reason=why)
        self.ready = ready
        if ready:
            self.notifier.notify_ready()
        busy = sum(1 for p in self.procs.values() if p.busy)
        queued = sum(s.waiting for s in self.poller.last_status.values())
        # systemd keeps READY=1 once sent: the status line tells when it no longer holds
        self.notifier.notify_status(
            ("" if ready else f"not ready ({why}): ")
            + f"{len(self.jobs)} jobs, {len(self.procs)} processes, {busy} busy, {queued} queued"
        )


def recycle_limits(spec: JobSpec, settings: config.Settings) -> tuple[int, float]:
    """A new process's job count and lifetime before it is recycled (0: never): the job's
    own, else the global settings, plus up to 10 % jitter so processes do not all recycle
    at once."""
    max_jobs = spec.max_jobs_per_process
    if max_jobs is None:
        max_jobs = settings.max_jobs_per_process
    lifetime = spec.max_process_lifetime
    if lifetime is None:
        lifetime = settings.max_process_lifetime
    if max_jobs:
        max_jobs += random.randint(0, max(1, max_jobs // 10))
    if lifetime:
        lifetime += random.uniform(0, lifetime * 0.1)
    return max_jobs, lifetime
