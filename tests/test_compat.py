"""The compatibility matrix: real Gearman clients (pygearman, Perl Gearman::Client, the PHP
extension, gear) against gdriver on the C gearmand, and real servers (C gearmand, Perl
Gearman::Server, gear's geard) under gdriver.

Each case describes what it saw in the words of a README cell, and asserts that this equals
the cell declared below (CLIENT_CELLS, SERVER_CELLS); test_readme_tables_match_the_matrix
compares every README cell with the same declaration. A change of behaviour fails a case until
the declaration, and with it the README, says what is now true. A cell may end in footnote
marks (" [1]"), which the README explains under its table."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from compat_support import CLIENTS, SERVERS, Run, php_do_normal, server, submit
from compat_support import submit_background as client_background
from live_helpers import show_pids
from support import ROOT, Gdriver, Gearmand, do, http_status, submit_background, wait_for

FAST = ("--interval", "0.5", "--namespaces", "compat")
MESSAGE = "ValueError: boom: x"
MIB = 1 << 20
NOT_RUN = "not run"

# README cells, row by row: the row name, then one cell per client or server
CLIENT_CELLS: dict[str, dict[str, str]] = {
    "foreground": {"pygearman": "yes", "perl": "yes", "php": "yes", "gear": "yes [1]"},
    "background": {"pygearman": "yes", "perl": "yes", "php": "yes", "gear": "yes"},
    "status": {
        "pygearman": "latest only",
        "perl": "each",
        "php": "each",
        "gear": "latest only",
    },
    "data, warning": {
        "pygearman": "yes",
        "perl": "yes",
        "php": "yes",
        "gear": "in `job.data` [1]",
    },
    "failure": {
        "pygearman": "message as warning",
        "perl": "message as warning",
        "php": "message as warning (`doNormal`: none)",
        "gear": "message in `job.data` [1]",
    },
    "failure, send_exceptions": {
        "pygearman": "`KeyError` [2]",
        "perl": "message as exception, no fail callback",
        "php": "message as exception, no fail callback",
        "gear": "message as exception",
    },
    "None result": {"pygearman": "yes", "perl": "yes", "php": "yes", "gear": "yes"},
    "1 MiB": {"pygearman": "yes", "perl": "yes", "php": "yes", "gear": "yes"},
    "16 MiB": {"pygearman": NOT_RUN, "perl": "yes [3]", "php": NOT_RUN, "gear": NOT_RUN},
    "binary": {"pygearman": "yes", "perl": "yes", "php": "yes", "gear": "yes"},
    "unique": {"pygearman": "yes [4]", "perl": "yes", "php": "yes", "gear": "yes [4]"},
}
SERVER_CELLS: dict[str, dict[str, str]] = {
    "jobs run": {"c": "yes", "perl": "yes, with GRAB_JOB [5]", "geard": "yes"},
    "`job.unique`": {"c": "yes", "perl": "empty", "geard": "yes"},
    "data, warning": {"c": "yes", "perl": "not sent", "geard": "yes"},
    "failure": {"c": "message as warning", "perl": "no message [6]", "geard": "message as warning"},
    "readiness": {"c": "yes", "perl": "yes", "geard": "yes [7]"},
    "scale up from min 0": {"c": "yes", "perl": "yes", "geard": "yes"},
    "scale down": {"c": "yes", "perl": "yes", "geard": "yes"},
    "reconnect": {"c": "yes", "perl": "yes", "geard": "yes"},
}


def outcome(cell: str) -> str:
    """A cell without its footnote marks: the words a case compares with what it saw."""
    return re.sub(r"( \[\d+\])+$", "", cell)


def expect(table: dict[str, dict[str, str]], row: str, column: str, seen: str) -> None:
    cell = table[row][column]
    assert seen == outcome(cell), f"{row} / {column}: saw {seen!r}, the README cell says {cell!r}"


def eventually(predicate: Callable[[], Any], timeout: float, interval: float = 0.1) -> bool:
    try:
        wait_for(predicate, timeout, interval)
    except TimeoutError:
        return False
    return True


# -- what a case saw, in the words of a cell ----------------------------------------------------


def round_trip(run: Run, sent: bytes) -> str:
    if run.failed or run.exception is not None:
        return f"fails: {run}"
    return "yes" if run.result == sent else f"wrong result: {run.result!r:.60}"


def status_seen(run: Run) -> str:
    kinds = {((2, 2),): "latest only", ((1, 2), (2, 2)): "each"}
    return kinds.get(tuple(run.status), f"status updates {run.status}")


def data_warning_seen(run: Run) -> str:
    if run.failed or run.exception is not None:
        return f"fails: {run}"
    if run.result == b"done" and run.data == [b"part one"] and run.warnings == [b"careful"]:
        return "yes"
    if run.data == [b"part one", b"careful", b"done"]:
        return "in `job.data`"  # gear: data, warning and result in one list
    if run.result == b"done" and run.data == [] and run.warnings == []:
        return "not sent"
    return f"data {run.data}, warnings {run.warnings}, result {run.result!r}"


def failure_seen(run: Run) -> str:
    if run.result is not None:
        return f"succeeds with {run.result!r:.60}"
    if run.exception == MESSAGE:
        where = "message as exception"
    elif run.warnings == [MESSAGE.encode()]:
        where = "message as warning"
    elif run.data == [MESSAGE.encode()]:
        where = "message in `job.data`"
    elif not (run.warnings or run.data or run.exception):
        where = "no message"
    else:
        where = f"message not where expected: {run}"
    return where if run.failed else where + ", no fail callback"


def unique_seen(client: str, address: str) -> str:
    unique = f"same-{client}-{uuid.uuid4().hex}"
    first, second = submit(client, address, "compat.counted", b"0.5", unique, pair=True)
    if first.failed or not first.result or second.result != first.result:
        return f"results differ: {first}, {second}"
    # the job ran once if the process's next run is the next count
    pid, count = first.result.decode().split(":")
    (after,) = submit(client, address, "compat.counted", b"0", f"other-{unique}")
    return "yes" if after.result == f"{pid}:{int(count) + 1}".encode() else "ran twice"


# -- clients against gdriver on the C gearmand --------------------------------------------------


@pytest.fixture(scope="module")
def driver(gearmand: Gearmand) -> Iterator[Gdriver]:
    g = Gdriver(gearmand, *FAST)
    g.start()
    try:
        wait_for(lambda: gearmand.workers_for("compat.echo") > 0, 20)
        yield g
    finally:
        g.stop()


@pytest.fixture(scope="module")
def exceptions_driver() -> Iterator[Gearmand]:
    """gdriver with ``send_exceptions: true``, on a gearmand of its own."""
    g = Gearmand().start()
    d = Gdriver(g, *FAST, config={"send_exceptions": True})
    try:
        d.start()
        wait_for(lambda: g.workers_for("compat.fail") > 0, 20)
        yield g
    finally:
        d.stop()
        g.stop()


@pytest.mark.parametrize("client", CLIENTS)
def test_client_foreground(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    sent = b"hello " + client.encode()
    (run,) = submit(client, gearmand.address, "compat.echo", sent)
    expect(CLIENT_CELLS, "foreground", client, round_trip(run, sent))


@pytest.mark.parametrize("client", CLIENTS)
def test_client_background(
    driver: Gdriver, gearmand: Gearmand, client: str, tmp_path: Path
) -> None:
    path = tmp_path / "ran"
    unique = f"bg-{client}-{uuid.uuid4().hex}"
    client_background(client, gearmand.address, "compat.touch", str(path).encode(), unique)
    ran = eventually(path.exists, 15) and path.read_bytes() == b"ran " + unique.encode()
    expect(CLIENT_CELLS, "background", client, "yes" if ran else "no")


@pytest.mark.parametrize("client", CLIENTS)
def test_client_status_data_warning(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    (run,) = submit(client, gearmand.address, "compat.progress", b"x")
    expect(CLIENT_CELLS, "status", client, status_seen(run))
    expect(CLIENT_CELLS, "data, warning", client, data_warning_seen(run))


@pytest.mark.parametrize("client", CLIENTS)
def test_client_failure(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    """send_exceptions false (the default): the same whether the client asks for exceptions."""
    seen = {
        failure_seen(submit(client, gearmand.address, "compat.fail", b"x", exceptions=asks)[0])
        for asks in (False, True)
    }
    text = " / ".join(sorted(seen))
    if client == "php":
        # PHP's synchronous call returns what the result would be and an error code
        normal = php_do_normal(gearmand.address, "compat.fail", b"x", exceptions=True)
        plain = normal["result"] == "" and normal["error"] == "GEARMAN_WORK_FAIL"
        text += f" (`doNormal`: {'none' if plain else normal})"
    expect(CLIENT_CELLS, "failure", client, text)


@pytest.mark.parametrize("client", CLIENTS)
def test_client_failure_send_exceptions(exceptions_driver: Gearmand, client: str) -> None:
    """The client asks for exceptions (pygearman cannot). gearmand 1.1.20 treats
    WORK_EXCEPTION as final: no WORK_FAIL follows it, and a client that did not ask for
    exceptions gets a WORK_FAIL whose handle ends in NUL."""
    try:
        (run,) = submit(client, exceptions_driver.address, "compat.fail", b"x", exceptions=True)
        seen = failure_seen(run)
    except KeyError as e:
        seen = "`KeyError`" if "\\x00" in str(e) else f"KeyError {e}"
    expect(CLIENT_CELLS, "failure, send_exceptions", client, seen)


@pytest.mark.parametrize("client", CLIENTS)
def test_client_none_result(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    (run,) = submit(client, gearmand.address, "compat.nothing", b"x")
    expect(CLIENT_CELLS, "None result", client, round_trip(run, b""))


@pytest.mark.parametrize("client", CLIENTS)
def test_client_1mib(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    sent = os.urandom(MIB)
    (run,) = submit(client, gearmand.address, "compat.echo", sent)
    expect(CLIENT_CELLS, "1 MiB", client, round_trip(run, sent))


@pytest.mark.parametrize("client", [c for c in CLIENTS if CLIENT_CELLS["16 MiB"][c] != NOT_RUN])
def test_client_16mib(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    """Run once, through the clients whose cell is not "not run"."""
    sent = os.urandom(16 * MIB)
    (run,) = submit(client, gearmand.address, "compat.echo", sent)
    expect(CLIENT_CELLS, "16 MiB", client, round_trip(run, sent))


@pytest.mark.parametrize("client", CLIENTS)
def test_client_binary(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    sent = bytes(range(256)) + b"\xff\xfe\x00\xc3(" + "ü".encode("latin-1")
    (run,) = submit(client, gearmand.address, "compat.echo", sent)
    expect(CLIENT_CELLS, "binary", client, round_trip(run, sent))


@pytest.mark.parametrize("client", CLIENTS)
def test_client_unique_coalescing(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    expect(CLIENT_CELLS, "unique", client, unique_seen(client, gearmand.address))


# -- servers under gdriver -----------------------------------------------------------------------


class Served:
    """A server of one kind and a gdriver on it, with its NOTIFY_SOCKET."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.server = server(kind).start()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify"))
        self.notify.setblocking(False)
        self.notes: list[str] = []
        self.gdriver = Gdriver(
            self.server, *FAST, metrics=True, env={"NOTIFY_SOCKET": str(tmp / "notify")}
        )

    def notified(self) -> list[str]:
        while True:
            try:
                self.notes += self.notify.recv(65536).decode().split("\n")
            except BlockingIOError:
                return self.notes

    def ready(self) -> bool:
        return http_status(self.gdriver.metrics_port, "/readyz") == 200

    def restart_server(self) -> None:
        port = self.server.port
        self.server.stop()
        self.server = server(self.kind, port).start()

    def close(self) -> None:
        self.gdriver.stop()
        self.server.stop()
        self.notify.close()


@pytest.fixture(scope="module", params=SERVERS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    s = Served(request.param, tmp_path_factory.mktemp(f"served-{request.param}"))
    try:
        s.gdriver.start()
        yield s
    finally:
        s.close()


def runs_echo(s: Served, timeout: float = 10) -> bool:
    req = do(s.server.address, "compat.echo", b"ping " + s.kind.encode(), timeout=timeout)
    return bool(req.state == "COMPLETE" and req.result == b"ping " + s.kind.encode())


def test_server_jobs_run(served: Served) -> None:
    seen = "yes" if runs_echo(served) else "no"
    if any("refuses GRAB_JOB_UNIQ" in line for line in served.gdriver.lines):
        seen += ", with GRAB_JOB"
    expect(SERVER_CELLS, "jobs run", served.kind, seen)


def test_server_job_unique(served: Served, tmp_path: Path) -> None:
    path = tmp_path / "ran"
    unique = f"unique-{uuid.uuid4().hex}"
    client_background(
        "pygearman", served.server.address, "compat.touch", str(path).encode(), unique
    )
    if not eventually(path.exists, 15):
        seen = "no job ran"
    else:
        got = path.read_bytes()
        kinds = {b"ran " + unique.encode(): "yes", b"ran ": "empty"}
        seen = kinds.get(got, f"job.unique {got!r}")
    expect(SERVER_CELLS, "`job.unique`", served.kind, seen)


def test_server_data_warning(served: Served) -> None:
    (run,) = submit("pygearman", served.server.address, "compat.progress", b"x")
    expect(SERVER_CELLS, "data, warning", served.kind, data_warning_seen(run))


def test_server_failure(served: Served) -> None:
    (run,) = submit("pygearman", served.server.address, "compat.fail", b"x")
    expect(SERVER_CELLS, "failure", served.kind, failure_seen(run))


def test_server_readiness(served: Served) -> None:
    """Ready (/readyz 200, READY=1) means a job submitted now is served."""
    if not eventually(served.ready, 15, interval=0.2):
        seen = "/readyz never 200"
    elif not eventually(lambda: "READY=1" in served.notified(), 5):
        seen = "no READY=1"
    else:
        seen = "yes" if runs_echo(served) else "ready, but no job ran"
    expect(SERVER_CELLS, "readiness", served.kind, seen)


def test_server_scale_up_from_min_0(served: Served) -> None:
    assert show_pids(served.gdriver, "compat.sleep") == []
    submit_background(served.server.address, "compat.sleep", [b"3", b"3", b"3"])
    three = eventually(lambda: len(show_pids(served.gdriver, "compat.sleep")) == 3, 15, 0.2)
    expect(SERVER_CELLS, "scale up from min 0", served.kind, "yes" if three else "no")


def test_server_scale_down(served: Served) -> None:
    if not show_pids(served.gdriver, "compat.sleep"):
        submit_background(served.server.address, "compat.sleep", [b"0.5"])
        wait_for(lambda: show_pids(served.gdriver, "compat.sleep"), 15, interval=0.2)
    none = eventually(lambda: show_pids(served.gdriver, "compat.sleep") == [], 20, 0.2)
    expect(SERVER_CELLS, "scale down", served.kind, "yes" if none else "no")


def test_server_reconnect(served: Served) -> None:
    served.restart_server()
    seen = "yes" if runs_echo(served, timeout=15) else "no"
    expect(SERVER_CELLS, "reconnect", served.kind, seen)


# -- the README ----------------------------------------------------------------------------------


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## Compatibility\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README has no section Compatibility"
    return m.group(1)


def readme_table(title: str) -> tuple[list[str], dict[str, list[str]], str]:
    """The column names, the cells by row name, and the text after the table under the
    heading ``title``."""
    m = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^#|\Z)", readme_section(), re.S | re.M)
    assert m, f"README has no table {title!r}"
    lines = [line for line in m.group(1).splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    rows = {r[0]: r[1:] for r in split[2:]}
    assert len(rows) == len(split) - 2, f"a row name repeats in {title!r}"
    return split[0][1:], rows, m.group(1)


@pytest.mark.parametrize(
    ("title", "cells", "columns"),
    [
        ("Clients against gdriver on the C gearmand", CLIENT_CELLS, CLIENTS),
        ("Servers under gdriver", SERVER_CELLS, SERVERS),
    ],
)
def test_readme_tables_match_the_matrix(
    title: str, cells: dict[str, dict[str, str]], columns: tuple[str, ...]
) -> None:
    header, rows, text = readme_table(title)
    assert header == list(columns) and list(rows) == list(cells), (header, list(rows))
    for row, by_column in cells.items():
        assert list(by_column) == list(columns), row
        assert rows[row] == list(by_column.values()), f"README row {row!r} != {by_column}"
    # every footnote mark in the table is explained under it, and every footnote is used
    marks = set(re.findall(r"\[(\d+)\]", " ".join(" ".join(r) for r in rows.values())))
    notes = set(re.findall(r"^- \[(\d+)\] ", text, re.M))
    assert marks == notes, (sorted(marks), sorted(notes))
