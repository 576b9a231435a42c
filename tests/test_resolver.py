"""The resolver process and its cache (gdriver/resolver.py).

The scenarios (tests/resolver_scenarios.py) run in a process of their own inside a mount
namespace whose resolv.conf names a DNS server that never answers (tests/dns_support.py):
real getaddrinfo, real fork, real signals. Each prints its findings as one JSON line; the
tests assert on them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dns_support import SilentDns, namespaces_usable
from support import ROOT

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
    assert found == [] and seconds < 0.05  # answered from the cache: not known yet
    assert error == "cannot resolve host: no answer from the resolver yet"
    assert out["known"][:2] == [["127.0.0.9"], None]  # /etc/hosts names still resolve
    assert out["later"][1] == "cannot resolve host: no answer from the resolver within 1s"
    assert out["later"][2] < 0.05
    assert out["known_later"][:2] == [["127.0.0.9"], None]
    assert out["longest_turn"] < 0.5  # the loop never waited on the resolver
    assert out["numeric_entries"][0][:2] == [["127.0.0.1"], None]
    assert out["numeric_entries"][1] is False
    assert dns.received() >= 1  # the name really went to the DNS server


@needs_namespaces
def test_a_killed_resolver_process_is_restarted_and_reaped(tmp_path):
    out, _ = run_scenario(tmp_path, "restart")
    assert out == {"restarted": True, "answered": True, "restarts": 1, "reaped": True,
                   "alive": True, "closed": True}  # fmt: skip


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
