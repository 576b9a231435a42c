"""The supervisor's single-threaded event loop: a selector plus timers. No threads, ever,
so forking from inside it is safe."""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gdriver.loop")

Callback = Callable[[int], None]  # called with the ready event mask


class Timer:
    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self.ticks = 0
        self.last_tick = time.monotonic()

    def fileno(self) -> int:
        return int(self.selector.fileno())

    def add(self, fileobj: Any, events: int, callback: Callback) -> None:
        self.selector.register(fileobj, events, callback)

    def modify(self, fileobj: Any, events: int, callback: Callback) -> None:
        self.selector.modify(fileobj, events, callback)

    def remove(self, fileobj: Any) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def registered(self, fileobj: Any) -> bool:
        try:
            self.selector.get_key(fileobj)
        except (KeyError, ValueError):
            return False
        return True

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return self.call_at(time.monotonic() + delay, callback)

    def run_once(self, max_wait: float = 1.0) -> None:
        """Wait for I/O or the next timer (at most max_wait s), then run what is due."""
        now = time.monotonic()
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        wait = max_wait
        if self._timers:
            wait = min(wait, max(0.0, self._timers[0][0] - now))
        for key, mask in self.selector.select(wait):
            callback: Callback = key.data
            try:
                callback(mask)
            except Exception:
                log.exception("event handler failed")
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                try:
                    timer.callback()
                except Exception:
                    log.exception("timer failed")
        self.ticks += 1
        self.last_tick = now

    def close(self) -> None:
        self.selector.close()
