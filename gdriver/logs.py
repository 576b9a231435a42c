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

import datetime
import json
import logging
import os
import sys
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
    """One record, one write loop: nothing else writes to this fd in between."""
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


def write_record(fields: dict[str, Any]) -> None:
    """Write a ready-made record (e.g. a line captured from a worker process)."""
    fields.setdefault("timestamp", timestamp())
    write_line(json.dumps(fields, ensure_ascii=False, default=str).encode() + b"\n")


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
