"""The worker API: @job, attribute precedence, process groups, naming (Perl t/011 and §2)."""

from __future__ import annotations

import json
import logging
import os
import signal
from typing import Any

import pytest
import yaml
from live_helpers import FAST, call, show_pids, wait_registered
from support import Gdriver, Gearmand, running

from gdriver import Worker, job
from gdriver.jobs import JobSpec
from gdriver.loader import LoadError, build_worker, job_specs, load, worker_kwargs
from gdriver.worker import JOB_MARK, job_methods, merged_attributes, name_prefix


def specs_by_key(worker: Worker, runtime: dict[str, Any] | None = None) -> dict[str, JobSpec]:
    """job_specs keyed by the group (the part of the job name after the prefix)."""
    prefix = name_prefix(worker)
    return {s.name[len(prefix) :]: s for s in job_specs(worker, runtime)}


def methods_of(spec: JobSpec) -> dict[str, tuple[str, str]]:
    """method name -> (encode, decode)."""
    return {m.method: (m.encode, m.decode) for m in spec.methods}


# -- the decorator ------------------------------------------------------------------------------


def test_bare_decorator_marks_with_no_attributes() -> None:
    @job
    def f(self: Any, job: Any, workload: Any) -> None:
        return None

    assert getattr(f, JOB_MARK) == {}


def test_decorator_keeps_zero_and_false_but_drops_none() -> None:
    @job(min_processes=0, max_processes=None, encode=False)
    def f(self: Any, job: Any, workload: Any) -> None:
        return None

    assert getattr(f, JOB_MARK) == {"min_processes": 0, "encode": False}


def test_decorator_rejects_unknown_attributes_and_positional_values() -> None:
    with pytest.raises(TypeError, match=r"unknown attribute.*MinProcesses"):
        job(MinProcesses=2)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        job("not a function")  # type: ignore[call-overload]


def test_decorated_method_is_still_callable() -> None:
    class W(Worker):
        @job
        def echo(self, job: Any, workload: bytes) -> bytes:
            return workload

    assert W().echo(None, b"x") == b"x"


# -- defaults (t/011) ---------------------------------------------------------------------------


class Plain(Worker):
    @job
    def one(self, job: Any, workload: Any) -> str:
        return "one"

    def not_a_job(self, job: Any, workload: Any) -> str:
        return "no"

    @job(min_processes=2, max_processes=15, encode=True, decode="custom")
    def two(self, job: Any, workload: Any) -> str:
        return "two"

    def custom(self, workload: Any) -> Any:
        return workload


def test_decorator_defaults_min_1_max_1_and_identity_coding() -> None:
    specs = specs_by_key(Plain())
    assert sorted(specs) == ["one", "two"]  # not_a_job is not a job
    one = specs["one"]
    assert (one.min_processes, one.max_processes) == (1, 1)
    assert methods_of(one) == {"one": ("", "")}
    assert one.timeout == 0.0
    assert one.max_jobs_per_process is None and one.max_process_lifetime is None


def test_encode_true_means_encode_and_string_names_a_method() -> None:
    two = specs_by_key(Plain())["two"]
    assert (two.min_processes, two.max_processes) == (2, 15)
    assert methods_of(two) == {"two": ("encode", "custom")}


def test_decode_true_means_decode() -> None:
    class W(Worker):
        @job(decode=True)
        def a(self, job: Any, workload: Any) -> None:
            return None

    assert methods_of(specs_by_key(W())["a"]) == {"a": ("", "decode")}


def test_encode_naming_a_missing_method_is_a_load_error() -> None:
    class W(Worker):
        @job(encode="nope")
        def a(self, job: Any, workload: Any) -> None:
            return None

    with pytest.raises(LoadError, match=r"a: encode='nope' is not a method"):
        job_specs(W())


def test_only_min_given_max_defaults_to_max_of_1_and_min() -> None:
    class W(Worker):
        @job(min_processes=4)
        def four(self, job: Any, workload: Any) -> None:
            return None

        @job(min_processes=0)
        def zero(self, job: Any, workload: Any) -> None:
            return None

    specs = specs_by_key(W())
    assert (specs["four"].min_processes, specs["four"].max_processes) == (4, 4)
    assert (specs["zero"].min_processes, specs["zero"].max_processes) == (0, 1)


def test_min_greater_than_max_is_fatal() -> None:
    class W(Worker):
        @job(min_processes=3, max_processes=2)
        def a(self, job: Any, workload: Any) -> None:
            return None

    with pytest.raises(LoadError, match=r"min_processes 3 > max_processes 2"):
        job_specs(W())


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_invalid_process_counts_are_fatal(bad: Any) -> None:
    class W(Worker):
        @job(max_processes=bad)
        def a(self, job: Any, workload: Any) -> None:
            return None

    with pytest.raises(LoadError, match="max_processes: must be an integer between 0 and 4096"):
        job_specs(W())


def test_process_group_must_be_a_string() -> None:
    class W(Worker):
        default_attributes = {"process_group": 5}

        @job
        def a(self, job: Any, workload: Any) -> None:
            return None

    with pytest.raises(LoadError, match="process_group must be a string"):
        job_specs(W())


# -- default_attributes < decorator < override_attributes ----------------------------------------


class Precedence(Worker):
    default_attributes = {"min_processes": 2, "max_processes": 4, "encode": "enc"}
    override_attributes = {"decode": True}

    def enc(self, result: Any) -> Any:
        return result

    @job
    def plain(self, job: Any, workload: Any) -> None:
        return None

    @job(min_processes=3, encode=False, decode="other")
    def own(self, job: Any, workload: Any) -> None:
        return None

    def other(self, workload: Any) -> Any:
        return workload


def test_default_attributes_apply_unless_the_decorator_sets_them() -> None:
    specs = specs_by_key(Precedence())
    assert (specs["plain"].min_processes, specs["plain"].max_processes) == (2, 4)
    assert methods_of(specs["plain"]) == {"plain": ("enc", "decode")}
    # the decorator beats the defaults, override beats the decorator
    assert (specs["own"].min_processes, specs["own"].max_processes) == (3, 4)
    assert methods_of(specs["own"]) == {"own": ("", "decode")}


def test_merged_attributes_precedence_and_unknown_keys_warn() -> None:
    class W(Worker):
        default_attributes = {"min_processes": 1, "MinProcesses": 9, "encode": "a"}
        override_attributes = {"encode": "c"}

    with pytest.warns(UserWarning, match="invalid job attribute 'MinProcesses'"):
        merged = merged_attributes(W(), {"min_processes": 5, "encode": "b", "decode": None})
    assert merged == {"min_processes": 5, "encode": "c"}


def test_instance_attributes_count_not_only_class_attributes() -> None:
    """default/override_attributes are read from the instance (Perl: instance methods)."""

    class W(Worker):
        @job(min_processes=5)
        def a(self, job: Any, workload: Any) -> None:
            return None

    w = W(override_attributes={"min_processes": 0})
    spec = specs_by_key(w)["a"]
    assert (spec.min_processes, spec.max_processes) == (0, 1)


# -- process groups ------------------------------------------------------------------------------


def test_group_is_one_job_with_every_function_and_group_name() -> None:
    class W(Worker):
        prefix = "p."

        @job(process_group="img", min_processes=5, max_processes=10)
        def scale(self, job: Any, workload: Any) -> None:
            return None

        @job(process_group="img")
        def convert(self, job: Any, workload: Any) -> None:
            return None

        @job
        def alone(self, job: Any, workload: Any) -> None:
            return None

    specs = {s.name: s for s in job_specs(W())}
    assert sorted(specs) == ["p.alone", "p.img"]
    img = specs["p.img"]
    assert img.functions == ["p.scale", "p.convert"]
    assert (img.min_processes, img.max_processes) == (5, 10)
    assert img.key.endswith(".W.img")  # runtime key: module.Class.group, without the prefix


def test_first_min_in_a_group_wins_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    class W(Worker):
        @job(process_group="g", min_processes=2, max_processes=5)
        def a(self, job: Any, workload: Any) -> None:
            return None

        @job(process_group="g", min_processes=3, max_processes=5)
        def b(self, job: Any, workload: Any) -> None:
            return None

    with caplog.at_level(logging.WARNING, logger="gdriver.loader"):
        spec = specs_by_key(W())["g"]
    assert (spec.min_processes, spec.max_processes) == (2, 5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "min_processes redefined in process group g" in warnings[0]
    assert ".W.b" in warnings[0] and "keeping 2" in warnings[0]


def test_same_value_repeated_in_a_group_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    class W(Worker):
        @job(process_group="g", max_processes=3)
        def a(self, job: Any, workload: Any) -> None:
            return None

        @job(process_group="g", max_processes=3)
        def b(self, job: Any, workload: Any) -> None:
            return None

    with caplog.at_level(logging.WARNING, logger="gdriver.loader"):
        spec = specs_by_key(W())["g"]
    assert (spec.min_processes, spec.max_processes) == (1, 3)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("zero_first", [True, False])
def test_min_processes_zero_in_a_group_is_not_lost(zero_first: bool) -> None:
    """Perl's ``||=`` turned a group's MinProcesses(0) into 1 when another method lacked it."""

    def zero(self: Any, job: Any, workload: Any) -> None:
        return None

    def other(self: Any, job: Any, workload: Any) -> None:
        return None

    members = [
        ("a_zero", job(process_group="g", min_processes=0)(zero)),
        ("b_other", job(process_group="g")(other)),
    ]
    if not zero_first:
        members.reverse()
    W = type("W", (Worker,), dict(members))
    spec = specs_by_key(W())["g"]
    assert (spec.min_processes, spec.max_processes) == (0, 1)


def test_runtime_attributes_override_the_group() -> None:
    class W(Worker):
        @job(process_group="g", min_processes=1, max_processes=2)
        def a(self, job: Any, workload: Any) -> None:
            return None

    key = f"{W.__module__}.{W.__qualname__}.g"
    spec = specs_by_key(W(), {key: {"min_processes": 2, "max_processes": 10}})["g"]
    assert (spec.min_processes, spec.max_processes) == (2, 10)
    # a key for another job changes nothing
    spec = specs_by_key(W(), {key + "x": {"max_processes": 10}})["g"]
    assert (spec.min_processes, spec.max_processes) == (1, 2)
    with pytest.raises(LoadError, match="min_processes 5 > max_processes 2"):
        job_specs(W(), {key: {"min_processes": 5}})


def test_per_job_limits_are_carried() -> None:
    class W(Worker):
        @job(timeout=2.5, max_jobs_per_process=10, max_process_lifetime=60)
        def a(self, job: Any, workload: Any) -> None:
            return None

    spec = specs_by_key(W())["a"]
    assert spec.timeout == 2.5
    assert spec.max_jobs_per_process == 10
    assert spec.max_process_lifetime == 60.0


def test_invalid_timeout_is_a_load_error_not_a_crash() -> None:
    class W(Worker):
        @job(timeout="soon")  # type: ignore[arg-type]
        def a(self, job: Any, workload: Any) -> None:
            return None

    with pytest.raises(LoadError, match="timeout: must be a number between 0 and"):
        job_specs(W())


# -- inheritance ---------------------------------------------------------------------------------


def test_inherited_job_methods_count_and_the_nearest_definition_decides() -> None:
    class Base(Worker):
        @job(max_processes=2)
        def shared(self, job: Any, workload: Any) -> str:
            return "base"

        @job
        def replaced(self, job: Any, workload: Any) -> str:
            return "base"

    class Child(Base):
        def replaced(self, job: Any, workload: Any) -> str:  # no longer a job
            return "child"

        @job
        def own(self, job: Any, workload: Any) -> str:
            return "child"

    names = [name for name, _, _ in job_methods(Child)]
    assert names == ["shared", "own"]
    specs = specs_by_key(Child())
    assert sorted(specs) == ["own", "shared"]
    assert specs["shared"].max_processes == 2
    assert specs["shared"].name.endswith(".Child.shared")


# -- naming --------------------------------------------------------------------------------------


def test_default_prefix_is_module_and_class() -> None:
    assert name_prefix(Plain()) == f"{__name__}.Plain."
    assert [s.name for s in job_specs(Plain())] == [
        f"{__name__}.Plain.one",
        f"{__name__}.Plain.two",
    ]


def test_prefix_attribute_method_and_empty() -> None:
    class Attr(Worker):
        prefix = "foo_bar_"

        @job
        def method(self, job: Any, workload: Any) -> None:
            return None

    class Meth(Worker):
        def prefix(self) -> str:  # type: ignore[override]
            return "m_"

        @job(process_group="grp")
        def method(self, job: Any, workload: Any) -> None:
            return None

    class Bare(Worker):
        prefix = ""

        @job
        def ping(self, job: Any, workload: Any) -> None:
            return None

    assert [(s.name, s.functions) for s in job_specs(Attr())] == [
        ("foo_bar_method", ["foo_bar_method"])
    ]
    assert [(s.name, s.functions) for s in job_specs(Meth())] == [("m_grp", ["m_method"])]
    assert [(s.name, s.functions) for s in job_specs(Bare())] == [("ping", ["ping"])]


def test_prefix_must_be_a_string() -> None:
    class W(Worker):
        prefix = 5  # type: ignore[assignment]

        @job
        def a(self, job: Any, workload: Any) -> None:
            return None

    with pytest.raises(LoadError, match=r"\.W: TypeError: .*W\.prefix must be a string, got 5"):
        job_specs(W())


def test_prefix_method_that_raises_is_a_load_error() -> None:
    class W(Worker):
        def prefix(self) -> str:  # type: ignore[override]
            raise RuntimeError("no prefix today")

        @job
        def a(self, job: Any, workload: Any) -> None:
            return None

    with pytest.raises(LoadError, match="RuntimeError: no prefix today"):
        job_specs(W())


def test_attribute_maps_must_be_dicts() -> None:
    class W(Worker):
        default_attributes = [("min_processes", 1)]  # type: ignore[assignment]

        @job
        def a(self, job: Any, workload: Any) -> None:
            return None

    with pytest.raises(LoadError, match=r"default_attributes must be a dict"):
        job_specs(W())


# -- worker instances ----------------------------------------------------------------------------


class Opts(Worker):
    pass


def test_worker_kwargs_global_then_class_then_server() -> None:
    options = {
        "GLOBAL": {"foo": "global", "global_foo": "global", "server": "wrong:1"},
        "Opts": {"foo": "bare", "bare_only": 1},
        f"{__name__}.Opts": {"foo": "full"},
        "Other": {"foo": "other"},
    }
    kwargs = worker_kwargs(Opts, options, "127.0.0.1:4730")
    assert kwargs == {
        "foo": "full",
        "global_foo": "global",
        "bare_only": 1,
        "server": "127.0.0.1:4730",
    }
    worker = build_worker(Opts, options, "127.0.0.1:4730")
    assert isinstance(worker, Opts)
    assert (worker.foo, worker.global_foo, worker.server) == ("full", "global", "127.0.0.1:4730")  # type: ignore[attr-defined]


def test_options_do_not_leak_between_classes_or_calls() -> None:
    options: dict[str, dict[str, Any]] = {"GLOBAL": {"a": 1}, "Opts": {"b": 2}}
    worker_kwargs(Opts, options, "s")
    assert options == {"GLOBAL": {"a": 1}, "Opts": {"b": 2}}  # not mutated (Perl 0.02004 bug)
    assert worker_kwargs(Plain, options, "s") == {"a": 1, "server": "s"}


def test_a_failing_constructor_is_a_load_error() -> None:
    class Picky(Worker):
        def __init__(self, server: str | None = None) -> None:
            super().__init__(server)

    with pytest.raises(LoadError, match=r"cannot create worker .*Picky: TypeError"):
        build_worker(Picky, {"GLOBAL": {"unexpected": 1}}, "s")


def test_hooks_have_harmless_defaults() -> None:
    w = Worker(server="h:1", extra=3)
    assert w.server == "h:1" and w.extra == 3  # type: ignore[attr-defined]
    assert w.begin(None, b"") is None
    assert w.end(None, b"", None) is None
    assert w.on_exception(None, b"", ValueError()) is None
    assert w.process_name("orig", "job") is None
    assert w.encode(b"x") == b"x" and w.decode(b"y") == b"y"


# -- the live workers' parsed attributes (t/011 table) -------------------------------------------


def live_specs(module: str) -> dict[str, JobSpec]:
    return {s.name: s for s in load([module], server="127.0.0.1:1")}


def test_t011_encode_decode() -> None:
    (spec,) = live_specs("live.encode_decode").values()
    assert spec.name == "live.encode_decode.EncodeDecode.group1"
    assert (spec.min_processes, spec.max_processes) == (1, 1)
    assert methods_of(spec) == {
        "job1": ("", "decode"),
        "job2": ("", "custom_decode"),
        "job3": ("encode", ""),
        "job4": ("custom_encode", ""),
        "job5": ("", ""),
        "job6": ("encode", "decode"),
        "job7": ("custom_encode", "custom_decode"),
    }
    assert spec.functions[0] == "live.encode_decode.EncodeDecode.job1"


def test_t011_default_and_override_attributes() -> None:
    (spec,) = live_specs("live.default_attributes").values()
    assert spec.name == "live.default_attributes.DefaultAttributes.group1"
    assert methods_of(spec) == {
        "job1": ("enc", "dec"),
        "job2": ("enc", "dec"),
        "job3": ("", "dec"),  # the decorator's encode=False beats the default
        "job4": ("enc", "dec"),
    }
    specs = live_specs("live.override_attributes")
    assert sorted(specs) == [
        "live.override_attributes.OverrideAttributes.job1",
        "live.override_attributes.OverrideAttributes.job2",
    ]
    for spec in specs.values():
        assert (spec.min_processes, spec.max_processes) == (0, 1)  # override min 0 beats min 5
        assert [(m.encode, m.decode) for m in spec.methods] == [("encode", "decode")]


def test_t011_process_group_max_idle_time_prefix() -> None:
    specs = live_specs("live.process_group")
    assert sorted(specs) == [
        "live.process_group.ProcessGroup.group1",
        "live.process_group.ProcessGroup.job5",
    ]
    group = specs["live.process_group.ProcessGroup.group1"]
    assert [m.method for m in group.methods] == ["job1", "job2", "job3", "job4"]
    (idle,) = live_specs("live.max_idle_time").values()
    assert (idle.min_processes, idle.max_processes) == (0, 1)
    assert [s.functions for s in live_specs("live.prefix").values()] == [["ping"]]
    prefixed = live_specs("live.prefix_method")
    assert {n: s.functions for n, s in prefixed.items()} == {
        "foo_bar_grp": ["foo_bar_first", "foo_bar_second"],
        "foo_bar_method": ["foo_bar_method"],
    }


# -- after_fork and Worker.client, live ----------------------------------------------------------


def test_after_fork_runs_once_per_process_and_client_submits_follow_up_jobs(
    gearmand: Gearmand,
) -> None:
    af = "live.after_fork.AfterFork."
    with running(gearmand, *FAST, "--namespaces", "live.after_fork") as g:
        wait_registered(gearmand, af + "whoami", af + "follow_up")
        seen = set()
        for _ in range(6):
            pid, opened_in, calls = call(gearmand, af + "whoami").decode().split()
            assert (pid, calls) == (opened_in, "1")  # in this process, once
            seen.add(int(pid))
        assert g.pid not in seen  # never in the supervisor
        pid, opened_in, calls = call(gearmand, af + "follow_up").decode().split()
        assert pid == opened_in and int(pid) in set(show_pids(g, af + "whoami"))


def test_a_reload_that_drops_a_console_override_says_so(gearmand: Gearmand) -> None:
    ping = "obs.console.Console.ping"
    with running(gearmand, *FAST, "--namespaces", "obs.console", config={}) as g:
        assert g.console(f"set_max_processes {ping} 3") == ["OK"]
        os.kill(g.pid, signal.SIGHUP)
        record = g.wait_log(lambda r: r.get("event") == "override_dropped")
        assert record["job_name"] == ping and "max 3" in record["message"]
        g.wait_log(lambda r: r.get("event") == "reloaded")
        assert g.console(f"show {ping}")[0].startswith(f"{ping}  0  1  ")
        assert len([r for r in g.records() if r.get("event") == "override_dropped"]) == 1


def test_worker_options_merge_key_by_key_across_files_and_environment(gearmand: Gearmand) -> None:
    cls = "live.options.Options"
    g = Gdriver(
        gearmand,
        *FAST,
        "--namespaces",
        "live.options",
        env={"GDRIVER_WORKER_OPTIONS": json.dumps({cls: {"secret": "s"}})},
    )
    (g.tmp / "a.yml").write_text(
        yaml.safe_dump({"worker_options": {"GLOBAL": {"a": 1}, cls: {"max_size": 10}}})
    )
    (g.tmp / "b.yml").write_text(yaml.safe_dump({"worker_options": {cls: {"quality": 5}}}))
    g.args += ["--configfile", str(g.tmp / "a.yml"), "--configfile", str(g.tmp / "b.yml")]
    with g:
        wait_registered(gearmand, "live.options.Options.options_seen")
        seen = json.loads(call(gearmand, "live.options.Options.options_seen"))
    assert seen == {"a": 1, "max_size": 10, "quality": 5, "secret": "s"}
