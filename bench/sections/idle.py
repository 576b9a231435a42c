"""6. Idle cost: CPU of the supervisor while 100 worker processes are registered and idle,
default settings (the observer polls every 5 s). CPU time is read from
/proc/PID/task/*/schedstat (nanoseconds); utime + stime from /proc/PID/stat (whole clock
ticks) is reported as well.

The window (60 s, ``--quick`` 10 s, ``--idle-seconds``) is cut into slices of 10 s (5 s in
quick mode); the figure is the whole window's average, the slices give the spread. The
children's and gearmand's CPU over the same window are reported too.
"""

from __future__ import annotations

import time
from typing import Any

import harness as h

JOB = "benchjobs.echo.Echo.echo"
N = 100


def run(ctx: h.Context) -> dict[str, Any]:
    slice_s = 5.0 if ctx.quick else 10.0
    slices = max(1, round(ctx.idle_seconds / slice_s))
    slice_s = ctx.idle_seconds / slices
    attributes = {JOB: {"min_processes": N, "max_processes": N}}
    per_slice: list[float] = []
    with h.Gearmand() as g, h.Gdriver(g, "benchjobs.echo", attributes=attributes) as gd:
        gd.wait_registered(h.job_prefix(JOB), N, timeout=60)
        time.sleep(max(3.0, ctx.settle))
        kids = gd.children()
        assert g.proc is not None
        sup0, kids0, gm0 = (h.cpu_seconds(gd.pid), sum(h.cpu_seconds(k) for k in kids),
                            h.cpu_seconds(g.proc.pid))  # fmt: skip
        ticks0 = h.stat_cpu_seconds(gd.pid)
        t0 = time.monotonic()
        last_cpu, last_t = sup0, t0
        for _ in range(slices):
            time.sleep(slice_s)
            cpu, now = h.cpu_seconds(gd.pid), time.monotonic()
            per_slice.append((cpu - last_cpu) / (now - last_t) * 100)
            last_cpu, last_t = cpu, now
        elapsed = time.monotonic() - t0
        sup = h.cpu_seconds(gd.pid) - sup0
        ticks = h.stat_cpu_seconds(gd.pid) - ticks0
        kids_cpu = sum(h.cpu_seconds(k) for k in kids) - kids0
        gm = h.cpu_seconds(g.proc.pid) - gm0
        alive = len(gd.children())
        gd.check_alive()
        if alive != N or len(g.admin.worker_pids(h.job_prefix(JOB))) != N:
            raise RuntimeError(f"{alive} of {N} processes left at the end of the idle window")
    pct = sup / elapsed * 100
    out: dict[str, Any] = {
        "seconds": elapsed,
        "processes": N,
        "processes_at_end": alive,
        "supervisor_percent": pct,
        "supervisor_percent_slices": h.summary(per_slice),
        "supervisor_percent_stat_ticks": ticks / elapsed * 100,
        "children_percent_total": kids_cpu / elapsed * 100,
        "child_percent_each": kids_cpu / elapsed * 100 / N,
        "gearmand_percent": gm / elapsed * 100,
        "clock_tick_s": 1 / h.CLK_TCK,
    }
    ctx.say(f"supervisor {pct:.2f} % of a core over {elapsed:.0f} s; children "
            f"{out['children_percent_total']:.2f} % together")  # fmt: skip
    out["figures"] = [
        {
            "figure": f"idle supervisor CPU, {N} children ({elapsed:.0f} s)",
            "value": pct,
            "unit": "%",
            "perl": "-",
            "target": "<= 1 %",
            "pass": pct <= 1.0,
            "note": f"utime+stime {out['supervisor_percent_stat_ticks']:.2f} %; slices "
            f"{out['supervisor_percent_slices']['min']:.2f}-"
            f"{out['supervisor_percent_slices']['max']:.2f} %; {N} idle children together "
            f"{out['children_percent_total']:.2f} % of a core; gearmand "
            f"{out['gearmand_percent']:.2f} %",
        }
    ]
    return out
