"""Live: begin/end/on_exception hooks, jobs that exit or raise (Perl t/024, t/025, t/027)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from live_helpers import FAST, call, call_failing, show_pids, wait_registered
from support import Gdriver, Gearmand, pid_alive, wait_for

BE = "live.begin_end.BeginEnd."
WB = "live.with_base_class.WithBaseClass."
QUIT = "live.quit.Quit."


@pytest.fixture(scope="module")
def driver(gearmand: Gearmand) -> Iterator[Gdriver]:
    g = Gdriver(
        gearmand,
        *FAST,
        "--namespaces", "live.begin_end",
        "--namespaces", "live.with_base_class",
        "--namespaces", "live.quit",
    )  # fmt: skip
    g.start()
    try:
        wait_registered(gearmand, BE + "job1", WB + "job1", QUIT + "quit1")
        yield g
    finally:
        g.stop()


def test_t025_begin_end_in_the_class(driver: Gdriver, gearmand: Gearmand, tmp_path: Path) -> None:
    ok = tmp_path / "ok"
    assert call(gearmand, BE + "job1", str(ok)) == b"ok"
    assert ok.read_text() == "begin ...\njob1 ...\nend ...\n"
    assert Path(f"{ok}.end").read_text() == "None"  # end(job, workload, error=None)
    assert not Path(f"{ok}.exc").exists()  # on_exception only runs for a failure

    failed = tmp_path / "failed"
    req = call_failing(gearmand, BE + "job2", str(failed))
    assert list(req.warning_updates) == [b"RuntimeError: job2 died"]
    assert failed.read_text() == "begin ...\nend ...\n"
    assert Path(f"{failed}.end").read_text() == "RuntimeError('job2 died')"
    assert Path(f"{failed}.exc").read_text() == "RuntimeError('job2 died')"


def test_t027_begin_end_from_a_base_class(
    driver: Gdriver, gearmand: Gearmand, tmp_path: Path
) -> None:
    ok = tmp_path / "ok"
    assert call(gearmand, WB + "job1", str(ok)) == b"ok"
    assert ok.read_text() == "begin ...\njob1 ...\nend ...\n"
    failed = tmp_path / "failed"
    call_failing(gearmand, WB + "job2", str(failed))
    assert failed.read_text() == "begin ...\nend ...\n"


def test_t024_a_job_that_exits_fails_and_its_process_is_replaced(
    driver: Gdriver, gearmand: Gearmand
) -> None:
    first = int(call(gearmand, QUIT + "quit1"))
    assert show_pids(driver, QUIT + "group1") == [first]
    req = call_failing(gearmand, QUIT + "quit1", "exit")
    assert list(req.warning_updates) == [b"job called exit(0)"]
    second = int(call(gearmand, QUIT + "quit1"))  # served by the replacement
    assert second != first
    wait_for(lambda: not pid_alive(first), 10)
    wait_for(lambda: show_pids(driver, QUIT + "group1") == [second], 10)  # once reaped
    exited = driver.wait_log(lambda r: r.get("event") == "process_exited" and r["pid"] == first)
    assert exited["reason"] == "exit" and exited["status"] == 0
    started = driver.wait_log(lambda r: r.get("event") == "process_started" and r["pid"] == second)
    assert started["reason"] == "replace"


def test_t024_a_job_that_raises_leaves_its_process_alive(
    driver: Gdriver, gearmand: Gearmand
) -> None:
    pid = call(gearmand, QUIT + "quit2")
    req = call_failing(gearmand, QUIT + "quit2", "die")
    assert list(req.warning_updates) == [b"RuntimeError: quit2 died"]
    assert call(gearmand, QUIT + "quit2") == pid
    assert pid_alive(int(pid))
    line = driver.console(f"show {QUIT}group1")[0]
    assert line.endswith("ERROR: RuntimeError: quit2 died")
