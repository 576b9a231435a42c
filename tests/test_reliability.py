"""Reliability drills: do the bad thing to a real gdriver and a real gearmand, and count."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import gearman
import pytest
import yaml
from support import (
    HOST,
    ROOT,
    WORKERS,
    Gdriver,
    Gearmand,
    console_raw,
    do,
    free_port,
    http_status,
    pid_alive,
    submit_background,
    wait_for,
)

NS = ("--namespaces", "drill.jobs")


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=3) as r:
        text = r.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def pids_of(g: Gdriver, job_name: str) -> list[int]:
    return [int(x) for x in g.console(f"show {job_name}")[1:]]


def registered(gd: Gearmand, function: str, n: int) -> bool:
    return gd.workers_for(function) >= n


# -- 1. graceful drain, zero loss ----------------------------------------------------------------
def test_drain_loses_nothing_and_restart_finishes_the_rest(fresh_gearmand: Gearmand, tmp_path):
    ledger = tmp_path / "ledger"
    total = 1000
    submit_background(fresh_gearmand.address, "drill.count", [str(i) for i in range(total)])
    config = {"worker_options": {"Drill": {"ledger": str(ledger)}}, "graceful_timeout": 20}
    g = Gdriver(fresh_gearmand, *NS, config=config).start()
    try:
        wait_for(lambda: len(lines(ledger)) >= 250, timeout=30)
    finally:
        rc = g.stop()
    assert rc == 0
    assert not any(r.get("event") == "drain_timeout" for r in g.records())
    done = lines(ledger)
    waiting = fresh_gearmand.status().get("drill.count", (0, 0, 0))[0]
    assert 0 < len(done) < total, "the drill needs SIGTERM to land mid-way"
    assert len(done) + waiting == total  # nothing lost, nothing run twice
    g2 = Gdriver(fresh_gearmand, *NS, config=config).start()
    try:
        wait_for(lambda: len(lines(ledger)) >= total, timeout=60)
        wait_for(lambda: fresh_gearmand.status().get("drill.count", (0, 0, 0))[0] == 0, 10)
    finally:
        assert g2.stop() == 0
    done = lines(ledger)
    assert len(done) == total
    assert sorted(map(int, done)) == list(range(total))  # every job exactly once


# -- 2. reload on HUP ----------------------------------------------------------------------------
def test_hup_reloads_and_rolls_processes_without_dropping_jobs(fresh_gearmand, tmp_path):
    ledger = tmp_path / "ledger"
    config = {
        "worker_options": {"Drill": {"ledger": str(ledger), "flavour": "old"}},
        "job_runtime_attributes": {"drill.jobs.Drill.pid": {"min_processes": 1}},
        "interval": 1,
    }
    env = {"NOTIFY_SOCKET": ""}
    g = Gdriver(fresh_gearmand, *NS, config=config, env=env).start()
    try:
        wait_for(lambda: registered(fresh_gearmand, "drill.pid", 1), 15)
        assert do(fresh_gearmand.address, "drill.pid").result.endswith(b" old")
        submit_background(fresh_gearmand.address, "drill.count", [str(i) for i in range(300)])
        cfg_path = g.tmp / "config.yml"
        config["worker_options"]["Drill"]["flavour"] = "new"
        config["job_runtime_attributes"]["drill.jobs.Drill.pid"] = {
            "min_processes": 2,
            "max_processes": 2,
        }
        cfg_path.write_text(yaml.safe_dump(config))
        os.kill(g.pid, signal.SIGHUP)
        g.wait_log(lambda r: r.get("event") == "reloaded", 10)
        wait_for(lambda: len(pids_of(g, "drill.pid")) == 2, 15)
        wait_for(lambda: do(fresh_gearmand.address, "drill.pid").result.endswith(b" new"), 20)
        wait_for(lambda: len(lines(ledger)) >= 300, 30)
        assert sorted(map(int, lines(ledger))) == list(range(300))  # none dropped, none twice
        pid_line = next(x for x in g.console("status") if x.startswith("drill.pid "))
        assert pid_line.split()[1:4] == ["2", "2", "2"]
        # an invalid new configuration is refused and the running one stays
        cfg_path.write_text("interval: -3\n")
        os.kill(g.pid, signal.SIGHUP)
        rec = g.wait_log(lambda r: r.get("event") == "reload_failed", 10)
        assert "interval" in rec["message"]
        assert do(fresh_gearmand.address, "drill.pid").result.endswith(b" new")
        assert len(pids_of(g, "drill.pid")) == 2
    finally:
        assert g.stop() == 0


# -- 3. crash-loop guard -------------------------------------------------------------------------
def test_crash_loop_backs_off_and_recovers(fresh_gearmand, tmp_path):
    flag = tmp_path / "crash"
    flag.write_text("1")
    config = {"worker_options": {"Fragile": {"crash_flag": str(flag)}}}
    g = Gdriver(fresh_gearmand, *NS, config=config, metrics=True).start()
    try:
        time.sleep(4)
        backoffs = [r for r in g.records() if r.get("event") == "crash_loop_backoff"]
        starts = [
            r
            for r in g.records()
            if r.get("event") == "process_started" and r.get("job_name") == "fragile.echo"
        ]
        assert len(backoffs) >= 3
        delays = [r["delay"] for r in backoffs]
        assert delays == sorted(delays) and delays[-1] > delays[0]  # exponential, not a storm
        assert len(starts) <= 8
        assert metric(g.metrics_port, "gdriver_crash_loop_backoffs_total", job_name="fragile.echo")
        # the other jobs are unaffected
        assert do(fresh_gearmand.address, "drill.echo", b"fine").result == b"fine"
        flag.unlink()
        wait_for(lambda: registered(fresh_gearmand, "fragile.echo", 1), 20)
        assert do(fresh_gearmand.address, "fragile.echo", b"back").result == b"back"
    finally:
        assert g.stop() == 0


# -- 4. recycling --------------------------------------------------------------------------------
def test_max_jobs_per_process_recycles_between_jobs(fresh_gearmand):
    g = Gdriver(fresh_gearmand, *NS, "--max_jobs_per_process", "5").start()
    try:
        wait_for(lambda: registered(fresh_gearmand, "drill.pid", 1), 15)
        seen: dict[str, int] = {}
        for _ in range(20):
            req = do(fresh_gearmand.address, "drill.pid")
            pid = req.result.split()[0].decode()
            seen[pid] = seen.get(pid, 0) + 1
        assert len(seen) >= 3
        assert max(seen.values()) <= 6  # 5 plus at most 10 % jitter (at least 1)
        assert any(r.get("reason") == "recycled" for r in g.records())
    finally:
        g.stop()


def test_max_process_lifetime_waits_for_the_current_job(fresh_gearmand):
    config = {"job_runtime_attributes": {"drill.jobs.Drill.pid": {"max_process_lifetime": 1}}}
    g = Gdriver(fresh_gearmand, *NS, config=config).start()
    try:
        wait_for(lambda: registered(fresh_gearmand, "drill.pid", 1), 15)
        first = do(fresh_gearmand.address, "drill.pid", b"2")  # outlives the lifetime
        assert first.complete and first.result.endswith(b"old")
        pid = first.result.split()[0]
        wait_for(lambda: do(fresh_gearmand.address, "drill.pid").result.split()[0] != pid, 15)
        assert any(r.get("reason") == "recycled" for r in g.records())
    finally:
        g.stop()


# -- 5. hung jobs --------------------------------------------------------------------------------
def test_hung_job_fails_and_its_process_is_replaced(fresh_gearmand):
    g = Gdriver(fresh_gearmand, *NS, metrics=True).start()
    try:
        wait_for(lambda: registered(fresh_gearmand, "drill.hang", 1), 15)
        before = pids_of(g, "drill.hang")
        req = do(fresh_gearmand.address, "drill.hang", b"x", timeout=15)
        assert req.complete and req.state == gearman.JOB_FAILED
        wait_for(lambda: (p := pids_of(g, "drill.hang")) and p != before, 15)
        wait_for(lambda: metric(g.metrics_port, "gdriver_job_timeouts_total") >= 1, 10)
        assert g.console("status")  # the supervisor still answers
    finally:
        g.stop()


# -- 6. gearmand outages -------------------------------------------------------------------------
def test_start_with_gearmand_down_then_ready_when_it_comes(tmp_path):
    port = free_port()
    g = Gdriver(f"{HOST}:{port}", *NS, metrics=True).start()
    gd = Gearmand(port)
    try:
        assert http_status(g.metrics_port, "/readyz") == 503
        assert http_status(g.metrics_port, "/healthz") == 200
        time.sleep(1.5)
        starts = [r for r in g.records() if r.get("event") == "process_started"]
        exits = [r for r in g.records() if r.get("event") == "process_exited"]
        assert not exits  # no crash loop while gearmand is away
        gd.start()
        wait_for(lambda: http_status(g.metrics_port, "/readyz") == 200, 10)
        assert do(gd.address, "drill.echo", b"up").result == b"up"
        assert len([r for r in g.records() if r.get("event") == "process_started"]) == len(starts)
    finally:
        g.stop()
        gd.stop()


def test_gearmand_restart_mid_run_workers_reconnect(fresh_gearmand):
    g = Gdriver(fresh_gearmand, *NS).start()
    try:
        wait_for(lambda: registered(fresh_gearmand, "drill.echo", 1), 15)
        assert do(fresh_gearmand.address, "drill.echo", b"a").result == b"a"
        fresh_gearmand.kill()
        time.sleep(0.5)
        fresh_gearmand.start()
        wait_for(lambda: registered(fresh_gearmand, "drill.echo", 1), 10)
        assert do(fresh_gearmand.address, "drill.echo", b"b").result == b"b"
        assert not [r for r in g.records() if r.get("event") == "process_exited"]
    finally:
        g.stop()


def test_one_of_two_servers_down_the_other_is_served(fresh_gearmand):
    down = free_port()
    g = Gdriver(f"{fresh_gearmand.address},{HOST}:{down}", *NS, metrics=True).start()
    try:
        wait_for(lambda: registered(fresh_gearmand, "drill.echo", 1), 15)
        assert do(fresh_gearmand.address, "drill.echo", b"ok").result == b"ok"
        wait_for(lambda: http_status(g.metrics_port, "/readyz") == 200, 10)
        wait_for(
            lambda: metric(g.metrics_port, "gdriver_gearmand_up", server=fresh_gearmand.address),
            10,
        )
        assert metric(g.metrics_port, "gdriver_gearmand_up", server=f"{HOST}:{down}") == 0.0
    finally:
        g.stop()


# -- 7. supervisor death -------------------------------------------------------------------------
def test_sigkill_to_supervisor_leaves_no_worker(fresh_gearmand):
    g = Gdriver(fresh_gearmand, *NS).start()
    try:
        wait_for(lambda: registered(fresh_gearmand, "drill.count", 4), 15)
        children = [int(p) for line in g.console("status") for p in pids_of(g, line.split()[0])]
        assert len(children) >= 7
        # fork safety: the supervisor never runs a second thread
        assert os.listdir(f"/proc/{g.pid}/task") == [str(g.pid)]
        os.kill(g.pid, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in children), 5)
    finally:
        g.stop()


# -- 8. hostile console input --------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_console_survives_garbage_floods_and_many_connections(gearmand):
    g = Gdriver(gearmand, "--namespaces", "live.basic").start()
    try:
        before = rss_kib(g.pid)
        rnd = __import__("random").Random(7)
        for _ in range(30):  # random bytes, NULs, telnet IAC, half lines
            blob = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 3000)))
            console_raw(g.console_port, blob, timeout=0.5)
        big = console_raw(g.console_port, b"x" * (1 << 20) + b"\n", timeout=5, until_eof=True)
        assert big.startswith(b"ERR line_too_long")
        socks = []
        try:
            for _ in range(500):
                s = socket.socket()
                s.settimeout(5)
                s.connect((HOST, g.console_port))
                socks.append(s)
            # past 64 the least recently active connections were closed to make room
            assert socks[0].recv(100) == b""
            for s in socks[-20:]:
                s.sendall(b"stat")  # half-open: a partial line, never finished
        finally:
            for s in socks:
                s.close()
        assert g.console("status")[0].startswith("basic.chatty")
        assert rss_kib(g.pid) - before < 64 * 1024
    finally:
        g.stop()


# -- 9. daemon mode ------------------------------------------------------------------------------
def test_daemonize_with_pidfile_appends_log_and_refuses_a_second_start(gearmand, tmp_path):
    pidfile, logfile = tmp_path / "gdriver.pid", tmp_path / "gdriver.log"
    logfile.write_text("earlier line\n")
    cmd = [
        sys.executable, "-m", "gdriver", "run", "--server", gearmand.address,
        "--lib", str(WORKERS), "--namespaces", "drill.jobs", "--console_port", "0",
        "--metrics_port", "0", "--daemonize", "--pidfile", str(pidfile),
        "--logfile", str(logfile),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(cmd, env=env, capture_output=True, timeout=30)
    assert first.returncode == 0, first.stderr
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10))
    try:
        assert pid_alive(pid)
        second = subprocess.run(cmd, env=env, capture_output=True, timeout=30)
        assert second.returncode == 78
        assert b"already running" in second.stderr
        wait_for(lambda: "process started" in logfile.read_text(), 10)
        assert logfile.read_text().startswith("earlier line\n")  # appended, never truncated
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), 30)
    wait_for(lambda: not pidfile.exists(), 5)


@pytest.mark.parametrize(
    "args",
    [
        ["--interval", "-1"],
        ["--server", "host:notaport"],
        ["--configfile", "/nonexistent/gdriver.yml"],
        ["--job_runtime_attributes", '{"a.B.c": {"min_processes": 3, "max_processes": 1}}'],
    ],
)
def test_invalid_settings_exit_78_with_one_line(args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "gdriver", "check-config", *args], env=env,
                         capture_output=True, timeout=30)  # fmt: skip
    assert res.returncode == 78
    err = res.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    key = args[0].lstrip("-")
    assert key in err


# -- 8b. configuration fuzzing -------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gdriver import cli, config  # noqa: E402

SAFE_KEYS = [k for k in config.KEYS if k not in ("namespaces", "lib", "configfile", "daemonize")]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 70000), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(["localhost:4730", "a:1,b:2", "INFO", "0", "5", ":"]),
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
documents = st.dictionaries(
    st.one_of(st.sampled_from(SAFE_KEYS), st.text(max_size=8)), values, max_size=5
)
env_values = st.dictionaries(
    st.sampled_from([config.ENV_PREFIX + k.upper() for k in SAFE_KEYS]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
            max_size=20),
    max_size=4,
)  # fmt: skip


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=st.one_of(documents, values), env=env_values)
def test_config_fuzz_ends_in_settings_or_a_named_error(doc, env, tmp_path):
    path = tmp_path / "fuzz.yml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    try:
        result = config.load(cli={"configfile": [str(path)]}, environ=env)
    except config.ConfigError as exc:
        assert exc.key and exc.source and "\n" not in str(exc)
        assert exc.key in str(exc)
    else:
        assert isinstance(result, config.Settings)
        assert result.servers  # a valid config always has a usable server list


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    args=st.lists(
        st.tuples(st.sampled_from(SAFE_KEYS), st.text(max_size=10)).map(
            lambda kv: [f"--{kv[0]}", kv[1]]
        ),
        max_size=3,
    )
)
def test_cli_fuzz_exits_0_or_78_with_one_line(args, capsys):
    argv = ["check-config", *[x for pair in args for x in pair]]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code in (0, 78)
    err = capsys.readouterr().err.strip()
    if exit_info.value.code == 78:
        assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_hup_drops_a_job_whose_worker_left_the_configuration(fresh_gearmand):
    config = {"namespaces": ["drill.jobs", "live.quit"], "interval": 1}
    g = Gdriver(fresh_gearmand, config=config).start()
    try:
        wait_for(lambda: registered(fresh_gearmand, "live.quit.Quit.quit1", 1), 15)
        (old,) = pids_of(g, "live.quit.Quit.group1")
        cfg_path = g.tmp / "config.yml"
        cfg_path.write_text(yaml.safe_dump({"namespaces": ["drill.jobs"], "interval": 1}))
        os.kill(g.pid, signal.SIGHUP)
        wait_for(lambda: not any(x.startswith("live.quit.") for x in g.console("status")), 15)
        wait_for(lambda: not pid_alive(old), 10)
        assert g.console("show live.quit.Quit.group1") == [
            "ERR invalid_job_name: live.quit.Quit.group1"
        ]
        assert do(fresh_gearmand.address, "drill.echo", b"still").result == b"still"
        cfg_path.write_text(yaml.safe_dump(config))  # and back
        os.kill(g.pid, signal.SIGHUP)
        wait_for(lambda: registered(fresh_gearmand, "live.quit.Quit.quit1", 1), 15)
    finally:
        assert g.stop() == 0


def test_timeout_covers_the_job_not_its_hooks_and_huge_errors_are_reported(fresh_gearmand):
    g = Gdriver(fresh_gearmand, *NS).start()
    try:
        wait_for(lambda: registered(fresh_gearmand, "hooked.near_limit", 1), 15)
        first = do(fresh_gearmand.address, "hooked.near_limit", timeout=15)
        assert first.complete and first.state == gearman.JOB_COMPLETE
        assert do(fresh_gearmand.address, "hooked.near_limit", timeout=15).result == first.result
        assert not [r for r in g.records() if r.get("event") == "process_exited"]
        pid = do(fresh_gearmand.address, "hooked.huge_error").result
        failed = do(fresh_gearmand.address, "hooked.huge_error", b"fail")
        assert failed.state == gearman.JOB_FAILED
        wait_for(lambda: "ERROR: ValueError: xxx" in g.console("show hooked.huge_error")[0], 5)
        assert do(fresh_gearmand.address, "hooked.huge_error").result == pid  # still alive
    finally:
        assert g.stop() == 0


def test_a_gearmand_that_never_answers_does_not_keep_workers_busy(fresh_gearmand):
    mute = socket.create_server((HOST, 0))  # accepts connections (backlog), never answers
    try:
        server = f"{fresh_gearmand.address},{HOST}:{mute.getsockname()[1]}"
        g = Gdriver(server, *NS, "--interval", "1").start()
        try:
            wait_for(lambda: registered(fresh_gearmand, "drill.quick", 1), 15)
            pid = do(fresh_gearmand.address, "drill.quick").result
            time.sleep(5)  # longer than the job's timeout plus the supervisor's grace
            exits = [r for r in g.records() if r.get("event") == "process_exited"]
            assert exits == []  # the idle process was not taken for a hung job
            busy = next(x for x in g.console("status") if x.startswith("drill.quick "))
            assert do(fresh_gearmand.address, "drill.quick").result == pid
            assert busy.split()[3] == "1"
        finally:
            g.stop()
    finally:
        mute.close()
