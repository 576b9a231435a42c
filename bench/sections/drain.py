"""8. Drain: SIGTERM to the supervisor while jobs of 1 s are in flight.

Each run: a fresh gearmand and gdriver with 4 processes (``benchjobs.drain``); a client
process submits 4 foreground jobs of 1 s and waits for their results; once all 4 have
written their begin marker, 4 more background jobs are queued behind them, and 0.3 s later
the supervisor gets SIGTERM. Measured: time from SIGTERM to the supervisor's exit, that
time minus the last job's end (its end marker), jobs whose result the client never got
(lost), and the jobs still queued in gearmand afterwards (they must stay there: 4).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import gclient
import harness as h

FN = "benchjobs.drain.Drain.work"
N = 4
SECONDS = 1.0
TERM_AFTER = 0.3


def one(ctx: h.Context) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gdriver-bench-drain-") as tmp, h.Gearmand() as g:
        marks = Path(tmp)
        gd = h.Gdriver(g, "benchjobs.drain").start()
        client = None
        try:
            gd.wait_registered(h.job_prefix(FN), N)
            time.sleep(0.2)
            client = h.start(
                [h.PYTHON, str(h.BENCH / "gclient.py"), "pipelined", str(g.port), FN, str(N),
                 "--workload", f"{SECONDS}:{marks}", "--timeout", "20"],
                stdout=subprocess.PIPE, env=h.clean_env(),
            )  # fmt: skip
            h.wait_for(lambda: len(list(marks.glob("*.begin"))) >= N, 20, 0.005)
            begins = [float(p.read_text()) for p in marks.glob("*.begin")]
            gclient.background(g.port, FN, [f"0:{marks}".encode()] * N)
            wait = max(begins) + TERM_AFTER - time.time()
            if wait > 0:
                time.sleep(wait)
            t_term = time.time()
            assert gd.proc is not None
            os.kill(gd.pid, signal.SIGTERM)
            rc = gd.proc.wait(60)
            t_exit = time.time()
            out, _ = client.communicate(timeout=30)
            res = json.loads(out)
            ends = [float(p.read_text()) for p in marks.glob("*.end")]
            queued = g.admin.status().get(FN, (0, 0, 0))[0]
            started = len(list(marks.glob("*.begin")))
        finally:
            if client is not None:
                h.stop(client)
            gd.stop()
    return {
        "exit_after_term": t_exit - t_term,
        "exit_after_last_job": t_exit - max(ends) if ends else float("nan"),
        "longest_remaining": max(ends) - t_term if ends else float("nan"),
        "in_flight": N,
        "completed": res["completed"],
        "lost": N - res["completed"],
        "jobs_started": started,
        "left_queued": queued,
        "exit_code": rc,
    }


def run(ctx: h.Context) -> dict[str, Any]:
    runs = 2 if ctx.quick else ctx.runs
    rows = []
    for i in range(runs):
        rows.append(one(ctx))
        r = rows[-1]
        ctx.say(f"run {i + 1}/{runs}: exit {r['exit_after_term']:.3f} s after SIGTERM "
                f"({r['exit_after_last_job']:.3f} s after the last job), lost {r['lost']}, "
                f"left queued {r['left_queued']}, exit code {r['exit_code']}")  # fmt: skip
    out: dict[str, Any] = {
        k: h.summary(r[k] for r in rows)
        for k in ("exit_after_term", "exit_after_last_job", "longest_remaining")
    }
    out["lost_total"] = sum(r["lost"] for r in rows)
    out["in_flight_total"] = sum(r["in_flight"] for r in rows)
    out["runs"] = rows
    over = out["exit_after_last_job"]["max"]
    ok = (
        out["lost_total"] == 0
        and over <= 0.2
        and all(r["left_queued"] == N and r["jobs_started"] == N and r["exit_code"] == 0
                for r in rows)
    )  # fmt: skip
    out["figures"] = [
        {
            "figure": "SIGTERM with jobs in flight: lost / exit after last job",
            "value": over,
            "unit": "s",
            "perl": "job lost (PP), sometimes lost (XS)",
            "target": "0 lost; <= 0.2 s",
            "pass": ok,
            "note": f"lost {out['lost_total']} of {out['in_flight_total']} in-flight jobs; exit "
            f"{out['exit_after_term']['median']:.3f} s after SIGTERM (median; remaining job "
            f"time {out['longest_remaining']['median']:.3f} s); exit after the last job's end: "
            f"median {out['exit_after_last_job']['median']:.3f} s, worst {over:.3f} s; queued "
            "jobs left in gearmand: " + ", ".join(str(r["left_queued"]) for r in rows),
        }
    ]
    return out
