"""JSON logs on stdout, one object per line, written only by the supervisor.

Fields (stable): ``timestamp`` (UTC ISO 8601), ``level``, ``logger``, ``message``, ``pid``;
where they apply ``job_name``, ``function``, ``stream`` (``stdout``/``stderr`` for captured
output of user code), ``exc_info`` (a traceback, as one string), and event fields such as
``event``, ``count``, ``reason``, ``status``, ``signal``.

Worker processes never write to the supervisor's stdout themselves: their log records travel
over their channel and their fd 1/2 are pipes the supervisor reads, so records from many
processes never interleave inside a line, whatever their length.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import logging
import os
import selectors
import stat
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from pythonjsonlogger.json import JsonFormatter


class Formatter(JsonFormatter):
    def __init__(self) -> None:
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp=True,
            json_ensure_ascii=False,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data.setdefault("pid", getattr(record, "pid", None) or record.process)
        job_name = getattr(record, "job_name", None)
        if job_name:
            log_data["job_name"] = job_name
        exc = log_data.pop("exc_info", None)
        if exc:
            log_data["exc_info"] = exc
        log_data.pop("taskName", None)


FORMATTER = Formatter()


def timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def write_line(data: bytes, fd: int = 1) -> None:
    """One record, one write loop: nothing else writes to this fd in between. Once the
    supervisor's loop serves stdout (:func:`attach`), the record is queued instead, and dropped
    (counted) when the queue is past its hard cap."""
    if fd == 1 and WRITER.buffered():
        WRITER.write(data, droppable=True)
        return
    write_blocking(data, fd)


def write_blocking(data: bytes, fd: int = 1) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            import select

            select.select([], [fd], [], 1.0)
            continue
        except (BrokenPipeError, OSError):
            return
        view = view[n:]


def write_record(fields: dict[str, Any], droppable: bool = True) -> None:
    """Write a ready-made record (e.g. a line captured from a worker process); a record that
    is not ``droppable`` is queued past the hard cap (its source must be paused instead)."""
    data = encode(fields)
    if WRITER.buffered():
        WRITER.write(data, droppable)
    else:
        write_blocking(data)


def encode(fields: dict[str, Any]) -> bytes:
    fields.setdefault("timestamp", timestamp())
    return json.dumps(fields, ensure_ascii=False, default=str).encode() + b"\n"


HIGH_WATER = 1 << 20  # bytes queued for stdout past which the workers' output pipes wait
HARD_CAP = 8 << 20  # bytes queued past which droppable records are dropped (and counted)
EXIT_FLUSH = 5.0  # s the exit waits for a stalled stdout reader to take the queue


class Writer:
    """The supervisor's stdout when it is a pipe or a socket (a log shipper, journald):
    written non-blocking from a queue that the loop flushes when the reader takes more, so a
    stalled reader never stops the loop. Records are queued whole and in order, and only the
    head of the queue is ever part-written, so records never interleave."""

    def __init__(self) -> None:
        self.fd = 1
        self.loop: Any = None  # the EventLoop serving the fd; None: written directly
        self.pid = 0  # the process that attached (a forked child writes directly)
        self.queue: deque[bytes] = deque()
        self.head = 0  # bytes of queue[0] already written
        self.size = 0  # bytes queued, not yet written
        self.watching = False
        self.over = False  # went past high water: say what was dropped once below half of it
        self.dropped = 0  # records dropped since the last record saying so
        self.on_drop: Callable[[int], None] = lambda n: None

    def buffered(self) -> bool:
        return self.pid == os.getpid()

    def congested(self) -> bool:
        """Past high water: sources that can wait (the workers' pipes) should."""
        return self.buffered() and self.size > HIGH_WATER

    def attach(self, loop: Any, on_drop: Callable[[int], None] = lambda n: None) -> None:
        """Serve stdout from ``loop`` when it is a pipe or a socket (a regular file or a
        terminal never stalls for long: they stay written directly)."""
        try:
            mode = os.fstat(self.fd).st_mode
        except OSError:
            return
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return
        if self.pid != os.getpid():
            os.set_blocking(self.fd, False)
            atexit.register(self.close, EXIT_FLUSH)
        self.loop, self.pid, self.on_drop = loop, os.getpid(), on_drop
        self.watching = False
        self.flush()

    def detach(self) -> None:
        """The loop closes: queued records wait for the exit (:meth:`close`)."""
        if self.loop is not None and self.watching:
            self.loop.remove(self.fd)
        self.loop, self.watching = None, False

    def write(self, data: bytes, droppable: bool) -> None:
        if droppable and self.size + len(data) > HARD_CAP:
            self.dropped += 1
            self.on_drop(1)
            return
        self.queue.append(data)
        self.size += len(data)
        self.over = self.over or self.size > HIGH_WATER
        if len(self.queue) == 1:
            self.flush()

    def flush(self) -> None:
        """Write what the reader takes now; watch the fd for the rest."""
        try:
            while self.queue:
                head = self.queue[0]
                n = os.write(self.fd, memoryview(head)[self.head :])
                self.size -= n
                self.head += n
                if self.head == len(head):
                    self.queue.popleft()
                    self.head = 0
        except BlockingIOError:
            pass
        except OSError:  # the reader is gone: nothing will ever take these
            self.queue.clear()
            self.size = self.head = 0
        self.watch(bool(self.queue))
        if self.over and self.size <= HIGH_WATER // 2:
            self.recovered()

    def watch(self, on: bool) -> None:
        if self.loop is None or on == self.watching:
            return
        if on:
            self.loop.add(self.fd, selectors.EVENT_WRITE, lambda mask: self.flush())
        else:
            self.loop.remove(self.fd)
        self.watching = on

    def recovered(self) -> None:
        self.over = False
        if self.dropped:
            count, self.dropped = self.dropped, 0
            message = f"stdout reader stalled: {count} log records dropped"
            fields = {"level": "WARNING", "logger": "gdriver.logs", "message": message,
                      "pid": os.getpid(), "event": "log_records_dropped",
                      "count": count}  # fmt: skip
            self.write(encode(fields), droppable=False)

    def close(self, timeout: float) -> None:
        """At exit: write what is queued, waiting at most ``timeout`` s for the reader; then
        stdout is blocking again, as it was found."""
        if not self.buffered():
            return
        import select

        self.detach()
        deadline = time.monotonic() + timeout
        while self.queue:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            select.select([], [self.fd], [], min(left, 1.0))
            self.flush()
        self.pid = 0
        with contextlib.suppress(OSError):
            os.set_blocking(self.fd, True)


WRITER = Writer()


class StdoutHandler(logging.Handler):
    """The supervisor's handler: one JSON line per record on fd 1."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            write_line(self.format(record).encode("utf-8", "replace") + b"\n")
        except Exception:
            self.handleError(record)


class CallbackHandler(logging.Handler):
    """A worker process's handler: formats the record, hands the JSON line to a callback
    (which sends it to the supervisor over the channel)."""

    def __init__(self, send: Callable[[str], None], job_name: str) -> None:
        super().__init__()
        self.send = send
        self.job_name = job_name

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not getattr(record, "job_name", None):
                record.job_name = self.job_name
            self.send(self.format(record))
        except Exception:
            self.handleError(record)


def setup(level: str = "INFO") -> None:
    """Configure the root logger for the supervisor."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = StdoutHandler()
    handler.setFormatter(FORMATTER)
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    sys.excepthook = _excepthook


def setup_child(send: Callable[[str], None], job_name: str, level: int) -> None:
    """Route a worker process's logging to the supervisor."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = CallbackHandler(send, job_name)
    handler.setFormatter(FORMATTER)
    root.addHandler(handler)
    root.setLevel(level)


def _excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    logging.getLogger("gdriver").critical("uncaught exception", exc_info=(kind, value, tb))


def log_event(logger: logging.Logger, level: int, message: str, event: str, **fields: Any) -> None:
    """Log ``message`` with the structured fields ``event`` and ``fields`` (JSON keys).

    ``message`` is final text: no %-formatting is applied to it."""
    logger.log(level, message, extra={"event": event, **fields})
