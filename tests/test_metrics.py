"""The HTTP endpoint: /metrics scraped over real HTTP and parsed with prometheus_client's
parsers (and promtool when installed), /healthz and /readyz against a live, a stopped and a
silent gearmand."""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any

import pytest
import yaml
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from support import (
    HOST,
    Gdriver,
    Gearmand,
    console_command,
    do,
    free_port,
    port_open,
    running,
    submit_background,
    wait_for,
)

M = "obs.metered.Metered."
SLOW, OUTCOMES = M + "slow", M + "outcomes"
OK, BAD, BOOM = M + "ok", M + "bad_result", M + "boom"


def request(
    d: Gdriver, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(HOST, d.metrics_port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, Any], Samples]:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples: Samples = {}
    for fam in families.values():
        for s in fam.samples:
            assert "job" not in s.labels, s  # Prometheus's own label: never ours
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return families, samples


def scrape(d: Gdriver) -> tuple[dict[str, Any], Samples]:
    status, headers, body = request(d, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    return parse(body.decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def metric(d: Gdriver, name: str, **labels: str) -> float | None:
    return value(scrape(d)[1], name, **labels)


def ready(d: Gdriver) -> bool:
    return request(d, "/readyz")[0] == 200


def polled(d: Gdriver) -> bool:
    """The observer has polled gearmand at least once (the desired gauges exist)."""
    return bool(metric(d, "gdriver_observer_poll_duration_seconds_count"))


def serving(d: Gdriver) -> Gdriver:
    wait_for(lambda: port_open(d.metrics_port), timeout=10)
    return d


# -- the contract ------------------------------------------------------------------------------


GAUGES_BY_JOB = ("gdriver_processes", "gdriver_processes_busy", "gdriver_processes_min",
                 "gdriver_processes_max", "gdriver_processes_desired")  # fmt: skip
GAUGES_BY_FUNCTION = ("gdriver_queue_jobs", "gdriver_queue_running_jobs", "gdriver_queue_workers")


def test_metric_contract(gearmand: Gearmand) -> None:
    from gdriver import __version__

    with running(gearmand, "--namespaces", "obs.metered", "--interval", "1", metrics=True) as d:
        serving(d)
        wait_for(lambda: ready(d) and polled(d), timeout=15)
        for fn, n in ((OK, 1), (BAD, 2), (BOOM, 3)):
            for _ in range(n):
                do(gearmand.address, fn)
        # the last job's end may still be unread by the supervisor when the client has its result
        busy = {"job_name": OUTCOMES}
        wait_for(lambda: metric(d, "gdriver_processes_busy", **busy) == 0, timeout=5)
        fams, s = scrape(d)

        for name in GAUGES_BY_JOB:
            assert fams[name].type == "gauge", name
            assert {x.labels["job_name"] for x in fams[name].samples} == {SLOW, OUTCOMES}, name
            assert all(set(x.labels) == {"job_name"} for x in fams[name].samples), name
        assert value(s, "gdriver_processes", job_name=OUTCOMES) == 1
        assert value(s, "gdriver_processes_busy", job_name=OUTCOMES) == 0
        assert value(s, "gdriver_processes_min", job_name=OUTCOMES) == 1
        assert value(s, "gdriver_processes_max", job_name=OUTCOMES) == 1
        assert value(s, "gdriver_processes_desired", job_name=OUTCOMES) == 1
        assert value(s, "gdriver_processes", job_name=SLOW) == 0
        assert value(s, "gdriver_processes_min", job_name=SLOW) == 0
        assert value(s, "gdriver_processes_max", job_name=SLOW) == 3

        for name in GAUGES_BY_FUNCTION:
            assert fams[name].type == "gauge", name
            assert all(set(x.labels) == {"function"} for x in fams[name].samples), name

        # the functions gearmand reports of our module (served or watched by default), no
        # other: the session's gearmand also lists every other test's functions
        def functions() -> set[str]:
            families = scrape(d)[0]
            by_gauge = [
                {x.labels["function"] for x in families[n].samples} for n in GAUGES_BY_FUNCTION
            ]
            return by_gauge[0] if by_gauge[0] == by_gauge[1] == by_gauge[2] else set()

        ours = {fn for fn in gearmand.status() if fn.startswith("obs.metered.")}
        wait_for(lambda: functions() == ours, timeout=5)
        assert {OK, BAD, BOOM} <= functions()
        assert fams["gdriver_function_info"].type == "gauge"
        info = {(x.labels["job_name"], x.labels["function"]) for x in
                fams["gdriver_function_info"].samples if x.value == 1}  # fmt: skip
        assert info == {(SLOW, SLOW), (OUTCOMES, OK), (OUTCOMES, BAD), (OUTCOMES, BOOM)}
        assert value(s, "gdriver_queue_workers", function=OK) == 1
        assert value(s, "gdriver_queue_jobs", function=OK) == 0

        assert fams["gdriver_jobs"].type == "counter"
        for fn, outcome, n in ((OK, "complete", 1), (BAD, "fail", 2), (BOOM, "exception", 3)):
            labels = {"job_name": OUTCOMES, "function": fn}
            assert value(s, "gdriver_jobs_total", outcome=outcome, **labels) == n, fn
            assert value(s, "gdriver_job_duration_seconds_count", **labels) == n, fn
            assert value(s, "gdriver_job_duration_seconds_bucket", le="+Inf", **labels) == n
        assert fams["gdriver_job_duration_seconds"].type == "histogram"
        outcomes = {x.labels["outcome"] for x in fams["gdriver_jobs"].samples}
        assert outcomes == {"complete", "fail", "exception"}

        assert fams["gdriver_scaling_decisions"].type == "counter"
        up_min = {"job_name": OUTCOMES, "direction": "up", "reason": "min"}
        assert value(s, "gdriver_scaling_decisions_total", **up_min) == 1
        assert value(s, "gdriver_process_starts_total", job_name=OUTCOMES) == 1
        assert value(s, "gdriver_gearmand_up", server=gearmand.address) == 1
        assert fams["gdriver_observer_poll_duration_seconds"].type == "histogram"
        assert value(s, "gdriver_observer_poll_duration_seconds_count")
        assert value(s, "gdriver_build_info", version=__version__) == 1
        # the default process and platform metrics
        assert value(s, "process_resident_memory_bytes")
        assert value(s, "process_open_fds")
        assert "python_info" in fams

        # a console kill: one exit (graceful: retired), one start to get back to min
        pid = int(console_command(d.console_port, f"show {OUTCOMES}")[1])
        assert console_command(d.console_port, f"kill {pid}") == ["OK"]
        exits = {"job_name": OUTCOMES, "reason": "retired"}
        wait_for(lambda: metric(d, "gdriver_process_exits_total", **exits) == 1, timeout=10)
        wait_for(lambda: metric(d, "gdriver_process_starts_total", job_name=OUTCOMES) == 2, 10)
        assert metric(d, "gdriver_scaling_decisions_total", **up_min) == 2

        # OpenMetrics when asked
        status, headers, body = request(
            d, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert status == 200
        assert headers["content-type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        om = {f.name: f for f in openmetrics_families(body.decode())}
        assert om["gdriver_jobs"].type == "counter"
        assert any(
            x.name == "gdriver_jobs_total" and x.labels.get("outcome") == "fail" and x.value == 2
            for x in om["gdriver_jobs"].samples
        )
        assert all("job" not in x.labels for f in om.values() for x in f.samples)

        # HEAD, unknown paths and methods
        status, headers, body = request(d, "/metrics", "HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 1000
        assert request(d, "/nope")[0] == 404
        assert request(d, "/metrics", "POST")[0] == 405
        status, _, body = request(d, "/healthz")
        assert (status, body) == (200, b"ok\n")

        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool is not installed (Debian package prometheus)")
        text = request(d, "/metrics")[2]
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr


def test_backlog_moves_the_gauges(fresh_gearmand: Gearmand) -> None:
    g = fresh_gearmand
    nobody = "obs.metered.Nobody.serves"  # our module's neighbour: watched by default
    with running(g, "--namespaces", "obs.metered", "--interval", "1", metrics=True) as d:
        serving(d)
        wait_for(lambda: ready(d) and polled(d), timeout=15)
        s = scrape(d)[1]
        assert value(s, "gdriver_processes_desired", job_name=SLOW) == 0
        assert not value(s, "gdriver_queue_jobs", function=SLOW)  # nothing waits yet
        submit_background(g.address, nobody, [b"x"] * 3)
        submit_background(g.address, SLOW, [b"1.0"] * 6)
        seen: dict[str, float] = {"queue": 0, "desired": 0, "busy": 0, "processes": 0}
        backlog = {"job_name": SLOW, "direction": "up", "reason": "backlog"}
        idle = {"job_name": SLOW, "direction": "down", "reason": "idle"}

        def drained() -> bool:
            s = scrape(d)[1]
            for key, name, labels in (
                ("queue", "gdriver_queue_jobs", {"function": SLOW}),
                ("desired", "gdriver_processes_desired", {"job_name": SLOW}),
                ("busy", "gdriver_processes_busy", {"job_name": SLOW}),
                ("processes", "gdriver_processes", {"job_name": SLOW}),
            ):
                seen[key] = max(seen[key], value(s, name, **labels) or 0)
            done = value(s, "gdriver_jobs_total", job_name=SLOW, function=SLOW, outcome="complete")
            return (
                done == 6
                and (value(s, "gdriver_scaling_decisions_total", **idle) or 0) >= 1
                and value(s, "gdriver_processes_desired", job_name=SLOW) == 0
                and value(s, "gdriver_processes", job_name=SLOW) == 0
                and value(s, "gdriver_queue_jobs", function=SLOW) == 0
            )

        wait_for(drained, timeout=40, interval=0.2)
        s = scrape(d)[1]
        up = value(s, "gdriver_scaling_decisions_total", **backlog)
        assert up is not None and 1 <= up <= 6
        assert value(s, "gdriver_process_starts_total", job_name=SLOW) == up
        assert value(s, "gdriver_process_exits_total", job_name=SLOW, reason="retired") == up
        assert seen["queue"] >= 1
        assert 1 <= seen["desired"] <= 3 and 1 <= seen["processes"] <= 3
        assert seen["busy"] >= 1
        assert value(s, "gdriver_job_duration_seconds_count", job_name=SLOW, function=SLOW) == 6
        assert value(s, "gdriver_job_duration_seconds_bucket", job_name=SLOW, function=SLOW,
                     le="0.5") == 0  # fmt: skip
        # jobs for a function nobody serves
        assert value(s, "gdriver_unknown_function_jobs", function=nobody) == 3
        assert value(s, "gdriver_queue_jobs", function=nobody) == 3
        assert value(s, "gdriver_queue_workers", function=nobody) == 0
        assert value(s, "gdriver_unknown_function_jobs", function=SLOW) is None
        record = d.wait_log(lambda r: r.get("event") == "unknown_function")
        assert record["function"] == nobody and record["count"] == 3


def test_readyz_follows_gearmand() -> None:
    port = free_port()
    g = Gearmand(port)
    address = f"{HOST}:{port}"
    with running(address, "--namespaces", "obs.metered", "--interval", "1", metrics=True) as d:
        try:
            serving(d)
            # no gearmand yet: alive, not ready
            wait_for(lambda: polled(d), timeout=10)
            status, _, body = request(d, "/readyz")
            assert status == 503
            reason = body.decode()
            assert reason.endswith("\n") and 0 < len(reason.strip()) < 200, reason
            assert "\n" not in reason.strip()
            assert request(d, "/healthz")[:3:2] == (200, b"ok\n")
            assert metric(d, "gdriver_gearmand_up", server=address) == 0
            g.start()
            wait_for(lambda: ready(d), timeout=15, interval=0.2)
            assert request(d, "/readyz")[2] == b"ok\n"
            wait_for(lambda: metric(d, "gdriver_gearmand_up", server=address) == 1, timeout=10)
            g.stop()
            wait_for(lambda: request(d, "/readyz")[0] == 503, timeout=15, interval=0.2)
            for _ in range(5):
                assert request(d, "/healthz")[0] == 200
                time.sleep(0.2)
            wait_for(lambda: metric(d, "gdriver_gearmand_up", server=address) == 0, timeout=10)
        finally:
            g.stop()


def test_healthz_with_a_gearmand_that_never_answers() -> None:
    """A peer that accepts connections and says nothing: the loop must keep ticking."""
    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(64)
        address = f"{HOST}:{silent.getsockname()[1]}"
        # jobs of min 0 only: no worker process waits on the silent peer at shutdown
        with running(address, "--namespaces", "obs.console", "--interval", "1",
                     metrics=True) as d:  # fmt: skip
            serving(d)
            wait_for(lambda: polled(d), timeout=10)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                status, _, body = request(d, "/healthz")
                assert (status, body) == (200, b"ok\n")
                assert time.monotonic() - t0 < 2.5
                status, _, body = request(d, "/readyz")
                assert (status, body) == (503, b"no gearmand answers\n")
                time.sleep(0.3)
            assert metric(d, "gdriver_gearmand_up", server=address) == 0


# -- queue series: only what answers, only what concerns us -------------------------------------


QUEUE_SERIES = (*GAUGES_BY_FUNCTION, "gdriver_unknown_function_jobs")
GONE = "obs.metered.Gone.run"  # nobody serves it; our module's neighbour, so watched
CONSOLE = "obs.console.Console."
PAIRS = {(SLOW, SLOW), (OUTCOMES, OK), (OUTCOMES, BAD), (OUTCOMES, BOOM)}


def queue_series(d: Gdriver) -> dict[tuple[str, str], float]:
    return {(name, dict(labels)["function"]): v for (name, labels), v in scrape(d)[1].items()
            if name in QUEUE_SERIES}  # fmt: skip


def function_pairs(d: Gdriver) -> set[tuple[str, str]]:
    samples = scrape(d)[0]["gdriver_function_info"].samples
    assert all(x.value == 1 for x in samples)
    return {(x.labels["job_name"], x.labels["function"]) for x in samples}


def test_queue_series_follow_the_servers_that_answer() -> None:
    """A server that stops answering takes its part of the queue gauges with it, from the
    round that failed; none answering: no queue series at all; back: series back."""
    a = Gearmand().start()
    b = Gearmand()
    try:
        b.start()
        servers = f"{a.address},{b.address}"
        with running(servers, "--namespaces", "obs.metered", "--interval", "1",
                     metrics=True) as d:  # fmt: skip
            serving(d)
            wait_for(lambda: ready(d) and polled(d), timeout=15)
            submit_background(a.address, GONE, [b"x"] * 3)
            submit_background(b.address, GONE, [b"x"] * 5)
            wait_for(lambda: metric(d, "gdriver_unknown_function_jobs", function=GONE) == 8, 10)
            # the outcomes process registered on both servers
            wait_for(lambda: metric(d, "gdriver_queue_workers", function=OK) == 2, 10)

            b.stop()
            wait_for(lambda: metric(d, "gdriver_gearmand_up", server=b.address) == 0, 10)
            s = scrape(d)[1]  # the round that found b down also set the queue gauges
            assert value(s, "gdriver_gearmand_up", server=a.address) == 1
            assert value(s, "gdriver_unknown_function_jobs", function=GONE) == 3
            assert value(s, "gdriver_queue_jobs", function=GONE) == 3
            assert value(s, "gdriver_queue_workers", function=OK) == 1

            a.stop()
            wait_for(lambda: metric(d, "gdriver_gearmand_up", server=a.address) == 0, 10)
            polls = metric(d, "gdriver_observer_poll_duration_seconds_count") or 0
            assert queue_series(d) == {}
            # and so it stays, round after round, for the whole outage
            wait_for(lambda: metric(d, "gdriver_observer_poll_duration_seconds_count") >= polls + 2,
                     timeout=10)  # fmt: skip
            assert queue_series(d) == {}
            assert request(d, "/readyz")[0] == 503

            a.start()
            b.start()
            submit_background(b.address, GONE, [b"x"] * 2)
            wait_for(lambda: metric(d, "gdriver_unknown_function_jobs", function=GONE) == 2, 15)
            wait_for(lambda: metric(d, "gdriver_queue_workers", function=OK) == 2, 15)
            assert metric(d, "gdriver_queue_jobs", function=OK) == 0
    finally:
        a.stop()
        b.stop()


def test_function_info_and_buckets(fresh_gearmand: Gearmand) -> None:
    """gdriver_function_info pairs every job with its functions (process groups too) and
    follows a reload; duration_buckets shapes the histogram and waits for a restart."""
    g = fresh_gearmand
    config = {"namespaces": ["obs.metered", "obs.console"], "interval": 1,
              "duration_buckets": [0.5, 1, 2]}  # fmt: skip
    with running(g, config=config, metrics=True) as d:
        serving(d)
        wait_for(lambda: ready(d) and polled(d), timeout=15)
        console_pairs = {(CONSOLE + m, CONSOLE + m) for m in ("ping", "pong")}
        assert function_pairs(d) == PAIRS | console_pairs
        do(g.address, OK)
        labels = {"job_name": OUTCOMES, "function": OK}
        wait_for(lambda: metric(d, "gdriver_job_duration_seconds_count", **labels) == 1, 10)
        buckets = scrape(d)[0]["gdriver_job_duration_seconds"].samples
        bounds = [x.labels["le"] for x in buckets if x.name.endswith("_bucket")]
        assert bounds == ["0.5", "1.0", "2.0", "+Inf"]

        config.update(namespaces=["obs.metered"], duration_buckets=[1, 2])
        (d.tmp / "config.yml").write_text(yaml.safe_dump(config))
        os.kill(d.pid, signal.SIGHUP)
        d.wait_log(lambda r: r.get("event") == "reloaded", 10)
        wait_for(lambda: function_pairs(d) == PAIRS, timeout=10)
        warned = d.wait_log(lambda r: "take effect at the next start" in r.get("message", ""))
        assert "duration_buckets" in warned["message"]
        buckets = scrape(d)[0]["gdriver_job_duration_seconds"].samples
        assert [x.labels["le"] for x in buckets if x.name.endswith("_bucket")] == bounds


def test_other_teams_functions_stay_out(fresh_gearmand: Gearmand) -> None:
    """On a shared gearmand, a function outside watch_functions (default: our modules) has
    no series and raises no warning, however long its backlog; watched, it is unknown."""
    g = fresh_gearmand
    foreign = "billing.invoices.Invoices.render"
    submit_background(g.address, foreign, [b"x"] * 7)
    submit_background(g.address, GONE, [b"x"] * 2)
    config: dict[str, Any] = {"namespaces": ["obs.metered"], "interval": 1}
    with running(g, config=config, metrics=True) as d:
        serving(d)
        wait_for(lambda: metric(d, "gdriver_unknown_function_jobs", function=GONE) == 2, 15)
        assert {fn for _, fn in queue_series(d)} <= {SLOW, OK, BAD, BOOM, GONE}
        text = request(d, "/metrics")[2].decode()
        assert foreign not in text
        warned = [r for r in d.records() if r.get("event") == "unknown_function"]
        assert [r["function"] for r in warned] == [GONE]

        config["watch_functions"] = ["billing.*.Invoices.*", "obs.metered."]
        (d.tmp / "config.yml").write_text(yaml.safe_dump(config))
        os.kill(d.pid, signal.SIGHUP)
        wait_for(lambda: metric(d, "gdriver_unknown_function_jobs", function=foreign) == 7, 10)
        assert metric(d, "gdriver_queue_jobs", function=foreign) == 7
        assert metric(d, "gdriver_unknown_function_jobs", function=GONE) == 2
        d.wait_log(lambda r: r.get("event") == "unknown_function" and r["function"] == foreign)
