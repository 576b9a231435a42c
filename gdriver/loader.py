"""Find worker classes in namespaces and turn them into job specs."""

from __future__ import annotations

import importlib
import importlib.machinery
import inspect
import logging
import os
import pkgutil
import sys
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

from gdriver.attributes import DEFAULTS, RUNTIME_NAMES, check_all, limits, nearest
from gdriver.jobs import JobSpec, MethodSpec
from gdriver.worker import Worker, job_methods, merged_attributes, name_prefix

log = logging.getLogger("gdriver.loader")


class LoadError(Exception):
    """A worker module could not be imported or its jobs are inconsistent."""


def add_lib(paths: Iterable[str]) -> None:
    """Append directories to sys.path (lowest priority, as Perl's @INC push)."""
    for path in map(os.path.abspath, paths):
        if path not in sys.path:
            sys.path.append(path)


def import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except BaseException as exc:  # sys.exit() at import, too: one line, never our exit code
        raise LoadError(f"cannot import worker module {name}: {type(exc).__name__}: {exc}") from exc


def module_names(namespace: str, wanted: Callable[[str], bool] | None = None) -> list[str]:
    """The namespace and every module below it, sorted; filtered by ``wanted``.

    Sub-directories without ``__init__.py`` (namespace packages) are walked too, as Python
    imports them and Perl's Module::Find found every module below a namespace."""
    root = import_module(namespace)
    names = [namespace]
    path = getattr(root, "__path__", None)
    if path is not None:
        names.extend(_walk(list(path), namespace + ".", set()))
    names = sorted(set(names))
    if wanted is not None:
        names = [n for n in names if wanted(n)]
    return names


def _walk(path: list[str], prefix: str, seen: set[str]) -> list[str]:
    """Names of the modules and packages below ``path`` (imports the packages to descend).
    ``seen``: directories already walked (symbolic link loops end there)."""
    path = [p for p in path if os.path.realpath(p) not in seen]
    seen.update(os.path.realpath(p) for p in path)
    found: list[str] = []
    packages: list[str] = []
    for info in pkgutil.iter_modules(path, prefix):
        found.append(info.name)
        if info.ispkg:
            packages.append(info.name)
    for entry in path:
        try:
            children = sorted(os.listdir(entry))
        except OSError:
            continue
        for child in children:
            name = prefix + child
            if (
                child.isidentifier()
                and child != "__pycache__"
                and name not in found
                and os.path.isdir(os.path.join(entry, child))
                and not any(
                    os.path.exists(os.path.join(entry, child, f"__init__{suffix}"))
                    for suffix in importlib.machinery.all_suffixes()
                )
            ):
                found.append(name)
                packages.append(name)
    for name in packages:
        sub = getattr(import_module(name), "__path__", None)
        if sub is not None:
            found.extend(_walk(list(sub), name + ".", seen))
    return found


def worker_classes(
    namespaces: Iterable[str], wanted: Callable[[str], bool] | None = None
) -> list[type[Worker]]:
    """Worker subclasses with at least one job method, counted where they are defined."""
    found: dict[str, type[Worker]] = {}
    for namespace in sorted(namespaces):
        for name in module_names(namespace, wanted):
            module = import_module(name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if (
                    issubclass(obj, Worker)
                    and obj is not Worker
                    and obj.__module__ == module.__name__
                    and job_methods(obj)
                ):
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


def class_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def worker_kwargs(
    cls: type, worker_options: Mapping[str, Mapping[str, Any]], server: str
) -> dict[str, Any]:
    """GLOBAL options, then the class's own (by module.Class or bare class name), then server."""
    options: dict[str, Any] = dict(worker_options.get("GLOBAL", {}))
    for key in (cls.__qualname__, class_key(cls)):
        options.update(worker_options.get(key, {}))
    options["server"] = server
    return options


def build_worker(
    cls: type[Worker], worker_options: Mapping[str, Mapping[str, Any]], server: str
) -> Worker:
    kwargs = worker_kwargs(cls, worker_options, server)
    try:
        worker = cls(**kwargs)
    except Exception as exc:
        raise LoadError(
            f"cannot create worker {class_key(cls)}: {type(exc).__name__}: {exc}"
        ) from exc
    if getattr(worker, "server", None) is None:
        worker.server = server  # an __init__ that dropped it: Worker.client needs it
    return worker


def coder_name(worker: object, value: Any, default: str, what: str, method: str) -> str:
    """encode/decode attribute -> name of a worker method ("" = identity)."""
    if value is True:
        value = default
    if value in (False, None, ""):
        return ""
    if not isinstance(value, str) or not callable(getattr(worker, value, None)):
        raise LoadError(
            f"{class_key(type(worker))}.{method}: {what}={value!r} is not a method of the worker"
        )
    return value


def job_specs(
    worker: Worker, runtime_attributes: Mapping[str, Mapping[str, Any]] | None = None
) -> list[JobSpec]:
    """Group a worker's job methods into jobs (one per process group) with their limits.

    Any problem (a bad prefix, attribute or limit) is a LoadError naming the class."""
    try:
        return _job_specs(worker, runtime_attributes)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"{class_key(type(worker))}: {type(exc).__name__}: {exc}") from exc


def _job_specs(
    worker: Worker, runtime_attributes: Mapping[str, Mapping[str, Any]] | None
) -> list[JobSpec]:
    cls = type(worker)
    prefix = name_prefix(worker)
    groups: dict[str, JobSpec] = {}
    explicit: dict[str, dict[str, Any]] = {}
    for method, func, decorator in job_methods(cls):
        attrs = merged_attributes(worker, decorator)
        group = attrs.get("process_group") or method
        if not isinstance(group, str):
            raise LoadError(f"{class_key(cls)}.{method}: process_group must be a string")
        mspec = MethodSpec(
            function=prefix + method,
            method=method,
            body=func,
            encode=coder_name(worker, attrs.get("encode"), "encode", "encode", method),
            decode=coder_name(worker, attrs.get("decode"), "decode", "decode", method),
        )
        if group not in groups:
            groups[group] = JobSpec(
                name=prefix + group, worker=worker, methods=[], key=f"{class_key(cls)}.{group}"
            )
            explicit[group] = {}
        groups[group].methods.append(mspec)
        _first_wins(explicit[group], attrs, f"process group {group} at {class_key(cls)}.{method}")
    runtime_attributes = runtime_attributes or {}
    for group, spec in groups.items():
        apply_attributes(spec, explicit[group], runtime_attributes.get(spec.key, {}))
    return list(groups.values())


def _first_wins(seen: dict[str, Any], attrs: Mapping[str, Any], where: str) -> None:
    """In a process group the first method that sets a run-time attribute wins."""
    for attr in RUNTIME_NAMES:
        if attr not in attrs:
            continue
        if attr in seen and seen[attr] != attrs[attr]:
            log.warning("%s redefined in %s: keeping %s", attr, where, seen[attr])
            continue
        seen.setdefault(attr, attrs[attr])


def apply_attributes(
    spec: JobSpec, explicit: Mapping[str, Any], runtime: Mapping[str, Any] | None = None
) -> None:
    """Check the code's attributes and job_runtime_attributes (which win) against the schema
    and set them on the spec."""
    try:
        attrs = check_all(explicit, runtime_only=True, strict=True)
        attrs.update(check_all(runtime or {}, runtime_only=True))
        spec.min_processes, spec.max_processes = limits(attrs)
    except ValueError as exc:
        raise LoadError(f"job {spec.name}: {exc}") from None
    spec.timeout = attrs.get("timeout", DEFAULTS["timeout"])
    spec.max_jobs_per_process = attrs.get("max_jobs_per_process", DEFAULTS["max_jobs_per_process"])
    spec.max_process_lifetime = attrs.get("max_process_lifetime", DEFAULTS["max_process_lifetime"])


def check_unique(specs: Iterable[JobSpec]) -> None:
    """Duplicate job or function names are fatal (Perl silently replaced the first job)."""
    jobs: dict[str, JobSpec] = {}
    functions: dict[str, str] = {}
    for spec in specs:
        if spec.name in jobs:
            raise LoadError(
                f"duplicate job name {spec.name} ({spec.key} and {jobs[spec.name].key})"
            )
        jobs[spec.name] = spec
        for fn in spec.functions:
            if fn in functions:
                raise LoadError(
                    f"duplicate function name {fn} (jobs {functions[fn]} and {spec.name})"
                )
            functions[fn] = spec.name


def load(
    namespaces: Iterable[str],
    lib: Iterable[str] = (),
    worker_options: Mapping[str, Mapping[str, Any]] | None = None,
    runtime_attributes: Mapping[str, Mapping[str, Any]] | None = None,
    server: str = "localhost:4730",
    wanted: Callable[[str], bool] | None = None,
) -> list[JobSpec]:
    """Import every worker of the namespaces, build one instance per class, return the jobs."""
    add_lib(lib)
    specs: list[JobSpec] = []
    classes = worker_classes(namespaces, wanted)
    class_names = ["GLOBAL", *(class_key(c) for c in classes), *(c.__qualname__ for c in classes)]
    check_keys("worker_options", worker_options or {}, class_names)
    for cls in classes:
        worker = build_worker(cls, worker_options or {}, server)
        specs.extend(job_specs(worker, runtime_attributes))
    check_unique(specs)
    check_keys("job_runtime_attributes", runtime_attributes or {}, [s.key for s in specs])
    return sorted(specs, key=lambda s: s.name)


def check_keys(setting: str, values: Mapping[str, Any], known: list[str]) -> None:
    """A key that names no loaded class or job would be silently ignored: refuse it."""
    for key in sorted(set(values) - set(known)):
        what = "class" if setting == "worker_options" else "job"
        raise LoadError(f"{setting}: {key!r} names no loaded {what}{nearest(key, known)}")


def manual_spec(
    name: str,
    worker: Worker,
    methods: Iterable[Mapping[str, Any]],
    min_processes: int | None,
    max_processes: int | None,
    limits: Mapping[str, Any],
) -> JobSpec:
    """The spec of a job registered by hand (``Driver.add_job``), checked like ``@job``
    (ValueError, TypeError). ``methods``: dicts with ``name``, ``body`` (called as
    ``body(worker, job, workload)``; a bound method as ``body(job, workload)``), and optional
    ``encode``/``decode``. Names get the worker's prefix."""
    if not isinstance(worker, Worker):
        raise TypeError("worker must be an instance of gdriver.Worker")
    prefix = name_prefix(worker)
    specs = []
    for m in methods:
        body = m["body"]
        if inspect.ismethod(body):
            bound = body
            body = lambda _w, job, workload, _b=bound: _b(job, workload)  # noqa: E731
        try:
            encode = coder_name(worker, m.get("encode"), "encode", "encode", m["name"])
            decode = coder_name(worker, m.get("decode"), "decode", "decode", m["name"])
        except LoadError as exc:
            raise ValueError(str(exc)) from None
        specs.append(MethodSpec(prefix + m["name"], m["name"], body, encode, decode))
    if not specs:
        raise ValueError(f"job {prefix + name}: no methods")
    spec = JobSpec(name=prefix + name, worker=worker, methods=specs,
                   key=f"{class_key(type(worker))}.{name}")  # fmt: skip
    given = {"min_processes": min_processes, "max_processes": max_processes, **limits}
    try:
        apply_attributes(spec, given)  # the per-job attribute schema
    except LoadError as exc:
        raise ValueError(str(exc)) from None
    return spec
