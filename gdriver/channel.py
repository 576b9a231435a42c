"""The channel between the supervisor and each worker process: every message tag and its
encoding, for both sides.

Each worker process has its own SOCK_SEQPACKET socket to the supervisor: one message per
packet, never its stdout.  The first byte of a message is its tag.  Child -> supervisor:

- ``R<n>``: registered with n gearmand servers (a grab answered on each: jobs can come)
- ``G<n>``: n gearmand servers refuse every grab (0: none any more); no job can be served
  from them, so the supervisor is not ready while any process reports one
- ``B<function>``: busy: started a job after being idle
- ``D<first><count><records><json>``: finished jobs. ``first`` (8 bytes) numbers the first
  of them among the process's finished jobs (from 0), so the supervisor sees a lost message
  and reads its jobs from the process's slot; ``count`` (2 bytes) records follow, each as
  the slot's ring holds it (``gdriver.slots``: seconds, the function's index in the job,
  the outcome's index in ``complete``, ``fail``, ``exception``): the child copies them, it
  does not format them (and the supervisor drops a message whose records the slot does not
  hold: worker code can write to its channel). Then, when some failed with a message,
  ``[[n, error], ...]`` in JSON (``n``: the job's number). Sent at least every 50 ms and
  before going idle, so a process streaming jobs sends a few messages a second, not two per
  job.
- ``I``: idle: no work for 50 ms (every connection asleep); a process that goes straight
  from one job to the next stays busy and sends nothing between them
- ``L<json>``: a log record, already formatted
- ``X<reason>``: about to exit on its own (``max_jobs``, ``lifetime``, ``timeout``, ``exit``)
- ``P<json>``: failed a poison job without running it: ``[function, handle, unique, deaths,
  last exit]``
  (``gdriver.poison``); its report follows in a ``D`` message as any failed job's

Supervisor -> child, one kind of message only:

- ``A<json>``: the resolved addresses of a gearmand name, ``[host, port, [[family, proto,
  sockaddr], ...], error]``, sent whenever they change (encoded and applied by
  :mod:`gdriver.resolver`; worker processes never resolve names themselves)

The supervisor stops a child with SIGTERM (finish the current job, then exit) and the child
stops by itself when the channel reaches EOF or the supervisor dies.  The child encodes with
the ``encode_*`` functions, the supervisor reads with :func:`decode`.
"""

from __future__ import annotations

import json
import struct
from typing import NamedTuple

from gdriver.slots import DONE_SIZE, records

__all__ = [
    "MAX_MESSAGE",
    "Busy",
    "Done",
    "Exiting",
    "GrabsRefused",
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
    "encode_refused",
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
REFUSED = b"G"
ADDRESSES = b"A"  # supervisor -> child


class JobReport(NamedTuple):
    """One finished job."""

    outcome: str  # complete, fail or exception
    seconds: float
    function: str
    error: str  # "" when complete


class Registered(NamedTuple):
    servers: int  # gearmand servers on which the registration is confirmed


class GrabsRefused(NamedTuple):
    servers: int  # gearmand servers that refuse every grab


class Busy(NamedTuple):
    function: str


class Done(NamedTuple):
    first: int  # the number of the first job among the process's finished jobs
    records: list[tuple[float, int, int]]  # seconds, the function's index, the outcome's
    errors: dict[int, str]  # job number -> error message, for failures that have one
    data: bytes  # the records as sent: the slot's ring records of these jobs


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
    deaths: int  # of the job, as the process knew them
    last: str  # how the last process that ran it died


Message = Registered | GrabsRefused | Busy | Done | Idle | Log | Exiting | Poisoned


# -- child side -------------------------------------------------------------------------------
def encode_registered(servers: int) -> bytes:
    return REGISTERED + b"%d" % servers


def encode_refused(servers: int) -> bytes:
    return REFUSED + b"%d" % servers


def encode_busy(function: str) -> bytes:
    return BUSY + function.encode()


def encode_idle() -> bytes:
    return IDLE


def encode_exiting(reason: str) -> bytes:
    return EXITING + reason.encode()


def encode_poisoned(function: str, handle: str, unique: str, deaths: int, last: str) -> bytes:
    data = json.dumps([function, handle, unique, deaths, last], ensure_ascii=False)
    return POISONED + data.encode("utf-8", "surrogateescape")[:MAX_MESSAGE]


_DONE_HEAD = struct.Struct("=QH")  # first, count


def encode_done(first: int, ring: bytes, count: int, errors: list[tuple[int, str]]) -> bytes:
    """``count`` finished jobs, the first of them job number ``first``: their slot records
    (``ring``, as :meth:`gdriver.slots.Slot.last` gives them) and the error messages of
    those that failed with one (cut to share MAX_MESSAGE when they would not fit)."""
    data = DONE + _DONE_HEAD.pack(first, count) + ring
    if errors:
        text = json.dumps(errors, ensure_ascii=False).encode("utf-8", "replace")
        room = MAX_MESSAGE - len(data)
        if len(text) > room:
            each = max(0, room // len(errors) - 32) // 6  # characters of <= 6 bytes (\u001f)
            cut = [(n, error[:each]) for n, error in errors]
            text = json.dumps(cut, ensure_ascii=False).encode("utf-8", "replace")
        data += text
    return data


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
            first, count = _DONE_HEAD.unpack_from(body)
            end = _DONE_HEAD.size + count * DONE_SIZE
            data = body[_DONE_HEAD.size : end]
            jobs = records(data)
            if len(jobs) != count:
                return None
            return Done(first, jobs, _errors(body[end:]), data)
        if tag == BUSY:
            return Busy(body.decode("utf-8", "replace"))
        if tag == IDLE:
            return _IDLE
        if tag == LOG:
            return Log(body)
        if tag == REGISTERED:
            return Registered(int(body or b"0"))
        if tag == REFUSED:
            return GrabsRefused(int(body or b"0"))
        if tag == EXITING:
            return Exiting(body.decode("ascii", "replace"))
        if tag == POISONED:
            function, handle, unique, deaths, last = json.loads(
                body.decode("utf-8", "surrogateescape")
            )
            return Poisoned(str(function), str(handle), str(unique), int(deaths), str(last))
    except (ValueError, TypeError, OverflowError, struct.error):
        return None
    return None


def _errors(data: bytes) -> dict[int, str]:
    """The error messages of a ``D`` message, their types checked (worker code can write
    anything to its channel)."""
    if not data:
        return {}
    items = json.loads(data.decode("utf-8", "replace"))
    if not isinstance(items, list):
        raise TypeError("not a list of errors")
    out = {}
    for item in items:
        if not isinstance(item, list) or len(item) != 2:
            raise TypeError("not an error")
        n, error = item
        if not isinstance(n, int) or isinstance(n, bool) or not isinstance(error, str):
            raise TypeError("not an error")
        out[n] = error
    return out
