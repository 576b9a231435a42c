"""Live: result conversion, failures, the job object, worker instances and process titles."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from live_helpers import FAST, call, call_failing, cmdline, show_pids, status_line, wait_registered
from support import Gdriver, Gearmand, pid_alive, wait_for

R = "live.results.Results."
JOB = R + "results"  # every method is in the process group "results"
OPTIONS = {
    "GLOBAL": {"opt_a": "global", "opt_g": "only global", "server": "not.this:1"},
    "live.results.Results": {"opt_a": "class"},
}


@pytest.fixture(scope="module")
def driver(gearmand: Gearmand) -> Iterator[Gdriver]:
    g = Gdriver(
        gearmand, *FAST, "--namespaces", "live.results", "--worker_options", json.dumps(OPTIONS)
    )
    g.start()
    try:
        wait_registered(gearmand, R + "pid")
        yield g
    finally:
        g.stop()


@pytest.fixture()
def pid(driver: Gdriver, gearmand: Gearmand) -> int:
    """The one process of the job; each test checks it still serves afterwards."""
    value = int(call(gearmand, R + "pid"))
    assert show_pids(driver, JOB) == [value]
    return value


def still_serving(gearmand: Gearmand, pid: int) -> None:
    assert int(call(gearmand, R + "pid")) == pid
    assert pid_alive(pid)


def test_results_bytes_str_none(gearmand: Gearmand, pid: int) -> None:
    assert call(gearmand, R + "as_bytes") == b"\x00\xffraw\n"
    assert call(gearmand, R + "as_str") == "grüße ✓".encode()
    assert call(gearmand, R + "as_none") == b""
    assert call(gearmand, R + "as_int_encoded") == b'{"answer": 42}'
    still_serving(gearmand, pid)


def test_int_without_encoder_fails_only_that_job(
    driver: Gdriver, gearmand: Gearmand, pid: int
) -> None:
    req = call_failing(gearmand, R + "as_int")
    (message,) = req.warning_updates
    assert b"returned int" in message and b"encode=" in message
    still_serving(gearmand, pid)


def test_exception_fails_the_job_and_shows_in_status(
    driver: Gdriver, gearmand: Gearmand, pid: int
) -> None:
    req = call_failing(gearmand, R + "raises", "xyz")
    assert list(req.warning_updates) == [b"ValueError: bad thing: xyz"]
    assert req.result is None
    # the supervisor learns the outcome over the process's channel, maybe a moment after the
    # client did
    wait_for(lambda: status_line(driver, JOB).endswith("  ERROR: ValueError: bad thing: xyz"), 5)
    still_serving(gearmand, pid)
    record = driver.wait_log(
        lambda r: r.get("level") == "ERROR" and "bad thing: xyz" in r.get("message", "")
    )
    assert record["job_name"] == JOB and record["pid"] == pid
    assert "Traceback" in record.get("exc_info", "")


def test_raising_decoder_fails_only_that_job(gearmand: Gearmand, pid: int) -> None:
    req = call_failing(gearmand, R + "bad_decode", "zzz")
    assert list(req.warning_updates) == [b"ValueError: cannot decode b'zzz'"]
    still_serving(gearmand, pid)
    assert call(gearmand, R + "as_str") == "grüße ✓".encode()


def test_job_object_fields(gearmand: Gearmand) -> None:
    from support import client

    c = client(gearmand.address)
    try:
        req = c.submit_job(R + "job_info", b"payload", unique="my-unique-id", poll_timeout=15)
    finally:
        c.shutdown()
    assert req.state == "COMPLETE"
    info = json.loads(req.result)
    assert info["workload"] == "payload" and info["decoded"] == "payload"
    assert info["function_name"] == R + "job_info"
    assert info["unique"] == "my-unique-id"
    assert info["handle"] == req.job.handle.decode()  # the handle gearmand gave the client


def test_send_status_data_warning_reach_the_client(gearmand: Gearmand, pid: int) -> None:
    from support import do

    req = do(gearmand.address, R + "progress")
    assert req.state == "COMPLETE" and req.result == b"done"
    assert list(req.data_updates) == [b"part one"]
    assert list(req.warning_updates) == [b"careful"]
    assert (req.status["numerator"], req.status["denominator"]) == (2, 2)
    still_serving(gearmand, pid)


def test_one_worker_instance_per_class_with_options_and_server(gearmand: Gearmand) -> None:
    seen = json.loads(call(gearmand, R + "options_seen"))
    assert seen["instances"] == 1
    assert seen["options"] == {
        "opt_a": "class",  # the class key beats GLOBAL
        "opt_g": "only global",
        "server": gearmand.address,  # the driver's server beats worker_options
    }
    assert seen["server"] == gearmand.address


def test_process_name_sets_the_title(driver: Gdriver, pid: int) -> None:
    title = cmdline(pid)
    assert title.endswith(f"({JOB})"), title  # live.base.All: f"{orig} ({job_name})"
    assert "gdriver" in title
    assert f"({JOB})" not in cmdline(driver.pid)  # the supervisor keeps its own title
