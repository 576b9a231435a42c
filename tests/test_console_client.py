"""``gdriver console``: the client, one-shot and interactive (pipe and pty), against real
gdriver consoles."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import HOST, ROOT, Gdriver, Gearmand, console_command, free_port, running

PING = "obs.console.Console.ping"
PONG = "obs.console.Console.pong"


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GDRIVER_")}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="gdriver-console-home-") as tmp:
        yield Path(tmp)


def console(
    *args: str, home: Path, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gdriver", "console", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        env=client_env(HOME=str(home), **env),
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def two(gearmand: Gearmand) -> Iterator[tuple[Gdriver, Gdriver]]:
    """Two gdrivers (min 0 jobs: no processes), sorted by console port."""
    with (
        running(gearmand, "--namespaces", "obs.console", "--interval", "1") as a,
        running(gearmand, "--namespaces", "obs.console", "--interval", "1") as b,
    ):
        yield (a, b) if a.console_port < b.console_port else (b, a)


def test_one_shot(two: tuple[Gdriver, Gdriver], home: Path) -> None:
    a, _ = two
    status = a.console("status")
    assert len(status) == 2
    r = console("--server", f"{HOST}:{a.console_port}", "status", home=home)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == "".join(f"{x}\n" for x in status)  # no '.' line
    assert r.stdout.splitlines()[0].endswith("  ")  # the trailing spaces are kept
    # a command with arguments, given as several words
    r = console("--server", f"{HOST}:{a.console_port}", "set_max_processes", PING, "2", home=home)
    assert (r.returncode, r.stdout) == (0, "OK\n")
    assert a.console(f"show {PING}")[0].startswith(f"{PING}  0  2  0  ")
    r = console("--server", f"{HOST}:{a.console_port}", f"set_max_processes {PING} 1", home=home)
    assert (r.returncode, r.stdout) == (0, "OK\n")


def test_one_shot_err_exits_1(two: tuple[Gdriver, Gdriver], home: Path) -> None:
    a, _ = two
    r = console("--server", f"{HOST}:{a.console_port}", "show", "nope", home=home)
    assert (r.returncode, r.stdout) == (1, "ERR invalid_job_name: nope\n")
    r = console("--server", f"{HOST}:{a.console_port}", "asdf", home=home)
    assert (r.returncode, r.stdout) == (1, "ERR unknown_command: asdf\n")


def test_unreachable_exits_2(two: tuple[Gdriver, Gdriver], home: Path) -> None:
    a, _ = two
    dead = free_port()
    r = console("--server", f"{HOST}:{dead}", "status", home=home)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"gdriver console: cannot connect to {HOST}:{dead}"), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    # one dead server of two: nothing is sent to the live one
    r = console(
        "--server", f"{HOST}:{a.console_port}", "--server", f"{HOST}:{dead}",
        "set_max_processes", PING, "3", home=home,
    )  # fmt: skip
    assert r.returncode == 2 and r.stdout == ""
    assert a.console(f"show {PING}")[0].startswith(f"{PING}  0  1  0  ")
    for bad in ("notaport", "99999", "0"):
        r = console("--server", f"{HOST}:{bad}", "status", home=home)
        assert r.returncode == 64 and "port must be a number" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = console("status", home=home, GDRIVER_CONSOLE_PORT="abc")
    assert r.returncode == 78, r
    assert r.stderr.startswith(
        "gdriver console: invalid configuration: console_port (env GDRIVER_CONSOLE_PORT)"
    )
    # usage errors have their own status, apart from "unreachable"
    r = console("--bogus", "status", home=home)
    assert r.returncode == 64 and len(r.stderr.splitlines()) == 1, r
    r = console("--serv", f"{HOST}:{a.console_port}", "status", home=home)  # no abbreviations
    assert r.returncode == 64, r


def test_port_from_environment(two: tuple[Gdriver, Gdriver], home: Path) -> None:
    a, b = two
    port = str(a.console_port)
    r = console("version", home=home, GDRIVER_CONSOLE_PORT=port)
    assert (r.returncode, r.stdout.startswith("gdriver ")) == (0, True), r
    r = console("--server", HOST, "status", home=home, GDRIVER_CONSOLE_PORT=port)
    assert r.returncode == 0 and r.stdout.splitlines() == a.console("status")
    # --server with a port wins over the environment
    dead = str(free_port())
    r = console("--server", f"{HOST}:{b.console_port}", "version", home=home,
                GDRIVER_CONSOLE_PORT=dead)  # fmt: skip
    assert r.returncode == 0
    r = console("version", home=home, GDRIVER_CONSOLE_PORT=dead)
    assert r.returncode == 2 and f"{HOST}:{dead}" in r.stderr


def test_two_servers_one_shot(two: tuple[Gdriver, Gdriver], home: Path) -> None:
    a, b = two
    na, nb = f"{HOST}:{a.console_port}", f"{HOST}:{b.console_port}"
    r = console("--server", nb, "--server", na, "status", home=home)  # given unsorted
    assert r.returncode == 0, r.stderr
    expected = [f"{na}> {x}" for x in a.console("status")]
    expected += [f"{nb}> {x}" for x in b.console("status")]
    assert r.stdout.splitlines() == expected
    r = console("--server", f"{nb},{na}", "show", "nope", home=home)
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        f"{na}> ERR invalid_job_name: nope",
        f"{nb}> ERR invalid_job_name: nope",
    ]


def test_interactive_through_a_pipe(
    two: tuple[Gdriver, Gdriver], home: Path, tmp_path: Path
) -> None:
    a, b = two
    na, nb = f"{HOST}:{a.console_port}", f"{HOST}:{b.console_port}"
    r = console(
        "--server", nb, "--server", na, "--history", str(tmp_path / "history"),
        home=home, stdin="version\n\nshow nope\nquit\nstatus\n",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("console> ")
    assert out.count("console> ") == 4  # version, the empty line, show, quit
    from gdriver import __version__

    lines = out.replace("console> ", "\n").split("\n")
    lines = [x for x in lines if x]
    assert lines == [
        f"{na}> gdriver {__version__}",
        f"{nb}> gdriver {__version__}",
        f"{na}> ERR invalid_job_name: nope",
        f"{nb}> ERR invalid_job_name: nope",
    ]
    assert PING not in out  # nothing after quit was sent
    # end of input leaves too
    r = console("--server", na, "--history", str(tmp_path / "history"), home=home,
                stdin="version\n")  # fmt: skip
    assert r.returncode == 0 and f"gdriver {__version__}" in r.stdout
    assert not (home / ".gdriver_console_history").exists()


def read_until(fd: int, marker: bytes, timeout: float = 10.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {marker!r} in {buf!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_through_a_pty(
    two: tuple[Gdriver, Gdriver], home: Path, tmp_path: Path
) -> None:
    a, b = two
    na, nb = f"{HOST}:{a.console_port}", f"{HOST}:{b.console_port}"
    history = tmp_path / "history"
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gdriver", "console", "--server", f"{na},{nb}",
         "--history", str(history)],
        stdin=slave, stdout=slave, stderr=slave, env=client_env(HOME=str(home), TERM="dumb"),
        cwd=ROOT, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    try:
        read_until(master, b"console> ")
        os.write(master, b"status\r")
        out = read_until(master, b"console> ").decode()
        rows = [x.strip("\r") for x in out.split("\n")]
        expected = [f"{na}> {x}" for x in a.console("status")]
        expected += [f"{nb}> {x}" for x in b.console("status")]
        for row in expected:
            assert row in rows, (row, rows)
        assert rows.index(expected[0]) < rows.index(expected[-1])
        os.write(master, b"killall nope\r")
        out = read_until(master, b"console> ").decode()
        assert f"{na}> ERR invalid_job_name: nope" in out
        os.write(master, b"quit\r")
        read_until(master, b"\n", timeout=5)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    assert "status" in history.read_text().split("\n")
    # the servers are unaffected: the client's quit is not sent to them
    assert console_command(a.console_port, "version")[0].startswith("gdriver ")


def test_address_from_the_configuration_the_service_reads(
    two: tuple[Gdriver, Gdriver], home: Path, tmp_path: Path
) -> None:
    a, _ = two
    conf = tmp_path / "app.yml"
    conf.write_text(f"console_port: {a.console_port}\nconsole_bind: 0.0.0.0\n")
    r = console("--configfile", str(conf), "version", home=home)
    assert (r.returncode, r.stdout.startswith("gdriver ")) == (0, True), r
    r = console("version", home=home, GDRIVER_CONFIGFILE=str(conf))
    assert (r.returncode, r.stdout.startswith("gdriver ")) == (0, True), r
    conf.write_text("console_prot: 1\n")
    r = console("--configfile", str(conf), "version", home=home)
    assert r.returncode == 78 and "console_prot" in r.stderr and "console_port" in r.stderr


def test_job_name_suffix_and_nearest_names(two: tuple[Gdriver, Gdriver], home: Path) -> None:
    a, _ = two
    server = f"{HOST}:{a.console_port}"
    r = console("--server", server, "show", "Console.ping", home=home)
    assert r.returncode == 0 and r.stdout.startswith(f"{PING}  0  "), r
    r = console("--server", server, "show", "ping", home=home)
    assert r.returncode == 0 and r.stdout.startswith(f"{PING}  0  "), r
    r = console("--server", server, "show", "Console.pingg", home=home)
    assert (r.returncode, r.stdout) == (1, "ERR invalid_job_name: Console.pingg\n")  # Perl's
    assert r.stderr.startswith(f"gdriver console: no job 'Console.pingg' (did you mean {PING}")
    # a suffix two jobs share is not expanded
    r = console("--server", server, "show", "Console", home=home)
    assert r.returncode == 1 and r.stdout == "ERR invalid_job_name: Console\n"


def test_interactive_pipes_a_reply_through_a_shell_command(
    two: tuple[Gdriver, Gdriver], home: Path, tmp_path: Path
) -> None:
    a, _ = two
    r = console(
        "--server", f"{HOST}:{a.console_port}", "--history", str(tmp_path / "history"),
        home=home, stdin="status | grep -c pong\nstatus|tr a-z A-Z\n",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.replace("console> ", "\n").split("\n") if x]
    assert lines[0] == "1"
    assert lines[1].startswith(PING.upper()) and lines[2].startswith(PONG.upper())
