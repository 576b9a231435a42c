"""Command line: ``gdriver run``, ``gdriver check-config``, ``gdriver console``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from gdriver import __version__, config

SUBCOMMANDS = ("run", "check-config", "console")


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --serv, --int, --pid must not pass for more
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(f"gdriver: {message} (see gdriver --help)", file=sys.stderr)
        sys.exit(config.EX_CONFIG)


def flag_help(key: str) -> str:
    meta = config.FIELDS[key].metadata
    text = meta["help"].replace("`", "")
    if meta["span"]:
        text += f"; {meta['span']}"
    if meta["kind"] == "list":
        text += "; repeat the flag for more; replaces the value of files and environment"
    elif meta["kind"] == "map":
        text += "; JSON, merged key by key over files and environment"
    return f"{text} (default {config.shown_default(key)})".replace("%", "%%")


def settings_parser(prog: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, argument_default=argparse.SUPPRESS)
    for key in config.KEYS:
        flags = [f"--{key}"]
        if "_" in key:
            flags.append(f"--{key.replace('_', '-')}")
        if key in config.FLAG_KEYS:
            parser.add_argument(*flags, dest=key, action=argparse.BooleanOptionalAction,
                                help=flag_help(key))  # fmt: skip
        elif key in config.LIST_KEYS:
            parser.add_argument(*flags, dest=key, action="append", metavar="VALUE",
                                help=flag_help(key))  # fmt: skip
        else:
            parser.add_argument(*flags, dest=key, metavar="VALUE", help=flag_help(key))
    parser.add_argument("--version", action="version", version=f"gdriver {__version__}")
    return parser


def parse_settings_args(prog: str, argv: Sequence[str]) -> dict[str, Any]:
    values = vars(settings_parser(prog).parse_args(argv))
    for key in config.MAP_KEYS & values.keys():
        try:
            values[key] = json.loads(values[key])
        except ValueError as exc:
            fail(config.ConfigError(key, "command line", f"must be a JSON map: {exc}"))
    return values


def fail(exc: Exception) -> NoReturn:
    print(f"gdriver: invalid configuration: {exc}", file=sys.stderr)
    sys.exit(config.EX_CONFIG)


def load_settings(cli: dict[str, Any]) -> tuple[config.Settings, dict[str, str]]:
    try:
        return config.load_with_sources(cli)
    except config.ConfigError as exc:
        fail(exc)


def check_jobs(settings: config.Settings, sources: dict[str, str], specs: list[Any]) -> None:
    """Zero jobs, or more processes than max_total_processes allows: exit 78."""
    if not specs:
        where = sources.get("namespaces", "default")
        names = ", ".join(settings.namespaces) or "(none)"
        fail(config.ConfigError("namespaces", where, f"no jobs loaded from {names}"))
    problem = config.check_jobs_total(
        settings.max_total_processes, {s.name: (s.min_processes, s.max_processes) for s in specs}
    )
    if problem:
        where = sources.get("max_total_processes", "default")
        fail(config.ConfigError("max_total_processes", where, problem))


def cmd_run(argv: Sequence[str]) -> int:
    from gdriver import daemon, logs
    from gdriver.loader import LoadError
    from gdriver.resources import StartError
    from gdriver.supervisor import Driver

    cli = parse_settings_args("gdriver run", argv)
    settings, sources = load_settings(cli)
    logs.setup(settings.loglevel)
    driver = Driver(settings, reload_settings=lambda: config.load(cli))
    try:
        driver.load()
    except LoadError as exc:
        import logging

        logging.getLogger("gdriver").critical("cannot load workers: %s", exc)
        fail(exc)
    check_jobs(settings, sources, [j.spec for j in driver.get_jobs()])
    try:
        daemon.start(settings.daemonize, settings.pidfile, settings.logfile)
    except config.ConfigError as exc:
        fail(exc)
    try:
        return driver.run()
    except StartError as exc:  # a port in use, a bind address that does not resolve
        print(f"gdriver: cannot start: {exc}", file=sys.stderr)
        sys.exit(config.EX_CONFIG)


def cmd_check_config(argv: Sequence[str]) -> int:
    from gdriver import loader

    settings, sources = load_settings(parse_settings_args("gdriver check-config", argv))
    try:
        specs = loader.load(
            settings.namespaces, settings.lib, settings.worker_options,
            settings.job_runtime_attributes, settings.server,
        )  # fmt: skip
    except loader.LoadError as exc:
        fail(exc)
    check_jobs(settings, sources, specs)
    out = settings.as_dict()
    out["jobs"] = [
        {
            "name": s.name,
            "functions": s.functions,
            "min_processes": s.min_processes,
            "max_processes": s.max_processes,
        }
        for s in specs
    ]
    # where each effective value came from: a source per key (maps: per dotted leaf)
    given = {path.split(".")[0] for path in sources}
    out["sources"] = {**{k: "default" for k in config.KEYS if k not in given}, **sources}
    try:
        print(json.dumps(out, indent=2, sort_keys=True), flush=True)
    except BrokenPipeError:  # e.g. `gdriver check-config | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(
            "usage: gdriver [run] [options] | gdriver check-config [options] | "
            "gdriver console [--server HOST[:PORT]]... [--configfile FILE]... "
            "[COMMAND [ARGS...]]\n\n"
            "gdriver run --help lists the options.",
        )
        sys.exit(0)
    if args and args[0] == "--version":
        print(f"gdriver {__version__}")
        sys.exit(0)
    command = args.pop(0) if args and args[0] in SUBCOMMANDS else "run"
    if command == "run":  # a SIGHUP before the supervisor handles it is ignored, not fatal
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if command == "console":
        from gdriver.console_client import main as console_main

        sys.exit(console_main(args))
    if command == "check-config":
        sys.exit(cmd_check_config(args))
    sys.exit(cmd_run(args))
