"""Settings: defaults < YAML files (in order) < environment ``GDRIVER_<KEY>`` < command line.

Each key is declared once, as a field of :class:`Settings` made by :func:`setting` (type,
default, check with its range, help); the validators, the command-line flags, the
environment names and the README table derive from it. Maps (``worker_options``,
``job_runtime_attributes``) merge key by key, recursively, across the sources; lists and
scalars from a higher source replace the lower one. Every invalid value ends in one
:class:`ConfigError` naming the key and where it came from; the command line turns that
into one line on stderr and exit status 78 (EX_CONFIG).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import yaml
from environs import Env, EnvError

from gdriver import attributes
from gdriver.attributes import MAX_SECONDS, PROCESS_LIMIT, integer, nearest, number
from gdriver.gearman import MAX_PACKET_SIZE, Protocol, Server, parse_servers

EX_CONFIG = 78
ENV_PREFIX = "GDRIVER_"
LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
RUNTIME_ATTRIBUTES = attributes.RUNTIME_NAMES


class ConfigError(Exception):
    """An invalid setting: ``key (source): problem``."""

    def __init__(self, key: str, source: str, problem: str) -> None:
        if not key or not key.isprintable() or key != key.strip():
            key = repr(key)  # an empty or odd key must still be visible, on one line
        problem = " ".join(problem.split())
        self.key, self.source, self.problem = key, source, problem
        super().__init__(f"{key} ({source}): {problem}")


# -- checks: raw value -> clean value, or ValueError with a short reason ------------------------


_port = integer(0, 65535)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {value!r}")
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    return value


def _host(value: Any) -> str:
    text = _text(value).strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"must be a host name or address, got {value!r}")
    return text


def _server(value: Any) -> str:
    text = _text(value)
    parse_servers(text)
    return text


def _loglevel(value: Any) -> str:
    level = _text(value).strip().upper()
    level = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(level, level)
    if level not in LOGLEVELS:
        raise ValueError(f"must be one of {', '.join(LOGLEVELS)}, got {value!r}")
    return level


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"must be true or false, got {value!r}")


def _str_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of strings, got {value!r}")
    out = []
    for item in value:
        if not isinstance(item, str) or not item.strip() or "\x00" in item:
            raise ValueError(f"must be a list of non-empty strings, got {item!r}")
        out.append(item.strip())
    return tuple(out)


# job duration histogram buckets (s): 5 ms to an hour, 1 s steps around the common 1-10 s
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0,
                    8.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0, 600.0, 900.0,
                    1800.0, 3600.0)  # fmt: skip
MAX_BUCKETS = 60  # each bucket is one series per job and function
MAX_PACKET_LIMIT = 1 << 30  # bytes: the largest max_packet_size


def _buckets(value: Any) -> tuple[float, ...]:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of numbers of seconds, got {value!r}")
    if not 1 <= len(value) <= MAX_BUCKETS:
        raise ValueError(f"must hold 1 to {MAX_BUCKETS} bounds, got {len(value)}")
    out = tuple(number(0, MAX_SECONDS)(v) for v in value)
    if out[0] <= 0:
        raise ValueError(f"must be positive, got {value[0]!r}")
    for low, high in itertools.pairwise(out):
        if high <= low:
            raise ValueError(f"must be increasing, got {low:g} then {high:g}")
    return out


def _map_of_maps(value: Any) -> dict[str, dict[str, Any]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a map, got {type(value).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for key, inner in value.items():
        if not isinstance(key, str):
            raise ValueError(f"keys must be strings, got {key!r}")
        if inner is None:
            inner = {}
        if not isinstance(inner, Mapping) or not all(isinstance(k, str) for k in inner):
            raise ValueError(f"{key}: must be a map with string keys")
        out[key] = dict(inner)
    return out


def _runtime_attributes(value: Any) -> dict[str, dict[str, Any]]:
    out = _map_of_maps(value)
    for job_key, attrs in out.items():
        try:
            out[job_key] = attributes.check_all(attrs, runtime_only=True)
        except ValueError as exc:  # "attr: problem" or a problem of the whole job
            named = str(exc).split(":")[0] in attributes.NAMES
            raise ValueError(f"{job_key}.{exc}" if named else f"{job_key}: {exc}") from None
    return out


def default_total_processes() -> int:
    """256 per CPU, at most PROCESS_LIMIT: what one machine can sensibly fork."""
    return min(PROCESS_LIMIT, 256 * (os.cpu_count() or 1))


# -- the keys -----------------------------------------------------------------------------------


def setting(
    default: Any,
    check: Callable[[Any], Any],
    help: str,
    kind: str = "value",
    shown: str = "",
    factory: Callable[[], Any] | None = None,
) -> Any:
    """Declare one key: its default, check, help (flag help and README meaning), ``kind``
    (``value``, ``flag``, ``list``: comma-separated in the environment, repeated on the
    command line, replaced by a higher source; ``map``: JSON, merged key by key) and
    ``shown``: the default as the README and --help show it, when not the value itself."""
    span = str(getattr(check, "span", ""))
    meta = {"check": check, "help": help, "kind": kind, "shown": shown, "span": span}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Settings:
    server: str = setting(
        "localhost:4730",
        _server,
        "gearmand servers, `host[:port][,host[:port]]`; workers register on every one",
    )
    namespaces: tuple[str, ...] = setting(
        (), _str_list, "packages or modules holding worker classes", "list"
    )
    lib: tuple[str, ...] = setting((), _str_list, "directories appended to `sys.path`", "list")
    interval: float = setting(
        5.0,
        number(0, 3600),
        "seconds between observer polls of gearmand `status`; `0` disables scaling "
        "(min processes are still kept)",
    )
    max_idle_time: float = setting(
        0.0,
        number(0, MAX_SECONDS),
        "seconds a process above min may stay idle before it is retired",
    )
    graceful_timeout: float = setting(
        30.0, number(0, 86400), "seconds in-flight jobs get to finish on stop; then SIGKILL"
    )
    console_port: int = setting(47300, _port, "management console port; `0` disables it")
    console_bind: str = setting("127.0.0.1", _host, "console address")
    metrics_port: int = setting(
        9464, _port, "HTTP port of `/metrics`, `/healthz`, `/readyz`; `0` disables it"
    )
    metrics_bind: str = setting("0.0.0.0", _host, "HTTP address")
    loglevel: str = setting("INFO", _loglevel, "`DEBUG`, `INFO`, `WARNING`, `ERROR`, `CRITICAL`")
    worker_options: Mapping[str, Mapping[str, Any]] = setting(
        None,
        _map_of_maps,
        'constructor arguments per class: `{GLOBAL: {...}, "module.Class": {...}}`; a key '
        "naming no loaded class is an error",
        "map",
        "{}",
        dict,
    )
    job_runtime_attributes: Mapping[str, Mapping[str, Any]] = setting(
        None,
        _runtime_attributes,
        "per job `module.Class.<group or method>`: "
        + ", ".join(f"`{a}`" for a in RUNTIME_ATTRIBUTES)
        + " (ranges as for `@job`); a key naming no loaded job is an error",
        "map",
        "{}",
        dict,
    )
    max_jobs_per_process: int = setting(
        0,
        integer(0, attributes.MAX_COUNT),
        "recycle a process after this many jobs (plus up to 10 % jitter); `0` never",
    )
    max_process_lifetime: float = setting(
        0.0,
        number(0, MAX_SECONDS),
        "recycle a process after this many seconds (plus up to 10 % jitter), between jobs; "
        "`0` never",
    )
    max_total_processes: int = setting(
        None,
        integer(1, PROCESS_LIMIT),
        "most worker processes of all jobs together: a job's `max_processes`, and the "
        "`min_processes` of all jobs summed, must fit",
        shown=f"256 per CPU, at most {PROCESS_LIMIT}",
        factory=default_total_processes,
    )
    watch_functions: tuple[str, ...] = setting(
        (),
        _str_list,
        "functions not served here whose waiting jobs concern this deployment "
        "(`gdriver_unknown_function_jobs`, the `unknown_function` warning): prefixes, or "
        "globs with `*?[`; by default the module part of each served function (`app.images.` "
        "for `app.images.Images.resize`); queue gauges cover the served functions and these, "
        "so other teams' functions on a shared gearmand stay out",
        "list",
        "module part of each served function",
    )
    duration_buckets: tuple[float, ...] = setting(
        DURATION_BUCKETS,
        _buckets,
        "upper bounds (s) of the `gdriver_job_duration_seconds` buckets: increasing, "
        f"positive, at most {MAX_BUCKETS}; a change takes effect at the next start",
        "list",
        ", ".join(f"{b:g}" for b in DURATION_BUCKETS),
    )
    poison_threshold: int = setting(
        3,
        integer(0, attributes.MAX_COUNT),
        "worker processes that may die running the same job (by function and unique, or by "
        "handle when it has none) before the next one to grab it fails it with WORK_FAIL "
        "without running it; `0` never",
    )
    send_exceptions: bool = setting(
        False,
        _bool,
        "a failing job's message goes to the client as WORK_EXCEPTION (exception callbacks of "
        "clients that ask for exceptions) instead of WORK_WARNING + WORK_FAIL; see the "
        "compatibility table",
    )
    max_packet_size: int = setting(
        MAX_PACKET_SIZE,
        integer(1024, MAX_PACKET_LIMIT),
        "bytes of the largest job packet (handle, function, unique, workload) a worker "
        "reads; a larger job fails (WORK_FAIL with both sizes) without being read into "
        "memory, and the connection stays",
        shown=f"{MAX_PACKET_SIZE} (64 MiB)",
    )
    configfile: tuple[str, ...] = setting(
        (), _str_list, "YAML files, read in order; maps merge, later files win", "list"
    )
    daemonize: bool = setting(False, _bool, "detach (classic init systems); off by default", "flag")
    pidfile: str = setting(
        "",
        _text,
        "PID file, with or without `--daemonize`; removed at exit; a live PID in it stops "
        "a second start",
    )
    logfile: str = setting(
        "", _text,
        "append all output here (never truncated), with or without `--daemonize`",
    )  # fmt: skip

    @property
    def servers(self) -> list[Server]:
        return parse_servers(self.server)

    @property
    def protocol(self) -> Protocol:
        """What worker processes need of the settings to speak to gearmand."""
        return Protocol(self.send_exceptions, self.max_packet_size)

    def as_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = json.loads(json.dumps(value, default=str))
            out[f.name] = value
        return out


FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
KEYS = tuple(FIELDS)
DEFAULTS = Settings()
VALIDATORS: dict[str, Callable[[Any], Any]] = {k: f.metadata["check"] for k, f in FIELDS.items()}
HELP = {k: f.metadata["help"] for k, f in FIELDS.items()}
LIST_KEYS = {k for k, f in FIELDS.items() if f.metadata["kind"] == "list"}
MAP_KEYS = {k for k, f in FIELDS.items() if f.metadata["kind"] == "map"}
FLAG_KEYS = {k for k, f in FIELDS.items() if f.metadata["kind"] == "flag"}
ENV_NAMES = {ENV_PREFIX + k.upper(): k for k in KEYS}


def shown_default(key: str) -> str:
    """The default as documentation shows it."""
    meta = FIELDS[key].metadata
    if meta["shown"]:
        return str(meta["shown"])
    value = getattr(DEFAULTS, key)
    if value in ((), ""):
        return "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def markdown_table() -> str:
    """The README's table of keys, made from the declarations."""
    rows = ["| key | env | CLI | default | range | meaning |", "|---|---|---|---|---|---|"]
    for key, f in FIELDS.items():
        meta = f.metadata
        cli = f"`--{key}`" + (" (JSON)" if meta["kind"] == "map" else "")
        if meta["kind"] == "list":
            cli += " (repeat)"
        span = meta["span"].replace("an integer between ", "").replace("a number between ", "")
        span = span.replace(" and ", " to ") if span else ""
        rows.append(f"| `{key}` | `{ENV_PREFIX}{key.upper()}` | {cli} | `{shown_default(key)}` "
                    f"| {span} | {meta['help']} |")  # fmt: skip
    return "\n".join(rows)


def _validate(key: str, value: Any, source: str) -> Any:
    if key not in VALIDATORS:
        raise ConfigError(str(key), source, f"unknown key{nearest(str(key), KEYS)}")
    try:
        return VALIDATORS[key](value)
    except ValueError as exc:
        raise ConfigError(key, source, str(exc)) from None


def read_yaml(path: str) -> dict[str, Any]:
    """One YAML config file -> validated partial settings."""
    source = f"file {path}"
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError("configfile", source, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("configfile", source, "not UTF-8 text") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError("configfile", source, f"invalid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("configfile", source, "must be a YAML map of settings")
    out = {}
    for key, value in data.items():
        if key not in VALIDATORS or key == "configfile":
            raise ConfigError(str(key), source, f"unknown key{nearest(str(key), KEYS)}")
        out[key] = _validate(key, value, source)
    return out


class _MappingEnv(Env):
    """environs reads ``os.environ`` only; this reads a given mapping instead, so that
    ``load(environ=...)`` (tests, the programmatic ``Driver``, a reload) never touches the
    process environment."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(eager=True, prefix=ENV_PREFIX)
        self.source = environ

    def _get_value(self, env_key: str, default: Any) -> Any:
        return self.source.get(env_key, default)


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """``GDRIVER_<KEY>`` variables -> validated partial settings (lists comma-separated,
    maps as JSON). An unknown ``GDRIVER_*`` name is an error, as an unknown YAML key.

    environs splits the lists and parses the JSON; the values then go through the same
    check as a YAML value (one range per key, one message), not through environs'
    marshmallow validation, whose messages name neither the key nor the source."""
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in ENV_NAMES:
            hint = nearest(name, ENV_NAMES, ENV_PREFIX)
            raise ConfigError(name, "env", f"unknown variable{hint}")
    env = _MappingEnv(environ)
    out: dict[str, Any] = {}
    for name, key in ENV_NAMES.items():
        if name not in environ:
            continue
        source = f"env {name}"
        try:
            if key in LIST_KEYS:
                value: Any = [v for v in env.list(key.upper(), subcast=str) if v.strip()]
            elif key in MAP_KEYS:
                value = env.json(key.upper())
            else:
                value = env.str(key.upper())
        except (EnvError, ValueError) as exc:
            kind = "JSON map" if key in MAP_KEYS else "comma-separated list"
            raise ConfigError(key, source, f"must be a {kind}: {exc}") from None
        out[key] = _validate(key, value, source)
    return out


def merge(
    low: Mapping[str, Any],
    high: Mapping[str, Any],
    source: str,
    sources: dict[str, str],
    path: str = "",
) -> dict[str, Any]:
    """``high`` over ``low``: maps key by key, recursively; anything else replaced.
    ``sources`` gets the source of every leaf ``high`` sets (dotted path -> source)."""
    out = dict(low)
    for key, value in high.items():
        where = f"{path}{key}"
        if isinstance(value, Mapping) and (path or key in MAP_KEYS):
            old = out.get(key)
            out[key] = merge(old if isinstance(old, Mapping) else {}, value, source, sources,
                             where + ".")  # fmt: skip
            if not value:
                sources.setdefault(where, source)
        else:
            for leaf in [p for p in sources if p.startswith(where + ".")]:
                del sources[leaf]  # a replaced map's leaves are the new value's
            out[key] = value
            sources[where] = source
    return out


def load(
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from every source. ``base`` are programmatic values (above defaults,
    below files); ``cli`` holds only the options given on the command line."""
    return load_with_sources(cli, environ, base)[0]


def load_with_sources(
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Settings and, for every value not left at its default, where it came from (maps:
    per dotted leaf, ``worker_options.GLOBAL.dsn``)."""
    environ = os.environ if environ is None else environ
    base_values = {k: _validate(k, v, "argument") for k, v in (base or {}).items()}
    env_values = read_env(environ)
    cli_values = {k: _validate(k, v, "command line") for k, v in (cli or {}).items()}
    files = cli_values.get(
        "configfile", env_values.get("configfile", base_values.get("configfile"))
    )
    sources: dict[str, str] = {}
    merged = merge({}, base_values, "argument", sources)
    for path in files or ():
        merged = merge(merged, read_yaml(path), f"file {path}", sources)
    for key, value in env_values.items():
        merged = merge(merged, {key: value}, f"env {ENV_PREFIX}{key.upper()}", sources)
    merged = merge(merged, cli_values, "command line", sources)
    if files:
        merged["configfile"] = tuple(files)
    source = ", ".join(sorted({v for k, v in sources.items() if k.startswith("job_runtime")}))
    try:  # min <= max again: the sources merged may pair one file's min with another's max
        _runtime_attributes(merged.get("job_runtime_attributes"))
    except ValueError as exc:
        raise ConfigError("job_runtime_attributes", source, str(exc)) from None
    settings = Settings(**merged)
    check_process_total(settings, sources)
    return settings, sources


def check_process_total(settings: Settings, sources: Mapping[str, str]) -> None:
    """Every job_runtime_attributes min/max fits in max_total_processes."""
    limit = settings.max_total_processes
    for job_key, attrs in settings.job_runtime_attributes.items():
        for attr in ("min_processes", "max_processes"):
            value = attrs.get(attr)
            if value is not None and value > limit:
                path = f"job_runtime_attributes.{job_key}.{attr}"
                raise ConfigError(
                    "job_runtime_attributes", sources.get(path, "argument"),
                    f"{job_key}.{attr}: {value} is above max_total_processes {limit}",
                )  # fmt: skip


def check_jobs_total(limit: int, jobs: Mapping[str, tuple[int, int]]) -> str:
    """Why the jobs' (min, max) processes cannot fit in ``limit`` (max_total_processes), or
    ``""``: no job's max above it, and the mins of all jobs together not above it. The
    loader's result and the console's ``set_*`` are checked with it."""
    for name in sorted(jobs):
        high = jobs[name][1]
        if high > limit:
            return f"job {name}: max_processes {high} is above max_total_processes {limit}"
    total = sum(low for low, _ in jobs.values())
    if total > limit:
        return f"min_processes of all jobs add up to {total}, above max_total_processes {limit}"
    return ""
