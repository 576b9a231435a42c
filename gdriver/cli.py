"""Command line: ``gdriver run``, ``gdriver check-config``, ``gdriver console``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from gdriver import __version__, config

SUBCOMMANDS = ("run", "check-config", "console")

HELP = {
    "server": "gearmand servers, host[:port][,host[:port]] (default localhost:4730)",
    "console_port": "management console port, 0 disables (default 47300)",
    "console_bind": "management console address (default 127.0.0.1)",
    "interval": "observer poll interval in seconds, 0 disables scaling (default 5)",
    "max_idle_time": "seconds a surplus process may stay idle before it is stopped (default 0)",
    "loglevel": "DEBUG, INFO, WARNING, ERROR or CRITICAL (default INFO)",
    "namespaces": "package or module holding worker classes (repeat the flag for more)",
    "lib": "directory added to sys.path (repeatable)",
    "worker_options": "JSON map: worker class (or GLOBAL) -> constructor keyword arguments",
    "job_runtime_attributes": "JSON map: module.Class.job -> {min_processes, max_processes, ...}",
    "graceful_timeout": "seconds in-flight jobs get to finish on stop (default 30)",
    "metrics_port": "HTTP port for /metrics, /healthz, /readyz; 0 disables (default 9464)",
    "metrics_bind": "HTTP address (default 0.0.0.0)",
    "configfile": "YAML config file (repeatable; later files win)",
    "max_jobs_per_process": "recycle a process after this many jobs, 0 = never (default 0)",
    "max_process_lifetime": "recycle a process after this many seconds, 0 = never (default 0)",
    "daemonize": "detach from the terminal (classic init systems)",
    "pidfile": "write the supervisor's PID here (with --daemonize)",
    "logfile": "with --daemonize: append output to this file (default /dev/null)",
}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"gdriver: {message} (see gdriver --help)", file=sys.stderr)
        sys.exit(config.EX_CONFIG)


def settings_parser(prog: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, argument_default=argparse.SUPPRESS)
    for key in config.KEYS:
        flags = [f"--{key}"]
        if "_" in key:
            flags.append(f"--{key.replace('_', '-')}")
        if key == "daemonize":
            parser.add_argument(*flags, dest=key, action=argparse.BooleanOptionalAction,
                                help=HELP[key])  # fmt: skip
        elif key in config.LIST_KEYS:
            parser.add_argument(*flags, dest=key, action="append", metavar="VALUE", help=HELP[key])
        else:
            parser.add_argument(*flags, dest=key, metavar="VALUE", help=HELP[key])
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


def load_settings(cli: dict[str, Any]) -> config.Settings:
    try:
        return config.load(cli)
    except config.ConfigError as exc:
        fail(exc)


def cmd_run(argv: Sequence[str]) -> int:
    from gdriver import logs
    from gdriver.loader import LoadError
    from gdriver.supervisor import Driver

    cli = parse_settings_args("gdriver run", argv)
    settings = load_settings(cli)
    logs.setup(settings.loglevel)
    driver = Driver(settings, reload_settings=lambda: config.load(cli))
    try:
        driver.load()
    except LoadError as exc:
        import logging

        logging.getLogger("gdriver").critical("cannot load workers: %s", exc)
        fail(exc)
    if settings.daemonize:
        from gdriver.daemon import daemonize

        daemonize(settings.pidfile, settings.logfile)
    return driver.run()


def cmd_check_config(argv: Sequence[str]) -> int:
    from gdriver import loader

    settings = load_settings(parse_settings_args("gdriver check-config", argv))
    try:
        specs = loader.load(
            settings.namespaces, settings.lib, settings.worker_options,
            settings.job_runtime_attributes, settings.server,
        )  # fmt: skip
    except loader.LoadError as exc:
        fail(exc)
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
            "gdriver console [--server HOST[:PORT]]... [COMMAND [ARGS...]]\n\n"
            "gdriver run --help lists the options.",
        )
        sys.exit(0)
    if args and args[0] == "--version":
        print(f"gdriver {__version__}")
        sys.exit(0)
    command = args.pop(0) if args and args[0] in SUBCOMMANDS else "run"
    if command == "console":
        from gdriver.console_client import main as console_main

        sys.exit(console_main(args))
    if command == "check-config":
        sys.exit(cmd_check_config(args))
    sys.exit(cmd_run(args))
