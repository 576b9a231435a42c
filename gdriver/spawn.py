"""Forking one worker process, and what the supervisor does when it cannot.

:func:`fork_worker` makes the child's pipes, blocks the supervisor's signals around the fork
and runs the child's side up to ``process.run``. Any failure on the way (``socketpair``,
``pipe``, ``fork``: EMFILE, ENFILE, EAGAIN, ENOMEM) raises ``OSError`` with nothing left open.
:class:`SpawnFailures` turns such failures into a per-job backoff, one log record per episode
(when it begins and when it ends) and the ``gdriver_spawn_failures_total`` counter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from typing import NoReturn

from gdriver import exits, process
from gdriver.childio import ChildIO
from gdriver.gearman import Protocol, Server
from gdriver.jobs import JobSpec
from gdriver.logs import log_event
from gdriver.metrics import Metrics

log = logging.getLogger("gdriver")

RETRY_BASE = 0.25  # s before the first retry after a failed start, doubled per failure
RETRY_MAX = 5.0  # fds and memory come back when processes exit: retry often enough


def fork_worker(
    spec: JobSpec,
    servers: Sequence[Server],
    inherited: list[int],
    blocked: Iterable[int],
    max_jobs: int,
    lifetime: float,
    protocol: Protocol | None = None,
) -> tuple[int, ChildIO]:
    """Fork one worker process of ``spec``; returns its PID and the supervisor's end of its
    I/O (not yet attached to the loop). ``inherited``: the supervisor's descriptors the child
    closes; ``blocked``: the signals the supervisor handles, blocked around the fork so that
    none of its handlers runs in the child before the child resets them."""
    io = ChildIO()  # raises OSError with nothing open
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        io.abort()
        raise
    if pid == 0:
        run_child(spec, servers, io, inherited, blocked, max_jobs, lifetime, old_mask, protocol)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    return pid, io


def run_child(
    spec: JobSpec,
    servers: Sequence[Server],
    io: ChildIO,
    inherited: list[int],
    handled: Iterable[int],
    max_jobs: int,
    lifetime: float,
    unblock: Iterable[int],
    protocol: Protocol | None = None,
) -> NoReturn:
    """The forked child's side: the supervisor's signal handlers and descriptors go, its
    pipes become stdio, then ``process.run``, which never returns."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in handled:
            signal.signal(sig, signal.SIG_DFL)
        close_all(inherited)
        channel = io.in_child()
        level = logging.getLogger().level
        process.run(spec, list(servers), channel, max_jobs, lifetime, level, unblock, protocol)
    finally:
        os._exit(exits.EXIT_WORKER_FAILED)


def close_all(fds: Iterable[int]) -> None:
    """Close ``fds``: one close_range per run of consecutive numbers (a supervisor's
    descriptors are mostly consecutive: a thousand processes' pipes cost a few calls)."""
    ordered = sorted(set(fds))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        os.closerange(ordered[i], ordered[j] + 1)
        i = j + 1


@dataclasses.dataclass
class _Episode:
    attempts: int
    error: str


class SpawnFailures:
    """Failed starts of each job: how long to wait before the next try, logged once per
    episode, counted per attempt."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.episodes: dict[str, _Episode] = {}  # job name -> its failures since the last start

    def failed(self, job_name: str, exc: BaseException) -> float:
        """A start of ``job_name`` failed; returns the seconds to wait before the next."""
        self.metrics.spawn_failures.labels(job_name).inc()
        episode = self.episodes.get(job_name)
        if episode is None:
            episode = self.episodes[job_name] = _Episode(0, str(exc))
            message = (
                f"cannot start a process of job {job_name}: {exc}; retrying with backoff "
                "(one record per episode, gdriver_spawn_failures_total counts the attempts)"
            )
            log_event(log, logging.ERROR, message, "spawn_failed", job_name=job_name,
                      error=str(exc))  # fmt: skip
        episode.attempts += 1
        episode.error = str(exc)
        return retry_delay(episode.attempts)

    def started(self, job_name: str) -> None:
        """A start worked: an episode of failures, if any, ends."""
        episode = self.episodes.pop(job_name, None)
        if episode is not None:
            message = (
                f"processes of job {job_name} start again after {episode.attempts} failed "
                f"attempt(s) (last: {episode.error})"
            )
            log_event(log, logging.WARNING, message, "spawn_recovered", job_name=job_name,
                      attempts=episode.attempts)  # fmt: skip

    def forget(self, job_name: str) -> None:
        self.episodes.pop(job_name, None)


def retry_delay(attempts: int) -> float:
    """Seconds before the next start after ``attempts`` failed ones in a row (>= 1)."""
    return exits.doubling(RETRY_BASE, attempts, RETRY_MAX)
