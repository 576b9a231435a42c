"""Live: the programmatic API (Driver, add_job, get_job, has_job, get_jobs, run) in a script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from live_helpers import call, wait_registered
from support import HOST, ROOT, WORKERS, Gearmand, console_command, free_port, pid_alive, wait_for

import gdriver
from gdriver import Worker
from gdriver.loader import LoadError

SCRIPT = """
import json
import sys

sys.path.insert(0, {workers!r})

from gdriver import Driver, Worker
from gdriver.loader import LoadError


class Api(Worker):
    prefix = "api_"

    def hello(self, job, workload):
        return b"hello " + workload

    def shout(self, workload):
        return workload.upper()

    def wrap(self, result):
        return "<" + result + ">"

    def bound(self, job, workload):
        return "bound " + self.greeting


worker = Api(server={server!r}, greeting="hi")
driver = Driver(
    namespaces=["live.prefix_method"],
    server={server!r},
    console_port={port},
    metrics_port=0,
    interval=0.5,
)
driver.add_job("hello", worker, methods=[{{"name": "hello", "body": Api.hello, "decode": "shout"}}])
driver.add_job(
    "pair",
    worker,
    methods=[
        {{"name": "bound", "body": worker.bound, "encode": "wrap"}},
        {{"name": "lambda", "body": lambda self, job, workload: "lambda " + self.greeting}},
    ],
    min_processes=0,
    max_processes=2,
)
errors = []
try:
    driver.add_job("dup", worker, methods=[{{"name": "hello", "body": Api.hello}}])
except LoadError as exc:
    errors.append(str(exc))
try:
    methods = [{{"name": "x", "body": Api.hello}}]
    driver.add_job("bad", worker, methods=methods, min_processes=2, max_processes=1)
except ValueError as exc:
    errors.append(str(exc))
driver.load()
print(json.dumps({{
    "jobs": [(j.name, j.min_processes, j.max_processes, j.functions) for j in driver.get_jobs()],
    "has": [driver.has_job("api_hello"), driver.has_job("hello"), driver.has_job("api_dup")],
    "get": driver.get_job("api_pair").name,
    "missing": driver.get_job("nope") is None,
    "errors": errors,
}}), flush=True)
sys.exit(driver.run())
"""


def test_driver_add_job_and_run_in_a_script(gearmand: Gearmand, tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "api_driver.py"
    script.write_text(SCRIPT.format(workers=str(WORKERS), server=gearmand.address, port=port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GDRIVER_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode("utf-8", "replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: lines or proc.poll() is not None, 20)
        assert lines, "the script printed nothing"
        state = json.loads(lines[0])
        assert state["jobs"] == [
            ["api_hello", 1, 1, ["api_hello"]],
            ["api_pair", 0, 2, ["api_bound", "api_lambda"]],
            ["foo_bar_grp", 1, 1, ["foo_bar_first", "foo_bar_second"]],
            ["foo_bar_method", 1, 1, ["foo_bar_method"]],
        ]
        assert state["has"] == [True, False, False]
        assert state["get"] == "api_pair" and state["missing"] is True
        assert "duplicate function name api_hello" in state["errors"][0]
        assert "min_processes 2 > max_processes 1" in state["errors"][1]

        wait_for(lambda: proc.poll() is not None or _console_up(port), 20)
        assert proc.poll() is None
        wait_registered(gearmand, "api_hello", "foo_bar_method")
        assert call(gearmand, "api_hello", "world") == b"hello WORLD"
        assert call(gearmand, "api_bound") == b"<bound hi>"  # min 0: started on demand
        assert call(gearmand, "api_lambda") == b"lambda hi"
        assert call(gearmand, "foo_bar_first") == b"first"
        status = console_command(port, "status")
        assert [line.split()[0] for line in status] == [j[0] for j in state["jobs"]]
        pids = [p for j in state["jobs"] for p in _show(port, j[0])]
        assert len(pids) >= 3
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        for pid in pids:
            assert not pid_alive(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(5)


def _console_up(port: int) -> bool:
    try:
        console_command(port, "status", timeout=1)
    except (OSError, AssertionError):
        return False
    return True


def _show(port: int, job: str) -> list[int]:
    return [int(x) for x in console_command(port, f"show {job}")[1:]]


# -- in process, without running ------------------------------------------------------------------


class Hand(Worker):
    def one(self, job: Any, workload: Any) -> str:
        return "one"


def test_add_job_defaults_names_and_errors() -> None:
    driver = gdriver.Driver(server=f"{HOST}:1")
    job = driver.add_job("one", Hand(), methods=[{"name": "one", "body": Hand.one}])
    prefix = f"{__name__}.Hand."
    assert job.name == prefix + "one" and job.functions == [prefix + "one"]
    assert (job.min_processes, job.max_processes) == (1, 1)
    assert job.spec.key == prefix + "one"
    zero = driver.add_job(
        "zero", Hand(), methods=[{"name": "z", "body": Hand.one}], min_processes=0
    )
    assert (zero.min_processes, zero.max_processes) == (0, 1)
    three = driver.add_job("three", Hand(), [{"name": "t", "body": Hand.one}], min_processes=3)
    assert (three.min_processes, three.max_processes) == (3, 3)
    assert [j.name for j in driver.get_jobs()] == [prefix + n for n in ("one", "three", "zero")]
    assert driver.get_job(prefix + "one") is job and driver.has_job(prefix + "zero")
    assert driver.get_job("one") is None and not driver.has_job("one")
    with pytest.raises(LoadError, match="duplicate job name"):
        driver.add_job("one", Hand(), methods=[{"name": "other", "body": Hand.one}])
    with pytest.raises(ValueError, match="min_processes 2 > max_processes 1"):
        driver.add_job("bad", Hand(), [{"name": "b", "body": Hand.one}], 2, 1)
    with pytest.raises(TypeError, match=r"gdriver\.Worker"):
        driver.add_job("x", object(), [{"name": "b", "body": Hand.one}])  # type: ignore[arg-type]
    assert len(driver.get_jobs()) == 3  # failed calls added nothing


def test_manual_and_loaded_jobs_must_not_clash() -> None:
    class Clash(Worker):
        prefix = ""

    driver = gdriver.Driver(server=f"{HOST}:1", namespaces=["live.prefix"])
    driver.add_job("ping", Clash(), methods=[{"name": "ping", "body": Hand.one}])
    with pytest.raises(LoadError, match="duplicate job name ping"):
        driver.load()


def test_driver_options_are_validated_like_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from gdriver.config import ConfigError

    with pytest.raises(ConfigError, match=r"interval \(argument\)"):
        gdriver.Driver(interval=-1)
    driver = gdriver.Driver(server=f"{HOST}:1", interval="2", namespaces="live.prefix")
    assert driver.settings.interval == 2.0 and driver.settings.namespaces == ("live.prefix",)
    # the process environment is not read for programmatic settings
    monkeypatch.setenv("GDRIVER_INTERVAL", "7")
    assert gdriver.Driver(server=f"{HOST}:1").settings.interval == 5.0


# -- add_job validation: bugs in gdriver/supervisor.py (Driver.add_job) ----------------------------


@pytest.mark.parametrize("key", ["encode", "decode"])
def test_add_job_rejects_coders_that_are_not_methods(key: str) -> None:
    driver = gdriver.Driver(server=f"{HOST}:1")
    with pytest.raises((ValueError, TypeError, LoadError)):
        driver.add_job("x", Hand(), [{"name": "x", "body": Hand.one, key: "nope"}])


@pytest.mark.parametrize("key", ["encode", "decode"])
def test_add_job_coder_true_means_the_default_method(key: str) -> None:
    driver = gdriver.Driver(server=f"{HOST}:1")
    try:
        job = driver.add_job("x", Hand(), [{"name": "x", "body": Hand.one, key: True}])
    except (ValueError, TypeError, LoadError):
        return  # rejecting it is fine too
    assert getattr(job.spec.methods[0], key) == key


def test_add_job_rejects_a_job_without_methods() -> None:
    driver = gdriver.Driver(server=f"{HOST}:1")
    with pytest.raises((ValueError, LoadError)):
        driver.add_job("empty", Hand(), methods=[])


def test_add_job_rejects_negative_counts() -> None:
    driver = gdriver.Driver(server=f"{HOST}:1")
    with pytest.raises((ValueError, LoadError)):
        driver.add_job("neg", Hand(), [{"name": "n", "body": Hand.one}], min_processes=-1)


def test_add_job_after_load_must_not_replace_a_loaded_job() -> None:
    class Clash(Worker):
        prefix = ""

    driver = gdriver.Driver(server=f"{HOST}:1", namespaces=["live.prefix"])
    driver.load()
    loaded = driver.get_job("ping")
    assert loaded is not None
    try:
        driver.add_job("ping", Clash(), methods=[{"name": "ping", "body": Hand.one}])
    except LoadError:
        pass
    assert driver.get_job("ping") is loaded
    with pytest.raises(LoadError, match="duplicate"):
        driver.add_job("ping", Clash(), methods=[{"name": "ping", "body": Hand.one}])
