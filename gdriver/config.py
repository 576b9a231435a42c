"""Settings: defaults < YAML files (in order) < environment ``GDRIVER_<KEY>`` < command line.

Every invalid value ends in one :class:`ConfigError` naming the key and where it came from;
the command line turns that into one line on stderr and exit status 78 (EX_CONFIG).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import yaml
from environs import Env, EnvError

from gdriver.gearman import Server, parse_servers

EX_CONFIG = 78
ENV_PREFIX = "GDRIVER_"
LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
RUNTIME_ATTRIBUTES = (
    "min_processes",
    "max_processes",
    "timeout",
    "max_jobs_per_process",
    "max_process_lifetime",
)


class ConfigError(Exception):
    """An invalid setting: ``key (source): problem``."""

    def __init__(self, key: str, source: str, problem: str) -> None:
        if not key or not key.isprintable() or key != key.strip():
            key = repr(key)  # an empty or odd key must still be visible, on one line
        problem = " ".join(problem.split())
        self.key, self.source, self.problem = key, source, problem
        super().__init__(f"{key} ({source}): {problem}")


@dataclasses.dataclass(frozen=True)
class Settings:
    server: str = "localhost:4730"
    console_port: int = 47300
    console_bind: str = "127.0.0.1"
    interval: float = 5.0
    max_idle_time: float = 0.0
    loglevel: str = "INFO"
    namespaces: tuple[str, ...] = ()
    lib: tuple[str, ...] = ()
    worker_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    job_runtime_attributes: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=dict
    )
    graceful_timeout: float = 30.0
    metrics_port: int = 9464
    metrics_bind: str = "0.0.0.0"
    configfile: tuple[str, ...] = ()
    max_jobs_per_process: int = 0
    max_process_lifetime: float = 0.0
    daemonize: bool = False
    pidfile: str = ""
    logfile: str = ""

    @property
    def servers(self) -> list[Server]:
        return parse_servers(self.server)

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


KEYS = tuple(f.name for f in dataclasses.fields(Settings))
DEFAULTS = Settings()

# -- validators: raw value -> clean value, or ValueError with a short reason -------------------


def _number(minimum: float = 0.0) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number >= {minimum:g}, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be a number >= {minimum:g}, got {value!r}") from None
        if not math.isfinite(number) or number < minimum:
            raise ValueError(f"must be a number >= {minimum:g}, got {value!r}")
        return number

    return check


def _integer(minimum: int = 0, maximum: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        text = value.strip() if isinstance(value, str) else value
        ok = isinstance(text, int) and not isinstance(text, bool)
        if isinstance(text, str):
            ok = text.isdigit() and text.isascii()
        if isinstance(text, float) and text.is_integer():
            ok, text = True, int(text)
        span = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        if not ok:
            raise ValueError(f"must be an integer {span}, got {value!r}")
        number = int(text)
        if number < minimum or (maximum is not None and number > maximum):
            raise ValueError(f"must be an integer {span}, got {value!r}")
        return number

    return check


def _port(value: Any) -> int:
    return _integer(0, 65535)(value)


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
    checks: dict[str, Callable[[Any], Any]] = {
        "min_processes": _integer(0),
        "max_processes": _integer(0),
        "timeout": _number(0),
        "max_jobs_per_process": _integer(0),
        "max_process_lifetime": _number(0),
    }
    for job_key, attrs in out.items():
        for attr, raw in list(attrs.items()):
            if attr not in checks:
                known = ", ".join(RUNTIME_ATTRIBUTES)
                raise ValueError(f"{job_key}: unknown attribute {attr!r} (known: {known})")
            try:
                attrs[attr] = checks[attr](raw)
            except ValueError as exc:
                raise ValueError(f"{job_key}.{attr}: {exc}") from None
        low, high = attrs.get("min_processes"), attrs.get("max_processes")
        if low is not None and high is not None and low > high:
            raise ValueError(f"{job_key}: min_processes {low} > max_processes {high}")
    return out


VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "server": _server,
    "console_port": _port,
    "console_bind": _host,
    "interval": _number(0),
    "max_idle_time": _number(0),
    "loglevel": _loglevel,
    "namespaces": _str_list,
    "lib": _str_list,
    "worker_options": _map_of_maps,
    "job_runtime_attributes": _runtime_attributes,
    "graceful_timeout": _number(0),
    "metrics_port": _port,
    "metrics_bind": _host,
    "configfile": _str_list,
    "max_jobs_per_process": _integer(0),
    "max_process_lifetime": _number(0),
    "daemonize": _bool,
    "pidfile": _text,
    "logfile": _text,
}
LIST_KEYS = {"namespaces", "lib", "configfile"}
MAP_KEYS = {"worker_options", "job_runtime_attributes"}
assert set(VALIDATORS) == set(KEYS)


def _validate(key: str, value: Any, source: str) -> Any:
    if key not in VALIDATORS:
        raise ConfigError(str(key), source, "unknown key")
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
            raise ConfigError(str(key), source, "unknown key")
        out[key] = _validate(key, value, source)
    return out


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """``GDRIVER_<KEY>`` variables -> validated partial settings (lists comma-separated,
    maps as JSON). Unknown ``GDRIVER_*`` names are ignored, except the console client's."""
    env = Env(eager=True)
    out: dict[str, Any] = {}
    for key in KEYS:
        name = ENV_PREFIX + key.upper()
        if name not in environ:
            continue
        raw = environ[name]
        source = f"env {name}"
        try:
            with _environ(name, raw):
                if key in LIST_KEYS:
                    value: Any = env.list(name, subcast=str)
                    value = [v for v in value if v.strip()]
                elif key in MAP_KEYS:
                    value = env.json(name)
                else:
                    value = raw
        except (EnvError, ValueError) as exc:
            kind = "JSON map" if key in MAP_KEYS else "comma-separated list"
            raise ConfigError(key, source, f"must be a {kind}: {exc}") from None
        out[key] = _validate(key, value, source)
    return out


class _environ:
    """environs reads os.environ; hand it the one variable we parse, then put things back."""

    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value
        self.saved: str | None = None

    def __enter__(self) -> None:
        self.saved = os.environ.get(self.name)
        os.environ[self.name] = self.value

    def __exit__(self, *exc: object) -> None:
        if self.saved is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.saved


def load(
    cli: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from every source. ``base`` are programmatic values (above defaults,
    below files); ``cli`` holds only the options given on the command line."""
    environ = os.environ if environ is None else environ
    cli = dict(cli or {})
    base_values = {k: _validate(k, v, "argument") for k, v in (base or {}).items()}
    env_values = read_env(environ)
    cli_values = {k: _validate(k, v, "command line") for k, v in cli.items()}
    files = cli_values.get(
        "configfile", env_values.get("configfile", base_values.get("configfile"))
    )
    merged: dict[str, Any] = dict(base_values)
    for path in files or ():
        merged.update(read_yaml(path))
    merged.update(env_values)
    merged.update(cli_values)
    if files:
        merged["configfile"] = tuple(files)
    return Settings(**merged)
