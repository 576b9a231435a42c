"""The command line: flags, check-config, and exit 78 with one stderr line on bad settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import ROOT, WORKERS

from gdriver import cli, config


def gdriver(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `python -m gdriver ARGS` to completion (only commands that exit by themselves)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GDRIVER_")}
    full_env["PYTHONPATH"] = str(ROOT)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gdriver", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


def assert_config_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == config.EX_CONFIG, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert lines[0].startswith("gdriver: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- argument parsing (in process) ---------------------------------------------------------------


def test_underscore_and_dash_spellings_and_repeated_lists() -> None:
    values = cli.parse_settings_args(
        "gdriver run",
        ["--console_port", "1", "--max-idle-time", "2", "--namespaces", "a", "--namespaces", "b",
         "--lib", "/x", "--no-daemonize"],
    )  # fmt: skip
    assert values == {
        "console_port": "1",
        "max_idle_time": "2",
        "namespaces": ["a", "b"],
        "lib": ["/x"],
        "daemonize": False,
    }
    assert cli.parse_settings_args("gdriver run", ["--console-port", "3"]) == {"console_port": "3"}


def test_only_given_flags_are_returned_so_lower_sources_stay() -> None:
    assert cli.parse_settings_args("gdriver run", []) == {}
    assert cli.parse_settings_args("gdriver run", ["--daemonize"]) == {"daemonize": True}


def test_map_flags_take_json() -> None:
    values = cli.parse_settings_args(
        "gdriver run",
        ["--worker_options", '{"GLOBAL": {"a": 1}}', "--job-runtime-attributes", "{}"],
    )
    assert values == {"worker_options": {"GLOBAL": {"a": 1}}, "job_runtime_attributes": {}}


def test_bad_json_flag_exits_78(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_settings_args("gdriver run", ["--worker_options", "{nope"])
    assert info.value.code == config.EX_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "worker_options (command line): must be a JSON map" in err


def test_unknown_flag_exits_78(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_settings_args("gdriver run", ["--bogus", "1"])
    assert info.value.code == config.EX_CONFIG
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err


# -- check-config (real processes) ---------------------------------------------------------------


def test_check_config_prints_effective_settings_and_jobs(tmp_path: Path) -> None:
    first = tmp_path / "first.yml"
    first.write_text(yaml.safe_dump({"interval": 7, "max_idle_time": 1, "loglevel": "debug"}))
    second = tmp_path / "second.yml"
    second.write_text(
        yaml.safe_dump(
            {
                "max_idle_time": 2,
                "job_runtime_attributes": {
                    "live.runtime_option.RuntimeOption.job1": {
                        "min_processes": 2,
                        "max_processes": 10,
                    }
                },
            }
        )
    )
    proc = gdriver(
        "check-config",
        "--configfile", str(first), "--configfile", str(second),
        "--console-port", "4711",
        "--lib", str(WORKERS),
        "--namespaces", "live.runtime_option", "--namespaces", "live.max_idle_time",
        env={"GDRIVER_INTERVAL": "3", "GDRIVER_SERVER": "127.0.0.1:1,127.0.0.1:2"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = json.loads(proc.stdout)
    assert out["interval"] == 3.0  # env beats the files
    assert out["max_idle_time"] == 2.0  # the later file beats the earlier one
    assert out["loglevel"] == "DEBUG"
    assert out["console_port"] == 4711  # command line
    assert out["server"] == "127.0.0.1:1,127.0.0.1:2"
    assert out["namespaces"] == ["live.runtime_option", "live.max_idle_time"]
    assert out["configfile"] == [str(first), str(second)]
    assert set(config.KEYS) <= set(out)
    assert out["jobs"] == [
        {
            "name": "live.max_idle_time.MaxIdleTime.get_pid",
            "functions": ["live.max_idle_time.MaxIdleTime.get_pid"],
            "min_processes": 0,
            "max_processes": 1,
        },
        {
            "name": "live.runtime_option.RuntimeOption.job1",
            "functions": ["live.runtime_option.RuntimeOption.job1"],
            "min_processes": 2,
            "max_processes": 10,
        },
        {
            "name": "live.runtime_option.RuntimeOption.job2",
            "functions": ["live.runtime_option.RuntimeOption.job2"],
            "min_processes": 1,
            "max_processes": 1,
        },
    ]


def test_check_config_with_lists_and_maps_from_env() -> None:
    proc = gdriver(
        "check-config",
        env={
            "GDRIVER_LIB": str(WORKERS),
            "GDRIVER_NAMESPACES": "live.prefix,live.prefix_method",
            "GDRIVER_WORKER_OPTIONS": '{"GLOBAL": {"x": 1}}',
        },
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["worker_options"] == {"GLOBAL": {"x": 1}}
    assert [j["name"] for j in out["jobs"]] == ["foo_bar_grp", "foo_bar_method", "ping"]


@pytest.mark.parametrize(
    "args, env, needles",
    [
        ([], {"GDRIVER_INTERVAL": "abc"}, ["interval (env GDRIVER_INTERVAL)"]),
        (["--interval", "-2"], {}, ["interval (command line)"]),
        (["--console_port", "99999"], {}, ["console_port (command line)"]),
        (["--server", "host:port"], {}, ["server (command line)", "bad port"]),
        ([], {"GDRIVER_SERVER": "a,,b"}, ["server (env GDRIVER_SERVER)"]),
        (["--loglevel", "loud"], {}, ["loglevel (command line)"]),
        (["--bogus", "1"], {}, ["unrecognized arguments"]),
        # empty list items are dropped: valid
        ([], {"GDRIVER_NAMESPACES": "live.prefix,,", "GDRIVER_LIB": str(WORKERS)}, []),
    ],
)
def test_check_config_bad_values_exit_78(
    args: list[str], env: dict[str, str], needles: list[str]
) -> None:
    proc = gdriver("check-config", *args, env=env)
    if not needles:
        assert proc.returncode == 0, proc.stderr
        return
    assert_config_error(proc, *needles)


def test_check_config_bad_files_exit_78(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.yml"
    unknown.write_text("interval: 1\nbogus_key: 2\n")
    assert_config_error(
        gdriver("check-config", "--configfile", str(unknown)), f"bogus_key (file {unknown})"
    )
    missing = tmp_path / "missing.yml"
    assert_config_error(
        gdriver("check-config", "--configfile", str(missing)),
        f"configfile (file {missing})",
        "cannot read",
    )
    broken = tmp_path / "broken.yml"
    broken.write_text("a: [\n")
    assert_config_error(
        gdriver("check-config", "--configfile", str(broken)), "configfile", "invalid YAML"
    )


def write_module(tmp_path: Path, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))


def test_check_config_load_errors_exit_78(tmp_path: Path) -> None:
    write_module(tmp_path, "gdt_cli_broken", "raise RuntimeError('kaputt')")
    write_module(
        tmp_path,
        "gdt_cli_minmax",
        """
        from gdriver import Worker, job

        class W(Worker):
            @job(min_processes=3, max_processes=1)
            def m(self, job, workload):
                return ""
        """,
    )
    for name in ("gdt_cli_dup_a", "gdt_cli_dup_b"):
        write_module(
            tmp_path,
            name,
            """
            from gdriver import Worker, job

            class W(Worker):
                prefix = ""

                @job
                def gdt_same(self, job, workload):
                    return ""
            """,
        )
    write_module(
        tmp_path,
        "gdt_cli_prefix",
        """
        from gdriver import Worker, job

        class W(Worker):
            prefix = 5

            @job
            def m(self, job, workload):
                return ""
        """,
    )
    lib = ["--lib", str(tmp_path)]
    assert_config_error(
        gdriver("check-config", *lib, "--namespaces", "gdt_cli_prefix"),
        "gdt_cli_prefix.W: TypeError: W.prefix must be a string",
    )
    assert_config_error(
        gdriver("check-config", *lib, "--namespaces", "gdt_cli_broken"),
        "cannot import worker module gdt_cli_broken",
        "RuntimeError: kaputt",
    )
    assert_config_error(
        gdriver("check-config", *lib, "--namespaces", "gdt_cli_minmax"),
        "min_processes 3 > max_processes 1",
    )
    assert_config_error(
        gdriver(
            "check-config", *lib, "--namespaces", "gdt_cli_dup_a", "--namespaces", "gdt_cli_dup_b"
        ),
        "duplicate job name gdt_same",
    )
    assert_config_error(
        gdriver("check-config", "--namespaces", "gdt_cli_no_such_module"),
        "cannot import worker module gdt_cli_no_such_module",
    )


def test_run_exits_78_on_bad_settings_and_load_errors(tmp_path: Path) -> None:
    off = ["--console_port", "0", "--metrics_port", "0", "--server", "127.0.0.1:1"]
    assert_config_error(
        gdriver("run", *off, env={"GDRIVER_INTERVAL": "x"}), "interval (env GDRIVER_INTERVAL)"
    )
    write_module(tmp_path, "gdt_run_broken", "import gdt_missing_dependency")
    proc = gdriver("run", *off, "--lib", str(tmp_path), "--namespaces", "gdt_run_broken")
    assert_config_error(proc, "cannot import worker module gdt_run_broken")
    # the supervisor also logged it as one JSON record on stdout
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["level"] for r in records] == ["CRITICAL"]
    assert "gdt_run_broken" in records[0]["message"]


def test_default_command_is_run() -> None:
    proc = gdriver("--interval", "x")
    assert_config_error(proc, "interval (command line)")


def test_help_and_version() -> None:
    proc = gdriver("--help")
    assert proc.returncode == 0 and "check-config" in proc.stdout
    proc = gdriver("run", "--help")
    assert proc.returncode == 0
    assert "--console_port" in proc.stdout and "--console-port" in proc.stdout
    proc = gdriver("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("gdriver ")


def test_check_config_output_into_a_closed_pipe_is_not_an_error() -> None:
    full_env: dict[str, Any] = {k: v for k, v in os.environ.items() if not k.startswith("GDRIVER_")}
    full_env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gdriver",
            "check-config",
            "--lib",
            str(WORKERS),
            "--namespaces",
            "live.basic",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=full_env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader went away before the output was written
    assert proc.wait(30) == 0
    err = proc.stderr.read().decode()
    assert "Traceback" not in err


# -- nothing silently ignored, the start-up contract ---------------------------------------------


@pytest.mark.parametrize("flags", [["--serv", "h"], ["--int", "3"], ["--pid", "5"]])
def test_abbreviated_flags_are_refused(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_settings_args("gdriver run", flags)
    assert info.value.code == config.EX_CONFIG
    assert f"unrecognized arguments: {flags[0]}" in capsys.readouterr().err


def test_zero_jobs_loaded_exits_78(tmp_path: Path) -> None:
    assert_config_error(gdriver("check-config"), "namespaces (default): no jobs loaded from (none)")
    (tmp_path / "empty_ns").mkdir()
    proc = gdriver("run", "--lib", str(tmp_path), "--namespaces", "empty_ns",
                   "--console_port", "0", "--metrics_port", "0")  # fmt: skip
    assert_config_error(proc, "namespaces (command line): no jobs loaded from empty_ns")


def test_check_config_shows_where_each_value_came_from(tmp_path: Path) -> None:
    conf = tmp_path / "c.yml"
    conf.write_text(yaml.safe_dump({"interval": 7, "worker_options": {"GLOBAL": {"a": 1}}}))
    proc = gdriver(
        "check-config", "--configfile", str(conf), "--lib", str(WORKERS),
        "--namespaces", "live.runtime_option",
        env={"GDRIVER_WORKER_OPTIONS": '{"GLOBAL": {"b": 2}}', "GDRIVER_LOGLEVEL": "debug"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["worker_options"] == {"GLOBAL": {"a": 1, "b": 2}}
    assert out["sources"]["interval"] == f"file {conf}"
    assert out["sources"]["worker_options.GLOBAL.a"] == f"file {conf}"
    assert out["sources"]["worker_options.GLOBAL.b"] == "env GDRIVER_WORKER_OPTIONS"
    assert out["sources"]["loglevel"] == "env GDRIVER_LOGLEVEL"
    assert out["sources"]["lib"] == "command line"
    assert out["sources"]["metrics_port"] == "default"


def test_jobs_above_max_total_processes_exit_78() -> None:
    proc = gdriver("check-config", "--lib", str(WORKERS), "--namespaces", "live.runtime_option",
                   "--max_total_processes", "1")  # fmt: skip
    assert_config_error(proc, "max_total_processes (command line): min_processes of all jobs")


def test_daemonize_with_an_unwritable_pidfile_fails_in_the_launcher(tmp_path: Path) -> None:
    for flags in (["--pidfile", "/nonexistent/dir/x.pid"],
                  ["--logfile", "/nonexistent/dir/x.log"]):  # fmt: skip
        proc = gdriver("run", "--daemonize", "--lib", str(WORKERS), "--namespaces",
                       "live.runtime_option", "--server", "127.0.0.1:1", "--console_port", "0",
                       "--metrics_port", "0", *flags)  # fmt: skip
        key = flags[0].lstrip("-")
        assert_config_error(proc, f"{key} (/nonexistent/dir/x.", "No such file or directory")


def test_logfile_and_pidfile_without_daemonize_are_honoured(tmp_path: Path) -> None:
    log, pid = tmp_path / "out.log", tmp_path / "g.pid"
    log.write_text("kept\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GDRIVER_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gdriver", "run", "--lib", str(WORKERS), "--namespaces",
         "live.runtime_option", "--server", "127.0.0.1:1", "--console_port", "0",
         "--metrics_port", "0", "--logfile", str(log), "--pidfile", str(pid)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    try:
        for _ in range(200):
            if pid.exists() and '"event": "started"' in log.read_text():
                break
            time.sleep(0.05)
        assert pid.read_text().strip() == str(proc.pid)
        assert log.read_text().startswith("kept\n")  # appended, not truncated
        assert '"event": "started"' in log.read_text()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert out == b""  # everything went to the log file
    assert not pid.exists()  # removed at exit
