"""What runs inside a forked worker process.

The child reports to the supervisor over its own channel socket (messages in
:mod:`gdriver.channel`, never its stdout). The supervisor sends it only the addresses of
gearmand names (``A``): it stops a child with SIGTERM (finish the current job, then exit)
and the child stops by itself when the channel reaches EOF or the supervisor dies.

Whatever a job raises fails that job, never its process: ``Exception``, ``JobTimeout``
(the process then starts afresh) and every other ``BaseException`` (``KeyboardInterrupt``,
``asyncio.CancelledError``, ...). ``SystemExit`` fails the job too, and then the process
exits cleanly and is replaced (the job asked for its process to end, as in Gearman::Driver).
Stop signals never raise in a job: they set a flag the worker checks between jobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, NoReturn

from gdriver import channel as messages
from gdriver import logs, resolver, slots
from gdriver.codec import RES, pack
from gdriver.codec import PacketType as P
from gdriver.exits import EXIT_WORKER_FAILED
from gdriver.gearman import GearmanWorker, Job, JobFailed, Protocol, Server, coerce_result
from gdriver.jobs import JobSpec, MethodSpec
from gdriver.worker import Worker

log = logging.getLogger("gdriver.process")

FLUSH_JOBS = slots.RING  # job reports per message at most: the slot's ring holds them
GONE = {errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF}
MAX_ERROR = 512  # characters of an error message in a job report (the log has it all)
FLUSH_AFTER = 0.05  # s: a busy process reports its finished jobs at least this often
IDLE_AFTER = 0.05  # s without work before a process reports itself idle
PR_SET_PDEATHSIG = 1
CHILD_ENV_DROP = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class JobTimeout(BaseException):
    """The job ran past its timeout (a BaseException, so user code's ``except Exception``
    does not swallow it)."""


class ResultTypeError(TypeError):
    """A job returned something that is not bytes, str or None, and no encode= made it bytes."""


def to_bytes(result: Any, function: str) -> bytes:
    """Job results: bytes as is, str as UTF-8, None as empty; anything else is an error."""
    return coerce_result(result, ResultTypeError, f"job {function}")


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
        self.unreported = 0  # finished jobs (in the slot's ring) not reported yet
        self.errors: list[tuple[int, str]] = []  # their error messages, by job number
        # the job whose answer is being handed to gearmand: (outcome code, seconds, error,
        # function), and when it ended
        self.pending: tuple[int, float, str, str] | None = None
        self.pending_end = 0.0
        self.forked = False  # a copy made by os.fork in job code (``forked_in_job``)
        self.slot = slots.child_slot()  # the running job and finished ones, for the supervisor
        self.end_hook = _overridden(spec.worker, "end")  # None: Worker's own, which does nothing
        self.last_flush = time.perf_counter()  # the clock jobs are timed with

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
        self.send(messages.encode_log(line))

    def on_alarm(self, signum: int, frame: Any) -> None:
        if self.timing:  # only while the job itself runs, never in its hooks
            raise JobTimeout("job exceeded its timeout")

    def flush(self) -> None:
        """Send the finished jobs' reports in one message (many jobs per message under load):
        their records as the slot's ring holds them, numbered as the slot numbers them."""
        self.last_flush = time.perf_counter()  # the clock jobs are timed with
        n = self.unreported
        if n:
            self.unreported = 0
            errors, self.errors = self.errors, []
            slot = self.slot
            self.send(messages.encode_done(slot.done - n, slot.last(n), n, errors))

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
            self.send(messages.encode_idle())

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
            elif data.startswith(messages.ADDRESSES):
                resolver.apply_message(data)  # a gearmand name's addresses changed
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
        busy_msg = messages.encode_busy(function)
        timeout = self.spec.timeout
        send = self.send
        index = self.spec.methods.index(method)
        begin = self.slot.begin
        begin_hook = _overridden(worker, "begin")  # None: Worker's own, which does nothing
        end_hook = self.end_hook
        clock = time.perf_counter

        def handle(job: Job) -> bytes:
            # one frame per job (this runs for every job), the hooks only when a worker has them
            try:
                start = clock()
                self.idle_since = None
                if not self.busy_reported:
                    self.busy_reported = True
                    send(busy_msg)
                    start = clock()
                elif self.unreported and start - self.last_flush > FLUSH_AFTER:
                    self.flush()  # reports of earlier jobs must not wait for this one
                    start = clock()
                poisoned = begin(index, function, job._handle, job._unique, start)
                if poisoned:
                    self.refuse(job, function, poisoned, start)
                data = b""
                workload: Any = job.workload
                error: BaseException | None = None
                try:
                    if timeout:
                        self.timing = True
                        signal.setitimer(signal.ITIMER_REAL, timeout)
                    if decode is not None:
                        workload = decode(workload)
                    if begin_hook is not None:
                        begin_hook(job, workload)
                    result = body(worker, job, workload)
                    if encode is not None:
                        result = encode(result)
                    data = result if type(result) is bytes else to_bytes(result, function)
                except BaseException as exc:  # any of them fails this job, not the process
                    error = exc
                finally:
                    # the limit covers the job, not its hooks: a late alarm is a no-op from here
                    if timeout:
                        self.timing = False
                        signal.setitimer(signal.ITIMER_REAL, 0)
                if error is None and end_hook is None:  # job_finished() for a job that worked
                    self.jobs_done += 1
                    self.pending_end = end = clock()
                    self.pending = (0, end - start, "", function)
                    return data
                message = self.job_finished(job, workload, error, function, start)
            except JobTimeout as late:  # the alarm fired while it was being disarmed: a timeout
                message = self.job_finished(job, workload, late, function, start)
                raise JobFailed(message.encode("utf-8", "replace")) from None
            if error is not None:
                raise JobFailed(message.encode("utf-8", "replace"))
            return data

        return handle

    def job_finished(
        self, job: Job, workload: Any, error: BaseException | None, function: str, start: float
    ) -> str:
        """Run the end hooks, queue the job's report; the error message ("" when it worked)."""
        if error is None:
            outcome, message = "complete", ""
        else:
            outcome, message = self.job_failed(function, error)
            _guarded(self.spec.worker.on_exception, job, workload, error)
        if self.end_hook is not None:
            _guarded(self.end_hook, job, workload, error)
        self.jobs_done += 1
        end = time.perf_counter()
        # recorded once its answer went out (``answered``)
        code = slots.OUTCOME_CODE[outcome]
        self.pending = (code, end - start, message[:MAX_ERROR] if message else "", function)
        self.pending_end = end
        return message

    def answered(self, sent: bool) -> None:
        """The job's answer was handed to gearmand's socket (``sent``; also when gearmand had
        broken the connection: it re-queues the job, the worker reconnects), or could not be
        because the job closed or replaced the process's descriptors: only now is the job
        done, in the slot (a death before the flush loses no report) and in its report.
        Unsent, the process ends with the job still running in its slot: its death counts
        against the job, which gearmand hands out again (nothing else it holds is trusted)."""
        report = self.pending
        if report is None:
            return
        self.pending = None
        code, seconds, error, function = report
        if not sent:
            self.lost(function)
        slot = self.slot
        slot.finish(code, seconds)
        if error:
            self.errors.append((slot.done - 1, error))
        self.unreported = n = self.unreported + 1
        if (
            code  # failures show in the console at once
            or n >= FLUSH_JOBS
            or self.pending_end - self.last_flush > FLUSH_AFTER
        ):
            self.flush()

    def lost(self, function: str) -> NoReturn:
        """The answer of a job of ``function`` never reached gearmand's socket: end here."""
        if self.forked:  # a copy forked by the job returned from it: its parent answered
            os._exit(0)
        log.error(
            "job %s: its answer could not be sent to gearmand (the job closed or replaced the "
            "process's descriptors); the process ends and gearmand hands the job out again",
            function, extra={"function": function},
        )  # fmt: skip
        self.flush()
        os._exit(EXIT_WORKER_FAILED)

    def refuse(self, job: Job, function: str, why: str, start: float) -> NoReturn:
        """Fail a poison job without running it (``gdriver.poison``): the supervisor logs it."""
        self.send(messages.encode_poisoned(function, job.handle, job.unique, *self.slot.refused))
        self.jobs_done += 1
        self.pending_end = end = time.perf_counter()
        self.pending = (slots.OUTCOME_CODE["fail"], end - start, why[:MAX_ERROR], function)
        raise JobFailed(why.encode("utf-8", "replace"))

    def rejected(self, function: str, handle: str, message: str) -> None:
        """The worker failed a job without running it (its packet is over the limit)."""
        self.jobs_done += 1
        # in the slot too, begun and finished, so its reports stay numbered as the slot's jobs
        # (a function the job does not serve, as only a broken server can send: an index it
        # has not, so the supervisor counts it under no function's series, as before)
        functions = self.spec.functions
        index = functions.index(function) if function in functions else len(functions)
        self.pending_end = now = time.perf_counter()
        self.slot.begin(index, function, handle.encode("utf-8", "surrogateescape"), b"", now)
        self.pending = (slots.OUTCOME_CODE["fail"], 0.0, message[:MAX_ERROR], function)
        self.answered(True)  # its failure went to gearmand before this was called

    def job_failed(self, function: str, error: BaseException) -> tuple[str, str]:
        """Log a failed job and decide what follows: (outcome, message)."""
        outcome, message = "exception", error_text(error)
        if isinstance(error, SystemExit):
            # the job asked its process to end: fail this job, then exit cleanly
            message = f"job called exit({error.code})"
            self.stop_requested, self.stop_reason = True, "exit"
        elif isinstance(error, JobTimeout):
            self.stop_requested = True  # the job's state may be broken: start afresh
            self.stop_reason = "timeout"
        elif isinstance(error, ResultTypeError):
            outcome = "fail"
        log.error(
            "job %s failed: %s", function, message,
            exc_info=(type(error), error, error.__traceback__)
            if outcome == "exception" and not isinstance(error, SystemExit)
            else None,
            extra={"function": function},
        )  # fmt: skip
        return outcome, message


def forked_in_job(child: Child, worker: GearmanWorker, wake_fd: int, parent: int) -> None:
    """In a process forked by job code (``os.fork``, multiprocessing): close its copies of
    the worker process's gearmand connections, channel and wake-up pipe, sending nothing
    (gearmand must see the worker's connections close when the worker dies, or it keeps the
    worker's job running and never hands it out again), and end when the worker dies
    (PR_SET_PDEATHSIG). Its log records go to its stderr. A fork of that process (the
    second fork of a daemon, after ``setsid``) is left alone: it outlives the worker."""
    if child.forked:
        return  # a fork of a fork: its parent did this already
    child.forked = True
    _set_pdeathsig()
    if os.getppid() != parent:  # the worker died before the line above
        os.kill(os.getpid(), signal.SIGKILL)
    child.stop_requested = True  # a copy that returns from the job serves no more
    child.slot.detach()
    worker.forget()
    with contextlib.suppress(OSError, ValueError):  # ValueError: forked from another thread
        write_end = signal.set_wakeup_fd(-1)
        if write_end >= 0:
            os.close(write_end)
    with contextlib.suppress(OSError):
        os.close(wake_fd)
    with contextlib.suppress(OSError):
        child.channel.close()
    child.channel = _StderrChannel()  # type: ignore[assignment]


class _StderrChannel:
    """What a forked process has in place of its worker's channel: log records go to its
    stderr (the supervisor logs them as the worker's output while the worker lives), any
    other message nowhere."""

    def send(self, data: bytes) -> int:
        if data.startswith(messages.LOG):
            with contextlib.suppress(OSError):
                os.write(2, data[len(messages.LOG) :] + b"\n")
        return len(data)

    def fileno(self) -> int:
        return -1


def _overridden(worker: Any, name: str) -> Callable[..., Any] | None:
    """The worker's hook ``name``; None when it is :class:`Worker`'s, which does nothing."""
    hook: Callable[..., Any] | None = getattr(worker, name, None)
    if hook is None or getattr(hook, "__func__", None) is getattr(Worker, name):
        return None
    return hook


def _guarded(hook: Callable[..., Any], *args: Any) -> None:
    try:
        hook(*args)
    except BaseException:  # a hook cannot end its process either
        log.exception("hook %s failed", getattr(hook, "__name__", hook))


_prctl: Any = None


def _set_pdeathsig() -> None:
    try:
        _load_prctl()(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _load_prctl() -> Any:
    """libc's prctl, looked up once (in the supervisor's warm-up: shared with the children)."""
    global _prctl
    if _prctl is None:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    return _prctl


def warm_up() -> None:
    """Run, in the supervisor before it forks, the code every worker process runs first.

    Python specialises bytecode and fills caches the first times code runs, and imports and
    CDLL lookups allocate; done once here, those pages stay shared with the children instead
    of being copied into each of them (about 1.5 MiB per process)."""
    try:
        import setproctitle

        setproctitle.getproctitle()
    except Exception:
        pass
    try:
        _load_prctl()
    except (OSError, AttributeError):
        pass
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
        worker.on_answered = child.answered
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


# what gearmand answers the worker: one job per grab (the first confirms the registration)
WARM_UP_REPLIES = b"".join(
    pack(P.JOB_ASSIGN_UNIQ, b"H:warm:%d" % i, b"warm_up", b"", b"x", magic=RES)
    for i in range(WARM_UP_JOBS)
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
    protocol: Protocol | None = None,
) -> NoReturn:
    """The body of a forked worker process. Never returns. ``protocol``: the deployment's
    ``send_exceptions`` and ``max_packet_size``."""
    code = 0
    try:
        _set_pdeathsig()
        child = Child(spec, channel, max_jobs, lifetime)
        if child.supervisor_pid == 1:
            os._exit(0)
        for name in CHILD_ENV_DROP:
            os.environ.pop(name, None)
        logs.setup_child(child.send_log, spec.name, loglevel)
        wake_fd = _handle_signals(child, unblock)
        _set_title(spec)
        spec.worker.after_fork()  # per-process connections, before registering
        _serve(child, servers, wake_fd, protocol)
    except BaseException:
        code = EXIT_WORKER_FAILED
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


def _handle_signals(child: Child, unblock: Iterable[int]) -> int:
    """The child's own signal handlers; the fd a signal makes readable (wakes the worker)."""
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
    return wake_r


def _set_title(spec: JobSpec) -> None:
    title = spec.worker.process_name(_title(), spec.name)
    if isinstance(title, str) and title:
        import setproctitle

        setproctitle.setproctitle(title)


def _serve(
    child: Child, servers: list[Server], wake_fd: int, protocol: Protocol | None = None
) -> None:
    """Register the job's functions and run jobs until the child stops; then say why."""
    spec, channel = child.spec, child.channel
    functions = {m.function: child.handler(m) for m in spec.methods}
    client_id = f"gdriver:{spec.name}:{os.getpid()}"
    worker = GearmanWorker(servers, functions, client_id=client_id, protocol=protocol)
    worker.poll_interval = 5.0  # signals and the channel wake it; idle children stay asleep
    worker.on_rejected = child.rejected
    worker.on_answered = child.answered
    os.register_at_fork(after_in_child=partial(forked_in_job, child, worker, wake_fd, os.getpid()))

    def on_registered(n: int) -> None:
        child.send(messages.encode_registered(n))

    def on_refused(n: int) -> None:
        child.send(messages.encode_refused(n))

    channel.setblocking(False)
    try:
        worker.work(
            child.should_stop,
            wake_fds=(wake_fd, channel.fileno()),
            on_wake=child.on_wake,
            on_registered=on_registered,
            on_idle=child.on_idle,
            on_refused=on_refused,
        )
    finally:
        worker.close()
    channel.setblocking(True)
    child.report_idle()
    if child.stop_reason:
        child.send(messages.encode_exiting(child.stop_reason))


def _title() -> str:
    try:
        import setproctitle

        return str(setproctitle.getproctitle())
    except Exception:
        return " ".join(sys.argv)
