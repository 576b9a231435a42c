"""The gearmand poller against a real gearmand and a port where nothing listens: merged status,
gearmand_up, the early re-poll and its rate limit, forgetting a server on reconfiguration."""

from __future__ import annotations

import time
from collections.abc import Callable

from support import HOST, Gearmand, free_port, submit_background

from gdriver.loop import EventLoop
from gdriver.metrics import Metrics
from gdriver.poller import REPOLL_MIN_GAP, GearmandPoller, Status


def run_until(loop: EventLoop, done: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        loop.run_once(0.05)
    assert done(), "timed out"


def gauge(metrics: Metrics, server: str) -> float | None:
    return metrics.registry.get_sample_value("gdriver_gearmand_up", {"server": server})


def test_poll_round(gearmand: Gearmand) -> None:
    function = f"poller_probe_{free_port()}"
    submit_background(gearmand.address, function, [b"a", b"b"])
    dead = (HOST, free_port())
    live = (HOST, gearmand.port)
    loop, metrics = EventLoop(), Metrics()
    rounds: list[Status | None] = []
    poller = GearmandPoller(loop, metrics, rounds.append, [live, dead], interval=30)
    try:
        poller.start()
        run_until(loop, lambda: len(rounds) == 1)
        status = rounds[0]
        assert status is not None and status[function].waiting == 2
        assert poller.last_status is status
        assert poller.gearmand_up == {gearmand.address: True, f"{HOST}:{dead[1]}": False}
        assert poller.any_up()
        assert gauge(metrics, gearmand.address) == 1
        assert gauge(metrics, f"{HOST}:{dead[1]}") == 0
        assert poller.timer is not None and not poller.queries  # the next round, 30 s away

        # an early round is asked for: it starts at once after the rate limit
        poller.request()
        run_until(loop, lambda: len(rounds) == 2, timeout=REPOLL_MIN_GAP + 5)
        # asked for while a round is in flight: one more round, REPOLL_MIN_GAP after it
        poller.start()
        assert poller.queries
        poller.request()
        assert poller.repoll_wanted
        run_until(loop, lambda: len(rounds) == 4, timeout=REPOLL_MIN_GAP + 5)

        poller.configure([live], interval=30)
        assert poller.gearmand_up == {gearmand.address: True}
        assert gauge(metrics, f"{HOST}:{dead[1]}") is None
    finally:
        poller.stop()
        poller.close()
        loop.close()


def test_no_server_answers() -> None:
    dead = (HOST, free_port())
    loop, metrics = EventLoop(), Metrics()
    rounds: list[Status | None] = []
    poller = GearmandPoller(loop, metrics, rounds.append, [dead], interval=30)
    try:
        poller.start()
        run_until(loop, lambda: rounds)
        assert rounds == [None]
        assert poller.last_status == {}
        assert not poller.any_up()
        poller.stop()
        poller.start()  # stopped: no new round
        assert not poller.queries
    finally:
        poller.close()
        loop.close()
