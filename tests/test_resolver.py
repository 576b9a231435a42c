"""The resolver process and its cache (gdriver/resolver.py).

The scenarios (tests/resolver_scenarios.py) run in a process of their own inside a mount
namespace whose resolv.conf names a DNS server that never answers (tests/dns_support.py):
real getaddrinfo, real fork, real signals. Each prints its findings as one JSON line; the
tests assert on them.
"""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dns_support import SilentDns, namespaces_usable
from support import ROOT, Gearmand

from gdriver import codec, resolver
from gdriver.codec import Address
from gdriver.resolver import Resolver, Unresolved

SILENT = "gearmand.dns-drill.test"  # in no hosts file: goes to the silent DNS server
KNOWN = "gearmand.known.test"

needs_namespaces = pytest.mark.skipif(
    namespaces_usable() is not None, reason=str(namespaces_usable())
)


# -- pure logic ----------------------------------------------------------------------------------
def test_numeric_hosts_are_parsed_without_a_resolver():
    assert resolver.numeric("127.0.0.1", 4730) == [
        Address(socket.AF_INET, socket.IPPROTO_TCP, ("127.0.0.1", 4730))
    ]
    six = resolver.numeric("::1", 4730)
    assert six is not None and six[0].family == socket.AF_INET6 and six[0].sockaddr[:2] == (
        "::1", 4730,
    )  # fmt: skip
    assert resolver.numeric("localhost", 4730) is None
    assert resolver.numeric("bad\u2603name", 4730) is None
    r = Resolver()  # never started: a numeric lookup must not need it
    assert r.lookup("127.0.0.1", 4730)[0].sockaddr == ("127.0.0.1", 4730)
    assert r.entries == {} and r.pid == 0


def test_update_messages_round_trip_into_a_worker_process_cache():
    supervisor = Resolver()
    supervisor.entries[("a.test", 1)] = entry = resolver._Entry(time.monotonic())
    entry.addrs = [
        Address(socket.AF_INET6, 6, ("2001:db8::1", 1, 0, 0)),
        Address(socket.AF_INET, 6, ("192.0.2.1", 1)),
    ]
    worker = Resolver()
    worker.owner = -1  # as in a forked worker process: only the cache is used
    for message in supervisor.messages():
        assert message.startswith(resolver.UPDATE_TAG)
        worker.apply(message)
    assert worker.lookup("a.test", 1) == entry.addrs
    with pytest.raises(Unresolved) as info:
        worker.lookup("b.test", 1)  # unknown: never blocks, never asks anyone
    assert worker.sock is None
    assert codec.error_text(info.value) == ("cannot resolve host: no answer from the resolver yet")
    worker.apply(resolver.update_message("b.test", 1, [], "Name or service not known"))
    with pytest.raises(Unresolved, match="Name or service not known"):
        worker.lookup("b.test", 1)
    worker.apply(b"A{garbage")  # ignored
    worker.apply(resolver.update_message("a.test", 1, [], "timeout"))  # keeps what it knew
    assert worker.lookup("a.test", 1) == entry.addrs


def test_structured_records_are_made_by_log_event_only():
    """Structured records are made in one place (gdriver.logs.log_event): no other module
    passes ``extra={"event": ...}``, nor an ``extra`` dict built beforehand."""
    found = []
    for path in sorted((ROOT / "gdriver").glob("*.py")):
        calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
        for call in calls:
            for kw in call.keywords:
                keys = getattr(kw.value, "keys", [])
                event = any(isinstance(k, ast.Constant) and k.value == "event" for k in keys)
                if kw.arg == "extra" and (event or isinstance(kw.value, ast.Name)):
                    found.append(f"{path.name}:{call.lineno}")
    own = ast.parse((ROOT / "gdriver" / "logs.py").read_text())
    log_event = next(n for n in own.body if getattr(n, "name", "") == "log_event")
    assert found == [f"logs.py:{log_event.end_lineno}"]  # log_event itself


# -- scenarios, run in the namespace ----------------------------------------------------------
def run_scenario(tmp_path: Path, name: str, **options: Any) -> tuple[dict[str, Any], SilentDns]:
    dns = SilentDns(tmp_path, timeout=options.pop("dns_timeout", 30))
    dns.set_hosts(f"127.0.0.9 {KNOWN}\n")
    code = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; "
        f"import resolver_scenarios as s; s.scenario_{name}()"
    )
    try:
        proc = subprocess.run(
            dns.wrap([sys.executable, "-c", code]),
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        dns.received()
    finally:
        dns.close()
    return json.loads(proc.stdout.strip().splitlines()[-1]), dns


@needs_namespaces
def test_a_name_the_dns_never_answers_costs_nothing_and_fails_after_the_timeout(tmp_path):
    out, dns = run_scenario(tmp_path, "silent_name")
    found, error, seconds = out["first"]
    assert found == [] and seconds < 0.5  # from the cache (not known yet), not the DNS's 30 s
    assert error == "cannot resolve host: no answer from the resolver yet"
    assert out["known"][:2] == [["127.0.0.9"], None]  # /etc/hosts names still resolve
    assert out["later"][1] == "cannot resolve host: no answer from the resolver within 1s"
    assert out["later"][2] < 0.5
    assert out["failures"] == {f"{SILENT}:4730": 1.0}  # one lookup timed out; KNOWN none
    assert out["known_later"][:2] == [["127.0.0.9"], None]
    assert out["longest_turn"] < 0.5  # the loop never waited on the resolver
    assert out["numeric_entries"][0][:2] == [["127.0.0.1"], None]
    assert out["numeric_entries"][1] is False
    assert dns.received() >= 1  # the name really went to the DNS server


@needs_namespaces
def test_a_killed_resolver_process_is_restarted_and_reaped(tmp_path):
    out, _ = run_scenario(tmp_path, "restart")
    assert out == {"restarted": True, "answered": True, "restarts": 1, "reaped": True,
                   "alive": True, "counted": 1.0, "closed": True}  # fmt: skip


@needs_namespaces
def test_dns_changes_are_followed_and_an_outage_keeps_the_last_addresses(tmp_path):
    out, _ = run_scenario(tmp_path, "changes")
    assert out["before"] == ["127.0.0.9"]
    assert out["followed"] is True
    assert [sa[0] for _, _, sa in out["changes"][0]] == ["127.0.0.9"]
    assert [sa[0] for _, _, sa in out["changes"][-1]] == ["127.0.0.10"]
    assert out["failed"] is True
    assert out["kept"][:2] == [["127.0.0.10"], None]  # the outage does not take the server away


@needs_namespaces
def test_a_lookup_that_never_returns_gets_the_resolver_process_replaced(tmp_path):
    out, _ = run_scenario(tmp_path, "stuck", dns_timeout=30)
    assert out["restarted"] and out["answered"] and out["old_gone"]
    assert out["longest_turn"] < 1.5  # the restart reaps a SIGKILLed process: quick


def pid_namespaces_usable() -> str | None:
    """None when a PID namespace of our own (with its /proc) can be made here, else why not."""
    if namespaces_usable() is not None:
        return namespaces_usable()
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "true"], capture_output=True
    )
    if probe.returncode != 0:
        return f"unshare --pid refused: {probe.stderr.decode().strip()}"
    return None


@pytest.mark.skipif(pid_namespaces_usable() is not None, reason=str(pid_namespaces_usable()))
def test_a_supervisor_whose_resolver_process_dies_restarts_it_and_kills_nothing_else(
    fresh_gearmand: Gearmand, tmp_path: Path
) -> None:
    code = (
        f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; "
        f"import resolver_scenarios as s; s.scenario_supervisor({fresh_gearmand.address!r})"
    )
    # sh stays the namespace's PID 1 (the supervisor is never PID 1); --kill-child: when
    # unshare is stopped, everything in the namespace goes with it
    command = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
               "sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", code]  # fmt: skip
    try:
        proc = subprocess.run(command, capture_output=True, timeout=30, cwd=tmp_path)
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:  # unshare killed, and the namespace with it
        stdout, stderr, code = exc.stdout or b"", exc.stderr or b"", None
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.startswith("{")]
    found = [line for line in lines if "others" in line]  # not the workers' log records
    stopped = [line for line in lines if "longest_turn" in line]
    assert found, stderr.decode()[-3000:]
    out = found[0]
    assert out["replacement"] == [out["resolver"]]  # the PID really was given again
    assert out["exits"] == [out["victim"]]  # the only worker process that died
    assert out["others_alive"] == [True, True] and all(out["procs_alive"])
    assert out["restarted"] and out["resolver_alive"] and out["answers"]
    assert len(out["restart_records"]) == 1, out["restart_records"]
    assert out["restart_records"][0] == "resolver process: killed by SIGKILL; restarting it"
    assert out["restarts_metric"] == ["gdriver_resolver_restarts_total 1.0"]
    assert code == 0 and stopped, "the supervisor did not stop: " + stderr.decode()[-2000:]
    assert stopped[0]["status"] == 0
    assert stopped[0]["longest_turn"] < 0.5  # generous: the supervisor never waits for a process


def test_a_start_without_a_free_descriptor_is_retried_later():
    # socketpair fails with EMFILE: no exception escapes, the restart is scheduled
    import contextlib
    import os
    import resource

    r = Resolver()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    try:
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))) + 32, hard)
        )
        with contextlib.suppress(OSError):
            for _ in range(1000):
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        r.start()
        assert r.sock is None and r.pid == 0 and r.restarts == 1
        assert r.restart_at > time.monotonic()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        r.close()
