"""``--daemonize`` for classic init systems: double fork, new session, pidfile.

Unlike the Perl original, the log file is opened for appending (never truncated) and a
pidfile whose process still lives stops a second start.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys

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
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)
    pid = os.getpid()

    def remove() -> None:
        if os.getpid() == pid and pid_from_file(path) == pid:
            with contextlib.suppress(OSError):
                os.unlink(path)

    atexit.register(remove)


def daemonize(pidfile: str = "", logfile: str = "") -> None:
    """Detach; the launcher exits 0. stdout/stderr go to logfile (appended) or /dev/null."""
    if pidfile:
        pidfile = os.path.abspath(pidfile)
        check_pidfile(pidfile)
    target = os.path.abspath(logfile) if logfile else os.devnull
    out = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.umask(0o022)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(devnull)
    os.close(out)
    if pidfile:
        write_pidfile(pidfile)
