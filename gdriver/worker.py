"""The public worker API: subclass :class:`Worker`, mark methods with :func:`job`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from gdriver.attributes import NAMES as JOB_ATTRIBUTES

if TYPE_CHECKING:
    import gearman as pygearman

    from gdriver.gearman import Job

F = TypeVar("F", bound=Callable[..., Any])

JOB_MARK = "__gdriver_job__"


@overload
def job(func: F) -> F: ...
@overload
def job(
    func: None = None,
    *,
    min_processes: int | None = None,
    max_processes: int | None = None,
    encode: bool | str | None = None,
    decode: bool | str | None = None,
    process_group: str | None = None,
    timeout: float | None = None,
    max_jobs_per_process: int | None = None,
    max_process_lifetime: float | None = None,
) -> Callable[[F], F]: ...


def job(func: Callable[..., Any] | None = None, **attributes: Any) -> Any:
    """Mark a method of a :class:`Worker` as a Gearman job.

    ``@job`` alone gives one process (min 1, max 1). Keyword arguments: ``min_processes``,
    ``max_processes``, ``encode`` / ``decode`` (True for the worker's ``encode``/``decode``
    methods, or the name of another method), ``process_group``, and the per-job process
    limits ``timeout``, ``max_jobs_per_process``, ``max_process_lifetime``.
    """
    unknown = set(attributes) - set(JOB_ATTRIBUTES)
    if unknown:
        raise TypeError(f"job() got unknown attribute(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in attributes.items() if v is not None}

    def mark(f: Callable[..., Any]) -> Callable[..., Any]:
        setattr(f, JOB_MARK, given)
        return f

    if func is not None:
        if not callable(func):
            raise TypeError("job() takes a method or keyword arguments only")
        return mark(func)
    return mark


class Worker:
    """Base class of user workers.

    One instance per class is built in the supervisor before it forks, with the keyword
    arguments from ``worker_options`` (``GLOBAL`` merged under the class's own key) plus
    ``server`` (the gearmand list, also set after construction when ``__init__`` did not
    keep it). The default ``__init__`` stores each option as an attribute.

    Override points:

    - ``prefix``: a class attribute or method; replaces ``module.Class.`` in function and
      job names (``""`` registers bare method names).
    - ``after_fork()``: once in each worker process, after the fork, before it registers
      with gearmand: open per-process connections here.
    - ``begin(job, workload)`` before each job (after decode); ``end(job, workload, error)``
      after each job, always (``error`` is None on success); ``on_exception(job, workload,
      error)`` when the job raised, before ``end``.
    - ``process_name(orig, job_name)``: a returned string becomes the process title.
    - ``default_attributes`` / ``override_attributes``: job attributes for every method
      (precedence: override > the decorator's > default).
    - ``encode(result)`` / ``decode(workload)``: used when a job says ``encode=True`` /
      ``decode=True``.
    """

    prefix: str | Callable[[], str] | None = None
    default_attributes: dict[str, Any] = {}
    override_attributes: dict[str, Any] = {}

    server: str | None = None
    _client: tuple[int, pygearman.GearmanClient] | None = None

    def __init__(self, server: str | None = None, **options: Any) -> None:
        self.server = server
        for key, value in options.items():
            setattr(self, key, value)

    def after_fork(self) -> None:
        """Called once in each worker process, after the fork and before it registers with
        gearmand: the place to open a database connection or any client per process.

        The instance is built once in the supervisor and every process is forked from it,
        so a socket or connection opened in ``__init__`` is one file descriptor shared by
        every process of the class (their requests and replies interleave on it). Open
        such things here instead. An exception here ends the process (it is restarted,
        with the crash-loop backoff)."""

    @property
    def client(self) -> pygearman.GearmanClient:
        """A pygearman ``GearmanClient`` on the configured gearmand servers, for jobs that
        submit follow-up jobs; made on first use in each process (never shared across a
        fork)."""
        made = self._client
        if made is None or made[0] != os.getpid():
            import gearman as pygearman

            from gdriver.gearman import parse_servers

            hosts = [(s[0], s[1]) for s in parse_servers(self.server or "localhost:4730")]
            made = self._client = (os.getpid(), pygearman.GearmanClient(hosts))
        return made[1]

    def begin(self, job: Job, workload: Any) -> None:
        """Called before each job, after decode."""

    def end(self, job: Job, workload: Any, error: BaseException | None) -> None:
        """Called after each job, also when it failed (error is then the exception)."""

    def on_exception(self, job: Job, workload: Any, error: BaseException) -> None:
        """Called when the job method raised, before end()."""

    def process_name(self, orig: str, job_name: str) -> str | None:
        """Return a string to set it as the process title of this job's processes."""
        return None

    def encode(self, result: Any) -> Any:
        return result

    def decode(self, workload: Any) -> Any:
        return workload


def name_prefix(worker: object) -> str:
    """The prefix of function and job names for this worker instance."""
    cls = type(worker)
    value = getattr(worker, "prefix", None)
    if callable(value):
        value = value()
    if value is None:
        return f"{cls.__module__}.{cls.__qualname__}."
    if not isinstance(value, str):
        raise TypeError(f"{cls.__qualname__}.prefix must be a string, got {value!r}")
    return value


def job_methods(cls: type) -> list[tuple[str, Callable[..., Any], dict[str, Any]]]:
    """(name, function, decorator attributes) of every job method, inherited ones included,
    in definition order (base classes first). The nearest definition decides."""
    order: list[str] = []
    for klass in reversed(cls.__mro__):
        for name in vars(klass):
            if name not in order:
                order.append(name)
    out = []
    for name in order:
        member = getattr(cls, name, None)
        marks = getattr(member, JOB_MARK, None)
        if callable(member) and isinstance(marks, dict):
            out.append((name, member, dict(marks)))
    return out


def merged_attributes(worker: object, decorator: dict[str, Any]) -> dict[str, Any]:
    """default_attributes < decorator < override_attributes; unknown keys warn and are skipped."""
    merged: dict[str, Any] = {}
    for what in ("default_attributes", "override_attributes"):
        value = getattr(worker, what, None)
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{type(worker).__qualname__}.{what} must be a dict, got {value!r}")
    for source in (
        getattr(worker, "default_attributes", None) or {},
        decorator,
        getattr(worker, "override_attributes", None) or {},
    ):
        for key, value in source.items():
            if key not in JOB_ATTRIBUTES:
                warnings.warn(
                    f"invalid job attribute {key!r} in {type(worker).__qualname__}",
                    stacklevel=2,
                )
                continue
            if value is not None:
                merged[key] = value
    return merged
