"""What tests/test_resolver.py runs inside a mount namespace whose DNS never answers: each
scenario prints its findings as one JSON line. Kept apart so the process imports no pytest."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import generate_latest

from gdriver import Driver, Worker, codec, resolver
from gdriver.loop import EventLoop
from gdriver.metrics import Metrics
from gdriver.resolver import Resolver

SILENT = "gearmand.dns-drill.test"  # in no hosts file: goes to the silent DNS server
KNOWN = "gearmand.known.test"  # 127.0.0.9 in the namespace's hosts file


class Turns:
    """Runs a real EventLoop and remembers its longest turn."""

    def __init__(self) -> None:
        self.loop = EventLoop()
        self.longest = 0.0

    def until(self, predicate: Callable[[], Any], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            start = time.monotonic()
            self.loop.run_once(0.05)
            self.longest = max(self.longest, time.monotonic() - start)
            if predicate():
                return True
        return False


def try_lookup(r: Resolver, host: str) -> tuple[list[str], str | None, float]:
    start = time.monotonic()
    try:
        found = [a.sockaddr[0] for a in codec.resolve(host, 4730)]
        error = None
    except OSError as exc:
        found, error = [], codec.error_text(exc)
    return found, error, time.monotonic() - start


def failures(metrics: Metrics) -> dict[str, float]:
    counter = metrics.registry.get_sample_value
    names = {f"{SILENT}:4730", f"{KNOWN}:4730"}
    found = {n: counter("gdriver_resolver_failures_total", {"server": n}) for n in names}
    return {n: v for n, v in found.items() if v is not None}


def scenario_silent_name() -> None:
    turns = Turns()
    metrics = Metrics()
    r = Resolver(turns.loop, timeout=1.0, metrics=metrics)
    resolver.install(r)
    r.start()
    out: dict[str, Any] = {"first": try_lookup(r, SILENT)}
    try_lookup(r, KNOWN)
    r.settle(2.0)
    out["known"] = try_lookup(r, KNOWN)
    turns.until(lambda: r.entries[(SILENT, 4730)].error is not None, 3.0)
    out["later"] = try_lookup(r, SILENT)
    out["failures"] = failures(metrics)
    out["known_later"] = try_lookup(r, KNOWN)
    out["longest_turn"] = turns.longest
    out["numeric_entries"] = (try_lookup(r, "127.0.0.1"), (("127.0.0.1", 4730) in r.entries))
    r.close()
    print(json.dumps(out))


def scenario_restart() -> None:
    turns = Turns()
    metrics = Metrics()
    r = Resolver(turns.loop, metrics=metrics)
    resolver.install(r)
    r.start()
    first = r.pid
    try_lookup(r, KNOWN)
    r.settle(2.0)
    os.kill(first, signal.SIGKILL)
    restarted = turns.until(lambda: r.pid not in (0, first), 3.0)
    r.entries.clear()  # forget: the next lookup must come from the new process
    try_lookup(r, KNOWN)
    answered = turns.until(lambda: try_lookup(r, KNOWN)[0] == ["127.0.0.9"], 3.0)
    try:
        os.waitpid(first, os.WNOHANG)
        reaped = False
    except ChildProcessError:
        reaped = True
    alive = r.pid != 0 and os.waitpid(r.pid, os.WNOHANG)[0] == 0
    counted = metrics.registry.get_sample_value("gdriver_resolver_restarts_total")
    out = {"restarted": restarted, "answered": answered, "restarts": r.restarts,
           "reaped": reaped, "alive": alive, "counted": counted}  # fmt: skip
    pid = r.pid
    r.close()
    out["closed"] = not os.path.exists(f"/proc/{pid}")
    print(json.dumps(out))


def scenario_changes() -> None:
    turns = Turns()
    changes: list[bytes] = []
    r = Resolver(turns.loop, changes.append, timeout=0.5, refresh=0.3)
    resolver.install(r)
    r.start()
    try_lookup(r, KNOWN)
    r.settle(2.0)
    out: dict[str, Any] = {"before": try_lookup(r, KNOWN)[0]}
    with open("/etc/hosts", "a") as f:  # the namespace's own hosts file
        f.write(f"127.0.0.10 {KNOWN}\n")
    with open("/etc/hosts") as f:
        text = f.read().replace(f"127.0.0.9 {KNOWN}\n", "")
    with open("/etc/hosts", "w") as f:
        f.write(text)
    out["followed"] = turns.until(lambda: try_lookup(r, KNOWN)[0] == ["127.0.0.10"], 5.0)
    out["changes"] = [json.loads(m[1:])[2] for m in changes]
    with open("/etc/hosts", "w") as f:  # now the name goes to the silent DNS server
        f.write(text.replace(f"127.0.0.10 {KNOWN}\n", ""))
    out["failed"] = turns.until(lambda: r.entries[(KNOWN, 4730)].error is not None, 5.0)
    out["kept"] = try_lookup(r, KNOWN)
    r.close()
    print(json.dumps(out))


def scenario_stuck() -> None:
    turns = Turns()
    r = Resolver(turns.loop, timeout=0.3, stuck=1.0)
    resolver.install(r)
    r.start()
    first = r.pid
    try_lookup(r, SILENT)
    restarted = turns.until(lambda: r.pid not in (0, first), 4.0)
    try_lookup(r, KNOWN)
    answered = turns.until(lambda: try_lookup(r, KNOWN)[0] == ["127.0.0.9"], 3.0)
    old_gone = not os.path.exists(f"/proc/{first}")
    out = {"restarted": restarted, "answered": answered, "old_gone": old_gone,
           "longest_turn": turns.longest}  # fmt: skip
    r.close()
    print(json.dumps(out))


# -- a real supervisor: its resolver process and a worker process die at once -------------------
class Echo(Worker):
    def echo(self, job: Any, workload: bytes) -> bytes:
        return workload


class Records(logging.Handler):
    """The supervisor's log records, as their event fields."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.events: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "event"):
            fields = {k: v for k, v in vars(record).items() if k in ("event", "pid", "reason")}
            self.events.append({**fields, "message": record.getMessage()})


def zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def alive(pid: int) -> bool:
    try:
        return not zombie(pid)
    except OSError:
        return False


def scenario_supervisor(server: str) -> None:
    """Runs in a PID namespace of its own (not as its PID 1) and needs a gearmand at
    ``server``. The resolver process and a worker process are SIGKILLed in one loop turn; the
    next PID is set (``ns_last_pid``) so the worker's replacement gets the resolver's old PID,
    as a busy host may give it. Prints the findings, then how the supervisor stopped."""
    records = Records()
    logging.getLogger("gdriver").addHandler(records)
    logging.getLogger("gdriver").setLevel(logging.INFO)
    driver = Driver(server=server, console_port=0, metrics_port=0, interval=0.5)
    worker = Echo(server=server)
    driver.add_job("echo", worker, [{"name": "echo", "body": Echo.echo}], 3, 3)
    out: dict[str, Any] = {}
    turns: list[float] = []  # each loop turn's work: from select's return to the next select
    clock = {"returned": 0.0, "pause": 0.0}
    select = driver.loop.selector.select

    def timed_select(timeout: float | None = None) -> Any:
        if clock["returned"]:
            turns.append(time.monotonic() - clock["returned"] - clock["pause"])
            clock["pause"] = 0.0
        found = select(timeout)
        clock["returned"] = time.monotonic()
        return found

    driver.loop.selector.select = timed_select  # type: ignore[method-assign]

    def strike() -> None:
        start = time.monotonic()
        old, victim = driver.resolver.pid, min(driver.procs)
        out["others"] = sorted(set(driver.procs) - {victim})
        out["resolver"], out["victim"] = old, victim
        for pid in (old, victim):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not (zombie(old) and zombie(victim)) and time.monotonic() < deadline:
            time.sleep(0.001)
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(old - 1))  # the next fork, the victim's replacement, gets old's PID
        clock["pause"] += time.monotonic() - start  # not a turn of the supervisor's own

    def finish() -> None:
        new = sorted(set(driver.procs) - set(out["others"]))
        out["replacement"] = new
        out["procs_alive"] = [alive(pid) for pid in sorted(driver.procs)]
        out["others_alive"] = [alive(pid) for pid in out["others"]]
        out["restarted"] = driver.resolver.pid not in (0, out["resolver"])
        out["resolver_alive"] = alive(driver.resolver.pid)
        out["answers"] = driver.resolver.sock is not None
        text = generate_latest(driver.metrics.registry).decode()
        out["restarts_metric"] = [ln for ln in text.splitlines() if "resolver_restarts_total" in ln
                                  and not ln.startswith("#")]  # fmt: skip
        out["exits"] = [r["pid"] for r in records.events if r["event"] == "process_exited"]
        out["restart_records"] = [r["message"] for r in records.events
                                  if r["event"] == "resolver_restart"]  # fmt: skip
        print(json.dumps(out), flush=True)  # the findings, even if the stop then hangs
        driver.shutdown()

    driver.loop.call_later(2.5, strike)  # workers older than YOUNG: replaced at once
    driver.loop.call_later(5.0, finish)
    status = driver.run()
    print(json.dumps({"status": status, "longest_turn": max(turns)}))
