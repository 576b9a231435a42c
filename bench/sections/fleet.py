"""9. Fleet: several replicas against one gearmand, and one replica with many jobs.

- Over-spawn: 3 gdriver replicas (job min 0, max 20, interval 5) on one gearmand; once
  every replica's waker is registered, W one-second background jobs are queued at once.
  Polled every 10 ms: the replicas' children in /proc (peak total processes) and gearmand's
  ``status`` (all done: nothing queued nor running). W = 30 (goal: peak <= 1.2 x 30, done
  <= 2 s) and W = 90 (goal: peak <= 60, the 3 x 20 cap, done <= 3.5 s).
- 400 jobs, min 1 each, in one replica: time from the command's start until gearmand lists
  400 registered connections; then idle supervisor CPU, sum of PSS (supervisor and
  children), observer poll time (the ``gdriver_observer_poll_duration_seconds`` histogram) and the
  console's ``status`` answer time.
- Poll cost against many functions: one poll round as the poller and supervisor run it
  (two servers answer the same listing): keep this deployment's lines (``Concern``), parse,
  merge, ``decide``, ``set_queue``; with 1,100 / 5,000 / 50,000 status lines, 100 jobs of
  ours among them (the rest another team's). Also the ``/metrics`` text after that round.
"""

from __future__ import annotations

import socket
import time
import timeit
import urllib.request
from pathlib import Path
from typing import Any

import gclient
import harness as h
from prometheus_client import generate_latest

from gdriver import observer
from gdriver.metrics import Metrics
from gdriver.poller import Concern, merged_status, watch

FN = "benchjobs.sleepy.Sleepy.nap"
REPLICAS = 3
MAX = 20
MANY = 400


# -- over-spawn -----------------------------------------------------------------------------------
def workers(replica: h.Gdriver) -> list[int]:
    """The replica's worker processes (not its resolver process)."""
    out = []
    for pid in replica.children():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"[resolver]" in f.read():
                    continue
        except OSError:
            continue  # gone
        out.append(pid)
    return out


def one_burst(g: h.Gearmand, replicas: list[h.Gdriver], jobs: int) -> dict[str, float]:
    # quiet: no process anywhere, each replica's waker registered (min 0 waits on wakers)
    def quiet() -> bool:
        for r in replicas:
            r.check_alive()
        total, _, wakers = g.admin.status().get(FN, (0, 0, 0))
        return total == 0 and wakers == REPLICAS and not any(workers(r) for r in replicas)

    h.wait_for(quiet, 60, 0.05)
    time.sleep(0.3)
    sub = gclient.background(g.port, FN, [b"1.0"] * jobs)
    t0 = time.monotonic()
    peak = 0
    done = None
    deadline = t0 + 60
    while time.monotonic() < deadline:
        kids = sum(len(workers(r)) for r in replicas)
        peak = max(peak, kids)
        total, running, _ = g.admin.status().get(FN, (0, 0, 0))
        if total == 0 and running == 0 and done is None:
            done = time.monotonic() - t0
            break
        time.sleep(0.01)
    for r in replicas:
        r.check_alive()
    return {"peak": float(peak), "done": done if done is not None else float("nan"),
            "submit_seconds": float(sub["seconds"])}  # fmt: skip


def overspawn(ctx: h.Context) -> dict[str, Any]:
    runs = 2 if ctx.quick else ctx.runs
    attributes = {FN: {"min_processes": 0, "max_processes": MAX}}
    rows: dict[int, list[dict[str, float]]] = {30: [], 90: []}
    with h.Gearmand() as g:
        replicas = [
            h.Gdriver(g, "benchjobs.sleepy", "--max_idle_time", "0", attributes=attributes)
            for _ in range(REPLICAS)
        ]
        try:
            for r in replicas:
                r.start()
            for i in range(runs):
                for jobs in (30, 90) if i % 2 == 0 else (90, 30):
                    rows[jobs].append(one_burst(g, replicas, jobs))
                    r = rows[jobs][-1]
                    ctx.say(f"run {i + 1}/{runs}, {jobs} jobs: peak {r['peak']:.0f} processes,"
                            f" all done after {r['done']:.2f} s")  # fmt: skip
        finally:
            h.stop_many(r.proc for r in replicas if r.proc is not None)
            for r in replicas:
                r.stop()
    return {str(n): {k: h.summary(r[k] for r in rows[n]) for k in rows[n][0]} for n in rows}


# -- 400 jobs in one replica -----------------------------------------------------------------------
def write_many(directory: Path) -> str:
    """A module with MANY worker classes, one job (min 1) each."""
    package = directory / "fleetjobs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    body = ["from gdriver import Worker, job", ""]
    for i in range(MANY):
        body += [f"class W{i}(Worker):", "    @job(min_processes=1, max_processes=2)",
                 "    def run(self, job, workload):", "        return workload", ""]  # fmt: skip
    (package / "many.py").write_text("\n".join(body))
    return "fleetjobs"


def console_seconds(port: int) -> float:
    t0 = time.monotonic()
    with socket.create_connection((h.HOST, port), timeout=10) as s:
        s.sendall(b"status\n")
        buf = b""
        while not buf.endswith(b"\r\n.\r\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    return time.monotonic() - t0


def poll_seconds(port: int) -> tuple[float, float]:
    """Sum and count of gdriver_observer_poll_duration_seconds from /metrics."""
    text = urllib.request.urlopen(f"http://{h.HOST}:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("gdriver_observer_poll_duration_seconds_"):
            values[name.rsplit("_", 1)[1]] = float(value)
    return values.get("sum", float("nan")), values.get("count", float("nan"))


def many_jobs(ctx: h.Context) -> dict[str, Any]:
    rows: list[dict[str, float]] = []
    window = 5.0 if ctx.quick else 20.0
    runs = 1 if ctx.quick else 3
    with h.Gearmand() as g:
        for i in range(runs):
            metrics_port = h.free_port()
            gd = h.Gdriver(g, "fleetjobs", "--interval", "1", console=True)
            namespace_dir = gd.tmp / "lib"
            namespace_dir.mkdir()
            write_many(namespace_dir)
            gd.args += ["--lib", str(namespace_dir), "--metrics_port", str(metrics_port),
                        "--metrics_bind", h.HOST]  # fmt: skip
            try:
                gd.start()
                t_reg = gd.wait_registered("gdriver:fleetjobs.many.", MANY, timeout=120)
                row = {"registered": t_reg - gd.started_at}
                time.sleep(ctx.settle)
                pids = [gd.pid, *gd.children()]
                cpu0, t0 = h.cpu_seconds(gd.pid), time.monotonic()
                sum0, n0 = poll_seconds(metrics_port)
                time.sleep(window)
                cpu1, t1 = h.cpu_seconds(gd.pid), time.monotonic()
                sum1, n1 = poll_seconds(metrics_port)
                row["idle_cpu_percent"] = (cpu1 - cpu0) / (t1 - t0) * 100
                row["poll_ms"] = (sum1 - sum0) / max(1.0, n1 - n0) * 1000
                row["pss_mib"] = h.mib(sum(h.smaps(p)["pss"] for p in pids))
                row["processes"] = float(len(workers(gd)))
                row["console_s"] = max(console_seconds(gd.console_port) for _ in range(3))
                gd.check_alive()
            finally:
                gd.stop()
            rows.append(row)
            ctx.say(
                f"run {i + 1}/{runs}: {MANY} registered after {row['registered']:.2f} s, "
                f"idle CPU {row['idle_cpu_percent']:.2f} %, PSS {row['pss_mib']:.0f} MiB, "
                f"poll {row['poll_ms']:.2f} ms, console {row['console_s'] * 1000:.1f} ms"
            )
    return {k: h.summary(r[k] for r in rows) for k in rows[0]}


# -- poll cost vs functions -----------------------------------------------------------------------
def poll_inputs(lines_n: int) -> tuple[list[str], list[observer.JobView]]:
    jobs = 100
    views = []
    lines = []
    pid = 1000
    for j in range(jobs):
        fn = f"app.workers.Class{j}.run"
        procs = []
        for _ in range(2):
            pid += 1
            procs.append(observer.ProcessView(pid, j % 4 == 0, 9_000.0))
        views.append(observer.JobView(f"app.workers.Class{j}.run", 1, 10, (fn,), tuple(procs)))
        lines.append(f"{fn}\t{30 if j % 4 == 0 else 0}\t2\t2")
    for u in range(lines_n - jobs):
        lines.append(f"other.service{u // 50}.Class{u}.fn\t{u % 3}\t0\t{u % 5}")
    return lines, views


def poll_cost(ctx: h.Context) -> dict[str, Any]:
    repeat = 5 if ctx.quick else 11
    out: dict[str, Any] = {}
    for n in (1_100, 5_000, 50_000):
        lines, views = poll_inputs(n)
        served = frozenset(fn for v in views for fn in v.functions)
        concern = Concern(served, watch(("app.workers.",)))
        metrics = Metrics()

        def one(lines: list[str] = lines, views: list[observer.JobView] = views,
                concern: Concern = concern, metrics: Metrics = metrics) -> None:  # fmt: skip
            merged = merged_status([lines, lines], concern)  # two servers, same listing
            decision = observer.decide(merged, views, 10_000.0, 0.0)
            metrics.set_queue(merged, decision.unknown)

        timer = timeit.Timer(one)
        number, _ = timer.autorange()
        ms = [t / number * 1000 for t in timer.repeat(repeat, number)]
        out[str(n)] = h.summary(ms)
        scrape = timeit.Timer(lambda m=metrics: generate_latest(m.registry))
        number, _ = scrape.autorange()
        out[f"scrape_{n}"] = h.summary([t / number * 1000 for t in scrape.repeat(repeat, number)])
        ctx.say(f"{n} status lines x 2 servers: poll round {out[str(n)]['median']:.2f} ms, "
                f"/metrics {out[f'scrape_{n}']['median']:.2f} ms")  # fmt: skip
    return out


def run(ctx: h.Context) -> dict[str, Any]:
    out: dict[str, Any] = {"overspawn": overspawn(ctx), "many": many_jobs(ctx),
                           "poll_cost": poll_cost(ctx)}  # fmt: skip
    o30, o90 = out["overspawn"]["30"], out["overspawn"]["90"]
    many, cost = out["many"], out["poll_cost"]
    sizes = [n for n in cost if n.isdigit()]
    per_line = [cost[n]["median"] / int(n) * 1000 for n in sizes]
    out["figures"] = [
        {
            "figure": "3 replicas, 30 x 1 s jobs: peak processes",
            "value": o30["peak"]["max"],
            "unit": "jobs",
            "target": "<= 36",
            "pass": o30["peak"]["max"] <= 36,
            "note": f"median peak {o30['peak']['median']:.0f}, max {o30['peak']['max']:.0f}",
        },
        {
            "figure": "3 replicas, 30 x 1 s jobs: all done",
            "value": o30["done"]["median"],
            "unit": "s",
            "target": "<= 2 s",
            "pass": o30["done"]["median"] is not None and o30["done"]["median"] <= 2.0,
        },
        {
            "figure": "3 replicas, 90 x 1 s jobs: peak processes",
            "value": o90["peak"]["max"],
            "unit": "jobs",
            "target": "<= 60",
            "pass": o90["peak"]["max"] <= 60,
        },
        {
            "figure": "3 replicas, 90 x 1 s jobs: all done",
            "value": o90["done"]["median"],
            "unit": "s",
            "target": "<= 3.5 s",
            "pass": o90["done"]["median"] is not None and o90["done"]["median"] <= 3.5,
        },
        {
            "figure": f"{MANY} jobs (min 1): all registered",
            "value": many["registered"]["median"],
            "unit": "s",
            "target": "a few s",
            "pass": many["registered"]["median"] <= 5.0,
            "note": f"idle supervisor CPU {many['idle_cpu_percent']['median']:.2f} %, sum of PSS"
            f" {many['pss_mib']['median']:.0f} MiB, observer poll "
            f"{many['poll_ms']['median']:.2f} ms, console status "
            f"{many['console_s']['max'] * 1000:.1f} ms (worst)",
        },
        {
            "figure": f"{MANY} jobs: console status answer",
            "value": many["console_s"]["max"],
            "unit": "s",
            "target": "<= 1 s",
            "pass": many["console_s"]["max"] <= 1.0,
        },
        {
            "figure": "poll round (keep ours, parse, merge, decide, gauges), 50,000 lines x 2",
            "value": cost["50000"]["median"],
            "unit": "ms",
            "target": "linear",
            # the largest two sizes: at 1,100 lines the round's fixed cost (the requests, the
            # gauges) is most of it, and its cost per line says nothing of the growth
            "pass": per_line[-1] <= 2.0 * per_line[-2],
            "note": "per 1,000 lines: "
            + ", ".join(f"{v:.2f} ms" for v in per_line)
            + f" (1,100 / 5,000 / 50,000 lines: {cost['1100']['median']:.2f} / "
            f"{cost['5000']['median']:.2f} / {cost['50000']['median']:.2f} ms; /metrics "
            f"{cost['scrape_50000']['median']:.2f} ms)",
        },
    ]
    return out
