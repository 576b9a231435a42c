"""2. Scale-up reaction: job min 0, max 10, default settings (interval 5, max_idle_time 0).

One gdriver for all runs. Each run waits until the job has no process and the queue is
empty, then a random 0..interval seconds (so the observer's phase is random), submits 200
background jobs of 0.5 s, and polls every 10 ms: gearmand's ``status`` (running column:
busy processes) and the supervisor's children in /proc. Times are from the moment gearmand
acknowledged the last submission.
"""

from __future__ import annotations

import time
from typing import Any

import gclient
import harness as h

FN = "benchjobs.sleepy.Sleepy.nap"
JOBS = 200
SECONDS = 0.5
INTERVAL = 5.0  # gdriver's default


def one_run(ctx: h.Context, g: h.Gearmand, gd: h.Gdriver) -> dict[str, Any]:
    # quiet: no process, nothing queued
    h.wait_for(lambda: not gd.children() and g.admin.status().get(FN, (0, 0, 0))[0] == 0, 30,
               0.05)  # fmt: skip
    time.sleep(ctx.rng.uniform(0, INTERVAL))
    sub = gclient.background(g.port, FN, [b"%.1f" % SECONDS] * JOBS)
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    peak = 0
    deadline = t0 + 120
    while time.monotonic() < deadline:
        now = time.monotonic() - t0
        total, running, _ = g.admin.status().get(FN, (0, 0, 0))
        kids = len(gd.children())
        peak = max(peak, kids)
        if kids >= 1:
            marks.setdefault("first_process", now)
        if kids >= 10:
            marks.setdefault("ten_processes", now)
        if running >= 1:
            marks.setdefault("first_busy", now)
        if running >= 10:
            marks.setdefault("ten_busy", now)
        if total == 0 and "drained" not in marks:
            marks["drained"] = now
        if "drained" in marks and kids == 0:
            marks["zero_processes"] = now
            break
        gd.check_alive()
        time.sleep(0.01)
    marks["submit_seconds"] = sub["seconds"]
    marks["peak_processes"] = peak
    return marks


def run(ctx: h.Context) -> dict[str, Any]:
    runs = 2 if ctx.quick else ctx.runs
    rows = []
    with h.Gearmand() as g, h.Gdriver(g, "benchjobs.sleepy") as gd:
        time.sleep(1.0)
        gd.check_alive()
        for i in range(runs):
            rows.append(one_run(ctx, g, gd))
            r = rows[-1]
            ctx.say(f"run {i + 1}/{runs}: 10 busy after {r.get('ten_busy', float('nan')):.3f} s,"
                    f" drained after {r.get('drained', float('nan')):.2f} s, peak "
                    f"{r['peak_processes']}")  # fmt: skip
    keys = ("first_process", "first_busy", "ten_processes", "ten_busy", "drained",
            "zero_processes", "peak_processes", "submit_seconds")  # fmt: skip
    out: dict[str, Any] = {k: h.summary(r[k] for r in rows if k in r) for k in keys}
    if all("drained" in r and "zero_processes" in r for r in rows):
        out["drained_to_zero"] = h.summary(r["zero_processes"] - r["drained"] for r in rows)
    out["runs"] = rows
    busy = out["ten_busy"]["median"]
    ideal = JOBS * SECONDS / 10
    out["figures"] = [
        {
            "figure": "backlog -> 10 processes busy (interval 5)",
            "value": busy,
            "unit": "s",
            "perl": "3.5 s (0.3-4.4)",
            "target": "<= 0.5 s",
            "pass": busy is not None and busy <= 0.5 and len(out["ten_busy"]["runs"]) == runs,
            "note": f"queue of {JOBS} x {SECONDS} s drained after "
            f"{out['drained']['median']:.2f} s (ideal {ideal:.1f} s); peak "
            f"{out['peak_processes']['max']:.0f} processes",
        },
    ]
    return out
