"""Per-job attributes, declared once: name, type, range, default, settable at run time.

``@job(...)``, ``default_attributes``/``override_attributes``, ``job_runtime_attributes`` in
the configuration, the loader and ``Driver.add_job`` all check values against
:data:`ATTRIBUTES`, so a new attribute is one entry here (plus its field on ``JobSpec``).
The range checks (:func:`integer`, :func:`number`) serve the configuration keys too.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# hard ceiling of processes, per job and for all jobs together (max_total_processes)
PROCESS_LIMIT = 4096
# the longest time any setting may name: 30 days (alarms and timers overflow far above)
MAX_SECONDS = 30 * 86400.0
MAX_COUNT = 1_000_000_000

# a checker: (raw value, strict) -> clean value, or ValueError with a short reason; strict
# (values written in Python code) refuses numbers spelt as strings, which text sources need
Check = Callable[..., Any]


def integer(minimum: int = 0, maximum: int = MAX_COUNT) -> Check:
    """A checker for whole numbers in [minimum, maximum] (digit strings and 2.0 pass)."""
    span = f"an integer between {minimum} and {maximum}"

    def check(value: Any, strict: bool = False) -> int:
        text = value.strip() if isinstance(value, str) else value
        ok = isinstance(text, int) and not isinstance(text, bool)
        if isinstance(text, str) and not strict:
            ok = text.isdigit() and text.isascii()
        if isinstance(text, float) and text.is_integer():
            ok, text = True, int(text)
        if not ok or not minimum <= int(text) <= maximum:
            raise ValueError(f"must be {span}, got {value!r}")
        return int(text)

    check.span = span  # type: ignore[attr-defined]
    return check


def _plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def number(minimum: float = 0.0, maximum: float = MAX_SECONDS) -> Check:
    """A checker for finite numbers in [minimum, maximum] (numeric strings pass)."""
    span = f"a number between {_plain(minimum)} and {_plain(maximum)}"

    def check(value: Any, strict: bool = False) -> float:
        if isinstance(value, bool) or (strict and isinstance(value, str)):
            raise ValueError(f"must be {span}, got {value!r}")
        try:
            result = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {span}, got {value!r}") from None
        if not math.isfinite(result) or not minimum <= result <= maximum:
            raise ValueError(f"must be {span}, got {value!r}")
        return result

    check.span = span  # type: ignore[attr-defined]
    return check


def _coder(value: Any, strict: bool = False) -> bool | str:
    if isinstance(value, bool) or (isinstance(value, str) and value.isidentifier()):
        return value
    raise ValueError(f"must be true, false or a method name, got {value!r}")


def _group(value: Any, strict: bool = False) -> str:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One per-job attribute."""

    name: str
    check: Check  # raw value -> clean value, or ValueError with a short reason
    default: Any  # None: see ``meaning`` (e.g. the global setting)
    runtime: bool  # settable by job_runtime_attributes, the console or a reload
    meaning: str

    @property
    def span(self) -> str:
        return str(getattr(self.check, "span", ""))


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("min_processes", integer(0, PROCESS_LIMIT), 1, True,
              "processes kept running; 0 starts them only on demand"),
    Attribute("max_processes", integer(0, PROCESS_LIMIT), None, True,
              "most processes; default max(1, min_processes)"),
    Attribute("encode", _coder, False, False,
              "True: the worker's encode method; a string names another method"),
    Attribute("decode", _coder, False, False,
              "True: the worker's decode method; a string names another method"),
    Attribute("process_group", _group, None, False,
              "methods of a class with the same group form one job"),
    Attribute("timeout", number(0, MAX_SECONDS), 0.0, True,
              "seconds; a job running longer fails and its process is replaced; 0 none"),
    Attribute("max_jobs_per_process", integer(0, MAX_COUNT), None, True,
              "recycle a process after this many jobs; default the global setting"),
    Attribute("max_process_lifetime", number(0, MAX_SECONDS), None, True,
              "recycle a process after this many seconds; default the global setting"),
)  # fmt: skip
BY_NAME: dict[str, Attribute] = {a.name: a for a in ATTRIBUTES}
NAMES = tuple(BY_NAME)
RUNTIME_NAMES = tuple(a.name for a in ATTRIBUTES if a.runtime)
#: What a job has when nothing sets an attribute (None: see its ``meaning``).
DEFAULTS: dict[str, Any] = {a.name: a.default for a in ATTRIBUTES}


def nearest(name: str, names: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean X?)`` for the closest of ``names``, or ``""``; a ``prefix`` they
    all share is left out of the comparison (it would make everything look close)."""
    # case is the commonest slip (Global, GLOBAL)
    by_lower = {n.lower().removeprefix(prefix.lower()): n for n in names}
    close = difflib.get_close_matches(
        name.lower().removeprefix(prefix.lower()), list(by_lower), n=1, cutoff=0.6
    )
    return f" (did you mean {by_lower[close[0]]}?)" if close else ""


def check(name: str, value: Any, runtime_only: bool = False, strict: bool = False) -> Any:
    """The clean value of one attribute, or ValueError naming it. ``runtime_only``: only
    the attributes settable at run time are known; ``strict``: a value from Python code."""
    attr = BY_NAME.get(name)
    if attr is None or (runtime_only and not attr.runtime):
        known = RUNTIME_NAMES if runtime_only else NAMES
        raise ValueError(
            f"unknown attribute {name!r}{nearest(str(name), known)} (known: {', '.join(known)})"
        )
    try:
        return attr.check(value, strict)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def check_all(
    values: Mapping[str, Any], runtime_only: bool = False, strict: bool = False
) -> dict[str, Any]:
    """Every attribute of ``values`` checked, and min_processes <= max_processes."""
    out = {k: check(k, v, runtime_only, strict) for k, v in values.items() if v is not None}
    low, high = out.get("min_processes"), out.get("max_processes")
    if low is not None and high is not None and low > high:
        raise ValueError(f"min_processes {low} > max_processes {high}")
    return out


def limits(values: Mapping[str, Any]) -> tuple[int, int]:
    """(min, max) processes with the defaults: min 1, max max(1, min)."""
    low = values.get("min_processes")
    low = DEFAULTS["min_processes"] if low is None else low
    high = values.get("max_processes")
    high = max(1, low) if high is None else high
    if low > high:
        raise ValueError(f"min_processes {low} > max_processes {high}")
    return low, high
