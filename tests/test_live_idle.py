"""Live: max_idle_time (Perl t/026) and runtime configuration from YAML (Perl t/041)."""

from __future__ import annotations

import re
import time

from live_helpers import call, show_pids, wait_events, wait_registered
from support import Gearmand, pid_alive, running, wait_for

IDLE = "live.max_idle_time.MaxIdleTime.get_pid"
RO = "live.runtime_option.RuntimeOption."


def test_t026_max_idle_time(gearmand: Gearmand) -> None:
    max_idle = 3.0
    with running(
        gearmand, "--namespaces", "live.max_idle_time",
        "--interval", "0.5", "--max_idle_time", str(max_idle),
    ) as g:  # fmt: skip
        assert show_pids(g, IDLE) == []  # min 0: nothing before the first job
        first = call(gearmand, IDLE)
        for _ in range(3):  # used again well within max_idle_time: the same process
            time.sleep(0.5)
            assert call(gearmand, IDLE) == first
        last_use = time.monotonic()
        wait_for(lambda: not pid_alive(int(first)), 20)
        idle_for = time.monotonic() - last_use
        assert idle_for >= max_idle - 0.5, idle_for  # not stopped before max_idle_time
        (scale,) = wait_events(g, "scale", job_name=IDLE, direction="down")
        assert (scale["reason"], scale["count"]) == ("idle", 1)
        wait_for(lambda: show_pids(g, IDLE) == [], 10)  # once reaped
        second = call(gearmand, IDLE)  # started on demand again
        assert second != first


def test_t041_runtime_options_from_a_config_file(gearmand: Gearmand) -> None:
    config = {
        "worker_options": {
            "GLOBAL": {"foo": "GlobalTest", "global_foo": "GlobalTest"},
            "live.runtime_option.RuntimeOption": {"foo": "Test"},
        },
        "job_runtime_attributes": {
            RO + "job1": {"max_processes": 10, "min_processes": 2},
        },
        "interval": 1,
    }
    with running(gearmand, "--namespaces", "live.runtime_option", config=config) as g:
        wait_registered(gearmand, RO + "job1", RO + "job2")
        assert call(gearmand, RO + "job1") == b"Test"  # the class key beats GLOBAL
        assert call(gearmand, RO + "job2") == b"GlobalTest"  # only in GLOBAL
        wait_for(lambda: len(show_pids(g, RO + "job1")) == 2, 10)
        lines = g.console("status")
        assert len(lines) == 2, lines
        assert re.match(rf"^{re.escape(RO)}job1  2  10  2 ", lines[0]), lines[0]
        assert re.match(rf"^{re.escape(RO)}job2  1   1  1 ", lines[1]), lines[1]
        assert len(show_pids(g, RO + "job2")) == 1
