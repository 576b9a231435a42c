"""The compatibility matrix: real Gearman clients (pygearman, Perl Gearman::Client, the PHP
extension, gear) against gdriver on the C gearmand, and real servers (C gearmand, Perl
Gearman::Server, gear's geard) under gdriver. The README's compatibility tables list exactly
the cases defined here (test_readme_tables_match_the_matrix)."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from compat_support import CLIENTS, SERVERS, Run, php_do_normal, server, submit
from compat_support import submit_background as client_background
from live_helpers import show_pids
from support import ROOT, Gdriver, Gearmand, do, http_status, submit_background, wait_for

FAST = ("--interval", "0.5", "--namespaces", "compat")
MESSAGE = "ValueError: boom: x"
MIB = 1 << 20

# the rows of the README's tables: feature -> what the case checks
CLIENT_FEATURES = {
    "foreground": "result of a foreground job",
    "background": "a background job runs",
    "status/data/warning": "WORK_STATUS, WORK_DATA, WORK_WARNING reach the client",
    "failure": "a failing job fails, with its message (send_exceptions false)",
    "failure, send_exceptions": "the message in the client's exception callback",
    "None result": "an empty successful result",
    "1 MiB": "1 MiB round trip",
    "binary": "non-UTF-8 bytes round trip",
    "unique": "two submissions with one unique run once",
}
SERVER_FEATURES = {
    "jobs run": "a job through gdriver's workers",
    "readiness": "/readyz 200 and READY=1 only when jobs can be served",
    "scale up from min 0": "a backlog starts processes",
    "scale down": "idle processes above min retire",
    "reconnect": "jobs run again after the server restarts",
}


def ok(run: Run, result: bytes) -> None:
    assert not run.failed and run.exception is None, run
    assert run.result == result, run


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


@pytest.fixture(scope="module", params=[False, True], ids=["exceptions_off", "exceptions_on"])
def exceptions_driver(request: pytest.FixtureRequest) -> Iterator[tuple[bool, Gearmand]]:
    """gdriver with the ``send_exceptions`` key set either way, on a gearmand of its own."""
    g = Gearmand().start()
    d = Gdriver(g, *FAST, config={"send_exceptions": request.param})
    try:
        d.start()
        wait_for(lambda: g.workers_for("compat.fail") > 0, 20)
        yield request.param, g
    finally:
        d.stop()
        g.stop()


@pytest.mark.parametrize("client", CLIENTS)
def test_client_foreground(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    (run,) = submit(client, gearmand.address, "compat.echo", b"hello " + client.encode())
    ok(run, b"hello " + client.encode())


@pytest.mark.parametrize("client", CLIENTS)
def test_client_background(
    driver: Gdriver, gearmand: Gearmand, client: str, tmp_path: Path
) -> None:
    path = tmp_path / "ran"
    unique = f"bg-{client}-{uuid.uuid4().hex}"
    client_background(client, gearmand.address, "compat.touch", str(path).encode(), unique)
    wait_for(path.exists, 15)
    assert path.read_bytes() == b"ran " + unique.encode()


@pytest.mark.parametrize("client", CLIENTS)
def test_client_status_data_warning(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    (run,) = submit(client, gearmand.address, "compat.progress", b"x")
    assert not run.failed, run
    if client == "gear":
        # gear appends data, warning and result payloads to one list and keeps a flag
        assert run.data == [b"part one", b"careful", b"done"] and run.warnings == [b"(flag)"]
        assert run.status == [(2, 2)]  # gear keeps the latest status only
        return
    assert run.result == b"done" and run.data == [b"part one"] and run.warnings == [b"careful"]
    # pygearman keeps the latest status only; Perl and PHP call back for each
    assert run.status == ([(2, 2)] if client == "pygearman" else [(1, 2), (2, 2)])


@pytest.mark.parametrize("client", CLIENTS)
def test_client_failure_with_message(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    (run,) = submit(client, gearmand.address, "compat.fail", b"x")
    assert run.failed and run.result is None and run.exception is None, run
    if client == "gear":
        assert run.data == [MESSAGE.encode()]  # gear puts the warning where results go
    else:
        assert run.warnings == [MESSAGE.encode()]


def test_php_do_normal_failure(driver: Gdriver, gearmand: Gearmand) -> None:
    """PHP's synchronous call: an empty string and WORK_FAIL, the message is not returned."""
    normal = php_do_normal(gearmand.address, "compat.fail", b"x", exceptions=True)
    assert normal["result"] == "" and normal["error"] == "GEARMAN_WORK_FAIL", normal


@pytest.mark.parametrize("client", CLIENTS)
def test_client_failure_send_exceptions(
    exceptions_driver: tuple[bool, Gearmand], client: str
) -> None:
    """send_exceptions false: WORK_WARNING + WORK_FAIL (as without the key); true: the message
    reaches the exception callback of clients that asked for exceptions. gearmand 1.1.20
    treats WORK_EXCEPTION as final: no WORK_FAIL follows it, and a client that did not ask
    for exceptions gets a WORK_FAIL whose handle ends in NUL."""
    send_exceptions, g = exceptions_driver
    if send_exceptions and client == "pygearman":
        # pygearman asks for no exceptions and cannot match the garbled handle
        with pytest.raises(KeyError, match=r"\\x00"):
            submit(client, g.address, "compat.fail", b"x", exceptions=True)
        return
    (run,) = submit(client, g.address, "compat.fail", b"x", exceptions=True)
    assert run.result is None, run
    if not send_exceptions:
        assert run.failed and run.exception is None, run
        expected = run.data if client == "gear" else run.warnings
        assert expected == [MESSAGE.encode()], run
    else:
        assert run.exception == MESSAGE, run
        # only gear counts an exception as a failure; Perl and PHP call no fail callback
        assert run.failed == (client == "gear"), run


@pytest.mark.parametrize("client", CLIENTS)
def test_client_none_result(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    (run,) = submit(client, gearmand.address, "compat.nothing", b"x")
    ok(run, b"")


@pytest.mark.parametrize("client", CLIENTS)
def test_client_1mib(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    payload = os.urandom(MIB)
    (run,) = submit(client, gearmand.address, "compat.echo", payload)
    ok(run, payload)


def test_16mib_once(driver: Gdriver, gearmand: Gearmand) -> None:
    """16 MiB through the Perl client (the slower of the two that handle it quickly)."""
    payload = os.urandom(16 * MIB)
    (run,) = submit("perl", gearmand.address, "compat.echo", payload)
    ok(run, payload)


@pytest.mark.parametrize("client", CLIENTS)
def test_client_binary(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    payload = bytes(range(256)) + b"\xff\xfe\x00\xc3(" + "ü".encode("latin-1")
    (run,) = submit(client, gearmand.address, "compat.echo", payload)
    ok(run, payload)


@pytest.mark.parametrize("client", CLIENTS)
def test_client_unique_coalescing(driver: Gdriver, gearmand: Gearmand, client: str) -> None:
    unique = f"same-{client}-{uuid.uuid4().hex}"
    first, second = submit(client, gearmand.address, "compat.counted", b"0.5", unique, pair=True)
    assert not first.failed and first.result, first
    assert second.result == first.result, (first, second)
    # the job ran once: the process's next run is the next count
    pid, count = first.result.decode().split(":")
    (after,) = submit(client, gearmand.address, "compat.counted", b"0", f"other-{unique}")
    assert after.result == f"{pid}:{int(count) + 1}".encode(), after


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
    assert runs_echo(served), f"no job ran on the {served.kind} server"


def test_server_readiness(served: Served) -> None:
    """Ready (/readyz 200, READY=1) means a job submitted now is served."""
    wait_for(served.ready, 15, interval=0.2)
    wait_for(lambda: "READY=1" in served.notified(), 5)
    assert runs_echo(served), f"/readyz said 200 on the {served.kind} server, but no job ran"


def test_server_scale_up_from_min_0(served: Served) -> None:
    assert show_pids(served.gdriver, "compat.sleep") == []
    submit_background(served.server.address, "compat.sleep", [b"3", b"3", b"3"])
    wait_for(lambda: len(show_pids(served.gdriver, "compat.sleep")) == 3, 15, interval=0.2)


def test_server_scale_down(served: Served) -> None:
    if not show_pids(served.gdriver, "compat.sleep"):
        submit_background(served.server.address, "compat.sleep", [b"0.5"])
        wait_for(lambda: show_pids(served.gdriver, "compat.sleep"), 15, interval=0.2)
    wait_for(lambda: show_pids(served.gdriver, "compat.sleep") == [], 20, interval=0.2)


def test_server_reconnect(served: Served) -> None:
    served.restart_server()
    assert runs_echo(served, timeout=15), f"no job ran after the {served.kind} server restarted"


# -- the README ----------------------------------------------------------------------------------


def readme_table(title: str) -> tuple[list[str], list[str]]:
    """The column names and row names of the README table under the heading ``title``."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#)", text, re.S | re.M)
    assert m, f"README has no section {title!r}"
    rows = [line for line in m.group(1).splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    names = [r.strip("|").split("|")[0].strip() for r in rows[2:]]
    return header[1:], names


def test_readme_tables_match_the_matrix() -> None:
    columns, rows = readme_table("Clients against gdriver on the C gearmand")
    assert columns == list(CLIENTS) and rows == list(CLIENT_FEATURES)
    columns, rows = readme_table("Servers under gdriver")
    assert columns == list(SERVERS) and rows == list(SERVER_FEATURES)
