"""What the console and the HTTP endpoints may see of the supervisor and do to it.

:class:`Control` is the narrow interface ``console.py`` and ``http.py`` (and console plugins,
as ``ctx.driver``) depend on; ``supervisor.Driver`` provides it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gdriver.jobs import JobState
    from gdriver.loop import EventLoop


class Control(Protocol):
    loop: EventLoop  # the loop the servers register with

    def get_jobs(self) -> list[JobState]:
        """The jobs, sorted by name."""
        ...

    def get_job(self, name: str) -> JobState | None: ...

    def pids(self) -> Collection[int]:
        """The PIDs of every worker process, stopping ones included."""
        ...

    def limits_problem(self, job: JobState, low: int, high: int) -> str:
        """Why these min/max of a job do not fit in max_total_processes, or ``""``."""
        ...

    def set_limits(self, job: JobState, low: int, high: int) -> None:
        """New min/max processes of a job, applied at once."""
        ...

    def kill_pids(self, pids: Iterable[int]) -> None:
        """Stop these processes after their current job."""
        ...

    def begin_stop(self, why: str) -> None:
        """Graceful stop of the whole supervisor."""
        ...

    def scrape(self) -> CollectorRegistry:
        """The metrics registry, its per-job process gauges brought up to date."""
        ...

    def loop_lag(self) -> float:
        """Seconds since the event loop last went round (its health)."""
        ...

    def is_ready(self) -> tuple[bool, str]:
        """Ready to take jobs, and why not."""
        ...
