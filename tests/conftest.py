from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))

from support import Gearmand


@pytest.fixture(scope="session")
def gearmand() -> Iterator[Gearmand]:
    """One real gearmand per test session, on a free loopback port, stopped by PID."""
    g = Gearmand().start()
    try:
        yield g
    finally:
        g.stop()


@pytest.fixture()
def fresh_gearmand() -> Iterator[Gearmand]:
    """A gearmand of the test's own, for tests that kill it or need empty queues."""
    g = Gearmand().start()
    try:
        yield g
    finally:
        g.stop()
