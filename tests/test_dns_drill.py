"""Drill: one gearmand name whose DNS server never answers, beside a healthy gearmand.

gdriver runs in a mount namespace whose resolv.conf names a silent UDP socket on loopback
(tests/dns_support.py), so looking up ``gearmand.dns-drill.test`` waits on a real resolver
that never replies. Nothing else may notice: /healthz and the console answer at once, the
workers serve the healthy server, a burst of background jobs runs at full speed.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest
from dns_support import SilentDns, namespaces_usable
from support import HOST, Gdriver, Gearmand, submit_background, wait_for

SILENT = "gearmand.dns-drill.test"
JOBS = 200

pytestmark = pytest.mark.skipif(namespaces_usable() is not None, reason=str(namespaces_usable()))


class NamespacedGdriver(Gdriver):
    def __init__(self, dns: SilentDns, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.dns = dns

    def command(self) -> list[str]:
        return self.dns.wrap(super().command())


def timed_healthz(port: int) -> float:
    start = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=5) as r:
            r.read()
    except (urllib.error.URLError, OSError):
        return 5.0
    return time.monotonic() - start


def timed_console(g: Gdriver) -> float:
    start = time.monotonic()
    try:
        g.console("status", timeout=5)
    except (OSError, AssertionError, IndexError):  # no complete reply in time
        return 5.0
    return time.monotonic() - start


def test_a_name_whose_dns_never_answers_stalls_neither_supervisor_nor_workers(
    fresh_gearmand: Gearmand, tmp_path
):
    dns = SilentDns(tmp_path)  # timeout:30 attempts:5: one getaddrinfo waits minutes
    ledger = tmp_path / "ledger"
    config = {"worker_options": {"Drill": {"ledger": str(ledger)}}, "interval": 1}
    servers = f"{SILENT}:4730,{fresh_gearmand.address}"
    g = NamespacedGdriver(dns, servers, "--namespaces", "drill.jobs", config=config, metrics=True)
    worst_http = worst_console = 0.0
    g.start()
    try:
        # the four drill.count processes register on the healthy server
        wait_for(lambda: fresh_gearmand.workers_for("drill.count") >= 4, 15)
        submit_background(fresh_gearmand.address, "drill.count", [str(i) for i in range(JOBS)])
        start = time.monotonic()
        done_after = None
        # probe for 8 s: several polls, and past the resolver's 5 s lookup timeout
        while time.monotonic() - start < 8:
            worst_http = max(worst_http, timed_healthz(g.metrics_port))
            worst_console = max(worst_console, timed_console(g))
            if done_after is None and ledger.exists() and len(ledger.read_text().split()) >= JOBS:
                done_after = time.monotonic() - start
            time.sleep(0.05)
        failed = [r for r in g.records() if r.get("event") == "resolve_failed"]
        queries = dns.received()
    finally:
        g.stop()
        dns.close()
    assert queries >= 1  # the name really went to the silent DNS server
    assert worst_http < 1.0, f"/healthz took {worst_http:.2f}s"
    assert worst_console < 1.0, f"the console took {worst_console:.2f}s"
    assert done_after is not None and done_after < 5.0, f"{JOBS} jobs took {done_after}s"
    assert len(failed) == 1 and failed[0]["server"] == f"{SILENT}:4730"  # one record, no flood


def test_workers_follow_a_name_that_moves_to_the_gearmand(fresh_gearmand: Gearmand, tmp_path):
    dns = SilentDns(tmp_path)
    moving = "gearmand.moving.test"
    dns.set_hosts(f"127.0.0.2 {moving}\n")  # nothing listens there: refused
    port = fresh_gearmand.port
    g = NamespacedGdriver(dns, f"{moving}:{port}", "--namespaces", "drill.jobs",
                          config={"interval": 1})  # fmt: skip
    g.start()
    try:
        time.sleep(1.5)
        assert fresh_gearmand.workers_for("drill.echo") == 0
        dns.set_hosts(f"127.0.0.1 {moving}\n")
        # the failed polls make the supervisor look again; the workers get the new address
        wait_for(lambda: fresh_gearmand.workers_for("drill.count") >= 4, 15)
    finally:
        g.stop()
        dns.close()
