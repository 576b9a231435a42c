"""How a worker process ended, and how long its job waits before the next start: pure
functions of the exit status and the process's record, so they are tested without forking."""

from __future__ import annotations

import dataclasses
import os
import signal

EXIT_WORKER_FAILED = 3  # exit status of a worker process whose body raised or returned
YOUNG = 2.0  # s: a process dying sooner than this, without finishing a job, died young
BACKOFF_BASE = 0.25  # s: the first crash-loop delay, doubled per further young death
BACKOFF_MAX = 30.0


@dataclasses.dataclass(frozen=True)
class Exit:
    """A classified exit: ``reason`` is one of crash, signal, exit, retired, killed, timeout,
    recycled; ``signal`` (a name) or ``status`` (the exit code) says what the kernel told."""

    reason: str
    signal: str | None = None
    status: int | None = None

    @property
    def unexpected(self) -> bool:
        """Not asked for: counts towards the crash-loop backoff when the process died young."""
        return self.reason in ("crash", "signal", "exit")

    def warns(self, young: bool) -> bool:
        """Worth a warning: a crash or a signal, or an unasked exit of a young process."""
        return self.reason in ("crash", "signal") or (self.reason == "exit" and young)

    def fields(self) -> dict[str, object]:
        """The log fields of the exit."""
        out: dict[str, object] = {}
        if self.signal is not None:
            out["signal"] = self.signal
        if self.status is not None:
            out["status"] = self.status
        out["reason"] = self.reason
        return out


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15; real-time and other signals without a name as ``SIG<n>``
    (``SIGRTMIN+3`` has no member in ``signal.Signals``)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"


def classify(wait_status: int, retiring: bool, stop_reason: str) -> Exit:
    """Classify a wait status of a worker process. ``retiring``: the supervisor told it to
    stop; ``stop_reason``: why it stopped, as the supervisor or the process itself said."""
    if os.WIFSIGNALED(wait_status):
        signum = os.WTERMSIG(wait_status)
        name = signal_name(signum)
        reason = "signal"
        if retiring and signum in (signal.SIGKILL, signal.SIGTERM):  # the stop it was sent
            reason = "killed" if signum == signal.SIGKILL else "retired"
        status = None
    else:
        name = None
        status = os.WEXITSTATUS(wait_status)
        reason = "crash" if status else ("retired" if retiring else "exit")
    if stop_reason == "timeout":
        reason = "timeout"
    elif stop_reason in ("max_jobs", "lifetime") and reason == "exit":
        reason = "recycled"
    return Exit(reason, name, status)


def died_young(lived: float, jobs_done: int) -> bool:
    """Died within YOUNG seconds of its start without finishing a job."""
    return lived < YOUNG and jobs_done == 0


def doubling(base: float, attempts: int, most: float) -> float:
    """An exponential backoff: ``base`` after the first of ``attempts`` (>= 1) failures in a
    row, twice as long after each more, never above ``most``."""
    return float(min(base * 2 ** min(attempts - 1, 64), most))


def backoff_delay(failures: int) -> float:
    """Seconds before the next start after ``failures`` consecutive young deaths (>= 1)."""
    return doubling(BACKOFF_BASE, failures, BACKOFF_MAX)


def crash_loop(failures: int, exit: Exit, young: bool) -> tuple[int, float]:
    """A job's consecutive young deaths after this exit (``failures`` before it), and the
    delay before its next start (0.0: none). A process that lived resets the count."""
    if exit.unexpected and young:
        failures += 1
        return failures, backoff_delay(failures)
    return (failures if young else 0), 0.0
