"""Job data: what a job is (spec) and what the supervisor knows about it now (state)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gdriver.loop import Timer


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One Gearman function of a job."""

    function: str  # the name registered with gearmand
    method: str  # the Python method name
    body: Callable[..., Any]  # called as body(worker, job, workload)
    encode: str = ""  # name of the worker method used to encode results ("" = none)
    decode: str = ""


@dataclasses.dataclass
class JobSpec:
    """A job: one method, or every method of a class sharing a process group."""

    name: str
    worker: Any
    methods: list[MethodSpec]
    min_processes: int = 1
    max_processes: int = 1
    key: str = ""  # the job_runtime_attributes key: module.Class.group
    timeout: float = 0.0  # 0: no limit
    max_jobs_per_process: int | None = None  # None: the global setting
    max_process_lifetime: float | None = None

    @property
    def functions(self) -> list[str]:
        return [m.function for m in self.methods]


@dataclasses.dataclass
class Process:
    """One forked worker process, as the supervisor sees it."""

    pid: int
    job_name: str
    started: float  # monotonic
    registered: bool = False
    grabs_refused: int = 0  # gearmand servers refusing every grab of this process
    busy: bool = False
    busy_since: float = 0.0  # monotonic
    idle_since: float | None = None  # monotonic; None until registered
    jobs_done: int = 0
    functions: tuple[str, ...] = ()  # of its job when it started (a reload may change the job)
    reported: int = 0  # its jobs whose reports arrived: its next message numbers from here
    bad_reports: int = 0  # reports dropped: not a known outcome or function of its job
    retiring: bool = False  # told to stop (TERM sent)
    term_sent: float = 0.0
    kill_sent: bool = False  # SIGKILL sent: it ignored its stop, or a deadline passed
    stop_reason: str = ""  # why it was told to stop, or why it stopped itself (channel X)
    generation: int = 0  # configuration generation it was started with (reloads roll them)


@dataclasses.dataclass
class JobState:
    """A job's live state in the supervisor."""

    spec: JobSpec
    min_processes: int
    max_processes: int
    processes: dict[int, Process] = dataclasses.field(default_factory=dict)
    lastrun: float = 0.0  # epoch seconds of the last completed run
    lasterror: float = 0.0
    lasterror_msg: str = ""
    failures: int = 0  # consecutive young deaths, for the crash-loop backoff
    next_start: float = 0.0  # monotonic; no fork before this (backoff)
    backoff_timer: Timer | None = None  # the start delayed by the backoff

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def functions(self) -> list[str]:
        return self.spec.functions

    def live(self) -> list[Process]:
        """Processes not told to stop."""
        return [p for p in self.processes.values() if not p.retiring]

    @property
    def count(self) -> int:
        return len(self.processes)

    @property
    def busy_count(self) -> int:
        return sum(1 for p in self.processes.values() if p.busy)

    @property
    def registered_count(self) -> int:
        """Processes registered with gearmand and not told to stop."""
        return sum(1 for p in self.processes.values() if p.registered and not p.retiring)
