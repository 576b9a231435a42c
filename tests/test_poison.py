"""Poison jobs, deaths that say which job they ended, and counters that survive crashes.

Pure logic first (the shared slots and the poison book), then drills with a real gdriver, a
real gearmand and the pygearman client: jobs that kill their process by ``os._exit``, by a
segfault and by hanging with SIGALRM blocked until SIGKILL."""

from __future__ import annotations

import os
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gearman
import pytest
from support import HOST, Gdriver, Gearmand, do, submit_background, wait_for

from gdriver import slots
from gdriver.channel import JobReport, Poisoned
from gdriver.codec import PacketType as P
from gdriver.codec import pack
from gdriver.exits import Exit, classify
from gdriver.jobs import JobSpec, JobState, MethodSpec, Process
from gdriver.metrics import Metrics
from gdriver.poison import KEEP_FOR, PoisonBook, describe
from gdriver.process import FLUSH_JOBS
from gdriver.worker import Worker

NS = ("--namespaces", "poison.jobs")


# -- the shared slots -----------------------------------------------------------------------------
def test_a_slot_holds_the_running_job_and_the_unsent_reports() -> None:
    board = slots.Board(4)
    index = board.claim()
    slot = slots.child_slot()  # what the forked child would take
    board.bind(1234, index)
    assert board.read(1234, 5.0) == slots.SlotState(0, None)
    assert slot.begin(1, "f.g", b"H:host:7", b"u-7", 2.0) == ""
    state = board.read(1234, 5.0)
    assert state.finished == 0 and state.running is not None
    assert (state.running.method, state.running.handle, state.running.unique) == (
        1,
        "H:host:7",
        "u-7",
    )
    assert state.running.seconds == pytest.approx(3.0)
    slot.finish(0, 0.25)
    assert board.read(1234, 5.0) == slots.SlotState(1, None)
    for n in range(slots.RING + 5):
        slot.begin(0, "f.g", b"H:host:%d" % n, b"", 0.0)
        slot.finish(2 if n % 2 else 0, float(n))
    end = 1 << 62
    unsent = board.finished_range(1234, 1, end, live=False)  # one report reached the supervisor
    assert len(unsent) == slots.RING  # the ring keeps the last ones: as many as a batch holds
    assert unsent[-1] == slots.Finished("complete", float(slots.RING + 4), 0)
    assert board.finished_range(1234, 1 + slots.RING + 4, end, live=False) == [unsent[-1]]
    # the process may still be writing: the entry its next job writes over is left out
    assert board.finished_range(1234, 0, end, live=True) == unsent[1:]
    assert board.finished_range(1234, slots.RING + 2, slots.RING + 4, live=True) == unsent[-4:-2]
    board.release(1234)
    assert board.claim() == index  # freed, and cleared for the next process
    assert slots.child_slot().begin(0, "f.g", b"H", b"", 0.0) == ""
    board.bind(99, index)
    assert board.read(99, 1.0).finished == 0
    slot.release()  # its views of the mapping, before it closes
    board.close()


def test_the_ring_covers_a_whole_batch_of_reports() -> None:
    assert slots.RING >= FLUSH_JOBS


def test_long_handles_are_cut_and_keyed_the_same_on_both_sides() -> None:
    board = slots.Board(1)
    index = board.claim()
    slot = slots.child_slot()  # in the child, forked between the claim and the bind
    board.bind(1, index)
    handle, unique = b"H:" + b"x" * 100, "ü".encode() * 40
    slot.begin(0, "f", handle, unique, 0.0)
    running = board.read(1, 0.0).running
    assert running is not None and running.handle_bytes == handle[: slots.FIELD]
    key = slots.job_key("f", running.handle_bytes, running.unique_bytes)
    assert key == slots.job_key("f", handle, unique)
    assert slots.job_key("f", running.handle_bytes, b"") == slots.job_key("f", handle, b"")
    slot.release()  # its views of the mapping, before it closes
    board.close()


def test_the_poison_book_poisons_at_the_threshold_and_processes_see_it() -> None:
    board = slots.Board(2)
    threshold = [3]
    book = PoisonBook(board, Metrics(), lambda: threshold[0])
    index = board.claim()
    child = slots.child_slot()
    board.bind(1, index)
    segv = classify(signal.SIGSEGV, False, "")
    for n in range(1, 4):
        assert child.begin(0, "f", b"H:1", b"u1", 0.0) == ""  # runs: not poisoned yet
        running = board.read(1, 1.0).running
        assert running is not None
        record = book.died("job", "f", running, segv)
        assert record.deaths == n and record.poisoned == (n == 3)
        child.finish(0, 0.0)  # (the next process, as far as the slot goes)
    why = child.begin(0, "f", b"H:1", b"u1", 0.0)
    assert why.startswith("poison job: 3 worker processes died running it (last: signal SIGSEGV)")
    # the same unique under another handle (gearmand restarted with a persistent queue)
    assert child.begin(0, "f", b"H:2", b"u1", 0.0).startswith("poison job")
    assert child.begin(0, "other", b"H:1", b"u1", 0.0) == ""  # another function's job
    assert child.begin(0, "f", b"H:3", b"", 0.0) == ""
    assert child.begin(0, "f", b"H:1", b"u2", 0.0) == ""  # its handle, another job
    # 0 disables it: deaths are still counted, nothing is poisoned
    threshold[0] = 0
    running = slots.RunningJob(0, "H:9", "", 1.0, b"H:9", b"")
    assert all(not book.died("job", "f", running, segv).poisoned for _ in range(5))
    assert child.begin(0, "f", b"H:9", b"", 0.0) == ""
    child.release()  # its views of the mapping, before it closes
    board.close()


def mid_write(board: slots.Board) -> None:
    """The table's version as the supervisor leaves it while it writes the table (odd)."""
    struct.pack_into("=Q", board.buffer, 0, board.version + 1)


def test_a_process_waits_for_the_table_being_written_before_its_job() -> None:
    # a fresh process (it knows no poisoned job) grabs a job while the supervisor, which has
    # just poisoned it, is descheduled halfway through writing the table
    board = slots.Board(1)
    index = board.claim()
    child = slots.child_slot()
    board.bind(1, index)
    key = slots.job_key("f", b"H:1", b"u1")
    mid_write(board)
    entry = (key, 1e12, 2, "exit status 3", True)
    writer = threading.Timer(0.2, board.set_poison, [[entry], 2])
    writer.start()
    try:
        why = child.begin(0, "f", b"H:1", b"u1", 0.0)
    finally:
        writer.join()
    assert why.startswith("poison job: 2 worker processes died running it (last: exit status 3)")
    child.release()  # its views of the mapping, before it closes
    board.close()


def test_a_table_left_in_a_write_is_waited_for_once_then_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # the supervisor stopped (SIGSTOP, or died) halfway through a write: each job must not
    # wait for it; the table read before stays in use, and the next write is read
    monkeypatch.setattr(slots, "TABLE_WAIT", 0.2)
    board = slots.Board(1)
    index = board.claim()
    child = slots.child_slot()
    board.bind(1, index)
    key = slots.job_key("f", b"H:1", b"u1")
    board.set_poison([(key, 1e12, 2, "exit status 3", True)], 2)
    assert child.begin(0, "f", b"H:1", b"u1", 0.0).startswith("poison job")
    mid_write(board)
    started = time.monotonic()
    assert child.begin(0, "f", b"H:1", b"u1", 0.0).startswith("poison job")  # the last table
    assert 0.2 <= time.monotonic() - started < 2
    assert [getattr(r, "event", "") for r in caplog.records] == ["poison_table_unread"]
    started = time.monotonic()
    assert child.begin(0, "f", b"H:2", b"u2", 0.0) == ""
    assert time.monotonic() - started < 0.1  # waited for once
    board.set_poison([], 2)  # the write ends (a later one)
    assert child.begin(0, "f", b"H:1", b"u1", 0.0) == ""
    child.release()  # its views of the mapping, before it closes
    board.close()


class Holders:
    """Real processes, each in a slot of ``board``, that begin a job and then die in it or
    wait in it; every one is ended and reaped by the test (``with``)."""

    def __init__(self, board: slots.Board) -> None:
        self.board = board
        self.ends: dict[int, int] = {}  # pid -> the write end of the pipe a waiting one reads

    def __enter__(self) -> Holders:
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in list(self.ends):
            self.reap(pid)

    def start(self, handle: bytes, unique: bytes, then: str) -> int:
        """A process that begins the job ``handle``, then exits with status 3 (``then="exit"``)
        or is killed by signal 40 (``"rt"``, a real-time signal with no name), both left
        unreaped (zombies), or waits (``"wait"``: alive, as one whose gearmand connection
        dropped)."""
        index = self.board.claim()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            try:
                os.close(w)
                slots.child_slot().begin(0, "f", handle, unique, 0.0)
                if then == "wait":
                    os.read(r, 1)
                if then == "rt":
                    os.kill(os.getpid(), 40)
            finally:
                os._exit(3)
        os.close(r)
        self.board.bind(pid, index)
        self.ends[pid] = w
        if then != "wait":
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
        else:
            wait_for(lambda: self.board.read(pid, 0.0).running is not None, 5)
        return pid

    def reap(self, pid: int) -> Process:
        """End ``pid`` and reap it: what the supervisor knows of it."""
        os.close(self.ends.pop(pid))
        os.waitpid(pid, 0)
        return Process(pid=pid, job_name="job", started=0.0, functions=("f",))


def own_slot(board: slots.Board) -> slots.Slot:
    """A slot of ``board`` for this process, as a forked one takes it."""
    index = board.claim()
    slot = slots.child_slot()
    board.bind(os.getpid(), index)
    return slot


JOB = JobState(JobSpec("job", Worker(), [MethodSpec("f", "f", lambda *a: None)]), 1, 3)
EXIT3 = classify(3 << 8, False, "")


def test_a_process_counts_the_death_of_the_one_that_ran_its_job_before_it_is_reaped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # gearmand hands a job on as the connection of the process that died in it closes, to an
    # idle process of the function, before the supervisor has reaped the dead one
    board = slots.Board(8)
    book = PoisonBook(board, Metrics(), lambda: 2)  # publishes poison_threshold
    with Holders(board) as held:
        first = held.start(b"H:1", b"u1", "exit")
        # the second to get it counts the first death, runs it (1 < 2), and dies in it too
        second = held.start(b"H:1", b"u1", "exit")
        running = board.read(second, 0.0).running
        assert running is not None and running.deaths == 1
        # the third counts both, before the supervisor has counted either: refused
        third = own_slot(board)
        why = third.begin(0, "f", b"H:1", b"u1", 0.0)
        assert why == (
            "poison job: 2 worker processes died running it (last: exit status 3); "
            "failed without running it again (poison_threshold)"
        )
        assert third.refused == (2, "exit status 3")
        third.finish(1, 0.0)
        # reaped (gone from /proc), its death not yet in the table: the supervisor is counting
        # it; the table is waited for, and says it
        proc = held.reap(held.start(b"H:3", b"", "exit"))
        supervisor = threading.Timer(0.3, book.exited, [proc, JOB, EXIT3, lambda *a: None])
        started = time.monotonic()
        supervisor.start()
        try:
            assert third.begin(0, "f", b"H:3", b"", 0.0) == ""  # 1 < 2
        finally:
            supervisor.join()
        assert 0.3 <= time.monotonic() - started < slots.TABLE_WAIT
        running = board.read(os.getpid(), 0.0).running
        assert running is not None and running.deaths == 1  # as the table has it
        third.finish(0, 0.0)
        # ... or counted when the table does not come
        monkeypatch.setattr(slots, "TABLE_WAIT", 0.2)
        held.reap(held.start(b"H:4", b"", "exit"))
        assert third.begin(0, "f", b"H:4", b"", 0.0) == ""
        running = board.read(os.getpid(), 0.0).running
        assert running is not None and running.deaths == 1
        third.finish(0, 0.0)
        # a process alive in the job (its connection to gearmand dropped): not a death
        held.start(b"H:2", b"u2", "wait")
        assert third.begin(0, "f", b"H:2", b"u2", 0.0) == ""
        running = board.read(os.getpid(), 0.0).running
        assert running is not None and running.deaths == 0
        third.finish(0, 0.0)
        # once the supervisor counted a death and freed the slot, the table says it
        death = book.exited(held.reap(first), JOB, EXIT3, lambda *a: None)
        assert death.record is not None and death.record.deaths == 1
        assert not death.record.poisoned
        assert third.begin(0, "f", b"H:1", b"u1", 0.0) == ""  # 1 death, no dying holder
        third.finish(0, 0.0)
        third.release()
    board.close()


def test_deaths_reaped_out_of_order_are_counted_once_each() -> None:
    # both died before the supervisor's reap, which counts the second first: the second's
    # slot says it knew of one death before it, so the table says 2 at once (not 1, while
    # the second's slot goes to its replacement), and the first's reap adds none
    board = slots.Board(4)
    book = PoisonBook(board, Metrics(), lambda: 2)
    with Holders(board) as held:
        first = held.start(b"H:1", b"u1", "exit")
        second = held.start(b"H:1", b"u1", "exit")
        record = book.exited(held.reap(second), JOB, EXIT3, lambda *a: None).record
        assert record is not None and (record.deaths, record.poisoned) == (2, True)
        third = own_slot(board)  # the second's slot, for its replacement
        assert third.begin(0, "f", b"H:1", b"u1", 0.0).startswith(
            "poison job: 2 worker processes died running it (last: exit status 3)"
        )
        third.release()
        record = book.exited(held.reap(first), JOB, EXIT3, lambda *a: None).record
        assert record is not None and record.deaths == 2
    board.close()


def test_deaths_the_supervisor_caused_or_cannot_name_are_told_right() -> None:
    board = slots.Board(4)
    limit = [1]
    book = PoisonBook(board, Metrics(), lambda: limit[0])
    with Holders(board) as held:
        other = own_slot(board)
        # killed by a real-time signal: named as the supervisor names it, the job refused
        held.start(b"H:1", b"", "rt")
        assert other.begin(0, "f", b"H:1", b"", 0.0).startswith(
            "poison job: 1 worker processes died running it (last: signal SIG40)"
        )
        other.finish(1, 0.0)
        # told to stop by the supervisor (a reload's roll, a scale-down) and dead of it in the
        # job: not the job's doing, as the supervisor does not count it either
        pid = held.start(b"H:2", b"", "wait")
        board.stopped(pid)
        os.kill(pid, signal.SIGTERM)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        assert other.begin(0, "f", b"H:2", b"", 0.0) == ""
        other.finish(0, 0.0)
        # a reload that raises the threshold: what it poisoned is no more
        limit[0] = 2
        segv = classify(signal.SIGSEGV, False, "")
        running = slots.RunningJob(0, "H:9", "u9", 1.0, b"H:9", b"u9")
        assert [book.died("job", "f", running, segv).poisoned for _ in range(2)] == [False, True]
        assert other.begin(0, "f", b"H:9", b"u9", 0.0).startswith("poison job: 2 worker")
        other.finish(1, 0.0)
        limit[0] = 5
        book.publish()
        assert other.begin(0, "f", b"H:9", b"u9", 0.0) == ""
        other.release()
    board.close()


def test_no_death_is_counted_by_the_processes_when_the_threshold_is_off() -> None:
    board = slots.Board(2)
    PoisonBook(board, Metrics(), lambda: 0)
    with Holders(board) as held:
        held.start(b"H:1", b"u1", "exit")
        other = own_slot(board)
        assert other.begin(0, "f", b"H:1", b"u1", 0.0) == ""
        other.release()
    board.close()


def test_poisoned_jobs_are_forgotten_when_their_handle_may_name_another_job() -> None:
    # gearmand numbers handles afresh when it restarts: H:host:1 soon names an unrelated job
    board = slots.Board(2)
    now = [1000.0]
    book = PoisonBook(board, Metrics(), lambda: 1, clock=lambda: now[0])
    index = board.claim()
    child = slots.child_slot()
    board.bind(1, index)
    segv = classify(signal.SIGSEGV, False, "")
    by_handle = slots.RunningJob(0, "H:host:1", "", 1.0, b"H:host:1", b"")
    by_unique = slots.RunningJob(0, "H:host:2", "u2", 1.0, b"H:host:2", b"u2")
    assert book.died("job", "f", by_handle, segv).poisoned
    assert book.died("job", "f", by_unique, segv).poisoned
    assert child.begin(0, "f", b"H:host:1", b"", now[0]).startswith("poison job")
    book.failed("job", "f", Poisoned("f", "H:host:1", "", 1, "signal SIGSEGV"))  # answered
    assert child.begin(0, "f", b"H:host:1", b"", now[0]) == ""
    # a job with a unique: every handle it comes under is refused, for KEEP_FOR
    book.failed("job", "f", Poisoned("f", "H:host:2", "u2", 1, "signal SIGSEGV"))
    assert child.begin(0, "f", b"H:host:9", b"u2", now[0]).startswith("poison job")
    assert child.begin(0, "f", b"H:host:2", b"", now[0]) == ""  # its handle alone: not it
    # the processes stop refusing it once it is KEEP_FOR old, table rewritten or not
    later = now[0] + KEEP_FOR + 1
    assert child.begin(0, "f", b"H:host:9", b"u2", later) == ""
    # and the book forgets its deaths: a new job of that unique starts from one
    now[0] = later
    record = book.died("job", "f", slots.RunningJob(0, "H:1", "u2", 1.0, b"H:1", b"u2"), segv)
    assert record.deaths == 1 and list(book.records) == [record.key]
    child.release()  # its views of the mapping, before it closes
    board.close()


def test_a_dead_process_is_read_against_its_own_job_after_a_reload() -> None:
    board = slots.Board(1)
    book = PoisonBook(board, Metrics(), lambda: 3)
    old = JobSpec(
        "job", Worker(), [MethodSpec("old.a", "a", _body), MethodSpec("old.b", "b", _body)]
    )
    new = JobSpec("job", Worker(), [MethodSpec("new.b", "b", _body)])
    index = board.claim()
    child = slots.child_slot()
    board.bind(7, index)
    proc = Process(pid=7, job_name="job", started=0.0, functions=tuple(old.functions))
    child.begin(1, "old.b", b"H:1", b"", 0.0)
    child.finish(0, 0.5)
    child.begin(1, "old.b", b"H:2", b"", 0.0)
    job = JobState(new, 1, 1)  # the reload replaced the job's spec
    got: list[JobReport] = []
    death = book.exited(proc, job, classify(signal.SIGSEGV, False, ""),
                        lambda j, p, reports: got.extend(reports))  # fmt: skip
    assert got == [JobReport("complete", 0.5, "old.b", "")]
    assert death.function == "old.b" and death.record is not None
    assert death.record.function == "old.b"
    child.release()  # its views of the mapping, before it closes
    board.close()


def test_a_timeout_stop_counts_the_death_at_once_and_takes_it_back_if_the_job_ends() -> None:
    board = slots.Board(2)
    book = PoisonBook(board, Metrics(), lambda: 1)
    spec = JobSpec("job", Worker(), [MethodSpec("f", "f", _body)])
    job = JobState(spec, 1, 2)
    index = board.claim()
    hung = slots.child_slot()  # in the child, forked between the claim and the bind
    board.bind(7, index)
    proc = Process(pid=7, job_name="job", started=0.0, functions=("f",))
    hung.begin(0, "f", b"H:1", b"u1", 0.0)
    fields = book.stopping(proc, job)  # SIGTERM is sent after this
    assert (fields["deaths"], fields["poisoned"], fields["handle"]) == (1, True, "H:1")
    index = board.claim()
    sibling = slots.child_slot()  # an idle process: it gets the job once the hung one dies
    board.bind(8, index)
    assert sibling.begin(0, "f", b"H:1", b"u1", 0.0).startswith("poison job: 1 worker")
    # the hung process finished the job after all, then exited: not a death
    hung.finish(0, 9.0)
    death = book.exited(proc, job, Exit("timeout", status=0), lambda j, p, reports: None)
    assert death.record is None and not book.records and not book.counted
    assert sibling.begin(0, "f", b"H:1", b"u1", 0.0) == ""  # the table says so too
    # killed in the job: the death counted at the stop, not again, with how it ended
    hung.release()
    index = board.claim()
    hung = slots.child_slot()
    board.bind(9, index)
    proc = Process(pid=9, job_name="job", started=0.0, functions=("f",))
    hung.begin(0, "f", b"H:2", b"u2", 0.0)
    book.stopping(proc, job)
    death = book.exited(proc, job, Exit("crash", status=4), lambda j, p, reports: None)
    assert death.record is not None and death.record.deaths == 1
    assert death.record.last == "exit status 4"
    assert sibling.begin(0, "f", b"H:2", b"u2", 0.0).endswith(
        "1 worker processes died running it (last: exit status 4); "
        "failed without running it again (poison_threshold)"
    )
    for slot in (hung, sibling):
        slot.release()  # its views of the mapping, before it closes
    board.close()


def _body(worker: object, job: object, workload: object) -> None:
    return None


def test_a_live_read_never_returns_a_torn_job(monkeypatch: pytest.MonkeyPatch) -> None:
    # the child finishes its job and starts writing the next one while the supervisor reads
    board = slots.Board(1)
    index = board.claim()
    child = slots.child_slot()
    board.bind(1, index)
    child.begin(0, "f", b"H:old", b"u-old", 1.0)
    plain = slots._JOB

    class Interleaved(struct.Struct):
        turns = 0

        def unpack_from(self, buffer: Any, offset: int = 0) -> tuple[Any, ...]:
            Interleaved.turns += 1
            if Interleaved.turns == 1:  # mid-read: job 1 ends, job 2's handle is written
                child.finish(0, 0.1)
                packed = bytearray(plain.size)
                plain.pack_into(packed, 0, 2.0, 0, 5, b"H:new", 5, b"u-new", 0)
                at = slots._SLOTS_AT + index * slots.RECORD + slots._JOB_AT
                buffer[at + 12 : at + 12 + 64] = packed[12 : 12 + 64]  # the handle only
            return super().unpack_from(buffer, offset)

    monkeypatch.setattr(slots, "_JOB", Interleaved(plain.format))
    state = board.read(1, 5.0)
    assert state.running is None or (state.running.handle, state.running.unique) in (
        ("H:old", "u-old"),
        ("H:new", "u-new"),
    ), state
    child.release()  # its views of the mapping, before it closes
    board.close()


def test_a_death_counts_against_the_job_only_when_the_job_caused_it() -> None:
    running = slots.RunningJob(0, "H:1", "", 1.0, b"H:1", b"")
    assert PoisonBook.counts(running, Exit("crash", status=3))
    assert PoisonBook.counts(running, Exit("signal", signal="SIGSEGV"))
    assert PoisonBook.counts(running, Exit("timeout", signal="SIGKILL"))
    assert PoisonBook.counts(running, Exit("exit", status=0))
    assert not PoisonBook.counts(running, Exit("killed", signal="SIGKILL"))  # drain timeout
    assert not PoisonBook.counts(None, Exit("crash", status=3))
    assert describe(Exit("timeout", signal="SIGKILL")) == "signal SIGKILL after its timeout"
    assert describe(Exit("crash", status=3)) == "exit status 3"


# -- drills with gearmand -------------------------------------------------------------------------
def metric(port: int, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=3) as r:
        text = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def status_line(g: Gdriver, job_name: str) -> str:
    return next(x for x in g.console("status") if x.startswith(job_name + " "))


def test_poison_jobs_are_failed_with_a_message_after_the_threshold(fresh_gearmand, tmp_path):
    ledger = tmp_path / "ledger"
    # polls every 0.3 s: a hung job's process is replaced while it is told to stop, so an idle
    # process of the function is there to grab the job the moment the hung one is killed
    config = {"worker_options": {"Poison": {"ledger": str(ledger)}}, "poison_threshold": 2,
              "interval": 0.3}  # fmt: skip
    g = Gdriver(fresh_gearmand, *NS, config=config, metrics=True).start()
    kinds = {"exit": "exit status 3", "segv": "signal SIGSEGV",
             "hang": "signal SIGKILL after its timeout"}  # fmt: skip
    try:
        for kind in kinds:
            wait_for(lambda k=kind: fresh_gearmand.workers_for(f"poison.{k}") >= 1, 15)
        client = gearman.GearmanClient([fresh_gearmand.address])
        requests = client.submit_multiple_jobs(
            [{"task": f"poison.{k}", "data": k} for k in kinds],
            wait_until_complete=True,
            poll_timeout=60,
        )
        client.shutdown()
        for kind, req in zip(kinds, requests, strict=True):
            assert req.state == "FAILED", kind
            warning = b"".join(req.warning_updates).decode()
            assert warning.startswith("poison job: 2 worker processes died running it"), warning
            assert f"(last: {kinds[kind]})" in warning
            runs = [x for x in lines(ledger) if x.startswith(kind + " ")]
            assert len(runs) == 2, runs  # run twice, then failed without running it
            handle = runs[0].split()[1]
            poisoned = [r for r in g.records() if r.get("event") == "poison_job"
                        and r["function"] == f"poison.{kind}"]  # fmt: skip
            assert len(poisoned) == 1  # logged once
            assert poisoned[0]["handle"] == handle and poisoned[0]["deaths"] == 2
            assert poisoned[0]["last_exit"] == kinds[kind] and poisoned[0]["unique"]
            deaths = [r for r in g.records() if r.get("event") == "process_exited"
                      and r.get("function") == f"poison.{kind}"]  # fmt: skip
            assert [r["handle"] for r in deaths] == [handle, handle]
            assert all(0 <= r["job_seconds"] < 20 for r in deaths)  # a hang: timeout + grace
            assert [r["deaths"] for r in deaths] == [1, 2] and deaths[1]["poisoned"]
            job_name = f"poison.{kind}"
            labels = {"job_name": job_name, "function": job_name}
            assert metric(g.metrics_port, "gdriver_poison_jobs_total", **labels) == 1
            row = status_line(g, job_name)
            assert row.split()[5] != "1970-01-01T00:00:00"
            # the last error: the refusal; for the hung job, or its second death when the
            # supervisor reaped it after the refusal (the death is counted at its stop, before
            # the kill that hands the job on to the replacement: the two then race)
            after = ("(death 2 of that job, poisoned)",) if kind == "hang" else ()
            assert row.endswith((f"ERROR: {warning}", *after)), row
        hang_deaths = [r for r in g.records() if r.get("event") == "process_exited"
                       and r.get("function") == "poison.hang"]  # fmt: skip
        assert all(r["signal"] == "SIGKILL" and r["reason"] == "timeout" for r in hang_deaths)
        assert all(r["job_seconds"] > 3 for r in hang_deaths)
        # the supervisor stops a hung job's process: the death is counted then, before gearmand
        # can hand the job to the idle process (the second stop poisons it before the kill)
        stops = [r for r in g.records() if r.get("event") == "timeout"]
        assert [(r["deaths"], r["poisoned"]) for r in stops] == [(1, False), (2, True)], stops
        # the processes serve again: a poison job costs its threshold in processes, no more
        for kind in kinds:
            wait_for(lambda k=kind: fresh_gearmand.workers_for(f"poison.{k}") >= 1, 15)
    finally:
        assert g.stop() == 0


def running_mixed(gearmand: Gearmand, ledger: Path, workload: str) -> Gdriver:
    """A gdriver whose poison.mixed process runs ``workload`` now."""
    config = {"worker_options": {"Poison": {"ledger": str(ledger)}}}
    g = Gdriver(gearmand, *NS, config=config).start()
    try:
        wait_for(lambda: gearmand.workers_for("poison.mixed") >= 1, 15)
        submit_background(gearmand.address, "poison.mixed", [workload])
        wait_for(lambda: f"mixed {workload}" in lines(ledger), 10)
    except BaseException:
        g.stop()
        raise
    return g


def test_idle_siblings_do_not_run_a_poison_job_past_the_threshold(fresh_gearmand, tmp_path):
    # three processes of the function: gearmand hands the job to an idle one the moment the
    # one running it dies, before the supervisor has reaped it (each job ran 3 times, not 2)
    ledger = tmp_path / "ledger"
    three = {"poison.jobs.Poison.exit": {"min_processes": 3, "max_processes": 3}}
    config = {"worker_options": {"Poison": {"ledger": str(ledger)}}, "poison_threshold": 2,
              "job_runtime_attributes": three}  # fmt: skip
    g = Gdriver(fresh_gearmand, *NS, config=config).start()
    try:
        wait_for(lambda: fresh_gearmand.workers_for("poison.exit") >= 3, 15)
        client = gearman.GearmanClient([fresh_gearmand.address])
        for n in range(5):
            req = client.submit_job("poison.exit", "exit", unique=f"u{n}", poll_timeout=60)
            assert req.state == "FAILED"
            warning = b"".join(req.warning_updates).decode()
            assert warning.startswith("poison job: 2 worker processes died running it"), warning
            assert "(last: exit status 3)" in warning
        client.shutdown()
        runs = lines(ledger)
        assert len(runs) == 10, runs

        def records(event: str) -> list[dict[str, Any]]:
            return [r for r in g.records() if r.get("event") == event]

        wait_for(
            lambda: len(records("process_exited")) >= 10 and len(records("poison_job")) == 5, 5
        )
        assert all(r["function"] == "poison.exit" for r in records("process_exited"))
        assert len(records("process_exited")) == 10
        assert {r["deaths"] for r in records("poison_job")} == {2}
    finally:
        assert g.stop() == 0


def test_a_queued_poison_job_does_not_starve_good_jobs_of_its_function(fresh_gearmand, tmp_path):
    ledger = tmp_path / "ledger"
    g = running_mixed(fresh_gearmand, ledger, "die:exit")
    try:
        # good jobs one after the other: gearmand hands out each, then the poison job again
        client = gearman.GearmanClient([fresh_gearmand.address])
        start = time.monotonic()
        for i in range(100):
            req = client.submit_job("poison.mixed", str(i), poll_timeout=60)
            assert req.state == "COMPLETE" and req.result == str(i).encode()
        took = time.monotonic() - start
        client.shutdown()
        # a few seconds (36 s when each death made the crash-loop backoff longer)
        assert took < 8, took
        assert lines(ledger).count("mixed die:exit") == 3  # the default poison_threshold
        assert not any(r.get("event") == "crash_loop_backoff" for r in g.records())
        g.wait_log(lambda r: r.get("event") == "poison_job", 10)
    finally:
        assert g.stop() == 0


def test_job_counters_stay_exact_when_processes_die(fresh_gearmand, tmp_path):
    ledger, marks = tmp_path / "ledger", tmp_path / "marks"
    marks.mkdir()
    total, k = 600, 100  # every 100th job kills its process once, after 99 good ones
    config = {"worker_options": {"Poison": {"ledger": str(ledger), "marks": str(marks)}}}
    g = Gdriver(fresh_gearmand, *NS, config=config, metrics=True).start()
    try:
        wait_for(lambda: fresh_gearmand.workers_for("poison.batch") >= 1, 15)
        submit_background(fresh_gearmand.address, "poison.batch",
                          [f"{n}:{k}" for n in range(total)])  # fmt: skip
        failing = sum(1 for n in range(total) if n % 7 == 0)
        wait_for(lambda: len(lines(ledger)) >= total - failing, 60)
        wait_for(lambda: fresh_gearmand.status().get("poison.batch", (1, 0, 0))[0] == 0, 10)
        labels = {"job_name": "poison.batch", "function": "poison.batch"}

        def counted() -> tuple[float, float]:
            return (
                metric(g.metrics_port, "gdriver_jobs_total", outcome="complete", **labels),
                metric(g.metrics_port, "gdriver_jobs_total", outcome="exception", **labels),
            )

        wait_for(lambda: counted() == (total - failing, failing), 10)
        histogram = metric(g.metrics_port, "gdriver_job_duration_seconds_count", **labels)
        assert histogram == total
        deaths = [r for r in g.records() if r.get("event") == "process_exited"
                  and r.get("job_name") == "poison.batch"]  # fmt: skip
        assert len(deaths) == total // k
        assert all(r["function"] == "poison.batch" and r["status"] == 0 for r in deaths)
        # they had finished jobs: none died young, no backoff
        assert not any(r.get("event") == "crash_loop_backoff" for r in g.records())
    finally:
        assert g.stop() == 0


def test_crashes_set_the_last_error_and_the_console_shows_the_backoff(fresh_gearmand, tmp_path):
    ledger = tmp_path / "ledger"
    config = {"worker_options": {"Poison": {"ledger": str(ledger)}}, "poison_threshold": 0}
    g = Gdriver(fresh_gearmand, *NS, config=config).start()
    try:
        wait_for(lambda: fresh_gearmand.workers_for("poison.segv") >= 1, 15)
        assert status_line(g, "poison.segv").endswith("1970-01-01T00:00:00  ")
        submit_background(fresh_gearmand.address, "poison.segv", ["x"])
        # poison_threshold 0: it is not failed; each process dies young, the backoff grows
        g.wait_log(lambda r: r.get("event") == "crash_loop_backoff", 15)
        row = status_line(g, "poison.segv")
        assert row.split()[5] != "1970-01-01T00:00:00"  # the last error's time
        error = row.split("  ERROR: ", 1)[1]
        assert error.startswith("crash-loop backoff, next start in ")
        assert "ended by signal SIGSEGV running poison.segv H:" in error
        death = g.wait_log(lambda r: r.get("event") == "process_exited"
                           and r.get("function") == "poison.segv")  # fmt: skip
        assert death["signal"] == "SIGSEGV" and death["handle"].startswith("H:")
        assert not any(r.get("event") == "poison_job" for r in g.records())
    finally:
        assert g.stop() == 0
        # the job is still queued in gearmand: it was not failed
        assert fresh_gearmand.status()["poison.segv"][0] == 1


@pytest.fixture(autouse=True)
def _no_core_dumps() -> Iterator[None]:
    # the segfaulting jobs must not litter the machine with cores
    import resource

    old = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, old)


def test_worker_code_writing_to_its_channel_neither_stops_nor_skews_the_supervisor(
    fresh_gearmand: Gearmand,
) -> None:
    g = Gdriver(fresh_gearmand, *NS, metrics=True).start()
    forged = [
        b'D["abcd"]',
        b'D0[["complete", 0.5, "poison.forge", ""]]',  # the JSON form of earlier releases
        b"D" + struct.pack("=QH", 0, 1) + struct.pack("=dHB", 0.5, 7, 0),  # no function 7
        b"D" + struct.pack("=QH", 0, 1) + struct.pack("=dHB", 0.5, 0, 5),  # no outcome 5
        b"D" + struct.pack("=QH", 0, 1) + struct.pack("=dHB", -0.5, 0, 0),
        b"D" + struct.pack("=QH", 0, 1) + struct.pack("=dHB", 0.5, 0, 1) + b"[[0, 5]]",
        b'P["x.y", "H:1", ""]',
    ]
    assert not any(b"\n" in data for data in forged)  # the job sends each line
    try:
        wait_for(lambda: fresh_gearmand.workers_for("poison.forge") >= 1, 15)
        for _ in range(3):
            req = do(fresh_gearmand.address, "poison.forge", b"\n".join(forged))
            assert req.state == "COMPLETE" and req.result == b"sent"
        labels = {"job_name": "poison.forge", "function": "poison.forge"}
        wait_for(lambda: metric(g.metrics_port, "gdriver_jobs_total", **labels) == 3, 10)
        assert metric(g.metrics_port, "gdriver_jobs_total", outcome="complete", **labels) == 3
        assert metric(g.metrics_port, "gdriver_jobs_total", job_name="poison.forge") == 3
        assert metric(g.metrics_port, "gdriver_poison_jobs_total") == 0
        bad = [r for r in g.records() if r.get("event") == "bad_report"]
        assert len(bad) == 1 and bad[0]["job_name"] == "poison.forge"  # once per process
        assert do(fresh_gearmand.address, "poison.mixed", b"ok").result == b"ok"  # it serves
    finally:
        assert g.stop() == 0


def raw_submit(gearmand: Gearmand, function: bytes, data: bytes) -> tuple[bytes, int, bytes]:
    """Submit a job without a unique (as clients may: gearmand adds none) and wait for its
    end: (handle, WORK_COMPLETE or WORK_FAIL, data)."""
    with socket.create_connection((HOST, gearmand.port), timeout=20) as sock:
        sock.sendall(pack(P.SUBMIT_JOB, function, b"", data))
        buf, handle = b"", b""
        while True:
            while len(buf) < 12 or len(buf) < 12 + int.from_bytes(buf[8:12], "big"):
                chunk = sock.recv(65536)
                assert chunk, "gearmand closed the connection"
                buf += chunk
            ptype, size = int.from_bytes(buf[4:8], "big"), int.from_bytes(buf[8:12], "big")
            body, buf = buf[12 : 12 + size], buf[12 + size :]
            if ptype == P.JOB_CREATED:
                handle = body
            elif ptype in (P.WORK_COMPLETE, P.WORK_FAIL):
                return handle, ptype, body.partition(b"\0")[2]


def test_a_poisoned_handle_does_not_refuse_another_job_after_gearmand_restarts(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    # gearmand numbers handles from 1 again when it restarts: H:host:1 is then another job
    ledger = tmp_path / "ledger"
    config = {"worker_options": {"Poison": {"ledger": str(ledger)}}, "poison_threshold": 1}
    g = Gdriver(fresh_gearmand, *NS, config=config).start()
    try:
        wait_for(lambda: fresh_gearmand.workers_for("poison.mixed") >= 1, 15)
        # a job without a unique, then one with (pygearman makes one): both die, both refused
        handle1, ptype, _ = raw_submit(fresh_gearmand, b"poison.mixed", b"die:exit")
        assert ptype == P.WORK_FAIL
        client = gearman.GearmanClient([fresh_gearmand.address])
        req = client.submit_job("poison.mixed", "die:exit", poll_timeout=30)
        handle2 = req.job.handle
        client.shutdown()
        assert req.state == "FAILED" and handle2 != handle1
        assert lines(ledger).count("mixed die:exit") == 2
        g.wait_log(lambda r: r.get("event") == "poison_job" and r["unique"], 10)
        fresh_gearmand.stop()
        fresh_gearmand.start()
        wait_for(lambda: fresh_gearmand.workers_for("poison.mixed") >= 1, 15)
        # the same handles, new jobs: they run
        handle, ptype, data = raw_submit(fresh_gearmand, b"poison.mixed", b"first")
        assert (handle, ptype, data) == (handle1, P.WORK_COMPLETE, b"first")
        client = gearman.GearmanClient([fresh_gearmand.address])
        req = client.submit_job("poison.mixed", "second", poll_timeout=30)
        client.shutdown()
        assert req.job.handle == handle2
        assert req.state == "COMPLETE" and req.result == b"second"
    finally:
        assert g.stop() == 0


def test_a_process_that_crashes_while_told_to_stop_is_a_crash(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    g = running_mixed(fresh_gearmand, tmp_path / "ledger", "die:slowsegv")
    assert g.stop() == 0  # its process finishes its job: a segfault
    death = next(r for r in g.records() if r.get("event") == "process_exited"
                 and r.get("function") == "poison.mixed")  # fmt: skip
    assert death["reason"] == "signal" and death["signal"] == "SIGSEGV"
    assert death["deaths"] == 1 and death["level"] == "WARNING"
