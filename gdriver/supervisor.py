"""The supervisor: one process, one event loop; forks, watches, scales and drains workers.

Signals are only queued by their handlers and dispatched in the loop (``handle_<name>``).
No thread is ever started here, so forking is safe.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import os
import random
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

from gdriver import config, loader, logs, observer, process
from gdriver.gearman import AdminRequest, FunctionStatus, parse_status
from gdriver.jobs import JobSpec, JobState, MethodSpec, Process
from gdriver.loop import EventLoop
from gdriver.metrics import Metrics
from gdriver.systemd import Notifier
from gdriver.waker import Waker
from gdriver.worker import Worker, name_prefix

log = logging.getLogger("gdriver")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP, signal.SIGCHLD)
YOUNG = 2.0  # s: a process dying sooner than this, without finishing a job, died young
BACKOFF_BASE = 0.25
BACKOFF_MAX = 30.0
REPOLL_MIN_GAP = 0.2  # s between observer polls triggered by busy processes
KILL_GRACE = 3.0  # s between TERM and KILL for a hung job
OUTPUT_LINE_MAX = 64 * 1024


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
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.procs: dict[int, Process] = {}
        self.fds: dict[int, dict[str, Any]] = {}  # pid -> channel socket and output pipes
        self.signals: list[int] = []
        self.stopping = False
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.generation = 0
        self.listeners: list[Any] = []  # objects with fds(); closed in children
        self.wakers: list[Waker] = []
        self.poll_requests: list[AdminRequest] = []
        self.poll_started = 0.0
        self.poll_timer: Any = None
        self.repoll_wanted = False
        self.gearmand_up: dict[str, bool] = {}
        self.last_status: Mapping[str, FunctionStatus] = {}
        self.job_metrics: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.removed_jobs: set[str] = set()
        self.last_unknown: dict[str, int] = {}
        self.ready = False
        self.started = time.time()
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
        if not isinstance(worker, Worker):
            raise TypeError("worker must be an instance of gdriver.Worker")
        prefix = name_prefix(worker)
        specs = []
        for m in methods:
            body = m["body"]
            if inspect.ismethod(body):
                bound = body
                body = lambda _w, job, workload, _b=bound: _b(job, workload)  # noqa: E731
            try:
                encode = loader.coder_name(worker, m.get("encode"), "encode", "encode", m["name"])
                decode = loader.coder_name(worker, m.get("decode"), "decode", "decode", m["name"])
            except loader.LoadError as exc:
                raise ValueError(str(exc)) from None
            specs.append(MethodSpec(prefix + m["name"], m["name"], body, encode, decode))
        if not specs:
            raise ValueError(f"job {prefix + name}: no methods")
        low = 1 if min_processes is None else min_processes
        high = max(1, low) if max_processes is None else max_processes
        for what, value in (("min_processes", low), ("max_processes", high)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"job {prefix + name}: {what} must be an integer >= 0")
        if low > high:
            raise ValueError(f"job {prefix + name}: min_processes {low} > max_processes {high}")
        spec = JobSpec(
            name=prefix + name, worker=worker, methods=specs, min_processes=low,
            max_processes=high, key=f"{loader.class_key(type(worker))}.{name}", **limits,
        )  # fmt: skip
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
        s = self.settings
        specs = loader.load(
            s.namespaces, s.lib, s.worker_options, s.job_runtime_attributes, s.server, self.wanted
        )
        loader.check_unique([*self.manual_specs, *specs])
        for spec in specs:
            self.jobs[spec.name] = JobState(spec, spec.min_processes, spec.max_processes)
            log.debug("added job %s (min %d, max %d)", spec.name, spec.min_processes,
                      spec.max_processes)  # fmt: skip
        self.loaded = True

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> int:
        """Run until stopped; returns the exit status (0 after a graceful stop)."""
        self.load()
        self.setup()
        log.info(
            "gdriver started",
            extra={"event": "started", "jobs": sorted(self.jobs), "server": self.settings.server},
        )
        for job in self.get_jobs():
            self.update_static_gauges(job)
            self.ensure_min(job, "min")
        self.loop.call_later(0.2, self.start_poll)
        max_wait = 1.0
        if self.notifier.watchdog_interval:
            max_wait = min(max_wait, self.notifier.watchdog_interval / 2)
        while True:
            self.loop.run_once(max_wait)
            self.handle_signals()
            self.reap()
            self.housekeeping()
            if self.stopping and not self.procs:
                break
        self.teardown()
        log.info("gdriver stopped", extra={"event": "stopped", "status": self.exit_code})
        return self.exit_code

    def setup(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)
        self.loop.add(self._wake_r, selectors.EVENT_READ, self._drain_wakeup)
        s = self.settings
        if s.console_port:
            from gdriver.console import ConsoleServer

            self.listeners.append(ConsoleServer(self, s.console_bind, s.console_port))
        if s.metrics_port:
            from gdriver.http import HttpServer

            self.listeners.append(HttpServer(self, s.metrics_bind, s.metrics_port))
        self.make_wakers()
        process.warm_up()
        gc.collect()
        gc.freeze()  # keep the imported code's pages shared after fork

    def make_wakers(self) -> None:
        for w in self.wakers:
            w.close()
        self.wakers = []
        if self.settings.interval > 0:
            self.wakers = [Waker(s, self.loop, self.request_poll) for s in self.settings.servers]

    def teardown(self) -> None:
        for w in self.wakers:
            w.close()
        for listener in self.listeners:
            with contextlib.suppress(Exception):
                listener.close()
        for r in self.poll_requests:
            with contextlib.suppress(Exception):
                self.loop.remove(r)
                r.close()
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
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
                self.handle_hup()
            else:
                self.begin_stop(signal.Signals(signum).name)

    def begin_stop(self, why: str) -> None:
        if self.stopping:
            log.info("already draining (%s)", why)
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.settings.graceful_timeout
        self.notifier.notify_stopping()
        log.info(
            "draining: in-flight jobs finish, then exit",
            extra={"event": "stopping", "reason": why, "processes": len(self.procs),
                   "graceful_timeout": self.settings.graceful_timeout},
        )  # fmt: skip
        if self.poll_timer is not None:
            self.poll_timer.cancel()
        for w in self.wakers:
            w.close()
        self.wakers = []
        for proc in list(self.procs.values()):
            self.stop_process(proc, "shutdown")

    def handle_hup(self) -> None:
        if self.stopping:
            return
        if self.reload_settings is None:
            log.warning("SIGHUP: no configuration source to reload from; ignored")
            return
        self.notifier.notify_reloading()
        try:
            new = self.reload_settings()
            specs = loader.load(
                new.namespaces, new.lib, new.worker_options, new.job_runtime_attributes,
                new.server, self.wanted,
            )  # fmt: skip
            loader.check_unique([*self.manual_specs, *specs])
        except (config.ConfigError, loader.LoadError) as exc:
            log.error("reload refused, the running configuration stays: %s", exc,
                      extra={"event": "reload_failed"})  # fmt: skip
            self.notifier.notify_ready()
            return
        self.apply_reload(new, specs)
        self.notifier.ready = False
        self.ready = False

    def apply_reload(self, new: config.Settings, specs: list[JobSpec]) -> None:
        old = self.settings
        self.settings = new
        fixed = ("console_port", "console_bind", "metrics_port", "metrics_bind", "daemonize",
                 "pidfile", "logfile")  # fmt: skip
        changed = [k for k in fixed if getattr(old, k) != getattr(new, k)]
        if changed:
            log.warning("reload: %s take effect at the next start", ", ".join(changed))
        logging.getLogger().setLevel(new.loglevel)
        self.generation += 1
        by_name = {s.name: s for s in specs}
        for name in list(self.jobs):
            job = self.jobs[name]
            if name in by_name or job.spec in self.manual_specs:
                continue
            log.info("reload: job %s is gone; stopping its processes", name)
            for proc in job.live():
                self.stop_process(proc, "reload")
            job.min_processes = job.max_processes = 0
            self.removed_jobs.add(name)
            self.forget_removed(job)
        for spec in specs:
            self.removed_jobs.discard(spec.name)
            known = self.jobs.get(spec.name)
            if known is None:
                known = JobState(spec, spec.min_processes, spec.max_processes)
                self.jobs[spec.name] = known
            else:
                known.spec = spec
                known.min_processes, known.max_processes = spec.min_processes, spec.max_processes
            self.update_static_gauges(known)
        if new.servers != old.servers:
            for name in set(self.gearmand_up) - {f"{h}:{p}" for h, p in new.servers}:
                del self.gearmand_up[name]
                with contextlib.suppress(KeyError):
                    self.metrics.gearmand_up.remove(name)
        if new.servers != old.servers or new.interval != old.interval:
            self.make_wakers()
            self.reschedule_poll(0.0)
        log.info("configuration reloaded; replacing processes one by one",
                 extra={"event": "reloaded", "generation": self.generation})  # fmt: skip
        for job in self.get_jobs():
            self.ensure_min(job, "min")
        self.start_poll()

    def forget_removed(self, job: JobState) -> None:
        """A job dropped by a reload leaves the tables once its last process is gone."""
        if job.name in self.removed_jobs and not job.processes:
            self.removed_jobs.discard(job.name)
            del self.jobs[job.name]
            self.metrics.forget_job(job.name)

    # -- processes -----------------------------------------------------------------------------
    def child_fds(self) -> list[int]:
        """Descriptors of the supervisor that a new child must close."""
        fds = [self.loop.fileno(), self._wake_r, self._wake_w]
        for entry in self.fds.values():
            fds.extend(entry["all"])
        for listener in [*self.listeners, *self.wakers]:
            fds.extend(listener.fds())
        for r in self.poll_requests:
            with contextlib.suppress(Exception):
                fds.append(r.fileno())
        return fds

    def spawn(self, job: JobState, reason: str) -> Process | None:
        s = self.settings
        spec = job.spec
        max_jobs = spec.max_jobs_per_process
        if max_jobs is None:
            max_jobs = s.max_jobs_per_process
        lifetime = spec.max_process_lifetime
        if lifetime is None:
            lifetime = s.max_process_lifetime
        # jitter so processes do not all recycle at once
        if max_jobs:
            max_jobs += random.randint(0, max(1, max_jobs // 10))
        if lifetime:
            lifetime += random.uniform(0, lifetime * 0.1)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        inherited = self.child_fds()
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            parent_sock.close()
            child_sock.close()
            log.error("fork failed for job %s: %s", job.name, exc)
            job.next_start = time.monotonic() + 1.0
            return None
        if pid == 0:  # the child
            try:
                signal.set_wakeup_fd(-1)
                for sig in HANDLED_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                for fd in [*inherited, out_r, err_r, parent_sock.fileno()]:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                for fd in (devnull, out_w, err_w):
                    os.close(fd)
                process.run(
                    spec, s.servers, child_sock, max_jobs, lifetime,
                    logging.getLogger().level, unblock=old_mask,
                )  # fmt: skip
            finally:
                os._exit(3)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        child_sock.close()
        os.close(out_w)
        os.close(err_w)
        now = time.monotonic()
        proc = Process(pid=pid, job_name=job.name, started=now, generation=self.generation)
        job.processes[pid] = proc
        self.procs[pid] = proc
        parent_sock.setblocking(False)
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        entry: dict[str, Any] = {
            "channel": parent_sock,
            "out": out_r,
            "err": err_r,
            "buf": {out_r: bytearray(), err_r: bytearray()},
            "all": [parent_sock.fileno(), out_r, err_r],
        }
        self.fds[pid] = entry
        self.loop.add(parent_sock, selectors.EVENT_READ, partial(self.on_channel_event, proc))
        self.loop.add(out_r, selectors.EVENT_READ, partial(self.on_output_event, proc, out_r))
        self.loop.add(err_r, selectors.EVENT_READ, partial(self.on_output_event, proc, err_r))
        self.metrics.process_starts.labels(job.name).inc()
        self.update_wakers()  # unregister the waker before the new process registers
        log.info("process started", extra={"event": "process_started", "pid": pid,
                                           "job_name": job.name, "reason": reason})  # fmt: skip
        return proc

    def stop_process(self, proc: Process, reason: str, sig: int = signal.SIGTERM) -> None:
        """Ask a process to stop: it finishes its current job first (SIGTERM)."""
        if not proc.retiring:
            proc.retiring = True
            proc.term_sent = time.monotonic()
            proc.kill_reason = proc.kill_reason or reason
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
        now = time.monotonic()
        if now < job.next_start:
            if job.backoff_timer is None:

                def retry(j: JobState = job) -> None:
                    j.backoff_timer = None
                    self.ensure_min(j, "replace")

                job.backoff_timer = self.loop.call_at(job.next_start, retry)
            return
        started = 0
        for _ in range(missing):
            if self.spawn(job, reason) is not None:
                started += 1
        if started:
            self.metrics.scaling.labels(job.name, "up", reason).inc(started)

    # -- messages from children ----------------------------------------------------------------
    def on_channel_event(self, proc: Process, mask: int) -> None:
        self.on_channel(proc)

    def on_output_event(self, proc: Process, fd: int, mask: int) -> None:
        self.on_output(proc, fd)

    def on_channel(self, proc: Process) -> None:
        entry = self.fds.get(proc.pid)
        if entry is None:
            return
        sock: socket.socket = entry["channel"]
        for _ in range(256):  # bounded: let other work in between
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.loop.remove(sock)
                return
            self.on_message(proc, data)

    def on_message(self, proc: Process, data: bytes) -> None:
        tag = data[:1]
        job = self.jobs.get(proc.job_name)
        if job is None:
            return
        now = time.monotonic()
        if tag == b"B":
            proc.busy = True
            proc.busy_since = now
            if (
                not self.stopping
                and self.settings.interval > 0
                and len(job.processes) < job.max_processes
                and all(p.busy for p in job.live())
            ):
                self.request_poll()
        elif tag == b"D":
            try:
                batch = json.loads(data[1:])
            except ValueError:
                return
            proc.busy_since = now
            self.on_jobs_done(job, proc, batch)
        elif tag == b"I":
            proc.busy = False
            proc.idle_since = now
        elif tag == b"L":
            logs.write_line(data[1:] + b"\n")
        elif tag == b"R":
            n = int(data[1:] or b"0")
            was = proc.registered
            proc.registered = n > 0
            if proc.registered and not was and proc.idle_since is None:
                proc.idle_since = now
        elif tag == b"X":
            proc.kill_reason = proc.kill_reason or data[1:].decode("ascii", "replace")

    def on_jobs_done(self, job: JobState, proc: Process, batch: list[list[Any]]) -> None:
        now = time.time()
        cache = self.job_metrics
        for outcome, seconds, function, message in batch:
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
                    self.metrics.jobs.labels(*key),
                    self.metrics.job_duration.labels(job.name, function),
                )
            children[0].inc()
            children[1].observe(seconds)

    def on_output(self, proc: Process, fd: int, final: bool = False) -> None:
        """A worker's stdout/stderr: each line becomes one JSON record."""
        entry = self.fds.get(proc.pid)
        if entry is None:
            return
        buf: bytearray = entry["buf"][fd]
        stream = "stdout" if fd == entry["out"] else "stderr"
        eof = False
        for _ in range(64):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                eof = True
                break
            buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) >= OUTPUT_LINE_MAX or ((eof or final) and buf):
                    nl = min(len(buf), OUTPUT_LINE_MAX)
                    self.output_record(proc, stream, bytes(buf[:nl]))
                    del buf[:nl]
                    continue
                break
            self.output_record(proc, stream, bytes(buf[:nl]))
            del buf[: nl + 1]
        if eof:
            self.loop.remove(fd)

    def output_record(self, proc: Process, stream: str, line: bytes) -> None:
        logs.write_record({
            "level": "INFO" if stream == "stdout" else "WARNING",
            "logger": "gdriver.output",
            "message": line.decode("utf-8", "replace").rstrip("\r"),
            "pid": proc.pid,
            "job_name": proc.job_name,
            "stream": stream,
        })  # fmt: skip

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
            if proc is not None:  # others are orphans reparented to us (PID 1): just reaped
                self.on_exit(proc, status)

    def on_exit(self, proc: Process, status: int) -> None:
        now = time.monotonic()
        entry = self.fds.pop(proc.pid, None)
        if entry is not None:
            self.fds[proc.pid] = entry  # still readable for the last words
            self.on_channel(proc)
            for fd in (entry["out"], entry["err"]):
                self.on_output(proc, fd, final=True)
            del self.fds[proc.pid]
            self.loop.remove(entry["channel"])
            entry["channel"].close()
            for fd in (entry["out"], entry["err"]):
                self.loop.remove(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        job = self.jobs.get(proc.job_name)
        if job is not None:
            job.processes.pop(proc.pid, None)
        extra: dict[str, Any] = {"event": "process_exited", "pid": proc.pid,
                                 "job_name": proc.job_name}  # fmt: skip
        if os.WIFSIGNALED(status):
            extra["signal"] = signal.Signals(os.WTERMSIG(status)).name
            reason = "signal"
            if proc.retiring:
                reason = "killed" if os.WTERMSIG(status) == signal.SIGKILL else "retired"
        else:
            code = os.WEXITSTATUS(status)
            extra["status"] = code
            reason = "crash" if code else ("retired" if proc.retiring else "exit")
        if proc.kill_reason == "timeout":
            reason = "timeout"
        elif proc.kill_reason in ("max_jobs", "lifetime") and reason == "exit":
            reason = "recycled"
        extra["reason"] = reason
        young = now - proc.started < YOUNG and proc.jobs_done == 0
        if reason in ("crash", "signal") or (reason == "exit" and young):
            log.warning("process exited", extra=extra)
        else:
            log.info("process exited", extra=extra)
        self.metrics.process_exits.labels(proc.job_name, reason).inc()
        if job is None:
            return
        if job.name in self.removed_jobs:
            self.forget_removed(job)
            return
        if reason == "timeout":
            self.metrics.job_timeouts.labels(job.name).inc()
        if reason in ("crash", "signal", "exit") and young and not self.stopping:
            job.failures += 1
            delay = min(BACKOFF_BASE * 2 ** (job.failures - 1), BACKOFF_MAX)
            job.next_start = now + delay
            self.metrics.crash_backoffs.labels(job.name).inc()
            log.warning(
                "processes of job %s keep dying young; next start in %.2fs", job.name, delay,
                extra={"event": "crash_loop_backoff", "job_name": job.name,
                       "failures": job.failures, "delay": delay},
            )  # fmt: skip
        elif not young:
            job.failures = 0
        replace = "replace" if reason not in ("retired", "killed") else "min"
        self.ensure_min(job, replace)

    # -- the observer --------------------------------------------------------------------------
    def request_poll(self) -> None:
        """Poll gearmand soon: at once, or REPOLL_MIN_GAP after the last poll began."""
        if self.poll_requests:
            self.repoll_wanted = True
            return
        delay = max(0.0, self.poll_started + REPOLL_MIN_GAP - time.monotonic())
        self.reschedule_poll(delay)

    def reschedule_poll(self, delay: float) -> None:
        if self.poll_timer is not None:
            self.poll_timer.cancel()
        self.poll_timer = self.loop.call_later(delay, self.start_poll)

    def start_poll(self) -> None:
        if self.stopping or self.poll_requests:
            return
        if self.poll_timer is not None:
            self.poll_timer.cancel()
            self.poll_timer = None
        self.poll_started = time.monotonic()
        timeout = max(0.2, min(2.0, self.settings.interval or 2.0))
        self.repoll_wanted = False
        for server in self.settings.servers:
            req = AdminRequest(server, "status", timeout)
            req.server_name = f"{server[0]}:{server[1]}"  # type: ignore[attr-defined]
            try:
                req.start()
                self.loop.add(req, req.wanted_events(), partial(self.on_admin, req))
            except OSError as exc:
                req.done, req.error = True, str(exc)
            self.poll_requests.append(req)
        self.loop.call_later(timeout + 0.05, self.check_poll_timeouts)
        self.maybe_finish_poll()

    def on_admin(self, req: AdminRequest, mask: int) -> None:
        req.on_event(mask)
        if req.done:
            self.loop.remove(req)
        else:
            self.loop.modify(req, req.wanted_events(), partial(self.on_admin, req))
        self.maybe_finish_poll()

    def check_poll_timeouts(self) -> None:
        now = time.monotonic()
        for req in self.poll_requests:
            if not req.done:
                req.check_timeout(now)
                if req.done:
                    self.loop.remove(req)
        self.maybe_finish_poll()

    def maybe_finish_poll(self) -> None:
        if not self.poll_requests or not all(r.done for r in self.poll_requests):
            return
        requests, self.poll_requests = self.poll_requests, []
        rows: list[dict[str, FunctionStatus]] = []
        for req in requests:
            name = req.server_name  # type: ignore[attr-defined]
            ok = req.error is None
            if ok:
                rows.append(parse_status(req.lines))
            elif self.gearmand_up.get(name, True):
                log.error("observer: gearmand %s: %s", name, req.error,
                          extra={"event": "observer_error", "server": name})  # fmt: skip
            if ok and not self.gearmand_up.get(name, False) and name in self.gearmand_up:
                log.info("observer: gearmand %s answers again", name)
            self.gearmand_up[name] = ok
            self.metrics.gearmand_up.labels(name).set(1 if ok else 0)
            with contextlib.suppress(Exception):
                req.close()
        self.metrics.poll_duration.observe(time.monotonic() - self.poll_started)
        status = observer.merge_status(rows) if rows else None
        self.observe(status)
        for w in self.wakers:
            w.arm()
        if not self.stopping:
            interval = self.settings.interval or 5.0
            if self.repoll_wanted:
                self.reschedule_poll(REPOLL_MIN_GAP)
            else:
                self.reschedule_poll(max(0.0, self.poll_started + interval - time.monotonic()))

    def job_views(self) -> list[observer.JobView]:
        views = []
        for job in self.get_jobs():
            procs = tuple(
                observer.ProcessView(p.pid, p.busy, p.idle_since if p.registered else None)
                for p in job.live()
            )
            views.append(observer.JobView(job.name, job.min_processes, job.max_processes,
                                          tuple(job.functions), procs))  # fmt: skip
        return views

    def observe(self, status: Mapping[str, FunctionStatus] | None) -> None:
        if status is not None:
            self.last_status = status
        if self.stopping:
            return
        decision = observer.decide(
            status if self.settings.interval > 0 else None,
            self.job_views(), time.monotonic(), self.settings.max_idle_time,
        )  # fmt: skip
        self.apply(decision)
        if status is not None:
            self.metrics.set_queue(
                {fn: (s.waiting, s.running, s.workers) for fn, s in status.items()},
                dict(decision.unknown),
            )
            for fn, n in sorted(decision.unknown.items()):
                if fn not in self.last_unknown:  # once per sighting, the gauge tells the rest
                    log.warning(
                        "jobs queued for a function no job serves: %s (%d waiting)", fn, n,
                        extra={"event": "unknown_function", "function": fn, "count": n},
                    )  # fmt: skip
            self.last_unknown = dict(decision.unknown)

    def apply(self, decision: observer.Decision) -> None:
        for start in decision.starts:
            job = self.jobs[start.job_name]
            if start.reason == "min":
                self.ensure_min(job, "min")
                continue
            if time.monotonic() < job.next_start:
                continue  # crash-loop backoff: no forks for this job yet
            n = 0
            for _ in range(start.count):
                if self.spawn(job, start.reason) is not None:
                    n += 1
            if n:
                self.metrics.scaling.labels(job.name, "up", start.reason).inc(n)
                log.info("scaling job %s up by %d (%s)", job.name, n, start.reason,
                         extra={"event": "scale", "job_name": job.name, "direction": "up",
                                "count": n, "reason": start.reason})  # fmt: skip
        for stop in decision.stops:
            job = self.jobs[stop.job_name]
            for pid in stop.pids:
                proc = job.processes.get(pid)
                if proc is not None and not proc.busy:
                    self.stop_process(proc, stop.reason)
            self.metrics.scaling.labels(job.name, "down", stop.reason).inc(len(stop.pids))
            log.info("scaling job %s down by %d (%s)", job.name, len(stop.pids), stop.reason,
                     extra={"event": "scale", "job_name": job.name, "direction": "down",
                            "count": len(stop.pids), "reason": stop.reason})  # fmt: skip
        for name, target in decision.desired.items():
            self.metrics.processes_desired.labels(name).set(target)

    # -- commands (console) --------------------------------------------------------------------
    def set_limits(self, job: JobState, low: int, high: int) -> None:
        """New min/max, applied at once: start up to min, retire idle surplus above max."""
        job.min_processes, job.max_processes = low, high
        self.update_static_gauges(job)
        self.ensure_min(job, "min")
        live = job.live()
        if len(live) > high:
            decision = observer.decide(None, [v for v in self.job_views() if v.name == job.name],
                                       time.monotonic(), 0.0)  # fmt: skip
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
        if now - self._last_housekeeping < 0.1 and not self.stopping:
            return
        self._last_housekeeping = now
        if self.stopping:
            if now >= self.stop_deadline and self.procs:
                log.warning("graceful_timeout reached; killing %d process(es)", len(self.procs),
                            extra={"event": "drain_timeout"})  # fmt: skip
                for proc in list(self.procs.values()):
                    self.stop_process(proc, "drain_timeout", signal.SIGKILL)
                self.stop_deadline = now + 5.0
            return
        for job in self.jobs.values():
            self.enforce_timeouts(job, now)
            self.roll(job)
        self.update_wakers()
        for w in self.wakers:
            w.tick(now)
        self.update_readiness()

    def update_wakers(self) -> None:
        """Wakers watch the functions of jobs that have no process (and may have one)."""
        if self.wakers:
            idle = [j for j in self.jobs.values() if j.max_processes > 0 and not j.live()]
            functions = {fn for j in idle for fn in j.functions}
            for w in self.wakers:
                w.set_functions(functions)

    def enforce_timeouts(self, job: JobState, now: float) -> None:
        limit = job.spec.timeout
        for proc in list(job.processes.values()):
            if (
                proc.retiring
                and proc.kill_reason == "timeout"
                and now - proc.term_sent > KILL_GRACE
            ):
                self.stop_process(proc, "timeout", signal.SIGKILL)
            elif limit and proc.busy and now - proc.busy_since > limit + KILL_GRACE:
                log.warning("job %s ran past its timeout of %ss; stopping process %d",
                            job.name, limit, proc.pid)  # fmt: skip
                proc.kill_reason = "timeout"
                self.stop_process(proc, "timeout")

    def roll(self, job: JobState) -> None:
        """After a reload, replace processes of older generations one at a time."""
        old = [p for p in job.live() if p.generation != self.generation]
        if not old:
            return
        if any(p.retiring and p.kill_reason == "reload" for p in job.processes.values()):
            return
        old.sort(key=lambda p: (p.busy, p.idle_since or 0.0))
        self.stop_process(old[0], "reload")
        self.ensure_min(job, "replace")

    def update_static_gauges(self, job: JobState) -> None:
        self.metrics.processes_min.labels(job.name).set(job.min_processes)
        self.metrics.processes_max.labels(job.name).set(job.max_processes)

    def update_job_gauges(self, job: JobState) -> None:
        """Process gauges, refreshed when /metrics is scraped (the only reader)."""
        self.metrics.processes.labels(job.name).set(len(job.processes))
        self.metrics.processes_busy.labels(job.name).set(job.busy)

    def is_ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        missing = [j.name for j in self.get_jobs() if j.registered < j.min_processes]
        if missing:
            return False, f"jobs without their min processes registered: {', '.join(missing)}"
        if not any(self.gearmand_up.values()) and not any(
            p.registered for p in self.procs.values()
        ):
            return False, "no gearmand answers"
        return True, "ok"

    def update_readiness(self) -> None:
        ready, _ = self.is_ready()
        if ready and not self.ready:
            log.info("ready", extra={"event": "ready"})
        self.ready = ready
        if ready:
            self.notifier.notify_ready()
        busy = sum(1 for p in self.procs.values() if p.busy)
        queued = sum(s.waiting for s in self.last_status.values())
        self.notifier.notify_status(
            f"{len(self.jobs)} jobs, {len(self.procs)} processes, {busy} busy, {queued} queued"
        )
