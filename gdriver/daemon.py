"""The pidfile, the logfile and ``--daemonize`` (classic init systems: double fork, new
session).

Both files are honoured with and without ``--daemonize``: the log file is opened for
appending (never truncated; Perl truncated it) and takes all output, and a pidfile whose
process still lives stops a second start. The launcher of ``--daemonize`` exits only once
the daemon has written its pidfile, and fails with one line when it cannot.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import NoReturn

from gdriver import config


def pid_from_file(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_pidfile(path: str) -> None:
    pid = pid_from_file(path)
    if pid is not None and pid != os.getpid() and pid_alive(pid):
        print(f"gdriver: already running with PID {pid} (pidfile {path})", file=sys.stderr)
        sys.exit(config.EX_CONFIG)


def write_pidfile(path: str) -> None:
    """Write our PID (atomically); removed at exit if it is still ours. ConfigError when
    the file cannot be written."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise config.ConfigError("pidfile", path, f"cannot write: {exc.strerror or exc}") from None
    pid = os.getpid()

    def remove() -> None:
        if os.getpid() == pid and pid_from_file(path) == pid:
            with contextlib.suppress(OSError):
                os.unlink(path)

    atexit.register(remove)


def open_logfile(path: str) -> int:
    """The log file opened for appending (a ConfigError when it cannot be)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    except OSError as exc:
        raise config.ConfigError("logfile", path, f"cannot open: {exc.strerror or exc}") from None


def start(daemonize: bool, pidfile: str = "", logfile: str = "") -> None:
    """Detach if asked, send output to the log file if one is given, write the pidfile.
    Raises ConfigError (in the launcher) when a file cannot be written."""
    pidfile = os.path.abspath(pidfile) if pidfile else ""
    logfile = os.path.abspath(logfile) if logfile else ""
    if pidfile:
        check_pidfile(pidfile)
    out = open_logfile(logfile) if logfile else -1
    if daemonize:
        _detach(pidfile, out)
        return
    if pidfile:
        write_pidfile(pidfile)
    if out >= 0:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)


def _detach(pidfile: str, out: int) -> None:
    """Double fork; the launcher waits for the daemon's word over a pipe, then exits 0, or
    prints the daemon's one-line error and exits 78."""
    if out < 0:
        out = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    report_r, report_w = os.pipe()
    if os.fork() > 0:
        os.close(report_w)
        _launcher_exit(report_r)
    os.close(report_r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.umask(0o022)
    os.chdir("/")
    try:
        if pidfile:
            write_pidfile(pidfile)
    except config.ConfigError as exc:
        os.write(report_w, f"gdriver: invalid configuration: {exc}\n".encode())
        os._exit(config.EX_CONFIG)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)
    os.write(report_w, b"ok\n")
    os.close(report_w)


def _launcher_exit(report_r: int) -> NoReturn:
    chunks = []
    while chunk := os.read(report_r, 4096):
        chunks.append(chunk)
    text = b"".join(chunks).decode("utf-8", "replace").strip()
    if text == "ok":
        os._exit(0)
    print(text or "gdriver: the daemon exited while starting", file=sys.stderr, flush=True)
    os._exit(config.EX_CONFIG)
