"""``gdriver console``: send console commands to one or more gdrivers.

With a command: print the reply (without the ``.`` line); exit 0, 1 when a reply is an
``ERR`` line, 2 when a server cannot be reached. Without one: an interactive prompt.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from collections.abc import Sequence

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


def parse_server(text: str) -> tuple[str, int]:
    env = os.environ.get("GDRIVER_CONSOLE_PORT", "")
    if env and not (env.isdigit() and 0 < int(env) < 65536):
        raise ValueError(f"GDRIVER_CONSOLE_PORT={env!r}: must be a port number (1-65535)")
    default = int(env) if env else DEFAULT_PORT
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"bad server {text!r}: port must be a number (1-65535)")
    return host or "127.0.0.1", int(port) if port else default


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gdriver console",
        description="Talk to gdriver's management console.",
    )
    parser.add_argument(
        "--server", action="append", default=[], metavar="HOST[:PORT]",
        help="console address (repeatable; default 127.0.0.1:$GDRIVER_CONSOLE_PORT or 47300)",
    )  # fmt: skip
    parser.add_argument("--history", default=os.path.expanduser("~/.gdriver_console_history"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    names = [n for s in args.server for n in s.replace(",", " ").split()] or ["127.0.0.1"]
    try:
        servers = sorted({parse_server(n) for n in names})
    except ValueError as exc:
        print(f"gdriver console: {exc}", file=sys.stderr)
        return 2
    clients = []
    for host, port in servers:
        try:
            clients.append(ConsoleClient(host, port))
        except OSError as exc:
            print(f"gdriver console: cannot connect to {host}:{port}: {exc.strerror or exc}",
                  file=sys.stderr)  # fmt: skip
            for c in clients:
                c.close()
            return 2
    try:
        if args.command:
            return run_once(clients, " ".join(args.command))
        return interactive(clients, args.history)
    finally:
        for c in clients:
            c.close()


def send_all(clients: list[ConsoleClient], line: str) -> tuple[int, bool]:
    """Send to every server in order; print replies. Returns (exit status, any closed)."""
    prefix = len(clients) > 1
    status, closed = 0, False
    for c in clients:
        try:
            lines = c.request(line)
        except OSError as exc:
            print(f"gdriver console: {c.name}: {exc}", file=sys.stderr)
            return 2, True
        if lines is None:
            closed = True
            continue
        if lines and lines[0].startswith("ERR "):
            status = 1
        for text in lines:
            print(f"{c.name}> {text}" if prefix else text)
    sys.stdout.flush()
    return status, closed


def run_once(clients: list[ConsoleClient], line: str) -> int:
    status, _ = send_all(clients, line)
    return status


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
            status, closed = send_all(clients, line)
            if closed:
                break
    finally:
        if readline is not None:
            with contextlib.suppress(OSError):
                readline.write_history_file(history)
    return 0 if status in (0, 1) else status
