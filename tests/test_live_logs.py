"""Live: a job's log records reach the supervisor even when it is slow to read them."""

from __future__ import annotations

import os
import signal
import threading

from live_helpers import call, wait_registered
from support import Gearmand, running, wait_for

BURST = "live.log_burst.LogBurst.burst"
BIG = 3000  # records: well over a default socket send buffer (net.core.wmem_default)


def test_records_survive_a_slow_supervisor_and_the_process_lives_on(gearmand: Gearmand) -> None:
    with running(gearmand, "--namespaces", "live.log_burst", "--interval", "1") as g:
        wait_registered(gearmand, BURST)
        first = call(gearmand, BURST, "1")
        os.kill(g.pid, signal.SIGSTOP)  # the supervisor reads nothing for a moment
        resume = threading.Timer(1.0, os.kill, (g.pid, signal.SIGCONT))
        resume.start()  # the job waits for it: back-pressure, not loss
        try:
            during = call(gearmand, BURST, str(BIG))  # more than the socket buffer holds
        finally:
            resume.join()
            os.kill(g.pid, signal.SIGCONT)
        assert during == first
        after = call(gearmand, BURST, "1")

        def burst_records() -> int:
            return sum("burst record" in r.get("message", "") for r in g.records())

        def exits() -> list[dict[str, object]]:
            return [r for r in g.records() if r.get("event") == "process_exited"]

        wait_for(lambda: burst_records() >= BIG + 2 or exits(), 10)
        assert (after, exits(), burst_records()) == (first, [], BIG + 2)
