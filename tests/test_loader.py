"""The loader: namespace walk, wanted filter, lib dirs, import errors (Perl t/010, §2.1)."""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import gdriver
from gdriver.loader import LoadError, add_lib, load, module_names, worker_classes

WORKER = """
from gdriver import Worker, job


class {cls}(Worker):
    prefix = {prefix!r}

    @job(min_processes=0)
    def {method}(self, job, workload):
        return {result!r}
"""


@pytest.fixture()
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Write modules under tmp dirs: tree({"a/__init__.py": "...", ...}, root=...) returns a
    unique top-level package name (use {top} in paths and code). Without root the files go
    to tmp_path, which is put on sys.path. sys.path and sys.modules are restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    tops: list[str] = []

    def make(files: dict[str, str], root: Path | None = None, top: str | None = None) -> str:
        top = top or f"gdt_{uuid.uuid4().hex[:10]}"
        tops.append(top)
        base = root or tmp_path
        if root is None and str(tmp_path) not in sys.path:
            sys.path.insert(0, str(tmp_path))
        for rel, text in files.items():
            path = base / rel.format(top=top)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text).replace("{top}", top))
        importlib.invalidate_caches()
        return top

    yield make
    for name in list(sys.modules):
        if any(name == t or name.startswith(t + ".") for t in tops):
            del sys.modules[name]


def names(classes: list[type]) -> list[str]:
    return [f"{c.__module__}.{c.__qualname__}" for c in classes]


# -- walking the live workers -------------------------------------------------------------------


def test_package_with_submodules_is_walked_recursively() -> None:
    assert names(worker_classes(["live.nested"])) == [
        "live.nested.alpha.Alpha",
        "live.nested.deeper.Deeper",  # a subpackage's own __init__ counts
        "live.nested.deeper.beta.Beta",  # NoJobs and NotAWorker in that module do not
    ]
    assert module_names("live.nested") == [
        "live.nested",
        "live.nested.alpha",
        "live.nested.deeper",
        "live.nested.deeper.beta",
    ]


def test_namespace_package_without_init_as_the_namespace() -> None:
    assert names(worker_classes(["live.nsonly"])) == ["live.nsonly.gamma.Gamma"]


def test_namespace_package_below_a_regular_package_is_walked_too() -> None:
    found = module_names("live")
    assert "live.nsonly" in found and "live.nsonly.gamma" in found
    assert "live.nested.deeper.beta" in found
    assert not [n for n in found if "__pycache__" in n]


def test_single_module_as_namespace() -> None:
    assert names(worker_classes(["live.prefix"])) == ["live.prefix.Prefix"]
    assert module_names("live.prefix") == ["live.prefix"]


def test_root_module_itself_is_loaded_when_it_holds_workers() -> None:
    classes = names(worker_classes(["live"]))
    assert "live.Live" in classes
    assert "live.basic.Basic" in classes
    # classes without job methods (live.base.All, TestWorker) are not workers
    assert "live.base.All" not in classes and "live.base.TestWorker" not in classes
    assert classes == sorted(classes)


def test_wanted_filter() -> None:
    """t/010: wanted(/Begin|Max|Spread/) -> BeginEnd, MaxIdleTime, Spread; the root is out."""
    pattern = re.compile(r"\.(begin_end|max_idle_time|spread)$")

    def wanted(name: str) -> bool:
        return bool(pattern.search(name))

    expected = [
        "live.begin_end.BeginEnd",
        "live.max_idle_time.MaxIdleTime",
        "live.spread.Spread",
    ]
    assert names(worker_classes(["live"], wanted)) == expected
    specs = load(["live"], wanted=wanted, server="127.0.0.1:1")
    assert {s.name.rsplit(".", 1)[0] for s in specs} == set(expected)
    assert [s.name for s in specs] == sorted(s.name for s in specs)


def test_wanted_filter_through_driver() -> None:
    driver = gdriver.Driver(
        namespaces=["live"], server="127.0.0.1:1", wanted=lambda n: n.endswith(".process_group")
    )
    driver.load()
    assert [j.name for j in driver.get_jobs()] == [
        "live.process_group.ProcessGroup.group1",
        "live.process_group.ProcessGroup.job5",
    ]


def test_imported_class_is_counted_only_where_defined() -> None:
    assert names(worker_classes(["live.reexport"])) == ["live.reexport.Reexport"]
    both = worker_classes(["live.reexport", "live.prefix_method"])
    assert names(both) == ["live.prefix_method.PrefixMethod", "live.reexport.Reexport"]
    specs = load(["live.reexport", "live.prefix_method"], server="127.0.0.1:1")
    assert sorted(s.name for s in specs) == [
        "foo_bar_grp",
        "foo_bar_method",
        "live.reexport.Reexport.own",
    ]


def test_one_instance_per_class_shared_by_its_jobs() -> None:
    specs = load(["live.process_group"], server="127.0.0.1:9")
    assert len(specs) == 2
    assert specs[0].worker is specs[1].worker
    assert specs[0].worker.server == "127.0.0.1:9"


# -- tmp trees: lib dirs, errors, duplicates ----------------------------------------------------


def test_lib_dir_is_added_and_used(tree: Callable[..., str], tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    top = tree(
        {
            "{top}/__init__.py": "",
            "{top}/one.py": WORKER.format(cls="One", prefix="", method="lib_one", result="1"),
        },
        root=lib,
    )
    assert str(lib) not in sys.path
    specs = load([top], lib=[str(lib)], server="127.0.0.1:1")
    assert [s.functions for s in specs] == [["lib_one"]]
    assert sys.path[-1] == str(lib)  # appended: lowest priority, like Perl's push @INC
    add_lib([str(lib)])
    assert sys.path.count(str(lib)) == 1


def test_lib_dirs_have_lowest_priority(
    tree: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    top = tree(
        {"{top}.py": WORKER.format(cls="W", prefix="first_", method="m", result="1")}, root=first
    )
    tree({"{top}.py": WORKER.format(cls="W", prefix="second_", method="m", result="2")},
         root=second, top=top)  # fmt: skip
    monkeypatch.syspath_prepend(str(first))
    specs = load([top], lib=[str(second)], server="127.0.0.1:1")
    assert [s.name for s in specs] == ["first_m"]


def test_namespace_package_spanning_two_lib_dirs(tree: Callable[..., str], tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    top = tree({"{top}/x.py": WORKER.format(cls="X", prefix="ns_", method="x", result="x")}, root=a)
    tree({"{top}/y.py": WORKER.format(cls="Y", prefix="ns_", method="y", result="y")},
         root=b, top=top)  # fmt: skip
    specs = load([top], lib=[str(a), str(b)], server="127.0.0.1:1")
    assert [s.name for s in specs] == ["ns_x", "ns_y"]


def test_missing_namespace_is_fatal() -> None:
    with pytest.raises(LoadError, match=r"cannot import worker module gdt_missing_\w+: Module"):
        load([f"gdt_missing_{uuid.uuid4().hex[:8]}"], server="127.0.0.1:1")


@pytest.mark.parametrize(
    "body, error",
    [
        ("raise RuntimeError('exploded at import')", "RuntimeError: exploded at import"),
        ("import gdt_no_such_dependency_xyz", "ModuleNotFoundError"),
        ("def broken(:\n    pass", "SyntaxError"),
    ],
)
def test_import_error_in_a_submodule_is_fatal_and_names_it(
    tree: Callable[..., str], body: str, error: str
) -> None:
    top = tree(
        {
            "{top}/__init__.py": "",
            "{top}/good.py": WORKER.format(cls="G", prefix="g_", method="m", result="g"),
            "{top}/sub/__init__.py": "",
            "{top}/sub/bad.py": body,
        }
    )
    with pytest.raises(LoadError) as info:
        load([top], server="127.0.0.1:1")
    message = str(info.value)
    assert f"cannot import worker module {top}.sub.bad" in message
    assert error in message


def test_import_error_in_a_subpackage_init_is_fatal(tree: Callable[..., str]) -> None:
    top = tree({"{top}/__init__.py": "", "{top}/pkg/__init__.py": "raise ValueError('init')"})
    with pytest.raises(LoadError, match=rf"cannot import worker module {top}\.pkg: ValueError"):
        load([top], server="127.0.0.1:1")


def test_import_error_is_not_hidden_by_wanted_when_the_module_is_wanted(
    tree: Callable[..., str],
) -> None:
    top = tree({"{top}/__init__.py": "", "{top}/bad.py": "raise ImportError('nope')"})
    # filtered out: never imported, so no error
    assert load([top], wanted=lambda n: not n.endswith(".bad"), server="127.0.0.1:1") == []
    with pytest.raises(LoadError, match=rf"{top}\.bad: ImportError: nope"):
        load([top], server="127.0.0.1:1")


def test_duplicate_function_names_across_classes_are_fatal(tree: Callable[..., str]) -> None:
    top = tree(
        {
            "{top}/__init__.py": "",
            "{top}/a.py": WORKER.format(cls="A", prefix="", method="same", result="a"),
            "{top}/b.py": WORKER.format(cls="B", prefix="", method="same", result="b"),
        }
    )
    with pytest.raises(LoadError, match="duplicate job name same"):
        load([top], server="127.0.0.1:1")


def test_duplicate_function_in_different_jobs_is_fatal(tree: Callable[..., str]) -> None:
    top = tree(
        {
            "{top}/__init__.py": "",
            "{top}/a.py": """
                from gdriver import Worker, job

                class A(Worker):
                    prefix = "dup_"

                    @job(process_group="g1")
                    def same(self, job, workload):
                        return "a"
            """,
            "{top}/b.py": """
                from gdriver import Worker, job

                class B(Worker):
                    prefix = "dup_"

                    @job(process_group="g2")
                    def same(self, job, workload):
                        return "b"
            """,
        }
    )
    with pytest.raises(LoadError, match=r"duplicate function name dup_same \(jobs dup_g1 and"):
        load([top], server="127.0.0.1:1")


def test_min_greater_than_max_in_a_module_is_fatal(tree: Callable[..., str]) -> None:
    top = tree(
        {
            "{top}.py": """
                from gdriver import Worker, job

                class W(Worker):
                    @job(min_processes=4, max_processes=2)
                    def m(self, job, workload):
                        return ""
            """
        }
    )
    with pytest.raises(LoadError, match=rf"job {top}\.W\.m: min_processes 4 > max_processes 2"):
        load([top], server="127.0.0.1:1")


def test_runtime_attributes_for_unknown_jobs_are_fatal_with_the_nearest_name() -> None:
    with pytest.raises(LoadError) as info:
        load(
            ["live.max_idle_time"],
            runtime_attributes={"live.max_idle_time.MaxIdleTime.get_pdi": {"max_processes": 3}},
            server="127.0.0.1:1",
        )
    assert str(info.value) == (
        "job_runtime_attributes: 'live.max_idle_time.MaxIdleTime.get_pdi' names no loaded job"
        " (did you mean live.max_idle_time.MaxIdleTime.get_pid?)"
    )


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("live.runtime_option.RuntimeOptoin", " (did you mean live.runtime_option.RuntimeOption?)"),
        ("Global", " (did you mean GLOBAL?)"),
        ("elsewhere.Nothing", ""),
    ],
)
def test_worker_options_for_classes_not_loaded_are_fatal(key: str, hint: str) -> None:
    with pytest.raises(LoadError) as info:
        load(["live.runtime_option"], worker_options={key: {"foo": 1}}, server="127.0.0.1:5")
    assert str(info.value) == f"worker_options: {key!r} names no loaded class{hint}"


def test_worker_options_by_bare_class_name_and_global_are_known() -> None:
    (spec,) = load(
        ["live.runtime_option"],
        worker_options={"GLOBAL": {"foo": "g"}, "RuntimeOption": {"foo": "bare"}},
        server="127.0.0.1:5",
    )[:1]
    assert spec.worker.foo == "bare"


def test_worker_options_reach_the_instances() -> None:
    (spec,) = load(
        ["live.runtime_option"],
        worker_options={
            "GLOBAL": {"foo": "GlobalTest", "global_foo": "GlobalTest"},
            "live.runtime_option.RuntimeOption": {"foo": "Test"},
        },
        server="127.0.0.1:5",
    )[:1]
    worker = spec.worker
    assert (worker.foo, worker.global_foo, worker.server) == ("Test", "GlobalTest", "127.0.0.1:5")


def test_symbolic_link_loops_end(tree: Callable[..., str], tmp_path: Path) -> None:
    top = tree(
        {
            "{top}/__init__.py": "",
            "{top}/w.py": WORKER.format(cls="W", prefix="loop_", method="m", result="w"),
            "{top}/ns/x.py": WORKER.format(cls="X", prefix="loop_", method="x", result="x"),
        }
    )
    (tmp_path / top / "again").symlink_to(tmp_path / top, target_is_directory=True)
    (tmp_path / top / "ns" / "back").symlink_to(tmp_path / top / "ns", target_is_directory=True)
    found = module_names(top)
    assert f"{top}.w" in found and f"{top}.ns.x" in found
    assert len(found) < 10, found
    specs = load([top], server="127.0.0.1:1")
    assert [s.name for s in specs] == ["loop_m", "loop_x"]
