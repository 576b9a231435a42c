"""Each worker process's slot: what job it runs now and which jobs it finished, in memory the
supervisor shares with it, written by the child without a syscall, read by the supervisor when
it needs it (an exit, a timeout).

One anonymous shared mapping, made by the supervisor before the first fork (:class:`Board`):
a header, the poison table (the jobs whose processes kept dying with them; see
``gdriver.poison``), then one fixed-size record per process slot. A record holds:

- ``begun`` and ``finished``: jobs started and jobs finished by the process; a job runs while
  ``begun > finished``. ``begun`` is written last when a job starts, so a reader that sees the
  same ``begun`` before and after reading the job's fields read them whole (a sequence lock;
  the supervisor reads a live process's slot rarely, a dead one's without any race).
- the running job: its start (``time.perf_counter``, CLOCK_MONOTONIC, the same in every process),
  the index of its function in the job's methods, its handle and unique (cut to FIELD bytes).
- the outcomes of the last RING finished jobs: a process batches its job reports on its channel
  (``gdriver.process``), and those of a process that dies before sending them are read here.

The child's side is :class:`Slot`; everything else is the supervisor's.
"""

from __future__ import annotations

import mmap
import struct
from typing import NamedTuple

from gdriver.attributes import PROCESS_LIMIT

FIELD = 64  # bytes kept of a handle or a unique (gearmand's own limit for both)
RING = 64  # finished jobs remembered: at least the reports a process batches (FLUSH_JOBS)
TABLE = 256  # poison table entries: the most recent jobs that killed their processes
OUTCOMES = ("complete", "fail", "exception")
OUTCOME_CODE = {name: i for i, name in enumerate(OUTCOMES)}

_COUNT = struct.Struct("=Q")
_JOB = struct.Struct(f"=dHH{FIELD}sH{FIELD}s")  # start, method, len, handle, len, unique
_DONE = struct.Struct("=dHB")  # seconds, method, outcome
_ENTRY = struct.Struct("=qqH46s")  # handle key, unique key, deaths, why (cut)
_JOB_AT = 16  # after begun and finished
_RING_AT = 160
RECORD = 1024  # bytes per slot: 4 to a page
assert _JOB_AT + _JOB.size <= _RING_AT and _RING_AT + RING * _DONE.size <= RECORD
_TABLE_AT = 64  # after the header: version
_SLOTS_AT = 20480  # page aligned, after the table
assert _TABLE_AT + TABLE * _ENTRY.size <= _SLOTS_AT


def job_keys(function: str, handle: bytes, unique: bytes) -> tuple[int, int]:
    """The poison table's keys of a job: its handle's and its unique's (0: no unique). Python's
    hash of bytes is seeded once per interpreter: the supervisor and its forked children agree."""
    return hash((function, 0, handle[:FIELD])) or 1, (
        (hash((function, 1, unique[:FIELD])) or 1) if unique else 0
    )


class RunningJob(NamedTuple):
    """The job a process was running, as its slot says."""

    method: int  # index in the job's methods
    handle: str
    unique: str
    seconds: float  # in the job so far (or until the process died)
    handle_bytes: bytes
    unique_bytes: bytes


class Finished(NamedTuple):
    outcome: str
    seconds: float
    method: int


class SlotState(NamedTuple):
    """A slot as read: jobs finished, and the job running (None between jobs)."""

    finished: int
    running: RunningJob | None


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


class Slot:
    """The child's end of its slot (``buffer``: the shared mapping; a private bytearray when a
    process runs jobs without a supervisor, as the warm-up does)."""

    __slots__ = ("at", "begun", "buffer", "done", "keys", "method", "seen")

    def __init__(self, buffer: mmap.mmap | bytearray, index: int) -> None:
        self.buffer = buffer
        self.at = _SLOTS_AT + index * RECORD
        self.begun = self.done = 0  # the supervisor cleared the record
        self.method = 0  # of the job begun last
        self.seen = -1  # the poison table's version last read
        self.keys: dict[int, tuple[int, str]] = {}  # poisoned key -> deaths, why

    def begin(self, method: int, function: str, handle: bytes, unique: bytes, start: float) -> str:
        """A job starts: record it. Returns why it must not run ("" : run it) when the poison
        table names it."""
        buffer, at = self.buffer, self.at
        _JOB.pack_into(buffer, at + _JOB_AT, start, method,
                       len(handle), handle, len(unique), unique)  # fmt: skip
        self.method = method
        self.begun += 1
        _COUNT.pack_into(buffer, at, self.begun)
        if _COUNT.unpack_from(buffer, 0)[0] != self.seen:
            self.read_table()
        if not self.keys:
            return ""
        kh, ku = job_keys(function, handle, unique)
        found = self.keys.get(kh) or (self.keys.get(ku) if ku else None)
        if found is None:
            return ""
        deaths, why = found
        return (
            f"poison job: {deaths} worker processes died running it (last: {why}); "
            "failed without running it again (poison_threshold)"
        )

    def finish(self, outcome: str, seconds: float) -> None:
        """The job begun last finished; its report is queued."""
        buffer, at = self.buffer, self.at
        _DONE.pack_into(buffer, at + _RING_AT + (self.done % RING) * _DONE.size,
                        seconds, self.method, OUTCOME_CODE.get(outcome, 1))  # fmt: skip
        self.done += 1
        _COUNT.pack_into(buffer, at + 8, self.done)

    def read_table(self) -> None:
        for _ in range(100):  # the supervisor writes it seldom: a torn read is retried
            version = _COUNT.unpack_from(self.buffer, 0)[0]
            if version % 2:
                continue  # being written
            keys = {}
            for i in range(TABLE):
                kh, ku, deaths, why = _ENTRY.unpack_from(self.buffer, _TABLE_AT + i * _ENTRY.size)
                if kh:
                    entry = (deaths, _text(why.rstrip(b"\0")))
                    keys[kh] = entry
                    if ku:
                        keys[ku] = entry
            if _COUNT.unpack_from(self.buffer, 0)[0] == version:
                self.seen, self.keys = version, keys
                return


_forking: tuple[Board, int] | None = None  # the slot of the process being forked


def child_slot() -> Slot:
    """In a forked worker process: its slot; a private one when it has none (a process
    that runs jobs in the supervisor, the warm-up, or no slot was free)."""
    if _forking is None:
        return Slot(bytearray(_SLOTS_AT + RECORD), 0)
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
        self.entries: list[tuple[int, int, int, str]] = []

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
        at = _SLOTS_AT + index * RECORD
        buffer = self.buffer
        for _ in range(100):
            begun = _COUNT.unpack_from(buffer, at)[0]
            finished = _COUNT.unpack_from(buffer, at + 8)[0]
            start, method, hlen, handle, ulen, unique = _JOB.unpack_from(buffer, at + _JOB_AT)
            if _COUNT.unpack_from(buffer, at)[0] != begun:
                continue  # it started another job meanwhile
            if begun <= finished:
                return SlotState(finished, None)
            handle, unique = handle[: min(hlen, FIELD)], unique[: min(ulen, FIELD)]
            running = RunningJob(method, _text(handle), _text(unique), max(0.0, now - start),
                                 handle, unique)  # fmt: skip
            return SlotState(finished, running)
        return SlotState(_COUNT.unpack_from(buffer, at + 8)[0], None)

    def finished_since(self, pid: int, reported: int) -> list[Finished]:
        """The jobs ``pid`` finished after its first ``reported`` ones (those whose reports it
        did not send: at most RING)."""
        index = self.by_pid.get(pid, -1)
        if index < 0:
            return []
        at = _SLOTS_AT + index * RECORD
        finished = _COUNT.unpack_from(self.buffer, at + 8)[0]
        out = []
        for n in range(max(reported, finished - RING), finished):
            place = at + _RING_AT + (n % RING) * _DONE.size
            seconds, method, code = _DONE.unpack_from(self.buffer, place)
            outcome = OUTCOMES[code] if code < len(OUTCOMES) else "fail"
            out.append(Finished(outcome, seconds, method))
        return out

    def release(self, pid: int) -> None:
        """``pid`` was reaped and read: its slot is free."""
        index = self.by_pid.pop(pid, -1)
        if index >= 0:
            self.free.append(index)

    # -- the poison table --------------------------------------------------------------------
    def set_poison(self, entries: list[tuple[int, int, int, str]]) -> None:
        """Write the poisoned jobs (handle key, unique key, deaths, why), at most TABLE of
        them, the last ones kept; every process reads them before its next job."""
        entries = entries[-TABLE:]
        self.entries = entries
        self.version += 1
        buffer = self.buffer
        _COUNT.pack_into(buffer, 0, self.version)  # a reader sees it change under its read
        for i in range(TABLE):
            kh, ku, deaths, why = entries[i] if i < len(entries) else (0, 0, 0, "")
            data = why.encode("utf-8", "replace")[: _ENTRY.size - 18]
            _ENTRY.pack_into(buffer, _TABLE_AT + i * _ENTRY.size, kh, ku, min(deaths, 65535), data)
        self.version += 1
        _COUNT.pack_into(buffer, 0, self.version)

    def close(self) -> None:
        self.buffer.close()
