"""Live: encode/decode, default and override attributes, process groups, prefixes, spread
(Perl t/021, t/022, t/023, t/028, t/029, t/030) against one gdriver and a real gearmand."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_helpers import (
    FAST,
    call,
    events,
    show_pids,
    status_line,
    wait_events,
    wait_registered,
)
from support import Gdriver, Gearmand

NAMESPACES = (
    "live.encode_decode",
    "live.default_attributes",
    "live.override_attributes",
    "live.process_group",
    "live.prefix",
    "live.prefix_method",
    "live.spread",
)
ED = "live.encode_decode.EncodeDecode."
DA = "live.default_attributes.DefaultAttributes."
OA = "live.override_attributes.OverrideAttributes."
PG = "live.process_group.ProcessGroup."
SP = "live.spread.Spread."


@pytest.fixture(scope="module")
def driver(gearmand: Gearmand) -> Iterator[Gdriver]:
    args: list[str] = [*FAST, "--max_idle_time", "30"]
    for ns in NAMESPACES:
        args += ["--namespaces", ns]
    g = Gdriver(gearmand, *args)
    g.start()
    try:
        wait_registered(gearmand, ED + "job1", DA + "job1", PG + "job1", PG + "job5", "ping")
        yield g
    finally:
        g.stop()


def test_names_of_jobs_and_functions(driver: Gdriver, gearmand: Gearmand) -> None:
    jobs = [line.split()[0] for line in driver.console("status")]
    assert jobs == sorted(
        [
            ED + "group1",
            DA + "group1",
            OA + "job1",
            OA + "job2",
            PG + "group1",
            PG + "job5",
            "ping",
            "foo_bar_grp",
            "foo_bar_method",
            SP + "group1",
            SP + "main",
        ]
    )
    wait_registered(gearmand, "foo_bar_first", "foo_bar_second", "foo_bar_method", SP + "main")
    functions = set(gearmand.status())
    for i in range(1, 8):
        assert f"{ED}job{i}" in functions
    for i in range(1, 6):
        assert f"{SP}some_job_{i}" in functions
    assert "foo_bar_grp" not in functions  # a group is a job, not a function
    assert ED + "group1" not in functions


def test_t021_encode_decode(driver: Gdriver, gearmand: Gearmand) -> None:
    w = "some workload ..."
    expected = {
        "job1": f"STANDARDDECODE::{w}::STANDARDDECODE",
        "job2": f"CUSTOMDECODE::{w}::CUSTOMDECODE",
        "job3": f"STANDARDENCODE::{w}::STANDARDENCODE",
        "job4": f"CUSTOMENCODE::{w}::CUSTOMENCODE",
        "job5": w,
        "job6": f"STANDARDENCODE::STANDARDDECODE::{w}::STANDARDDECODE::STANDARDENCODE",
        "job7": f"CUSTOMENCODE::CUSTOMDECODE::{w}::CUSTOMDECODE::CUSTOMENCODE",
    }
    for name, result in expected.items():
        assert call(gearmand, ED + name, w).decode() == result, name


def test_t022_default_attributes(driver: Gdriver, gearmand: Gearmand) -> None:
    assert call(gearmand, DA + "job1", "workload") == b"ENCODE::DECODE::workload::DECODE::ENCODE"
    assert call(gearmand, DA + "job2", "workload") == b"ENCODE::workload::ENCODE"
    pid = call(gearmand, DA + "job3")
    assert pid.isdigit()
    assert call(gearmand, DA + "job3") == pid  # the default process group: one process
    assert show_pids(driver, DA + "group1") == [int(pid)]


def test_t023_override_attributes_min_0_started_on_demand(
    driver: Gdriver, gearmand: Gearmand
) -> None:
    # min 0 (override beats the decorator's min 5): nothing runs before there is work
    assert status_line(driver, OA + "job1").split()[1:4] == ["0", "1", "0"]
    assert not events(driver, "process_started", job_name=OA + "job1")
    assert call(gearmand, OA + "job1", "workload") == b"ENCODE::DECODE::workload::DECODE::ENCODE"
    assert call(gearmand, OA + "job2", "workload") == b"ENCODE::workload::ENCODE"
    for name in ("job1", "job2"):
        started = wait_events(driver, "process_started", job_name=OA + name)
        assert started[0]["reason"] == "backlog"


def test_t028_process_group(driver: Gdriver, gearmand: Gearmand) -> None:
    pids = {call(gearmand, f"{PG}job{i}") for i in range(1, 5)}
    assert len(pids) == 1
    (pid,) = pids
    assert call(gearmand, PG + "job5") != pid
    assert show_pids(driver, PG + "group1") == [int(pid)]


def test_t029_empty_prefix_registers_bare_names(driver: Gdriver, gearmand: Gearmand) -> None:
    assert call(gearmand, "ping") == b"pong"


def test_prefix_method_and_group_job_name(driver: Gdriver, gearmand: Gearmand) -> None:
    assert call(gearmand, "foo_bar_method") == b"method"
    assert call(gearmand, "foo_bar_first") == b"first"
    assert call(gearmand, "foo_bar_second") == b"second"
    assert len(show_pids(driver, "foo_bar_grp")) == 1


def test_t030_spread_a_job_calls_other_jobs(driver: Gdriver, gearmand: Gearmand) -> None:
    assert call(gearmand, SP + "main") == b"12345"


def test_no_job_went_above_max_and_no_process_died(driver: Gdriver) -> None:
    """Every job has max 1; no process exited (max_idle_time is long) while the above ran."""
    for line in driver.console("status"):
        _, _, high, count = line.split()[:4]
        assert int(count) <= int(high) == 1, line
    assert not events(driver, "process_exited")
