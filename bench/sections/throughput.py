"""1. Throughput of trivial echo jobs through one worker process.

Contenders, all registered on the same gearmand at once under their own function names and
measured in turn (the order rotates every round):

- ``gdriver``: a gdriver run with one job, min = max = 1 (``benchjobs.echo``);
- ``pygearman``: a bare ``gearman.GearmanWorker`` loop (bench/pyworker.py);
- ``python``: the least a Python worker process does per job (bench/pyfloor.py: an epoll
  wait, a recv and a send, nothing else): the floor under any Python worker, so that what
  gdriver's features cost and what the language costs are told apart;
- ``c``: the C worker ``gearman -w -f FN`` (libgearman; with no command it writes the
  workload to its stdout and returns an empty result: the bare libgearman worker loop).

Clients: ``pipelined`` keeps every job of the run in flight on one connection (SUBMIT_JOB
packets written back to back, WORK_COMPLETE counted as they arrive), ``sequential`` submits
one job and waits for its result before the next. Both run gearmand's default thread count
(4, as the Perl figures) and ``--threads=1``, interleaved as well.
"""

from __future__ import annotations

from typing import Any

import harness as h

GDRIVER_FN = "benchjobs.echo.Echo.echo"
CONTENDERS = ("gdriver", "pygearman", "python", "c")
#: The pipelined ratio to the C worker asked of gdriver with gearmand --threads=1.
RATIO_GOAL = 0.9
HEADLINE = "threads=default(4)"


class Setup:
    """One gearmand with the four workers on it."""

    def __init__(self, threads: int | None) -> None:
        self.gearmand = h.Gearmand(threads)
        self.gdriver: h.Gdriver | None = None
        self.workers: dict[str, Any] = {}  # the contenders but gdriver: their processes
        self.functions = {
            "gdriver": GDRIVER_FN,
            "pygearman": "bench.pygearman.echo",
            "python": "bench.python.echo",
            "c": "bench.c.echo",
        }

    def start(self) -> Setup:
        g = self.gearmand.start()
        self.workers["c"] = h.start([h.GEARMAN, "-w", "-f", self.functions["c"], "-h", h.HOST,
                                     "-p", str(g.port)])  # fmt: skip
        self.workers["pygearman"] = h.start(
            [h.PYTHON, str(h.BENCH / "pyworker.py"), g.address, self.functions["pygearman"]],
            env=h.clean_env(),
        )
        self.workers["python"] = h.start(
            [h.PYTHON, str(h.BENCH / "pyfloor.py"), h.HOST, str(g.port), self.functions["python"]],
            env=h.clean_env(),
        )
        self.gdriver = h.Gdriver(g, "benchjobs.echo").start()
        self.gdriver.wait_registered(h.job_prefix(GDRIVER_FN), 1)

        def all_there() -> bool:
            status = g.admin.status()
            return all(status.get(fn, (0, 0, 0))[2] >= 1 for fn in self.functions.values())

        h.wait_for(all_there, 20)
        return self

    def pids(self, who: str) -> dict[str, int]:
        if who == "gdriver":
            assert self.gdriver is not None
            # the worker process by its gearmand client id: the supervisor has other children
            # (the resolver process)
            kids = self.gearmand.admin.worker_pids(h.job_prefix(GDRIVER_FN))
            out = {"gdriver_supervisor": self.gdriver.pid}
            if kids:
                out["gdriver_child"] = kids[0]
            return out
        return {who: self.workers[who].pid}

    def stop(self) -> None:
        if self.gdriver is not None:
            self.gdriver.stop()
        for proc in self.workers.values():
            h.stop(proc)
        self.gearmand.stop()


def measure(setup: Setup, who: str, mode: str, count: int) -> dict[str, Any]:
    pids = setup.pids(who)
    assert setup.gearmand.proc is not None
    pids["gearmand"] = setup.gearmand.proc.pid
    before = {k: h.cpu_seconds(p) for k, p in pids.items()}
    res = h.run_client(
        mode, setup.gearmand.port, setup.functions[who], count,
        check=who != "c", warmup=200,
    )  # fmt: skip
    after = {k: h.cpu_seconds(p) for k, p in pids.items()}
    if res["completed"] != count or res["mismatched"]:
        raise RuntimeError(f"{who} {mode}: bad results: {res}")
    # CPU per job in microseconds (the 200 warm-up jobs are counted in)
    res["cpu_us_per_job"] = {k: (after[k] - before[k]) / (count + 200) * 1e6 for k in pids}
    return res


def run(ctx: h.Context) -> dict[str, Any]:
    counts = {"pipelined": 5_000, "sequential": 1_000} if ctx.quick else {
        "pipelined": 10_000, "sequential": 2_000}  # fmt: skip
    setups = [Setup(None), Setup(1)]
    raw: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    try:
        for s in setups:
            s.start()
            raw[s.gearmand.label] = {m: {c: [] for c in CONTENDERS} for m in counts}
        pairs = [(s, c) for s in setups for c in CONTENDERS]
        for rnd in range(ctx.runs):
            k = rnd % len(pairs)
            order = pairs[k:] + pairs[:k]
            for mode, count in counts.items():
                for s, who in order:
                    res = measure(s, who, mode, count)
                    raw[s.gearmand.label][mode][who].append(res)
            ctx.say(f"round {rnd + 1}/{ctx.runs} done")
    finally:
        for s in setups:
            s.stop()
    out: dict[str, Any] = {"client": h.client_name(), "jobs": counts, "servers": {}}
    for label, modes in raw.items():
        per: dict[str, Any] = {}
        for mode, by in modes.items():
            entry: dict[str, Any] = {c: h.summary(r["rate"] for r in by[c]) for c in CONTENDERS}
            for c in ("gdriver", "pygearman", "python"):
                # ratios within each round: the contenders ran back to back
                entry[f"ratio_{c}_to_c"] = h.summary(
                    a["rate"] / b["rate"] for a, b in zip(by[c], by["c"], strict=True)
                )
            cpu: dict[str, float] = {}
            for c in CONTENDERS:
                keys = by[c][0]["cpu_us_per_job"].keys()
                for key in keys:
                    name = key if key != "gearmand" else f"gearmand ({c} runs)"
                    cpu[name] = h.median(r["cpu_us_per_job"].get(key, 0.0) for r in by[c])
            entry["cpu_us_per_job"] = cpu
            per[mode] = entry
        out["servers"][label] = per
    out["headline_server"] = HEADLINE
    head = out["servers"][HEADLINE]
    pipe, seq = head["pipelined"], head["sequential"]
    out["figures"] = [
        {
            "figure": "trivial jobs/s, 1 process, pipelined client",
            "value": pipe["gdriver"]["median"],
            "unit": "jobs/s",
            "perl": "15.3 k (XS), 6.5 k (PP)",
            "target": ">= 15.3 k",
            "pass": pipe["gdriver"]["median"] >= 15_300,
            "note": f"gearmand with its default 4 threads, as the Perl figures; C worker "
            f"{pipe['c']['median']:.0f}/s, pygearman {pipe['pygearman']['median']:.0f}/s; "
            f"client: {out['client']}",
        },
        {
            "figure": "  same, as a ratio to the C worker (same run)",
            "value": pipe["ratio_gdriver_to_c"]["median"],
            "unit": "x",
            "perl": "0.67 (15.3 k / 22.9 k)",
            "target": ">= 0.67",
            "pass": pipe["ratio_gdriver_to_c"]["median"] >= 0.67,
        },
        {
            "figure": "trivial jobs/s, one job at a time",
            "value": seq["gdriver"]["median"],
            "unit": "jobs/s",
            "perl": "3.4 k (XS), 3.2 k (PP)",
            "target": ">= 3.4 k",
            "pass": seq["gdriver"]["median"] >= 3_400,
            "note": f"C worker {seq['c']['median']:.0f}/s, ratio "
            f"{seq['ratio_gdriver_to_c']['median']:.2f}",
        },
    ]
    cpu_seq, cpu_pipe = seq["cpu_us_per_job"], pipe["cpu_us_per_job"]
    out["figures"].append(
        {
            "figure": "  supervisor CPU per job, one at a time",
            "value": cpu_seq.get("gdriver_supervisor"),
            "unit": "us",
            "perl": "34 us (XS parent)",
            "target": "-",
            "pass": None,
            "note": f"child {cpu_seq.get('gdriver_child', float('nan')):.1f} us (Perl XS child "
            f"82 us), C worker {cpu_seq['c']:.1f} us; pipelined: supervisor "
            f"{cpu_pipe.get('gdriver_supervisor', float('nan')):.1f} us, child "
            f"{cpu_pipe.get('gdriver_child', float('nan')):.1f} us, C worker "
            f"{cpu_pipe['c']:.1f} us, pygearman {cpu_pipe['pygearman']:.1f} us, bare Python "
            f"loop {cpu_pipe['python']:.1f} us",
        }
    )
    one = out["servers"].get("threads=1")
    if one:
        p1, s1 = one["pipelined"], one["sequential"]
        out["figures"] += [
            {
                "figure": "  pipelined, gearmand --threads=1",
                "value": p1["gdriver"]["median"],
                "unit": "jobs/s",
                "perl": "-",
                "target": ">= 15.3 k",
                "pass": p1["gdriver"]["median"] >= 15_300,
                "note": f"C worker {p1['c']['median']:.0f}/s, pygearman "
                f"{p1['pygearman']['median']:.0f}/s, bare Python loop "
                f"{p1['python']['median']:.0f}/s; CPU per job: child "
                f"{p1['cpu_us_per_job'].get('gdriver_child', float('nan')):.1f} us, C worker "
                f"{p1['cpu_us_per_job']['c']:.1f} us, bare Python loop "
                f"{p1['cpu_us_per_job']['python']:.1f} us, supervisor "
                f"{p1['cpu_us_per_job'].get('gdriver_supervisor', float('nan')):.1f} us",
            },
            {
                "figure": "    as a ratio to the C worker (same run)",
                "value": p1["ratio_gdriver_to_c"]["median"],
                "unit": "x",
                "perl": "-",
                "target": f">= {RATIO_GOAL}",
                "pass": p1["ratio_gdriver_to_c"]["median"] >= RATIO_GOAL,
                "note": f"range {p1['ratio_gdriver_to_c']['min']:.2f}-"
                f"{p1['ratio_gdriver_to_c']['max']:.2f} over the rounds",
            },
            {
                "figure": "    the bare Python loop's ratio to the C worker",
                "value": p1["ratio_python_to_c"]["median"],
                "unit": "x",
                "perl": "-",
                "target": "-",
                "pass": None,
                "note": "bench/pyfloor.py, the most a Python worker process makes here "
                f"(range {p1['ratio_python_to_c']['min']:.2f}-"
                f"{p1['ratio_python_to_c']['max']:.2f}); gdriver makes "
                f"{p1['gdriver']['median'] / p1['python']['median']:.2f} x of it",
            },
            {
                "figure": "  one at a time, gearmand --threads=1",
                "value": s1["gdriver"]["median"],
                "unit": "jobs/s",
                "perl": "-",
                "target": ">= 3.4 k",
                "pass": s1["gdriver"]["median"] >= 3_400,
                "note": f"C worker {s1['c']['median']:.0f}/s, ratio "
                f"{s1['ratio_gdriver_to_c']['median']:.2f}",
            },
        ]
    return out
