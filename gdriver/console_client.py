"""``gdriver console``: send console commands to one or more gdrivers.

With a command: print the reply (without the ``.`` line); exit 0, 1 when a reply is an
``ERR`` line, 2 when a server cannot be reached, 64 on a usage error, 78 on an invalid
configuration. Without one: an interactive prompt, where ``command | shell command`` pipes
the reply through a shell command. Job names may be given as an unambiguous suffix.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import NoReturn, TextIO

DEFAULT_PORT = 47300
TIMEOUT = 10.0


class ConsoleClient:
    def __init__(self, host: str, port: int, timeout: float = TIMEOUT) -> None:
        self.name = f"{host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def request(self, line: str) -> list[str] | None:
        """Send one line; the reply lines, or None when the server closed (quit, shutdown)."""
        self.sock.sendall(line.encode("utf-8") + b"\r\n")
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    raise OSError(f"{self.name}: no reply within {TIMEOUT:g}s") from None
                if not chunk:
                    return lines if lines else None
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\r\n", 1)
            text = raw.decode("utf-8", "replace")
            if text == ".":
                return lines
            lines.append(text)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


EX_USAGE = 64  # a wrong command line (BSD sysexits), apart from "unreachable" (2)
UNREACHABLE = 2
JOB_COMMANDS = {"show", "set_min_processes", "set_max_processes", "set_processes", "killall"}


class UsageError(Exception):
    """A command line the client cannot use."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"gdriver console: {message} (see gdriver console --help)", file=sys.stderr)
        sys.exit(EX_USAGE)


def parse_server(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise UsageError(f"bad server {text!r}: port must be a number (1-65535)")
    return host or "127.0.0.1", int(port) if port else default_port


def default_address(configfiles: list[str]) -> tuple[str, int]:
    """console_bind and console_port from the sources ``gdriver run`` reads (YAML through
    --configfile or GDRIVER_CONFIGFILE, GDRIVER_* variables). Raises ConfigError."""
    from gdriver import config

    settings = config.load({"configfile": configfiles} if configfiles else {})
    host = settings.console_bind
    if host in ("0.0.0.0", "::", "*"):  # listening on every address: reach it on loopback
        host = "::1" if host == "::" else "127.0.0.1"
    return host, settings.console_port or DEFAULT_PORT


def main(argv: Sequence[str]) -> int:
    from gdriver import config

    parser = ArgumentParser(
        prog="gdriver console",
        description="Talk to gdriver's management console. Exit status: 0, 1 when a reply "
        "is an ERR line, 2 when a server cannot be reached, 64 on a usage error, 78 on an "
        "invalid configuration.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--server", action="append", default=[], metavar="HOST[:PORT]",
        help="console address (repeatable; default console_bind:console_port of the "
        "configuration, 127.0.0.1:47300)",
    )  # fmt: skip
    parser.add_argument(
        "--configfile", action="append", default=[], metavar="FILE",
        help="YAML configuration of the gdriver to reach (repeatable, as for gdriver run)",
    )  # fmt: skip
    parser.add_argument("--history", default=os.path.expanduser("~/.gdriver_console_history"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        host, port = default_address(args.configfile)
    except config.ConfigError as exc:
        print(f"gdriver console: invalid configuration: {exc}", file=sys.stderr)
        return config.EX_CONFIG
    names = [n for s in args.server for n in s.replace(",", " ").split()] or [host]
    try:
        servers = sorted({parse_server(n, port) for n in names})
    except UsageError as exc:
        print(f"gdriver console: {exc}", file=sys.stderr)
        return EX_USAGE
    clients = []
    for host, port in servers:
        try:
            clients.append(ConsoleClient(host, port))
        except OSError as exc:
            print(f"gdriver console: cannot connect to {host}:{port}: {exc.strerror or exc}",
                  file=sys.stderr)  # fmt: skip
            for c in clients:
                c.close()
            return UNREACHABLE
    try:
        if args.command:
            return run_once(clients, " ".join(args.command))
        return interactive(clients, args.history)
    finally:
        for c in clients:
            c.close()


def job_names(clients: list[ConsoleClient]) -> list[str]:
    """The job names every server knows (the first column of ``status``)."""
    names: set[str] = set()
    for c in clients:
        for line in c.request("status") or []:
            if line and not line.startswith("ERR "):
                names.add(line.split()[0])
    return sorted(names)


def expand_job_names(clients: list[ConsoleClient], line: str) -> str:
    """Job arguments given as an unambiguous suffix (``Text.wordcount``) -> full names."""
    words = line.split()
    if not words or words[0] not in JOB_COMMANDS or len(words) < 2:
        return line
    known = job_names(clients)
    last = 2 if words[0] != "killall" else len(words)
    for i in range(1, last):
        word = words[i]
        if word in known or word == "*":
            continue
        matches = [n for n in known if n.endswith("." + word)]
        if len(matches) == 1:
            words[i] = matches[0]
    return " ".join(words)


def nearest_hint(clients: list[ConsoleClient], name: str) -> str:
    """The help printed for ``ERR invalid_job_name`` (the reply itself stays Perl's): the
    job names whose last parts are closest to what was typed."""
    depth = name.count(".") + 1
    tails: dict[str, list[str]] = {}
    for known in job_names(clients):
        tails.setdefault(".".join(known.split(".")[-depth:]).lower(), []).append(known)
    close = difflib.get_close_matches(name.lower(), list(tails), n=3, cutoff=0.6)
    names = [n for tail in close for n in tails[tail]][:3]
    return f"gdriver console: no job {name!r} (did you mean {' or '.join(names)}?)" if names else ""


def send_all(
    clients: list[ConsoleClient], line: str, out: TextIO | None = None
) -> tuple[int, bool]:
    """Send to every server in order; print replies. Returns (exit status, any closed)."""
    out = out or sys.stdout
    prefix = len(clients) > 1
    status, closed = 0, False
    try:
        line = expand_job_names(clients, line)
    except OSError as exc:
        print(f"gdriver console: {exc}", file=sys.stderr)
        return UNREACHABLE, True
    for c in clients:
        try:
            lines = c.request(line)
        except OSError as exc:
            print(f"gdriver console: {c.name}: {exc}", file=sys.stderr)
            return UNREACHABLE, True
        if lines is None:
            closed = True
            continue
        if lines and lines[0].startswith("ERR "):
            status = 1
        for text in lines:
            print(f"{c.name}> {text}" if prefix else text, file=out)
        if lines and lines[0].startswith("ERR invalid_job_name: "):
            with contextlib.suppress(OSError):
                hint = nearest_hint(clients, lines[0].split(": ", 1)[1])
                if hint:
                    print(hint, file=sys.stderr)
    out.flush()
    return status, closed


def run_once(clients: list[ConsoleClient], line: str) -> int:
    status, _ = send_all(clients, line)
    return status


def send_piped(clients: list[ConsoleClient], line: str) -> tuple[int, bool]:
    """``command | shell command``: the replies go to the shell command's input, as in
    Perl's console script."""
    command, _, shell = line.partition("|")
    buffer = io.StringIO()
    status, closed = send_all(clients, command.strip(), buffer)
    sys.stdout.flush()
    subprocess.run(shell.strip(), shell=True, input=buffer.getvalue(), text=True, check=False)
    return status, closed


def interactive(clients: list[ConsoleClient], history: str) -> int:
    try:
        import readline

        with contextlib.suppress(OSError):
            readline.read_history_file(history)
    except ImportError:
        readline = None  # type: ignore[assignment]
    status = 0
    try:
        while True:
            try:
                line = input("console> ")
            except (EOFError, KeyboardInterrupt):
                print()
                break
            if not line.strip():
                continue
            if line.strip() == "quit":
                break
            if "|" in line and line.partition("|")[2].strip():
                status, closed = send_piped(clients, line)
            else:
                status, closed = send_all(clients, line)
            if closed:
                break
    finally:
        if readline is not None:
            with contextlib.suppress(OSError):
                readline.write_history_file(history)
    return 0 if status in (0, 1) else status
