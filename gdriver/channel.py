"""The child -> supervisor channel: message tags and their encoding, for both sides.

Each worker process has its own SOCK_SEQPACKET socket to the supervisor: one message per
packet, never its stdout.  The first byte of a message is its tag:

- ``R<n>``: registered with n gearmand servers (confirmed by an ECHO round trip)
- ``B<function>``: busy: started a job after being idle
- ``D<json>``: finished jobs, a list of ``[outcome, seconds, function, error]``; outcome is
  ``complete``, ``fail`` or ``exception``. Sent at least every 50 ms and before going idle,
  so a process streaming jobs sends a few messages a second, not two per job.
- ``I``: idle: no work for 50 ms (every connection asleep); a process that goes straight
  from one job to the next stays busy and sends nothing between them
- ``L<json>``: a log record, already formatted
- ``X<reason>``: about to exit on its own (``max_jobs``, ``lifetime``, ``timeout``, ``exit``)
- ``P<json>``: failed a poison job without running it: ``[function, handle, unique]``
  (``gdriver.poison``); its report follows in a ``D`` message as any failed job's

The supervisor sends one kind of message only, ``A<json>``: the resolved addresses of a
gearmand name, whenever they change (:mod:`gdriver.resolver`; worker processes never resolve
names themselves). It stops a child with SIGTERM (finish the current job, then exit) and the
child stops by itself when the channel reaches EOF or the supervisor dies.
The child encodes with the ``encode_*`` functions, the supervisor reads with :func:`decode`.
"""

from __future__ import annotations

import json
from typing import NamedTuple

__all__ = [
    "MAX_MESSAGE",
    "Busy",
    "Done",
    "Exiting",
    "Idle",
    "JobReport",
    "Log",
    "Message",
    "Poisoned",
    "Registered",
    "decode",
    "encode_busy",
    "encode_done",
    "encode_exiting",
    "encode_idle",
    "encode_log",
    "encode_poisoned",
    "encode_registered",
]

MAX_MESSAGE = 60_000  # bytes; the supervisor reads each message whole in one recv

REGISTERED = b"R"
BUSY = b"B"
DONE = b"D"
IDLE = b"I"
LOG = b"L"
EXITING = b"X"
POISONED = b"P"


class JobReport(NamedTuple):
    """One finished job."""

    outcome: str  # complete, fail or exception
    seconds: float
    function: str
    error: str  # "" when complete


class Registered(NamedTuple):
    servers: int  # gearmand servers on which the registration is confirmed


class Busy(NamedTuple):
    function: str


class Done(NamedTuple):
    reports: list[JobReport]


class Idle(NamedTuple):
    pass


class Log(NamedTuple):
    line: bytes  # one JSON object, without the newline


class Exiting(NamedTuple):
    reason: str


class Poisoned(NamedTuple):
    function: str
    handle: str
    unique: str


Message = Registered | Busy | Done | Idle | Log | Exiting | Poisoned


# -- child side -------------------------------------------------------------------------------
def encode_registered(servers: int) -> bytes:
    return REGISTERED + b"%d" % servers


def encode_busy(function: str) -> bytes:
    return BUSY + function.encode()


def encode_idle() -> bytes:
    return IDLE


def encode_exiting(reason: str) -> bytes:
    return EXITING + reason.encode()


def encode_poisoned(function: str, handle: str, unique: str) -> bytes:
    data = json.dumps([function, handle, unique], ensure_ascii=False)
    return POISONED + data.encode("utf-8", "surrogateescape")[:MAX_MESSAGE]


def encode_done(batch: list[tuple[str, float, str, str]]) -> list[bytes]:
    """The reports as messages of at most MAX_MESSAGE bytes (split in halves when needed)."""
    data = DONE + json.dumps(batch, ensure_ascii=False).encode("utf-8", "replace")
    if len(data) <= MAX_MESSAGE:
        return [data]
    if len(batch) == 1:
        return [data[:MAX_MESSAGE]]  # one report with a huge function name: cut
    half = len(batch) // 2
    return encode_done(batch[:half]) + encode_done(batch[half:])


def encode_log(line: str) -> bytes:
    """A formatted JSON log record, cut to fit one message and still one JSON object."""
    data = line.encode("utf-8", "replace")
    if len(data) > MAX_MESSAGE:
        data = shrink_record(line)
    return LOG + data


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


# -- supervisor side --------------------------------------------------------------------------
_IDLE = Idle()


def decode(data: bytes) -> Message | None:
    """The message in one channel packet; None when it is not one (unknown tag, bad body)."""
    tag, body = data[:1], data[1:]
    try:
        if tag == DONE:
            return Done([JobReport(*report) for report in json.loads(body)])
        if tag == BUSY:
            return Busy(body.decode("utf-8", "replace"))
        if tag == IDLE:
            return _IDLE
        if tag == LOG:
            return Log(body)
        if tag == REGISTERED:
            return Registered(int(body or b"0"))
        if tag == EXITING:
            return Exiting(body.decode("ascii", "replace"))
        if tag == POISONED:
            return Poisoned(*(str(s) for s in json.loads(body.decode("utf-8", "surrogateescape"))))
    except (ValueError, TypeError):
        return None
    return None
