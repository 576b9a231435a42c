"""What tests/test_resolver.py runs inside a mount namespace whose DNS never answers: each
scenario prints its findings as one JSON line. Kept apart so the process imports no pytest."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from gdriver import codec, resolver
from gdriver.loop import EventLoop
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


def scenario_silent_name() -> None:
    turns = Turns()
    r = Resolver(turns.loop, timeout=1.0)
    resolver.install(r)
    r.start()
    out: dict[str, Any] = {"first": try_lookup(r, SILENT)}
    try_lookup(r, KNOWN)
    r.settle(2.0)
    out["known"] = try_lookup(r, KNOWN)
    turns.until(lambda: r.entries[(SILENT, 4730)].error is not None, 3.0)
    out["later"] = try_lookup(r, SILENT)
    out["known_later"] = try_lookup(r, KNOWN)
    out["longest_turn"] = turns.longest
    out["numeric_entries"] = (try_lookup(r, "127.0.0.1"), (("127.0.0.1", 4730) in r.entries))
    r.close()
    print(json.dumps(out))


def scenario_restart() -> None:
    turns = Turns()
    r = Resolver(turns.loop)
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
    out = {"restarted": restarted, "answered": answered, "restarts": r.restarts,
           "reaped": reaped, "alive": alive}  # fmt: skip
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
