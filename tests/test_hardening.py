"""The supervisor keeps running, and keeps its workers running, when resources run out and
when worker code misbehaves: real gearmand, real rlimits, real signals."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from support import (
    HOST,
    ROOT,
    WORKERS,
    Gdriver,
    Gearmand,
    do,
    free_port,
    pid_alive,
    port_open,
    submit_background,
    wait_for,
)
from test_reliability import metric

from gdriver import spawn
from gdriver.jobs import JobSpec


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Limited(Gdriver):
    """A gdriver whose descriptor limit is set with prlimit(1) before it starts."""

    def __init__(self, *args: Any, nofile: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.nofile = nofile

    def command(self) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}", "--", *super().command()]


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no limit")


def events(g: Gdriver, name: str) -> list[dict[str, Any]]:
    return [r for r in g.records() if r.get("event") == name]


# -- resource exhaustion -------------------------------------------------------------------------
@pytest.mark.parametrize("spare", [0, 1, 2, 3, 4, 5])
def test_a_start_that_runs_out_of_descriptors_leaves_none_open(spare):
    # a start needs 6 descriptors: with `spare` free, socketpair or one of the pipes fails
    spec = JobSpec(name="x", worker=None, methods=[])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = open_fds()
    fillers: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(int(fd) for fd in before) + 64, hard))
        with contextlib.suppress(OSError):
            for _ in range(1000):
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        for _ in range(spare):
            os.close(fillers.pop())
        with pytest.raises(OSError) as failed:
            spawn.fork_worker(spec, [], [], (), 0, 0.0)
        assert failed.value.errno == errno.EMFILE
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert open_fds() == before


def test_start_raises_the_soft_descriptor_limit_and_warns_when_it_cannot_fit(gearmand):
    g = Limited(gearmand, "--namespaces", "drill.jobs", nofile="64:2048").start()
    try:
        assert soft_nofile(g.pid) == 2048
    finally:
        g.stop()
    g = Limited(gearmand, "--namespaces", "hardening.many", nofile="256:256").start()
    try:
        record = g.wait_log(lambda r: r.get("event") == "fd_limit_low")
        assert record["limit"] == 256 and record["needed"] > 256
    finally:
        g.stop()


def test_low_fd_limit_many_jobs_and_recycling_every_job_runs(fresh_gearmand, tmp_path):
    ledger = tmp_path / "ledger"
    from hardening.many.jobs import MANY_JOBS

    total = 1500
    config = {
        "worker_options": {
            f"Many{i:02d}": {"ledger": str(ledger), "pause": 0.05} for i in range(MANY_JOBS)
        },
        "max_jobs_per_process": 15,
        "interval": 0.2,
    }
    g = Limited(fresh_gearmand, "--namespaces", "hardening.many", config=config, metrics=True,
                nofile="128:128").start()  # fmt: skip
    try:
        for i in range(MANY_JOBS):
            work = [f"{i}-{n}" for n in range(total // MANY_JOBS)]
            submit_background(fresh_gearmand.address, f"many{i:02d}.record", work)
        wait_for(lambda: ledger.exists() and len(set(ledger.read_text().split())) >= total, 120)
        assert g.proc is not None and g.proc.poll() is None
        failed = events(g, "spawn_failed")
        assert failed, "the limit was never reached"
        attempts = metric(g.metrics_port, "gdriver_spawn_failures_total")
        assert attempts >= len(failed)
        # one record per episode, not per attempt: per job, failed and recovered alternate
        for name in {r["job_name"] for r in failed}:
            kinds = [r["event"] for r in g.records()
                     if r.get("job_name") == name
                     and r.get("event") in ("spawn_failed", "spawn_recovered")]  # fmt: skip
            assert all(a != b for a, b in itertools.pairwise(kinds)), (name, kinds)
            assert kinds[0] == "spawn_failed"
        recovered = [r["attempts"] for r in events(g, "spawn_recovered")]
        assert sum(recovered) <= attempts
        assert not any("Traceback" in r.get("message", "") for r in g.records())
    finally:
        rc = g.stop()
    assert rc == 0


def test_fd_limit_64_with_64_idle_http_connections_and_a_worker_death(fresh_gearmand):
    g = Limited(fresh_gearmand, "--namespaces", "drill.jobs", "--interval", "0.2",
                metrics=True, nofile="64:64").start()  # fmt: skip
    held: list[socket.socket] = []
    try:
        wait_for(lambda: fresh_gearmand.workers_for("drill.echo") >= 1, 20)
        for _ in range(64):
            with contextlib.suppress(OSError):
                held.append(socket.create_connection((HOST, g.metrics_port), timeout=2))
        time.sleep(0.5)
        victim = int(g.console("show drill.echo")[1])
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: events(g, "spawn_failed") or len(g.console("show drill.echo")) > 1, 10)
        time.sleep(1.0)
        assert g.proc is not None and g.proc.poll() is None
        for s in held:
            s.close()
        held.clear()
        wait_for(lambda: fresh_gearmand.workers_for("drill.echo") >= 1, 20)
        assert do(fresh_gearmand.address, "drill.echo", b"still here").result == b"still here"
    finally:
        for s in held:
            s.close()
        rc = g.stop()
    assert rc == 0


# -- max_total_processes ---------------------------------------------------------------------------
def test_console_refuses_limits_above_max_total_processes_and_applies_nothing(gearmand):
    g = Gdriver(gearmand, "--namespaces", "drill.jobs", "--max_total_processes", "16").start()
    try:
        before = g.console("status")
        for line in ("set_processes drill.echo 100000 100000", "set_max_processes drill.echo 17",
                     "set_processes drill.pid 7 7", "set_processes drill.echo 1 17"):  # fmt: skip
            reply = g.console(line)
            assert reply[0].startswith("ERR invalid_value: "), (line, reply)
            assert "max_total_processes" in reply[0]
        assert g.console("status") == before
        assert g.console("set_processes drill.echo 1 16") == ["OK"]
    finally:
        g.stop()


def test_the_supervisor_never_starts_more_than_max_total_processes(fresh_gearmand):
    g = stubborn(fresh_gearmand, "stubborn.deaf", "--interval", "0.2",
                 "--max_total_processes", "4")  # fmt: skip
    try:
        submit_background(fresh_gearmand.address, "stubborn.deaf", ["1.5"] * 10)
        most = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            counts = [int(line.split()[3]) for line in g.console("status")]
            most = max(most, sum(counts))
            time.sleep(0.1)
        assert most == 4  # deaf scaled up to what is left beside starts and unstoppable
    finally:
        g.stop()


# -- hostile worker code ---------------------------------------------------------------------------
def stubborn(gearmand: Gearmand, function: str, *args: str, **kw: Any) -> Gdriver:
    """A gdriver serving hardening.stubborn, once ``function`` is registered."""
    g = Gdriver(gearmand, "--namespaces", "hardening.stubborn", *args, **kw).start()
    wait_for(lambda: gearmand.workers_for(function) >= 1, 20)
    return g


def ignores_sigterm(pid: int) -> bool:
    """The process set SIGTERM to be ignored (its SigIgn mask in /proc)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def running(gearmand: Gearmand, function: str) -> int:
    """Jobs of ``function`` a worker has taken, as gearmand's status counts them."""
    return gearmand.status().get(function, (0, 0, 0))[1]


def test_a_process_ignoring_sigterm_is_gone_after_its_job(fresh_gearmand):
    g = stubborn(fresh_gearmand, "stubborn.deaf", "--graceful_timeout", "5")
    try:
        first = int(do(fresh_gearmand.address, "stubborn.deaf", b"0").result)  # now deaf
        result: list[bytes] = []
        worker = threading.Thread(
            target=lambda: result.append(do(fresh_gearmand.address, "stubborn.deaf", b"2").result)
        )
        worker.start()
        # the job runs in it, SIGTERM ignored
        wait_for(lambda: running(fresh_gearmand, "stubborn.deaf") == 1, 5)
        wait_for(lambda: ignores_sigterm(first), 5)
        assert g.console(f"kill {first}") == ["OK"]
        worker.join(10)
        assert result == [str(first).encode()]  # its job finished
        wait_for(lambda: not pid_alive(first), 5)
        second = int(g.console("show stubborn.deaf")[1])
        assert second != first
        # max lowered to 0 while deaf: gone too
        do(fresh_gearmand.address, "stubborn.deaf", b"0")
        assert g.console("set_processes stubborn.deaf 0 0") == ["OK"]
        wait_for(lambda: not pid_alive(second), 8)
    finally:
        g.stop()


def test_a_process_that_ignores_sigterm_and_its_channel_is_killed(fresh_gearmand, tmp_path):
    flag = tmp_path / "hang"
    config = {"worker_options": {"Stubborn": {"hang_flag": str(flag)}}, "graceful_timeout": 20}
    g = stubborn(fresh_gearmand, "stubborn.starts", config=config)
    try:
        flag.touch()
        old = int(g.console("show stubborn.starts")[1])
        g.console(f"kill {old}")
        wait_for(lambda: not pid_alive(old), 5)
        hung = wait_for(lambda: [int(p) for p in g.console("show stubborn.starts")[1:]], 5)[0]
        wait_for(lambda: ignores_sigterm(hung), 5)  # in its start hook, not reading its channel
        g.console(f"kill {hung}")
        started = time.monotonic()
        wait_for(lambda: not pid_alive(hung), 12)
        # killed KILL_GRACE (3 s) after the SIGTERM, up to a housekeeping turn later: not at
        # graceful_timeout (20 s)
        assert time.monotonic() - started < 8
        assert g.wait_log(lambda r: r.get("event") == "stop_ignored" and r["pid"] == hung)
        flag.unlink()
    finally:
        g.stop()


def test_a_job_timeout_is_enforced_during_a_drain(fresh_gearmand):
    g = stubborn(fresh_gearmand, "stubborn.unstoppable", "--graceful_timeout", "60")
    try:
        submit_background(fresh_gearmand.address, "stubborn.unstoppable", ["30"])
        wait_for(lambda: running(fresh_gearmand, "stubborn.unstoppable") == 1, 5)
        assert g.proc is not None
        os.kill(g.pid, signal.SIGTERM)
        started = time.monotonic()
        g.proc.wait(20)  # timeout 1 s + KILL_GRACE, not graceful_timeout
        assert time.monotonic() - started < 15
        assert g.proc.returncode == 0
    finally:
        g.stop()


# -- import-time exits, SIGHUP while importing -------------------------------------------------
def run_gdriver(
    *args: str, env: dict[str, str], timeout: float = 30
) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GDRIVER_")}
    environ.update({"PYTHONPATH": str(ROOT), **env})
    cmd = [sys.executable, "-m", "gdriver", "run", "--lib", str(WORKERS), *args]
    return subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("code", ["0", "3"])
def test_sys_exit_at_import_is_one_line_and_exit_78(tmp_path, code):
    flag = tmp_path / "exit"
    flag.touch()
    env = {"HARDENING_EXIT_FLAG": str(flag), "HARDENING_EXIT_CODE": code}
    done = run_gdriver("--namespaces", "hardening.exits", "--server", f"{HOST}:1",
                       "--console_port", "0", "--metrics_port", "0", env=env)  # fmt: skip
    assert done.returncode == 78, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "SystemExit" in lines[0] and "hardening.exits" in lines[0]


def test_sys_exit_at_import_refuses_a_reload_and_the_drain_still_runs(fresh_gearmand, tmp_path):
    package = tmp_path / "lib" / "exiting"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "jobs.py").write_text((WORKERS / "hardening" / "exits" / "jobs.py").read_text())
    g = Gdriver(fresh_gearmand, "--namespaces", "exiting", "--lib", str(tmp_path / "lib"),
                "--graceful_timeout", "20").start()  # fmt: skip
    try:
        wait_for(lambda: fresh_gearmand.workers_for("exits.echo") >= 1, 20)
        pid = int(do(fresh_gearmand.address, "exits.echo").result)
        # a module that appears later and ends the interpreter when the reload imports it
        (package / "late.py").write_text("import sys\nsys.exit(0)\n")
        os.kill(g.pid, signal.SIGHUP)
        record = g.wait_log(lambda r: r.get("event") == "reload_failed")
        assert "SystemExit" in record["message"] and "exiting.late" in record["message"]
        time.sleep(0.5)
        assert g.proc is not None and g.proc.poll() is None
        assert int(do(fresh_gearmand.address, "exits.echo").result) == pid
    finally:
        rc = g.stop()
    assert rc == 0
    assert any(r.get("event") == "stopping" for r in g.records())
    assert not any(r.get("event") == "drain_timeout" for r in g.records())


def test_sighup_while_importing_is_deferred(fresh_gearmand, tmp_path):
    mark = tmp_path / "mark"
    env = {"HARDENING_IMPORT_SLEEP": "2", "HARDENING_IMPORT_MARK": str(mark)}
    g = Gdriver(fresh_gearmand, "--namespaces", "hardening.slow", env=env)
    g.start(wait_console=False)
    try:
        wait_for(mark.exists, 20)
        os.kill(g.pid, signal.SIGHUP)
        wait_for(lambda: port_open(g.console_port) or g.proc.poll() is not None, 20)
        assert g.proc is not None and g.proc.poll() is None, g.lines[-5:]
        wait_for(lambda: fresh_gearmand.workers_for("slow.echo") >= 1, 20)
    finally:
        rc = g.stop()
    assert rc == 0


# -- start-up contract -----------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["console", "metrics"])
def test_a_port_in_use_is_one_line_naming_its_holder_and_exit_78(which):
    holder = socket.socket()
    holder.bind((HOST, 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    ports = {"console": "0", "metrics": "0", which: str(port)}
    try:
        done = run_gdriver("--namespaces", "drill.jobs", "--server", f"{HOST}:1",
                           "--console_port", ports["console"], "--metrics_port", ports["metrics"],
                           "--metrics_bind", HOST, env={})  # fmt: skip
    finally:
        holder.close()
    assert done.returncode == 78, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"{which}_port {port}" in lines[0] and f"PID {os.getpid()}" in lines[0]
    assert "Traceback" not in done.stdout


def test_a_bind_address_that_does_not_resolve_is_one_line_and_exit_78():
    done = run_gdriver("--namespaces", "drill.jobs", "--server", f"{HOST}:1",
                       "--console_bind", "no-such-host.invalid",
                       "--console_port", str(free_port()), env={})  # fmt: skip
    assert done.returncode == 78, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-host.invalid" in lines[0], done.stderr


# -- SIGABRT ---------------------------------------------------------------------------------------
def test_sigabrt_drains_like_sigterm(fresh_gearmand):
    g = Gdriver(fresh_gearmand, "--namespaces", "drill.jobs").start()
    result: list[bytes] = []
    try:
        wait_for(lambda: fresh_gearmand.workers_for("drill.pid") >= 1, 20)
        client = threading.Thread(
            target=lambda: result.append(do(fresh_gearmand.address, "drill.pid", b"1.5").result)
        )
        client.start()
        wait_for(lambda: running(fresh_gearmand, "drill.pid") == 1, 5)
        os.kill(g.pid, signal.SIGABRT)
        assert g.proc is not None
        g.proc.wait(20)
        client.join(10)
    finally:
        rc = g.stop()
    assert rc == 0
    assert result and result[0].endswith(b"old")


# -- signals without a name ------------------------------------------------------------------------
def test_a_worker_killed_by_a_real_time_signal_is_replaced(fresh_gearmand):
    # signal.Signals has no member for SIGRTMIN+3: naming the exit must not take the loop down
    from test_reliability import pids_of

    g = Gdriver(fresh_gearmand, "--namespaces", "drill.jobs").start()
    try:
        wait_for(lambda: len(pids_of(g, "drill.pid")) == 1, 20)
        (old,) = pids_of(g, "drill.pid")
        rt = signal.SIGRTMIN + 3
        os.kill(old, rt)
        record = g.wait_log(lambda r: r.get("event") == "process_exited" and r.get("pid") == old)
        assert record["signal"] == f"SIG{int(rt)}"
        wait_for(lambda: (p := pids_of(g, "drill.pid")) and p != [old], 15)
        new = int(do(fresh_gearmand.address, "drill.pid", b"").result.split()[0])
        assert new != old and pid_alive(g.pid)
    finally:
        rc = g.stop()
    assert rc == 0


def test_an_error_in_a_loop_step_is_logged_and_the_loop_goes_on():
    from gdriver.supervisor import Driver

    d = Driver()
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("boom")

    for _ in range(3):
        d.guarded(broken)  # raises nothing, every time
    assert len(calls) == 3 and list(d.step_errors) == ["broken:RuntimeError:boom"]


OBSERVER_FAULT = """
import sys

sys.path.insert(0, {workers!r})

from gdriver import observer
from gdriver.supervisor import Driver

real = observer.decide
calls = []


def flaky(*args, **kw):
    calls.append(1)
    if len(calls) <= 4:
        raise RuntimeError("decide fault %d" % len(calls))
    return real(*args, **kw)


observer.decide = flaky
driver = Driver(namespaces=["obs.metered"], server={server!r}, console_port={port},
                metrics_port=0, interval=0.3)
sys.exit(driver.run())
"""


def test_an_observer_that_raises_does_not_stop_the_polls(fresh_gearmand, tmp_path):
    # the decision raises in the first rounds: later rounds still run and scale a min-0 job up
    port = free_port()
    script = tmp_path / "fault.py"
    script.write_text(
        OBSERVER_FAULT.format(workers=str(WORKERS), server=fresh_gearmand.address, port=port)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GDRIVER_")}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "out.log"
    with out.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=sink, stderr=sink, env=env)
    try:
        wait_for(lambda: port_open(port), 20)
        reply = do(fresh_gearmand.address, "obs.metered.Metered.slow", b"0.1", timeout=20)
        assert reply.result == b"slept"
        text = out.read_text()
        assert text.count("decide fault") >= 4 and "scaling failed" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0


def test_sighup_while_the_configuration_is_read_is_not_fatal(fresh_gearmand, tmp_path):
    # the configuration file is a FIFO: gdriver waits in it, before any supervisor exists,
    # while SIGHUPs arrive (logrotate racing a restart); then it starts as usual
    fifo = tmp_path / "config.yml"
    os.mkfifo(fifo)
    g = Gdriver(fresh_gearmand, "--namespaces", "drill.jobs", "--configfile", str(fifo))
    g.start(wait_console=False)
    try:
        with open(fifo, "w") as writer:  # returns once gdriver opened it to read
            for _ in range(5):
                os.kill(g.pid, signal.SIGHUP)
                time.sleep(0.02)
            time.sleep(0.2)
            assert g.proc is not None and g.proc.poll() is None, g.lines[-5:]
            writer.write("interval: 1\n")
        wait_for(lambda: port_open(g.console_port) or g.proc.poll() is not None, 20)
        assert g.proc.poll() is None, g.lines[-5:]
        assert do(fresh_gearmand.address, "drill.echo", b"up").result == b"up"
    finally:
        rc = g.stop()
    assert rc == 0
