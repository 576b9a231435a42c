"""Jobs without processes scale up when work arrives, not at the next poll."""

from __future__ import annotations

from support import Gdriver, Gearmand, do, submit_background, wait_for


def test_backlog_for_a_job_without_processes_is_noticed_at_once_every_time(
    fresh_gearmand: Gearmand,
) -> None:
    # interval 60: within these waits only the waker can have triggered the scale-ups
    g = Gdriver(
        fresh_gearmand, "--namespaces", "live.basic", "--interval", "60", "--max_idle_time", "0"
    ).start()
    try:
        wait_for(lambda: fresh_gearmand.workers_for("basic.echo") >= 1, 15)
        for round_ in range(3):  # gearmand wakes a sleeper only once until it grabs: re-arm
            submit_background(fresh_gearmand.address, "basic.sleep", [b"0.2"] * 3)
            ups = wait_for(lambda n=round_: len(scale_ups(g)) > n and scale_ups(g), 10)
            assert ups[-1]["reason"] == "backlog"
            wait_for(lambda: fresh_gearmand.status().get("basic.sleep", (0, 0, 0))[0] == 0, 15)
            # back to no process (no poll comes to retire them): the waker must watch again
            assert g.console("killall basic.sleep") == ["OK"]
            wait_for(lambda: g.console("show basic.sleep")[1:] == [], 10)
            wait_for(lambda: fresh_gearmand.workers_for("basic.sleep") == 1, 10)  # the waker
        # a foreground call is served the same way
        assert do(fresh_gearmand.address, "basic.sleep", b"0", timeout=10).complete
    finally:
        g.stop()


def scale_ups(g: Gdriver) -> list[dict[str, object]]:
    return [
        r
        for r in g.records()
        if r.get("event") == "scale"
        and r.get("job_name") == "basic.sleep"
        and r.get("direction") == "up"
    ]
