"""What runs inside a forked worker process.

The child talks to the supervisor over its own SOCK_SEQPACKET socket (one message per
packet, never its stdout). Messages, child -> supervisor (first byte is the tag):

- ``R<n>``: registered with n gearmand servers (confirmed by an ECHO round trip)
- ``B<function>``: busy: started a job after being idle
- ``D<json>``: finished jobs, a list of ``[outcome, seconds, function, error]``; outcome is
  ``complete``, ``fail`` or ``exception``. Sent at least every 50 ms and before going idle,
  so a process streaming jobs sends a few messages a second, not two per job.
- ``I``: idle: every connection is asleep waiting for work
- ``L<json>``: a log record, already formatted
- ``X<reason>``: about to exit on its own (``max_jobs``, ``lifetime``)

The supervisor never sends anything: it stops a child with SIGTERM (finish the current job,
then exit) and the child stops by itself when the channel reaches EOF or the supervisor dies.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from gdriver import logs
from gdriver.gearman import GearmanWorker, Job, JobFailed, Server
from gdriver.jobs import JobSpec, MethodSpec

log = logging.getLogger("gdriver.process")

MAX_MESSAGE = 60_000  # bytes; longer log records are cut
FLUSH_JOBS = 64  # job reports per message at most
FLUSH_AFTER = 0.05  # s: a busy process reports its finished jobs at least this often
PR_SET_PDEATHSIG = 1
CHILD_ENV_DROP = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class JobTimeout(BaseException):
    """The job ran past its timeout (a BaseException, so user code's ``except Exception``
    does not swallow it)."""


def to_bytes(result: Any, function: str) -> bytes:
    """Job results: bytes as is, str as UTF-8, None as empty; anything else is an error."""
    if isinstance(result, bytes):
        return result
    if isinstance(result, str):
        return result.encode("utf-8")
    if result is None:
        return b""
    if isinstance(result, bytearray | memoryview):
        return bytes(result)
    raise TypeError(
        f"job {function} returned {type(result).__name__}; return bytes, str or None, "
        "or set encode= to turn it into bytes"
    )


def shrink_record(line: str) -> bytes:
    """A JSON log record cut to fit one channel message, still one valid JSON object."""
    record = json.loads(line)
    size = len(line.encode("utf-8", "replace"))
    for key in sorted(record, key=lambda k: -len(str(record[k]))):
        if size <= MAX_MESSAGE:
            break
        value = record[key]
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        keep = max(0, len(text) - (size - MAX_MESSAGE) - 64) // 4  # characters of <= 4 bytes
        record[key] = text[:keep] + f" [truncated {len(text) - keep} characters]"
        size = len(json.dumps(record, ensure_ascii=False, default=str).encode())
    data = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8", "replace")
    if len(data) > MAX_MESSAGE:  # too many fields to shrink: keep what identifies the record
        keys = ("timestamp", "level", "logger", "pid", "job_name")
        small = {k: record[k] for k in keys if k in record}
        small["message"] = "log record too large to forward"
        data = json.dumps(small, ensure_ascii=False, default=str).encode()
    return data


def error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Child:
    """State of one worker process."""

    def __init__(
        self,
        spec: JobSpec,
        channel: socket.socket,
        max_jobs: int,
        lifetime: float,
    ) -> None:
        self.spec = spec
        self.channel = channel
        self.max_jobs = max_jobs
        self.deadline = time.monotonic() + lifetime if lifetime > 0 else 0.0
        self.jobs_done = 0
        self.stop_reason = ""
        self.stop_requested = False
        self.supervisor_pid = os.getppid()
        self.busy_reported = False
        self.finished: list[tuple[str, float, str, str]] = []  # job reports not yet sent
        self.last_flush = time.monotonic()

    # -- channel -----------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        while True:
            try:
                self.channel.send(data)
                return
            except BlockingIOError:
                # the supervisor reads slowly (e.g. its stdout is throttled): wait, never drop
                select.select([], [self.channel], [], 1.0)
            except OSError:
                self.stop_requested = True  # the supervisor is gone
                return

    def send_log(self, line: str) -> None:
        data = line.encode("utf-8", "replace")
        if len(data) > MAX_MESSAGE:
            data = shrink_record(line)
        self.send(b"L" + data)

    def flush(self) -> None:
        """Send the finished jobs' reports in one message (many jobs per message under load)."""
        self.last_flush = time.monotonic()
        if self.finished:
            batch, self.finished = self.finished, []
            self.send(b"D" + json.dumps(batch, ensure_ascii=False).encode())

    def on_idle(self) -> None:
        """The worker has nothing to do: report its jobs and that it is idle."""
        self.flush()
        if self.busy_reported:
            self.busy_reported = False
            self.send(b"I")

    # -- stopping ----------------------------------------------------------------------------
    def should_stop(self) -> bool:
        if self.stop_requested:
            return True
        if self.max_jobs and self.jobs_done >= self.max_jobs:
            self.stop_reason = "max_jobs"
            return True
        if self.deadline and time.monotonic() >= self.deadline:
            self.stop_reason = "lifetime"
            return True
        return False

    def on_wake(self, fd: int) -> None:
        if fd == self.channel.fileno():
            try:
                data = self.channel.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.stop_requested = True  # EOF: the supervisor is gone
        else:
            try:
                while os.read(fd, 512):
                    pass
            except (BlockingIOError, OSError):
                pass
        if os.getppid() != self.supervisor_pid:
            self.stop_requested = True

    # -- jobs --------------------------------------------------------------------------------
    def handler(self, method: MethodSpec) -> Callable[[Job], bytes]:
        worker = self.spec.worker
        body = method.body
        decode = getattr(worker, method.decode) if method.decode else None
        encode = getattr(worker, method.encode) if method.encode else None
        function = method.function
        busy_msg = b"B" + function.encode()
        timeout = self.spec.timeout
        send = self.send

        def handle(job: Job) -> bytes:
            if not self.busy_reported:
                self.busy_reported = True
                send(busy_msg)
            start = time.perf_counter()
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, timeout)
            outcome, message, data = "complete", "", b""
            workload: Any = job.workload
            error: BaseException | None = None
            try:
                try:
                    if decode is not None:
                        workload = decode(job.workload)
                    worker.begin(job, workload)
                    result = body(worker, job, workload)
                    if encode is not None:
                        result = encode(result)
                    data = to_bytes(result, function)
                except (Exception, JobTimeout, SystemExit) as exc:
                    error = exc
                    outcome, message = "exception", error_text(exc)
                    if isinstance(exc, SystemExit):
                        # the job asked its process to end: fail this job, then exit cleanly
                        message = f"job called exit({exc.code})"
                        self.stop_requested, self.stop_reason = True, "exit"
                    if isinstance(exc, TypeError) and str(exc).startswith(
                        f"job {function} returned"
                    ):
                        outcome = "fail"
                    log.error(
                        "job %s failed: %s", function, message,
                        exc_info=outcome == "exception" and not isinstance(exc, SystemExit),
                        extra={"function": function},
                    )  # fmt: skip
                    _guarded(worker.on_exception, job, workload, exc)
                _guarded(worker.end, job, workload, error)
            finally:
                if timeout:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                self.jobs_done += 1
                self.finished.append((outcome, time.perf_counter() - start, function, message))
                if (
                    len(self.finished) >= FLUSH_JOBS
                    or time.monotonic() - self.last_flush > FLUSH_AFTER
                ):
                    self.flush()
            if error is not None:
                if isinstance(error, JobTimeout):
                    self.stop_requested = True  # the job's state may be broken: start afresh
                    self.stop_reason = "timeout"
                raise JobFailed(message.encode("utf-8", "replace"))
            return data

        return handle


def _guarded(hook: Callable[..., Any], *args: Any) -> None:
    try:
        hook(*args)
    except Exception:
        log.exception("hook %s failed", getattr(hook, "__name__", hook))


def _on_alarm(signum: int, frame: Any) -> None:
    raise JobTimeout("job exceeded its timeout")


def _set_pdeathsig() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def run(
    spec: JobSpec,
    servers: list[Server],
    channel: socket.socket,
    max_jobs: int,
    lifetime: float,
    loglevel: int,
    unblock: Iterable[int] = (),
) -> NoReturn:
    """The body of a forked worker process. Never returns."""
    code = 0
    try:
        _set_pdeathsig()
        child = Child(spec, channel, max_jobs, lifetime)
        if child.supervisor_pid == 1:
            os._exit(0)
        for name in CHILD_ENV_DROP:
            os.environ.pop(name, None)
        logs.setup_child(child.send_log, spec.name, loglevel)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)

        def on_stop(signum: int, frame: Any) -> None:
            child.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.pthread_sigmask(signal.SIG_SETMASK, unblock)  # the supervisor blocked them to fork

        title = spec.worker.process_name(_title(), spec.name)
        if isinstance(title, str) and title:
            import setproctitle

            setproctitle.setproctitle(title)

        functions = {m.function: child.handler(m) for m in spec.methods}
        worker = GearmanWorker(servers, functions, client_id=f"gdriver:{spec.name}:{os.getpid()}")

        def on_registered(n: int) -> None:
            child.send(b"R%d" % n)

        channel.setblocking(False)
        try:
            worker.work(
                child.should_stop,
                wake_fds=(wake_r, channel.fileno()),
                on_wake=child.on_wake,
                on_registered=on_registered,
                on_idle=child.on_idle,
            )
        finally:
            worker.close()
        channel.setblocking(True)
        child.on_idle()
        if child.stop_reason:
            child.send(b"X" + child.stop_reason.encode())
    except BaseException:
        code = 3
        try:
            log.critical("worker process failed:\n%s", traceback.format_exc())
        except Exception:
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    os._exit(code)


def _title() -> str:
    try:
        import setproctitle

        return str(setproctitle.getproctitle())
    except Exception:
        return " ".join(sys.argv)
