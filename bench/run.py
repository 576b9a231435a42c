"""gdriver benchmarks (``make bench``): speed and memory figures next to the Perl original's.

    python bench/run.py            # full: median of >= 5 runs per figure (~15 minutes)
    python bench/run.py --quick    # fewer runs, 10 s idle window (~3 minutes)
    python bench/run.py --only throughput --only drain

Every figure is a median of several runs; every comparison runs its contenders interleaved
on the same gearmand and is also given as a ratio. Each section starts its own gearmand(s)
on free 127.0.0.1 ports and stops every process it started. Results: a table on stdout and
a JSON file under bench/results/ (with machine information).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h
from sections import (
    drain,
    fleet,
    idle,
    instructions,
    memory,
    observer_cost,
    replace,
    scaleup,
    startup,
    throughput,
)

SECTIONS = {
    "throughput": throughput.run,
    "scaleup": scaleup.run,
    "replace": replace.run,
    "memory": memory.run,
    "startup": startup.run,
    "idle": idle.run,
    "observer": observer_cost.run,
    "drain": drain.run,
    "fleet": fleet.run,
    "instructions": instructions.run,
}


def fmt(value: Any, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "jobs/s":
        return f"{value / 1000:.1f} k/s"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "%":
        return f"{value:.2f} %"
    if unit == "us":
        return f"{value:.1f} us"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "instructions":
        return f"{value:,.0f}"
    if unit == "jobs":
        return f"{value:.0f}"
    return f"{value} {unit}"


def table(figures: list[dict[str, Any]]) -> str:
    rows = [("figure", "gdriver", "Perl", "target", "")]
    for f in figures:
        verdict = "info" if f.get("pass") is None else "pass" if f["pass"] else "MISS"
        rows.append((f["figure"], fmt(f.get("value"), f.get("unit", "")), f.get("perl", ""),
                     f.get("target", ""), verdict))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[j]) for j, c in enumerate(r)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  {f['figure'].strip()}: {f['note']}" for f in figures if f.get("note")]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer runs, 10 s idle window")
    p.add_argument("--only", action="append", choices=sorted(SECTIONS), metavar="NAME",
                   help="run only this section (repeatable): " + ", ".join(SECTIONS))  # fmt: skip
    p.add_argument("--runs", type=int, help="repetitions per figure (default 5, quick 3)")
    p.add_argument("--idle-seconds", type=float, help="idle-cost window (default 60, quick 10)")
    p.add_argument("--seed", type=int, help="random seed (observer phases, kill choices)")
    p.add_argument("--out", type=Path, help="JSON result file (default bench/results/...)")
    a = p.parse_args(argv)

    # a SIGTERM ends the run through the finally clauses, which stop every process started
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    seed = a.seed if a.seed is not None else int(time.time())
    ctx = h.Context(
        quick=a.quick,
        runs=a.runs or (3 if a.quick else 5),
        settle=1.0 if a.quick else 2.0,
        idle_seconds=a.idle_seconds or (10.0 if a.quick else 60.0),
        rng=random.Random(seed),
    )
    names = a.only or list(SECTIONS)
    info = h.machine_info()
    print(f"gdriver bench ({'quick' if a.quick else 'full'}, {ctx.runs} runs per figure, "
          f"seed {seed})")  # fmt: skip
    print(f"{info['cpu_model']}, {info['cores']} cores, kernel {info['kernel']}, "
          f"Python {info['python']}, {info['gearmand']}")  # fmt: skip

    result: dict[str, Any] = {
        "mode": "quick" if a.quick else "full",
        "runs": ctx.runs,
        "seed": seed,
        "machine": info,
        "sections": {},
        "errors": {},
    }
    figures: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gdriver-bench-bin-") as tmp:
        h.CLIENT_BIN = h.build_client(Path(tmp))
        print(f"client: {h.client_name()}", flush=True)
        for name in names:
            print(f"\n[{name}]", flush=True)
            t0 = time.monotonic()
            try:
                out = SECTIONS[name](ctx)
            except Exception as exc:
                traceback.print_exc()
                result["errors"][name] = f"{type(exc).__name__}: {exc}"
                first = str(exc).strip().splitlines()[0][:60] if str(exc).strip() else ""
                figures.append({"figure": f"{name}: failed ({type(exc).__name__}: {first})",
                                "unit": "", "pass": False})  # fmt: skip
                continue
            finally:
                h.stop_all()
            out["section_seconds"] = time.monotonic() - t0
            result["sections"][name] = out
            figures.extend(out.get("figures", []))
            for f in out.get("figures", []):
                print(f"  -> {f['figure'].strip()}: {fmt(f.get('value'), f.get('unit', ''))}",
                      flush=True)  # fmt: skip
    info["loadavg_end"] = os.getloadavg()
    result["seconds"] = time.monotonic() - started
    result["figures"] = figures
    text = table(figures)
    result["table"] = text
    print(f"\n{text}")
    print(f"\n{len(names)} section(s) in {result['seconds']:.0f} s; load average at the end "
          f"{info['loadavg_end'][0]:.2f}")  # fmt: skip

    out_path = a.out
    if out_path is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out_path = h.BENCH / "results" / f"bench-{result['mode']}-{stamp}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"results: {out_path}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        h.stop_all()
