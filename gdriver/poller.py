"""The observer's eyes: the admin ``status`` command on every gearmand, polled from the
supervisor's loop without blocking it.

One round asks every server at once, each with its own timeout; when all have answered or
failed, the replies are merged and handed to ``on_status`` (None when no server answered),
``gearmand_up`` is updated, and the next round is scheduled ``interval`` s after this one
began. A busy job can ask for an earlier round (:meth:`GearmandPoller.request`), at most one
every REPOLL_MIN_GAP s.

Only the functions of this deployment's :class:`Concern` are kept from a reply (before
parsing: a shared gearmand may list tens of thousands of other teams' functions), so the
merged status, the queue gauges and the unknown-function signal cover them alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial

from gdriver import observer, resolver
from gdriver.gearman import AdminRequest, FunctionStatus, Server, parse_status
from gdriver.jobs import JobSpec
from gdriver.logs import log_event
from gdriver.loop import EventLoop, Timer
from gdriver.metrics import Metrics

log = logging.getLogger("gdriver")

REPOLL_MIN_GAP = 0.2  # s between polls triggered by busy processes

Status = Mapping[str, FunctionStatus]


def server_name(server: Server) -> str:
    return f"{server[0]}:{server[1]}"


GLOB_CHARS = frozenset("*?[")
MATCH_CACHE_MAX = 100_000  # names remembered per pattern set (a churning gearmand)


class Watch:
    """Prefixes and globs (an entry with ``*``, ``?`` or ``[``) of function names, with the
    answer for every name already asked (gearmand lists the same names every round)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.prefixes = tuple(p for p in patterns if GLOB_CHARS.isdisjoint(p))
        globs = [fnmatch.translate(p) for p in patterns if not GLOB_CHARS.isdisjoint(p)]
        self.regex = re.compile("|".join(globs)) if globs else None
        self.seen: dict[str, bool] = {}

    def __contains__(self, name: str) -> bool:
        hit = self.seen.get(name)
        if hit is None:
            hit = name.startswith(self.prefixes) or (
                self.regex is not None and self.regex.match(name) is not None
            )
            if len(self.seen) >= MATCH_CACHE_MAX:
                self.seen.clear()
            self.seen[name] = hit
        return hit


@functools.lru_cache(maxsize=8)
def watch(patterns: tuple[str, ...]) -> Watch:
    """One matcher per pattern set, so its answers outlive a round."""
    return Watch(patterns)


def default_watch(specs: Iterable[JobSpec]) -> tuple[str, ...]:
    """The module part of each served function (``app.images.`` for
    ``app.images.Images.resize``); with a custom prefix not starting with the worker's
    module, that prefix; with an empty one, nothing (served functions are kept anyway)."""
    out: dict[str, None] = {}
    for spec in specs:
        module = type(spec.worker).__module__ + "."
        for m in spec.methods:
            fn = m.function
            if fn.startswith(module):
                out[module] = None
            elif fn.endswith(m.method) and len(fn) > len(m.method):
                out[fn[: -len(m.method)]] = None
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Concern:
    """The gearmand functions this deployment looks at: those its jobs serve, and the
    others it watches for jobs nobody serves (``watch_functions``, else
    :func:`default_watch`)."""

    served: frozenset[str]
    watched: Watch

    @classmethod
    def of(cls, specs: Iterable[JobSpec], patterns: Sequence[str] = ()) -> Concern:
        specs = list(specs)
        served = frozenset(fn for spec in specs for fn in spec.functions)
        return cls(served, watch(tuple(patterns) or default_watch(specs)))

    def __contains__(self, name: str) -> bool:
        return name in self.served or name in self.watched

    def lines(self, lines: Iterable[str]) -> list[str]:
        """The ``status`` reply lines of our functions (the name ends at the first tab)."""
        served, seen, watched = self.served, self.watched.seen, self.watched
        out = []
        for line in lines:  # inlined lookups: a shared gearmand lists every team's functions
            name = line[: line.find("\t")]
            if name in served or seen.get(name) or (name not in seen and name in watched):
                out.append(line)
        return out


def merged_status(
    replies: Iterable[list[str]], concern: Concern | None
) -> dict[str, FunctionStatus]:
    """The ``status`` replies of the servers that answered, kept to ``concern`` (None: every
    function), parsed and summed by function."""
    rows = [parse_status(r if concern is None else concern.lines(r)) for r in replies]
    return observer.merge_status(rows)


@dataclasses.dataclass
class _Query:
    """One server's ``status`` request of the current round."""

    name: str
    request: AdminRequest


class GearmandPoller:
    def __init__(
        self,
        loop: EventLoop,
        metrics: Metrics,
        on_status: Callable[[Status | None], None],
        servers: Sequence[Server],
        interval: float,
        concern: Callable[[], Concern] | None = None,
    ) -> None:
        self.loop = loop
        self.concern = concern  # this deployment's functions, asked each round; None: all
        self.metrics = metrics
        self.on_status = on_status
        self.servers = list(servers)
        self.interval = interval  # 0: poll for readiness only, every 5 s
        self.gearmand_up: dict[str, bool] = {}  # server name -> its last poll worked
        self.last_status: Status = {}  # the last round's merged status ({}: nobody answered)
        self.answered = 0  # servers that answered the last round (status sums their rows)
        self.queries: list[_Query] = []  # the round in flight
        self.started = 0.0  # monotonic start of the last round
        self.timer: Timer | None = None  # the next round
        self.repoll_wanted = False
        self.stopped = False

    def configure(self, servers: Sequence[Server], interval: float) -> None:
        """New servers and interval (a reload); forgets the servers no longer listed."""
        self.interval = interval
        if list(servers) != self.servers:
            for name in set(self.gearmand_up) - {server_name(s) for s in servers}:
                del self.gearmand_up[name]
                with contextlib.suppress(KeyError):
                    self.metrics.gearmand_up.remove(name)
        self.servers = list(servers)

    def any_up(self) -> bool:
        return any(self.gearmand_up.values())

    def fds(self) -> list[int]:
        """Descriptors of the round in flight (a forked child closes them)."""
        fds = []
        for q in self.queries:
            with contextlib.suppress(Exception):
                fds.append(q.request.fileno())
        return fds

    def request(self) -> None:
        """Poll soon: at once, or REPOLL_MIN_GAP after the last round began."""
        if self.queries:
            self.repoll_wanted = True
            return
        self.schedule(max(0.0, self.started + REPOLL_MIN_GAP - time.monotonic()))

    def schedule(self, delay: float) -> None:
        """The next round in ``delay`` s (replacing the one scheduled)."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay, self.start)

    def start(self) -> None:
        """Begin a round now, unless one is in flight or polling stopped."""
        if self.stopped or self.queries:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.started = time.monotonic()
        timeout = max(0.2, min(2.0, self.interval or 2.0))
        self.repoll_wanted = False
        for server in self.servers:
            req = AdminRequest(server, "status", timeout)
            try:
                req.start()
                self.loop.add(req, req.wanted_events(), partial(self.on_event, req))
            except OSError as exc:
                req.done, req.error = True, str(exc)
            self.queries.append(_Query(server_name(server), req))
        self.loop.call_later(timeout + 0.05, self.check_timeouts)
        self.maybe_finish()

    def stop(self) -> None:
        """No more rounds (the supervisor drains); a round in flight still finishes."""
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()

    def close(self) -> None:
        for q in self.queries:
            with contextlib.suppress(Exception):
                self.loop.remove(q.request)
                q.request.close()

    def on_event(self, req: AdminRequest, mask: int) -> None:
        req.on_event(mask)
        if req.done:
            self.loop.remove(req)
        else:
            self.loop.modify(req, req.wanted_events(), partial(self.on_event, req))
        self.maybe_finish()

    def check_timeouts(self) -> None:
        now = time.monotonic()
        for q in self.queries:
            if not q.request.done:
                q.request.check_timeout(now)
                if q.request.done:
                    self.loop.remove(q.request)
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if not self.queries or not all(q.request.done for q in self.queries):
            return
        queries, self.queries = self.queries, []
        try:
            self.finish(queries)
        finally:  # whatever failed in this round, the next one is scheduled
            if not self.stopped:
                if self.repoll_wanted:
                    self.schedule(REPOLL_MIN_GAP)
                else:
                    interval = self.interval or 5.0
                    self.schedule(max(0.0, self.started + interval - time.monotonic()))

    def finish(self, queries: list[_Query]) -> None:
        """Record each server's answer, merge the replies and hand the status on."""
        replies = [q.request.lines for q in queries if q.request.error is None]
        self.answered = len(replies)
        for q in queries:
            self.record(q.name, q.request.error)
            if q.request.error is not None:
                resolver.suspect(*q.request.server)  # the name may point elsewhere now
            with contextlib.suppress(Exception):
                q.request.close()
        self.metrics.poll_duration.observe(time.monotonic() - self.started)
        status = None
        if replies:
            status = merged_status(replies, self.concern() if self.concern else None)
        self.last_status = status or {}
        self.on_status(status)

    def record(self, name: str, error: str | None) -> None:
        """One server's result: log changes of its state once, set its gauge."""
        ok = error is None
        if not ok and self.gearmand_up.get(name, True):
            log_event(
                log,
                logging.ERROR,
                f"observer: gearmand {name}: {error}",
                "observer_error",
                server=name,
            )
        if ok and not self.gearmand_up.get(name, False) and name in self.gearmand_up:
            log.info("observer: gearmand %s answers again", name)
        self.gearmand_up[name] = ok
        self.metrics.gearmand_up.labels(name).set(1 if ok else 0)
