"""Each worker process's slot: what job it runs now and which jobs it finished, in memory the
supervisor shares with it, written by the child without a syscall, read by the supervisor when
it needs it (an exit, a timeout).

One anonymous shared mapping, made by the supervisor before the first fork (:class:`Board`):
a header (the poison table's version and ``poison_threshold``), the poison table (the jobs
whose processes died running them, the poisoned ones flagged; see ``gdriver.poison``), the
in-flight table, then one fixed-size record per process slot. A record holds:

- ``begun`` and ``finished``: jobs started and jobs finished by the process; a job runs while
  ``begun > finished``. The running job's fields are written only between jobs (``begun ==
  finished``), and ``begun`` last: a reader that sees both counters the same before and after
  reading the fields read them whole (a sequence lock at no cost to the child; the supervisor
  reads a live process's slot rarely, a dead one's without any race).
- the running job: its start (``time.perf_counter``, CLOCK_MONOTONIC, the same in every process),
  the index of its function in the job's methods, its handle and unique (cut to FIELD bytes),
  and the deaths the process knew of that job when it began it.
- the outcomes of the last RING finished jobs: a process batches its job reports on its channel
  (``gdriver.process``), each message numbered by its first job and carrying these records
  as they are here (:meth:`Slot.last`); the reports of a process that dies before sending
  them, or whose message was lost, are read here by that number.
- the process's pid, written by the process, cleared by the supervisor once it has counted
  the process's death (:meth:`Board.release`).

The in-flight table tells a process which slot ran the job it begins before it: the entry at
a handle's hash holds the slot of the process running a job of that handle (cleared when the
job finishes, so left only by a running job or one that died in it). gearmand
hands a job on when its worker's connection closes, which for a process that died in it is
before the supervisor has reaped it and counted the death; the process that gets the job
finds the dead one's slot still running it (its pid not cleared, the process exiting or
gone) and counts that death itself, on top of the deaths that process knew of: a job that
kills every process that runs it is refused after ``poison_threshold`` deaths, however many
idle processes gearmand can hand it to. A table of INFLIGHT entries: a job whose entry
another running job's handle takes over (the same hash, 1 in INFLIGHT) loses it, and its
death is then counted when the supervisor reaps the process (a moment later).

The child's side is :class:`Slot`; everything else is the supervisor's.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
from collections.abc import Iterator
from typing import NamedTuple

from gdriver.attributes import PROCESS_LIMIT
from gdriver.exits import signal_name
from gdriver.logs import log_event

log = logging.getLogger("gdriver.slots")

FIELD = 64  # bytes kept of a handle or a unique (gearmand's own limit for both)
RING = 64  # finished jobs remembered: at least the reports a process batches (FLUSH_JOBS)
TABLE = 256  # poison table entries: the most recent jobs that killed their processes
TABLE_WAIT = 1.0  # s a process waits at most for the supervisor to finish writing the table
INFLIGHT = 16384  # in-flight table entries (a power of two)
OUTCOMES = ("complete", "fail", "exception")
OUTCOME_CODE = {name: i for i, name in enumerate(OUTCOMES)}

_COUNT = struct.Struct("=Q")
_JOB = struct.Struct(f"=dHH{FIELD}sH{FIELD}sH")  # start, method, len, handle, len, unique, deaths
_DONE = struct.Struct("=dHB")  # seconds, method, outcome
_ENTRY = struct.Struct("=qdH46s")  # key, expires (perf_counter), deaths | POISONED, why (cut)
POISONED = 0x8000  # an entry's deaths: refuse the job
_HEADER = struct.Struct("=QQ")  # the table's version, poison_threshold
# bound once: a job's start and end write the slot, and each lookup counts there
_pack_job, _pack_done, _DONE_SIZE = _JOB.pack_into, _DONE.pack_into, _DONE.size
DONE_SIZE = _DONE_SIZE  # bytes of one finished job's record
_JOB_AT = 16  # after begun and finished
_RING_AT = 160
RECORD = 1024  # bytes per slot: 4 to a page
_PID_AT = RECORD - 8
_STOPPED_AT = _PID_AT - 8  # a byte: the supervisor told the process to stop
assert _JOB_AT + _JOB.size <= _RING_AT and _RING_AT + RING * _DONE.size <= _STOPPED_AT
assert _DONE.format.endswith("B")  # records() reads each outcome as its record's last byte
_TABLE_AT = 64  # after the header
_INFLIGHT_AT = 20480  # page aligned, after the table
_SLOTS_AT = _INFLIGHT_AT + INFLIGHT * 4
assert _TABLE_AT + TABLE * _ENTRY.size <= _INFLIGHT_AT and not _SLOTS_AT % 4096
assert INFLIGHT == 0x3FFF + 1 and PROCESS_LIMIT < 1 << 31  # an entry: a slot's index + 1
_PF_EXITING = 0x4  # /proc/PID/stat flags: the process is exiting


def job_key(function: str, handle: bytes, unique: bytes) -> int:
    """The poison table's key of a job: its function and unique, or its handle when it has no
    unique (gearmand numbers handles afresh when it restarts: a handle alone names a job only
    until then). Python's hash of bytes is seeded once per interpreter: the supervisor and its
    forked children agree."""
    if unique:
        return hash((function, 1, unique[:FIELD])) or 1
    return hash((function, 0, handle[:FIELD])) or 1


class RunningJob(NamedTuple):
    """The job a process was running, as its slot says."""

    method: int  # index in the job's methods
    handle: str
    unique: str
    seconds: float  # in the job so far (or until the process died)
    handle_bytes: bytes
    unique_bytes: bytes
    deaths: int = 0  # of this job, as far as the process knew when it began it


class Finished(NamedTuple):
    outcome: str
    seconds: float
    method: int


class SlotState(NamedTuple):
    """A slot as read: jobs finished, and the job running (None between jobs)."""

    finished: int
    running: RunningJob | None


def records(data: bytes) -> list[tuple[float, int, int]]:
    """Ring records (as :meth:`Slot.last` gives them) read back: (seconds, the function's
    index, the outcome's index in OUTCOMES) each; ValueError when they are not whole records
    or name no outcome (a channel message can be anything)."""
    if len(data) % _DONE_SIZE:
        raise ValueError("not whole job records")
    if data and max(data[_DONE_SIZE - 1 :: _DONE_SIZE]) >= len(OUTCOMES):  # each one's last byte
        raise ValueError("not an outcome")
    return list(_DONE.iter_unpack(data))


def _ring_records(buffer: mmap.mmap | bytearray, at: int, first: int, n: int) -> bytes:
    """The ring records of the slot at ``at`` for jobs ``first`` to ``first + n - 1`` (n at
    most RING, the last ones finished), in job order."""
    ring = at + _RING_AT
    start = first % RING
    end = start + n
    if end <= RING:
        return bytes(buffer[ring + start * _DONE_SIZE : ring + end * _DONE_SIZE])
    head = bytes(buffer[ring + start * _DONE_SIZE : ring + RING * _DONE_SIZE])
    return head + bytes(buffer[ring : ring + (end - RING) * _DONE_SIZE])


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _running(buffer: mmap.mmap | bytearray, at: int, now: float) -> SlotState:
    """What the record at ``at`` says: its finished jobs, its running job (sequence-locked
    against the live process writing it: a few tries, then none running)."""
    for _ in range(100):
        begun = _COUNT.unpack_from(buffer, at)[0]
        finished = _COUNT.unpack_from(buffer, at + 8)[0]
        start, method, hlen, handle, ulen, unique, deaths = _JOB.unpack_from(buffer, at + _JOB_AT)
        if (
            _COUNT.unpack_from(buffer, at)[0] != begun
            or _COUNT.unpack_from(buffer, at + 8)[0] != finished
        ):
            continue  # it finished or started a job meanwhile: the fields may be torn
        if begun <= finished:
            return SlotState(finished, None)
        handle, unique = handle[: min(hlen, FIELD)], unique[: min(ulen, FIELD)]
        running = RunningJob(method, _text(handle), _text(unique), max(0.0, now - start),
                             handle, unique, deaths)  # fmt: skip
        return SlotState(finished, running)
    return SlotState(_COUNT.unpack_from(buffer, at + 8)[0], None)


def _died_in(
    buffer: mmap.mmap | bytearray, index: int, handle: bytes, unique: bytes
) -> tuple[int, str]:
    """The slot ``index`` began a job of ``handle`` last. When it still runs that job and its
    process is exiting in it, unreaped and not stopped by the supervisor: the job's deaths
    counting that one, and how it died. A process reaped but whose slot is not yet freed is
    waited for, TABLE_WAIT at most: the supervisor is counting it, and the table will say
    it. Else (0, "")."""
    if index < 0 or _SLOTS_AT + (index + 1) * RECORD > len(buffer):
        return 0, ""
    at = _SLOTS_AT + index * RECORD
    running = _running(buffer, at, 0.0).running
    if running is None or (running.handle_bytes, running.unique_bytes) != (
        handle[:FIELD],
        unique[:FIELD],
    ):
        return 0, ""
    pid = _COUNT.unpack_from(buffer, at + _PID_AT)[0]
    if not pid or buffer[at + _STOPPED_AT]:  # counted and freed; or a stop (not the job's doing)
        return 0, ""
    how = _ending(pid)
    if how is None:  # alive: its connection to gearmand dropped, not its process
        return 0, ""
    if how:
        return running.deaths + 1, how
    for _ in _waiting():  # reaped: the supervisor is counting it
        if _COUNT.unpack_from(buffer, at + _PID_AT)[0] != pid:
            return 0, ""
    return running.deaths + 1, "exit unknown"


def _waiting() -> Iterator[None]:
    """The turns of a wait for the supervisor, TABLE_WAIT at most: the first at once, the
    next after a yield, then after pauses of 0.1 ms doubling to 10 ms."""
    deadline = time.monotonic() + TABLE_WAIT
    pause = 0.0
    while True:
        yield
        if time.monotonic() >= deadline:
            return
        time.sleep(pause)
        pause = min(0.01, pause * 2 or 0.0001)


def _ending(pid: int) -> str | None:
    """How process ``pid`` is ending, from ``/proc/PID/stat`` (its state, its flags, and the
    exit code the kernel set when it began to exit); None: it is not; "": it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    except OSError:  # not to be read here (hidepid, out of descriptors): not known to die
        return None
    if fields[0] not in (b"Z", b"X") and not int(fields[6]) & _PF_EXITING:
        return None
    if len(fields) < 50:
        return "exit unknown"
    status = int(fields[49])
    if os.WIFSIGNALED(status):
        return f"signal {signal_name(os.WTERMSIG(status))}"
    return f"exit status {os.WEXITSTATUS(status)}"


class Slot:
    """The child's end of its slot (``buffer``: the shared mapping; a private mapping when a
    process runs jobs without a supervisor, as the warm-up does)."""

    __slots__ = ("at", "begun", "buffer", "counts", "done", "entry", "header", "inflight",
                 "keys", "method", "refused", "seen", "tag")  # fmt: skip

    def __init__(self, buffer: mmap.mmap | bytearray, index: int) -> None:
        self.attach(buffer, index)
        self.begun = self.done = 0  # the supervisor cleared the record
        self.method = 0  # of the job begun last
        self.refused = (0, "")  # the deaths and last exit of the job refused last

    def attach(self, buffer: mmap.mmap | bytearray, index: int) -> None:
        self.buffer = buffer
        self.at = at = _SLOTS_AT + index * RECORD
        # begun and finished, the header and the in-flight table, as numbers: a store, not a
        # call, per job (views of the mapping: :meth:`release` lets a Board in the same
        # process close it)
        self.counts = memoryview(buffer)[at : at + 16].cast("Q")
        self.header = memoryview(buffer)[: _HEADER.size].cast("Q")
        self.inflight = memoryview(buffer)[_INFLIGHT_AT:_SLOTS_AT].cast("i")
        self.tag = index + 1
        self.entry = 0  # the in-flight entry of the job begun last
        _COUNT.pack_into(buffer, at + _PID_AT, os.getpid())
        self.seen = -1  # the poison table's version last read
        # key -> deaths, how the last process died, until when (perf_counter), poisoned
        self.keys: dict[int, tuple[int, str, float, bool]] = {}

    def release(self) -> None:
        """Give up the views of the buffer (a process that closes the Board it shares)."""
        self.counts.release()
        self.header.release()
        self.inflight.release()

    def begin(self, method: int, function: str, handle: bytes, unique: bytes, start: float) -> str:
        """A job starts: record it. Returns why it must not run ("" : run it): the poison
        table says so, or the process that ran it before died in it and that death makes
        ``poison_threshold`` (see the module)."""
        inflight = self.inflight
        self.entry = at = hash(handle) & 0x3FFF  # (INFLIGHT - 1)
        before = inflight[at]
        inflight[at] = tag = self.tag
        if self.header[0] != self.seen:
            self.read_table()
        if (not before or before == tag) and not self.keys:  # nothing is known of it: run it
            _pack_job(self.buffer, self.at + _JOB_AT, start, method, len(handle), handle,
                      len(unique), unique, 0)  # fmt: skip
            self.method = method
            self.begun = self.counts[0] = self.begun + 1  # the fields first (see the module)
            return ""
        return self.begin_known(before, method, function, handle, unique, start)

    def begin_known(
        self, before: int, method: int, function: str, handle: bytes, unique: bytes, start: float
    ) -> str:
        """:meth:`begin` of a job the tables may know of: ``before`` is its handle's in-flight
        entry as it was (a slot that began a job of the same handle's hash, or another)."""
        threshold = self.header[1]
        died, how = 0, ""
        if threshold and before and before != self.tag:
            died, how = _died_in(self.buffer, before - 1, handle, unique)
            if self.header[0] != self.seen:  # (written while it waited)
                self.read_table()
        found = self.keys.get(job_key(function, handle, unique)) if self.keys else None
        deaths, why, poisoned = died, how, False
        if found is not None and found[2] > start:  # (past that: forgotten)
            poisoned = found[3]
            if found[0] >= died:
                deaths, why = found[0], found[1]
        _pack_job(self.buffer, self.at + _JOB_AT, start, method, len(handle), handle,
                  len(unique), unique, min(deaths, POISONED - 1))  # fmt: skip
        self.method = method
        self.begun = self.counts[0] = self.begun + 1  # the fields first (see the module)
        if not (poisoned or (died and 0 < threshold <= deaths)):
            return ""
        self.refused = (deaths, why)
        return (
            f"poison job: {deaths} worker processes died running it (last: {why}); "
            "failed without running it again (poison_threshold)"
        )

    def read_table(self) -> None:
        """Read the poison table the supervisor wrote (a sequence lock: its version is odd
        while it is written, and changes with each write). A write is one copy of a few KiB,
        but the supervisor can be descheduled in it: the read waits for it, TABLE_WAIT at
        most, rather than start a poisoned job on a table it could not read (a fresh process
        knows no poisoned job). Past that (the supervisor stopped or died in a write) the job
        is looked up in the table last read, logged, and this version is not waited for again."""
        version = 0
        for _ in _waiting():
            version = _COUNT.unpack_from(self.buffer, 0)[0]
            if not version % 2:
                table = bytes(self.buffer[_TABLE_AT : _TABLE_AT + TABLE * _ENTRY.size])
                if _COUNT.unpack_from(self.buffer, 0)[0] == version:
                    keys = {}
                    for key, until, deaths, why in _ENTRY.iter_unpack(table):
                        if key:
                            keys[key] = (deaths & ~POISONED, _text(why.rstrip(b"\0")), until,
                                         bool(deaths & POISONED))  # fmt: skip
                    self.seen, self.keys = version, keys
                    return
        self.seen = version
        message = (
            f"the poison table stayed in a write for {TABLE_WAIT:.1f}s: jobs are looked up "
            "in the table read before"
        )
        log_event(log, logging.WARNING, message, "poison_table_unread", version=version)

    def finish(self, code: int, seconds: float) -> None:
        """The job begun last finished (``code``: its outcome's index in OUTCOMES) and its
        answer went to gearmand; its report is queued. Until then the job counts as running:
        a death before it counts against it."""
        done = self.done
        _pack_done(self.buffer, self.at + _RING_AT + done % RING * _DONE_SIZE, seconds,
                   self.method, code)  # fmt: skip
        self.done = self.counts[1] = done + 1
        if self.inflight[self.entry] == self.tag:  # its handle's entry: left by a death only
            self.inflight[self.entry] = 0

    def last(self, n: int) -> bytes:
        """The ring's records of the last ``n`` finished jobs (at most RING), oldest first:
        what a ``D`` message carries (``gdriver.channel``)."""
        return _ring_records(self.buffer, self.at, self.done - n, n)

    def detach(self) -> None:
        """In a process forked from the slot's process (job code called ``os.fork``): write
        a private record from now on, never the parent's."""
        self.release()
        self.attach(_private(), 0)


_forking: tuple[Board, int] | None = None  # the slot of the process being forked


def _private() -> mmap.mmap:
    """A slot's memory for a process alone: untouched pages cost nothing (a bytearray of
    this size, zeroed, is 148 KiB written in the supervisor's heap, which its children then
    copy as they reuse it)."""
    return mmap.mmap(-1, _SLOTS_AT + RECORD, flags=mmap.MAP_PRIVATE)


def child_slot() -> Slot:
    """In a forked worker process: its slot; a private one when it has none (a process
    that runs jobs in the supervisor, the warm-up, or no slot was free)."""
    if _forking is None:
        return Slot(_private(), 0)
    board, index = _forking
    return Slot(board.buffer, index)


class Board:
    """The supervisor's shared mapping: slots handed to processes as they start, taken back
    when they are reaped; the poison table it writes and every process reads."""

    def __init__(self, slots: int = PROCESS_LIMIT) -> None:
        # anonymous and shared, made before any fork: pages are touched (and cost) only as used
        self.buffer = mmap.mmap(-1, _SLOTS_AT + slots * RECORD)
        self.free = list(range(slots - 1, -1, -1))
        self.by_pid: dict[int, int] = {}
        self.version = 0

    def claim(self) -> int:
        """A free slot, cleared, for the process about to be forked (-1: none free); the
        child takes it (:func:`child_slot`)."""
        global _forking
        if not self.free:
            _forking = None
            return -1
        index = self.free.pop()
        at = _SLOTS_AT + index * RECORD
        self.buffer[at : at + _RING_AT] = bytes(_RING_AT)
        self.buffer[at + _STOPPED_AT] = 0
        _forking = (self, index)
        return index

    def bind(self, pid: int, index: int) -> None:
        """The fork worked: ``index`` is ``pid``'s slot."""
        global _forking
        _forking = None
        if index >= 0:
            self.by_pid[pid] = index

    def unclaim(self, index: int) -> None:
        """The fork failed: the slot is free again."""
        global _forking
        _forking = None
        if index >= 0:
            self.free.append(index)

    def read(self, pid: int, now: float) -> SlotState:
        """What ``pid``'s slot says now: its finished jobs, its running job (sequence-locked
        against the live process writing it)."""
        index = self.by_pid.get(pid, -1)
        if index < 0:
            return SlotState(0, None)
        return _running(self.buffer, _SLOTS_AT + index * RECORD, now)

    def holds(self, pid: int, first: int, data: bytes) -> bool | None:
        """Whether ``data`` is what ``pid``'s ring holds for its jobs from number ``first``:
        a process writes each job there before it reports it, so a report of jobs it has not
        finished, or of other records, did not come from gdriver's code (worker code can
        write to its channel). None: it cannot be told (no slot, or the ring has moved on)."""
        index = self.by_pid.get(pid, -1)
        if index < 0:
            return None
        at = _SLOTS_AT + index * RECORD
        n = len(data) // _DONE_SIZE
        if first + n > _COUNT.unpack_from(self.buffer, at + 8)[0]:
            return False
        held = _ring_records(self.buffer, at, first, n)
        if first + RING <= _COUNT.unpack_from(self.buffer, at + 8)[0]:
            return None  # written over (job first + RING finished) before or while read
        return held == data

    def finished_range(self, pid: int, first: int, end: int, live: bool) -> list[Finished]:
        """The outcomes of ``pid``'s jobs ``first`` to ``end - 1`` (numbered from 0, as its
        messages number them) that its ring still holds: those whose reports never reached
        the supervisor. ``live``: the process may still be writing; an entry it may be
        overwriting is left out."""
        index = self.by_pid.get(pid, -1)
        if index < 0:
            return []
        at = _SLOTS_AT + index * RECORD
        buffer = self.buffer
        finished = _COUNT.unpack_from(buffer, at + 8)[0]
        start = max(first, finished - RING)
        data = _ring_records(buffer, at, start, max(0, min(end, finished) - start))
        out = [
            (n, Finished(OUTCOMES[code] if code < len(OUTCOMES) else "fail", seconds, method))
            for n, (seconds, method, code) in enumerate(_DONE.iter_unpack(data), start)
        ]
        if live:  # job n's entry is written over by job n + RING, before that one counts
            after = _COUNT.unpack_from(buffer, at + 8)[0]
            return [f for n, f in out if n + RING > after]
        return [f for _, f in out]

    def stopped(self, pid: int) -> None:
        """The supervisor tells ``pid`` to stop: a death from now on is not the job's doing
        for the other processes (the supervisor counts a timeout's itself)."""
        index = self.by_pid.get(pid, -1)
        if index >= 0:
            self.buffer[_SLOTS_AT + index * RECORD + _STOPPED_AT] = 1

    def release(self, pid: int) -> None:
        """``pid`` was reaped, read, and its death counted (or not) and published: its slot
        is free, and no process counts that death any more (see the module)."""
        index = self.by_pid.pop(pid, -1)
        if index >= 0:
            _COUNT.pack_into(self.buffer, _SLOTS_AT + index * RECORD + _PID_AT, 0)
            self.free.append(index)

    # -- the poison table --------------------------------------------------------------------
    def set_threshold(self, threshold: int) -> None:
        """``poison_threshold``, for the processes (the table unchanged)."""
        _COUNT.pack_into(self.buffer, 8, threshold)

    def set_poison(self, entries: list[tuple[int, float, int, str, bool]], threshold: int) -> None:
        """Write the jobs whose processes died running them (key, until when: a
        ``time.perf_counter`` time, deaths, why, poisoned), at most TABLE of them, the last
        ones kept, and ``poison_threshold``; every process reads them before its next job."""
        entries = entries[-TABLE:]
        table = bytearray(TABLE * _ENTRY.size)  # unused entries: key 0
        for i, (key, until, deaths, why, poisoned) in enumerate(entries):
            data = why.encode("utf-8", "replace")[: _ENTRY.size - 18]
            deaths = min(deaths, POISONED - 1) | (POISONED if poisoned else 0)
            _ENTRY.pack_into(table, i * _ENTRY.size, key, until, deaths, data)
        buffer = self.buffer
        self.version += 1
        _HEADER.pack_into(buffer, 0, self.version, threshold)  # odd: readers wait for the copy
        buffer[_TABLE_AT : _TABLE_AT + len(table)] = table
        self.version += 1
        _COUNT.pack_into(buffer, 0, self.version)

    def close(self) -> None:
        self.buffer.close()
