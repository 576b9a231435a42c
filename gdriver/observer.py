"""The scaling decision, as a pure function of gearmand's status and the jobs' processes.

Rules (the Perl observer's intent, without its bugs):

- top up to ``min`` (reason ``min``);
- a lowered ``max`` retires idle surplus, idlest first, never a busy process (``max_lowered``);
- scale up when every local process of the job is busy and jobs wait: start this replica's
  share of the backlog, at most ``max - count`` (``backlog``). gearmand's queue is the
  whole fleet's: every replica sees the same ``waiting``, and with R replicas each starting
  all of it, a backlog of W would start R x W processes. The ``workers`` column tells how
  many connections serve the job fleet-wide; this replica's own are its processes (each
  registered on every answering server) and its wakers. The share is
  ``ceil(waiting x local / workers)``, all of it when no other replica serves the job;
  every replica re-polls once its new processes are busy, so a share left unserved (a
  replica at its max) is taken up in the next rounds (see :func:`share`);
- when nothing waits, retire idle processes above ``min`` that have been idle for at least
  ``max_idle_time``, idlest first (``idle``). A process's own idle time counts, so a job that
  never ran is scaled down too, and a busy process is never picked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from gdriver.gearman import FunctionStatus


@dataclasses.dataclass(frozen=True)
class ProcessView:
    pid: int
    busy: bool
    idle_since: float | None  # None: starting, not yet registered


@dataclasses.dataclass(frozen=True)
class JobView:
    name: str
    min_processes: int
    max_processes: int
    functions: tuple[str, ...]
    processes: tuple[ProcessView, ...]  # live ones only (not already told to stop)
    wakers: int = 0  # this replica's waker connections registering the job's functions


@dataclasses.dataclass(frozen=True)
class Start:
    job_name: str
    count: int
    reason: str


@dataclasses.dataclass(frozen=True)
class Stop:
    job_name: str
    pids: tuple[int, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class Decision:
    starts: tuple[Start, ...]
    stops: tuple[Stop, ...]
    desired: Mapping[str, int]  # job name -> target process count
    unknown: Mapping[str, int]  # function -> waiting jobs no job of ours serves


def merge_status(rows: Iterable[Mapping[str, FunctionStatus]]) -> dict[str, FunctionStatus]:
    """Sum the per-server status rows by function."""
    out: dict[str, list[int]] = {}
    for per_server in rows:
        for fn, row in per_server.items():
            acc = out.setdefault(fn, [0, 0, 0])
            acc[0] += row.total
            acc[1] += row.running
            acc[2] += row.workers
    return {fn: FunctionStatus(*v) for fn, v in out.items()}


def _idlest(processes: Iterable[ProcessView], now: float, min_idle: float) -> list[int]:
    idle = [p for p in processes if not p.busy and p.idle_since is not None]
    idle = [p for p in idle if now - p.idle_since >= min_idle]  # type: ignore[operator]
    idle.sort(key=lambda p: (p.idle_since, p.pid))
    return [p.pid for p in idle]


def share(waiting: int, local: int, fleet: int) -> int:
    """This replica's part of a backlog of ``waiting`` jobs that the whole fleet sees.

    ``fleet`` is gearmand's count of connections able to take the job (summed over the
    servers that answered), ``local`` how many of them are this replica's. When no other
    replica serves the job, all of it. A replica gearmand does not see yet (no process, no
    waker) counts itself as one more connection, so it still helps when the others are
    saturated. Rounded up: with R replicas the parts add up to at most waiting + R."""
    others = fleet - local
    if waiting <= 0 or others <= 0:
        return max(0, waiting)
    mine = max(local, 1)
    return -(-waiting * mine // (mine + others))


def decide(
    status: Mapping[str, FunctionStatus] | None,
    jobs: Iterable[JobView],
    now: float,
    max_idle_time: float,
    servers: int = 1,
) -> Decision:
    """What to start and stop now. ``status`` is None when no gearmand answered: then only
    the min and max bounds are enforced. ``servers``: how many gearmand servers answered
    (``status`` sums their rows; each of our processes is registered on every one)."""
    starts: list[Start] = []
    stops: list[Stop] = []
    desired: dict[str, int] = {}
    ours: set[str] = set()
    for job in jobs:
        ours.update(job.functions)
        count = len(job.processes)
        busy = sum(1 for p in job.processes if p.busy)
        target = count
        if count < job.min_processes:
            starts.append(Start(job.name, job.min_processes - count, "min"))
            target = job.min_processes
        elif count > job.max_processes:
            pids = _idlest(job.processes, now, 0.0)[: count - job.max_processes]
            if pids:
                stops.append(Stop(job.name, tuple(pids), "max_lowered"))
                target = count - len(pids)
        elif status is not None:
            waiting = sum(status[f].waiting for f in job.functions if f in status)
            if waiting and busy >= count and count < job.max_processes:
                fleet = max((status[f].workers for f in job.functions if f in status), default=0)
                mine = share(waiting, count * max(1, servers) + job.wakers, fleet)
                n = min(mine, job.max_processes - count)
                starts.append(Start(job.name, n, "backlog"))
                target = count + n
            elif not waiting and count > job.min_processes:
                pids = _idlest(job.processes, now, max_idle_time)[: count - job.min_processes]
                if pids:
                    stops.append(Stop(job.name, tuple(pids), "idle"))
                    target = count - len(pids)
        desired[job.name] = target
    unknown = {}
    if status is not None:
        unknown = {fn: s.waiting for fn, s in status.items() if fn not in ours and s.waiting > 0}
    return Decision(tuple(starts), tuple(stops), desired, unknown)
