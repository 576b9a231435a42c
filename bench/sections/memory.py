"""4. Memory: PSS of the supervisor plus N children, vs N standalone processes.

The worker module (``benchjobs.heavy``) imports ``benchpayload``: asyncio, decimal, email,
http.client, json, sqlite3, xml.etree and about 7 MB of module-level objects. Variants,
interleaved (the order rotates every run):

- ``gdriver``: ``gdriver run`` with the job at min = max = N (gdriver calls gc.freeze()
  before it forks);
- ``gdriver_nofreeze``: the same through bench/nofreeze.py, which makes gc.freeze a no-op;
- ``standalone``: N plain processes ``python -c "import benchjobs.heavy; sleep"``;
- ``gdriver_trivial`` (N = 50 only): gdriver with the trivial echo worker
  (``benchjobs.echo``, no sizeable import), the setting of the Perl figure.

PSS, RSS and USS (Private_Clean + Private_Dirty) come from /proc/PID/smaps_rollup, read
``settle`` seconds after every process is registered (or has imported). The gdriver
variants then run 2,000 pipelined jobs and are read again 1 s later: each child makes one
full garbage collection during its first job (see benchjobs/heavy.py), as a long-lived
worker eventually does.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import harness as h

HEAVY = "benchjobs.heavy.Heavy.echo"
TRIVIAL = "benchjobs.echo.Echo.echo"
JOBS = 2_000
SIZES = (1, 10, 50, 100)
BATCH = 8  # standalone processes started together
STANDALONE = (
    "import sys, time, benchjobs.heavy; sys.stdout.write('r'); sys.stdout.flush(); time.sleep(3600)"
)


def reading(pids: list[int]) -> list[dict[str, int]]:
    out = []
    for pid in pids:
        try:
            out.append(h.smaps(pid))
        except OSError:
            pass
    return out


def describe(children: list[dict[str, int]], parent: dict[str, int] | None) -> dict[str, Any]:
    total = sum(c["pss"] for c in children) + (parent["pss"] if parent else 0)
    out: dict[str, Any] = {
        "total_pss_mib": h.mib(total),
        "child_pss_mib": h.mib(h.median(c["pss"] for c in children)),
        "child_uss_mib": h.mib(h.median(c["uss"] for c in children)),
        "child_uss_max_mib": h.mib(max(c["uss"] for c in children)),
        "child_rss_mib": h.mib(h.median(c["rss"] for c in children)),
        "processes": len(children),
    }
    if parent:
        out["supervisor_pss_mib"] = h.mib(parent["pss"])
        out["supervisor_uss_mib"] = h.mib(parent["uss"])
        out["supervisor_rss_mib"] = h.mib(parent["rss"])
    return out


def gdriver_run(
    ctx: h.Context, g: h.Gearmand, n: int, freeze: bool, trivial: bool = False
) -> dict[str, Any]:
    fn = TRIVIAL if trivial else HEAVY
    ns = "benchjobs.echo" if trivial else "benchjobs.heavy"
    attributes = {fn: {"min_processes": n, "max_processes": n}}
    with h.Gdriver(g, ns, attributes=attributes, freeze=freeze) as gd:
        gd.wait_registered(h.job_prefix(fn), n, timeout=60)
        time.sleep(ctx.settle)
        kids = gd.children()
        before = describe(reading(kids), h.smaps(gd.pid))
        workload = '{"a": 1}'
        res = h.run_client("pipelined", g.port, fn, JOBS, workload=workload, check=True)
        if res["completed"] != JOBS or res["mismatched"]:
            raise RuntimeError(f"memory jobs: bad results {res}")
        time.sleep(1.0)
        after = describe(reading(gd.children()), h.smaps(gd.pid))
    return {"idle": before, "after_jobs": after}


def standalone_run(ctx: h.Context, n: int) -> dict[str, Any]:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        while len(procs) < n:  # in batches, not 100 interpreters starting at once
            batch = [
                h.start([h.PYTHON, "-c", STANDALONE], stdout=subprocess.PIPE, env=h.clean_env())
                for _ in range(min(BATCH, n - len(procs)))
            ]
            procs.extend(batch)
            for p in batch:
                assert p.stdout is not None
                if p.stdout.read(1) != b"r":
                    raise RuntimeError("a standalone process failed to import the module")
        time.sleep(ctx.settle)
        return {"idle": describe(reading([p.pid for p in procs]), None)}
    finally:
        h.stop_many(procs)
        for p in procs:
            if p.stdout is not None:
                p.stdout.close()


def measure_round(
    ctx: h.Context,
    g: h.Gearmand,
    i: int,
    runs: int,
    variants: tuple[str, ...],
    raw: dict[int, dict[str, list[dict[str, Any]]]],
) -> None:
    for n in SIZES:
        k = (i + n) % len(variants)
        order = list(variants[k:] + variants[:k])
        if n == 50:
            order.append("gdriver_trivial")
        for v in order:
            if v == "standalone":
                r = standalone_run(ctx, n)
            else:
                r = gdriver_run(ctx, g, n, freeze=v != "gdriver_nofreeze",
                                trivial=v == "gdriver_trivial")  # fmt: skip
            raw[n][v].append(r)
        gr = raw[n]["gdriver"][-1]
        sr = raw[n]["standalone"][-1]
        ctx.say(f"run {i + 1}/{runs}, N={n}: gdriver {gr['idle']['total_pss_mib']:.1f} MiB "
                f"(after jobs {gr['after_jobs']['total_pss_mib']:.1f}), standalone "
                f"{sr['idle']['total_pss_mib']:.1f} MiB")  # fmt: skip


def run(ctx: h.Context) -> dict[str, Any]:
    runs = 1 if ctx.quick else ctx.runs
    variants = ("gdriver", "gdriver_nofreeze", "standalone")
    raw: dict[int, dict[str, list[dict[str, Any]]]] = {
        n: {v: [] for v in (*variants, "gdriver_trivial")} for n in SIZES
    }
    with h.Gearmand() as g:
        for i in range(runs):
            measure_round(ctx, g, i, runs, variants, raw)
    out: dict[str, Any] = {"jobs": JOBS, "sizes": {}}
    for n in SIZES:
        per: dict[str, Any] = {}
        for v, rows in raw[n].items():
            if not rows:
                continue
            entry: dict[str, Any] = {}
            for phase in rows[0]:
                entry[phase] = {
                    key: h.median(r[phase][key] for r in rows) for key in rows[0][phase]
                }
            entry["total_pss_runs"] = [r["idle"]["total_pss_mib"] for r in rows]
            per[v] = entry
        g, s = per["gdriver"]["idle"], per["standalone"]["idle"]
        per["ratio_gdriver_to_standalone"] = g["total_pss_mib"] / s["total_pss_mib"]
        out["sizes"][str(n)] = per
    if 1 in SIZES and 50 in SIZES:
        for v in ("gdriver", "gdriver_nofreeze"):
            a = out["sizes"]["1"][v]["idle"]["total_pss_mib"]
            b = out["sizes"]["50"][v]["idle"]["total_pss_mib"]
            out[f"{v}_mib_per_extra_child"] = (b - a) / 49
    g50 = out["sizes"]["50"]["gdriver"]
    t50 = out["sizes"]["50"].get("gdriver_trivial")
    nf50 = out["sizes"]["50"]["gdriver_nofreeze"]
    s50 = out["sizes"]["50"]["standalone"]
    uss = g50["after_jobs"]["child_uss_mib"]
    out["figures"] = [
        {
            "figure": "memory, supervisor + 50 children (sum of PSS)",
            "value": g50["idle"]["total_pss_mib"],
            "unit": "MiB",
            "perl": "269 MiB (trivial worker)",
            "target": "below Perl",
            "pass": g50["idle"]["total_pss_mib"] < 269,
            "note": f"heavy worker module; after {JOBS} jobs "
            f"{g50['after_jobs']['total_pss_mib']:.1f} MiB; without gc.freeze "
            f"{nf50['idle']['total_pss_mib']:.1f} -> {nf50['after_jobs']['total_pss_mib']:.1f}"
            f" MiB; 50 standalone processes {s50['idle']['total_pss_mib']:.1f} MiB"
            + (f"; trivial echo worker {t50['idle']['total_pss_mib']:.1f} MiB" if t50 else ""),
        },
        {
            "figure": "  same, trivial echo worker (Perl's setting)",
            "value": t50["idle"]["total_pss_mib"] if t50 else None,
            "unit": "MiB",
            "perl": "269 MiB",
            "target": "below Perl",
            "pass": bool(t50) and t50["idle"]["total_pss_mib"] < 269,
            "note": f"child USS {t50['idle']['child_uss_mib']:.2f} MiB, after {JOBS} jobs "
            f"{t50['after_jobs']['child_uss_mib']:.2f} MiB; supervisor PSS "
            f"{t50['idle']['supervisor_pss_mib']:.1f} MiB"
            if t50
            else "",
        },
        {
            "figure": f"child USS after {JOBS} jobs (N=50)",
            "value": uss,
            "unit": "MiB",
            "perl": "4.0 MiB",
            "target": "<= 3 MiB",
            "pass": uss <= 3.0,
            "note": f"before jobs {g50['idle']['child_uss_mib']:.2f} MiB; without gc.freeze "
            f"{nf50['idle']['child_uss_mib']:.2f} -> {nf50['after_jobs']['child_uss_mib']:.2f}"
            f" MiB; standalone process {s50['idle']['child_uss_mib']:.2f} MiB",
        },
    ]
    return out
