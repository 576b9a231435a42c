"""Settings: defaults < YAML files (in order) < GDRIVER_<KEY> env < command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gdriver import config
from gdriver.config import ConfigError, Settings, load


def write_yaml(path: Path, data: Any) -> str:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


def error_of(**kwargs: Any) -> ConfigError:
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return info.value


def test_defaults() -> None:
    s = load(cli={}, environ={})
    assert s == Settings()
    assert (s.server, s.console_port, s.interval, s.max_idle_time) == (
        "localhost:4730",
        47300,
        5.0,
        0.0,
    )
    assert s.loglevel == "INFO" and s.namespaces == () and s.lib == ()
    assert s.servers == [("localhost", 4730)]
    assert json.loads(json.dumps(s.as_dict()))["console_port"] == 47300


def test_precedence_files_in_order_then_env_then_cli(tmp_path: Path) -> None:
    one = write_yaml(
        tmp_path / "one.yml",
        {"interval": 7, "max_idle_time": 1, "loglevel": "debug", "namespaces": ["a"]},
    )
    two = write_yaml(tmp_path / "two.yml", {"interval": 8, "max_idle_time": 2})
    s = load(cli={"configfile": [one, two]}, environ={})
    assert (s.interval, s.max_idle_time, s.loglevel, s.namespaces) == (8.0, 2.0, "DEBUG", ("a",))
    assert s.configfile == (one, two)
    s = load(cli={"configfile": [one, two]}, environ={"GDRIVER_INTERVAL": "3"})
    assert (s.interval, s.max_idle_time) == (3.0, 2.0)
    s = load(
        cli={"configfile": [one, two], "interval": "2"},
        environ={"GDRIVER_INTERVAL": "3", "GDRIVER_MAX_IDLE_TIME": "4"},
    )
    assert (s.interval, s.max_idle_time) == (2.0, 4.0)


def test_programmatic_base_is_below_files(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yml", {"interval": 7})
    s = load(base={"interval": 1, "console_port": 5, "configfile": [path]}, environ={})
    assert (s.interval, s.console_port) == (7.0, 5)


def test_configfile_from_env_and_cli_replaces_it(tmp_path: Path) -> None:
    env_file = write_yaml(tmp_path / "env.yml", {"interval": 6})
    cli_file = write_yaml(tmp_path / "cli.yml", {"max_idle_time": 9})
    s = load(environ={"GDRIVER_CONFIGFILE": env_file})
    assert s.interval == 6.0 and s.configfile == (env_file,)
    s = load(cli={"configfile": [cli_file]}, environ={"GDRIVER_CONFIGFILE": env_file})
    assert (s.interval, s.max_idle_time, s.configfile) == (5.0, 9.0, (cli_file,))
    s = load(environ={"GDRIVER_CONFIGFILE": f"{env_file},{cli_file}"})
    assert (s.interval, s.max_idle_time, s.configfile) == (6.0, 9.0, (env_file, cli_file))


def test_env_lists_are_comma_separated_and_maps_json() -> None:
    s = load(
        environ={
            "GDRIVER_NAMESPACES": "a.b, c ,,d",
            "GDRIVER_LIB": "/x,/y",
            "GDRIVER_WORKER_OPTIONS": '{"GLOBAL": {"foo": 1}, "a.B": {"bar": [1, 2]}}',
            "GDRIVER_JOB_RUNTIME_ATTRIBUTES": json.dumps(
                {"a.B.job": {"min_processes": 2, "max_processes": "10"}}
            ),
            "GDRIVER_DAEMONIZE": "yes",
            "GDRIVER_CONSOLE_PORT": " 5 ",
        }
    )
    assert s.namespaces == ("a.b", "c", "d")
    assert s.lib == ("/x", "/y")
    assert s.worker_options == {"GLOBAL": {"foo": 1}, "a.B": {"bar": [1, 2]}}
    assert s.job_runtime_attributes == {"a.B.job": {"min_processes": 2, "max_processes": 10}}
    assert s.daemonize is True and s.console_port == 5


def test_yaml_values_are_validated_and_normalised(tmp_path: Path) -> None:
    path = write_yaml(
        tmp_path / "c.yml",
        {
            "namespaces": "single",
            "loglevel": "warn",
            "console_port": 0,
            "max_jobs_per_process": 5.0,
            "server": "h1:1, h2",
            "worker_options": {"GLOBAL": None},
            "daemonize": "off",
        },
    )
    s = load(cli={"configfile": [path]}, environ={})
    assert s.namespaces == ("single",)
    assert s.loglevel == "WARNING"
    assert s.console_port == 0 and s.max_jobs_per_process == 5
    assert s.servers == [("h1", 1), ("h2", 4730)]
    assert s.worker_options == {"GLOBAL": {}}
    assert s.daemonize is False


def test_empty_yaml_file_is_fine(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "empty.yml", "")
    assert load(cli={"configfile": [path]}, environ={}).interval == 5.0


@pytest.mark.parametrize(
    "env, key, problem",
    [
        ({"GDRIVER_INTERVAL": "abc"}, "interval", "must be a number between 0 and 3600"),
        ({"GDRIVER_INTERVAL": "-1"}, "interval", "must be a number between 0 and 3600"),
        ({"GDRIVER_INTERVAL": "nan"}, "interval", "must be a number between 0 and 3600"),
        ({"GDRIVER_INTERVAL": ""}, "interval", "must be a number between 0 and 3600"),
        ({"GDRIVER_CONSOLE_PORT": "65536"}, "console_port", "between 0 and 65535"),
        ({"GDRIVER_CONSOLE_PORT": "1.5"}, "console_port", "between 0 and 65535"),
        ({"GDRIVER_LOGLEVEL": "chatty"}, "loglevel", "must be one of"),
        ({"GDRIVER_SERVER": ""}, "server", "no gearman server"),
        ({"GDRIVER_SERVER": "a:b"}, "server", "bad port"),
        ({"GDRIVER_SERVER": "a:1,,b"}, "server", "empty server entry"),
        ({"GDRIVER_SERVER": "::1"}, "server", "IPv6 address must be written as"),
        ({"GDRIVER_DAEMONIZE": "maybe"}, "daemonize", "must be true or false"),
        ({"GDRIVER_WORKER_OPTIONS": "{bad"}, "worker_options", "must be a JSON map"),
        ({"GDRIVER_WORKER_OPTIONS": "[]"}, "worker_options", "must be a map"),
        ({"GDRIVER_WORKER_OPTIONS": '{"GLOBAL": 5}'}, "worker_options", "GLOBAL"),
        (
            {
                "GDRIVER_JOB_RUNTIME_ATTRIBUTES": json.dumps(
                    {"a.B.c": {"min_processes": 3, "max_processes": 2}}
                )
            },
            "job_runtime_attributes",
            "min_processes 3 > max_processes 2",
        ),
        (
            {"GDRIVER_JOB_RUNTIME_ATTRIBUTES": '{"a.B.c": {"MinProcesses": 3}}'},
            "job_runtime_attributes",
            "unknown attribute 'MinProcesses'",
        ),
        (
            {"GDRIVER_JOB_RUNTIME_ATTRIBUTES": '{"a.B.c": {"max_processes": -1}}'},
            "job_runtime_attributes",
            "a.B.c.max_processes",
        ),
        ({"GDRIVER_CONSOLE_BIND": "a b"}, "console_bind", "host name or address"),
    ],
)
def test_invalid_env_values_name_key_and_variable(
    env: dict[str, str], key: str, problem: str
) -> None:
    (name,) = env
    exc = error_of(environ=env)
    assert (exc.key, exc.source) == (key, f"env {name}")
    assert str(exc).startswith(f"{key} (env {name}): ")
    assert problem in str(exc)
    assert "\n" not in str(exc)


@pytest.mark.parametrize(
    "cli, key",
    [
        ({"interval": "soon"}, "interval"),
        ({"interval": True}, "interval"),
        ({"max_jobs_per_process": "-1"}, "max_jobs_per_process"),
        ({"pidfile": 5}, "pidfile"),
        ({"namespaces": [""]}, "namespaces"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_invalid_cli_values_name_the_command_line(cli: dict[str, Any], key: str) -> None:
    exc = error_of(cli=cli)
    assert (exc.key, exc.source) == (key, "command line")


def test_cli_beats_a_bad_env_value_only_if_valid_itself() -> None:
    # the env value is still validated even though the command line overrides it
    exc = error_of(cli={"interval": "1"}, environ={"GDRIVER_INTERVAL": "x"})
    assert exc.source == "env GDRIVER_INTERVAL"


@pytest.mark.parametrize(
    "content, key, problem",
    [
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"configfile": ["x.yml"]}, "configfile", "unknown key"),
        ({"interval": "x"}, "interval", "must be a number"),
        ({"namespaces": [1]}, "namespaces", "non-empty strings"),
        ("- a list\n", "configfile", "must be a YAML map"),
        ("interval: [\n", "configfile", "invalid YAML at line 2"),
    ],
)
def test_invalid_yaml_names_key_and_file(
    tmp_path: Path, content: Any, key: str, problem: str
) -> None:
    path = write_yaml(tmp_path / "bad.yml", content)
    exc = error_of(cli={"configfile": [path]})
    assert (exc.key, exc.source) == (key, f"file {path}")
    assert problem in exc.problem


def test_unreadable_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yml")
    exc = error_of(cli={"configfile": [missing]})
    assert (exc.key, exc.source) == ("configfile", f"file {missing}")
    assert "cannot read" in exc.problem
    (tmp_path / "dir.yml").mkdir()
    exc = error_of(cli={"configfile": [str(tmp_path / "dir.yml")]})
    assert "cannot read" in exc.problem
    (tmp_path / "bin.yml").write_bytes(b"\xff\xfe\x00")
    exc = error_of(cli={"configfile": [str(tmp_path / "bin.yml")]})
    assert exc.problem == "not UTF-8 text"


def test_a_bad_later_file_is_reported_even_if_an_earlier_one_is_fine(tmp_path: Path) -> None:
    good = write_yaml(tmp_path / "good.yml", {"interval": 1})
    bad = write_yaml(tmp_path / "bad.yml", {"max_idle_time": -3})
    exc = error_of(cli={"configfile": [good, bad]})
    assert (exc.key, exc.source) == ("max_idle_time", f"file {bad}")


def test_environment_is_not_mutated() -> None:
    import os

    before = dict(os.environ)
    load(environ={"GDRIVER_NAMESPACES": "a,b", "GDRIVER_WORKER_OPTIONS": "{}"})
    assert dict(os.environ) == before


@given(st.integers(min_value=0, max_value=65535))
def test_any_port_in_range_is_accepted_from_every_source(port: int) -> None:
    assert load(environ={"GDRIVER_CONSOLE_PORT": str(port)}).console_port == port
    assert load(cli={"metrics_port": str(port)}, environ={}).metrics_port == port


@given(st.text(max_size=12))
def test_interval_from_env_is_a_number_or_a_config_error(text: str) -> None:
    if "\x00" in text:
        return  # cannot be in an environment variable
    try:
        s = load(environ={"GDRIVER_INTERVAL": text})
    except ConfigError as exc:
        assert exc.key == "interval" and exc.source == "env GDRIVER_INTERVAL"
    else:
        assert s.interval >= 0 and s.interval == float(text)


def test_every_key_has_a_validator_and_a_default() -> None:
    assert set(config.VALIDATORS) == set(config.KEYS)
    for key in config.KEYS:
        default = getattr(config.DEFAULTS, key)
        if isinstance(default, tuple):
            default = list(default)
        assert config.VALIDATORS[key](default) is not None or default == ""


# -- maps merge across sources; each value's source ------------------------------------------


def test_maps_merge_key_by_key_across_files_env_and_cli(tmp_path: Path) -> None:
    one = write_yaml(tmp_path / "one.yml", {
        "worker_options": {"GLOBAL": {"dsn": "pg://db"}, "a.Images": {"max_size": 800,
                                                                       "quality": 85}},
        "job_runtime_attributes": {"a.Images.img": {"min_processes": 2, "max_processes": 20}},
        "lib": ["/from/yaml"],
    })  # fmt: skip
    two = write_yaml(tmp_path / "two.yml", {"worker_options": {"GLOBAL": {"secret": "s"}}})
    s, sources = config.load_with_sources(
        cli={"configfile": [one, two], "job_runtime_attributes": {"a.Images.img": {"timeout": 9}},
             "lib": ["/from/cli"]},
        environ={"GDRIVER_WORKER_OPTIONS": '{"a.Images": {"quality": 30}}'},
    )  # fmt: skip
    assert s.worker_options == {
        "GLOBAL": {"dsn": "pg://db", "secret": "s"},
        "a.Images": {"max_size": 800, "quality": 30},
    }
    assert s.job_runtime_attributes == {
        "a.Images.img": {"min_processes": 2, "max_processes": 20, "timeout": 9.0}
    }
    assert s.lib == ("/from/cli",)  # lists replace
    assert sources["worker_options.GLOBAL.dsn"] == f"file {one}"
    assert sources["worker_options.GLOBAL.secret"] == f"file {two}"
    assert sources["worker_options.a.Images.quality"] == "env GDRIVER_WORKER_OPTIONS"
    assert sources["worker_options.a.Images.max_size"] == f"file {one}"
    assert sources["job_runtime_attributes.a.Images.img.timeout"] == "command line"
    assert sources["job_runtime_attributes.a.Images.img.min_processes"] == f"file {one}"
    assert sources["lib"] == "command line"
    assert "interval" not in sources  # the default


def test_min_above_max_after_merging_sources_is_refused(tmp_path: Path) -> None:
    one = write_yaml(tmp_path / "one.yml",
                     {"job_runtime_attributes": {"a.B.c": {"min_processes": 3}}})  # fmt: skip
    err = error_of(
        cli={"configfile": [one]},
        environ={"GDRIVER_JOB_RUNTIME_ATTRIBUTES": '{"a.B.c": {"max_processes": 2}}'},
    )
    assert err.key == "job_runtime_attributes" and "min_processes 3 > max_processes 2" in str(err)


# -- nothing silently ignored ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("GDRIVER_INTERVALL", " (did you mean GDRIVER_INTERVAL?)"),
        ("GDRIVER_SEVER", " (did you mean GDRIVER_SERVER?)"),
        ("GDRIVER_NAMESPACE", " (did you mean GDRIVER_NAMESPACES?)"),
        ("GDRIVER_UNRELATED", ""),
    ],
)
def test_unknown_gdriver_variables_are_errors_with_the_nearest_name(name: str, hint: str) -> None:
    err = error_of(environ={name: "3"})
    assert str(err) == f"{name} (env): unknown variable{hint}"


def test_unknown_yaml_key_suggests_the_nearest(tmp_path: Path) -> None:
    err = error_of(cli={"configfile": [write_yaml(tmp_path / "c.yml", {"intervall": 1})]})
    assert str(err).endswith("intervall (file " + str(tmp_path / "c.yml") + "): unknown key"
                             " (did you mean interval?)")  # fmt: skip


# -- every number has a range ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "key", "problem"),
    [
        ({"GDRIVER_JOB_RUNTIME_ATTRIBUTES": '{"a.B.c": {"timeout": 1e10}}'},
         "job_runtime_attributes", "a.B.c.timeout: must be a number between 0 and 2592000"),
        ({"GDRIVER_INTERVAL": "1e10"}, "interval", "between 0 and 3600"),
        ({"GDRIVER_GRACEFUL_TIMEOUT": "1e300"}, "graceful_timeout", "between 0 and 86400"),
        ({"GDRIVER_MAX_PROCESS_LIFETIME": "inf"}, "max_process_lifetime", "between 0 and"),
        ({"GDRIVER_MAX_JOBS_PER_PROCESS": "99999999999"}, "max_jobs_per_process", "between 0"),
        ({"GDRIVER_MAX_TOTAL_PROCESSES": "5000"}, "max_total_processes", "between 1 and 4096"),
        ({"GDRIVER_MAX_TOTAL_PROCESSES": "0"}, "max_total_processes", "between 1 and 4096"),
    ],
)  # fmt: skip
def test_numbers_out_of_range_name_the_key(environ: dict[str, str], key: str, problem: str) -> None:
    err = error_of(environ=environ)
    assert err.key == key and problem in err.problem, str(err)


def test_every_number_key_documents_its_range() -> None:
    for key, f in config.FIELDS.items():
        if isinstance(config.DEFAULTS.as_dict()[key], int | float) and f.type != "bool":
            assert f.metadata["span"], key


def test_process_counts_above_max_total_processes_are_refused(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "c.yml", {
        "max_total_processes": 50,
        "job_runtime_attributes": {"a.B.c": {"min_processes": 1, "max_processes": 100}},
    })  # fmt: skip
    err = error_of(cli={"configfile": [path]})
    assert err.key == "job_runtime_attributes" and err.source == f"file {path}"
    assert "a.B.c.max_processes: 100 is above max_total_processes 50" in err.problem
    err = error_of(environ={"GDRIVER_JOB_RUNTIME_ATTRIBUTES":
                            '{"a.B.c": {"min_processes": 100000000}}'})  # fmt: skip
    assert err.key == "job_runtime_attributes" and "between 0 and 4096" in err.problem
    assert 1 <= config.DEFAULTS.max_total_processes <= 4096


def test_jobs_total_check_for_the_loader_and_the_console() -> None:
    assert config.check_jobs_total(10, {"a": (2, 10), "b": (3, 10)}) == ""
    assert config.check_jobs_total(10, {"a": (2, 11)}) == (
        "job a: max_processes 11 is above max_total_processes 10"
    )
    assert config.check_jobs_total(10, {"a": (6, 6), "b": (5, 5)}) == (
        "min_processes of all jobs add up to 11, above max_total_processes 10"
    )


# -- one declaration per key -------------------------------------------------------------------


def test_the_readme_table_is_made_from_the_declarations() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert config.markdown_table() in readme
    for key in config.KEYS:
        assert config.HELP[key] and key in config.VALIDATORS
