"""7. Observer cost: one ``gdriver.observer.decide()`` call over 1,000 functions and 500
processes (a pure function; timeit, median of repeats).

250 jobs of 4 functions and 2 processes each; gearmand's status lists the 1,000 functions
plus 100 that no job serves. A mix of states: a quarter of the jobs have a backlog with
every process busy, a quarter have idle processes above their minimum, the rest are steady.
Parsing a 1,100-line ``status`` reply (``parse_status``) is timed too.
"""

from __future__ import annotations

import timeit
from typing import Any

import harness as h

from gdriver import gearman, observer

JOBS = 250
FUNCTIONS_PER_JOB = 4
PROCESSES_PER_JOB = 2


def inputs() -> tuple[dict[str, gearman.FunctionStatus], list[observer.JobView], list[str]]:
    now = 10_000.0
    views = []
    status: dict[str, gearman.FunctionStatus] = {}
    lines = []
    pid = 1000
    for j in range(JOBS):
        kind = j % 4
        fns = tuple(f"app.workers.mod{j // 10}.Class{j}.fn{f}" for f in range(FUNCTIONS_PER_JOB))
        procs = []
        for _ in range(PROCESSES_PER_JOB):
            pid += 1
            busy = kind == 0
            procs.append(observer.ProcessView(pid, busy, None if busy else now - 30.0 - pid % 7))
        low = 0 if kind == 1 else PROCESSES_PER_JOB
        views.append(observer.JobView(f"app.workers.Class{j}.job", low, 10, fns, tuple(procs)))
        for f in fns:
            waiting = 25 if kind == 0 else 0
            running = PROCESSES_PER_JOB if kind == 0 else 0
            row = (waiting + running, running, PROCESSES_PER_JOB)
            status[f] = gearman.FunctionStatus(*row)
            lines.append(f"{f}\t{row[0]}\t{row[1]}\t{row[2]}")
    for u in range(100):
        status[f"other.fn{u}"] = gearman.FunctionStatus(3, 0, 0)
        lines.append(f"other.fn{u}\t3\t0\t0")
    return status, views, lines


def run(ctx: h.Context) -> dict[str, Any]:
    status, views, lines = inputs()
    decision = observer.decide(status, views, 10_000.0, 0.0)
    parsed = gearman.parse_status(lines)
    if len(parsed) != len(status):
        raise RuntimeError(f"parse_status read {len(parsed)} of {len(status)} rows")
    repeat = 7 if ctx.quick else 15

    def per_call(fn: Any) -> list[float]:
        timer = timeit.Timer(fn)
        number, _ = timer.autorange()
        return [t / number * 1000 for t in timer.repeat(repeat, number)]

    decide_ms = per_call(lambda: observer.decide(status, views, 10_000.0, 0.0))
    parse_ms = per_call(lambda: gearman.parse_status(lines))
    out: dict[str, Any] = {
        "functions": JOBS * FUNCTIONS_PER_JOB,
        "processes": JOBS * PROCESSES_PER_JOB,
        "starts": sum(s.count for s in decision.starts),
        "stops": sum(len(s.pids) for s in decision.stops),
        "decide_ms": h.summary(decide_ms),
        "parse_status_ms": h.summary(parse_ms),
    }
    med = out["decide_ms"]["median"]
    ctx.say(f"decide() {med:.3f} ms, parse_status() {out['parse_status_ms']['median']:.3f} ms")
    out["figures"] = [
        {
            "figure": "observer decide(), 1,000 functions, 500 processes",
            "value": med,
            "unit": "ms",
            "perl": "-",
            "target": "<= 20 ms",
            "pass": med <= 20.0,
            "note": f"parse_status of 1,100 lines {out['parse_status_ms']['median']:.2f} ms",
        }
    ]
    return out
