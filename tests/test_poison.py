"""Poison jobs, deaths that say which job they ended, and counters that survive crashes.

Pure logic first (the shared slots and the poison book), then drills with a real gdriver, a
real gearmand and the pygearman client: jobs that kill their process by ``os._exit``, by a
segfault and by hanging with SIGALRM blocked until SIGKILL."""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import gearman
import pytest
from support import HOST, Gdriver, submit_background, wait_for

from gdriver import slots
from gdriver.exits import Exit, classify
from gdriver.metrics import Metrics
from gdriver.poison import PoisonBook, describe
from gdriver.process import FLUSH_JOBS

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
    slot.finish("complete", 0.25)
    assert board.read(1234, 5.0) == slots.SlotState(1, None)
    for n in range(slots.RING + 5):
        slot.begin(0, "f.g", b"H:host:%d" % n, b"", 0.0)
        slot.finish("exception" if n % 2 else "complete", float(n))
    unsent = board.finished_since(1234, 1)  # one report reached the supervisor
    assert len(unsent) == slots.RING  # the ring keeps the last ones: as many as a batch holds
    assert unsent[-1] == slots.Finished("complete", float(slots.RING + 4), 0)
    assert board.finished_since(1234, 1 + slots.RING + 4) == [unsent[-1]]
    board.release(1234)
    assert board.claim() == index  # freed, and cleared for the next process
    assert slots.child_slot().begin(0, "f.g", b"H", b"", 0.0) == ""
    board.bind(99, index)
    assert board.read(99, 1.0).finished == 0
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
    keys = slots.job_keys("f", running.handle_bytes, running.unique_bytes)
    assert keys == slots.job_keys("f", handle, unique)
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
        child.finish("complete", 0.0)  # (the next process, as far as the slot goes)
    why = child.begin(0, "f", b"H:1", b"u1", 0.0)
    assert why.startswith("poison job: 3 worker processes died running it (last: signal SIGSEGV)")
    # the same unique under another handle (gearmand restarted with a persistent queue)
    assert child.begin(0, "f", b"H:2", b"u1", 0.0).startswith("poison job")
    assert child.begin(0, "other", b"H:1", b"u1", 0.0) == ""  # another function's job
    assert child.begin(0, "f", b"H:3", b"", 0.0) == ""
    # 0 disables it: deaths are still counted, nothing is poisoned
    threshold[0] = 0
    running = slots.RunningJob(0, "H:9", "", 1.0, b"H:9", b"")
    assert all(not book.died("job", "f", running, segv).poisoned for _ in range(5))
    assert child.begin(0, "f", b"H:9", b"", 0.0) == ""
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
    config = {"worker_options": {"Poison": {"ledger": str(ledger)}}, "poison_threshold": 2}
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
            assert all(r["job_seconds"] >= 0 for r in deaths)
            assert [r["deaths"] for r in deaths] == [1, 2] and deaths[1]["poisoned"]
            job_name = f"poison.{kind}"
            labels = {"job_name": job_name, "function": job_name}
            assert metric(g.metrics_port, "gdriver_poison_jobs_total", **labels) == 1
            row = status_line(g, job_name)
            assert row.split()[5] != "1970-01-01T00:00:00"
            assert row.endswith(f"ERROR: {warning}")
        hang_deaths = [r for r in g.records() if r.get("event") == "process_exited"
                       and r.get("function") == "poison.hang"]  # fmt: skip
        assert all(r["signal"] == "SIGKILL" and r["reason"] == "timeout" for r in hang_deaths)
        assert all(r["job_seconds"] > 3 for r in hang_deaths)
        # the processes serve again: a poison job costs its threshold in processes, no more
        for kind in kinds:
            wait_for(lambda k=kind: fresh_gearmand.workers_for(f"poison.{k}") >= 1, 15)
    finally:
        assert g.stop() == 0


def test_a_queued_poison_job_does_not_starve_good_jobs_of_its_function(fresh_gearmand, tmp_path):
    ledger = tmp_path / "ledger"
    config = {"worker_options": {"Poison": {"ledger": str(ledger)}}}
    g = Gdriver(fresh_gearmand, *NS, config=config).start()
    try:
        wait_for(lambda: fresh_gearmand.workers_for("poison.mixed") >= 1, 15)
        submit_background(fresh_gearmand.address, "poison.mixed", ["die:exit"])
        wait_for(lambda: "mixed die:exit" in lines(ledger), 10)
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
