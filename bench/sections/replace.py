"""3. Replacement: an idle min process killed with SIGKILL.

One gdriver, echo job with min = max = 2 (as the Perl drill). Each run kills the oldest
worker process (always older than 2.5 s, so gdriver's crash-loop guard, which only holds
back processes that die younger than 2 s, is not what is measured) after a random pause,
then polls gearmand's ``workers`` every 2 ms until the victim's connection is gone and a new
gdriver connection of the job is listed (2 again).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import harness as h

JOB = "benchjobs.echo.Echo.echo"
N = 2
MIN_AGE = 2.5


def run(ctx: h.Context) -> dict[str, Any]:
    prefix = h.job_prefix(JOB)
    rows: list[dict[str, float]] = []
    attributes = {JOB: {"min_processes": N, "max_processes": N}}
    with h.Gearmand() as g, h.Gdriver(g, "benchjobs.echo", attributes=attributes) as gd:
        gd.wait_registered(prefix, N)
        born = {pid: time.monotonic() for pid in gd.children()}
        for i in range(ctx.runs):
            time.sleep(ctx.rng.uniform(0.3, 1.0))
            victim = min(born, key=born.__getitem__)
            wait = born[victim] + MIN_AGE - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            forked = None
            new: list[int] = []
            while time.monotonic() - t0 < 30:
                pids = g.admin.worker_pids(prefix)
                now = time.monotonic()
                if forked is None and any(p not in born for p in gd.children()):
                    forked = now - t0
                if victim not in pids and len(pids) == N:
                    new = [p for p in pids if p not in born]
                    if new:
                        break
                time.sleep(0.002)
            else:
                raise RuntimeError("the killed process was not replaced within 30 s")
            elapsed = time.monotonic() - t0
            del born[victim]
            for p in new:
                born[p] = time.monotonic()
            rows.append(
                {"registered": elapsed, "forked": forked if forked is not None else elapsed}
            )
            ctx.say(
                f"run {i + 1}/{ctx.runs}: replaced and registered after {elapsed * 1000:.1f} ms"
            )
    out: dict[str, Any] = {
        "registered": h.summary(r["registered"] for r in rows),
        "forked": h.summary(r["forked"] for r in rows),
        "processes": N,
    }
    med = out["registered"]["median"]
    out["figures"] = [
        {
            "figure": "killed min process replaced + registered",
            "value": med,
            "unit": "s",
            "perl": "2.1-4.2 s (2.9 median)",
            "target": "<= 0.5 s",
            "pass": med <= 0.5,
            "note": f"new process forked after {out['forked']['median'] * 1000:.1f} ms (median)",
        }
    ]
    return out
