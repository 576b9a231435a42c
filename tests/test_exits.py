"""How a worker process's exit is classified and how long its job backs off: pure functions of
the wait status and the process's record (no fork)."""

from __future__ import annotations

import itertools
import signal

import pytest

from gdriver import exits


def exited(code: int) -> int:
    return code << 8  # the wait status of exit(code)


def killed(sig: int) -> int:
    return int(sig)  # the wait status of death by a signal


@pytest.mark.parametrize(
    ("status", "retiring", "stop_reason", "reason"),
    [
        (exited(0), False, "", "exit"),
        (exited(0), True, "", "retired"),
        (exited(1), False, "", "crash"),
        (exited(exits.EXIT_WORKER_FAILED), True, "", "crash"),
        (exited(0), False, "max_jobs", "recycled"),
        (exited(0), False, "lifetime", "recycled"),
        (exited(0), True, "max_jobs", "retired"),
        (exited(0), False, "exit", "exit"),
        (exited(1), True, "timeout", "timeout"),
        (killed(signal.SIGKILL), True, "timeout", "timeout"),
        (killed(signal.SIGSEGV), False, "", "signal"),
        (killed(signal.SIGKILL), False, "", "signal"),
        (killed(signal.SIGKILL), True, "drain_timeout", "killed"),
        (killed(signal.SIGTERM), True, "shutdown", "retired"),
        # told to stop, it died of something else while finishing its job: a crash
        (killed(signal.SIGSEGV), True, "shutdown", "signal"),
        (killed(signal.SIGABRT), True, "", "signal"),
        (killed(signal.SIGBUS), True, "reload", "signal"),
    ],
)
def test_classify(status: int, retiring: bool, stop_reason: str, reason: str) -> None:
    assert exits.classify(status, retiring, stop_reason).reason == reason


def test_classify_fields() -> None:
    assert exits.classify(exited(2), False, "").fields() == {"status": 2, "reason": "crash"}
    by_signal = exits.classify(killed(signal.SIGKILL), True, "").fields()
    assert by_signal == {"signal": "SIGKILL", "reason": "killed"}


def test_warns() -> None:
    crash = exits.classify(exited(1), False, "")
    plain_exit = exits.classify(exited(0), False, "")
    retired = exits.classify(exited(0), True, "")
    assert crash.warns(young=False) and crash.warns(young=True)
    assert plain_exit.warns(young=True) and not plain_exit.warns(young=False)
    assert not retired.warns(young=True)


def test_died_young() -> None:
    assert exits.died_young(exits.YOUNG - 0.1, 0)
    assert not exits.died_young(exits.YOUNG - 0.1, 1)  # finished a job: it worked
    assert not exits.died_young(exits.YOUNG, 0)


def test_backoff_doubles_up_to_the_cap() -> None:
    delays = [exits.backoff_delay(n) for n in range(1, 12)]
    assert delays[:4] == [0.25, 0.5, 1.0, 2.0]
    assert delays[-1] == exits.BACKOFF_MAX
    assert all(a <= b for a, b in itertools.pairwise(delays))
    assert exits.backoff_delay(10_000) == exits.BACKOFF_MAX


def test_crash_loop() -> None:
    crash = exits.classify(exited(1), False, "")
    retired = exits.classify(exited(0), True, "")
    assert exits.crash_loop(0, crash, young=True) == (1, 0.25)
    assert exits.crash_loop(3, crash, young=True) == (4, 2.0)
    assert exits.crash_loop(3, crash, young=False) == (0, 0.0)  # it lived: reset
    assert exits.crash_loop(3, retired, young=True) == (3, 0.0)  # asked for: no change
    assert exits.crash_loop(3, retired, young=False) == (0, 0.0)
