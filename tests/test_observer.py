"""The scaling decision (gdriver.observer.decide) and status merging, as pure functions."""

from __future__ import annotations

from collections.abc import Mapping

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gdriver.gearman import FunctionStatus
from gdriver.observer import (
    Decision,
    JobView,
    ProcessView,
    Start,
    Stop,
    decide,
    merge_status,
    share,
)

NOW = 1000.0


def proc(pid: int, busy: bool = False, idle_for: float | None = 100.0) -> ProcessView:
    """idle_for None: still starting (not registered)."""
    return ProcessView(pid, busy, None if idle_for is None else NOW - idle_for)


def view(
    name: str,
    low: int,
    high: int,
    *procs: ProcessView,
    functions: tuple[str, ...] = (),
    wakers: int = 0,
) -> JobView:
    return JobView(name, low, high, functions or (name,), tuple(procs), wakers)


def st_(total: int, running: int = 0, workers: int = 0) -> FunctionStatus:
    return FunctionStatus(total, running, workers)


def run(status: Mapping[str, FunctionStatus] | None, *jobs: JobView, idle: float = 0.0) -> Decision:
    return decide(status, list(jobs), NOW, idle)


# -- examples -------------------------------------------------------------------------------------


def test_tops_up_to_min() -> None:
    d = run({}, view("a", 3, 5, proc(1)))
    assert d.starts == (Start("a", 2, "min"),)
    assert d.stops == () and d.desired == {"a": 3}


def test_min_is_enforced_without_status_too() -> None:
    d = run(None, view("a", 2, 2))
    assert d.starts == (Start("a", 2, "min"),)
    assert d.unknown == {}


def test_backlog_starts_min_of_waiting_and_room() -> None:
    # 2 processes, both busy; 10 total - 2 running = 8 waiting; room for 3 more
    d = run({"a": st_(10, 2, 2)}, view("a", 0, 5, proc(1, True), proc(2, True)))
    assert d.starts == (Start("a", 3, "backlog"),)
    assert d.desired == {"a": 5}
    d = run({"a": st_(3, 2, 2)}, view("a", 0, 5, proc(1, True), proc(2, True)))
    assert d.starts == (Start("a", 1, "backlog"),)


def test_backlog_from_zero_processes() -> None:
    d = run({"a": st_(7)}, view("a", 0, 3))
    assert d.starts == (Start("a", 3, "backlog"),)


def test_no_backlog_start_while_a_process_is_free_or_starting() -> None:
    status = {"a": st_(5, 1, 2)}
    assert run(status, view("a", 0, 5, proc(1, True), proc(2))).starts == ()
    assert run(status, view("a", 0, 5, proc(1, True), proc(2, idle_for=None))).starts == ()


def test_no_start_beyond_max() -> None:
    d = run({"a": st_(50, 3, 3)}, view("a", 0, 3, *(proc(i, True) for i in (1, 2, 3))))
    assert d.starts == () and d.desired == {"a": 3}


def test_backlog_counts_every_function_of_a_group() -> None:
    job = view("g", 0, 10, proc(1, True), functions=("g.x", "g.y"))
    d = run({"g.x": st_(3, 1, 1), "g.y": st_(2, 0, 1), "other": st_(4)}, job)
    assert d.starts == (Start("g", 4, "backlog"),)
    assert d.unknown == {"other": 4}


def test_idle_surplus_is_stopped_idlest_first_down_to_min() -> None:
    procs = (proc(1, idle_for=5), proc(2, idle_for=50), proc(3, idle_for=20), proc(4, True))
    d = run({"a": st_(1, 1, 4)}, view("a", 1, 4, *procs), idle=10)
    assert d.stops == (Stop("a", (2, 3), "idle"),)
    assert d.desired == {"a": 2}


def test_idle_stop_respects_min() -> None:
    procs = (proc(1, idle_for=50), proc(2, idle_for=60), proc(3, idle_for=70))
    d = run({"a": st_(0, 0, 3)}, view("a", 2, 4, *procs), idle=10)
    assert d.stops == (Stop("a", (3,), "idle"),)


def test_no_idle_stop_while_jobs_wait() -> None:
    procs = (proc(1, idle_for=500), proc(2, True))
    assert run({"a": st_(3, 1, 2)}, view("a", 0, 4, *procs), idle=1).stops == ()


def test_no_idle_stop_before_max_idle_time() -> None:
    assert run({}, view("a", 0, 4, proc(1, idle_for=9.9)), idle=10).stops == ()
    assert run({}, view("a", 0, 4, proc(1, idle_for=10)), idle=10).stops == (
        Stop("a", (1,), "idle"),
    )


def test_a_job_that_never_ran_is_scaled_down_too() -> None:
    """Perl never stopped surplus processes of a job with lastrun == 0."""
    d = run({}, view("a", 0, 2, proc(1, idle_for=3), proc(2, idle_for=3)), idle=1)
    assert d.stops == (Stop("a", (1, 2), "idle"),)


def test_starting_processes_are_never_stopped_as_idle() -> None:
    assert run({}, view("a", 0, 2, proc(1, idle_for=None)), idle=0).stops == ()


def test_lowered_max_retires_idle_surplus_never_busy() -> None:
    procs = (proc(1, True), proc(2, idle_for=1), proc(3, True), proc(4, idle_for=2))
    d = run({"a": st_(9, 2, 4)}, view("a", 0, 1, *procs))
    assert d.stops == (Stop("a", (4, 2), "max_lowered"),)
    assert d.desired == {"a": 2}
    d = run({"a": st_(9, 2, 2)}, view("a", 0, 1, proc(1, True), proc(2, True)))
    assert d.stops == () and d.desired == {"a": 2}


def test_no_status_means_no_backlog_and_no_idle_decisions() -> None:
    d = run(None, view("a", 0, 3, proc(1, True)), view("b", 0, 3, proc(2, idle_for=99)))
    assert d.starts == () and d.stops == ()
    assert d.desired == {"a": 1, "b": 1}


def test_unknown_functions_only_when_waiting() -> None:
    status = {"mine": st_(0), "nope": st_(2), "idle": st_(0, 0, 1), "running": st_(1, 1, 1)}
    d = run(status, view("mine", 0, 1))
    assert d.unknown == {"nope": 2}


def test_waiting_is_total_minus_running_never_negative() -> None:
    assert st_(5, 2, 9).waiting == 3
    assert st_(1, 3, 0).waiting == 0


def test_merge_status_sums_per_function() -> None:
    merged = merge_status([{"a": st_(1, 1, 2), "b": st_(3, 0, 0)}, {"a": st_(4, 2, 1)}, {}])
    assert merged == {"a": st_(5, 3, 3), "b": st_(3, 0, 0)}
    assert merge_status([]) == {}


# -- properties -----------------------------------------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, FunctionStatus], list[JobView], float]:
    n_jobs = draw(st.integers(1, 4))
    jobs = []
    pid = 1
    for j in range(n_jobs):
        high = draw(st.integers(0, 6))
        low = draw(st.integers(0, high))
        functions = tuple(f"j{j}.f{k}" for k in range(draw(st.integers(1, 3))))
        procs = []
        for _ in range(draw(st.integers(0, 8))):
            state = draw(st.sampled_from(["busy", "idle", "starting"]))
            idle_for = draw(st.floats(0, 100, allow_nan=False))
            procs.append(
                ProcessView(
                    pid,
                    state == "busy",
                    None if state == "starting" else NOW - (0 if state == "busy" else idle_for),
                )
            )
            pid += 1
        wakers = draw(st.integers(0, 1)) if not procs else 0
        jobs.append(JobView(f"j{j}", low, high, functions, tuple(procs), wakers))
    names = [f for job in jobs for f in job.functions] + ["stranger.a", "stranger.b"]
    status = {}
    for fn in draw(st.lists(st.sampled_from(names), unique=True)):
        total = draw(st.integers(0, 20))
        running = draw(st.integers(0, total + 2))
        status[fn] = FunctionStatus(total, running, draw(st.integers(0, 10)))
    max_idle = draw(st.sampled_from([0.0, 1.0, 10.0, 50.0, 1000.0]))
    return status, jobs, max_idle


def effects(decision: Decision, job: JobView) -> tuple[int, set[int], set[str]]:
    started = sum(s.count for s in decision.starts if s.job_name == job.name)
    stopped = {p for s in decision.stops if s.job_name == job.name for p in s.pids}
    reasons = {s.reason for s in decision.stops if s.job_name == job.name}
    return started, stopped, reasons


@settings(max_examples=400, deadline=None)
@given(scenarios(), st.booleans())
def test_properties(
    scenario: tuple[dict[str, FunctionStatus], list[JobView], float], with_status: bool
) -> None:
    status, jobs, max_idle = scenario
    decision = decide(status if with_status else None, jobs, NOW, max_idle)
    ours = {f for job in jobs for f in job.functions}
    for job in jobs:
        count = len(job.processes)
        started, stopped, reasons = effects(decision, job)
        by_pid = {p.pid: p for p in job.processes}
        busy = sum(p.busy for p in job.processes)
        waiting = sum(status[f].waiting for f in job.functions if f in status)
        # never start beyond max (the min top-up aside, and min <= max here)
        assert started == 0 or count + started <= max(job.max_processes, job.min_processes)
        assert started >= 0 and all(s.count > 0 for s in decision.starts)
        # stopped processes are ours, idle and registered; a busy one is never stopped
        assert stopped <= set(by_pid)
        assert all(not by_pid[p].busy and by_pid[p].idle_since is not None for p in stopped)
        assert not (started and stopped)
        # never below min by stopping
        if stopped:
            assert count - len(stopped) >= min(job.min_processes, count)
            assert count - len(stopped) >= job.min_processes or "max_lowered" in reasons
        if "idle" in reasons:
            assert with_status and waiting == 0
            assert all(NOW - by_pid[p].idle_since >= max_idle for p in stopped)  # type: ignore[operator]
            assert count - len(stopped) >= job.min_processes
        if "max_lowered" in reasons:
            assert count > job.max_processes
            assert count - len(stopped) >= job.max_processes
        # backlog: only when every local process is busy, by min(waiting, room)
        backlog = [s for s in decision.starts if s.job_name == job.name and s.reason == "backlog"]
        if backlog:
            assert with_status and busy == count and count >= job.min_processes
            fleet = max((status[f].workers for f in job.functions if f in status), default=0)
            mine = share(waiting, count + job.wakers, fleet)
            assert backlog[0].count == min(mine, job.max_processes - count)
        elif (
            with_status
            and waiting
            and busy == count
            and job.min_processes <= count < job.max_processes
        ):
            raise AssertionError(f"backlog of {waiting} ignored for {job}")
        if count < job.min_processes:
            assert started == job.min_processes - count
        assert decision.desired[job.name] == count + started - len(stopped)
    # unknown: exactly the functions no job serves that have waiting jobs
    if with_status:
        expected = {f: s.waiting for f, s in status.items() if f not in ours and s.waiting > 0}
        assert dict(decision.unknown) == expected
    else:
        assert dict(decision.unknown) == {}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["a", "b", "c"]),
            st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(0, 50)),
        ),
        max_size=4,
    )
)
def test_merge_status_property(rows: list[dict[str, tuple[int, int, int]]]) -> None:
    merged = merge_status([{fn: FunctionStatus(*v) for fn, v in row.items()} for row in rows])
    assert set(merged) == {fn for row in rows for fn in row}
    for fn, status in merged.items():
        for i, field in enumerate(("total", "running", "workers")):
            assert getattr(status, field) == sum(row[fn][i] for row in rows if fn in row)


@given(scenarios())
def test_decide_is_deterministic(
    scenario: tuple[dict[str, FunctionStatus], list[JobView], float],
) -> None:
    status, jobs, max_idle = scenario
    assume(jobs)
    assert decide(status, jobs, NOW, max_idle) == decide(status, jobs, NOW, max_idle)


# -- a fleet of replicas on one gearmand ----------------------------------------------------------


def busy_view(count: int, high: int, wakers: int = 0, low: int = 0) -> JobView:
    return view("a", low, high, *(proc(i + 1, True) for i in range(count)), wakers=wakers)


def backlog_starts(decision: Decision) -> int:
    return sum(s.count for s in decision.starts if s.reason == "backlog")


def test_alone_a_replica_starts_the_whole_backlog() -> None:
    # gearmand's workers are exactly our two busy processes: nothing changes
    assert run({"a": st_(12, 2, 2)}, busy_view(2, 20)).starts == (Start("a", 10, "backlog"),)
    # our waker is the only worker: the whole backlog
    assert run({"a": st_(30, 0, 1)}, busy_view(0, 20, wakers=1)).starts == (
        Start("a", 20, "backlog"),
    )


def test_three_replicas_with_wakers_start_a_third_each() -> None:
    # min 0, no process anywhere: gearmand counts the three replicas' wakers as workers
    d = run({"a": st_(30, 0, 3)}, busy_view(0, 20, wakers=1))
    assert d.starts == (Start("a", 10, "backlog"),)
    assert d.desired == {"a": 10}


def test_share_follows_the_replicas_part_of_the_workers() -> None:
    # 2 of gearmand's 8 workers are ours: a quarter of 20 waiting
    assert run({"a": st_(28, 8, 8)}, busy_view(2, 20)).starts == (Start("a", 5, "backlog"),)
    # registered on two servers: status sums both, each of our processes counts twice
    d = decide({"a": st_(56, 16, 16)}, [busy_view(2, 20)], NOW, 0.0, servers=2)
    assert d.starts == (Start("a", 10, "backlog"),)


def test_a_replica_gearmand_does_not_see_yet_still_starts_one() -> None:
    # no process and no waker of ours registered; 4 elsewhere, all busy
    assert run({"a": st_(10, 4, 4)}, busy_view(0, 20)).starts == (Start("a", 2, "backlog"),)
    assert share(1, 0, 50) == 1


def test_share_examples() -> None:
    assert share(0, 3, 9) == 0
    assert share(30, 1, 3) == 10
    assert share(31, 1, 3) == 11  # rounded up
    assert share(30, 3, 3) == 30 and share(30, 5, 3) == 30  # nobody else (or a stale count)
    assert share(7, 0, 0) == 7  # nothing anywhere serves it


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int, int, int]:
    """Replicas as (busy processes, wakers); the job's max; waiting jobs; servers."""
    high = draw(st.integers(1, 30))
    replicas = []
    for _ in range(draw(st.integers(1, 6))):
        count = draw(st.integers(0, high))
        replicas.append((count, 1 if count == 0 else 0))  # a replica without process has a waker
    return replicas, high, draw(st.integers(0, 300)), draw(st.integers(1, 3))


def fleet_round(
    replicas: list[tuple[int, int]], high: int, waiting: int, servers: int
) -> list[int]:
    """Every replica decides on the same gearmand status; the starts of each."""
    running = sum(c for c, _ in replicas)
    workers = sum(c * servers + w for c, w in replicas)
    status = {"a": FunctionStatus(waiting + running, running, workers)}
    return [
        backlog_starts(decide(status, [busy_view(c, high, wakers=w)], NOW, 0.0, servers=servers))
        for c, w in replicas
    ]


@settings(max_examples=400, deadline=None)
@given(fleets())
def test_fleet_properties(fleet: tuple[list[tuple[int, int]], int, int, int]) -> None:
    replicas, high, waiting, servers = fleet
    starts = fleet_round(replicas, high, waiting, servers)
    for (count, _), n in zip(replicas, starts, strict=True):
        assert count + n <= high  # never above max
        assert n >= (1 if waiting and count < high else 0)  # a replica with room helps
    # together the replicas start about the backlog, not R times it
    assert sum(starts) <= 1.2 * waiting + len(replicas)
    if len(replicas) == 1:
        assert starts[0] == min(waiting, high - replicas[0][0])  # alone: as before


@settings(max_examples=300, deadline=None)
@given(fleets())
def test_fleet_converges_with_repolls(fleet: tuple[list[tuple[int, int]], int, int, int]) -> None:
    """Long jobs; each round every replica re-polls, and new processes take waiting jobs.
    The fleet serves the backlog (or reaches every max) without starting more than it."""
    replicas, high, waiting, servers = fleet
    started = rounds = 0
    while rounds < 400:
        starts = fleet_round(replicas, high, waiting, servers)
        if not any(starts):
            break
        rounds += 1
        started += sum(starts)
        waiting = max(0, waiting - sum(starts))
        replicas = [(c + n, 0 if c + n else w) for (c, w), n in zip(replicas, starts, strict=True)]
    assert waiting == 0 or all(c == high for c, _ in replicas)
    assert started <= fleet[2] + len(replicas)
    assert rounds <= 1 + fleet[2]


def test_fleet_of_three_from_zero_converges_in_one_round() -> None:
    replicas = [(0, 1)] * 3
    assert fleet_round(replicas, 20, 30, 1) == [10, 10, 10]
    assert fleet_round(replicas, 20, 90, 1) == [20, 20, 20]
    # one replica at its max, two idle: the two others ramp up, and stop at the backlog
    replicas, waiting, total = [(20, 0), (0, 1), (0, 1)], 40, 0
    for _ in range(6):
        starts = fleet_round(replicas, 20, waiting, 1)
        total += sum(starts)
        waiting -= sum(starts)
        replicas = [(c + n, 0 if c + n else w) for (c, w), n in zip(replicas, starts, strict=True)]
    assert waiting <= 0 and total <= 42
