"""5. Start-up: time until N processes are registered with gearmand (its ``workers`` command
lists N connections of the job), from the gdriver command's start; N = 100 (the target) and
N = 50 (the Perl figure), interleaved. From gdriver's JSON log: when imports were done
(``started`` event) and when the first and the last process were forked
(``process_started`` events).
"""

from __future__ import annotations

import time
from typing import Any

import harness as h

JOB = "benchjobs.echo.Echo.echo"
SIZES = (100, 50)


def one(g: h.Gearmand, n: int) -> dict[str, float]:
    attributes = {JOB: {"min_processes": n, "max_processes": n}}
    gd = h.Gdriver(g, "benchjobs.echo", attributes=attributes)
    try:
        gd.start()
        t_reg = gd.wait_registered(h.job_prefix(JOB), n, timeout=60)
        t0 = gd.started_at
        time.sleep(0.2)  # let the log catch up
        recs = gd.records()
    finally:
        gd.stop()
    forks = sorted(h.parse_ts(r["timestamp"]) for r in recs if r.get("event") == "process_started")
    started = [h.parse_ts(r["timestamp"]) for r in recs if r.get("event") == "started"]
    row = {"registered": t_reg - t0}
    if forks:
        row["first_fork"] = forks[0] - t0
        row["last_fork"] = forks[-1] - t0
        row["registered_after_first_fork"] = t_reg - forks[0]
    if started:
        row["loaded"] = started[0] - t0
    return row


def run(ctx: h.Context) -> dict[str, Any]:
    rows: dict[int, list[dict[str, float]]] = {n: [] for n in SIZES}
    with h.Gearmand() as g:
        for i in range(ctx.runs):
            order = SIZES if i % 2 == 0 else tuple(reversed(SIZES))
            for n in order:
                rows[n].append(one(g, n))
            r = rows[100][-1]
            ctx.say(f"run {i + 1}/{ctx.runs}: 100 registered {r['registered']:.3f} s after start"
                    f" ({r.get('registered_after_first_fork', float('nan')):.3f} s after the "
                    "first fork)")  # fmt: skip
    out: dict[str, Any] = {}
    for n in SIZES:
        keys = rows[n][0].keys()
        out[str(n)] = {k: h.summary(r[k] for r in rows[n] if k in r) for k in keys}
    r100, r50 = out["100"], out["50"]
    out["figures"] = [
        {
            "figure": "100 processes forked and registered",
            "value": r100["registered"]["median"],
            "unit": "s",
            "perl": "0.62 s for 50",
            "target": "100 in <= 1 s",
            "pass": r100["registered"]["median"] <= 1.0,
            "note": f"from the first fork {r100['registered_after_first_fork']['median']:.3f} s"
            f" (forks from {r100['first_fork']['median']:.3f} to "
            f"{r100['last_fork']['median']:.3f} s);"
            f" imports done at {r100['loaded']['median']:.3f} s; 50 processes: "
            f"{r50['registered']['median']:.3f} s",
        }
    ]
    return out
