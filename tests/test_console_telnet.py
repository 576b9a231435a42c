"""The console under a real telnet client: CR NUL line ends, option negotiation, piped input;
and the same bytes sent over raw sockets, including split across reads."""

from __future__ import annotations

import os
import pty
import select
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from support import HOST, Gdriver, Gearmand, console_raw, stop_pid

TELNET = "/usr/bin/telnet"  # Debian telnet
IAC, WILL, WONT, DO, DONT = 255, 251, 252, 253, 254
SGA, ECHO, LINEMODE = 3, 1, 34


@pytest.fixture(scope="module")
def driver(gearmand: Gearmand) -> Iterator[Gdriver]:
    g = Gdriver(gearmand, "--interval", "0", "--namespaces", "compat")
    g.start()
    try:
        yield g
    finally:
        g.stop()


def replies(raw: bytes) -> list[list[str]]:
    """The replies in a console output: lists of lines, each reply ended by its '.' line."""
    out: list[list[str]] = [[]]
    for line in raw.decode().split("\r\n")[:-1]:
        if line == ".":
            out.append([])
        else:
            out[-1].append(line)
    assert out[-1] == [], raw
    return out[:-1]


def exchange(port: int, *chunks: bytes, pause: float = 0.15) -> bytes:
    """Send chunks as separate writes (so the console reads them apart); read until EOF."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        for chunk in chunks:
            s.sendall(chunk)
            time.sleep(pause)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return buf


def test_cr_nul_ends_a_line(driver: Gdriver) -> None:
    raw = console_raw(driver.console_port, b"version\r\x00version\r\x00quit\r\x00", until_eof=True)
    assert replies(raw) == [[f"gdriver {v}"] for v in [version(driver)] * 2], raw


def version(driver: Gdriver) -> str:
    return driver.console("version")[0].split()[1]


def test_piped_crlf_through_telnet_is_one_line(driver: Gdriver) -> None:
    """`printf 'status\\r\\n' | telnet` sends status CR NUL CR LF: one command, one reply."""
    raw = exchange(driver.console_port, b"version\r\x00\r\nversion\r\x00\r\n")
    assert replies(raw) == [[f"gdriver {version(driver)}"]] * 2, raw


def test_line_ends_split_across_reads(driver: Gdriver) -> None:
    v = f"gdriver {version(driver)}"
    raw = exchange(
        driver.console_port,
        b"version\r",
        b"\x00",
        b"\r",
        b"\nversion\r",
        b"\n",
        b"version\n",
        b"\rversion\r\x00",
        b"nope\r\x00",
    )
    assert replies(raw) == [[v], [v], [v], [v], ["ERR unknown_command: nope"]], raw
    # an empty line is still a command (Perl: ERR unknown_command with an empty name)
    raw = exchange(driver.console_port, b"version\r\x00", b"\r\x00")
    assert replies(raw) == [[v], ["ERR unknown_command: "]], raw


def test_option_negotiation_is_answered(driver: Gdriver) -> None:
    """Suppress-go-ahead is agreed, every other option refused, each request answered once."""
    request = bytes([IAC, DO, SGA, IAC, DO, ECHO, IAC, WILL, LINEMODE])
    raw = exchange(driver.console_port, request, request[:3] + b"version\r\x00")
    answers = bytes([IAC, WILL, SGA, IAC, WONT, ECHO, IAC, DONT, LINEMODE])
    assert raw == answers + f"gdriver {version(driver)}\r\n.\r\n".encode(), raw


def test_no_telnet_bytes_for_clients_that_negotiate_nothing(driver: Gdriver) -> None:
    """Net::Telnet asks for nothing: the replies stay byte for byte as before."""
    raw = console_raw(driver.console_port, b"show nope\n")
    assert raw == b"ERR invalid_job_name: nope\r\n.\r\n"


def test_real_telnet_piped(driver: Gdriver) -> None:
    script = "printf 'version\\r\\nversion\\nquit\\r\\n'; sleep 3"
    proc = subprocess.run(
        f"({script}) | {TELNET} {HOST} {driver.console_port}",
        shell=True,
        capture_output=True,
        timeout=20,
        check=False,
    )
    out = proc.stdout.decode()
    assert "ERR" not in out, out
    assert out.count(f"gdriver {version(driver)}\n.\n") == 2, out  # telnet prints LF
    assert "Connection closed by foreign host" in proc.stderr.decode() + out


def test_real_telnet_character_mode(driver: Gdriver) -> None:
    """Interactive telnet on a terminal, switched to character mode: each Enter sends CR NUL."""
    v = f"gdriver {version(driver)}"
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [TELNET, HOST, str(driver.console_port)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    seen = b""

    def read_until(text: bytes, count: int = 1, timeout: float = 10) -> bytes:
        """Read the terminal until ``text`` has appeared ``count`` times in all of it."""
        nonlocal seen
        deadline = time.monotonic() + timeout
        while seen.count(text) < count and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # the terminal closed: telnet exited
                    break
        return seen

    try:
        read_until(b"Escape character")
        os.write(master, b"version\r")  # line mode first
        read_until(v.encode())
        os.write(master, b"\x1d")  # the escape character: telnet's own prompt
        read_until(b"telnet>")
        time.sleep(0.5)  # telnet flushes terminal input when it switches modes
        os.write(master, b"mode character\r")
        time.sleep(0.5)
        os.write(master, b"status\r")
        os.write(master, b"version\r")
        assert read_until(v.encode(), count=2).count(v.encode()) == 2, seen
        os.write(master, b"quit\r")
        out = read_until(b"Connection closed by foreign host")
        assert b"Connection closed by foreign host" in out, out
        assert b"ERR" not in out, out
        assert b"compat.cases" in out, out  # the status reply
        assert proc.wait(10) == 0  # quit: the server closed, telnet ends cleanly
    finally:
        stop_pid(proc)
        os.close(master)
