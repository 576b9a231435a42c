"""What runs inside a forked worker process.

The child talks to the supervisor over its own SOCK_SEQPACKET socket (one message per
packet, never its stdout). Messages, child -> supervisor (first byte is the tag):

- ``R<n>``: registered with n gearmand servers (confirmed by an ECHO round trip)
- ``B<function>``: busy: started a job after being idle
- ``D<json>``: finished jobs, a list of ``[outcome, seconds, function, error]``; outcome is
  ``complete``, ``fail`` or ``exception``. Sent at least every 50 ms and before going idle,
  so a process streaming jobs sends a few messages a second, not two per job.
- ``I``: idle: no work for 50 ms (every connection asleep); a process that goes straight
  from one job to the next stays busy and sends nothing between them
- ``L<json>``: a log record, already formatted
- ``X<reason>``: about to exit on its own (``max_jobs``, ``lifetime``)

The supervisor never sends anything: it stops a child with SIGTERM (finish the current job,
then exit) and the child stops by itself when the channel reaches EOF or the supervisor dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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
GONE = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF}
MAX_ERROR = 512  # characters of an error message in a job report (the log has it all)
FLUSH_AFTER = 0.05  # s: a busy process reports its finished jobs at least this often
IDLE_AFTER = 0.05  # s without work before a process reports itself idle
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
        self.timing = False  # the job's timeout alarm is armed
        self.idle_since: float | None = None  # monotonic; set while idle but still reported busy
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
            except OSError as exc:
                if exc.errno in GONE:
                    self.stop_requested = True  # the supervisor is gone
                return  # anything else (e.g. EMSGSIZE): this message is lost, not the process

    def send_log(self, line: str) -> None:
        data = line.encode("utf-8", "replace")
        if len(data) > MAX_MESSAGE:
            data = shrink_record(line)
        self.send(b"L" + data)

    def on_alarm(self, signum: int, frame: Any) -> None:
        if self.timing:  # only while the job itself runs, never in its hooks
            raise JobTimeout("job exceeded its timeout")

    def flush(self) -> None:
        """Send the finished jobs' reports in one message (many jobs per message under load)."""
        self.last_flush = time.monotonic()
        if self.finished:
            batch, self.finished = self.finished, []
            self.send_reports(batch)

    def send_reports(self, batch: list[tuple[str, float, str, str]]) -> None:
        data = b"D" + json.dumps(batch, ensure_ascii=False).encode("utf-8", "replace")
        if len(data) > MAX_MESSAGE and len(batch) > 1:  # keep each message in one read
            half = len(batch) // 2
            self.send_reports(batch[:half])
            self.send_reports(batch[half:])
        else:
            self.send(data[:MAX_MESSAGE] if len(data) > MAX_MESSAGE else data)

    def on_idle(self) -> float | None:
        """The worker has nothing to do. After IDLE_AFTER s of that, report the finished jobs
        and that the process is idle; shorter gaps between jobs cost no message at all."""
        now = time.monotonic()
        if not self.busy_reported:
            return self.until_deadline(now)
        if self.idle_since is None:
            self.idle_since = now
        if now - self.idle_since < IDLE_AFTER:
            return IDLE_AFTER - (now - self.idle_since)
        self.report_idle()
        return self.until_deadline(now)

    def report_idle(self) -> None:
        self.flush()
        if self.busy_reported:
            self.busy_reported = False
            self.send(b"I")

    def until_deadline(self, now: float) -> float | None:
        return max(0.0, self.deadline - now) if self.deadline else None

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
            try:
                return run_job(job)
            except JobTimeout:  # the alarm fired while it was being disarmed: still a timeout
                self.stop_requested, self.stop_reason = True, "timeout"
                raise JobFailed(b"JobTimeout: job exceeded its timeout") from None

        def run_job(job: Job) -> bytes:
            self.idle_since = None
            if not self.busy_reported:
                self.busy_reported = True
                send(busy_msg)
            elif self.finished and time.monotonic() - self.last_flush > FLUSH_AFTER:
                self.flush()  # reports of earlier jobs must not wait for this one
            start = time.perf_counter()
            outcome, message, data = "complete", "", b""
            workload: Any = job.workload
            error: BaseException | None = None
            try:
                if timeout:
                    self.timing = True
                    signal.setitimer(signal.ITIMER_REAL, timeout)
                if decode is not None:
                    workload = decode(job.workload)
                worker.begin(job, workload)
                result = body(worker, job, workload)
                if encode is not None:
                    result = encode(result)
                data = to_bytes(result, function)
            except (Exception, JobTimeout, SystemExit) as exc:
                error = exc
            finally:
                # the limit covers the job, not its hooks: a late alarm is a no-op from here
                self.timing = False
                if timeout:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            if error is not None:
                outcome, message = "exception", error_text(error)
                if isinstance(error, SystemExit):
                    # the job asked its process to end: fail this job, then exit cleanly
                    message = f"job called exit({error.code})"
                    self.stop_requested, self.stop_reason = True, "exit"
                elif isinstance(error, JobTimeout):
                    self.stop_requested = True  # the job's state may be broken: start afresh
                    self.stop_reason = "timeout"
                elif isinstance(error, TypeError) and str(error).startswith(
                    f"job {function} returned"
                ):
                    outcome = "fail"
                log.error(
                    "job %s failed: %s", function, message,
                    exc_info=(type(error), error, error.__traceback__)
                    if outcome == "exception" and not isinstance(error, SystemExit)
                    else None,
                    extra={"function": function},
                )  # fmt: skip
                _guarded(worker.on_exception, job, workload, error)
            _guarded(worker.end, job, workload, error)
            self.jobs_done += 1
            self.finished.append(
                (outcome, time.perf_counter() - start, function, message[:MAX_ERROR])
            )
            if (
                outcome != "complete"  # errors show in the console at once
                or len(self.finished) >= FLUSH_JOBS
                or time.monotonic() - self.last_flush > FLUSH_AFTER
            ):
                self.flush()
            if error is not None:
                raise JobFailed(message.encode("utf-8", "replace"))
            return data

        return handle


def _guarded(hook: Callable[..., Any], *args: Any) -> None:
    try:
        hook(*args)
    except Exception:
        log.exception("hook %s failed", getattr(hook, "__name__", hook))


_prctl: Any = None


def _set_pdeathsig() -> None:
    global _prctl
    try:
        if _prctl is None:
            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def warm_up() -> None:
    """Run, in the supervisor before it forks, the code every worker process runs first.

    Python specialises bytecode and fills caches the first times code runs, and imports and
    CDLL lookups allocate; done once here, those pages stay shared with the children instead
    of being copied into each of them (about 1.5 MiB per process)."""
    global _prctl
    try:
        import setproctitle

        setproctitle.getproctitle()
    except Exception:
        pass
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        pass
    from gdriver.worker import Worker

    spec = JobSpec("warm_up", Worker(), [MethodSpec("warm_up", "warm_up", _echo)])
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.setblocking(False)
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    try:
        child = Child(spec, ours, WARM_UP_JOBS, 0.0)
        record = logging.LogRecord("gdriver.process", logging.INFO, __file__, 0, "warm", (), None)
        for _ in range(WARM_UP_JOBS):
            logs.FORMATTER.format(record)

        def serve(fd: int) -> None:
            # the worker connected: play gearmand's part, every reply written at once
            conn, _ = listener.accept()
            accepted.append(conn)
            conn.sendall(WARM_UP_REPLIES)
            with contextlib.suppress(BlockingIOError):
                while theirs.recv(65536):
                    pass

        worker = GearmanWorker(
            [listener.getsockname()[:2]], {"warm_up": child.handler(spec.methods[0])}
        )
        worker.stop_grace = 1.0
        quiet = logging.getLogger("gdriver.gearman")
        quiet.disabled = True  # its connection notices are not news
        try:
            worker.work(child.should_stop, (listener.fileno(),), serve, None, child.on_idle)
        finally:
            quiet.disabled = False
        child.report_idle()
    except Exception as exc:  # a warm-up that fails costs memory, nothing else
        log.debug("warm-up incomplete: %s", exc)
    finally:
        for sock in (ours, theirs, listener, *accepted):
            sock.close()


WARM_UP_JOBS = 16  # past CPython's specialisation threshold


def _reply(ptype: int, body: bytes = b"") -> bytes:
    return b"\0RES" + ptype.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body


WARM_UP_REPLIES = (
    _reply(17, b"gdriver")  # ECHO_RES
    + b"".join(_reply(31, b"H:warm:%d\0warm_up\0\0x" % i) for i in range(WARM_UP_JOBS))
)


def _echo(worker: Any, job: Job, workload: Any) -> Any:
    return workload


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
        signal.signal(signal.SIGALRM, child.on_alarm)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.pthread_sigmask(signal.SIG_SETMASK, unblock)  # the supervisor blocked them to fork

        title = spec.worker.process_name(_title(), spec.name)
        if isinstance(title, str) and title:
            import setproctitle

            setproctitle.setproctitle(title)

        functions = {m.function: child.handler(m) for m in spec.methods}
        worker = GearmanWorker(servers, functions, client_id=f"gdriver:{spec.name}:{os.getpid()}")
        worker.poll_interval = 5.0  # signals and the channel wake it; idle children stay asleep

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
        child.report_idle()
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
